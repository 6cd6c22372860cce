"""`python -m capjob.models BUILDER OUT [--train-steps N]`: build one of capjob's own models into a
folder, e.g. two checkpoints of the tiny model for a checkpoint sweep:

    python -m capjob.models tiny_qwen25vl ckpt/step-20 --train-steps 20
    python -m capjob.models tiny_qwen25vl ckpt/step-1000   # the shipped weights (models/shipped.py)
    capjob --multirun experiment=offline model.source=ckpt/step-20,ckpt/step-1000 \\
        eval=stats eval.reference_column=reference

`--ship` (tiny_qwen25vl, with --train-steps) then ships the trained build's weights in the
package, replacing models/weights/ (models/shipped.py says when):

    python -m capjob.models tiny_qwen25vl /tmp/tiny-trained --train-steps 1200 --ship
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional

from capjob.models import BUILD_VERSIONS, COMPLETE_MARKER, TINY_QWEN25VL, build_model, shipped


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m capjob.models", description="Build one of capjob's own models into a folder.")
    parser.add_argument("builder", choices=sorted(BUILD_VERSIONS))
    parser.add_argument("out", help="target folder (absent or empty)")
    parser.add_argument("--train-steps", type=int, default=None,
                        help=f"{TINY_QWEN25VL} only: train for this many steps (default: the shipped weights, no training)")
    parser.add_argument("--ship", action="store_true", help="ship the trained build's weights in the package (with --train-steps)")
    args = parser.parse_args(argv)
    if args.train_steps is not None and (args.builder != TINY_QWEN25VL or args.train_steps < 0):
        parser.error(f"--train-steps takes a count >= 0 and applies to {TINY_QWEN25VL} only")
    if args.ship and args.train_steps is None:
        parser.error("--ship ships a trained build: give --train-steps (the recipe's: models.train.TRAIN_STEPS)")
    try:
        built = build_model(args.builder, args.out, train_steps=args.train_steps)
    except (OSError, ValueError) as e:
        print(f"capjob: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(built)
    record = json.loads((built / COMPLETE_MARKER).read_text()) if (built / COMPLETE_MARKER).is_file() else {}
    print(json.dumps(record))
    if args.ship:
        print("shipped", shipped.ship(args.builder, built, {k: v for k, v in record.items() if k not in ("builder", "version")}))


if __name__ == "__main__":
    main()
