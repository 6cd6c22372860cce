"""A run's totals read back after (or while) it ran: what it wrote (from its files in the sink,
each named <run_id>-<digest>), the ids it wrote twice, the engine deaths its crash ledger saw,
when its engines were up, and the few captions the console shows.

Used by the pipeline's finish (the report) and after Ctrl-C (the partial report), when the
sink's own totals never arrived.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import pyarrow as pa
import ray

from capjob.config import SinkConfig
from capjob.schema import CAPTIONS, ENGINE_STAGES, QUARANTINE, word_tokens
from capjob.stages import ids
from capjob.stages.tables import TableWriter, deserialize


def engine_ready_at() -> Optional[float]:
    """When the last of this job's Ray Data actors (engine replicas, CPU-stage actors) finished
    starting: the GCS sets an actor's start time once its constructor, here vLLM's start-up,
    has returned. Unix seconds; None where the actor table cannot tell (best effort)."""
    try:
        job_id = ray.get_runtime_context().get_job_id()
        times = [a["StartTime"] / 1000 for a in ray._private.state.actors().values()
                 if "MapWorker" in (a.get("ActorClassName") or "") and a.get("JobID") == job_id and a.get("StartTime")]
    except Exception:  # noqa: BLE001 - a private API: no marker rather than no report
        return None
    return max(times) if times else None


def totals_from_sink(sink: SinkConfig, run_id: str, writer: Optional[TableWriter] = None) -> dict[str, Any]:
    """The write totals of a run that never reached on_write_complete (interrupted), rebuilt
    from the files it wrote: each write is one file named <run_id>-<digest>, atomic."""
    writer = writer or TableWriter(sink)
    totals: dict[str, Any] = {"captioned": 0, "quarantined": 0, "prompt_tokens": 0, "generated_tokens": 0,
                              "caption_words": [], "caption_tokens": [], "write_events": []}
    for table_name in (CAPTIONS, QUARANTINE):
        for name in writer.list_files(table_name):
            if not name.rsplit("/", 1)[-1].startswith(f"{run_id}-"):
                continue
            table = deserialize(writer.fs.cat_file(name), name, sink.format)
            if table_name == QUARANTINE:
                totals["quarantined"] += sum(1 for s in table.column("stage").to_pylist() if s in ENGINE_STAGES)
                continue
            tokens = table.column("generated_tokens").to_pylist()
            totals["captioned"] += table.num_rows
            totals["prompt_tokens"] += sum(table.column("prompt_tokens").to_pylist())
            totals["generated_tokens"] += sum(tokens)
            totals["caption_tokens"] += tokens
            totals["caption_words"] += [len(word_tokens(c)) for c in table.column("caption").to_pylist()]
            mtime = writer.fs.modified(name).timestamp() if not writer.local else os.path.getmtime(name)
            totals["write_events"].append((mtime, table.num_rows))
    return totals


def engine_crash_summary(crashes: Any) -> dict[str, Any]:
    """stages.engine_guard.CrashLedger.summary of the run ({} when there is no ledger)."""
    if crashes is None:
        return {}
    try:
        return ray.get(crashes.summary.remote(), timeout=30)
    except Exception:  # noqa: BLE001 - after Ctrl-C the ledger may be gone with Ray's workers
        return {}


SAMPLE_CAPTIONS = 3


def sample_captions(samples: list[dict[str, Any]], captioned: int) -> str:
    """A few captions for the console, rows with a known true caption (`reference`) first,
    each marked right or wrong against it."""
    if not samples:
        return ""
    chosen = sorted(samples, key=lambda r: r.get("reference") is None)[:SAMPLE_CAPTIONS]
    lines = [f"sample captions ({len(chosen)} of {captioned}):"]
    for r in chosen:
        text = next(iter(r["captions"].values()), "") or ""
        mark = "" if r.get("reference") is None else ("  [= reference]" if text.strip() == r["reference"] else
                                                      f"  [reference: {r['reference']}]")
        caption = " ".join(text.split())
        lines.append(f"  {str(r.get('source_key'))[-32:]:<32} {caption[:100]}{mark}")
    return "\n".join(lines)


def run_duplicates(sink: SinkConfig, run_id: str, writer: Optional[TableWriter] = None) -> dict[str, Any]:
    """stages/ids.duplicates over the rows this run wrote (its files start with its run id)."""
    writer = writer or TableWriter(sink)
    tables = [
        deserialize(writer.fs.cat_file(name), name, sink.format, ["id", "source_key"])
        for table in (CAPTIONS, QUARANTINE)
        for name in writer.list_files(table) if name.rsplit("/", 1)[-1].startswith(f"{run_id}-")
    ]
    empty = pa.table({"id": pa.array([], pa.string()), "source_key": pa.array([], pa.string())})
    return ids.duplicates(pa.concat_tables(tables, promote_options="permissive") if tables else empty)
