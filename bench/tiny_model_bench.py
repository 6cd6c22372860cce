#!/usr/bin/env python3
"""How well the tiny offline model captions shape scenes after N training steps.

Builds `tiny_qwen25vl` with each step count into a temporary folder (models/train.py), then
greedy-captions held-out scenes with capjob's default prompts and prints, per build, the
training time and the share of captions with the right background, number of shapes, colours
and the whole caption. Results: docs/benchmarks.md, "Tiny trained model".

    python bench/tiny_model_bench.py --steps 400 1000 --scenes 100
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path


def attributes(captions: list[str], scenes: list) -> dict[str, float]:
    n = len(scenes)
    return {
        "background": sum(c.endswith(f"{s.background} background") for c, s in zip(captions, scenes)) / n,
        "shape count": sum((" and " in c) == (len(s.shapes) == 2) for c, s in zip(captions, scenes)) / n,
        "colours": sum(all(f" {x.colour} " in f" {c} " for x in s.shapes) for c, s in zip(captions, scenes)) / n,
        "whole caption": sum(c == s.caption for c, s in zip(captions, scenes)) / n,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[400])
    parser.add_argument("--scenes", type=int, default=100)
    args = parser.parse_args()

    import torch
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    from capjob import models
    from capjob.models import shapes, train

    scenes = shapes.scenes(args.scenes, train.EVAL_SEED)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for steps in args.steps:
            built = models.build_tiny_qwen25vl(Path(tmp) / f"step-{steps}", train_steps=steps)
            record = json.loads((built / models.COMPLETE_MARKER).read_text())
            model = Qwen2_5_VLForConditionalGeneration.from_pretrained(built, dtype=torch.float32).eval()
            captions = train.greedy_captions(model, AutoProcessor.from_pretrained(built), scenes)
            rows.append((steps, record["train_seconds"], attributes(captions, scenes)))
    names = list(rows[0][2])
    print("| steps | train s | " + " | ".join(names) + " |")
    print("|--:|--:|" + "--:|" * len(names))
    for steps, seconds, shares in rows:
        print(f"| {steps} | {seconds:.0f} | " + " | ".join(f"{100 * shares[k]:.0f}%" for k in names) + " |")


if __name__ == "__main__":
    main()
