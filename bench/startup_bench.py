"""Start-up side by side (issue 36): `capjob experiment=offline` vs raw vLLM on this machine.

Each contender runs in a fresh process, started by this script; its clock runs from the
process's start to the first caption file appearing on disk (polled every 0.1 s), so both are
timed by the same observer with the same definition:

  capjob      `capjob experiment=offline` into a new sink (the tiny model, the sample set);
  raw_vllm    what a user script does with vLLM alone: `vllm.LLM` with the engine args capjob
              would give it (`stages.caption.engine.engine_kwargs` of the same composed config,
              the preset's engine env vars), the sample images decoded and resized with Pillow,
              the chat template rendered once, `LLM.generate` over the first engine.batch_size
              images, written as one parquet file (its first caption), then the rest;
  nothing     `capjob experiment=offline` again on capjob's finished sink: the time to
              "nothing left to do" and exit 0.

Pairs alternate (capjob, raw, nothing; capjob, raw, nothing; ...) so drift on a busy machine
hits both; the medians and the per-pair differences are printed, with capjob's own start-up
marks (capjob.log's `start-up +S s: <phase>` lines, the engine's ready and first-caption times)
for the median pair.

    python bench/startup_bench.py --pairs 3 [--work /tmp/startup-bench] [--set KEY=VALUE ...]
                                  [--before KEY=VALUE ...] [--before-src DIR]

--before adds a third contender to every pair: capjob with these overrides on top (e.g. a switch
turned back off), so a change's before and after are timed side by side on the same machine.
--before-src DIR runs that contender from another capjob tree (a worktree of the previous
commit: a change no switch turns off).

Caches are warm by design (the issue's "warm caches"): the tiny model is built and the sample
set written before the first pair (a miss is timed separately by the first-ten-minutes bench).
Results: docs/benchmarks.md, "Start-up: capjob vs raw vLLM on the CPU (issue 36)".
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import shutil
import statistics
import subprocess
import sys
import time
from typing import Any, Optional

REPO = pathlib.Path(__file__).resolve().parent.parent
PRESET = ["experiment=offline"]


def compose(overrides: list[str]) -> Any:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from capjob.config import register_configs, to_typed

    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return to_typed(hydra_compose(config_name="config", overrides=overrides))


def first_file(directory: pathlib.Path) -> bool:
    return directory.is_dir() and any(p.suffix == ".parquet" and p.name[:1] not in "._" for p in directory.iterdir())


def timed(command: list[str], watch: Optional[pathlib.Path], log: pathlib.Path, env: dict[str, str]) -> dict[str, Any]:
    """Run `command`; seconds until a complete parquet file appears in `watch` and until exit."""
    start = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        first = None
        while proc.poll() is None:
            if first is None and watch is not None and first_file(watch):
                first = time.monotonic() - start
            time.sleep(0.1)
    if first is None and watch is not None and first_file(watch):
        first = time.monotonic() - start
    return {"rc": proc.returncode, "first_caption_s": None if first is None else round(first, 1),
            "exit_s": round(time.monotonic() - start, 1), "log": str(log)}


def startup_marks(run_dir: pathlib.Path) -> dict[str, float]:
    """capjob.log's start-up marks: {phase: seconds since the command started}."""
    marks: dict[str, float] = {}
    log = run_dir / "capjob.log"
    if log.exists():
        for line in log.read_text(errors="replace").splitlines():
            m = re.search(r"start-up \+([\d.]+) s: (.*)$", line)
            if m:
                marks[m.group(2)[:60]] = float(m.group(1))
    return marks


def report_timeline(sink: pathlib.Path) -> dict[str, Any]:
    reports = sorted(sink.glob("reports/*/report.json"))
    return json.loads(reports[-1].read_text()).get("timeline", {}) if reports else {}


def raw_vllm(sets: list[str], out_dir: str) -> None:
    """The raw vLLM contender, run in its own process (`startup_bench.py raw ...`)."""
    cfg = compose(PRESET + sets)
    from capjob.stages.caption.engine import EnginePlacement, engine_env, engine_kwargs

    # The environment capjob gives its CPU engine (vLLM and torch read it at import): the same
    # engine settings for both contenders.
    os.environ.update(engine_env(cfg.engine, EnginePlacement(0, None)))
    from vllm import LLM, SamplingParams

    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image
    from transformers import AutoProcessor

    from capjob.models import resolve_model_source
    from capjob.prompts import prompt_specs
    from capjob.stages.sources.sample import ensure_sample_dataset

    source = resolve_model_source(cfg.model.source, cfg.model.builder)
    spec = prompt_specs(cfg.caption)[0]  # the single caption prompt of the preset
    table = pq.read_table(ensure_sample_dataset(cfg.data.sample_size, cfg.data.sample_shapes))
    images = []
    for cell in table.column("image").to_pylist():
        im = Image.open(io.BytesIO(cell["bytes"])).convert("RGB")
        im.thumbnail((cfg.images.size, cfg.images.size))
        images.append(im)
    text = AutoProcessor.from_pretrained(source).apply_chat_template(
        [{"role": "system", "content": cfg.caption.system_prompt},
         {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": spec.template}]}],
        add_generation_prompt=True, tokenize=False)
    llm = LLM(model=source, **engine_kwargs(cfg.engine, cfg.model, EnginePlacement(0, None), [spec]))
    params = SamplingParams(temperature=cfg.caption.temperature, max_tokens=cfg.caption.max_tokens)
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    size = cfg.engine.batch_size
    for part, i in enumerate(range(0, len(images), size)):
        outputs = llm.generate([{"prompt": text, "multi_modal_data": {"image": im}} for im in images[i:i + size]], params, use_tqdm=False)
        captions = pa.table({"caption": [o.outputs[0].text for o in outputs]})
        pq.write_table(captions, out / f".part-{part}.parquet")
        os.replace(out / f".part-{part}.parquet", out / f"part-{part}.parquet")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd")
    raw = sub.add_parser("raw")
    raw.add_argument("out")
    raw.add_argument("--set", action="append", default=[])
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--work", default="/tmp/startup-bench")
    parser.add_argument("--set", action="append", default=[], help="an override every contender gets")
    parser.add_argument("--before", action="append", default=[],
                        help="overrides of a 'capjob (before)' contender run in every pair beside the others")
    parser.add_argument("--before-src", default=None,
                        help="a capjob source tree (e.g. `git worktree add /tmp/before HEAD~1`) the 'capjob (before)' "
                             "contender runs from (PYTHONPATH=<it>/src), with the --before overrides if any")
    parser.add_argument("--skip-nothing", action="store_true", help="leave out the nothing-to-do rerun")
    args = parser.parse_args()
    if args.cmd == "raw":
        raw_vllm(args.set, args.out)
        return
    work = pathlib.Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    capjob = [str(pathlib.Path(sys.executable).with_name("capjob"))]
    before_capjob, before_env = capjob, env
    if args.before_src:
        # Its Ray workers start from the driver's environment, so they import the same tree.
        src = pathlib.Path(args.before_src).resolve() / "src"
        before_capjob, before_env = [sys.executable, "-m", "capjob"], {**env, "PYTHONPATH": str(src)}
    # Warm: the model built and the sample set written before anything is timed.
    cfg = compose(PRESET + args.set)
    from capjob.models import resolve_model_source
    from capjob.stages.sources.sample import ensure_sample_dataset

    resolve_model_source(cfg.model.source, cfg.model.builder)
    ensure_sample_dataset(cfg.data.sample_size, cfg.data.sample_shapes)
    rows: list[dict[str, Any]] = []
    for i in range(args.pairs):
        pair = work / f"pair{i}"
        pair.mkdir()
        sink = pair / "sink"
        c = timed([*capjob, *PRESET, *args.set, f"sink.path={sink}", f"hydra.run.dir={pair / 'run'}"],
                  sink / "captions", pair / "capjob.out", env)
        c.update(marks=startup_marks(pair / "run"), timeline=report_timeline(sink))
        r = timed([sys.executable, __file__, "raw", str(pair / "raw"), *sum((["--set", s] for s in args.set), [])],
                  pair / "raw", pair / "raw.out", env)
        b = None
        if args.before or args.before_src:
            b = timed([*before_capjob, *PRESET, *args.set, *args.before, f"sink.path={pair / 'sink-before'}",
                       f"hydra.run.dir={pair / 'run-before'}"], pair / "sink-before" / "captions", pair / "before.out", before_env)
            b.update(marks=startup_marks(pair / "run-before"), timeline=report_timeline(pair / "sink-before"))
        n = None
        if not args.skip_nothing:
            n = timed([*capjob, *PRESET, *args.set, f"sink.path={sink}", f"hydra.run.dir={pair / 'rerun'}"],
                      None, pair / "rerun.out", env)
            text = pathlib.Path(n["log"]).read_text(errors="replace")
            n["said_nothing_left"] = "nothing left to do" in text
            n["marks"] = startup_marks(pair / "rerun")
        rows.append({"capjob": c, "raw_vllm": r, "nothing": n, "before": b})
        print(f"pair {i}: capjob first caption {c['first_caption_s']} s (rc {c['rc']}), raw vLLM {r['first_caption_s']} s "
              f"(rc {r['rc']})" + (f", capjob before {b['first_caption_s']} s (rc {b['rc']})" if b else "")
              + (f", nothing-to-do rerun {n['exit_s']} s (rc {n['rc']}, said so: {n['said_nothing_left']})" if n else ""),
              flush=True)
    (work / "results.json").write_text(json.dumps(rows, indent=1))

    def med(key: str, field: str) -> Optional[float]:
        values = [r[key][field] for r in rows if r[key] and r[key].get(field) is not None]
        return round(statistics.median(values), 1) if values else None

    diffs = [r["capjob"]["first_caption_s"] - r["raw_vllm"]["first_caption_s"] for r in rows
             if r["capjob"]["first_caption_s"] is not None and r["raw_vllm"]["first_caption_s"] is not None]
    print(f"\nfirst caption, median of {len(rows)}: capjob {med('capjob', 'first_caption_s')} s, raw vLLM "
          f"{med('raw_vllm', 'first_caption_s')} s; capjob - raw per pair: {[round(d, 1) for d in diffs]} "
          f"(median {round(statistics.median(diffs), 1) if diffs else None} s; target <= 15)")
    if args.before or args.before_src:
        label = " ".join([*([f"--before-src {args.before_src}"] if args.before_src else []), *args.before])
        before = [r["before"]["first_caption_s"] - r["raw_vllm"]["first_caption_s"] for r in rows
                  if r["before"]["first_caption_s"] is not None and r["raw_vllm"]["first_caption_s"] is not None]
        print(f"capjob before ({label}): first caption median {med('before', 'first_caption_s')} s; "
              f"before - raw per pair: {[round(d, 1) for d in before]} (median {round(statistics.median(before), 1) if before else None} s)")
        print("  its start-up marks (median pair):")
        mid = sorted(rows, key=lambda r: r["before"]["first_caption_s"] or 0)[len(rows) // 2]["before"]
        for phase, at in mid["marks"].items():
            print(f"  {at:6.1f}  {phase}")
    if not args.skip_nothing:
        print(f"nothing-to-do rerun, median: {med('nothing', 'exit_s')} s (target < 20)")
    middle = sorted(rows, key=lambda r: r["capjob"]["first_caption_s"] or 0)[len(rows) // 2]["capjob"]
    print("\ncapjob's start-up marks (median pair; s since the command):")
    for phase, at in middle["marks"].items():
        print(f"  {at:6.1f}  {phase}")
    tl = middle["timeline"]
    if tl:
        print(f"  engine ready {tl.get('engine_ready_s')} s, first caption {tl.get('first_caption_s')} s after the job's clock "
              f"(starts at the first mark)")


if __name__ == "__main__":
    main()
