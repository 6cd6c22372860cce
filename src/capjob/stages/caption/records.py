"""Stage: the caption records (Ray Data LLM's postprocess): every row the engine returns,
answered or failed, projected to the output schema (schema.py); in a multi-prompt run, the
request rows of each image regrouped into one row.

An engine failure, an answer that does not parse against its JSON schema ("json: ...",
"json_schema: ...") or an empty caption sets ERROR_COLUMN; the sink quarantines such rows
with schema.quarantine_reason.
"""

from __future__ import annotations

import json
from typing import Any, Optional

import jsonschema
import pyarrow as pa

from capjob.prompts import prompt_specs
from capjob.schema import (CAPTION_COLUMN, DATA_COLUMN, DUPLICATE_OF_COLUMN, EMPTY_CAPTION, ERROR_COLUMN, GROUP_COLUMN,
                           IMAGE_DIGEST_COLUMN, PHASH_COLUMN, PROMPT_COLUMN, THUMBNAIL_COLUMN, missing_as_none,
                           quarantine_reason)


def _parse_json(text: str, schema: dict[str, Any]) -> tuple[Optional[str], str]:
    """(the parsed object as compact JSON text, "") or (None, "json: <parser message>")."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        return None, f"json: {e}"
    try:
        jsonschema.validate(value, schema)
    except jsonschema.ValidationError as e:
        return None, f"json_schema: {e.message}"
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")), ""


class CaptionRecord:
    """postprocess for every row, successful or failed: project to the output schema. An engine
    failure (its message) or an answer that does not parse against its JSON schema ("json: ...",
    "json_schema: ...") sets ERROR_COLUMN (see quarantine_reason). In a multi-prompt run
    a row is one request; RegroupPrompts makes one row per image of them."""

    def __init__(self, model_name: str, run_id: str, passthrough_columns: list[str], caption: Any):
        self.model_name = model_name
        self.run_id = run_id
        self.passthrough_columns = passthrough_columns
        specs = prompt_specs(caption)
        self.schemas = {spec.name: spec.json_schema for spec in specs}
        self.multi = specs[0].name is not None

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        data = row[DATA_COLUMN]
        name = data.get(PROMPT_COLUMN)
        text = data.get("generated_text") or ""
        error = data.get(ERROR_COLUMN) or ""
        schema = self.schemas.get(name)
        if schema is not None and not error:
            parsed, error = _parse_json(text, schema)
            text = parsed if parsed is not None else text
        if not error and not text.strip():
            error = EMPTY_CAPTION
        out = {
            "id": data["id"],
            "source_key": data["source_key"],
            CAPTION_COLUMN: text,
            "prompt_tokens": int(data.get("num_input_tokens") or 0),
            "generated_tokens": int(data.get("num_generated_tokens") or 0),
            "image_width": int(data["image_width"]),
            "image_height": int(data["image_height"]),
            "model": self.model_name,
            "run_id": self.run_id,
            IMAGE_DIGEST_COLUMN: data.get(IMAGE_DIGEST_COLUMN),
            DUPLICATE_OF_COLUMN: None,  # captioned by the engine: no copy (stages/dedup fills copies)
            **({PHASH_COLUMN: data[PHASH_COLUMN]} if data.get(PHASH_COLUMN) is not None else {}),
            ERROR_COLUMN: error,
            THUMBNAIL_COLUMN: data.get(THUMBNAIL_COLUMN),
        }
        if self.multi:
            out[PROMPT_COLUMN] = name
            out[GROUP_COLUMN] = data[GROUP_COLUMN]
        for column in self.passthrough_columns:
            out[column] = missing_as_none(data.get(column))
        return out


def merge_requests(parts: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    """One output row from the request rows of one image (one per prompt, any order): a
    `caption_<name>` column per prompt, token counts summed, the failures joined (any failure
    quarantines the image), the thumbnail from whichever part has it."""
    by_name = {p[PROMPT_COLUMN]: p for p in parts}
    first = by_name[names[0]]
    out = {k: v for k, v in first.items() if k not in (CAPTION_COLUMN, PROMPT_COLUMN, GROUP_COLUMN)}
    for name in names:
        out[f"{CAPTION_COLUMN}_{name}"] = by_name[name][CAPTION_COLUMN]
    # Ordered like a single-prompt row: the captions right after source_key.
    ordered = {"id": out.pop("id"), "source_key": out.pop("source_key")}
    ordered.update({f"{CAPTION_COLUMN}_{n}": out.pop(f"{CAPTION_COLUMN}_{n}") for n in names})
    ordered.update(out)
    ordered["prompt_tokens"] = sum(p["prompt_tokens"] for p in parts)
    ordered["generated_tokens"] = sum(p["generated_tokens"] for p in parts)
    reasons = [(n, quarantine_reason(by_name[n][ERROR_COLUMN])) for n in names if by_name[n][ERROR_COLUMN]]
    # The first reason's kind ("engine", "json"...) leads, for the report's counts.
    ordered[ERROR_COLUMN] = (reasons[0][1].split(":", 1)[0] + ": " + "; ".join(f"prompt {n}: {r}" for n, r in reasons)) if reasons else ""
    ordered[THUMBNAIL_COLUMN] = next((p[THUMBNAIL_COLUMN] for p in parts if p.get(THUMBNAIL_COLUMN)), None)
    return ordered


class RegroupPrompts:
    """Ray Data actor (one per run) after the processor of a multi-prompt run: collects the
    request rows of each image, which the engine returns in completion order and in any block,
    and emits one row per image once all its prompts are in. It holds only the images still in
    flight. Should the actor die, the requests it held are lost: the run's accounting then fails
    loudly and the next run (resume) captions those images again."""

    def __init__(self, names: list[str]):
        self.names = names
        self.pending: dict[str, list[dict[str, Any]]] = {}

    def __call__(self, batch: Any) -> Any:
        out = []
        for row in batch.to_pylist():
            parts = self.pending.setdefault(row[GROUP_COLUMN], [])
            parts.append(row)
            if len(parts) == len(self.names):
                out.append(merge_requests(self.pending.pop(row[GROUP_COLUMN]), self.names))
        return pa.Table.from_pylist(out)
