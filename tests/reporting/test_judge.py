"""LLM-as-judge without an engine: answer parsing, request/record shaping, accounting, engine
settings, reports. The pass with a real (tiny) engine is test_judge_e2e.py's job."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from omegaconf import OmegaConf

from capjob.config import EngineConfig, EvalConfig, EvalMode, JudgeConfig, ModelConfig, ResourcesConfig, SinkConfig, validate_eval
from capjob.errors import ConfigError
from capjob.reporting.evaluation import compare_markdown, evaluate, render_markdown
from capjob.reporting.judge import (
    JUDGE_SCHEMA,
    REASON_CHARS,
    ROW_INDEX,
    JudgeAccountingError,
    Judgement,
    JudgeRecord,
    JudgeRequest,
    check_accounting,
    judge_model_name,
    judge_output,
    judge_stats,
    judge_resources,
    parse_judgement,
    render_judge_markdown,
)
from capjob.schema import DATA_COLUMN, ERROR_COLUMN
from capjob.stages.caption.engine import EnginePlacement, decide_placement, engine_kwargs
from helpers.config import CONF_DIR

def judge_config(source=None, builder=None, **values) -> JudgeConfig:
    """A JudgeConfig whose model.* / engine.* / own fields come from `values` by name."""
    engine_keys = set(EngineConfig.__dataclass_fields__)
    model = ModelConfig(name="", source=source, builder=builder)
    engine = EngineConfig(**{"max_model_len": 4096, "limit_images_per_prompt": 0,
                             **{k: v for k, v in values.items() if k in engine_keys}})
    return JudgeConfig(model=model, engine=engine, **{k: v for k, v in values.items() if k not in engine_keys})


# --- parsing -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "answer,score,reason",
    [
        # The format the default prompt asks for.
        ("Score: 4\nReason: Clear and specific.", 4, "Clear and specific."),
        ("score:2\nreason: repeats itself", 2, "repeats itself"),
        ("  Score : 5 \n\n Reason :  Names every object.  ", 5, "Names every object."),
        ("Reason: repetitive text.\nScore: 2", 2, "repetitive text."),
        ('Score: 3\nReason: "ok".', 3, "ok."),
        ("Score: 4 out of 5. Reason: Good.", 4, "Good."),
        ("Score: 4/5\nReason: fine", 4, "fine"),
        ("Score: 4.0 reason: fine", 4, "fine"),
        ("Rating: four. Reasonably specific.", 4, "Reasonably specific."),
        ("Score - 4, decent", 4, "decent"),
        # JSON, bare or fenced, other key names, string scores.
        ('{"score": 4, "reason": "good"}', 4, "good"),
        ('```json\n{"score": 5, "reason": "accurate"}\n```', 5, "accurate"),
        ('Here is my verdict:\n```\n{"Score": 1, "Explanation": "empty caption"}\n```\nThanks', 1, "empty caption"),
        ('{"rating": "3", "justification": "generic"}', 3, "generic"),
        ('{"score": "4/5", "reason": "ok"}', 4, "ok"),
        ('{"score": 2.0}', 2, ""),
        ("{score: 4, reason: 'single quotes'}", 4, "single quotes"),  # not JSON: the label rule
        # Markdown.
        ("**Score**: 5\n**Reason**: great", 5, "great"),
        ("**Score:** 3 — vague", 3, "vague"),
        ("Score: **2**\nReason: **garbled**", 2, "garbled"),
        ("## Score\n4\n## Reason\nclear", 4, "clear"),
        # A bare leading score.
        ("4/5 - good caption", 4, "good caption"),
        ("4", 4, ""),
        ("[3] somewhat vague", 3, "somewhat vague"),
        ("(5) accurate", 5, "accurate"),
        ("2. Repetitive and truncated.", 2, "Repetitive and truncated."),
        # Prose.
        ("The caption is accurate and detailed. Score: 5", 5, "The caption is accurate and detailed."),
        ("I would rate this caption a 2 because it repeats itself.", 2, "because it repeats itself."),
        ("The score is 3/5; decent but generic", 3, "decent but generic"),
        ("Overall this is a 4 out of 5: clear but short.", 4, "clear but short."),
        # Reasoning models: the thinking is dropped, even when it mentions a score.
        ("<think>maybe score 1? no.</think>\nScore: 4\nReason: fine", 4, "fine"),
        ("mentions score 1 while thinking</think>Score: 5\nReason: complete", 5, "complete"),
    ],
)
def test_parse_judgement_reads_scores_and_reasons(answer, score, reason):
    assert parse_judgement(answer) == Judgement(score, reason, True)


@pytest.mark.parametrize(
    "answer",
    [
        None,
        "",
        "   \n ",
        "asdf qwe zxcv",
        "the the the the the",
        "Score: 7\nReason: excellent",  # outside 1..5
        "Score: 0",
        "Score: -1",
        "Score: 12",
        "Score: 3.5",  # not an integer
        "Score: 3.25",
        "8/10 good",  # another scale
        "Score: 4/10",
        "12/5",
        "10 dogs run across the field",
        '{"score": 9, "reason": "x"}',
        '{"score": true}',
        '{"score": null, "reason": "cannot tell"}',
        '{"score": "high"}',
        "Score: <1-5>\nReason: <one short sentence>",  # the template echoed back
        '{"score": <1-5>, "reason": "..."}',
        "1-5",
        "Score: none\nReason: empty",
        "<think>Score: 4 would be fair</think>",  # only thinking
        "\x00\x01\ufffd garbage \u202e",
    ],
)
def test_parse_judgement_flags_what_is_no_score(answer):
    assert parse_judgement(answer) == Judgement(None, "", False)


def test_json_score_decides_even_when_the_text_says_otherwise():
    # A JSON object with a score key is the answer: an invalid score there is not rescued by prose.
    assert not parse_judgement('{"score": 7}\nScore: 4').parsed
    # ...but an object without a score key is ignored.
    assert parse_judgement('{"note": "x"}\nScore: 4\nReason: ok') == Judgement(4, "ok", True)


def test_first_labelled_score_wins():
    assert parse_judgement("Score: 2\nReason: short.\nScore: 5").score == 2


def test_reason_is_one_line_and_capped():
    j = parse_judgement("Score: 3\nReason: " + "very long reason text\n" * 100)
    assert j.parsed and len(j.reason) == REASON_CHARS and j.reason.endswith("…") and "\n" not in j.reason


def test_parse_judgement_never_raises_on_arbitrary_text():
    import random

    rng = random.Random(0)
    alphabet = "Score: Reason 0123456789/.-{}[]\"'`*_#\n <think></think> out of five json"
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 80)))
        j = parse_judgement(text)
        assert isinstance(j, Judgement)
        assert (j.score in (1, 2, 3, 4, 5)) if j.parsed else (j.score is None and j.reason == "")


# --- request and record ------------------------------------------------------------------


def test_request_fills_the_caption_verbatim():
    judge = judge_config(builder="tiny_qwen25vl", temperature=0.0, max_tokens=16, seed=3)
    request = JudgeRequest(judge)
    out = request({"id": "a", "caption": "A {weird} caption with {caption} inside"})
    system, user = out["messages"]
    assert system == {"role": "system", "content": judge.system_prompt}
    assert user["role"] == "user" and 'Caption: """A {weird} caption with {caption} inside"""' in user["content"]
    assert out["sampling_params"] == {"temperature": 0.0, "max_tokens": 16, "seed": 3}
    # A null caption is an empty one; no system prompt means no system message.
    assert JudgeRequest(judge_config(system_prompt=""))({"id": "b", "caption": None})["messages"][0]["role"] == "user"


def _processor_row(**data):
    return {DATA_COLUMN: {ROW_INDEX: 0, "id": "x", "run_id": "r", "caption": "c", **data}}


def test_record_of_an_answer_a_garbled_answer_and_an_engine_failure():
    record = JudgeRecord("judge-m", raw_chars=10)
    ok = record(_processor_row(generated_text="Score: 4\nReason: fine", num_generated_tokens=7, **{ERROR_COLUMN: ""}))
    assert ok == {
        ROW_INDEX: 0, "id": "x", "run_id": "r", "score": 4, "reason": "fine", "parsed": True, "status": "parsed",
        "raw": "Score: 4\nR", "error": "", "generated_tokens": 7, "judge_model": "judge-m",
    }
    garbled = record(_processor_row(generated_text="qwe rty", num_generated_tokens=3))
    assert (garbled["status"], garbled["parsed"], garbled["score"], garbled["raw"]) == ("unparseable", False, None, "qwe rty")
    # Failed rows bypass Ray's postprocess wrapper with their whole working row: no output fields.
    failed = record(_processor_row(messages=[{"role": "user", "content": "..."}], **{ERROR_COLUMN: "ValueError: prompt too long"}))
    assert (failed["status"], failed["parsed"], failed["score"], failed["raw"]) == ("failed", False, None, "")
    assert failed["error"] == "ValueError: prompt too long" and failed["generated_tokens"] == 0
    # Every record fits the judge table's schema.
    pa.Table.from_pylist([ok, garbled, failed], schema=JUDGE_SCHEMA.append(pa.field(ROW_INDEX, pa.int64())))


# --- accounting --------------------------------------------------------------------------


def judge_rows(statuses_scores):
    rows = [
        {ROW_INDEX: i, "id": f"id{i}", "run_id": "r", "score": score, "reason": "", "parsed": status == "parsed",
         "status": status, "raw": "", "error": "boom" if status == "failed" else "", "generated_tokens": 1, "judge_model": "m"}
        for i, (status, score) in enumerate(statuses_scores)
    ]
    return pa.Table.from_pylist(rows, schema=JUDGE_SCHEMA.append(pa.field(ROW_INDEX, pa.int64())))


def test_stats_count_every_row_once():
    rows = judge_rows([("parsed", 4), ("parsed", 5), ("parsed", 4), ("unparseable", None), ("failed", None), ("parsed", 1)])
    assert judge_stats(rows) == {
        "count": 6, "judged": 5, "parsed": 4, "unparseable": 1, "failed": 1,
        "mean_score": 3.5, "histogram": {"1": 1, "2": 0, "3": 0, "4": 2, "5": 1},
    }
    check_accounting(6, rows)
    assert judge_stats(judge_rows([("unparseable", None)]))["mean_score"] is None


def test_accounting_catches_lost_and_duplicated_rows():
    rows = judge_rows([("parsed", 4), ("failed", None), ("unparseable", None)])
    with pytest.raises(JudgeAccountingError, match="3 judge rows for 4 captions"):
        check_accounting(4, rows)
    duplicated = pa.concat_tables([rows.slice(0, 2), rows.slice(0, 1)])  # row 0 twice, row 2 lost
    with pytest.raises(JudgeAccountingError):
        check_accounting(3, duplicated)
    bad_status = rows.set_column(rows.schema.get_field_index("status"), "status", pa.array(["parsed", "failed", "odd"]))
    with pytest.raises(JudgeAccountingError, match="do not add up"):
        check_accounting(3, bad_status)


def test_judge_output_of_an_empty_sink_needs_no_engine(tmp_path):
    sink = SinkConfig(path=str(tmp_path / "out"))
    result = judge_output(sink, judge_config(builder="tiny_qwen25vl"), run_id="r1")
    assert result.rows.num_rows == 0 and result.rows.schema == JUDGE_SCHEMA
    assert result.stats["count"] == 0 and result.stats["mean_score"] is None and result.stats["run"] == "r1"
    written = pq.read_table(tmp_path / "out" / "evaluation" / "judge-r1.parquet")
    assert written.schema == JUDGE_SCHEMA and result.table_url.endswith("evaluation/judge-r1.parquet")


# --- the judge's engine ------------------------------------------------------------------


def test_judge_engine_is_its_own_text_only_engine_on_cpu():
    judge = judge_config(source="org/Judge-7B", max_model_len=2048, cpu_kv_cache_gib=0.5, batch_size=4, concurrency=2)
    local = ResourcesConfig(preprocess_cpus=0.5, cpu_stage_cpus=0.25)
    resources = judge_resources(judge, local)
    assert judge_model_name(judge) == "Judge-7B"
    assert (judge.engine.batch_size, resources.concurrency, resources.cpu_stage_cpus) == (4, 2, 0.25)
    kwargs = engine_kwargs(judge.engine, judge.model, EnginePlacement(0, None))
    assert kwargs["max_model_len"] == 2048
    assert kwargs["kv_cache_memory_bytes"] == 2**29 and "gpu_memory_utilization" not in kwargs
    assert kwargs["limit_mm_per_prompt"] == {"image": 0, "video": 0}
    gpu = engine_kwargs(judge.engine, judge.model, EnginePlacement(1, None))
    assert gpu["gpu_memory_utilization"] == 0.9 and "kv_cache_memory_bytes" not in gpu


def test_judge_placement_follows_the_caption_engines_rules():
    def place(judge, gpus):
        return decide_placement(judge_resources(judge), judge.engine, available_gpus=gpus)

    judge = judge_config(source="m", tensor_parallel_size=2)
    with pytest.raises(ConfigError):  # TP 2 needs GPUs
        place(judge, 0)
    assert place(judge, 4).gpus == 2
    assert place(judge_config(source="m"), 0).gpus == 0
    assert place(judge_config(source="m", gpus_per_worker=0), 8).gpus == 0


# --- config and reports ------------------------------------------------------------------


def test_judge_yaml_names_every_judge_setting():
    raw = OmegaConf.load(CONF_DIR / "eval" / "judge.yaml")
    merged = OmegaConf.merge(OmegaConf.structured(EvalConfig), raw)
    cfg = validate_eval(OmegaConf.to_object(merged))
    assert cfg.mode == EvalMode.judge and cfg.judge.model.source and cfg.judge.temperature == 0.0
    assert set(raw.judge) == set(merged.judge) - {"system_prompt", "prompt"}
    # The judge's groups are the caption pass's: every model and engine key of the yaml is one of theirs.
    assert set(raw.judge.model) <= set(merged.judge.model) and set(raw.judge.engine) <= set(merged.judge.engine)
    assert cfg.judge.engine.limit_images_per_prompt == 0 and cfg.judge.engine.max_model_len == 4096


@pytest.mark.parametrize(
    "judge,key",
    [
        (judge_config(builder="nope"), "eval.judge.model.builder"),
        (judge_config(), "eval.judge.model.source"),
        (judge_config(builder="tiny_qwen25vl", prompt="no placeholder"), "eval.judge.prompt"),
        (judge_config(builder="tiny_qwen25vl", temperature=-1), "eval.judge.temperature"),
        (judge_config(builder="tiny_qwen25vl", max_model_len=64, max_tokens=64), "eval.judge.engine.max_model_len"),
        (judge_config(builder="tiny_qwen25vl", gpus_per_worker=3), "eval.judge.gpus_per_worker"),
        (judge_config(builder="tiny_qwen25vl", cpu_kv_cache_gib=0), "eval.judge.engine.cpu_kv_cache_gib"),
        (judge_config(builder="tiny_qwen25vl", gpu_memory_utilization=1.5), "eval.judge.engine.gpu_memory_utilization"),
        (judge_config(builder="tiny_qwen25vl", batch_size=0), "eval.judge.engine.batch_size"),
    ],
)
def test_bad_judge_values_fail_naming_the_key(judge, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate_eval(EvalConfig(mode=EvalMode.judge, judge=judge))


JUDGE_SECTION = {
    "run": "r1", "model": "Judge-7B", "model_source": "org/Judge-7B", "count": 6, "judged": 5, "parsed": 4,
    "unparseable": 1, "failed": 1, "mean_score": 3.5, "histogram": {"1": 1, "2": 0, "3": 0, "4": 2, "5": 1},
    "judge_table": "/out/evaluation/judge-r1.parquet", "source": "/out/captions", "wall_seconds": 1.0, "settings": {},
}


def test_markdown_has_a_judge_section_only_when_the_judge_ran():
    table = pa.table({"id": ["a"], "caption": ["A cat."], "generated_tokens": [3]})
    stats = evaluate(table, EvalConfig()).stats
    assert "## Judge" not in render_markdown(stats)
    md = render_markdown({**stats, "judge": JUDGE_SECTION})
    assert md.count("## Judge") == 1 and render_judge_markdown(JUDGE_SECTION) in md
    assert "| - parsed (score 1-5) | 4 (66.7%) |" in md and "| engine failures | 1 (16.7%) |" in md
    assert "Mean score: 3.50 over 4 parsed answers." in md and "| captions | 1 | 0 | 0 | 2 | 1 |" in md
    json.dumps({**stats, "judge": JUDGE_SECTION})  # eval.json stays JSON


def test_compare_adds_judge_columns_when_any_result_has_them():
    table = pa.table({"id": ["a"], "caption": ["A cat."], "generated_tokens": [3]})
    stats = evaluate(table, EvalConfig()).stats
    assert "judge" not in compare_markdown({"a": stats})
    lines = compare_markdown({"a": stats, "b": {**stats, "judge": JUDGE_SECTION}}).splitlines()
    assert lines[0].endswith("judge mean | judge parsed |")
    assert lines[2].endswith("| n/a | n/a |") and lines[3].endswith("| 3.5 | 4/6 |")
