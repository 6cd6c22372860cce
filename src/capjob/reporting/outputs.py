"""A capjob output read back: the captions table of a sink (one run's, or all), for the
evaluation, the judge and capjob-eval. Columns: schema.py's output row; the evaluation needs
REQUIRED_COLUMNS of it."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import fsspec
import fsspec.implementations.local
import pyarrow as pa
import pyarrow.compute as pc

from capjob.config import SinkConfig, SinkFormat
from capjob.errors import SourceError
from capjob.schema import CAPTIONS
from capjob.stages.storage import describe_remote_error
from capjob.stages.tables import TableWriter

EVALUATION = "evaluation"


REQUIRED_COLUMNS = ("id", "caption", "generated_tokens")


# A schema, its empty table made where it is needed: pyarrow imports pandas with its first table
# (300 ms of every `capjob` start, the one-line mistakes included, if made at import).
NO_CAPTIONS = pa.schema([("id", pa.string()), ("caption", pa.string()), ("generated_tokens", pa.int64()),
                         ("run_id", pa.string())])


def require_columns(table: pa.Table) -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise SourceError(f"the captions table has no column(s) {missing}; columns: {sorted(table.column_names)}")


def select_run(table: pa.Table, run_id: str) -> pa.Table:
    if "run_id" not in table.column_names:
        raise SourceError(f"cannot select run {run_id!r}: the captions table has no run_id column")
    return table.filter(pc.equal(table.column("run_id"), run_id))


def output_sink(url: str, storage_options: Optional[dict[str, Any]] = None) -> SinkConfig:
    """The SinkConfig that reads an existing output; its caption files tell the format."""
    options = storage_options or {}
    candidates = [
        SinkConfig(path=url, format=fmt, compression=compression, storage_options=options)
        for fmt, compression in ((SinkFormat.parquet, "snappy"), (SinkFormat.jsonl, "gzip"), (SinkFormat.jsonl, "none"))
    ]
    try:
        fs, root = fsspec.url_to_fs(url, **options)
        exists = fs.exists(root)
        found = [sink for sink in candidates if exists and TableWriter(sink).list_files(CAPTIONS)]
    except Exception as e:  # noqa: BLE001 - fsspec/s3fs/botocore raise a zoo of types
        raise SourceError(describe_remote_error(url, e)) from None
    if not exists:
        raise SourceError(f"{url!r} does not exist")
    if not found:
        raise SourceError(f"no caption files under {url.rstrip('/')}/{CAPTIONS}: is {url!r} a capjob sink.path?")
    return found[0]


def read_captions(sink: SinkConfig) -> pa.Table:
    writer = TableWriter(sink)
    try:
        if not writer.list_files(CAPTIONS):
            # Every image of the run was quarantined: no captions is a result, not bad input.
            return NO_CAPTIONS.empty_table()
        return writer.read(CAPTIONS)
    except Exception as e:  # noqa: BLE001 - s3fs/botocore/pyarrow raise a zoo of types
        raise SourceError(describe_remote_error(f"{sink.path.rstrip('/')}/{CAPTIONS}", e)) from None


def default_out_dir(url: str) -> Path:
    """The output itself when local; else ./eval-<last path component>."""
    fs, root = fsspec.url_to_fs(url)
    if isinstance(fs, fsspec.implementations.local.LocalFileSystem):
        return Path(root)
    return Path(f"eval-{root.rstrip('/').rsplit('/', 1)[-1]}")
