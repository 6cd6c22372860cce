"""LLM-as-judge: a second Ray Data LLM processor pass that scores each caption from 1 to 5.

Runs after captioning (``eval=judge``, through ``evaluation.evaluate_output``) or on its own::

    <sink.path>/captions (one run's rows, or all)
        -> Ray Dataset (row index, id, run_id, caption)
        -> Ray Data LLM processor: ChatTemplate -> [Tokenize] -> vLLM (the judge)
        -> parse_judgement(answer) -> score 1..5 + short reason, or unparseable
        -> <sink.path>/evaluation/judge-<run or 'all'>.parquet   one row per caption
        -> aggregates (JudgeResult.stats), which eval.json / eval.md carry under ``judge``

The judge has its own model and engine (``eval.judge.*``): it is not the captioning model.
``eval.judge.model`` and ``eval.judge.engine`` are the caption pass's config groups with the
judge's values, so placement, engine args and the processor config come from the caption
engine's own code (stages/caption/engine.py): GPUs when the cluster has them
(``engine.tensor_parallel_size`` per replica, or ``gpus_per_worker``), else vLLM on CPU with a
fixed KV cache (``engine.cpu_kv_cache_gib``); the CPU stages and their CPUs come from the job's
``resources``, the number of judge replicas from ``eval.judge.concurrency``. The judge joins
the Ray the caption pass started.

What the judge sees
    The caption only (text judge): a system prompt and ``eval.judge.prompt`` with ``{caption}``
    replaced by the caption. Any chat model works, a text LLM or a VLM used text-only (the
    engine is started with ``limit_mm_per_prompt={"image": 0, "video": 0}``, so vLLM skips a
    VLM's vision tower). A text judge rates fluency, specificity, internal consistency and
    degeneration (repetition, truncation, boilerplate); it cannot tell whether the caption
    matches the image.

Accounting
    Every caption row gets exactly one judge row (asserted): ``failed`` when the engine raised
    on it (prompt longer than ``engine.max_model_len``...; ``should_continue_on_error``), otherwise
    ``parsed`` or ``unparseable``; so ``parsed + unparseable + failed == count`` and
    ``judged == parsed + unparseable``. The mean and the 1..5 histogram cover parsed rows only.

A real judge
    ``eval=judge`` uses ``Qwen/Qwen2.5-7B-Instruct`` (temperature 0, 64 new tokens); a bigger
    instruct model (e.g. ``Qwen/Qwen2.5-32B-Instruct`` with ``eval.judge.engine.tensor_parallel_size=2``)
    judges better. Any model that follows "Score: <n> / Reason: <sentence>" works: the parser
    also accepts JSON (fenced or not), ``**Score**: 4``, ``4/5 - ...``, a leading number, and
    drops ``<think>...</think>`` blocks of reasoning models (give those a larger ``max_tokens``).
    With the tiny test model the answers are noise and nearly all unparseable; only the
    parsing and the accounting mean anything there.

Future work: a VLM judge that also sees the image. The captions table holds no pixels, so
that pass needs the source images joined back by id (re-read + decode + resize as the caption
pass does) and the PrepareMultimodal stage enabled (``processor_config(multimodal=True)``,
``limit_images_per_prompt=1``); the prompt, parser, table and report stay as they are.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from dataclasses import dataclass, replace
from typing import Any, Mapping, Optional

import pyarrow as pa

from capjob.config import JudgeConfig, ResourcesConfig, SinkConfig, SinkFormat
from capjob.errors import CapjobError
from capjob.models import resolve_model_source
from capjob.models.remote import node_local_stage_udfs
from capjob.reporting.outputs import EVALUATION, read_captions, select_run
from capjob.schema import CAPTIONS, DATA_COLUMN, ERROR_COLUMN
from capjob.stages.caption.engine import (EnginePlacement, check_accelerator_type, cpu_placement, decide_placement,
                                          largest_node_gpus, place_stages, processor_config)
from capjob.stages.tables import TableWriter

log = logging.getLogger(__name__)

SCORES = (1, 2, 3, 4, 5)
REASON_CHARS = 300
ROW_INDEX = "row"  # position of the caption row in the judged table: the exactly-once key

JUDGE_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("run_id", pa.string()),
        # 1..5, null when the answer was unparseable or the engine failed.
        ("score", pa.int8()),
        ("reason", pa.string()),
        ("parsed", pa.bool_()),
        # parsed | unparseable | failed
        ("status", pa.string()),
        # The judge's answer, cut to eval.judge.raw_chars.
        ("raw", pa.string()),
        # The engine's error for failed rows, "" otherwise.
        ("error", pa.string()),
        ("generated_tokens", pa.int64()),
        ("judge_model", pa.string()),
    ]
)


class JudgeAccountingError(CapjobError):
    """The judge table does not hold exactly one row per caption."""


# --- parsing -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Judgement:
    score: Optional[int]  # 1..5 when parsed
    reason: str  # "" when not parsed
    parsed: bool


UNPARSEABLE = Judgement(None, "", False)

# A number that is not the start of a range: an echoed "Score: <1-5>" is no score of 1.
_NUMBER = r"-?\d+(?:\.\d+)?(?!\d|\.\d|\s*[-–—]\s*\d)"
_WORDS = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5}
_DENOMINATOR = r"(?:\s*(?:/|out\s+of)\s*(?P<den>\d+))?"
# "Score: 4", "**Score**: 5", "Score: **4**/5", "score of 4", "Rating = 3", "I rate it 4",
# "score: four", "## Score\n4". A dash followed by a digit is a sign, not a separator: "Score: -1" is -1.
_LABELLED = re.compile(
    r"\b(?:score|rating|grade|rate|rated)\b"
    r"(?:[\s:=*_\"'-]*\b(?P<word>one|two|three|four|five)\b"
    rf"|(?:[^\d-]|-(?!\d)){{0,25}}?(?P<num>{_NUMBER}))" + _DENOMINATOR,
    re.IGNORECASE,
)
# A bare leading score: "4", "4/5 - good", "[3] vague", "(5) accurate", "2. Repetitive".
_LEADING = re.compile(rf"^\s*[\[(]?\s*(?P<num>{_NUMBER})\s*[\])]?" + _DENOMINATOR + r"(?=$|[\s.,:;)\]–—-])", re.IGNORECASE)
# "... 4/5 ..." or "... 4 out of 5 ..." anywhere.
_FRACTION = re.compile(rf"(?<![\w.])(?P<num>{_NUMBER})\s*(?:/|out\s+of)\s*(?P<den>\d+)\b", re.IGNORECASE)
_REASON = re.compile(
    r"\b(?:reason(?:ing)?|explanation|justification|rationale)\b(?:[\s*_\"']*[:=–—-]|[ \t*_\"']*\n)[\s*_\"']*(?P<text>.+)",
    re.IGNORECASE | re.DOTALL,
)
_NEXT_LABEL = re.compile(r"\n\s*[*_#\"']*\s*(?:score|rating|grade)\b", re.IGNORECASE)
_THINK = re.compile(r"<think>.*?</think>", re.IGNORECASE | re.DOTALL)
_FENCED = re.compile(r"```(?:json|JSON)?\s*(\{.*?\})\s*```", re.DOTALL)
_OBJECT = re.compile(r"\{[^{}]*\}", re.DOTALL)
_SCORE_KEYS = ("score", "rating", "grade")
_REASON_KEYS = ("reason", "explanation", "justification", "rationale", "reasoning", "comment")


def _score(value: Any, denominator: Optional[str] = None) -> Optional[int]:
    """An integral 1..5 (on a /5 scale when a denominator is given), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _WORDS:
            return _WORDS[text]
        m = _LEADING.match(text)
        if not m or m.end() < len(text.rstrip(" .")):
            return None
        value, denominator = m.group("num"), m.group("den") or denominator
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    if denominator is not None and int(denominator) != 5:
        return None
    if not math.isfinite(number) or number != int(number) or int(number) not in SCORES:
        return None
    return int(number)


def _clean_reason(text: str) -> str:
    text = re.sub(r"\s+", " ", text.replace("**", "").replace("__", "")).strip()
    # Separators and quotes around the sentence go; its own final period stays.
    text = text.lstrip(" -–—:;,.*_\"'`{[(").rstrip(" -–—:;,*_\"'`}])").strip()
    text = re.sub(r"[\"'`]+(?=[.!?]$)", "", text)  # 'Reason: "ok".'
    if not re.search(r"\w", text):
        return ""
    if len(text) > REASON_CHARS:
        text = text[: REASON_CHARS - 1].rstrip() + "…"
    return text


def _labelled_reason(text: str) -> Optional[str]:
    m = _REASON.search(text)
    if not m:
        return None
    reason = m.group("text")
    end = _NEXT_LABEL.search(reason)
    return _clean_reason(reason[: end.start()] if end else reason)


def _from_json(text: str) -> Optional[Judgement]:
    """A JSON object with a score key decides the answer alone; None when there is none."""
    candidates = [m.group(1) for m in _FENCED.finditer(text)]
    if "{" in text and "}" in text:
        candidates.append(text[text.index("{") : text.rindex("}") + 1])
    candidates += [m.group(0) for m in _OBJECT.finditer(text)]
    for candidate in candidates:
        try:
            obj = json.loads(candidate)
        except ValueError:
            continue
        if not isinstance(obj, dict):
            continue
        fields = {str(k).strip().lower(): v for k, v in obj.items()}
        key = next((k for k in _SCORE_KEYS if k in fields), None)
        if key is None:
            continue
        score = _score(fields[key])
        if score is None:
            return UNPARSEABLE
        reason = next((fields[k] for k in _REASON_KEYS if isinstance(fields.get(k), str)), "")
        return Judgement(score, _clean_reason(reason), True)
    return None


def parse_judgement(text: Optional[str]) -> Judgement:
    """The judge's answer -> Judgement; never raises. parsed=False for anything that is not an
    integral score in 1..5 (on a /5 scale when one is written): "Score: 7", "8/10", "3.5",
    "-1", empty or garbage answers."""
    if not text or not text.strip():
        return UNPARSEABLE
    text = _THINK.sub(" ", text)
    if "</think>" in text:  # an opening tag cut off by the prompt: the answer follows the close
        text = text.rsplit("</think>", 1)[1]
    judged = _from_json(text)
    if judged is not None:
        return judged
    plain = text.replace("**", "").replace("__", "").replace("`", "")
    for pattern in (_LABELLED, _LEADING, _FRACTION):
        m = pattern.search(plain)
        if not m:
            continue
        word = m.groupdict().get("word")
        score = _WORDS[word.lower()] if word else _score(m.group("num"), m.group("den"))
        if score is None:
            return UNPARSEABLE
        reason = _labelled_reason(plain)
        if reason is None:
            after = re.sub(r"^\s*(?:/|out\s+of)\s*5\b", "", plain[m.end() :], flags=re.IGNORECASE)
            reason = _clean_reason(after) or _clean_reason(plain[: m.start()])
        return Judgement(score, reason, True)
    return UNPARSEABLE


# --- the judge's engine ------------------------------------------------------------------


def judge_model_name(judge: JudgeConfig) -> str:
    """The judge's label: eval.judge.model.name, else the last part of its source (or builder)."""
    if judge.model.name:
        return judge.model.name
    return (judge.model.source or judge.model.builder or "judge").rstrip("/").rsplit("/", 1)[-1]


def judge_resources(judge: JudgeConfig, resources: Optional[ResourcesConfig] = None) -> ResourcesConfig:
    """The judge's resources: the job's (CPU stages, cluster address, accelerator type) with the
    judge's replicas and GPUs per replica; replicas never share a GPU."""
    r = resources if resources is not None else ResourcesConfig()
    return replace(r, concurrency=judge.concurrency, gpus_per_worker=judge.gpus_per_worker, replicas_per_gpu=1)


class JudgeRequest:
    """preprocess: one caption row -> the judge's chat messages + sampling params."""

    def __init__(self, judge: JudgeConfig):
        self.system_prompt = judge.system_prompt
        self.prompt = judge.prompt
        self.sampling_params = {
            "temperature": judge.temperature,
            "max_tokens": judge.max_tokens,
            **({"seed": judge.seed} if judge.seed is not None else {}),
        }

    def messages(self, caption: str) -> list[dict[str, str]]:
        # str.replace, not str.format: captions may hold braces.
        user = self.prompt.replace("{caption}", caption)
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return [*system, {"role": "user", "content": user}]

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        return {"messages": self.messages(row.get("caption") or ""), "sampling_params": self.sampling_params}


class JudgeRecord:
    """postprocess for every row, answered or failed: parse, project to JUDGE_SCHEMA."""

    def __init__(self, model_name: str, raw_chars: int):
        self.model_name = model_name
        self.raw_chars = raw_chars

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        data = row[DATA_COLUMN]
        error = str(data.get(ERROR_COLUMN) or "")
        raw = "" if error else str(data.get("generated_text") or "")
        judged = UNPARSEABLE if error else parse_judgement(raw)
        return {
            ROW_INDEX: int(data[ROW_INDEX]),
            "id": data["id"],
            "run_id": data.get("run_id"),
            "score": judged.score,
            "reason": judged.reason,
            "parsed": judged.parsed,
            "status": "failed" if error else ("parsed" if judged.parsed else "unparseable"),
            "raw": raw[: self.raw_chars],
            "error": error[:2000],
            "generated_tokens": int(data.get("num_generated_tokens") or 0),
            "judge_model": self.model_name,
        }


def build_judge_processor(judge: JudgeConfig, resources: ResourcesConfig, model_source: str, placement: EnginePlacement):
    """The judge's Ray Data LLM processor (text only: ChatTemplate -> [Tokenize] -> vLLM).
    resources: judge_resources(judge, the job's resources)."""
    from ray.data.llm import build_processor

    processor = build_processor(
        processor_config(judge.engine, judge.model, resources, model_source, placement, multimodal=False),
        preprocess=JudgeRequest(judge),
        preprocess_map_kwargs={"num_cpus": resources.preprocess_cpus, **cpu_placement(resources)},
        postprocess_map_kwargs={"num_cpus": resources.preprocess_cpus, **cpu_placement(resources)},
    )
    node_local_stage_udfs(processor.stages, model_source)
    place_stages(processor.stages, resources)  # on the caption job's labelled nodes (resources.*_label_selector)
    # As for captions: failed rows would bypass the user postprocess with their whole working
    # row; replacing the wrapped postprocess gives every row the same small schema.
    processor.postprocess = JudgeRecord(judge_model_name(judge), judge.raw_chars)
    return processor


# --- a pass over an output ---------------------------------------------------------------


@dataclass
class JudgeResult:
    rows: pa.Table  # JUDGE_SCHEMA, one row per caption, in the captions table's order
    stats: dict[str, Any]  # JSON-ready; eval.json's "judge" section
    table_url: str  # where rows were written


def judge_stats(rows: pa.Table) -> dict[str, Any]:
    """Counts, mean and 1..5 histogram of a judge table (JUDGE_SCHEMA)."""
    status = rows.column("status").to_pylist()
    scores = [s for s, st in zip(rows.column("score").to_pylist(), status) if st == "parsed"]
    parsed, unparseable, failed = status.count("parsed"), status.count("unparseable"), status.count("failed")
    return {
        "count": rows.num_rows,
        "judged": parsed + unparseable,
        "parsed": parsed,
        "unparseable": unparseable,
        "failed": failed,
        "mean_score": sum(scores) / len(scores) if scores else None,
        "histogram": {str(k): scores.count(k) for k in SCORES},
    }


def check_accounting(captions: int, rows: pa.Table) -> None:
    """Exactly one judge row per caption row, and the counts add up. Raises JudgeAccountingError."""
    index = sorted(rows.column(ROW_INDEX).to_pylist()) if ROW_INDEX in rows.column_names else None
    if rows.num_rows != captions or (index is not None and index != list(range(captions))):
        raise JudgeAccountingError(f"judge: {rows.num_rows} judge rows for {captions} captions (lost or duplicated rows)")
    s = judge_stats(rows)
    if s["judged"] + s["failed"] != captions or s["parsed"] + s["unparseable"] + s["failed"] != captions:
        raise JudgeAccountingError(f"judge: counts do not add up to {captions} captions: {s}")


def judge_placement(judge: JudgeConfig, resources: ResourcesConfig) -> EnginePlacement:
    """Where each judge replica runs on the running Ray's cluster (the caption pass's). Raises
    CapjobError when Ray is not up, ConfigError when the cluster lacks the GPUs."""
    import ray  # the judge module loads with the CLI's (sweep report -> evaluation): keeps Ray out of its preflight

    if not ray.is_initialized():
        raise CapjobError("eval.judge: the judge runs on the caption job's Ray, which is not running")
    placement = decide_placement(resources, judge.engine, int(ray.cluster_resources().get("GPU", 0)), largest_node_gpus())
    check_accelerator_type(placement, ray.cluster_resources(), ray.nodes())
    return placement


def _num_blocks(rows: int, judge: JudgeConfig) -> int:
    # Enough blocks to keep every replica's concurrent batches busy, no more than one per batch.
    return max(1, min(math.ceil(rows / judge.engine.batch_size), 4 * judge.concurrency * judge.engine.max_concurrent_batches))


def run_judge(captions: pa.Table, judge: JudgeConfig, resources: Optional[ResourcesConfig] = None) -> pa.Table:
    """Judge a captions table (id, caption[, run_id]) on Ray; returns one row per caption in
    the table's order (JUDGE_SCHEMA plus the row index)."""
    import ray.data  # as in judge_placement

    resources = judge_resources(judge, resources)
    n = captions.num_rows
    if n == 0:
        return JUDGE_SCHEMA.empty_table().append_column(ROW_INDEX, pa.array([], pa.int64()))
    model_source = resolve_model_source(judge.model.source, judge.model.builder)
    placement = judge_placement(judge, resources)
    log.info("judge: %d captions, model %s, %s", n, model_source, f"{placement.gpus:g} GPU(s)" if placement.gpus else "CPU")
    run_ids = captions.column("run_id").cast(pa.string()) if "run_id" in captions.column_names else pa.nulls(n, pa.string())
    table = pa.table(
        {
            ROW_INDEX: pa.array(range(n), pa.int64()),
            "id": captions.column("id").cast(pa.string()),
            "run_id": run_ids,
            "caption": pa.array([c or "" for c in captions.column("caption").to_pylist()], pa.string()),
        }
    )
    step = math.ceil(n / _num_blocks(n, judge))
    ds = ray.data.from_arrow([table.slice(i, step) for i in range(0, n, step)])
    ds = build_judge_processor(judge, resources, model_source, placement)(ds)
    schema = JUDGE_SCHEMA.append(pa.field(ROW_INDEX, pa.int64()))
    out = pa.Table.from_pylist(ds.take_all(), schema=schema)
    return out.sort_by(ROW_INDEX)


def judge_output(
    sink: SinkConfig,
    judge: JudgeConfig,
    *,
    run_id: Optional[str] = None,
    resources: Optional[ResourcesConfig] = None,
) -> JudgeResult:
    """Judge a sink's captions (one run's, or all): run the judge pass, write
    <sink.path>/evaluation/judge-<run or 'all'>.parquet and return the aggregates.

    `resources` (the job's cfg.resources): CPU stages, their CPUs, a cluster address and the
    accelerator type; the judge's own replicas and GPUs come from `judge`. Uses the running
    Ray when there is one, else starts one like the caption pass does."""
    started = time.monotonic()
    captions = read_captions(sink)
    if run_id:
        captions = select_run(captions, run_id)
    run = run_id or "all"
    rows = run_judge(captions, judge, resources)
    check_accounting(captions.num_rows, rows)
    rows = rows.drop_columns([ROW_INDEX])
    writer = TableWriter(replace(sink, format=SinkFormat.parquet))
    written = writer.write(EVALUATION, rows, f"judge-{run}")
    table_url = f"{writer.url(EVALUATION)}/{written.rsplit('/', 1)[-1]}"
    stats = {
        "run": run,
        "model": judge_model_name(judge),
        "model_source": judge.model.source or f"<built locally: {judge.model.builder}>",
        **judge_stats(rows),
        "judge_table": table_url,
        "source": TableWriter(sink).url(CAPTIONS),
        "wall_seconds": round(time.monotonic() - started, 1),
        "settings": {
            "temperature": judge.temperature,
            "max_tokens": judge.max_tokens,
            "max_model_len": judge.engine.max_model_len,
            "system_prompt": judge.system_prompt,
            "prompt": judge.prompt,
        },
    }
    log.info("judge: %s", {k: stats[k] for k in ("count", "parsed", "unparseable", "failed", "mean_score")})
    return JudgeResult(rows, stats, table_url)


# --- report ------------------------------------------------------------------------------


def _mean(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _part(count: int, total: int) -> str:
    return f"{count} ({100 * count / total:.1f}%)" if total else str(count)


def render_judge_markdown(j: Mapping[str, Any]) -> str:
    """eval.md's judge section from eval.json's "judge" section."""
    n, parsed = j["count"], j["parsed"]
    lines = [
        "## Judge",
        "",
        f"- judge model: `{j['model']}` (`{j['model_source']}`), text-only: it sees the caption, not the image",
        f"- per-row scores: `{j['judge_table']}`",
        "",
        "| | captions |",
        "|---|---:|",
        f"| captions | {n} |",
        f"| judged (the engine answered) | {_part(j['judged'], n)} |",
        f"| - parsed (score 1-5) | {_part(parsed, n)} |",
        f"| - unparseable | {_part(j['unparseable'], n)} |",
        f"| engine failures | {_part(j['failed'], n)} |",
        "",
        f"Mean score: {_mean(j['mean_score'])} over {parsed} parsed answers.",
        "",
        "| score | 1 | 2 | 3 | 4 | 5 |",
        "|---|---:|---:|---:|---:|---:|",
        "| captions | " + " | ".join(str(j["histogram"][str(k)]) for k in SCORES) + " |",
        "",
    ]
    return "\n".join(lines)
