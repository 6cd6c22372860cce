"""Layout ``parquet``: parquet files or folders (only ``*.parquet`` in a folder; a named file
whatever its name), local or any fsspec URL. The image column holds bytes, ``{bytes, path}``
structs, paths/URLs (img2dataset's URL lists) or base64 text (cells.py), or a list of those
(``data.image_index`` / ``data.explode_images``). The footer of the first file gives the columns
and their types in preflight, without Ray."""

from __future__ import annotations

from typing import Any, Optional

import pyarrow as pa
import ray.data

from capjob.config import DataConfig
from capjob.errors import SourceError
from capjob.stages.storage import arrow_filesystem, describe_remote_error, inspect_file, open_file


def parquet_schema(path: str, storage_options: dict[str, Any], kind: str) -> pa.Schema:
    import pyarrow.parquet as pq

    first = inspect_file(path, storage_options, kind, ["parquet"], "parquet")
    try:
        with open_file(first, storage_options) as f:
            return pq.read_schema(f)
    except Exception as e:  # noqa: BLE001
        raise SourceError(f"data.path: {describe_remote_error(first, e)}") from None


def read_parquet(cfg: DataConfig, kind: str) -> ray.data.Dataset:
    assert cfg.path is not None
    fs = arrow_filesystem(cfg.path, cfg.storage_options)
    try:
        # In folders only *.parquet files (not _SUCCESS, .crc...); a named file whatever its name.
        extensions = ["parquet"] if kind == "directory" else None
        return ray.data.read_parquet(cfg.path, filesystem=fs, file_extensions=extensions)
    except Exception as e:  # noqa: BLE001
        raise SourceError(f"data.path: {describe_remote_error(cfg.path, e)}") from None


def image_type(schema: pa.Schema, column: str) -> Optional[pa.DataType]:
    return schema.field(column).type if column in schema.names else None
