"""The tiny model's trained weights, shipped in the package so that a build captions at once.

Training the tiny model (models/train.py) takes minutes on two idle cores and much longer on a
busy machine, and its result depends on the CPU: oneDNN's float sums differ between CPU
families, so an AMD EPYC and an Intel Xeon train different weights from the same seed (97.5%
and 99.5% exact captions on the held-out scenes: docs/benchmarks.md, "Tiny trained model").
So one trained build is shipped, and every build of ``tiny_qwen25vl`` uses it:

    weights/tiny_qwen25vl.safetensors   the trained weights in bfloat16 (half the bytes of the
                                        float32 build; the held-out accuracy is the same)
    weights/tiny_qwen25vl.json          how they were made: sha256 of that file, dtype,
                                        train_steps, train_seconds, exact_match on eval_scenes,
                                        the CPU and versions that trained them

A build writes them back as float32 (model.dtype=float32 is what experiment=offline runs) after
checking the file's sha256 against the record: a file changed since it was shipped fails the
build with one line instead of captioning with other weights.

Refreshing them (after a change to the model's recipe, BUILD_VERSIONS bumped):

    python -m capjob.models tiny_qwen25vl /tmp/tiny-trained --train-steps 1200 --ship

The training code and its reproduction test (tests/models/test_models.py) stay: the weights are
what models/train.py makes, and the test trains them again and compares the accuracy with the
record's.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import platform
from typing import Any

WEIGHTS_DIR = pathlib.Path(__file__).with_name("weights")
WEIGHTS_FILE = "model.safetensors"
SHIPPED_DTYPE = "bfloat16"


def weights_path(builder: str) -> pathlib.Path:
    return WEIGHTS_DIR / f"{builder}.safetensors"


def record_path(builder: str) -> pathlib.Path:
    return WEIGHTS_DIR / f"{builder}.json"


def shipped_record(builder: str) -> dict[str, Any] | None:
    """The record of `builder`'s shipped weights, or None when the package ships none."""
    path = record_path(builder)
    return json.loads(path.read_text()) if path.is_file() and weights_path(builder).is_file() else None


def sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def install_weights(builder: str, model_dir: pathlib.Path) -> dict[str, Any]:
    """Write `builder`'s shipped weights into `model_dir` as float32 model.safetensors (the
    layout save_pretrained writes); returns the record. Raises RuntimeError when the shipped
    file's sha256 is not the record's."""
    import torch
    from safetensors.torch import load_file, save_file

    record = shipped_record(builder)
    if record is None:
        raise RuntimeError(f"capjob ships no weights for {builder} ({WEIGHTS_DIR})")
    path = weights_path(builder)
    if sha256(path) != record["sha256"]:
        raise RuntimeError(f"{path}: sha256 is not the one recorded in {record_path(builder).name}; reinstall capjob")
    tensors = {name: t.to(torch.float32).contiguous() for name, t in load_file(path).items()}
    save_file(tensors, model_dir / WEIGHTS_FILE, metadata={"format": "pt"})
    return record


def ship(builder: str, model_dir: pathlib.Path, record: dict[str, Any]) -> pathlib.Path:
    """Ship the trained weights of the build in `model_dir` (its build record `record`) as
    `builder`'s: bfloat16 safetensors and their record beside them in WEIGHTS_DIR."""
    import torch
    import transformers
    from safetensors.torch import load_file, save_file

    tensors = {name: t.to(getattr(torch, SHIPPED_DTYPE)).contiguous() for name, t in load_file(model_dir / WEIGHTS_FILE).items()}
    WEIGHTS_DIR.mkdir(exist_ok=True)
    path = weights_path(builder)
    save_file(tensors, path, metadata={"format": "pt"})
    cpu = _cpu_name()
    record_path(builder).write_text(json.dumps({
        **{k: v for k, v in record.items() if k not in ("weights", "sha256")},
        "sha256": sha256(path), "dtype": SHIPPED_DTYPE,
        "trained_on": {"cpu": cpu, "machine": platform.machine(), "torch": torch.__version__,
                       "transformers": transformers.__version__},
    }, indent=2) + "\n")
    return path


def _cpu_name() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
