"""The ``dedup`` config group: caption each distinct image once (stages/dedup/).

``mode``:

* ``exact`` (default): rows whose decoded, normalised pixels are equal (the RGB array the engine
  gets, after orientation, alpha compositing and resizing: stages/images.py) are one image.
  The first copy is captioned; every other copy gets its own row with that caption and
  ``duplicate_of`` = the first copy's id. A PNG and a lossless re-encode of its pixels are one
  image; a JPEG re-encode (other pixels) is another.
* ``perceptual``: also rows whose 64-bit perceptual hash (DCT hash of a 32x32 grey thumbnail,
  stages/dedup/registry.perceptual_hash) is within ``threshold`` bits (Hamming distance) of an
  image already captioned: near duplicates (re-encodes, small resizes). The report lists every
  group it merged.
* ``off``: every row is captioned, copies too (capjob before issue 32).

Not a caption setting: dedup decides which rows reach the engine, never what caption an image
gets, so it is not part of resume's caption-settings fingerprint (a sink may be resumed with
another mode).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from capjob.config.groups import require

# Most bits of 64 that ``threshold`` may allow: beyond it unrelated images start to match
# (the usual pHash cut-offs are 4 to 10) and the multi-index search (threshold + 1 blocks) degrades.
MAX_THRESHOLD = 16


class DedupMode(str, enum.Enum):
    exact = "exact"
    perceptual = "perceptual"
    off = "off"


@dataclass
class DedupConfig:
    name: str = "exact"
    mode: DedupMode = DedupMode.exact
    # perceptual only: the largest Hamming distance (bits of the 64-bit hash) at which two
    # images count as one.
    threshold: int = 4
    # How many merged groups the report lists (report.json; report.md shows the first 20).
    report_groups: int = 200


def validate_dedup(d: DedupConfig) -> DedupConfig:
    """Range checks of ``dedup``. Raises ConfigError naming the key."""
    require(0 <= d.threshold <= MAX_THRESHOLD, "dedup.threshold", f"must be in 0..{MAX_THRESHOLD} bits of 64, got {d.threshold}")
    require(d.report_groups >= 0, "dedup.report_groups", f"must be >= 0, got {d.report_groups}")
    return d
