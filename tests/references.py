"""Does each caption belong to its own image? The trained offline model (capjob.models.train)
captions shape scenes (capjob.models.shapes) exactly right on 99.5% of held-out scenes with
transformers and with vLLM alone, and names the background right every time. Through capjob's
pipeline its whole captions are right less often (docs/benchmarks.md, "Tiny trained model":
75-96% on the e2e tests' sets; the cause is open, issue 16), so the check the e2e tests rely on
is the background: a caption written under another row's id names another background in two
cases of three."""

from __future__ import annotations

import pyarrow as pa

# The bar for whole captions (>= 95% exact): test_models.py holds the model to it.
MIN_EXACT = 0.95
# Backgrounds: measured 100% right, through the pipeline too.
MIN_BACKGROUND = 0.95


def shape_rows(count: int, seed: int, prefix: str = "shapes") -> tuple[list[tuple[str, bytes, str]], list[str]]:
    """`count` shape scenes as write_hf_parquet rows (name, PNG bytes, label) and their captions."""
    from capjob.sample_data import shape_images

    scenes = shape_images(count, seed)
    return [(f"{prefix}_{i:05d}.png", data, "shapes") for i, (_, data, _) in enumerate(scenes)], [c for _, _, c in scenes]


def background(caption: str) -> str:
    """"... on a gray background" -> "gray"; "" when the caption names none."""
    words = caption.strip().split()
    return words[-2] if len(words) >= 2 and words[-1] == "background" else ""


def assert_captions_fit_their_images(captions: pa.Table, expected_rows: int, min_share: float = MIN_BACKGROUND) -> float:
    """Exactly `expected_rows` rows carry a reference, and at least `min_share` of them name that
    reference's background; returns the share of whole captions equal to their reference."""
    rows = [r for r in captions.select(["id", "source_key", "caption", "reference"]).to_pylist() if r["reference"] is not None]
    assert len(rows) == expected_rows, f"{len(rows)} captioned rows with a reference, expected {expected_rows}"
    wrong = [r for r in rows if background(r["caption"]) != background(r["reference"])]
    assert 1 - len(wrong) / len(rows) >= min_share, (
        f"{len(wrong)} of {len(rows)} captions name another background than their image's, e.g. {wrong[:3]}")
    return sum(r["caption"].strip() == r["reference"] for r in rows) / len(rows)
