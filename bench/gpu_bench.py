"""GPU throughput, side by side (issue 8): capjob vs raw vLLM vs the seed's configuration vs a
transformers loop, on the same images, prompt, output length and GPU.

Every contender captions the same 640x480 JPEGs, resized to the seed's 225x225 (so each
prompt carries the same vision tokens), with the same system + user prompt and exactly
`--max-tokens` generated tokens (ignore_eos). The model is Qwen2.5-VL-3B-Instruct's true
architecture with random weights (`model=qwen25vl_3b_dummy`: vLLM load_format=dummy, the
transformers model built from the same config.json), so nothing comes from the hub.

Contenders (each in its own process, so GPU memory is free for the next):
  capjob        `python -m capjob` end to end: read parquet -> filter -> repartition -> processor
                -> write parquet; one run per sweep point, the best one is capjob's number
  raw_vllm      vllm.LLM.chat over the images pre-decoded in memory: the engine's ceiling
  seed          the seed notebook through Ray Data LLM: batch_size 16, its preprocess (225x225
                BICUBIC) and postprocess, default stages, materialize()
  transformers  Qwen2_5_VLForConditionalGeneration.generate, batched, bf16, on a smaller sample

Throughput is "steady": images finished after the first output divided by the time from the
first to the last output (engine start-up is reported apart, as start_s). GPU utilisation is
NVML's, sampled every 0.2 s over the same window.

Every invocation appends its results to --results (JSON lines), so the contenders can run in
separate device commands (each under 10 minutes); `report` renders them all:

    python bench/gpu_bench.py data --images 3000                         # once
    python bench/gpu_bench.py run raw_vllm transformers seed
    python bench/gpu_bench.py run capjob --sweep engine.batch_size=32,128 engine.max_num_seqs=128,256
    python bench/gpu_bench.py report --out docs/bench-gpu      # table (markdown), sweep.png

Issue 22's additions: `--experiment h200_throughput` and `run --set k=v ...` (overrides every
contender gets; raw vLLM's engine kwargs follow them), `--raw-api generate|chat`, `--profile S`
(py-spy over the engine core and its front-end for S seconds of the steady window; Profiler),
MFU (FLOP_PER_IMAGE over PEAK_FLOPS), vLLM's stat-line means, end-to-end wall and, for raw vLLM,
its image decoding; `report` ends with every run's row (runs_table). bench/gpu_issue22.sh runs
the issue's session.

CPU smoke run (tiny model, a few images; checks every code path, measures nothing):

    python bench/gpu_bench.py --smoke data --images 8 && python bench/gpu_bench.py --smoke run capjob raw_vllm seed transformers && python bench/gpu_bench.py --smoke report
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import os
import pathlib
import shutil
import subprocess
import sys
import threading
import time
from typing import Any, Optional

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

SIZE = 225  # the seed's square resize, used by every contender
SEED_BATCH_SIZE = 16
CONTENDERS = ("capjob", "raw_vllm", "seed", "transformers")
# Useful work per caption (issue 22's count for Qwen2.5-VL-3B, 225x225 -> 64 vision tokens, ~100
# prompt tokens, 128 output tokens; 2 FLOP per parameter per token): vision encoder ~0.34 TFLOP,
# prefill ~0.6, decode ~0.8. Prefix-cache hits are not subtracted: MFU is of the useful work.
FLOP_PER_IMAGE = 1.76e12
# Dense bf16 peak of an H100/H200 SXM (NVIDIA's datasheet, without sparsity), as in issue 22.
PEAK_FLOPS = 989e12


def mfu_pct(images_per_s: Optional[float], max_tokens: int) -> Optional[float]:
    """Model FLOP utilisation, %, of the dense bf16 peak; None off the 128-token workload the
    FLOP count is for."""
    if not images_per_s or max_tokens != 128:
        return None
    return round(100 * images_per_s * FLOP_PER_IMAGE / PEAK_FLOPS, 1)


# --- settings shared by every contender ---------------------------------------------------


def settings(args: argparse.Namespace) -> dict[str, Any]:
    work = pathlib.Path(args.work)
    return {
        "smoke": args.smoke,
        "work": str(work),
        "data": str(work / "data"),
        "results": str(pathlib.Path(args.results) if args.results else work / "results.jsonl"),
        "model": "tiny_qwen25vl" if args.smoke else "qwen25vl_3b_dummy",
        "resources": "local" if args.smoke else args.resources,
        "max_tokens": 8 if args.smoke else args.max_tokens,
        "max_model_len": 4096 if args.smoke else 8192,
        "temperature": 0.3,
        "transformers_images": args.transformers_images,
        "label": args.label if args.cmd == "run" else None,
        "timeout": args.timeout if args.cmd == "run" else None,
        "experiment": args.experiment,
        "set": list(getattr(args, "set", None) or []),
        "raw_api": getattr(args, "raw_api", "generate"),
        "profile_s": getattr(args, "profile", 0.0) or 0.0,
        "profile_delay_s": getattr(args, "profile_delay", 10.0),
        "decode_workers": getattr(args, "decode_workers", 1),
    }


def base_overrides(s: dict[str, Any]) -> list[str]:
    """capjob overrides that give every contender the same request (and, for raw vLLM, the
    same engine kwargs, taken from capjob's own engine_kwargs())."""
    overrides = [
        f"model={s['model']}", f"resources={s['resources']}", "dataset=parquet", f"data.path={s['data']}",
        "data.name=gpubench", "data.image_column=jpg", "data.key_column=key",
        f"images.size={SIZE}", "images.resize=square",
        f"caption.max_tokens={s['max_tokens']}", "caption.ignore_eos=true", f"caption.temperature={s['temperature']}",
        f"engine.max_model_len={s['max_model_len']}", "job.resume=false",
    ]
    if s["smoke"]:
        overrides += ["experiment=offline"]
    elif s.get("experiment"):
        overrides += [f"experiment={s['experiment']}"]
    # --set: overrides every contender gets (raw vLLM too: its engine kwargs come from them).
    return overrides + list(s.get("set") or [])


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from capjob.config import register_configs, to_typed

    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return to_typed(hydra_compose(config_name="config", overrides=overrides))


def prompts() -> tuple[str, str]:
    from capjob.config import CaptionConfig

    c = CaptionConfig()
    return c.system_prompt, c.user_prompt


# --- data --------------------------------------------------------------------------------


def make_data(s: dict[str, Any], count: int) -> None:
    """`count` distinct 640x480 photo-like JPEGs (crops of scikit-image's photos, jittered),
    in the seed's layout: a `jpg` column of {bytes, path} plus a `key`; one process per file."""
    from concurrent.futures import ProcessPoolExecutor

    out = pathlib.Path(s["data"])
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.parquet"):
        old.unlink()
    per_file = 500
    files = [(out / f"part-{n:05d}.parquet", range(start, min(start + per_file, count)))
             for n, start in enumerate(range(0, count, per_file))]
    with ProcessPoolExecutor(max_workers=min(len(files), os.cpu_count() or 1)) as pool:
        list(pool.map(_write_data_file, *zip(*files)))
    print(f"wrote {count} images to {out}")


def _write_data_file(path: pathlib.Path, indices: range) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image, ImageEnhance
    from skimage import data as skdata

    photos = [getattr(skdata, n)() for n in ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry")]
    photos = [Image.fromarray(p).convert("RGB") for p in photos]
    cells, keys = [], []
    for i in indices:
        rng = np.random.default_rng(i)  # per image: the same images whatever the file split
        photo = photos[i % len(photos)]
        scale = rng.uniform(1.0, 2.0)
        big = photo.resize((int(max(640, photo.width) * scale), int(max(480, photo.height) * scale)))
        x, y = int(rng.integers(0, big.width - 640 + 1)), int(rng.integers(0, big.height - 480 + 1))
        img = ImageEnhance.Color(big.crop((x, y, x + 640, y + 480))).enhance(rng.uniform(0.6, 1.4))
        if rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        cells.append({"bytes": buf.getvalue(), "path": f"img_{i:07d}.jpg"})
        keys.append(f"img_{i:07d}")
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    pq.write_table(pa.table({"key": keys, "jpg": pa.array(cells, type=image_type)}), path)


def load_images(s: dict[str, Any], limit: Optional[int] = None, workers: int = 1):
    """The images decoded and resized to the seed's 225x225, in memory (raw vLLM, transformers).
    workers > 1: in that many processes, in order (a user script with a process pool; session 9 of
    issue 22, to give raw vLLM the shortest wall time)."""
    import pyarrow.parquet as pq

    table = pq.read_table(s["data"], columns=["jpg"])
    blobs = [c["bytes"] for c in table.column("jpg").to_pylist()[:limit]]
    if workers <= 1:
        return _decode(blobs)
    from concurrent.futures import ProcessPoolExecutor

    chunks = [blobs[i : i + 250] for i in range(0, len(blobs), 250)]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return [img for part in pool.map(_decode, chunks) for img in part]


def _decode(blobs: list[bytes]) -> list[Any]:
    from PIL import Image

    return [Image.open(io.BytesIO(b)).convert("RGB").resize((SIZE, SIZE), Image.Resampling.BICUBIC) for b in blobs]


# --- measuring ------------------------------------------------------------------------------


class GpuSampler:
    """NVML utilisation every 0.2 s in a thread; mean over a time window afterwards. With several
    GPUs a sample is their mean utilisation and their summed memory (a 2-GPU layout at 50 % is
    either both GPUs half busy or one idle)."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float, float]] = []  # (time, gpu util %, memory used GiB)
        self._stop = threading.Event()
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
            self._nvml = pynvml
        except Exception:  # noqa: BLE001 - no NVML: a CPU smoke run
            self._nvml = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "GpuSampler":
        if self._nvml:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._nvml:
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            util = [self._nvml.nvmlDeviceGetUtilizationRates(h).gpu for h in self._handles]
            mem = sum(self._nvml.nvmlDeviceGetMemoryInfo(h).used for h in self._handles)
            self.samples.append((time.time(), sum(util) / len(util), mem / 2**30))

    def window(self, start: float, end: float) -> dict[str, Optional[float]]:
        inside = [s for s in self.samples if start <= s[0] <= end]
        if not inside:
            return {"gpu_util_mean": None, "gpu_idle_share": None, "gpu_mem_peak_gib": None}
        return {
            "gpu_util_mean": round(sum(s[1] for s in inside) / len(inside), 1),
            # Samples at <= 10 %: the GPU waiting for work (starved stages show up here).
            "gpu_idle_share": round(sum(s[1] <= 10 for s in inside) / len(inside), 3),
            "gpu_mem_peak_gib": round(max(s[2] for s in self.samples), 1),
        }


class Profiler:
    """py-spy over the engine's processes for one steady window: once `ready()` is true, wait
    `delay` s, then sample for `duration` s (100 Hz, no pause of the target, one file per process
    and thread-tagged stacks). The processes: vLLM's EngineCore (scheduler, input preparation,
    model launch, sampling) and its parent, the engine front-end (input processing, output
    processing; the Ray Data actor in capjob, the bench itself for raw vLLM). Results go to
    WORK/profiles/<label>-<role>.txt (py-spy's raw format) and a summary to stdout and
    `self.summary` (each thread's busy share and its heaviest frames)."""

    def __init__(self, s: dict[str, Any], label: str, ready: Any) -> None:
        self.duration, self.delay, self.ready, self.label = s["profile_s"], s["profile_delay_s"], ready, label
        self.dir = pathlib.Path(s["work"]) / "profiles"
        self.summary: dict[str, Any] = {}
        self.window: Optional[tuple[float, float]] = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "Profiler":
        if self.duration > 0 and shutil.which("py-spy"):
            self._thread.start()
        elif self.duration > 0:
            print("profile: py-spy not on PATH, no profile", flush=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()  # a profile not started by now never will be
        if self._thread.is_alive():
            self._thread.join(timeout=self.duration + 30)

    def _run(self) -> None:
        import psutil

        while not self.ready():
            if self._stop.wait(0.5):
                return
        if self._stop.wait(self.delay):
            return
        cores = [p for p in psutil.process_iter(["pid", "name", "cmdline"])
                 if "EngineCore" in (p.info["name"] or "") + " ".join(p.info["cmdline"] or [])]
        targets = {}
        for i, core in enumerate(cores):
            suffix = f"{i}" if len(cores) > 1 else ""
            targets[f"enginecore{suffix}"] = core.pid
            try:
                targets[f"frontend{suffix}"] = core.parent().pid
            except Exception:  # noqa: BLE001 - the parent went away
                pass
        if not targets:
            print("profile: no EngineCore process found", flush=True)
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        procs = {}
        start = time.time()
        for role, pid in targets.items():
            path = self.dir / f"{self.label}-{role}.txt"
            # GPU_BENCH_NATIVE=1: the engine core's C/C++ frames too (what a Python frame's own time is).
            # py-spy pauses the target for those ("Can't get native stack traces with the
            # --nonblocking option": session 8 lost raw vLLM's native profile to it).
            native = ["--native"] if role.startswith("enginecore") and os.environ.get("GPU_BENCH_NATIVE") == "1" else ["--nonblocking"]
            procs[role] = (path, subprocess.Popen(
                ["py-spy", "record", "--pid", str(pid), "--duration", str(int(self.duration)), "--rate", "100",
                 "--format", "raw", "--threads", *native, "--output", str(path)],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
        for role, (path, proc) in procs.items():
            _, err = proc.communicate(timeout=self.duration + 60)
            if proc.returncode or not path.exists():
                print(f"profile: py-spy on {role} failed: {err[-500:]}", flush=True)
                continue
            self.summary[role] = summarize_profile(path, self.duration, 100)
        self.window = (start, start + self.duration)
        for role, summ in self.summary.items():
            print(f"PROFILE {self.label} {role}: " + json.dumps(summ), flush=True)


def summarize_profile(path: pathlib.Path, duration: float, rate: int, top: int = 40) -> dict[str, Any]:
    """py-spy raw stacks -> per thread: share of the window it was running Python (samples over
    duration x rate) and the frames (function, file) taking the largest inclusive share of it."""
    import collections
    import re

    threads: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    totals: collections.Counter = collections.Counter()
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        thread = frames[0] if frames[0].startswith(("thread", "process")) else "main"
        body = frames[1:] if thread != "main" else frames
        n = int(count)
        totals[thread] += n
        seen = set()
        for f in body:
            name = re.sub(r":\d+\)$", ")", f)  # the function, not the line
            name = re.sub(r"\(/.*/(site-packages|python3\.\d+)/", "(", name)
            if name not in seen:
                seen.add(name)
                threads[thread][name] += n
    out = {}
    for thread, total in totals.most_common(3):
        out[thread] = {"busy_share": round(total / (duration * rate), 3),
                       "frames": {f: round(c / total, 3) for f, c in threads[thread].most_common(top)}}
    return out


def vllm_log_stats(log: pathlib.Path) -> dict[str, Any]:
    """Means of vLLM's periodic stat lines (log_engine_metrics) over the lines with requests
    running: generated tokens/s, running requests, KV cache use, prefix-cache hit rate."""
    import re

    pattern = re.compile(r"Avg prompt throughput: ([\d.]+) tokens/s, Avg generation throughput: ([\d.]+) tokens/s, "
                         r"Running: (\d+) reqs, Waiting: (\d+) reqs(?:, (?:Deferred|Preemptions): \d+(?: reqs)?)*, GPU KV cache usage: ([\d.]+)%"
                         r"(?:, Prefix cache hit rate: ([\d.]+)%)?")
    rows = [m.groups() for m in pattern.finditer(log.read_text(errors="replace"))] if log.exists() else []
    rows = [r for r in rows if int(r[2]) > 0]
    if not rows:
        return {}

    def mean(i: int) -> float:
        vals = [float(r[i]) for r in rows if r[i] is not None]
        return round(sum(vals) / len(vals), 1) if vals else None

    return {"vllm_gen_tok_s": mean(1), "vllm_prompt_tok_s": mean(0), "vllm_running": mean(2), "vllm_waiting": mean(3),
            "vllm_kv_pct": mean(4), "vllm_prefix_hit_pct": mean(5), "vllm_stat_lines": len(rows)}


def startup_timeline(logs: list[pathlib.Path], started: float) -> dict[str, Any]:
    """capjob's start-up, seconds from the command's start (`started`, epoch s) to each step, read
    from the job's logs (the console log and the run dir's full log; Ray's and vLLM's own
    timestamps, local time, vLLM's without a year): Ray up; Ray Data starts the caption dataset
    (the one whose plan holds the vLLM engine stage; capjob may peek at the source first); the
    engine actors' first vLLM line (they configure vLLM); the engine cores spawn (first, last);
    the engines are ready (vLLM's "init engine ... took": first, last); vLLM's torch.compile
    times. Missing steps are left out. The first caption comes from the sink (measure_job)."""
    import datetime as dt
    import re

    year = dt.datetime.fromtimestamp(started).year
    ray_ts = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3})")
    vllm_ts = re.compile(r"(?:INFO|WARNING|DEBUG|ERROR) (\d\d-\d\d \d\d:\d\d:\d\d)")

    def at(line: str) -> Optional[float]:
        m = ray_ts.search(line)
        if m:
            return time.mktime(dt.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S").timetuple()) + int(m.group(2)) / 1000
        m = vllm_ts.search(line)
        if m:
            return time.mktime(dt.datetime.strptime(f"{year}-{m.group(1)}", "%Y-%m-%d %H:%M:%S").timetuple())
        return None

    steps: dict[str, list[float]] = {}
    compile_s: list[float] = []
    marks: dict[str, float] = {}
    starts: dict[str, float] = {}  # dataset name -> its start
    seen: set[str] = set()
    for log in logs:
        if not log.exists():
            continue
        for line in log.read_text(errors="replace").splitlines():
            if line in seen:  # the console log repeats some of the full log's lines
                continue
            seen.add(line)
            t = at(line)
            m = re.search(r"Starting execution of Dataset (\S+)\.", line)
            if m and t:
                starts[m.group(1)] = t
            m = re.search(r"Execution plan of Dataset (\S+):", line)
            if m and "vLLMEngineStage" in line and m.group(1) in starts:
                steps.setdefault("ray_data_start", []).append(starts[m.group(1)])
            if t is None:
                continue
            if "Started a local Ray instance" in line:
                steps.setdefault("ray_up", []).append(t)
            elif "vLLMEngineStage" in line and "EngineCore" not in line and vllm_ts.search(line):
                steps.setdefault("engine_actor", []).append(t)
            if "Initializing a V1 LLM engine" in line:
                steps.setdefault("engine_core_spawn", []).append(t)
            if "init engine (profile, create kv cache, warmup model) took" in line:
                steps.setdefault("engine_ready", []).append(t)
            m = re.search(r"torch\.compile took ([\d.]+) s", line)
            if m:
                compile_s.append(float(m.group(1)))
            # capjob's own marks (console.startup_mark: seconds since its process started)
            m = re.search(r"start-up \+([\d.]+) s: (.+)$", line)
            if m:
                marks[m.group(2).strip()] = float(m.group(1))
    out: dict[str, Any] = {}
    for key, times in steps.items():
        out[f"{key}_s"] = round(min(times) - started, 1)
        if key in ("engine_core_spawn", "engine_ready") and len(times) > 1:
            out[f"{key}_last_s"] = round(max(times) - started, 1)
    if compile_s:
        out["torch_compile_s"] = compile_s
    if marks:
        out["capjob_marks"] = marks
    return out


def steady(finish_times: list[float], tokens_per_image: int, started: float) -> dict[str, Any]:
    """Throughput between the first and the last finished image (start-up excluded)."""
    times = sorted(finish_times)
    span = times[-1] - times[0] if len(times) > 1 else 0.0
    rate = (len(times) - 1) / span if span > 0 else None
    return {
        "images": len(times),
        "start_s": round(times[0] - started, 2),
        "window": (times[0], times[-1]),
        "images_per_s": round(rate, 3) if rate else None,
        "output_tokens_per_s": round(rate * tokens_per_image, 1) if rate else None,
    }


def record(s: dict[str, Any], result: dict[str, Any]) -> None:
    result = {k: v for k, v in result.items() if k != "window"}
    result.update(resources=s["resources"], **({"label": s["label"]} if s.get("label") else {}))
    if result.get("images_per_s"):
        result["mfu_pct"] = mfu_pct(result["images_per_s"], s["max_tokens"])
    result.update(experiment=s.get("experiment"), set=s.get("set"))
    with open(s["results"], "a") as f:
        f.write(json.dumps(result) + "\n")
    print("RESULT", json.dumps(result), flush=True)


def engine_operator(operators: list[dict[str, Any]]) -> dict[str, Any]:
    """The vLLM engine operator's row of capjob.reporting.report.operator_stats (wall s, rows/s)."""
    return next((o for o in operators if "vLLMEngineStage" in o["operator"]), {})


# --- contenders ------------------------------------------------------------------------------


def run_capjob(s: dict[str, Any], point: dict[str, str]) -> dict[str, Any]:
    name = "-".join(f"{k.split('.')[-1]}{v}" for k, v in point.items()) or "defaults"
    out = pathlib.Path(s["work"]) / "capjob-out" / (f"{s['label']}-{name}" if s.get("label") else name)
    shutil.rmtree(out, ignore_errors=True)  # an earlier run's files would count as this one's
    overrides = base_overrides(s) + [f"sink.path={out}", f"hydra.run.dir={out}/hydra"] + [f"{k}={v}" for k, v in point.items()]
    out.mkdir(parents=True)
    log = out / "capjob.log"  # vLLM's "Running: N reqs" lines, Ray Data's progress; written as the job runs
    label = f"capjob-{s['label'] or name}"
    profiler = Profiler(s, label, lambda: any(out.rglob("*.parquet")))
    with GpuSampler() as gpu, open(log, "w") as log_file, profiler:
        started = time.time()
        try:
            returncode = subprocess.run([sys.executable, "-m", "capjob", *overrides], cwd=REPO, stdout=log_file,
                                        stderr=subprocess.STDOUT, timeout=s["timeout"]).returncode
        except subprocess.TimeoutExpired:
            returncode = None
        ended = time.time()
    if returncode is None:
        # Cut short (--timeout): what reached the sink still gives a steady rate over that part.
        return {"contender": "capjob", "point": point, "status": f"timeout after {s['timeout']:g} s",
                **partial_rate(s, out, started, gpu), "wall_s": round(ended - started, 1),
                "startup": startup_timeline([log, out / "hydra" / "capjob.log"], started)}
    if returncode != 0:
        sys.stderr.write(log.read_text(errors="replace")[-8000:])
        return {"contender": "capjob", "point": point, "status": f"failed ({returncode})"}
    result = {"contender": "capjob", "point": point, "status": "ok", **measure_job(s, out, started, gpu),
              # vLLM's stat lines go to the job's full log (the console shows capjob's own lines).
              "wall_s": round(ended - started, 1), **vllm_log_stats(out / "hydra" / "capjob.log")}
    result["startup"] = {**startup_timeline([log, out / "hydra" / "capjob.log"], started), "first_caption_s": result.get("start_s")}
    return with_profile(result, profiler, gpu)


def with_profile(result: dict[str, Any], profiler: "Profiler", gpu: "GpuSampler") -> dict[str, Any]:
    if profiler.window:
        result["profile_gpu_util"] = gpu.window(*profiler.window)["gpu_util_mean"]
        result["profile"] = profiler.summary
    return result


def partial_rate(s: dict[str, Any], sink: pathlib.Path, started: float, gpu: "GpuSampler") -> dict[str, Any]:
    """Steady rate of the rows a job cut short had written (no report: no engine-operator rate)."""
    import pyarrow.parquet as pq

    finish: list[float] = []
    for f in [*(sink / "captions").rglob("*.parquet"), *(sink / "quarantine").rglob("*.parquet")]:
        try:
            finish += [f.stat().st_mtime] * pq.read_metadata(f).num_rows
        except Exception:  # noqa: BLE001 - a file being written when the job was stopped
            continue
    if not finish:
        return {"images": 0}
    st = steady(finish, s["max_tokens"], started)
    return {**st, **gpu.window(*st["window"])}


def measure_job(s: dict[str, Any], sink: pathlib.Path, started: float, gpu: "GpuSampler") -> dict[str, Any]:
    """Steady rate, engine-operator rate and GPU use of one finished capjob job, from its sink."""
    import pyarrow.parquet as pq

    # Finish times from the sink: each file is written when its block leaves the engine. Quarantined
    # rows count too: the engine generated their tokens all the same (the dummy model's random
    # weights often generate special tokens only, an empty caption; seen 2026-12-03, issue 22).
    finish: list[float] = []
    ids: list[str] = []
    for f in [*(sink / "captions").rglob("*.parquet"), *(sink / "quarantine").rglob("*.parquet")]:
        finish += [f.stat().st_mtime] * pq.read_metadata(f).num_rows
        ids += pq.read_table(f, columns=["id"]).column("id").to_pylist()
    report = json.loads(next((sink / "reports").rglob("report.json")).read_text())
    st = steady(finish, s["max_tokens"], started)
    timeline = report.get("timeline") or {}
    # Ray Data's operator timeline: each operator's wall time and rate (where a stage waits).
    ops = [{k: o.get(k) for k in ("operator", "wall_seconds", "rows_per_second")} for o in report.get("operators", [])]
    return {**st, "engine_op_rows_per_s": engine_operator(report.get("operators", [])).get("rows_per_second"),
            "engine_ready_s": timeline.get("engine_ready_s"), "operators": ops,
            "captioned": report.get("captioned"), "quarantined": report.get("quarantined"),
            # check_table's rule: every row once (ids), empty captions of dummy weights apart.
            "rows_written": len(ids), "distinct_ids": len(set(ids)), "empty_captions": report.get("empty_captions", 0),
            "guard_ms_per_batch": (report.get("engine_guard") or {}).get("ms_before_engine_per_batch"),
            **gpu.window(*st["window"]),
            "report": str(next((sink / "reports").rglob("report.md")))}


def run_capjob_multirun(s: dict[str, Any], specs: list[str]) -> list[dict[str, Any]]:
    """`capjob --multirun` over `specs` (Hydra's comma-separated sweep overrides) in one process,
    as a user runs it; one result per job, failed jobs (bad combinations) included, and the
    sweep's own sweep.md next to them."""
    import datetime as dt

    out = pathlib.Path(s["work"]) / "capjob-sweep" / time.strftime("%Y%m%d-%H%M%S")
    # No sink.path: each job writes into its own <job>/out (a shared sink would resume across jobs).
    overrides = [o for o in base_overrides(s)] + [f"hydra.sweep.dir={out}"] + specs
    with GpuSampler() as gpu:
        try:
            proc = subprocess.run([sys.executable, "-m", "capjob", "--multirun", *overrides], cwd=REPO, text=True,
                                  capture_output=True, timeout=s["timeout"])
        except subprocess.TimeoutExpired as e:  # keep the jobs that finished
            def text(b: Any) -> str:
                return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")

            proc = subprocess.CompletedProcess(e.cmd, 124, text(e.stdout), text(e.stderr) + f"\n(stopped after {s['timeout']} s)")
    out.mkdir(parents=True, exist_ok=True)
    (out / "capjob.log").write_text(proc.stdout + proc.stderr)
    swept = [spec.split("=", 1)[0] for spec in specs if "," in spec]
    results = []
    for job in sorted((p for p in out.iterdir() if (p / "sweep_job.json").exists()), key=lambda p: int(p.name)):
        rec = json.loads((job / "sweep_job.json").read_text())
        point = {k: v for k, v in (o.split("=", 1) for o in rec["overrides"]) if k in swept}
        result: dict[str, Any] = {"contender": "capjob", "point": point, "sweep_dir": str(out), "sweep_job": job.name}
        if rec.get("status") != "succeeded":
            # error_type ConfigError: the combination was refused up front (e.g. TP=2 on 1 GPU).
            error = rec.get("error") or ("did not finish (the sweep was stopped)" if rec.get("status") == "running" else rec.get("status"))
            results.append({**result, "status": f"failed: {error}", "error_type": rec.get("error_type")})
            continue
        started = dt.datetime.fromisoformat(rec["started_at"]).timestamp()
        ended = dt.datetime.fromisoformat(rec["finished_at"]).timestamp()
        results.append({**result, "status": "ok", **measure_job(s, pathlib.Path(rec["sink_path"]), started, gpu),
                        "wall_s": round(ended - started, 1)})
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        results.append({"contender": "capjob", "point": {"multirun": " ".join(specs)}, "status": f"failed ({proc.returncode})"})
    return results


def run_raw_vllm(s: dict[str, Any]) -> dict[str, Any]:
    """vllm.LLM on one GPU with capjob's engine kwargs, as a user script would run it: decode and
    resize every image (timed, serial), build the engine, hand it every request at once.
    --raw-api generate (the fastest offline API: the chat template rendered once, each request a
    prompt + PIL image) or chat (LLM.chat: the template applied per request). Finish times come
    from LLM's progress-bar hook, so its steady rate has capjob's definition (first to last
    caption); start_s runs from this process's start to the engine being ready, decoding
    excluded; wall_s from the process's start to the last caption, decoding included."""
    command_start = float(os.environ.get("GPU_BENCH_T0") or time.time())
    from vllm import LLM, SamplingParams

    from capjob.models import resolve_model_source
    from capjob.prompts import prompt_specs
    from capjob.stages.caption.engine import decide_placement, engine_kwargs, local_gpu_count
    from capjob.stages.caption.requests import CaptionRequest

    cfg = compose(base_overrides(s))
    source = resolve_model_source(cfg.model.source, cfg.model.builder)
    kwargs = engine_kwargs(cfg.engine, cfg.model, decide_placement(cfg.resources, cfg.engine, local_gpu_count()),
                           prompt_specs(cfg.caption))
    patched = unpinned_mm_batches() if os.environ.get("GPU_BENCH_NO_PIN") == "1" else None
    t_decode = time.time()
    t_imports = time.time()
    images = load_images(s, workers=s["decode_workers"])
    decode_s = time.time() - t_decode
    system, user = prompts()
    # capjob's own message layout (caption.text_before_image decides the order).
    request = CaptionRequest(cfg.caption, cfg.engine)
    params = SamplingParams(temperature=s["temperature"], max_tokens=s["max_tokens"], ignore_eos=True)
    stamps: list[float] = []
    label = f"raw_vllm-{s['raw_api']}" + (f"-{s['label']}" if s.get("label") else "")
    profiler = Profiler(s, label, lambda: bool(stamps))
    with GpuSampler() as gpu, profiler:
        t0 = time.time()
        llm = LLM(model=source, **kwargs)
        t1 = time.time()
        if s["raw_api"] == "chat":
            conversations = [request.messages(img, f"raw-{i}", user) for i, img in enumerate(images)]
            outputs = llm.chat(conversations, params, use_tqdm=stamping_tqdm(stamps))
        else:
            from transformers import AutoProcessor

            text = AutoProcessor.from_pretrained(source).apply_chat_template(
                [{"role": "system", "content": system},
                 {"role": "user", "content": [{"type": "image"} if p["type"] == "image_pil" else p
                                              for p in request.messages(None, "", user)[1]["content"]]}],
                add_generation_prompt=True, tokenize=False)
            outputs = llm.generate([{"prompt": text, "multi_modal_data": {"image": img}} for img in images], params,
                                   use_tqdm=stamping_tqdm(stamps))
        t2 = time.time()
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    st = steady(stamps, s["max_tokens"], command_start + decode_s)
    whole = len(outputs) / (t2 - t1)
    # images_per_s: every request over the engine's whole run (t1 -> t2), as in issue 8's runs; the
    # steady rate is inflated here, since LLM stamps the requests that finished while it was still
    # adding (processing) requests all at once when it starts collecting.
    return with_profile({"contender": "raw_vllm", "api": s["raw_api"], "status": "ok", **st,
                         **({"patch": patched} if patched else {}),
                         "images_per_s": round(whole, 3), "images_per_s_steady": st["images_per_s"],
                         "engine_ready_s": round(t1 - t0, 2), "start_s": round(t1 - command_start - decode_s, 2),
                         "first_caption_s": round(st["start_s"], 2), "decode_s": round(decode_s, 1),
                         "decode_workers": s["decode_workers"], "compile_cache": os.environ.get("VLLM_CACHE_ROOT", "default"),
                         # The same steps as capjob's timeline, from the command's start: imports
                         # (vLLM, capjob's config) and decoding, LLM() ready, the first caption
                         # (LLM.generate processes every request before it collects an output).
                         "startup": {"imports_s": round(t_imports - command_start, 1),
                                     "decoded_s": round(t0 - command_start, 1), "engine_ready_s": round(t1 - command_start, 1),
                                     "first_caption_s": round(st["window"][0] - command_start, 1)},
                         "output_tokens_per_s": round(tokens / (t2 - t1), 1),
                         "wall_s": round(t2 - command_start, 1), **gpu.window(t1, t2)}, profiler, gpu)


def unpinned_mm_batches() -> str:
    """Experiment (issue 22): vLLM batches the images of a step for the vision encoder by
    concatenating their pixel values into freshly pinned host memory
    (MultiModalFlatField._reduce_data); the profile put 78 % of the engine core's time there.
    This makes that concatenation use ordinary memory. It works for raw vLLM only, whose engine
    core is forked from this process (capjob's is spawned by a Ray actor)."""
    from vllm.multimodal.inputs import MultiModalFlatField

    original = MultiModalFlatField._reduce_data

    def _reduce_data(self: Any, batch: Any, *, pin_memory: bool) -> Any:
        return original(self, batch, pin_memory=False)

    MultiModalFlatField._reduce_data = _reduce_data
    return "mm batches not pinned"


def stamping_tqdm(stamps: list[float]) -> Any:
    """A tqdm class for LLM's use_tqdm hook that records the time of every finished request
    (LLM updates its "Processed prompts" bar once per request that finishes) and prints nothing."""
    from tqdm import tqdm

    class Stamping(tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self._stamp = str(kwargs.get("desc", "")).startswith("Processed")
            kwargs.update(file=open(os.devnull, "w"), mininterval=3600)
            super().__init__(*args, **kwargs)

        def update(self, n: int = 1) -> Any:
            if self._stamp:
                stamps.extend([time.time()] * n)
            return super().update(n)

    return Stamping


def run_seed(s: dict[str, Any]) -> dict[str, Any]:
    """The seed notebook's processor, with its API drift applied (build_llm_processor ->
    build_processor, has_image -> prepare_multimodal_stage, content type image -> image_pil) and
    the model swapped."""
    import ray
    from PIL import Image
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    from capjob.models import resolve_model_source
    from capjob.reporting.report import operator_stats

    cfg = compose(base_overrides(s))
    source = resolve_model_source(cfg.model.source, cfg.model.builder)
    system, user = prompts()
    max_tokens, temperature = s["max_tokens"], s["temperature"]

    def preprocess(row: dict[str, Any]) -> dict[str, Any]:
        image = Image.open(io.BytesIO(row["jpg"]["bytes"]))
        image = image.resize((SIZE, SIZE), Image.Resampling.BICUBIC)
        return dict(
            messages=[{"role": "system", "content": system},
                      {"role": "user", "content": [{"type": "text", "text": user}, {"type": "image_pil", "image_pil": image}]}],
            sampling_params=dict(temperature=temperature, max_tokens=max_tokens, detokenize=False, ignore_eos=True),
        )

    def postprocess(row: dict[str, Any]) -> dict[str, Any]:
        # The seed's output column, plus the time each row came out (for the steady window).
        return {"generated_caption": row["generated_text"], "finished_at": time.time()}

    engine = {"max_model_len": 8192, "load_format": cfg.model.load_format, "dtype": cfg.model.dtype}
    extra: dict[str, Any] = {}
    if s["smoke"]:  # vLLM on CPU: the same CPU placement capjob uses
        engine.update(max_model_len=s["max_model_len"], kv_cache_memory_bytes=2**30, enforce_eager=True)
        extra["placement_group_config"] = {"bundles": [{"CPU": 1}]}
    config = vLLMEngineProcessorConfig(
        model_source=source, engine_kwargs=engine, batch_size=SEED_BATCH_SIZE, concurrency=1,
        prepare_multimodal_stage={"enabled": True}, **extra,
    )
    ray.init(num_cpus=8 if s["smoke"] else None)
    with GpuSampler() as gpu:
        started = time.time()
        ds = ray.data.read_parquet(s["data"])
        rows = build_processor(config, preprocess=preprocess, postprocess=postprocess)(ds).materialize()
        ended = time.time()
    # The seed reads 500-row blocks and never repartitions, so its postprocess stamps a whole
    # block at once (2026-11-23 on the H100: all 2000 rows within 1 s of the end). Its rate is
    # therefore the engine operator's, from Ray Data's stats, like capjob's engine_op_rows_per_s.
    finish = [r["finished_at"] for r in rows.iter_rows()]
    st = steady(finish, max_tokens, started)
    engine = engine_operator(operator_stats(rows)[0])
    rate = engine.get("rows_per_second")
    return {"contender": "seed", "status": "ok", **st, "images_per_s": rate,
            "output_tokens_per_s": round(rate * max_tokens, 1) if rate else None, "engine_op_rows_per_s": rate,
            "postprocess_span_s": round(st["window"][1] - st["window"][0], 2),
            "wall_s": round(ended - started, 1), **gpu.window(ended - engine.get("wall_seconds", 0), ended)}


def run_transformers(s: dict[str, Any]) -> dict[str, Any]:
    import torch
    from transformers import AutoConfig, AutoProcessor, Qwen2_5_VLForConditionalGeneration

    from capjob.models import resolve_model_source

    cfg = compose(base_overrides(s))
    source = resolve_model_source(cfg.model.source, cfg.model.builder)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    processor = AutoProcessor.from_pretrained(source)
    processor.tokenizer.padding_side = "left"
    config = AutoConfig.from_pretrained(source)
    t0 = time.time()
    with torch.device(device):  # random weights, made on the GPU (no checkpoint: load_format=dummy's twin)
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=dtype).eval()
    images = load_images(s, s["transformers_images"])
    system, user = prompts()
    messages = [{"role": "system", "content": system},
                {"role": "user", "content": [{"type": "text", "text": user}, {"type": "image"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    batch, tokens, finish = SEED_BATCH_SIZE, 0, []
    with GpuSampler() as gpu, torch.inference_mode():
        t1 = time.time()
        for i in range(0, len(images), batch):
            chunk = images[i : i + batch]
            inputs = processor(text=[text] * len(chunk), images=chunk, padding=True, return_tensors="pt").to(device)
            out = model.generate(**inputs, max_new_tokens=s["max_tokens"], min_new_tokens=s["max_tokens"],
                                 do_sample=True, temperature=s["temperature"])
            tokens += (out.shape[1] - inputs["input_ids"].shape[1]) * len(chunk)
            if device == "cuda":
                torch.cuda.synchronize()
            finish += [time.time()] * len(chunk)
        t2 = time.time()
    rate = len(images) / (t2 - t1)
    return {"contender": "transformers", "status": "ok", "images": len(images), "start_s": round(t1 - t0, 2),
            "images_per_s": round(rate, 3), "output_tokens_per_s": round(tokens / (t2 - t1), 1),
            "batch_size": batch, "wall_s": round(t2 - t0, 1), **gpu.window(t1, t2)}


# --- report ------------------------------------------------------------------------------------


def latest(results: list[dict[str, Any]], contender: str) -> Optional[dict[str, Any]]:
    ok = [r for r in results if r["contender"] == contender and r.get("status") == "ok" and r.get("images_per_s")]
    if contender == "capjob":
        return max(ok, key=lambda r: r["images_per_s"], default=None)
    return ok[-1] if ok else None


def render(results: list[dict[str, Any]], out: Optional[pathlib.Path]) -> str:
    best = {c: latest(results, c) for c in CONTENDERS}
    lines = ["| contender | images/s | output tokens/s | GPU util % | GPU idle share | start-up s | images | config |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for c, r in best.items():
        if r:
            config = " ".join(f"{k}={v}" for k, v in r.get("point", {}).items()) or ("batch 16, 225x225, materialize" if c == "seed" else "")
            lines.append(f"| {c} | {r['images_per_s']} | {r['output_tokens_per_s']} | {r.get('gpu_util_mean')} | "
                         f"{r.get('gpu_idle_share')} | {r.get('start_s')} | {r['images']} | {config} |")
        else:
            lines.append(f"| {c} | not run | | | | | | |")
    cap = best["capjob"]
    lines.append("")
    for other, target in (("raw_vllm", 0.97), ("seed", 1.5), ("transformers", 10.0)):
        if cap and best[other]:
            # Two views of capjob: its steady rate (first to last file written) and, stricter, its
            # engine operator's rows over the operator's whole wall time (first wave included),
            # the only rate the seed allows (see run_seed).
            theirs = best[other]["images_per_s"]
            ratios = [cap["images_per_s"] / theirs]
            if cap.get("engine_op_rows_per_s"):
                ratios.append(cap["engine_op_rows_per_s"] / theirs)
            worst = min(ratios)
            shown = " / ".join(f"{r:.2f}x" for r in ratios)
            lines.append(f"- capjob / {other}: **{shown}** (steady / engine operator; target >= {target}x: "
                         f"{'met' if worst >= target else 'NOT met'} on the stricter)")
    sweep = [r for r in results if r["contender"] == "capjob"]
    if sweep:
        lines += ["", "capjob sweep:", "", "| point | images/s | engine operator rows/s | output tokens/s | GPU util % | GPU idle share | start-up s | status |",
                  "|---|---:|---:|---:|---:|---:|---:|---|"]
        for r in sweep:
            point = " ".join(f"{k}={v}" for k, v in r.get("point", {}).items()) or "defaults"
            lines.append(f"| {point} | {r.get('images_per_s')} | {r.get('engine_op_rows_per_s')} | {r.get('output_tokens_per_s')} | {r.get('gpu_util_mean')} | "
                         f"{r.get('gpu_idle_share')} | {r.get('start_s')} | {r.get('status')} |")
    text = "\n".join(lines)
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu_bench.md").write_text(text + "\n")
        if sweep:
            plot_sweep(sweep, best, out / "gpu_sweep.png")
    return text


def runs_table(results: list[dict[str, Any]]) -> str:
    """Every run in order (issue 22's table): rates, NVML busy, MFU, start-up, end-to-end wall and
    vLLM's own stat-line means."""
    lines = ["| run | images | images/s | engine op rows/s | GPU busy % | MFU % | start-up s | wall s | vLLM running | vLLM gen tok/s | prefix hit % | status |",
             "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|"]
    for r in results:
        what = r["contender"] + (f" ({r['api']})" if r.get("api") else "")
        point = " ".join(f"{k}={v}" for k, v in r.get("point", {}).items())
        extra = " ".join(r.get("set") or [])
        name = " ".join(x for x in (r.get("label"), what, point, extra) if x)
        start = r.get("start_s")
        if r.get("first_caption_s") is not None:
            start = f"{start} (first caption {r['first_caption_s']})"
        wall = r.get("wall_s")
        if r.get("decode_s") is not None:
            wall = f"{wall} (decode {r['decode_s']})"
        lines.append(f"| {name} | {r.get('images')} | {r.get('images_per_s')} | {r.get('engine_op_rows_per_s', '–')} | "
                     f"{r.get('gpu_util_mean')} | {r.get('mfu_pct')} | {start} | {wall} | {r.get('vllm_running', '–')} | "
                     f"{r.get('vllm_gen_tok_s', '–')} | {r.get('vllm_prefix_hit_pct', '–')} | {r.get('status')} |")
    return "\n".join(lines)


STARTUP_STEPS = ("ray_up_s", "ray_data_start_s", "engine_actor_s", "engine_core_spawn_s", "engine_ready_s",
                 "engine_ready_last_s", "imports_s", "decoded_s", "first_caption_s")


def startup_table(results: list[dict[str, Any]]) -> str:
    """Each run's start-up timeline (startup_timeline; raw vLLM's from its own clock), seconds
    from the command's start."""
    lines = ["| run | " + " | ".join(k[:-2].replace("_", " ") for k in STARTUP_STEPS) + " | torch.compile s |",
             "|---|" + "--:|" * (len(STARTUP_STEPS) + 1)]
    for r in results:
        t = r.get("startup")
        if t:
            lines.append(f"| {r.get('label') or ''} {r['contender']} | " + " | ".join(str(t.get(k, "–")) for k in STARTUP_STEPS)
                         + f" | {t.get('torch_compile_s', '–')} |")
    return "\n".join(lines)


def check_table(results: list[dict[str, Any]], images: int) -> tuple[str, bool]:
    """One row per capjob run (its label, or its point). OK only if it ran and every one of the
    `images` rows was written exactly once (captions + quarantine, ids distinct) and nothing was
    quarantined but empty captions: a dummy-weight model (load_format=dummy) may generate only
    special tokens, an empty caption (schema.EMPTY_CAPTION), though the engine did all the work
    of a caption; a lost, doubled or otherwise quarantined row fails the layout."""
    lines = ["| layout | status | captioned | empty captions | images/s (steady) | GPU busy % | start-up s | "
             "guard ms/batch | engine operator rows/s | config |",
             "|---|---|--:|--:|--:|--:|--:|--:|--:|---|"]
    ok = bool(results)
    for r in (r for r in results if r["contender"] == "capjob"):
        point = " ".join(f"{k}={v}" for k, v in r.get("point", {}).items())
        empty = r.get("empty_captions") or 0
        written = r.get("rows_written", (r.get("captioned") or 0) + (r.get("quarantined") or 0))
        distinct = r.get("distinct_ids", written)
        good = (r.get("status") == "ok" and written == distinct == images
                and (r.get("captioned") or 0) + empty == images and (r.get("quarantined") or 0) == empty)
        refused = r.get("sweep_job") is not None and r.get("error_type") == "ConfigError"  # a sweep's invalid combination
        ok &= good or refused
        if good:
            status = "ok"
        elif refused:
            status = "refused up front: " + str(r.get("status"))[len("failed: "):]
        elif r.get("status") != "ok":
            status = "FAILED: " + str(r.get("status"))
        else:
            status = (f"FAILED: {r.get('captioned')} of {images} captioned, {r.get('quarantined')} quarantined "
                      f"({empty} empty), {written} rows written, {distinct} distinct ids")
        lines.append(f"| {r.get('label') or point or 'defaults'} | {status} | {r.get('captioned')} | {empty} | {r.get('images_per_s')} | "
                     f"{r.get('gpu_util_mean')} | {r.get('start_s')} | {r.get('guard_ms_per_batch')} | {r.get('engine_op_rows_per_s')} | "
                     f"resources={r.get('resources')} {point} |")
    return "\n".join(lines), ok


SHORT = {"batch_size": "bs", "max_num_seqs": "seqs", "max_num_batched_tokens": "tokens", "object_store_mib": "store MiB",
         "replicas_per_gpu": "per GPU", "concurrency": "replicas", "kv_cache_gib": "KV GiB", "max_concurrent_batches": "batches"}


def plot_sweep(sweep: list[dict[str, Any]], best: dict[str, Optional[dict[str, Any]]], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = ["\n".join(f"{SHORT.get(k.split('.')[-1], k.split('.')[-1])}={v}" for k, v in r.get("point", {}).items()) or "defaults"
              for r in sweep]
    x = range(len(sweep))
    fig, ax = plt.subplots(figsize=(max(7, 1.3 * len(sweep)), 4.8))
    ax.bar([i - 0.2 for i in x], [r.get("images_per_s") or 0 for r in sweep], 0.4, color="tab:blue", label="capjob steady images/s")
    ax.bar([i + 0.2 for i in x], [r.get("engine_op_rows_per_s") or 0 for r in sweep], 0.4, color="tab:cyan",
           label="capjob engine operator rows/s")
    for name, color in (("raw_vllm", "tab:red"), ("seed", "tab:gray")):
        if best.get(name):
            ax.axhline(best[name]["images_per_s"], color=color, linestyle="--", label=name.replace("_", " "))
    ax.set_xticks(list(x), labels, fontsize=7)
    ax.set_ylabel("images/s")
    ax.set_title("capjob sweep, Qwen2.5-VL-3B (dummy weights), 225x225, 128 tokens")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# --- command line --------------------------------------------------------------------------------


def sweep_points(specs: list[str]) -> list[dict[str, str]]:
    """['engine.batch_size=32,128', 'engine.max_num_seqs=256'] -> their product."""
    axes = [(k, v.split(",")) for k, v in (spec.split("=", 1) for spec in specs)]
    return [dict(zip([k for k, _ in axes], combo)) for combo in itertools.product(*[vals for _, vals in axes])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny model: exercise every code path")
    parser.add_argument("--work", default=os.environ.get("CAPJOB_BENCH_DIR", "/tmp/capjob-gpu-bench"))
    parser.add_argument("--results", default=None, help="JSON-lines file results are appended to (default WORK/results.jsonl)")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--transformers-images", type=int, default=64)
    parser.add_argument("--resources", default=os.environ.get("CAPJOB_BENCH_RESOURCES", "h100x1"),
                        help="capjob resources preset of every contender (h100x1, h200x1, h200x2, ...)")
    parser.add_argument("--experiment", default=None, help="capjob experiment preset of every contender (h200_throughput)")
    sub = parser.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("data", help="write the benchmark images")
    d.add_argument("--images", type=int, default=3000)
    r = sub.add_parser("run", help="run contenders (appending to the results)")
    r.add_argument("contenders", nargs="+", choices=CONTENDERS)
    r.add_argument("--sweep", nargs="*", default=[], help="capjob overrides with comma-separated values; their product is run")
    r.add_argument("--multirun", nargs="*", default=None,
                   help="capjob overrides with comma-separated values, run as one `capjob --multirun` (one result per job)")
    r.add_argument("--label", default=None, help="a name recorded with each result (bench/gpu_check.sh's layout)")
    r.add_argument("--timeout", type=float, default=None,
                   help="stop a capjob run after this many seconds (its rate over the rows written so far is kept; "
                        "--multirun: the finished jobs are kept)")
    r.add_argument("--set", nargs="*", default=[], help="capjob overrides for every contender (raw vLLM's engine kwargs too)")
    r.add_argument("--raw-api", choices=["generate", "chat"], default="generate",
                   help="raw vLLM's API: generate (prompt rendered once; the fastest) or chat")
    r.add_argument("--profile", type=float, default=0.0, help="py-spy the engine processes for this many seconds (0: off)")
    r.add_argument("--profile-delay", type=float, default=10.0, help="seconds after the first caption before profiling")
    r.add_argument("--decode-workers", type=int, default=1, help="raw vLLM: processes that decode and resize the images (1: serial)")
    r.add_argument("--isolated", default=None, help=argparse.SUPPRESS)  # internal: one contender in this process
    c = sub.add_parser("check", help="bench/gpu_check.sh's table of labelled capjob runs; exit 1 if any failed or lost rows")
    c.add_argument("--images", type=int, required=True, help="rows each run must have captioned")
    p = sub.add_parser("report", help="render the results table (and the sweep plot)")
    p.add_argument("--out", default=None)
    args = parser.parse_args()
    s = settings(args)
    pathlib.Path(s["work"]).mkdir(parents=True, exist_ok=True)

    if args.cmd == "data":
        make_data(s, args.images)
    elif args.cmd == "run" and args.isolated:
        runners = {"raw_vllm": run_raw_vllm, "seed": run_seed, "transformers": run_transformers}
        record(s, runners[args.isolated](s))
    elif args.cmd == "run":
        for contender in args.contenders:
            if contender == "capjob" and args.multirun is not None:
                for result in run_capjob_multirun(s, args.multirun):
                    record(s, result)
                continue
            if contender == "capjob":
                for point in sweep_points(args.sweep) or [{}]:
                    record(s, run_capjob(s, point))
                continue
            # Its own process: the engine's GPU memory is released before the next contender.
            cmd = [sys.executable, __file__, *(["--smoke"] if s["smoke"] else []), "--work", s["work"], "--results", s["results"],
                   "--max-tokens", str(args.max_tokens), "--transformers-images", str(args.transformers_images),
                   "--resources", args.resources, *(["--experiment", args.experiment] if args.experiment else []),
                   "run", contender, "--isolated", contender, "--raw-api", args.raw_api, "--profile", str(args.profile),
                   "--profile-delay", str(args.profile_delay), "--decode-workers", str(args.decode_workers),
                   *(["--label", args.label] if args.label else []),
                   *(["--set", *args.set] if args.set else [])]
            env = {**os.environ, "GPU_BENCH_T0": str(time.time())}  # the command's start, for start-up and wall
            if subprocess.run(cmd, cwd=REPO, env=env).returncode != 0:
                record(s, {"contender": contender, "status": "failed"})
    elif args.cmd == "check":
        results = [json.loads(line) for line in pathlib.Path(s["results"]).read_text().splitlines() if line.strip()]
        text, ok = check_table(results, args.images)
        print(text)
        sys.exit(0 if ok else 1)
    else:
        results = [json.loads(line) for line in pathlib.Path(s["results"]).read_text().splitlines() if line.strip()]
        print(render(results, pathlib.Path(args.out) if args.out else None))
        print()
        print(runs_table(results))
        print()
        print(startup_table(results))


if __name__ == "__main__":
    main()
