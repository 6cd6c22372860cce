"""Does Ray's dashboard cost a local run? ray.init + a small Ray Data job + ray.shutdown, with
include_dashboard on and off, alternating, in fresh processes; prints each and the ratio.

    python bench/dashboard_bench.py --reps 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

CHILD = r"""
import json, os, sys, time
import psutil
t0 = time.monotonic()
import ray
ray.init(num_cpus=2, include_dashboard=sys.argv[1] == "on", log_to_driver=False)
t_init = time.monotonic() - t0
import ray.data
ray.data.range(2000).map_batches(lambda b: {"id": b["id"] * 2}).materialize()
t_job = time.monotonic() - t0
children = psutil.Process().children(recursive=True)  # gcs, raylet, dashboard, workers
rss = sum(p.memory_info().rss for p in children if p.is_running())
cpu = sum(sum(p.cpu_times()[:2]) for p in children if p.is_running())
ray.shutdown()
print(json.dumps({"init_s": t_init, "job_s": t_job, "ray_rss_mib": rss / 2**20, "ray_cpu_s": cpu}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    runs: dict[str, list[dict[str, float]]] = {"on": [], "off": []}
    for _ in range(args.reps):
        for mode in ("off", "on"):
            proc = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True)
            if proc.returncode:
                sys.exit(proc.stderr[-3000:])
            out = proc.stdout
            runs[mode].append(json.loads(out.strip().splitlines()[-1]))
    for key in ("init_s", "job_s", "ray_rss_mib", "ray_cpu_s"):
        on = statistics.median(r[key] for r in runs["on"])
        off = statistics.median(r[key] for r in runs["off"])
        print(f"{key:12s} dashboard on {on:8.2f}  off {off:8.2f}  on/off {on / off:.2f}x")


if __name__ == "__main__":
    main()
