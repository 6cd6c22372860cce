"""Stage: read the configured dataset into a Ray Dataset, lazily.

Every layout ends as rows that carry the image in ``Source.image_column`` (raw bytes, an HF
``{bytes, path}`` struct, or a path/URL string), an optional key column and pass-through
columns. Problems a user can fix (missing path, bucket, credentials or column) surface here as
one SourceError line, before any inference starts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

import fsspec
import pyarrow.fs as pafs
import ray.data

from capjob.config import DataConfig, SourceFormat
from capjob.errors import SourceError

IMAGE_EXTENSIONS = ["jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff"]


@dataclass
class Source:
    dataset: ray.data.Dataset
    image_column: str
    key_column: Optional[str]
    passthrough_columns: list[str]
    # Known row count (after data.limit) when the layout gives it cheaply; None when streaming.
    num_rows: Optional[int]
    description: str


def filesystem_for(path: str, storage_options: dict[str, Any]) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem and the protocol-less path for a local path or URL."""
    try:
        return fsspec.url_to_fs(path, **storage_options)
    except (ImportError, ValueError) as e:
        raise SourceError(f"cannot open {path!r}: {e}") from None


def _describe_remote_error(path: str, error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}"
    lowered = text.lower()
    if "nosuchbucket" in lowered or "bucket does not exist" in lowered or "specified bucket does not exist" in lowered:
        return f"bucket of {path!r} does not exist"
    if any(s in lowered for s in ("invalidaccesskeyid", "signaturedoesnotmatch", "accessdenied", "forbidden", "403", "credentials")):
        return f"access to {path!r} denied: check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or your profile) ({text.splitlines()[0][:200]})"
    if any(s in lowered for s in ("connect", "timed out", "timeout", "name or service not known", "unreachable")):
        return f"cannot reach the storage endpoint for {path!r}: {text.splitlines()[0][:200]}"
    return f"cannot read {path!r}: {text.splitlines()[0][:300]}"


def check_exists(path: str, storage_options: dict[str, Any]) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, fs_path = filesystem_for(path, storage_options)
    try:
        exists = fs.exists(fs_path)
        if exists and fs.isdir(fs_path):
            fs.ls(fs_path)  # remote stores answer exists() for a bare bucket; listing proves access
    except FileNotFoundError:
        exists = False
    except Exception as e:  # noqa: BLE001 - s3fs/botocore/aiohttp raise a zoo of types
        raise SourceError(_describe_remote_error(path, e)) from None
    if not exists:
        raise SourceError(f"data.path {path!r} does not exist")
    return fs, fs_path


def _arrow_filesystem(path: str, storage_options: dict[str, Any]) -> Optional[pafs.FileSystem]:
    """Local paths use Ray's own filesystem resolution; remote ones the configured fsspec fs."""
    fs, _ = filesystem_for(path, storage_options)
    if isinstance(fs, fsspec.implementations.local.LocalFileSystem):
        return None
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def _require_columns(available: list[str], cfg: DataConfig, image_column: str) -> None:
    wanted = [("data.image_column", image_column)]
    if cfg.key_column:
        wanted.append(("data.key_column", cfg.key_column))
    wanted += [("data.passthrough_columns", c) for c in cfg.passthrough_columns]
    for key, column in wanted:
        if column not in available:
            raise SourceError(f"{key}: column {column!r} not in the dataset; available columns: {sorted(available)}")


def _read_hf(cfg: DataConfig) -> tuple[ray.data.Dataset, Optional[int], list[str]]:
    import datasets

    path = cfg.path
    assert path is not None
    local = os.path.exists(path)
    try:
        if local and os.path.exists(os.path.join(path, "state.json")) or local and os.path.exists(os.path.join(path, "dataset_dict.json")):
            loaded = datasets.load_from_disk(path)
            if isinstance(loaded, datasets.DatasetDict):
                if cfg.split not in loaded:
                    raise SourceError(f"data.split: {cfg.split!r} not in {path!r}; available splits: {sorted(loaded)}")
                loaded = loaded[cfg.split]
            hf = loaded.to_iterable_dataset() if cfg.streaming else loaded
        else:
            hf = datasets.load_dataset(path, split=cfg.split, streaming=cfg.streaming)
    except SourceError:
        raise
    except FileNotFoundError as e:
        raise SourceError(f"data.path {path!r}: no such local dataset or hub repository ({e})") from None
    except ValueError as e:
        raise SourceError(f"data.path {path!r}: {e}") from None
    except Exception as e:  # noqa: BLE001 - hub/network errors
        raise SourceError(f"cannot load Hugging Face dataset {path!r} (split {cfg.split!r}): {type(e).__name__}: {str(e).splitlines()[0][:300]}") from None

    columns = list(hf.column_names or (hf.features or {}).keys())
    wanted = [cfg.image_column] + ([cfg.key_column] if cfg.key_column else []) + list(cfg.passthrough_columns)
    _require_columns(columns, cfg, cfg.image_column)
    hf = hf.select_columns([c for c in dict.fromkeys(wanted)])
    if cfg.streaming and cfg.limit:
        # Cap the hub stream itself so no more than `limit` rows are ever fetched.
        hf = hf.take(cfg.limit)
    num_rows = None if cfg.streaming else len(hf)
    if cfg.streaming:
        ds = ray.data.from_huggingface(hf)
    else:
        # Arrow data of a local/hub Dataset: hand Ray the table itself, split in blocks.
        table = hf.with_format("arrow")[:] if num_rows else None
        ds = ray.data.from_arrow(table) if table is not None else ray.data.from_items([])
    return ds, num_rows, columns


def _read_parquet(cfg: DataConfig) -> tuple[ray.data.Dataset, Optional[int], list[str]]:
    assert cfg.path is not None
    check_exists(cfg.path, cfg.storage_options)
    fs = _arrow_filesystem(cfg.path, cfg.storage_options)
    try:
        ds = ray.data.read_parquet(cfg.path, filesystem=fs)
        columns = list(ds.schema().names)
    except Exception as e:  # noqa: BLE001
        raise SourceError(_describe_remote_error(cfg.path, e)) from None
    return ds, None, columns


def _read_image_folder(cfg: DataConfig) -> tuple[ray.data.Dataset, Optional[int], list[str]]:
    assert cfg.path is not None
    check_exists(cfg.path, cfg.storage_options)
    fs = _arrow_filesystem(cfg.path, cfg.storage_options)
    try:
        ds = ray.data.read_binary_files(cfg.path, filesystem=fs, include_paths=True, file_extensions=IMAGE_EXTENSIONS)
    except Exception as e:  # noqa: BLE001
        raise SourceError(_describe_remote_error(cfg.path, e)) from None
    return ds, None, ["bytes", "path"]


def _read_webdataset(cfg: DataConfig) -> tuple[ray.data.Dataset, Optional[int], list[str]]:
    assert cfg.path is not None
    check_exists(cfg.path, cfg.storage_options)
    fs = _arrow_filesystem(cfg.path, cfg.storage_options)
    try:
        # decoder=None keeps the image bytes: decoding happens once, in images.py.
        ds = ray.data.read_webdataset(cfg.path, filesystem=fs, decoder=None, file_extensions=["tar"])
        columns = list(ds.schema().names)
    except Exception as e:  # noqa: BLE001
        raise SourceError(_describe_remote_error(cfg.path, e)) from None
    return ds, None, columns


def read_source(cfg: DataConfig) -> Source:
    """The configured dataset, limited, with its image/key columns resolved and checked."""
    image_column, key_column = cfg.image_column, cfg.key_column
    if cfg.format == SourceFormat.sample:
        from capjob.sample_data import ensure_sample_dataset

        path = ensure_sample_dataset(cfg.sample_size)
        ds, num_rows, columns = _read_parquet(DataConfig(path=path, format=SourceFormat.parquet))
        description = f"capjob sample ({path})"
    elif cfg.format == SourceFormat.hf:
        ds, num_rows, columns = _read_hf(cfg)
        description = f"Hugging Face dataset {cfg.path} [{cfg.split}]{' streaming' if cfg.streaming else ''}"
    elif cfg.format == SourceFormat.parquet:
        ds, num_rows, columns = _read_parquet(cfg)
        description = f"parquet {cfg.path}"
    elif cfg.format == SourceFormat.image_folder:
        ds, num_rows, columns = _read_image_folder(cfg)
        # An image file is its own key: its path.
        image_column, key_column = "bytes", key_column or "path"
        description = f"image folder {cfg.path}"
    elif cfg.format == SourceFormat.webdataset:
        ds, num_rows, columns = _read_webdataset(cfg)
        key_column = key_column or "__key__"
        description = f"webdataset {cfg.path}"
    else:  # pragma: no cover - the enum is exhaustive
        raise SourceError(f"data.format: unknown {cfg.format}")

    checked = DataConfig(**{**cfg.__dict__, "key_column": key_column})
    _require_columns(columns, checked, image_column)
    if cfg.shuffle_seed is not None:
        ds = ds.random_shuffle(seed=cfg.shuffle_seed)
    if cfg.limit is not None:
        ds = ds.limit(cfg.limit)
        num_rows = min(num_rows, cfg.limit) if num_rows is not None else cfg.limit
    return Source(
        dataset=ds,
        image_column=image_column,
        key_column=key_column,
        passthrough_columns=list(cfg.passthrough_columns),
        num_rows=num_rows,
        description=description,
    )
