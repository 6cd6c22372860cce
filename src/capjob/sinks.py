"""Stage: write captions and quarantined rows, streaming, one atomic file per block.

Layout under ``sink.path`` (a local path or any fsspec URL: ``s3://bucket/prefix``...)::

    captions/<run_id>-<block digest>.parquet     one row per captioned image
    quarantine/<run_id>-<block digest>.parquet   one row per rejected image, with stage and reason

(``.jsonl``, ``.jsonl.gz`` or ``.jsonl.zst`` with ``sink.format=jsonl``.) File names are the run id
(a UTC timestamp + random suffix, unique per run) and a digest of the row ids the file holds
(unique per block within a run), so runs and workers never collide, and a retried task rewrites
the same file instead of adding a duplicate. Every file is serialised in memory first; a local
file is then written under a hidden temporary name and renamed into place, a remote one is
uploaded in one request (an object store publishes an object only when its upload completes).
Readers (and resume) therefore never see half-written files: names starting with ``.`` or
``_`` are ignored by pyarrow and by ``read_done_ids``.

``sink.rows_per_file`` gathers blocks until a file holds at least that many rows (Ray Data's
``min_rows_per_write``): files then hold between rows_per_file and rows_per_file + one block
(the run's last file may hold fewer). Unset: one file per block.

Credentials come only from the environment / standard AWS configuration (see sources.py);
``sink.storage_options`` holds endpoint and client settings, never secrets.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import io
import json
import os
import time
import uuid
from typing import Any, Iterable, Optional

import fsspec
import fsspec.implementations.local
import pyarrow as pa
import pyarrow.parquet as pq
from ray.data.block import Block, BlockAccessor
from ray.data.datasource.datasink import Datasink, WriteResult

from capjob.config import SinkConfig, SinkFormat
from capjob.errors import CapjobError, SinkError
from capjob.processor import ERROR_COLUMN

CAPTIONS = "captions"
QUARANTINE = "quarantine"

QUARANTINE_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("source_key", pa.string()),
        ("stage", pa.string()),
        ("reason", pa.string()),
        ("model", pa.string()),
        ("run_id", pa.string()),
    ]
)

# sink.compression values per format ("none"/"uncompressed" = no compression).
PARQUET_CODECS = ("snappy", "zstd", "gzip", "brotli", "lz4", "none")
JSONL_CODECS = {"none": "", "gzip": ".gz", "zstd": ".zst"}
JSONL_SUFFIXES = tuple(".jsonl" + ext for ext in JSONL_CODECS.values())


def _codec(cfg: SinkConfig) -> str:
    codec = (cfg.compression or "none").strip().lower()
    codec = "none" if codec in ("uncompressed", "null", "") else codec
    allowed = PARQUET_CODECS if cfg.format == SinkFormat.parquet else tuple(JSONL_CODECS)
    if codec not in allowed:
        raise SinkError(
            f"sink.compression: {cfg.compression!r} is not available for sink.format={cfg.format.value}; "
            f"allowed: {', '.join(allowed)}"
        )
    return codec


def _file_suffix(cfg: SinkConfig) -> str:
    if cfg.format == SinkFormat.parquet:
        return ".parquet"
    return ".jsonl" + JSONL_CODECS[_codec(cfg)]


def block_digest(ids: Iterable[str]) -> str:
    h = hashlib.blake2b(digest_size=10)
    for i in ids:
        h.update(i.encode())
        h.update(b"\0")
    return h.hexdigest()


def _json_default(value: Any) -> Any:
    """JSON for what Arrow hands back besides str/int/float/bool/list/dict."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        raw = bytes(value)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "base64:" + base64.b64encode(raw).decode("ascii")
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if hasattr(value, "item"):  # numpy / decimal scalars
        return value.item()
    return str(value)


def serialize(table: pa.Table, cfg: SinkConfig) -> bytes:
    """The bytes of one output file."""
    codec = _codec(cfg)
    buf = io.BytesIO()
    if cfg.format == SinkFormat.parquet:
        pq.write_table(table, buf, compression=codec)
        return buf.getvalue()
    lines = "".join(json.dumps(row, ensure_ascii=False, default=_json_default) + "\n" for row in table.to_pylist()).encode()
    if codec == "none":
        return lines
    sink = pa.BufferOutputStream()
    with pa.CompressedOutputStream(sink, codec) as out:
        out.write(lines)
    return sink.getvalue().to_pybytes()


def deserialize(data: bytes, name: str, fmt: SinkFormat, columns: Optional[list[str]] = None) -> pa.Table:
    """One output file back as a table (suffix decides the compression)."""
    if fmt == SinkFormat.parquet:
        return pq.read_table(io.BytesIO(data), columns=columns)
    for codec, ext in JSONL_CODECS.items():
        if ext and name.endswith(".jsonl" + ext):
            data = pa.CompressedInputStream(pa.BufferReader(data), codec).read()
            break
    rows = [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]
    t = pa.Table.from_pylist(rows)
    return t.select(columns) if columns else t


class TableWriter:
    """Atomic writes of Arrow tables into <sink.path>/<table>/ in the configured format."""

    def __init__(self, cfg: SinkConfig):
        from capjob.stages.sources import check_storage_options

        self.cfg = cfg
        try:
            check_storage_options(cfg.storage_options, "sink.storage_options")
        except CapjobError as e:
            raise SinkError(str(e)) from None
        self.codec = _codec(cfg)  # an unknown compression fails here, before anything runs
        self.suffix = _file_suffix(cfg)
        try:
            self.fs, self.root = fsspec.url_to_fs(cfg.path, **cfg.storage_options)
        except (ImportError, ValueError, TypeError) as e:
            raise SinkError(f"sink.path {cfg.path!r}: {e}") from None
        self.local = isinstance(self.fs, fsspec.implementations.local.LocalFileSystem)

    def table_dir(self, table: str) -> str:
        return f"{self.root.rstrip('/')}/{table}"

    def url(self, table: str) -> str:
        return f"{self.cfg.path.rstrip('/')}/{table}"

    def check_writable(self) -> None:
        """Fail before inference when the sink cannot be written (missing bucket, denied,
        unreachable endpoint...): write and delete a probe object, with short timeouts."""
        from capjob.stages.sources import describe_remote_error, probe_filesystem

        try:
            fs, root = probe_filesystem(self.cfg.path, self.cfg.storage_options)
        except CapjobError as e:
            raise SinkError(f"sink.path: {e}") from None
        probe = f"{root.rstrip('/')}/{CAPTIONS}/.capjob-write-probe-{uuid.uuid4().hex}"
        try:
            if self.local:
                # Object stores have no folders (and s3fs.makedirs would create a missing bucket).
                for table in (CAPTIONS, QUARANTINE):
                    fs.makedirs(f"{root.rstrip('/')}/{table}", exist_ok=True)
            fs.pipe_file(probe, b"ok")
            fs.rm_file(probe)
        except Exception as e:  # noqa: BLE001 - s3fs/botocore raise many types
            raise SinkError(f"sink.path: {describe_remote_error(self.cfg.path, e)}") from None

    def write(self, table_name: str, table: pa.Table, stem: str) -> str:
        """Write `table` as <table_name>/<stem><suffix>; returns the file's (protocol-less) path."""
        directory = self.table_dir(table_name)
        final = f"{directory}/{stem}{self.suffix}"
        data = serialize(table, self.cfg)
        if not self.local:
            self.fs.pipe_file(final, data)
            return final
        os.makedirs(directory, exist_ok=True)
        tmp = f"{directory}/.{stem}.{uuid.uuid4().hex}.tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return final

    def list_files(self, table_name: str) -> list[str]:
        """Complete files of one table (any compression of the configured format)."""
        directory = self.table_dir(table_name)
        suffixes = (".parquet",) if self.cfg.format == SinkFormat.parquet else JSONL_SUFFIXES
        try:
            self.fs.invalidate_cache(directory)  # other processes write here
            names = self.fs.ls(directory, detail=False)
        except FileNotFoundError:
            return []
        return sorted(n for n in names if n.rsplit("/", 1)[-1][:1] not in "._" and n.endswith(suffixes))

    def read(self, table_name: str, columns: Optional[list[str]] = None) -> pa.Table:
        """Every complete file of one table (for resume, accounting and tests)."""
        tables = []
        for name in self.list_files(table_name):
            tables.append(deserialize(self.fs.cat_file(name), name, self.cfg.format, columns))
        if not tables:
            return pa.table({c: pa.array([], pa.string()) for c in (columns or ["id"])})
        return pa.concat_tables(tables, promote_options="permissive")


def quarantine_table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist([{k: r.get(k) for k in QUARANTINE_SCHEMA.names} for r in rows], schema=QUARANTINE_SCHEMA)


class CaptionSink(Datasink[dict[str, Any]]):
    """Ray Data sink: each block's rows go to captions, or to quarantine when the engine failed."""

    def __init__(self, cfg: SinkConfig, run_id: str, model_name: str):
        self.cfg = cfg
        self.run_id = run_id
        self.model_name = model_name

    @property
    def min_rows_per_write(self) -> Optional[int]:
        return self.cfg.rows_per_file

    def get_name(self) -> str:
        return f"Captions({self.cfg.format.value})"

    def write(self, blocks: Iterable[Block], ctx: Any) -> dict[str, Any]:
        writer = TableWriter(self.cfg)
        tables = [BlockAccessor.for_block(b).to_arrow() for b in blocks]
        tables = [t for t in tables if t.num_rows]
        stats: dict[str, Any] = {"captioned": 0, "quarantined": 0, "prompt_tokens": 0, "generated_tokens": 0,
                                 "caption_words": [], "caption_tokens": [], "write_events": []}
        if not tables:
            return stats
        table = pa.concat_tables(tables, promote_options="permissive")
        errors = table.column(ERROR_COLUMN).to_pylist() if ERROR_COLUMN in table.column_names else [""] * table.num_rows
        failed = [i for i, e in enumerate(errors) if e]
        ok = [i for i, e in enumerate(errors) if not e]
        stem = f"{self.run_id}-{block_digest(table.column('id').to_pylist())}"
        if ok:
            captions = table.take(ok)
            if ERROR_COLUMN in captions.column_names:
                captions = captions.drop_columns([ERROR_COLUMN])
            writer.write(CAPTIONS, captions, stem)
            stats["captioned"] = len(ok)
            stats["prompt_tokens"] = sum(captions.column("prompt_tokens").to_pylist())
            stats["caption_tokens"] = captions.column("generated_tokens").to_pylist()
            stats["generated_tokens"] = sum(stats["caption_tokens"])
            stats["caption_words"] = [len(c.split()) for c in captions.column("caption").to_pylist()]
        if failed:
            rejected = table.take(failed).to_pylist()
            rows = [
                {"id": r["id"], "source_key": r.get("source_key"), "stage": "engine",
                 "reason": f"engine: {r[ERROR_COLUMN]}"[:2000], "model": self.model_name, "run_id": self.run_id}
                for r in rejected
            ]
            writer.write(QUARANTINE, quarantine_table(rows), stem)
            stats["quarantined"] = len(failed)
        stats["write_events"] = [(time.time(), len(ok))]
        from capjob import metrics

        metrics.record_many(self.run_id, stem, {
            "captioned": stats["captioned"], "generated_tokens": stats["generated_tokens"],
            "prompt_tokens": stats["prompt_tokens"], "rejected:engine": stats["quarantined"],
        })
        return stats

    def on_write_complete(self, write_result: WriteResult[dict[str, Any]]) -> None:
        """Runs on the driver once every block is written: the run's totals."""
        results = write_result.write_returns
        self.totals = {key: sum(r[key] for r in results) for key in ("captioned", "quarantined", "prompt_tokens", "generated_tokens")}
        for key in ("caption_words", "caption_tokens", "write_events"):
            self.totals[key] = [v for r in results for v in r[key]]
