"""The output store: the captions and quarantine tables of a sink, written and read back.

Layout under ``sink.path`` (a local path or any fsspec URL: ``s3://bucket/prefix``...)::

    captions/<run_id>-<block digest>.parquet     one row per captioned image
    quarantine/<run_id>-<block digest>.parquet   one row per rejected image, with stage and reason

(``.jsonl``, ``.jsonl.gz`` or ``.jsonl.zst`` with ``sink.format=jsonl``; ``sink.format=txt`` keeps
these tables in parquet as its manifest.) Every file is serialised in memory first; a local file
is then written under a hidden temporary name and renamed into place, a remote one is uploaded
in one request (an object store publishes an object only when its upload completes). Readers
(resume, the reports, the evaluation) therefore never see half-written files: names starting
with ``.`` or ``_`` are ignored by pyarrow and by ``TableWriter.list_files``.

The write stage (sinks.py), resume (resume.py) and the reports (reporting/) all go through
TableWriter; one is opened per sink and reused.
"""

from __future__ import annotations

import base64
import datetime as dt
import io
import json
import os
import uuid
from typing import Any, Optional

import fsspec
import fsspec.implementations.local
import pyarrow as pa
import pyarrow.parquet as pq

from capjob.config import SinkConfig, SinkFormat
from capjob.errors import CapjobError, SinkError
from capjob.schema import CAPTIONS, QUARANTINE
from capjob.stages.storage import check_storage_options, describe_remote_error, probe_filesystem

QUARANTINE_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("source_key", pa.string()),
        ("stage", pa.string()),
        ("reason", pa.string()),
        ("model", pa.string()),
        ("run_id", pa.string()),
        # schema.IMAGE_DIGEST_COLUMN of a row the engine failed (null for image rejects): the copies
        # of that image (stages/dedup) are quarantined with its reason.
        ("image_digest", pa.string()),
    ]
)


# sink.compression values per format ("none"/"uncompressed" = no compression).
PARQUET_CODECS = ("snappy", "zstd", "gzip", "brotli", "lz4", "none")


JSONL_CODECS = {"none": "", "gzip": ".gz", "zstd": ".zst"}


JSONL_SUFFIXES = tuple(".jsonl" + ext for ext in JSONL_CODECS.values())


def table_format(cfg: SinkConfig) -> SinkFormat:
    """The format of the captions/quarantine tables: sink=txt keeps them in parquet (manifest)."""
    return SinkFormat.jsonl if cfg.format == SinkFormat.jsonl else SinkFormat.parquet


def _codec(cfg: SinkConfig) -> str:
    codec = (cfg.compression or "none").strip().lower()
    codec = "none" if codec in ("uncompressed", "null", "") else codec
    allowed = PARQUET_CODECS if table_format(cfg) == SinkFormat.parquet else tuple(JSONL_CODECS)
    if codec not in allowed:
        raise SinkError(
            f"sink.compression: {cfg.compression!r} is not available for sink.format={cfg.format.value}; "
            f"allowed: {', '.join(allowed)}"
        )
    return codec


def _file_suffix(cfg: SinkConfig) -> str:
    if table_format(cfg) == SinkFormat.parquet:
        return ".parquet"
    return ".jsonl" + JSONL_CODECS[_codec(cfg)]


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
    if table_format(cfg) == SinkFormat.parquet:
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
    if fmt != SinkFormat.jsonl:
        return pq.read_table(io.BytesIO(data), columns=columns)
    for codec, ext in JSONL_CODECS.items():
        if ext and name.endswith(".jsonl" + ext):
            data = pa.CompressedInputStream(pa.BufferReader(data), codec).read()
            break
    rows = [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]
    t = pa.Table.from_pylist(rows)
    return t.select(columns) if columns else t


def write_local_atomic(final: str, data: bytes) -> None:
    """A local file appears whole or not at all: written and fsynced under a hidden temporary
    name in its folder (created if needed), then renamed into place."""
    directory, base = os.path.split(final)
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{base}.{uuid.uuid4().hex}.tmp")
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


def write_atomic(fs: Any, path: str, data: bytes) -> None:
    """A whole file at `path` on `fs` or none: a local one through write_local_atomic; on object
    storage one PUT (an object appears whole, S3's and GCS's rule), a rewrite replacing it."""
    if isinstance(fs, fsspec.implementations.local.LocalFileSystem):
        write_local_atomic(path, data)
    else:
        fs.pipe_file(path, data)


def txt_dir(cfg: SinkConfig) -> str:
    return cfg.txt_dir or f"{cfg.path.rstrip('/')}/txt"


def open_filesystem(url: str, storage_options: dict[str, Any], key: str) -> tuple[Any, str, bool]:
    """(fsspec filesystem, root path, whether it is local) of an output URL. Raises SinkError
    naming `key` for a URL fsspec cannot open (unknown protocol, missing driver, bad options)."""
    try:
        fs, root = fsspec.url_to_fs(url, **storage_options)
    except (ImportError, ValueError, TypeError) as e:
        raise SinkError(f"{key} {url!r}: {e}") from None
    return fs, root, isinstance(fs, fsspec.implementations.local.LocalFileSystem)


class TableWriter:
    """Atomic writes of Arrow tables into <sink.path>/<table>/ in the configured format."""

    def __init__(self, cfg: SinkConfig):
        self.cfg = cfg
        try:
            check_storage_options(cfg.storage_options, "sink.storage_options")
        except CapjobError as e:
            raise SinkError(str(e)) from None
        self.codec = _codec(cfg)  # an unknown compression fails here, before anything runs
        self.suffix = _file_suffix(cfg)
        self.fs, self.root, self.local = open_filesystem(cfg.path, cfg.storage_options, "sink.path")

    def table_dir(self, table: str) -> str:
        return f"{self.root.rstrip('/')}/{table}"

    def url(self, table: str) -> str:
        return f"{self.cfg.path.rstrip('/')}/{table}"

    def check_writable(self) -> None:
        """Fail before inference when the sink cannot be written (missing bucket, denied,
        unreachable endpoint...): write and delete a probe object, with short timeouts."""
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
        if self.cfg.format == SinkFormat.txt:
            url = txt_dir(self.cfg)
            try:
                fs, root = probe_filesystem(url, self.cfg.storage_options)
                probe = f"{root.rstrip('/')}/.capjob-write-probe-{uuid.uuid4().hex}"
                if isinstance(fs, fsspec.implementations.local.LocalFileSystem):
                    fs.makedirs(root, exist_ok=True)
                fs.pipe_file(probe, b"ok")
                fs.rm_file(probe)
            except CapjobError as e:
                raise SinkError(f"sink.txt_dir: {e}") from None
            except Exception as e:  # noqa: BLE001
                raise SinkError(f"sink.txt_dir: {describe_remote_error(url, e)}") from None

    def write(self, table_name: str, table: pa.Table, stem: str) -> str:
        """Write `table` as <table_name>/<stem><suffix>; returns the file's (protocol-less) path."""
        directory = self.table_dir(table_name)
        final = f"{directory}/{stem}{self.suffix}"
        data = serialize(table, self.cfg)
        if not self.local:
            self.fs.pipe_file(final, data)
            return final
        write_local_atomic(final, data)
        return final

    def list_files(self, table_name: str) -> list[str]:
        """Complete files of one table (any compression of the configured format)."""
        directory = self.table_dir(table_name)
        suffixes = (".parquet",) if table_format(self.cfg) == SinkFormat.parquet else JSONL_SUFFIXES
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


def as_writer(sink: "SinkConfig | TableWriter") -> "TableWriter":
    """`sink`'s TableWriter: the one given, or a new one for a SinkConfig."""
    return sink if isinstance(sink, TableWriter) else TableWriter(sink)


# The longest reason a quarantine row keeps (characters): an engine's error can carry a whole
# traceback; the kind and its first lines are what a person and job.retry_quarantined read.
MAX_REASON_CHARS = 2000


def quarantine_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Quarantine rows (dicts with QUARANTINE_SCHEMA's keys; a missing one is null) as a table of
    that schema, each reason cut to MAX_REASON_CHARS."""
    rows = [{**r, "reason": r["reason"][:MAX_REASON_CHARS]} if r.get("reason") else r for r in rows]
    return pa.Table.from_pylist([{k: r.get(k) for k in QUARANTINE_SCHEMA.names} for r in rows], schema=QUARANTINE_SCHEMA)
