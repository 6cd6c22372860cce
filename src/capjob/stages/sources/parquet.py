"""Layout ``parquet``: parquet files or folders (only ``*.parquet`` in a folder; a named file
whatever its name), local or any fsspec URL. The image column holds bytes, ``{bytes, path}``
structs, paths/URLs (img2dataset's URL lists) or base64 text (cells.py), or a list of those
(``data.image_index`` / ``data.explode_images``).

Files need not share one schema (a file written before a column was added, an empty file without
columns): preflight reads the footers in order, without Ray, until every configured column is in
one of them (common.Looked: its budget), and refuses only a column none of the footers it read
has, saying how many it read. Rows of a file without a column get null there, typed as the
files that have it declare it (read_parquet reads every file with the footers' schema)."""

from __future__ import annotations

from typing import Any, Optional

import pyarrow as pa
import ray.data

from capjob.config import DataConfig
from capjob.errors import SourceError
from capjob.stages.sources.common import Looked
from capjob.stages.storage import arrow_filesystem, describe_remote_error, iter_files, open_file


def parquet_schema(path: str, storage_options: dict[str, Any], kind: str, wanted: list[str] = ()) -> tuple[pa.Schema, str]:  # type: ignore[assignment]
    """(the columns of the footers preflight read, first declaration of each, in order; how much
    it read): every footer up to the first that completes `wanted`, within the budget
    (common.Looked). SourceError (one line) for no parquet file, or a file that cannot be read."""
    import pyarrow.parquet as pq

    files = iter([path]) if kind == "file" else iter_files(path, storage_options, ["parquet"])
    looked = Looked("parquet file")
    fields: dict[str, pa.Field] = {}
    everything = True
    for url in files:
        looked.seen += 1
        try:
            with open_file(url, storage_options) as f:
                pf = pq.ParquetFile(f)
                meta, schema = pf.metadata, pf.schema_arrow
        except Exception as e:  # noqa: BLE001
            raise SourceError(f"data.path: {describe_remote_error(url, e)}") from None
        looked.count("rows", meta.num_rows)
        looked.bytes += meta.serialized_size
        for fld in schema:
            fields.setdefault(fld.name, fld)
        if all(c in fields for c in wanted) or looked.spent():
            everything = next(files, None) is None
            break
    if not looked.seen:
        raise SourceError(f"data.path: no parquet files (*.parquet) under {path!r}")
    return pa.schema(list(fields.values())), looked.describe(everything)


def read_parquet(cfg: DataConfig, kind: str, schema: Optional[pa.Schema] = None) -> ray.data.Dataset:
    """The files as a Ray Dataset. With `schema` (parquet_schema's), every file is read with
    it: a column a file lacks is null there, typed as the schema declares it (pyarrow's dataset
    scan fills it), and Ray knows the blocks' schema without reading them."""
    assert cfg.path is not None
    fs = arrow_filesystem(cfg.path, cfg.storage_options)
    try:
        # In folders only *.parquet files (not _SUCCESS, .crc...); a named file whatever its name.
        extensions = ["parquet"] if kind == "directory" else None
        return ray.data.read_parquet(cfg.path, filesystem=fs, file_extensions=extensions, schema=schema)
    except Exception as e:  # noqa: BLE001
        raise SourceError(f"data.path: {describe_remote_error(cfg.path, e)}") from None


def image_type(schema: pa.Schema, column: str) -> Optional[pa.DataType]:
    return schema.field(column).type if column in schema.names else None
