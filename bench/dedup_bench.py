"""What caption-once saves, and what it costs: the offline job (tiny model, vLLM CPU) on two
parquet sets, dedup on and off side by side in one run (issue 32).

* ``repeats``: `--images` rows of which half are exact repeats (`--images / 2` distinct shape
  scenes, each twice under two names), shuffled and cut into `--blocks` blocks, so most copies
  land in another block than their original;
* ``distinct``: `--images` rows, no repeats: what dedup costs where it saves nothing (the claim
  per block and the digest; target under 3% of wall time).

Each contender is its own `capjob` subprocess (a fresh Ray and engine each), every request
generating exactly `--max-tokens` tokens (caption.ignore_eos). Reported per contender: engine
requests (rows into Ray Data LLM's vLLM stage), rows written, the whole run's wall time and
rows/s, the steady part (timeline: after the first caption), and with dedup the report's
distinct images, copies and requests saved. `--rounds 2` runs every contender twice, in
alternating order, and reports each one's median.

A run of ~100 rows on CPU is mostly start-up, whose spread between runs is larger than 3%, so
the bench also times the stage itself (``micro``): in one local Ray, the dedup stage
(claim.claim_copies) on the same decoded blocks with dedup off (the digest only, which the
caption request used to compute itself) and on (the digest, the registry actor's round trip
and the pending file), milliseconds per block.

    python bench/dedup_bench.py --images 96 --blocks 16 --max-tokens 16
"""

from __future__ import annotations

import argparse
import json
import pathlib
import random
import statistics
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
CONTENDERS = [("repeats", "off"), ("repeats", "exact"), ("distinct", "off"), ("distinct", "exact")]


def build_sets(root: pathlib.Path, images: int, seed: int = 32) -> dict[str, pathlib.Path]:
    """<root>/repeats and <root>/distinct, one parquet file each (module docstring)."""
    sys.path.insert(0, str(REPO / "src"))
    import pyarrow as pa
    import pyarrow.parquet as pq

    from capjob.stages.sources.sample import shape_images, write_hf_parquet

    scenes = shape_images(images, seed)
    half = scenes[: images // 2]
    repeats = [(n, b, "shapes") for n, b, _ in half] + [(f"copy_{n}", b, "shapes") for n, b, _ in half]
    random.Random(seed).shuffle(repeats)
    out = {}
    for name, rows in (("repeats", repeats), ("distinct", [(n, b, "shapes") for n, b, _ in scenes])):
        (root / name).mkdir(parents=True, exist_ok=True)
        write_hf_parquet(rows, root / name / "part-0.parquet")
        # Each row its own key (the same bytes under other keys: other ids, as in a crawl).
        pq.write_table(pq.read_table(root / name / "part-0.parquet").append_column("key", pa.array([n for n, _, _ in rows])),
                       root / name / "part-0.parquet")
        out[name] = root / name
    return out


def run(data: pathlib.Path, mode: str, args: argparse.Namespace, out: pathlib.Path, round_: int) -> dict:
    name = f"{data.name}-{mode}"
    run_id = f"dedup-{name}-{round_}"
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "capjob", "experiment=offline", "dataset=parquet", f"data.path={data}",
                           "data.name=dedupbench", "data.key_column=key", f"data.partitions={args.blocks}", f"dedup={mode}",
                           f"sink.path={out / run_id}", f"job.run_id={run_id}", f"caption.max_tokens={args.max_tokens}",
                           "caption.ignore_eos=true", "caption.temperature=0", "job.resume=false"], cwd=REPO, capture_output=True, text=True)
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    report = json.loads((out / run_id / "reports" / run_id / "report.json").read_text())
    engine = next(o for o in report["operators"] if "vLLMEngineStageUDF" in o["operator"])
    dedup = report.get("dedup") or {}
    timeline = report.get("timeline") or {}
    return {"set": data.name, "dedup": mode, "round": round_, "engine_requests": engine["input_rows"],
            "rows": report["captioned"], "wall_s": round(wall, 1), "report_wall_s": round(report["wall_seconds"], 1),
            "rows_per_s": round(report["captioned"] / wall, 3), "steady_s": timeline.get("steady_seconds"),
            "engine_s": engine["wall_seconds"], "distinct": dedup.get("distinct_images_captioned", report["captioned"]),
            "copies": dedup.get("copies_reused_caption", 0), "requests_saved": dedup.get("engine_requests_saved", 0)}


def micro(out: pathlib.Path, blocks: int, per_block: int) -> dict:
    """The dedup stage's own time per block, off vs on (module docstring): median ms."""
    import numpy as np
    import ray

    sys.path.insert(0, str(REPO / "src"))
    from capjob import metrics
    from capjob.config import DedupMode, ImagesConfig, SinkConfig
    from capjob.stages.dedup import claim, registry
    from capjob.stages.images import decode_image
    from capjob.stages.sources.sample import shape_images

    scenes = shape_images(blocks * per_block // 2, 7)
    pixels = [decode_image(b, ImagesConfig()).pixels for _, b, _ in scenes] * 2
    random.Random(1).shuffle(pixels)
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        ledger = metrics.start_ledger("bench", "micro")  # noqa: F841 - the stage counts copies in it
        actor = registry.start_registry("micro", DedupMode.exact, 4, claim.Seed(np.empty(0, np.uint64), np.empty(0, np.uint64)))
        sink = SinkConfig(path=str(out / "micro"))
        on = claim.ClaimTarget(sink, "micro", registry.registry_name("micro"), DedupMode.exact, [])
        off = claim.ClaimTarget(sink, "micro", None, DedupMode.off, [])
        times: dict[str, list[float]] = {"off": [], "on": []}
        kept = 0
        for b in range(blocks):
            images = np.empty(per_block, dtype=object)
            for i in range(per_block):
                images[i] = pixels[b * per_block + i]
            batch = {"id": np.asarray([f"r{b}-{i}" for i in range(per_block)], dtype=object),
                     "source_key": np.asarray([f"k{b}-{i}" for i in range(per_block)], dtype=object),
                     "image_width": np.full(per_block, 640), "image_height": np.full(per_block, 480), "image": images}
            for name, target in (("off", off), ("on", on)):
                t0 = time.perf_counter()
                result = claim.claim_copies(batch, target=target)
                times[name].append((time.perf_counter() - t0) * 1000)
            kept += len(result["id"])
        size = ray.get(actor.size.remote())
    finally:
        ray.shutdown()
    off_ms, on_ms = statistics.median(times["off"]), statistics.median(times["on"])
    return {"blocks": blocks, "rows_per_block": per_block, "kept": kept, "registry": size,
            "ms_per_block_off": round(off_ms, 2), "ms_per_block_on": round(on_ms, 2), "extra_ms_per_block": round(on_ms - off_ms, 2)}


def medians(results: list[dict]) -> list[dict]:
    out = []
    for data, mode in CONTENDERS:
        runs = [r for r in results if (r["set"], r["dedup"]) == (data, mode)]
        if not runs:
            continue
        row = dict(runs[0])
        for key in ("wall_s", "report_wall_s", "rows_per_s", "steady_s", "engine_s"):
            values = [r[key] for r in runs if r[key] is not None]
            row[key] = round(statistics.median(values), 3) if values else None
        row["rounds"] = len(runs)
        out.append(row)
    return out


def render(rows: list[dict]) -> str:
    """The markdown table and the two ratios the issue asks for."""
    lines = ["| set | dedup | engine requests | rows written | distinct captioned | copies | wall s | rows/s | steady s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['set']} | {r['dedup']} | {r['engine_requests']} | {r['rows']} | {r['distinct']} | {r['copies']} | "
                     f"{r['wall_s']} | {r['rows_per_s']} | {r['steady_s']} |")
    by = {(r["set"], r["dedup"]): r for r in rows}
    if ("repeats", "off") in by and ("repeats", "exact") in by:
        off, on = by["repeats", "off"], by["repeats", "exact"]
        lines.append(f"\nrepeats: dedup on sends {on['engine_requests']} engine requests instead of {off['engine_requests']} "
                     f"({off['engine_requests'] - on['engine_requests']} saved); wall {on['wall_s']} s vs {off['wall_s']} s "
                     f"({on['wall_s'] / off['wall_s']:.2f}x), rows/s {on['rows_per_s']} vs {off['rows_per_s']} "
                     f"({on['rows_per_s'] / off['rows_per_s']:.2f}x)")
    if ("distinct", "off") in by and ("distinct", "exact") in by:
        off, on = by["distinct", "off"], by["distinct", "exact"]
        lines.append(f"distinct: dedup overhead {100 * (on['wall_s'] / off['wall_s'] - 1):+.1f}% of wall time "
                     f"({on['wall_s']} s vs {off['wall_s']} s; target < 3%)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=96, help="rows of each set (repeats: half of them distinct)")
    parser.add_argument("--blocks", type=int, default=16, help="data.partitions: blocks the rows are cut into")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=1, help="runs of each contender, alternating order; medians reported")
    parser.add_argument("--sets", nargs="+", default=["repeats", "distinct"])
    parser.add_argument("--micro", action=argparse.BooleanOptionalAction, default=True, help="also time the stage alone")
    parser.add_argument("--out", type=pathlib.Path, default=None)
    parser.add_argument("--json", type=pathlib.Path, default=None)
    args = parser.parse_args(argv)
    out = args.out or pathlib.Path(tempfile.mkdtemp(prefix="dedup-bench-"))
    sets = build_sets(out / "data", args.images)
    results = []
    for round_ in range(args.rounds):
        order = [c for c in CONTENDERS if c[0] in args.sets]
        for data, mode in (order if round_ % 2 == 0 else order[::-1]):
            results.append(run(sets[data], mode, args, out, round_))
            print(json.dumps(results[-1]), flush=True)
    rows = medians(results)
    print(render(rows))
    stage = micro(out, args.blocks, max(1, args.images // args.blocks)) if args.micro else None
    if stage:
        print(f"dedup stage per block of {stage['rows_per_block']} rows: {stage['ms_per_block_off']} ms off (digest only), "
              f"{stage['ms_per_block_on']} ms on (+{stage['extra_ms_per_block']} ms: registry round trip, pending file); "
              f"{stage['kept']} of {stage['blocks'] * stage['rows_per_block']} rows kept")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "runs": results, "medians": rows,
                                         "micro": stage}, indent=1))


if __name__ == "__main__":
    main()
