"""Layout ``hf``: Hugging Face datasets -- a hub id, a local folder of data files (parquet,
arrow, json, csv, or images with a ``metadata.jsonl``: the image-folder builder) or a
``save_to_disk`` folder -- with ``data.split`` and ``data.streaming``. Read by Ray tasks shard by
shard: no copy of the dataset through the driver.

The image-folder builder hands image cells over as ``{bytes: None, path: <file>}`` (files on disk
are not copied); cells.py reads those from their path, local, ``hf://`` or S3.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Iterator, Optional

import pyarrow as pa
import ray.data
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from capjob.config import DataConfig
from capjob.errors import SourceError, describe, first_line
from capjob.stages.sources.common import Looked, check_image_list, require_columns

# Rows per block read from a Hugging Face dataset (Ray splits blocks that grow larger).
HF_BATCH_ROWS = 256
# Shards a map-style dataset is cut into (Ray runs at most its read parallelism of them at once).
HF_MAX_SHARDS = 256



def _read_hf_shard(shard: Any, limit: Optional[int]) -> Iterator[pa.Table]:
    if limit is not None:
        shard = shard.take(limit)
    # Arrow format: image features stay {bytes, path} structs (no PIL decoding here).
    for batch in shard.with_format("arrow").iter(batch_size=HF_BATCH_ROWS):
        if batch.num_rows:
            yield batch


class HuggingFaceShards(Datasource):
    """A `datasets.IterableDataset` read by parallel Ray tasks, one group of its shards each.

    Unlike ``ray.data.from_huggingface`` this never asks the hub for a parquet export (which
    would ignore column selection and can be a partial copy of the dataset) and never copies
    a map-style dataset through the driver into the object store."""

    def __init__(self, dataset: Any, limit: Optional[int]):
        self._dataset = dataset
        self._limit = limit

    def estimate_inmemory_data_size(self) -> Optional[int]:
        return None

    def get_name(self) -> str:
        return "HuggingFace"

    def get_read_tasks(self, parallelism: int, per_task_row_limit: Optional[int] = None, data_context: Any = None) -> list[ReadTask]:
        shards = max(1, int(self._dataset.num_shards or 1))
        tasks = max(1, min(shards, parallelism if parallelism and parallelism > 0 else shards))
        out = []
        for i in range(tasks):
            shard = self._dataset.shard(num_shards=tasks, index=i) if tasks > 1 else self._dataset
            meta = BlockMetadata(num_rows=None, size_bytes=None, input_files=None, exec_stats=None)
            out.append(ReadTask(functools.partial(_read_hf_shard, shard, self._limit), meta, per_task_row_limit=per_task_row_limit))
        return out


def hf_columns(hf: Any) -> list[str]:
    names = hf.column_names or (list(hf.features) if hf.features else None)
    if names is None:  # a streaming dataset without declared features: look at one row
        names = list(next(iter(hf.take(1)), {}).keys())
    return list(names)


def preflight_columns(hf: Any, path: str, wanted: list[str]) -> tuple[list[str], Optional[str]]:
    """(columns, how much preflight read to find them: None for the declared features).

    A saved dataset's features are its schema. A folder of data files gets its features from
    datasets, which takes them from its first file(s): when they lack a wanted column, the rows
    are read on, within the budget (common.Looked), to tell a column no row has from files that
    do not share one schema -- datasets refuses those at read, here it says so in one line."""
    import datasets

    declared = hf_columns(hf)
    # A hub dataset's features are its card's or its files' export: not worth streaming rows for.
    if all(c in declared for c in wanted) or not isinstance(hf, datasets.IterableDataset) or hf_kind(path) != "local":
        return declared, None
    looked = Looked("row")
    names = dict.fromkeys(declared)
    try:
        for batch in hf.with_format("arrow").iter(batch_size=HF_BATCH_ROWS):
            looked.seen += batch.num_rows
            looked.bytes += batch.nbytes
            names.update(dict.fromkeys(batch.column_names))
            if all(c in names for c in wanted) or looked.spent():
                return list(names), looked.describe(False)
    except Exception as e:  # noqa: BLE001 - datasets' CastError, DatasetGenerationError...
        flat = " ".join(str(e).split())[:300]
        raise SourceError(f"data.path {path!r}: its data files do not share one schema, and Hugging Face datasets reads a folder "
                          f"with the columns of its first file ({type(e).__name__}: {flat}); data.format=parquet reads parquet "
                          "files of differing columns") from None
    return list(names), looked.describe(True)


def hf_kind(path: str) -> str:
    """"saved" (save_to_disk folder), "local" (folder of data files) or "hub" (a repository id)."""
    if os.path.exists(path):
        if os.path.exists(os.path.join(path, "state.json")) or os.path.exists(os.path.join(path, "dataset_dict.json")):
            return "saved"
        return "local"
    if path.startswith(("/", "./", "../", "~")) or path.count("/") > 1 or "://" in path:
        raise SourceError(f"data.path {path!r} does not exist (for data.format=hf: a local folder or a hub id)")
    return "hub"


def load_hf(cfg: DataConfig, streaming: bool) -> Any:
    """The split as a datasets.Dataset (or IterableDataset when streaming)."""
    import datasets

    path = cfg.path
    assert path is not None
    try:
        if hf_kind(path) == "saved":
            loaded = datasets.load_from_disk(path)
            if isinstance(loaded, datasets.DatasetDict):
                if cfg.split not in loaded:
                    raise SourceError(f"data.split: {cfg.split!r} not in {path!r}; available splits: {sorted(loaded)}")
                loaded = loaded[cfg.split]
            return loaded
        return datasets.load_dataset(path, split=cfg.split, streaming=streaming)
    except SourceError:
        raise
    except FileNotFoundError as e:
        raise SourceError(f"data.path {path!r}: no such local dataset or hub repository ({first_line(e, 200)})") from None
    except ValueError as e:
        message = first_line(e, 300)
        if "split" in message.lower():
            raise SourceError(f"data.split: {cfg.split!r}: {message}") from None
        raise SourceError(f"data.path {path!r}: {message}") from None
    except Exception as e:  # noqa: BLE001 - hub/network errors
        raise SourceError(
            f"cannot load Hugging Face dataset {path!r} (split {cfg.split!r}): {describe(e, 300)}"
        ) from None


def image_type(hf: Any, column: str) -> Optional[pa.DataType]:
    """The arrow type of `column` from the dataset's declared features (None: not declared)."""
    features = getattr(hf, "features", None)
    if not features or column not in features:
        return None
    try:
        return features.arrow_schema.field(column).type
    except Exception:  # noqa: BLE001 - features a schema cannot express
        return None


def read_hf(cfg: DataConfig) -> tuple[ray.data.Dataset, Optional[int], list[str], bool]:
    import datasets

    hf = load_hf(cfg, cfg.streaming)
    wanted = [cfg.image_column] + ([cfg.key_column] if cfg.key_column else []) + list(cfg.passthrough_columns)
    columns, looked = preflight_columns(hf, cfg.path or "", wanted)
    require_columns(columns, cfg, cfg.image_column, looked)
    listed = check_image_list(cfg, image_type(hf, cfg.image_column), repr(cfg.path))
    hf = hf.select_columns(list(dict.fromkeys(wanted)))
    if isinstance(hf, datasets.Dataset):
        # Map-style (save_to_disk, or a hub/local dataset prepared into the HF cache): memory-
        # mapped arrow files, read by the tasks themselves, a few hundred rows per shard.
        num_rows: Optional[int] = len(hf)
        if cfg.limit is not None and cfg.shuffle_seed is None:
            hf = hf.select(range(min(cfg.limit, len(hf))))
            num_rows = len(hf)
        shards = max(1, min(HF_MAX_SHARDS, -(-len(hf) // HF_BATCH_ROWS)))
        ds = ray.data.read_datasource(HuggingFaceShards(hf.to_iterable_dataset(num_shards=shards), None))
        return ds, num_rows, columns, listed
    # Streaming (hub or local data files): no row count; cap every shard at `limit` rows so
    # no more than needed is ever fetched, read.limit() then cuts the total.
    limit = cfg.limit if cfg.shuffle_seed is None else None
    return ray.data.read_datasource(HuggingFaceShards(hf, limit)), None, columns, listed
