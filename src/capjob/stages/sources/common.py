"""What every layout shares: the Source it returns, column checks, the accounting of items a
source holds but does not turn into rows, and columns that hold a list of images.

Accounting: a layout whose items are files or tar members (image folders, webdatasets) emits
one row per item. An item that is not an image row carries its reason in ``SKIP_COLUMN``
(hidden file, non-image file, sample without an image...); ``account`` counts those per reason
into the run's ledger and drops them, so that the report can state items seen = rows + skipped.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
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


@dataclass
class Source:
    dataset: ray.data.Dataset
    image_column: str
    key_column: Optional[str]
    passthrough_columns: list[str]
    # Known row count (after data.limit) when the layout gives it cheaply; None when streaming.
    num_rows: Optional[int]
    description: str


def require_columns(available: list[str], cfg: DataConfig, image_column: str) -> None:
    wanted = [("data.image_column", image_column)]
    if cfg.key_column:
        wanted.append(("data.key_column", cfg.key_column))
    wanted += [("data.passthrough_columns", c) for c in cfg.passthrough_columns]
    for key, column in wanted:
        if column not in available:
            raise SourceError(f"{key}: column {column!r} not in the dataset; available columns: {sorted(available)}")


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
