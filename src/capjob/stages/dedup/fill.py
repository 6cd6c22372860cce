"""The fill: once the run's stream has ended, every copy the dedup stage set aside (the run's
``pending`` files) gets its row, joined with its original's by digest.

* original captioned (a ``captions`` row with that ``image_digest`` and no ``duplicate_of``,
  written by this run or an earlier one): the copy's row is written to ``captions`` with the
  original's caption column(s), token counts and model, its own id, source key, sizes,
  pass-through columns and run id, and ``duplicate_of`` = the original's id;
* original quarantined after the engine (engine error, engine crash, unparsable JSON, empty
  caption): the copy is quarantined too, with the original's stage and reason kind (so
  ``job.retry_quarantined`` retries both) and a reason that says so: the copy's own request was
  never sent, the engine failed on the same pixels;
* neither (the original's block was lost: job.max_errored_blocks): quarantined, stage and kind
  ``dedup``; ``job.retry_quarantined=dedup`` captions it next run.

Each pending file's rows are written as ``captions/<pending stem>-copies`` and
``quarantine/<pending stem>-copies`` (atomic files, tables.py), and the pending files are
removed only after all of them. Memory: the originals are looked up in passes of at most
``ORIGINALS_PER_PASS`` digests, each pass reading the sink's digest columns and then only the
files that hold a match.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import pyarrow as pa
import pyarrow.compute as pc

from capjob import metrics
from capjob.config import DedupMode
from capjob.schema import (CAPTIONS, DEDUP_STAGE, DUPLICATE_OF_COLUMN, IMAGE_DIGEST_COLUMN, PENDING, PHASH_COLUMN,
                           QUARANTINE, reason_kind)
from capjob.stages.dedup.claim import COPIES_COUNTER, DISTANCE_COLUMN, ORIGINAL_COLUMN, captioned_mask, file_columns
from capjob.stages.sinks import caption_columns_of, typed_nulls
from capjob.stages.tables import TableWriter, deserialize, quarantine_table

ORIGINALS_PER_PASS = 500_000
# Copies listed per merged group in the report.
GROUP_COPIES = 20


@dataclass
class FillResult:
    copies: int = 0  # rows written to captions with their original's caption
    quarantined: int = 0  # copies quarantined (their original failed, or is missing)
    quarantined_by_kind: dict[str, int] = field(default_factory=dict)
    groups: dict[str, dict[str, Any]] = field(default_factory=dict)  # original id -> its copies (report_groups of them)
    write_events: list[tuple[float, int]] = field(default_factory=list)


def pending_files(writer: TableWriter, run_id: str) -> list[str]:
    return [n for n in writer.list_files(PENDING) if n.rsplit("/", 1)[-1].startswith(f"{run_id}-")]


def passes(writer: TableWriter, files: list[str], per_pass: int) -> list[tuple[list[str], set[str]]]:
    """The pending files in groups whose originals' digests number about `per_pass` at most."""
    out: list[tuple[list[str], set[str]]] = []
    group: list[str] = []
    needed: set[str] = set()
    for name in files:
        needed.update(file_columns(writer, name, [ORIGINAL_COLUMN]).column(ORIGINAL_COLUMN).to_pylist())
        group.append(name)
        if len(needed) >= per_pass:
            out.append((group, needed))
            group, needed = [], set()
    if group:
        out.append((group, needed))
    return out


def find_rows(writer: TableWriter, table_name: str, needed: set[str], captioned: bool) -> dict[str, dict[str, Any]]:
    """digest -> the first row (file order) of `table_name` with that image_digest, for the
    digests in `needed`; captions rows only where captioned themselves (no duplicate_of)."""
    found: dict[str, dict[str, Any]] = {}
    wanted = [IMAGE_DIGEST_COLUMN] + ([DUPLICATE_OF_COLUMN] if captioned else [])
    left = pa.array(sorted(needed), pa.string())
    for name in writer.list_files(table_name):
        if not len(left):
            break
        digests = file_columns(writer, name, wanted)
        if IMAGE_DIGEST_COLUMN not in digests.column_names or not digests.num_rows:
            continue
        mask = pc.is_in(digests.column(IMAGE_DIGEST_COLUMN), value_set=left)
        mask = pc.and_(mask, captioned_mask(digests)) if captioned else pc.fill_null(mask, False)
        if not pc.any(mask).as_py():
            continue
        for row in deserialize(writer.fs.cat_file(name), name, writer.cfg.format).filter(mask).to_pylist():
            found.setdefault(row[IMAGE_DIGEST_COLUMN], row)
        left = pa.array(sorted(needed - set(found)), pa.string())
    return found


def copy_row(pending: dict[str, Any], original: dict[str, Any]) -> dict[str, Any]:
    """A copy's captions row: the original's caption column(s), tokens and model; the rest its own."""
    own = {k: v for k, v in pending.items() if k not in (ORIGINAL_COLUMN, DISTANCE_COLUMN)}
    captions = caption_columns_of(pa.table({k: [None] for k in original}))
    row = {"id": own.pop("id"), "source_key": own.pop("source_key"), **{c: original[c] for c in captions},
           "prompt_tokens": original.get("prompt_tokens"), "generated_tokens": original.get("generated_tokens"),
           "image_width": own.pop("image_width"), "image_height": own.pop("image_height"), "model": original.get("model"),
           "run_id": own.pop("run_id"), IMAGE_DIGEST_COLUMN: own.pop(IMAGE_DIGEST_COLUMN), DUPLICATE_OF_COLUMN: original["id"]}
    if PHASH_COLUMN in own:
        row[PHASH_COLUMN] = own.pop(PHASH_COLUMN)
    row.update(own)  # the copy's pass-through columns
    return row


def failed_row(pending: dict[str, Any], failed: Optional[dict[str, Any]], model_name: str) -> dict[str, Any]:
    """A copy's quarantine row: its original failed after the engine (`failed`: that row), or
    has no row at all (None)."""
    if failed is not None:
        kind = reason_kind(failed["reason"])
        stage, reason = failed["stage"], (f"{kind}: copy of {failed['id']} (same pixels), whose request failed, so this one was "
                                          f"not sent to the engine: {failed['reason']}")
    else:
        stage, reason = DEDUP_STAGE, (f"{DEDUP_STAGE}: copy of image_digest {pending[ORIGINAL_COLUMN]}, whose original has no row "
                                      "in the sink (its block was lost); job.retry_quarantined=dedup captions it")
    return {"id": pending["id"], "source_key": pending["source_key"], "stage": stage, "reason": reason,
            "model": model_name, "run_id": pending["run_id"], IMAGE_DIGEST_COLUMN: pending[IMAGE_DIGEST_COLUMN]}


def note_group(result: FillResult, original: dict[str, Any], pending: dict[str, Any], limit: int) -> None:
    group = result.groups.get(original["id"])
    if group is None:
        if len(result.groups) >= limit:
            return
        group = result.groups[original["id"]] = {"original": original["id"], "source_key": original.get("source_key"),
                                                 "copies": 0, "examples": []}
    group["copies"] += 1
    if len(group["examples"]) < GROUP_COPIES:
        group["examples"].append({"id": pending["id"], "source_key": pending["source_key"],
                                  "distance": int(pending.get(DISTANCE_COLUMN) or 0)})


def fill_copies(writer: TableWriter, run_id: str, sink: Any, model_name: str, report_groups: int = 200,
                per_pass: int = ORIGINALS_PER_PASS) -> FillResult:
    """Write the rows of every copy run `run_id` set aside (module docstring), then remove its
    pending files. sink: the run's CaptionSink (writes the captions rows, sink=txt's .txt files
    too, and types their all-null columns as the source's)."""
    import time

    result = FillResult()
    files = pending_files(writer, run_id)
    for group, needed in passes(writer, files, per_pass):
        originals = find_rows(writer, CAPTIONS, needed, captioned=True)
        failed = find_rows(writer, QUARANTINE, needed - set(originals), captioned=False)
        for name in group:
            stem = name.rsplit("/", 1)[-1].split(".", 1)[0] + "-copies"
            rows, rejected = [], []
            for p in deserialize(writer.fs.cat_file(name), name, writer.cfg.format).to_pylist():
                original = originals.get(p[ORIGINAL_COLUMN])
                if original is None:
                    rejected.append(failed_row(p, failed.get(p[ORIGINAL_COLUMN]), model_name))
                    continue
                rows.append(copy_row(p, original))
                note_group(result, original, p, report_groups)
            counts: dict[str, int] = {}
            if rows:
                sink.write_captions(writer, typed_nulls(pa.Table.from_pylist(rows), sink.column_types), stem)
                result.copies += len(rows)
                result.write_events.append((time.time(), len(rows)))
                counts["captioned"] = len(rows)
            if rejected:
                writer.write(QUARANTINE, quarantine_table(rejected), stem)
                result.quarantined += len(rejected)
                for r in rejected:
                    kind = reason_kind(r["reason"])
                    result.quarantined_by_kind[kind] = result.quarantined_by_kind.get(kind, 0) + 1
                    counts[f"rejected:{kind}"] = counts.get(f"rejected:{kind}", 0) + 1
            metrics.record_many(run_id, stem, counts)
    for name in files:  # only once every copy has its row
        writer.fs.rm_file(name)
    return result


def summary(mode: DedupMode, fill: FillResult, captioned: int, set_aside: int, prompts: int, wall_seconds: float,
            report_groups: int) -> dict[str, Any]:
    """The report's ``dedup`` section. captioned: every captions row the run wrote (copies
    included); set_aside: the copies the dedup stage kept from the engine (ledger count)."""
    distinct = captioned - fill.copies
    groups = sorted(fill.groups.values(), key=lambda g: (-max([e["distance"] for e in g["examples"]] or [0]), g["original"]))
    return {
        "mode": mode.value,
        "distinct_images_captioned": distinct,
        "copies_reused_caption": fill.copies,
        "copies_quarantined": fill.quarantined,
        "copies_set_aside": set_aside,
        # One request per prompt of each copy that never reached the engine.
        "engine_requests_saved": set_aside * prompts,
        "images_per_second": round(captioned / wall_seconds, 3) if wall_seconds else None,
        "distinct_images_per_second": round(distinct / wall_seconds, 3) if wall_seconds else None,
        "groups": groups[:report_groups],
    }


__all__ = ["COPIES_COUNTER", "FillResult", "fill_copies", "pending_files", "summary"]
