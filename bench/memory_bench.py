"""Memory stays flat as the dataset grows: the offline pipeline on N1 and N2 generated images.

Runs the real job (tiny model, vLLM CPU) once per size as a subprocess and samples, every
second, the driver's RSS, the summed RSS and USS of the driver and every Ray process it started, and
the object store's use of /dev/shm (Ray's plasma store lives there). Prints a table and the
ratio large/small of each peak. Target: < 1.2x (streaming, no materialize).

What sits in the object store, per operator: Ray Data's streaming executor writes its topology
(each operator's object-store use, in = its inputs and running tasks, out = its output queue)
to the session's ray-data log every 5 s; the bench reads that log after each run and prints
the mean over the middle half of the run (the steady state) and the snapshot with the most.

    python bench/memory_bench.py --sizes 1000 20000
"""

from __future__ import annotations

import argparse
import io
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

REPO = pathlib.Path(__file__).resolve().parents[1]


def write_dataset(root: pathlib.Path, count: int, rows_per_file: int = 1000) -> None:
    """`count` distinct small JPEGs (a shared background with a unique stamp: fast to make)."""
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)
    root.mkdir(parents=True, exist_ok=True)
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    for start in range(0, count, rows_per_file):
        cells = []
        for i in range(start, min(count, start + rows_per_file)):
            arr = base.copy()
            arr[(i // 320) % 240, i % 320] = 255 - arr[(i // 320) % 240, i % 320]
            arr[0, :32] = np.frombuffer(i.to_bytes(32, "little"), dtype=np.uint8)[:, None]
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format="JPEG", quality=85)
            cells.append({"bytes": buf.getvalue(), "path": f"img_{i:07d}.jpg"})
        pq.write_table(pa.table({"image": pa.array(cells, type=image_type)}), root / f"part-{start // rows_per_file:05d}.parquet")


def shm_used() -> int:
    return shutil.disk_usage("/dev/shm").used


def run(size: int, work: pathlib.Path, extra: list[str]) -> dict[str, float]:
    data = work / f"data-{size}"
    if not data.exists():
        write_dataset(data, size)
    out = work / f"out-{size}"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "capjob", "experiment=offline", "data.format=parquet", f"data.path={data}",
           f"data.name=mem{size}", "data.passthrough_columns=[]", f"sink.path={out}", "caption.max_tokens=1", "images.size=112",
           "engine.batch_size=32", "job.resume=false", *extra]
    baseline_shm = shm_used()
    at_peak: list[tuple[int, str]] = []  # (USS, process) when the tree's USS peaked
    peaks = {"driver_rss": 0, "tree_rss": 0, "tree_uss": 0, "object_store": 0}
    started = time.time()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    stop = threading.Event()

    def sample() -> None:
        driver = psutil.Process(proc.pid)
        while not stop.is_set():
            try:
                tree = [driver, *driver.children(recursive=True)]
                peaks["driver_rss"] = max(peaks["driver_rss"], driver.memory_info().rss)
                peaks["tree_rss"] = max(peaks["tree_rss"], sum(p.memory_info().rss for p in tree if p.is_running()))
                # RSS counts shared pages (torch's libraries, the object store's mapping) once per
                # process; USS counts each page once, so its sum is what the job really holds.
                uss = [(p.memory_full_info().uss, process_label(p)) for p in tree if p.is_running()]
                total_uss = sum(u for u, _ in uss)
                if total_uss > peaks["tree_uss"]:
                    peaks["tree_uss"] = total_uss
                    at_peak[:] = uss
            except psutil.Error:
                pass
            peaks["object_store"] = max(peaks["object_store"], shm_used() - baseline_shm)
            time.sleep(1.0)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output, _ = proc.communicate()
    stop.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"capjob failed for {size} images:\n{output[-4000:]}")
    captions = sum(pq.read_metadata(f).num_rows for f in (out / "captions").glob("*.parquet"))
    return {"images": size, "captioned": captions, "wall_s": time.time() - started, **peaks, "at_peak": at_peak,
            "operators": operator_object_store(started)}


UNITS = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}
OP_LINE = re.compile(r"-- \d+: (.+?) - Tasks: .*?Resources: [\d.]+ CPU.*?, ([\d.]+)(B|KiB|MiB|GiB) object store")


def operator_object_store(since: float) -> dict[str, object]:
    """Per-operator object-store use from the ray-data log of the newest Ray session started
    since `since`: {"mean": {op: MiB}, "peak_total": MiB, "peak": {op: MiB}} (empty if none)."""
    sessions = [d for d in pathlib.Path("/tmp/ray").glob("session_2*") if d.stat().st_mtime >= since - 5]
    logs = sorted((f for d in sessions for f in d.glob("logs/ray-data/ray-data-dataset_*.log")), key=lambda f: f.stat().st_size)
    if not logs:
        return {}
    snapshots: list[dict[str, float]] = []
    for line in logs[-1].read_text(errors="replace").splitlines():
        if "Execution Progress:" in line:
            snapshots.append({})
        elif snapshots and (m := OP_LINE.search(line)):
            snapshots[-1][m.group(1)[:48]] = float(m.group(2)) * UNITS[m.group(3)] / 2**20
    snapshots = [s for s in snapshots if s]
    if not snapshots:
        return {}
    middle = snapshots[len(snapshots) // 4: max(len(snapshots) // 4 + 1, 3 * len(snapshots) // 4)]
    mean = {op: sum(s.get(op, 0.0) for s in middle) / len(middle) for op in snapshots[-1]}
    peak = max(snapshots, key=lambda s: sum(s.values()))
    return {"mean": mean, "peak_total": sum(peak.values()), "peak": peak}


def process_label(p: psutil.Process) -> str:
    """Ray names its workers by role (ray::MapWorker(...), ray::IDLE, raylet, gcs_server)."""
    cmd = p.cmdline()
    return (cmd[0] if cmd and cmd[0].startswith("ray::") else p.name())[:60]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 20000],
                        help="dataset sizes, smallest first; ratios are against the first")
    parser.add_argument("--workdir", default=None, help="where datasets and outputs go (default: a temp dir)")
    parser.add_argument("overrides", nargs="*", help="extra capjob overrides")
    args = parser.parse_args()
    work = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="capjob-membench-"))
    results = [run(size, work, args.overrides) for size in args.sizes]
    mib = 2**20
    print(f"\ncommand: {' '.join(['python', 'bench/memory_bench.py', '--sizes', *map(str, args.sizes), *args.overrides])}")
    print(f"machine: {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB RAM\n")
    print("| images | captioned | wall s | rows/s | driver peak RSS MiB | driver+Ray peak RSS MiB | driver+Ray peak USS MiB | object store peak MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['images']} | {r['captioned']} | {r['wall_s']:.0f} | {r['captioned'] / r['wall_s']:.1f} | "
              f"{r['driver_rss'] / mib:.0f} | {r['tree_rss'] / mib:.0f} | {r['tree_uss'] / mib:.0f} | {r['object_store'] / mib:.0f} |")
    for r in results:
        groups: dict[str, list[int]] = {}
        for uss, label in r["at_peak"]:
            groups.setdefault(label, []).append(uss)
        top = sorted(groups.items(), key=lambda kv: -sum(kv[1]))[:8]
        print(f"\n{r['images']} images, {len(r['at_peak'])} processes at the USS peak; largest groups (count x, MiB):")
        for label, values in top:
            print(f"  {len(values):3d} x {label}: {sum(values) / mib:.0f}")
    for r in results:
        ops = r["operators"]
        if not ops:
            continue
        print(f"\n{r['images']} images, Ray Data's object store per operator, MiB (mean over the middle half of the run; "
              f"the 5-s snapshot with the most, {ops['peak_total']:.0f} MiB in all):")
        for op, mean in ops["mean"].items():
            print(f"  {op:<48} {mean:7.1f} {ops['peak'].get(op, 0.0):7.1f}")
        print(f"  {'total':<48} {sum(ops['mean'].values()):7.1f} {ops['peak_total']:7.1f}")
    small = results[0]
    for large in results[1:]:
        for key, label in (("driver_rss", "driver peak RSS"), ("tree_rss", "driver+Ray peak RSS"), ("tree_uss", "driver+Ray peak USS"),
                           ("object_store", "object store peak")):
            print(f"ratio {label} {large['images']}/{small['images']} images: {large[key] / max(small[key], 1):.2f}x")


if __name__ == "__main__":
    main()
