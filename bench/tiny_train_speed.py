#!/usr/bin/env python3
"""Seconds per training step of the tiny offline model, side by side in one run: the build's
settings before session 10 (one torch thread, the vision tower's patch embedding as its
Conv3d), two threads, and two threads with the patch embedding as one matrix product (the
build's settings now, models/train.py).

Each variant trains a copy of one untrained build for --steps steps (fresh scenes, the same
seed); the variants alternate over --reps rounds and the medians are compared. Also prints each
variant's final loss: the patch embedding's two forms are the same sums, so the losses agree
to float rounding. Results: docs/benchmarks.md, "Tiny trained model". ~3 minutes on 2 cores.

    python bench/tiny_train_speed.py --steps 40 --reps 2
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
from pathlib import Path

VARIANTS = {  # name: (torch threads, patch embedding as a matrix product)
    "1 thread, Conv3d (before)": (1, False),
    "2 threads, Conv3d": (2, False),
    "2 threads, matmul (now)": (2, True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--reps", type=int, default=2)
    args = parser.parse_args()

    from capjob import models
    from capjob.models import train

    seconds: dict[str, list[float]] = {name: [] for name in VARIANTS}
    losses: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        untrained = models.build_tiny_qwen25vl(Path(tmp) / "untrained", train_steps=0)
        for _ in range(args.reps):
            for name, (threads, matmul) in VARIANTS.items():
                copy = Path(tmp) / "copy"
                shutil.rmtree(copy, ignore_errors=True)
                shutil.copytree(untrained, copy)
                record = train.train(copy, args.steps, log_every=0, threads=threads, matmul_patch_embed=matmul)
                seconds[name].append(record["train_seconds"] / args.steps)
                losses[name] = record["final_loss"]
    base = statistics.median(seconds[next(iter(VARIANTS))])
    print(f"| variant ({args.steps} steps, median of {args.reps}) | s / step | speed-up | final loss |")
    print("|---|--:|--:|--:|")
    for name in VARIANTS:
        median = statistics.median(seconds[name])
        print(f"| {name} | {median:.3f} | {base / median:.2f}x | {losses[name]:.4f} |")


if __name__ == "__main__":
    main()
