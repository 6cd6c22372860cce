"""Resume: which rows a sink already holds, and whether this run may add to it.

An id is done once it is in a complete captions or quarantine file (tables.py writes those
atomically). A re-run on the same sink reads the ids back (``read_done_ids``) and the id stage
(stages/ids.py) drops them before any image is decoded, so a crashed run resumes without
redoing or losing rows. The ids travel as sorted 64-bit hashes placed once in Ray's object
store, not as a Python set in every task's arguments (docs/benchmarks.md, "Resume at scale":
20M done ids).

What made a caption is recorded with the run: ``<sink.path>/runs/<run_id>.json`` holds the
fingerprint of every setting that changes a caption (``caption_settings``: model source,
builder and revision, prompts, sampling, ``images.*``, ``engine.max_model_len``...). A run
whose settings differ from those the sink's captions were made with stops in preflight with
one line naming what differs, so a sink never silently mixes captions of two settings:

* ``job.resume=true`` (default): skip the done ids; refuse a sink made with other settings.
* ``job.resume=force``: skip the done ids whatever the settings (the new run's settings are
  recorded next to the old ones).
* ``job.resume=false``: start over: the sink's captions, quarantine rows and fingerprints are
  deleted first (a line says how many files), so no image ends with two captions from two runs.
* ``job.retry_quarantined=[fetch,engine]``: quarantined rows whose stage or reason kind (the
  text before the first ``:``) is listed are not done: this run tries them again, and their
  old quarantine rows are removed from the sink first (rewritten files, atomically replaced).

Why not Ray Data's own ``ray.data.checkpoint.CheckpointConfig`` (Ray 2.58.1; read in
ray/data/checkpoint and ray/data/_internal/planner/checkpoint):

* its filter runs straight after the Read op, on an id column the read output must already
  hold. capjob's ids are derived after the read from the image bytes (stages/ids.py); filtering
  on the source key instead brings back the loss of issue 18 (a duplicate key skips an image).
* it records an id when its row reaches the Write op. Rows the image stage quarantines leave
  the stream before that (they are written by capjob's own task), so every resume would decode
  and reject them again; and for a custom ``Datasink`` such as ``CaptionSink`` (not one of Ray's
  file datasinks) it writes the data first and the checkpoint after: a crash in between writes
  those rows again (at-least-once), where capjob's sink itself is the record (exactly once).
* it loads the ids into one numpy array of the column's type, an object array of Python strings
  for string ids, and asks up to 10 CheckpointFilter actors for max(1 GiB, 1.5 x that size) of
  memory each; capjob's sorted uint64 hashes are 8 bytes an id, shared zero-copy by every task.
  The two side by side with 20M done ids: bench/resume_bench.py, docs/benchmarks.md "Resume at
  scale".
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import os
import pathlib
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

import pyarrow.parquet as pq

from capjob import console
from capjob.config import CapjobConfig, DataConfig, SinkConfig, SinkFormat, SourceFormat
from capjob.errors import ConfigError
from capjob.models import BUILD_VERSIONS, remote
from capjob.schema import CAPTIONS, PENDING, QUARANTINE
from capjob.stages.ids import ID_SCHEME, DoneIds, hash_ids
from capjob.stages.sources.sample import sample_dataset_dir
from capjob.stages.storage import listing_digest
from capjob.stages.tables import TableWriter, as_writer, deserialize

Sink = SinkConfig | TableWriter  # what the functions below take: a sink, or its open TableWriter

RUNS = "runs"
# In RUNS: the last run that left every row of its source in the sink (record_complete).
COMPLETE = "_complete.json"


class ResumeError(ConfigError):
    """The sink holds captions this run must not be mixed with (or resumed from)."""


# --------------------------------------------------------------------------- fingerprint


def model_revision(model_source: str) -> str:
    """What identifies the weights behind `model_source`, cheaply: for a local folder a digest
    of its config files and of each weight file's size, first and last MiB (a retrained
    checkpoint with the same file sizes differs there); for a hub id the commit the local
    Hugging Face cache resolves `main` to, else "unresolved"; for a model on object storage
    (s3://...) a digest of its objects' ETags (models.remote.revision: one listing)."""
    if remote.is_url(model_source):
        try:
            return "etag:" + remote.revision(remote.listing(model_source))
        except Exception:  # noqa: BLE001 - preflight reports an unreadable URL; this is a fingerprint
            return "unresolved"
    path = pathlib.Path(model_source)
    if path.is_dir():
        h = hashlib.sha256()
        for f in sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")):
            size = f.stat().st_size
            h.update(f"{f.name}\0{size}\0".encode())
            with open(f, "rb") as fh:
                if f.suffix in (".json", ".txt", ".jinja") and size <= 4 << 20:
                    h.update(fh.read())
                else:
                    h.update(fh.read(1 << 20))
                    if size > 2 << 20:
                        fh.seek(-(1 << 20), os.SEEK_END)
                        h.update(fh.read())
        return "sha256:" + h.hexdigest()[:16]
    try:
        from huggingface_hub import constants

        ref = pathlib.Path(constants.HF_HUB_CACHE) / f"models--{model_source.replace('/', '--')}" / "refs" / "main"
        return ref.read_text().strip() if ref.is_file() else "unresolved"
    except Exception:  # noqa: BLE001 - no hub library or an unreadable cache: nothing to add
        return "unresolved"


def caption_settings(cfg: CapjobConfig, model_source: str) -> dict[str, Any]:
    """Every setting that changes what caption an image gets (or which id it is filed under),
    flat, with the config key as name. Left out on purpose: layout and speed settings (batch
    sizes, replicas, TP/PP, object store) and the data path (a later run may add new input)."""
    m, e, c, i = cfg.model, cfg.engine, cfg.caption, cfg.images
    return {
        "model.source": m.source,
        "model.builder": m.builder if not m.source else None,
        "model.builder_version": BUILD_VERSIONS.get(m.builder) if m.builder and not m.source else None,
        "model.revision": model_revision(model_source),
        "model.dtype": m.dtype,
        "model.load_format": m.load_format,
        "caption.system_prompt": c.system_prompt,
        "caption.user_prompt": c.user_prompt,
        "caption.temperature": c.temperature,
        "caption.top_p": c.top_p,
        "caption.max_tokens": c.max_tokens,
        "caption.ignore_eos": c.ignore_eos,
        "caption.seed": c.seed,
        # Only when set: the fingerprints of runs from before the option stay as they were.
        **({"caption.text_before_image": True} if c.text_before_image else {}),
        "images.size": i.size,
        "images.resize": i.resize.value,
        "images.max_pixels": i.max_pixels,
        "images.min_side": i.min_side,
        "engine.max_model_len": e.max_model_len,
        "engine.quantization": e.quantization,
        "engine.limit_images_per_prompt": e.limit_images_per_prompt,
        "engine.extra_engine_kwargs": json.dumps(e.extra_engine_kwargs, sort_keys=True, default=str),
        "data.key_column": cfg.data.key_column,
        "data.image_column": cfg.data.image_column,
        "ids.scheme": ID_SCHEME,
    }


def fingerprint(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _short(value: Any, limit: int = 40) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "...\""


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return [f"{k} {_short(old.get(k))} -> {_short(new.get(k))}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def recorded_settings(sink: Sink) -> list[tuple[str, dict[str, Any]]]:
    """(run_id, settings) of every run recorded in the sink, oldest first."""
    writer = as_writer(sink)
    fs = writer.fs
    directory = f"{writer.root.rstrip('/')}/{RUNS}"
    try:
        fs.invalidate_cache(directory)
        names = sorted(n for n in fs.ls(directory, detail=False) if n.endswith(".json") and n.rsplit("/", 1)[-1] != COMPLETE)
    except FileNotFoundError:
        return []
    out = []
    for name in names:
        record = json.loads(fs.cat_file(name))
        out.append((record.get("run_id", name.rsplit("/", 1)[-1][:-5]), record["settings"]))
    return out


def record_settings(sink: Sink, run_id: str, settings: dict[str, Any]) -> None:
    """Write this run's settings next to its captions, before any caption is written."""
    record = {"run_id": run_id, "fingerprint": fingerprint(settings), "settings": settings,
              "started": dt.datetime.now(dt.timezone.utc).isoformat()}
    writer = as_writer(sink)
    directory = f"{writer.root.rstrip('/')}/{RUNS}"
    if writer.local:  # object stores have no folders (and s3fs.makedirs would create a bucket)
        writer.fs.makedirs(directory, exist_ok=True)
    writer.fs.pipe_file(f"{directory}/{run_id}.json", json.dumps(record, indent=1).encode())


def has_rows(sink: Sink) -> bool:
    writer = as_writer(sink)
    return any(writer.list_files(t) for t in (CAPTIONS, QUARANTINE))


def _delete_records(sink: Sink) -> None:
    writer = as_writer(sink)
    fs = writer.fs
    try:
        records = [n for n in fs.ls(f"{writer.root.rstrip('/')}/{RUNS}", detail=False) if n.endswith(".json")]
    except FileNotFoundError:
        records = []
    if records:
        fs.rm(records)


def check_resume(sink: Sink, resume: Any, settings: dict[str, Any], ignore: tuple[str, ...] = ()) -> None:
    """Refuse, in one line, to resume from or add to a sink whose captions were made with other
    settings (job.resume=true), or whose settings are unknown (a sink from an older capjob).
    Reads only (the dry run makes this check too). ignore: settings left out of the comparison
    (a model not built yet has no revision). Raises ResumeError."""
    writer = as_writer(sink)
    sink = writer.cfg
    if resume is not True or not has_rows(writer):  # runs that wrote nothing made no caption to compare with
        return
    recorded = recorded_settings(writer)
    if not recorded:
        raise ResumeError(
            f"job.resume: {sink.path} holds captions without a record of the settings that made them "
            "(written by an older capjob); use another sink.path, job.resume=false to start over, "
            "or job.resume=force to add to it anyway")
    for run_id, old in recorded:
        diff = [d for d in differences(old, settings) if d.split(" ", 1)[0] not in ignore]
        if diff:
            raise ResumeError(
                f"job.resume: {sink.path} holds captions made with other settings (run {run_id}): "
                f"{'; '.join(diff)}; use another sink.path, job.resume=false to start over, "
                "or job.resume=force to add to it anyway")


def start_over(sink: Sink) -> int:
    """job.resume=false: delete the sink's captions, quarantine rows, pending copies
    (stages/dedup) and run records (reports stay). Returns the number of files deleted."""
    writer = as_writer(sink)
    removed = 0
    for table in (CAPTIONS, QUARANTINE, PENDING):  # PENDING: copies a killed run set aside (stages/dedup)
        files = writer.list_files(table)
        if files:
            writer.fs.rm(files)
            removed += len(files)
    _delete_records(writer)
    return removed


# --------------------------------------------------------------------------- done ids


def _retried(table: pa.Table, retry: list[str]) -> pa.Array:
    """Mask of quarantine rows whose stage or reason kind is in `retry`."""
    kind = pc.list_element(pc.split_pattern(table.column("reason"), ":", max_splits=1), 0)
    wanted = pa.array(retry, pa.string())
    return pc.or_(pc.is_in(table.column("stage"), value_set=wanted), pc.is_in(pc.utf8_trim_whitespace(kind), value_set=wanted))


def read_done_ids(sink: Sink, retry_quarantined: Optional[list[str]] = None) -> DoneIds:
    """The ids the sink's captions and quarantine files hold, file by file (the driver never
    holds more than one file's ids as strings), minus quarantined rows to retry."""
    writer = as_writer(sink)
    sink = writer.cfg
    chunks = []
    for table_name in (CAPTIONS, QUARANTINE):
        retry = retry_quarantined if table_name == QUARANTINE else None
        columns = ["id", "stage", "reason"] if retry else ["id"]
        for name in writer.list_files(table_name):
            if sink.format == SinkFormat.parquet:
                with writer.fs.open(name, "rb") as f:
                    table = pq.read_table(f, columns=columns)
            else:
                table = deserialize(writer.fs.cat_file(name), name, sink.format, columns)
            if retry and table.num_rows:
                table = table.filter(pc.invert(_retried(table, retry)))
            ids = table.column("id").drop_null() if table.num_rows else pa.array([], pa.string())
            chunks.append(hash_ids(ids))
    return DoneIds.from_hash_chunks(chunks)


def drop_retried_quarantine(sink: Sink, retry: list[str]) -> int:
    """Remove the quarantine rows this run retries: each file holding some is rewritten without
    them under a new name (atomically) and the old file deleted. Returns the rows removed."""
    if not retry:
        return 0
    writer = as_writer(sink)
    sink = writer.cfg
    removed = 0
    for name in writer.list_files(QUARANTINE):
        table = deserialize(writer.fs.cat_file(name), name, sink.format)
        mask = _retried(table, retry)
        hits = int(pc.sum(mask).as_py() or 0)
        if not hits:
            continue
        kept = table.filter(pc.invert(mask))
        stem = name.rsplit("/", 1)[-1].split(".", 1)[0]
        if kept.num_rows:
            writer.write(QUARANTINE, kept, f"{stem}-kept")
        writer.fs.rm_file(name)
        removed += hits
    return removed


def prepare(cfg: CapjobConfig, run_id: str, model_source: str) -> DoneIds:
    """Preflight of the sink for this run (job.resume, job.retry_quarantined), then record the
    run's settings. Returns the done ids to skip (empty when starting over). One TableWriter
    serves every step."""
    job = cfg.job
    writer = TableWriter(cfg.sink)
    settings = caption_settings(cfg, model_source)
    if job.resume is False:
        removed = start_over(writer)
        if removed:
            console.out(f"job.resume=false: starting over, deleted {removed} caption/quarantine file(s) under {cfg.sink.path}")
        record_settings(writer, run_id, settings)
        return DoneIds(np.empty(0, dtype=np.uint64))
    check_resume(writer, job.resume, settings)
    if not has_rows(writer):
        _delete_records(writer)  # runs that wrote nothing made no caption to compare with
    retried = drop_retried_quarantine(writer, list(job.retry_quarantined))
    if retried:
        console.out(f"job.retry_quarantined: retrying {retried} quarantined row(s) ({', '.join(job.retry_quarantined)})")
    done = read_done_ids(writer, list(job.retry_quarantined))
    record_settings(writer, run_id, settings)
    return done


# --------------------------------------------------------------------------- nothing left, known early


def source_fingerprint(data: DataConfig) -> Optional[str]:
    """What identifies the rows a run of `data` reads, without reading them: every data.* setting
    that selects or keys rows, and a digest of the source's listing (storage.listing_digest).
    None where no listing tells (a hub dataset, an unlistable location): such a source is
    always read to find what is left."""
    if data.format == SourceFormat.sample:
        location = str(sample_dataset_dir(data.sample_size, data.sample_shapes))
    elif data.format == SourceFormat.hf and data.path and "://" not in data.path and not os.path.exists(data.path):
        return None  # a hub id
    else:
        location = data.path or ""
    listing = listing_digest(location, data.storage_options) if location else None
    if listing is None:
        return None
    settings = {k: v for k, v in dataclasses.asdict(data).items() if k not in ("partitions", "partitions_per_worker", "fetch", "name")}
    return fingerprint({"data": settings, "listing": listing})


def sink_digest(sink: Sink) -> str:
    """A digest of the names of the sink's complete captions and quarantine files. Each is
    written once under a new name and never changed in place (tables.py; a retried quarantine
    row rewrites its file under another name), so equal names mean equal rows."""
    writer = as_writer(sink)
    names = [n.rsplit("/", 1)[-1] for table in (CAPTIONS, QUARANTINE) for n in writer.list_files(table)]
    return hashlib.sha256("\n".join(sorted(names)).encode()).hexdigest()[:32]


def record_complete(sink: Sink, run_id: str, source: Optional[str], settings: dict[str, Any], rows: int) -> None:
    """After a run that left every row of its source in the sink (it read the source to its end
    and accounted for every row): the source's fingerprint, taken before the run read it, the
    caption settings and the sink's files as they are now, so that the same command again can
    say "nothing left" before Ray starts (completed_rows). No record without a fingerprint."""
    if source is None:
        return
    writer = as_writer(sink)
    record = {"run_id": run_id, "source": source, "settings": fingerprint(settings), "sink": sink_digest(writer),
              "rows": rows, "written": dt.datetime.now(dt.timezone.utc).isoformat()}
    directory = f"{writer.root.rstrip('/')}/{RUNS}"
    if writer.local:
        writer.fs.makedirs(directory, exist_ok=True)
    writer.fs.pipe_file(f"{directory}/{COMPLETE}", json.dumps(record, indent=1).encode())


def completed_rows(sink: Sink, source: Optional[str], settings: dict[str, Any]) -> Optional[int]:
    """The source's row count when a finished run recorded this very source (same fingerprint),
    these caption settings and the sink as it is now (no file added or removed since); else
    None: what is left is found by reading the source (pipeline.nothing_left)."""
    if source is None:
        return None
    writer = as_writer(sink)
    try:
        record = json.loads(writer.fs.cat_file(f"{writer.root.rstrip('/')}/{RUNS}/{COMPLETE}"))
    except (FileNotFoundError, ValueError):
        return None
    if (record.get("source"), record.get("settings")) != (source, fingerprint(settings)):
        return None
    return int(record["rows"]) if record.get("sink") == sink_digest(writer) else None
