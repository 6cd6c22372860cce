"""Stage: give every input row a stable id and skip the ids a previous run already finished.

Open-source Ray Data has no job-level checkpointing, so capjob derives it from its own output:
an id is done once it is in a complete captions or quarantine file (sinks.py writes those
atomically). A re-run with the same sink reads the ids back and filters them out before any
image is decoded, so a crashed run resumes without redoing or losing rows.
"""

from __future__ import annotations

import hashlib
from typing import Any, Optional, Sequence

import numpy as np

from capjob.config import SinkConfig
from capjob import metrics
from capjob.stages.sources.cells import identity
from capjob.sinks import CAPTIONS, QUARANTINE, TableWriter, block_digest


def content_id(data: Optional[bytes]) -> str:
    return "sha1:" + hashlib.sha1(data or b"").hexdigest()


def row_id(key: Any, data: Optional[bytes]) -> str:
    """The source key when the dataset has one, else a hash of the image bytes."""
    if key is not None and str(key) != "":
        return str(key)
    return content_id(data)


def read_done_ids(sink: SinkConfig, retry_quarantined: Sequence[str] = ()) -> frozenset[str]:
    """Ids in the sink's captions and quarantine, except quarantined ids whose stage or reason
    kind (before ':') is in `retry_quarantined` (job.retry_quarantined): those run again."""
    writer = TableWriter(sink)
    done: set[str] = set(i for i in writer.read(CAPTIONS, columns=["id"]).column("id").to_pylist() if i is not None)
    retry = set(retry_quarantined)
    quarantined = writer.read(QUARANTINE, columns=["id", "stage", "reason"] if retry else ["id"])
    if not retry:
        return frozenset(done | {i for i in quarantined.column("id").to_pylist() if i is not None})
    for rid, stage, reason in zip(*(quarantined.column(c).to_pylist() for c in ("id", "stage", "reason"))):
        if rid is not None and stage not in retry and (reason or "").split(":", 1)[0] not in retry:
            done.add(rid)
    return frozenset(done)


def assign_ids(
    batch: dict[str, np.ndarray],
    *,
    image_column: str,
    key_column: Optional[str],
    done_ids: frozenset[str],
    run_id: str,
) -> dict[str, Any]:
    """map_batches UDF: add `id` and `source_key`, drop rows whose id is already done."""
    images = batch[image_column]
    keys = batch[key_column] if key_column else [None] * len(images)
    ids, source_keys, keep = [], [], []
    for key, cell in zip(keys, images):
        data, path = identity(cell)
        if isinstance(key, bytes):
            key = key.decode()
        rid = row_id(key, data if data is not None else (path or "").encode())
        source_key = str(key) if key is not None else (path or rid)
        ids.append(rid)
        source_keys.append(source_key)
        keep.append(rid not in done_ids)
    mask = np.asarray(keep, dtype=bool)
    key = block_digest(ids)
    metrics.record(run_id, "read", key, len(ids))
    metrics.record(run_id, "skipped", key, int((~mask).sum()))
    out = {name: np.asarray(col, dtype=object)[mask] if not isinstance(col, np.ndarray) else col[mask] for name, col in batch.items()}
    out["id"] = np.asarray(ids, dtype=object)[mask]
    out["source_key"] = np.asarray(source_keys, dtype=object)[mask]
    return out
