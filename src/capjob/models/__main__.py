"""`python -m capjob.models BUILDER OUT [--train-steps N]`: build one of capjob's own models into a
folder, e.g. two checkpoints of the tiny model for a checkpoint sweep:

    python -m capjob.models tiny_qwen25vl ckpt/step-20 --train-steps 20
    python -m capjob.models tiny_qwen25vl ckpt/step-1000
    capjob --multirun experiment=offline model.source=ckpt/step-20,ckpt/step-1000 \\
        eval=stats eval.reference_column=reference
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional

from capjob.models import BUILD_VERSIONS, COMPLETE_MARKER, TINY_QWEN25VL, build_model


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m capjob.models", description="Build one of capjob's own models into a folder.")
    parser.add_argument("builder", choices=sorted(BUILD_VERSIONS))
    parser.add_argument("out", help="target folder (absent or empty)")
    parser.add_argument("--train-steps", type=int, default=None, help=f"{TINY_QWEN25VL} only: training steps (default: models.train.TRAIN_STEPS)")
    args = parser.parse_args(argv)
    if args.train_steps is not None and (args.builder != TINY_QWEN25VL or args.train_steps < 0):
        parser.error(f"--train-steps takes a count >= 0 and applies to {TINY_QWEN25VL} only")
    try:
        built = build_model(args.builder, args.out, train_steps=args.train_steps)
    except (OSError, ValueError) as e:
        print(f"capjob: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(built)
    print((built / COMPLETE_MARKER).read_text().strip() if (built / COMPLETE_MARKER).is_file() else json.dumps({}))


if __name__ == "__main__":
    main()
