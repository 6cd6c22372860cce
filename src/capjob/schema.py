"""The row contract every stage shares: column names, table names, quarantine reasons.

A leaf module (standard library only): sources, the image stage, the caption stages, the sinks
and the reports import these names from here rather than from each other, so no stage reaches
up or sideways for a name. The shapes:

- an output row (``captions`` table): ``id``, ``source_key``, ``caption`` (or one
  ``caption_<name>`` per entry of ``caption.prompts``), ``prompt_tokens``, ``generated_tokens``,
  ``image_width``, ``image_height``, ``model``, ``run_id``, ``image_digest``, ``duplicate_of``
  (stages/dedup: the id whose caption a copy carries, null for a captioned image), with
  ``dedup.mode=perceptual`` ``image_phash``, then the pass-through columns;
- a quarantine row (``quarantine`` table): ``id``, ``source_key``, ``stage``, ``reason``,
  ``model``, ``run_id``, ``image_digest`` (null for an image reject), where ``reason`` reads ``<kind>: <detail>`` and ``stage`` is ``image``
  or one of ``ENGINE_STAGES``.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any, Iterable

# --- tables of a sink (<sink.path>/<table>/...) -------------------------------------------------
CAPTIONS = "captions"
QUARANTINE = "quarantine"
# Copies waiting for their original's caption (stages/dedup): written by the dedup stage, read
# and removed by the run's fill once its stream has ended.
PENDING = "pending"

# --- columns ------------------------------------------------------------------------------------
CAPTION_COLUMN = "caption"
# The columns every output row has besides its caption column(s) (caption/records.py): a
# pass-through column of one of these names would be overwritten (config.validate refuses it).
ROW_COLUMNS = ("id", "source_key", "prompt_tokens", "generated_tokens", "image_width", "image_height", "model", "run_id",
               "image_digest", "duplicate_of", "image_phash")
# The digest of the pixels the engine gets (stages/ids.pixel_digest: 32 hex of BLAKE2b-128), the
# id of the row whose caption a copy carries (null: captioned itself), and with
# dedup.mode=perceptual the image's 64-bit perceptual hash (16 hex).
IMAGE_DIGEST_COLUMN = "image_digest"
DUPLICATE_OF_COLUMN = "duplicate_of"
PHASH_COLUMN = "image_phash"
# Ray Data LLM's failed-row column (ray.llm's vLLMEngineStage, should_continue_on_error) and the
# column its Processor keeps each row's working data in (ray.llm Processor.DATA_COLUMN).
ERROR_COLUMN = "__inference_error__"
DATA_COLUMN = "__data"
# Per-request columns of a multi-prompt run: the prompt's name, and a token unique to the image
# row (ids may repeat in a dataset; the token never does) by which its requests are regrouped.
PROMPT_COLUMN = "__prompt"
GROUP_COLUMN = "__group"
# A small JPEG of the image for the run's contact sheet, set on a sample of rows only; the sink
# takes it out of the row.
THUMBNAIL_COLUMN = "__thumbnail"
# About this many rows per run carry a thumbnail (when the row count is known); the contact
# sheet keeps the THUMBNAIL_CANDIDATES of smallest id hash and shows 16 of them.
THUMBNAIL_CANDIDATES = 256

# --- quarantine reasons ("<kind>: <detail>") -----------------------------------------------------
# The one vocabulary of reason kinds (job.retry_quarantined takes these and the stages):
# kinds the image stage (and the cell resolution before it) sets, as ImageRejected's kind ...
IMAGE_REASON_KINDS = ("empty", "unsupported", "fetch", "hash_mismatch", "not_an_image", "decode", "too_large", "aspect_ratio")
# ... and kinds set after the engine; anything else in ERROR_COLUMN is the engine's own failure.
ENGINE_CRASH = "engine_crash"
# "dedup": a copy whose original's caption is in neither table of the sink (its block was lost).
REASON_KINDS = ("engine", ENGINE_CRASH, "json", "json_schema", "empty_caption", "dedup")
# An empty caption (end-of-sequence as the first token) is no caption: quarantined with its own
# reason, so it is counted, never written as a success, and a later run can retry it.
EMPTY_CAPTION = "empty_caption: the model ended the caption before its first word (end-of-sequence first)"
# The quarantine `stage` of rows the sink quarantines: "engine" (the engine's own failure, or an
# answer that does not parse), or "engine_crash" (a row that killed the engine again and again:
# stages/caption/engine_guard.py). Rows the image stage rejects have stage "image".
ENGINE_STAGES = ("engine", ENGINE_CRASH)
# The quarantine stage of a copy whose original is in neither table (stages/dedup/fill.py).
DEDUP_STAGE = "dedup"
IMAGE_STAGE = "image"


class ImageRejected(Exception):
    """The image cannot be captioned. ``reason`` reads ``<kind>: <detail>``, kind one of
    IMAGE_REASON_KINDS (the first word of the quarantine reason)."""

    def __init__(self, kind: str, detail: str):
        self.kind = kind
        self.detail = detail
        super().__init__(f"{kind}: {detail}")

    @property
    def reason(self) -> str:
        return f"{self.kind}: {self.detail}"


def quarantine_reason(error: str) -> str:
    """The quarantine reason for an ERROR_COLUMN value: "<kind>: <message>", kind "engine"
    unless it already names one of REASON_KINDS."""
    kind = error.split(":", 1)[0]
    return error if kind in REASON_KINDS and ":" in error else f"engine: {error}"


def engine_stage(reason: str) -> str:
    """The quarantine stage of a reason set after the images stage ("<kind>: <message>")."""
    return ENGINE_CRASH if reason.split(":", 1)[0] == ENGINE_CRASH else "engine"


def reason_kind(reason: str) -> str:
    """The kind of a quarantine reason: the text before its first colon."""
    return reason.split(":", 1)[0]


# --- digests ------------------------------------------------------------------------------------


def block_digest(ids: Iterable[str]) -> str:
    """A 20-hex-digit digest of a block's row ids, in order: the stem of the files a block
    writes (a retried task rewrites the same file) and its ledger key."""
    h = hashlib.blake2b(digest_size=10)
    for i in ids:
        h.update(i.encode())
        h.update(b"\0")
    return h.hexdigest()


def row_hash(row_id: str) -> int:
    """A stable 64-bit hash of a row id: the thumbnail sample is the rows of smallest hash."""
    return int.from_bytes(hashlib.blake2b(str(row_id).encode(), digest_size=8).digest(), "big")


def missing_as_none(value: Any) -> Any:
    """A pass-through value as the output holds it: a missing one is None. Ray Data's numpy
    batches turn a block's all-null column into float NaN; written as is, that block's file
    would type the column double and the sink's files could no longer be read together."""
    return None if isinstance(value, float) and value != value else value


# --- words of a caption ---------------------------------------------------------------------------
_WORD = re.compile(r"\w+(?:['’]\w+)*")


def word_tokens(text: str) -> list[str]:
    """A caption's words, lower-cased (letters/digits with inner apostrophes): what the report's
    word counts and the evaluation's statistics count."""
    return _WORD.findall(text.lower())
