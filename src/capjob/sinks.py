"""Stage: write captions and quarantined rows, streaming, one atomic file per block.

Layout under ``sink.path`` (a local path or any fsspec URL)::

    captions/<run_id>-<block digest>.parquet     one row per captioned image
    quarantine/<run_id>-<block digest>.parquet   one row per rejected image, with stage and reason

File names are a digest of the row ids they hold, so a retried task rewrites the same file
instead of adding a duplicate, and runs never collide. Local files are written under a hidden
temporary name and renamed into place; object stores publish an object only when its upload
completes. Readers (and resume) therefore never see half-written files: names starting with
``.`` or ``_`` are ignored by pyarrow and by ``read_done_ids``.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import time
import uuid
from typing import Any, Iterable, Optional

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from ray.data.block import Block, BlockAccessor
from ray.data.datasource.datasink import Datasink, WriteResult

from capjob.config import SinkConfig, SinkFormat
from capjob.errors import SinkError

CAPTIONS = "captions"
QUARANTINE = "quarantine"
ERROR_COLUMN = "__inference_error__"

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


def _file_suffix(cfg: SinkConfig) -> str:
    if cfg.format == SinkFormat.parquet:
        return ".parquet"
    return ".jsonl.gz" if cfg.compression == "gzip" else ".jsonl"


def block_digest(ids: Iterable[str]) -> str:
    h = hashlib.blake2b(digest_size=10)
    for i in ids:
        h.update(i.encode())
        h.update(b"\0")
    return h.hexdigest()


class TableWriter:
    """Atomic writes of Arrow tables into <sink.path>/<table>/ in the configured format."""

    def __init__(self, cfg: SinkConfig):
        self.cfg = cfg
        try:
            self.fs, self.root = fsspec.url_to_fs(cfg.path, **cfg.storage_options)
        except (ImportError, ValueError) as e:
            raise SinkError(f"sink.path {cfg.path!r}: {e}") from None
        self.local = isinstance(self.fs, fsspec.implementations.local.LocalFileSystem)

    def table_dir(self, table: str) -> str:
        return f"{self.root.rstrip('/')}/{table}"

    def url(self, table: str) -> str:
        return f"{self.cfg.path.rstrip('/')}/{table}"

    def check_writable(self) -> None:
        """Fail before inference when the sink cannot be written (bad bucket, credentials...)."""
        probe = f"{self.table_dir(CAPTIONS)}/.capjob-write-probe-{uuid.uuid4().hex}"
        try:
            self.fs.makedirs(self.table_dir(CAPTIONS), exist_ok=True)
            self.fs.makedirs(self.table_dir(QUARANTINE), exist_ok=True)
            with self.fs.open(probe, "wb") as f:
                f.write(b"ok")
            self.fs.rm(probe)
        except Exception as e:  # noqa: BLE001 - s3fs/botocore raise many types
            from capjob.sources import _describe_remote_error

            raise SinkError(f"sink.path: {_describe_remote_error(self.cfg.path, e)}") from None

    def write(self, table_name: str, table: pa.Table, stem: str) -> str:
        directory = self.table_dir(table_name)
        final = f"{directory}/{stem}{_file_suffix(self.cfg)}"
        target = f"{directory}/.{stem}.{uuid.uuid4().hex}.tmp" if self.local else final
        if self.local:
            self.fs.makedirs(directory, exist_ok=True)
        with self.fs.open(target, "wb") as f:
            if self.cfg.format == SinkFormat.parquet:
                pq.write_table(table, f, compression=self.cfg.compression)
            else:
                lines = "".join(json.dumps(row, default=str) + "\n" for row in table.to_pylist()).encode()
                f.write(gzip.compress(lines) if self.cfg.compression == "gzip" else lines)
        if self.local:
            self.fs.mv(target, final)
        return final

    def list_files(self, table_name: str) -> list[str]:
        directory = self.table_dir(table_name)
        try:
            names = self.fs.ls(directory, detail=False)
        except FileNotFoundError:
            return []
        suffix = _file_suffix(self.cfg)
        return sorted(n for n in names if n.rsplit("/", 1)[-1][:1] not in "._" and n.endswith(suffix))

    def read(self, table_name: str, columns: Optional[list[str]] = None) -> pa.Table:
        """Every complete file of one table (for resume, accounting and tests)."""
        tables = []
        for name in self.list_files(table_name):
            with self.fs.open(name, "rb") as f:
                if self.cfg.format == SinkFormat.parquet:
                    tables.append(pq.read_table(f, columns=columns))
                else:
                    raw = f.read()
                    if name.endswith(".gz"):
                        raw = gzip.decompress(raw)
                    rows = [json.loads(line) for line in raw.decode().splitlines() if line]
                    t = pa.Table.from_pylist(rows)
                    tables.append(t.select(columns) if columns else t)
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
