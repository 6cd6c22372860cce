"""What every layout shares: the Source it returns, column checks, the accounting of items a
source holds but does not turn into rows, and columns that hold a list of images.

Accounting: a layout whose items are files or tar members (image folders, webdatasets) emits
one row per item. An item that is not an image row carries its reason in ``SKIP_COLUMN``
(hidden file, non-image file, sample without an image...); ``account`` counts those per reason
into the run's ledger and drops them, so that the report can state items seen = rows + skipped.

Ragged rows: a row may lack a field that other rows have (a webdataset sample without a
``.txt``, a parquet file without a column, a JSON record without a key). ``fill_columns`` gives
every block every column the job needs (image, key, pass-through), null where a row lacks it, so
that no later stage meets a block without one of its columns.

Preflight's look at the data (``Looked``): a reader whose first file or sample need not be
typical (a caption-only shard before the image shards, a parquet file without a column that
later files have) looks further, within ``PREFLIGHT_BYTES`` and ``PREFLIGHT_SECONDS``. It refuses
what it did not find (no image, a column) only saying how much it looked at.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import ray.data

from capjob import metrics
from capjob.config import DataConfig
from capjob.errors import SourceError

# Reason an item is not a row (null for rows); `ITEM_COLUMN` names the item (file path, member).
SKIP_COLUMN = "__skip__"
ITEM_COLUMN = "__item__"
# Ledger counters: items a reader looked at, and those skipped per reason.
ITEMS_COUNTER = "source_items"
SKIPPED_COUNTER = "source_skipped:"
# How much of a source preflight reads, at most, to find an image and every configured column
# when the first file or sample lacks them: seconds, so that a bad path or a typo still fails
# before Ray starts; enough for caption-only or metadata shards ahead of the image shards.
PREFLIGHT_BYTES = 64 << 20
PREFLIGHT_SECONDS = 10.0

log = logging.getLogger(__name__)


@dataclass
class Source:
    dataset: ray.data.Dataset
    image_column: str
    key_column: Optional[str]
    passthrough_columns: list[str]
    # Known row count (after data.limit) when the layout gives it cheaply; None when streaming.
    num_rows: Optional[int]
    description: str


def wanted_columns(cfg: DataConfig, image_column: str, key_column: Optional[str] = None) -> list[tuple[str, str]]:
    """(config key, column) of every column the job reads: image, key, pass-through."""
    wanted = [("data.image_column", image_column)]
    if key_column or cfg.key_column:
        wanted.append(("data.key_column", key_column or cfg.key_column))
    wanted += [("data.passthrough_columns", c) for c in cfg.passthrough_columns]
    return wanted


def require_columns(available: list[str], cfg: DataConfig, image_column: str, looked: Optional[str] = None) -> None:
    """SourceError naming the first wanted column not in `available` (the columns of the part of
    the dataset preflight `looked` at, when that is less than its schema)."""
    for key, column in wanted_columns(cfg, image_column):
        if column not in available:
            where = f" ({looked})" if looked else ""
            raise SourceError(f"{key}: column {column!r} not in the dataset{where}; available columns: {sorted(available)}")


@dataclass
class Looked:
    """How much of a source preflight read: `seen` of its `unit`s (shards, files, rows), of
    `total` when known, `parts` ({"members": 412}) within them, `bytes` read; `spent()` once the
    budget (PREFLIGHT_BYTES, PREFLIGHT_SECONDS) is used up."""

    unit: str
    total: Optional[int] = None
    seen: int = 0
    bytes: int = 0
    parts: dict[str, int] = field(default_factory=dict)
    # Read when a Looked starts (not when this module is imported), so that a test can lower them.
    max_bytes: int = field(default_factory=lambda: PREFLIGHT_BYTES)
    max_seconds: float = field(default_factory=lambda: PREFLIGHT_SECONDS)
    started: float = field(default_factory=time.monotonic)

    def count(self, part: str, n: int = 1) -> None:
        self.parts[part] = self.parts.get(part, 0) + n

    def spent(self) -> bool:
        return self.bytes >= self.max_bytes or time.monotonic() - self.started >= self.max_seconds

    def describe(self, everything: bool) -> str:
        """'looked at all 3 shards (412 members)', or, when preflight stopped at its budget,
        'looked at the first 2 of 40 shards (1,204 members, 64.0 MiB; preflight reads at most
        64 MiB or 10 s)'."""
        units = f"{self.unit}{'' if (self.total if self.total is not None and not everything else self.seen) == 1 else 's'}"
        parts = [f"{n:,} {name[:-1] if n == 1 and name.endswith('s') else name}" for name, n in self.parts.items()]
        if everything:
            return f"looked at all {self.seen:,} {units}" + (f" ({', '.join(parts)})" if parts else "")
        of = f" of {self.total:,}" if self.total is not None else ""
        parts.append(f"{self.bytes / (1 << 20):.1f} MiB in {time.monotonic() - self.started:.1f} s")
        return (f"looked at the first {self.seen:,}{of} {units} ({', '.join(parts)}; preflight reads at most "
                f"{self.max_bytes / (1 << 20):g} MiB or {self.max_seconds:g} s)")


def fill_columns(batch: pa.Table, columns: dict[str, Optional[pa.DataType]]) -> pa.Table:
    """map_batches UDF: `batch` with every column of `columns` ({name: type, None: unknown}),
    null where the block lacks it, so that each block carries every column the job reads."""
    for name, type_ in columns.items():
        if name not in batch.column_names:
            batch = batch.append_column(name, pa.nulls(batch.num_rows, type_ or pa.null()))
    return batch


def account(batch: pa.Table, run_id: Optional[str]) -> pa.Table:
    """map_batches UDF after a read that emits skip rows: records the block's items and its
    skipped items per reason in the ledger (keyed by the items' names, so a retried block
    replaces its own entry), and returns the rows only."""
    if SKIP_COLUMN not in batch.column_names:
        return batch
    reasons = batch.column(SKIP_COLUMN).to_pylist()
    if run_id is not None and batch.num_rows:
        names = batch.column(ITEM_COLUMN).to_pylist() if ITEM_COLUMN in batch.column_names else reasons
        key = hashlib.sha1("\n".join(map(str, names)).encode()).hexdigest()[:20]
        counts: dict[str, int] = {ITEMS_COUNTER: batch.num_rows}
        for reason in reasons:
            if reason is not None:
                counts[SKIPPED_COUNTER + reason] = counts.get(SKIPPED_COUNTER + reason, 0) + 1
        metrics.record_many(run_id, "src-" + key, counts)
    keep = pa.array([r is None for r in reasons], pa.bool_())
    return batch.filter(keep).drop_columns([c for c in (SKIP_COLUMN, ITEM_COLUMN) if c in batch.column_names])


def skipped_totals(counts: dict[str, int]) -> dict[str, int]:
    """{reason: items} from the ledger's totals."""
    return {k[len(SKIPPED_COUNTER):]: v for k, v in counts.items() if k.startswith(SKIPPED_COUNTER) and v}


# --------------------------------------------------------------------------- lists of images


def is_image_list(type_: pa.DataType) -> bool:
    """A list of binary, string or {bytes, path} structs: several images per row."""
    if not (pa.types.is_list(type_) or pa.types.is_large_list(type_) or pa.types.is_fixed_size_list(type_)):
        return False
    item = type_.value_type
    return (pa.types.is_binary(item) or pa.types.is_large_binary(item) or pa.types.is_string(item)
            or pa.types.is_large_string(item) or (pa.types.is_struct(item) and item.get_field_index("bytes") >= 0))


def check_image_list(cfg: DataConfig, image_type: Optional[pa.DataType], where: str) -> bool:
    """Whether the image column holds lists; fails in one line when that needs an option no
    one set, or an option is set for a column that is not a list."""
    if image_type is None:
        return cfg.image_index is not None or cfg.explode_images
    listed = is_image_list(image_type)
    if listed and cfg.image_index is None and not cfg.explode_images:
        raise SourceError(
            f"data.image_column: {cfg.image_column!r} in {where} holds a list of images ({image_type}): set "
            "data.image_index=N to caption the N-th image of each row, or data.explode_images=true for one row per image"
        )
    if not listed and (cfg.image_index is not None or cfg.explode_images):
        option = "data.image_index" if cfg.image_index is not None else "data.explode_images"
        raise SourceError(f"{option}: {cfg.image_column!r} in {where} is not a list of images ({image_type})")
    return listed


def select_images(batch: dict[str, np.ndarray], *, image_column: str, key_column: Optional[str],
                  image_index: Optional[int], keyed_column: Optional[str]) -> dict[str, np.ndarray]:
    """map_batches UDF for a list-of-images column: the `image_index`-th image of each row (None
    when the row has fewer: quarantined as empty), or, with `image_index` None, one row per
    image whose key (`keyed_column`) is `<key>#<i>`. A row whose list is empty or null stays one
    row without an image (quarantined: never lost)."""
    images = batch[image_column]
    if image_index is not None:
        picked = np.empty(len(images), dtype=object)
        for r, cell in enumerate(images):
            items = list(cell) if cell is not None and not isinstance(cell, (bytes, str, dict)) else None
            picked[r] = items[image_index] if items is not None and image_index < len(items) else None
        out = dict(batch)
        out[image_column] = picked
        if keyed_column:
            keys = batch[key_column] if key_column else [None] * len(images)
            out[keyed_column] = np.asarray([None if k is None else f"{k}#{image_index}" for k in keys], dtype=object)
        return out
    rows: list[int] = []
    cells: list[Any] = []
    suffixes: list[int] = []
    for r, cell in enumerate(images):
        items = list(cell) if cell is not None and not isinstance(cell, (bytes, str, dict)) else []
        for i, item in enumerate(items or [None]):
            rows.append(r)
            cells.append(item)
            suffixes.append(i)
    out = {name: np.asarray([col[r] for r in rows], dtype=object) for name, col in batch.items() if name != image_column}
    picked = np.empty(len(cells), dtype=object)
    for j, c in enumerate(cells):
        picked[j] = c
    out[image_column] = picked
    if keyed_column:
        keys = batch[key_column] if key_column else [None] * len(images)
        out[keyed_column] = np.asarray([None if keys[r] is None else f"{keys[r]}#{i}" for r, i in zip(rows, suffixes)], dtype=object)
    return out
