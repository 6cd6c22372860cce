"""Stage: write captions and quarantined rows, streaming, one atomic file per block.

Layout under ``sink.path`` (a local path or any fsspec URL: ``s3://bucket/prefix``...)::

    captions/<run_id>-<block digest>.parquet     one row per captioned image
    quarantine/<run_id>-<block digest>.parquet   one row per rejected image, with stage and reason

(``.jsonl``, ``.jsonl.gz`` or ``.jsonl.zst`` with ``sink.format=jsonl``; the files are written
and read back by tables.TableWriter.) ``sink.format=txt`` writes
one UTF-8 ``<image stem>.txt`` per captioned image into ``sink.txt_dir`` (default ``<path>/txt``;
names: ``txt_name``) and the parquet files above as its manifest (the rows, with ``txt_file``),
so resume and the report work as for parquet. File names are the run id
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

Credentials come only from the environment / standard AWS configuration (see stages/storage.py);
``sink.storage_options`` holds endpoint and client settings, never secrets.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
import unicodedata
from typing import Any, Iterable, Optional

import pyarrow as pa
from ray.data.block import Block, BlockAccessor
from ray.data.datasource.datasink import Datasink, WriteResult

from capjob import metrics
from capjob.config import SinkConfig, SinkFormat
from capjob.schema import (CAPTION_COLUMN, CAPTIONS, ERROR_COLUMN, IMAGE_DIGEST_COLUMN, QUARANTINE, THUMBNAIL_COLUMN,
                           block_digest, engine_stage, quarantine_reason, row_hash, word_tokens)
from capjob.stages.samples import kept_samples, offer_samples, start_sample_keeper
from capjob.stages.tables import TableWriter, open_filesystem, quarantine_table, txt_dir, write_local_atomic


# --------------------------------------------------------------------------- sink=txt

# Image extensions a key's last part loses to become the .txt stem (sources.IMAGE_EXTENSIONS
# and their common spellings); any other suffix ("a.b") is part of the stem.
STEM_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".jxl", ".avif", ".heic")
# Characters no file name on Linux, macOS, Windows or S3 tools handles well.
_UNSAFE = re.compile(r'[<>:"/\\|?*\x00-\x1f\x7f]')
_MAX_NAME_BYTES = 200  # below the 255-byte limit of common file systems, room for -<hash>.txt


def _strip_scheme(path: str) -> str:
    return re.sub(r"^[A-Za-z][A-Za-z0-9+.-]*://", "", path)


def _safe_part(part: str) -> str:
    part = unicodedata.normalize("NFC", part)
    part = _UNSAFE.sub("_", part).rstrip(" .")
    if part.startswith("."):  # hidden files are skipped by trainers, listings and resume
        part = "_" + part[1:]
    encoded = part.encode("utf-8")
    if len(encoded) > _MAX_NAME_BYTES:
        part = encoded[:_MAX_NAME_BYTES].decode("utf-8", "ignore")
    return part or "_"


def txt_name(source_key: str, data_root: Optional[str] = None) -> str:
    """The .txt path (relative to sink.txt_dir, "/"-separated) for an image's source key.

    * A key under data_root (image_folder: the file's path) keeps its folders relative to it,
      mirroring the input tree ("<root>/dogs/rex.jpg" -> "dogs/rex.txt"); a key that is a path
      elsewhere keeps its folders without the scheme and leading "/" ("s3://b/x/a.png" under
      another root -> "b/x/a.txt"); a plain key is one name ("000123" -> "000123.txt").
    * The last part loses a known image extension (STEM_EXTENSIONS); other dots stay.
    * Each part is NFC-normalised; characters unsafe in file names (<>:"/\\|?* and control
      characters) become "_", a leading "." becomes "_", "." and ".." parts are dropped, parts
      are cut to 200 bytes. When any of that changed the key, "-<8 hex of sha1(key)>" is added
      to the stem, so two keys that clean up to the same text still get two names.
    Two keys with the same stem and different image extensions ("a.jpg", "a.png") share a name:
    CaptionSink reports such collisions (see txt_collisions)."""
    key = str(source_key).replace("\\", "/")
    path = _strip_scheme(key)
    if data_root:
        root = _strip_scheme(data_root).rstrip("/")
        if root and (path == root or path.startswith(root + "/")):
            path = path[len(root):]
        elif root and not re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", data_root) and path.startswith("/"):
            local_root = os.path.abspath(root)
            if path.startswith(local_root + "/"):
                path = path[len(local_root):]
    raw_parts = path.split("/")
    parts = [p for p in raw_parts if p not in ("", ".", "..")]
    if not parts:
        parts = ["_"]
    last = parts[-1]
    lower = last.lower()
    for ext in STEM_EXTENSIONS:
        if lower.endswith(ext) and len(last) > len(ext):
            last = last[: -len(ext)]
            break
    parts[-1] = last
    safe = [_safe_part(p) for p in parts]
    dropped = any(p in (".", "..") for p in raw_parts)
    if safe != parts or dropped:
        safe[-1] = f"{safe[-1]}-{hashlib.sha1(key.encode('utf-8', 'surrogatepass')).hexdigest()[:8]}"
    return "/".join(safe) + ".txt"


def txt_text(caption: Any, prefix: str, suffix: str) -> bytes:
    """The bytes of one .txt: prefix + caption + suffix, verbatim, UTF-8 (no BOM, no newline added)."""
    return f"{prefix}{'' if caption is None else caption}{suffix}".encode("utf-8")


class TxtWriter:
    """Atomic writes of one .txt per image into sink.txt_dir (local: hidden temporary name, then
    rename; object stores: one upload per object, several in flight)."""

    def __init__(self, cfg: SinkConfig):
        self.url = txt_dir(cfg)
        self.fs, self.root, self.local = open_filesystem(self.url, cfg.storage_options, "sink.txt_dir")

    def path(self, name: str) -> str:
        return f"{self.root.rstrip('/')}/{name}"

    def write_all(self, files: dict[str, bytes]) -> None:
        """files: {relative name: bytes}."""
        if not files:
            return
        if not self.local:
            self.fs.pipe({self.path(n): data for n, data in files.items()})
            return
        for name, data in files.items():
            write_local_atomic(self.path(name), data)


def txt_collisions(manifest: pa.Table) -> dict[str, list[str]]:
    """{txt_file: ids} for every .txt name that more than one id was written to (any run of
    this sink), from the manifest's id and txt_file columns."""
    if manifest.num_rows == 0 or "txt_file" not in manifest.column_names:
        return {}
    grouped = pa.table({"txt_file": manifest.column("txt_file"), "id": manifest.column("id")}).group_by("txt_file").aggregate(
        [("id", "distinct")])
    return {name: sorted(ids) for name, ids in zip(grouped.column("txt_file").to_pylist(), grouped.column("id_distinct").to_pylist())
            if len(ids) > 1}


def caption_columns_of(table: pa.Table) -> list[str]:
    """The caption column(s) of an output table: `caption`, else every `caption_<name>`."""
    if CAPTION_COLUMN in table.column_names:
        return [CAPTION_COLUMN]
    return [c for c in table.column_names if c.startswith(CAPTION_COLUMN + "_")]


def typed_nulls(table: pa.Table, column_types: dict[str, pa.DataType]) -> pa.Table:
    """A block whose pass-through column holds no value at all reaches the sink as Arrow's null
    type; written so, that file's schema would differ from the others' and the sink's files
    could not be read together. Such a column takes the source's type (string where unknown)."""
    for i, field in enumerate(table.schema):
        if pa.types.is_null(field.type):
            table = table.set_column(i, field.name, table.column(i).cast(column_types.get(field.name, pa.string())))
    return table


def _node_id() -> str:
    """The Ray node this task runs on (hex id), "" outside Ray."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    except Exception:  # noqa: BLE001 - informative only
        return ""


class CaptionSink(Datasink[dict[str, Any]]):
    """Ray Data sink: each block's rows go to captions, or to quarantine when the engine (or the
    JSON parse) failed; with sink=txt, captioned rows also get their .txt, written before the
    manifest file that marks them done."""

    def __init__(self, cfg: SinkConfig, run_id: str, model_name: str, caption: Any = None, data_root: Optional[str] = None,
                 column_types: Optional[dict[str, pa.DataType]] = None):
        self.cfg = cfg
        # The source's types of the pass-through columns, where the reader knew them up front.
        self.column_types = column_types or {}
        self.run_id = run_id
        self.model_name = model_name
        self.prefix = getattr(caption, "prefix", "") or ""
        self.suffix = getattr(caption, "suffix", "") or ""
        self.txt_column = cfg.txt_column
        self.data_root = data_root

    @property
    def min_rows_per_write(self) -> Optional[int]:
        return self.cfg.rows_per_file

    def get_name(self) -> str:
        return f"Captions({self.cfg.format.value})"

    def _write_txt(self, captions: pa.Table) -> pa.Table:
        column = self.txt_column or caption_columns_of(captions)[0]
        names = [txt_name(k, self.data_root) for k in captions.column("source_key").to_pylist()]
        files: dict[str, bytes] = {}
        for name, text in zip(names, captions.column(column).to_pylist()):
            files[name] = txt_text(text, self.prefix, self.suffix)
        TxtWriter(self.cfg).write_all(files)
        return captions.append_column("txt_file", pa.array(names, pa.string()))

    def write_captions(self, writer: TableWriter, captions: pa.Table, stem: str) -> pa.Table:
        """Write captioned rows as captions/<stem> (sink=txt: their .txt files first, then the
        manifest with ``txt_file``); returns the table as written. The copies' rows of
        stages/dedup are written by this too."""
        if self.cfg.format == SinkFormat.txt:
            captions = self._write_txt(captions)
        writer.write(CAPTIONS, captions, stem)
        return captions

    def write(self, blocks: Iterable[Block], ctx: Any) -> dict[str, Any]:
        writer = TableWriter(self.cfg)
        tables = [BlockAccessor.for_block(b).to_arrow() for b in blocks]
        tables = [t for t in tables if t.num_rows]
        stats: dict[str, Any] = {"captioned": 0, "quarantined": 0, "prompt_tokens": 0, "generated_tokens": 0,
                                 "caption_words": [], "caption_tokens": [], "write_events": [], "samples": [],
                                 "quarantined_by_kind": {}}
        if not tables:
            return stats
        table = pa.concat_tables(tables, promote_options="permissive")
        errors = table.column(ERROR_COLUMN).to_pylist() if ERROR_COLUMN in table.column_names else [""] * table.num_rows
        thumbnails = table.column(THUMBNAIL_COLUMN).to_pylist() if THUMBNAIL_COLUMN in table.column_names else [None] * table.num_rows
        table = table.drop_columns([c for c in (ERROR_COLUMN, THUMBNAIL_COLUMN) if c in table.column_names])
        table = typed_nulls(table, self.column_types)
        failed = [i for i, e in enumerate(errors) if e]
        ok = [i for i, e in enumerate(errors) if not e]
        stem = f"{self.run_id}-{block_digest(table.column('id').to_pylist())}"
        now = time.time()
        if ok:
            captions = self.write_captions(writer, table.take(ok), stem)
            text_columns = caption_columns_of(captions)
            stats["captioned"] = len(ok)
            stats["prompt_tokens"] = sum(captions.column("prompt_tokens").to_pylist())
            stats["caption_tokens"] = captions.column("generated_tokens").to_pylist()
            stats["generated_tokens"] = sum(stats["caption_tokens"])
            # The one word counter (schema.word_tokens): the report and the evaluation agree.
            stats["caption_words"] = [len(word_tokens(c or "")) for c in captions.column(text_columns[0]).to_pylist()]
            texts = {c: captions.column(c).to_pylist() for c in text_columns}
            keys = captions.column("source_key").to_pylist()
            ids = captions.column("id").to_pylist()
            # A true caption passed through (dataset=sample's `reference`): the console marks each shown caption against it.
            refs = captions.column("reference").to_pylist() if "reference" in captions.column_names else [None] * len(ok)
            samples = [{"time": now, "hash": row_hash(ids[j]), "id": ids[j], "source_key": keys[j],
                        "captions": {c: texts[c][j] for c in text_columns}, "reference": refs[j], "thumbnail": thumbnails[i]}
                       for j, i in enumerate(ok) if thumbnails[i]]

            stats["samples"] = offer_samples(self.run_id, samples)
        if failed:
            rejected = table.take(failed)
            rows = [
                {"id": r["id"], "source_key": r.get("source_key"), "stage": engine_stage(quarantine_reason(errors[i])),
                 "reason": quarantine_reason(errors[i]), "model": self.model_name, "run_id": self.run_id,
                 IMAGE_DIGEST_COLUMN: r.get(IMAGE_DIGEST_COLUMN)}
                for i, r in zip(failed, rejected.to_pylist())
            ]
            writer.write(QUARANTINE, quarantine_table(rows), stem)
            stats["quarantined"] = len(failed)
            for r in rows:
                kind = r["reason"].split(":", 1)[0]
                stats["quarantined_by_kind"][kind] = stats["quarantined_by_kind"].get(kind, 0) + 1
        stats["write_events"] = [(now, len(ok))]
        # Which node wrote how many rows: on a cluster, the report shows the writes spread out.
        stats["write_nodes"] = {_node_id(): table.num_rows}
        metrics.record_many(self.run_id, stem, {
            "captioned": stats["captioned"], "generated_tokens": stats["generated_tokens"],
            "prompt_tokens": stats["prompt_tokens"],
            **{f"rejected:{kind}": n for kind, n in stats["quarantined_by_kind"].items()},
        })
        return stats

    def on_write_start(self, schema: Any = None) -> None:
        # the handle keeps the actor alive; on the driver's node, which outlives the job's workers
        self._keeper = start_sample_keeper(self.run_id, **metrics.on_driver_node())

    def on_write_complete(self, write_result: WriteResult[dict[str, Any]]) -> None:
        """Runs on the driver once every block is written: the run's totals (and, for sink=txt,
        the .txt names more than one image was written to, over every run of this sink)."""
        results = write_result.write_returns
        self.totals = {key: sum(r[key] for r in results) for key in ("captioned", "quarantined", "prompt_tokens", "generated_tokens")}
        for key in ("caption_words", "caption_tokens", "write_events", "samples"):
            self.totals[key] = [v for r in results for v in r[key]]
        self.totals["write_nodes"] = {}
        for r in results:
            for node, rows in r.get("write_nodes", {}).items():
                self.totals["write_nodes"][node] = self.totals["write_nodes"].get(node, 0) + rows

        self.totals["samples"] = kept_samples(self.run_id, self.totals["samples"])
        if self.cfg.format == SinkFormat.txt:
            collisions = txt_collisions(TableWriter(self.cfg).read(CAPTIONS, columns=["id", "txt_file"]))
            self.totals["txt_collisions"] = collisions
            if collisions:
                logging.getLogger(__name__).warning(
                    "sink=txt: %d .txt name(s) were written for more than one image (same stem, another extension or "
                    "folder?); each holds one of their captions, all captions are in %s. First: %s",
                    len(collisions), TableWriter(self.cfg).url(CAPTIONS), next(iter(collisions.items())))
