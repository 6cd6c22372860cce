"""Caption evaluation: flags, statistics, reports and capjob-eval on hand-made captions with known answers."""

import json
import pathlib
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from omegaconf import OmegaConf
from PIL import Image

from capjob.config import SinkConfig, SinkFormat, validate_eval
from capjob.errors import ConfigError, SourceError
from capjob.config import EvalConfig, EvalMode
from capjob.reporting.evaluation import caption_flags, compare_markdown, EVAL_SCHEMA, evaluate, evaluate_output, has_repeated_lines, has_repeated_ngram, main, render_markdown, vocabulary_size, word_f1
from capjob.reporting.outputs import output_sink, select_run
from capjob.schema import word_tokens
from capjob.stages.tables import TableWriter
from helpers.config import CONF_DIR, REPO

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_TOKENS = 20

# id -> (caption, generated_tokens, words, flags) with max_tokens = 20.
CASES = {
    "a": ("", 0, 0, "empty"),
    "b": ("  \n ", 1, 0, "empty"),
    "c": ("a cat a cat a cat a cat", 20, 8, "truncated,repeated_ngram"),
    "d": ("Sunset over the sea.\nA boat sails near the shore with two people aboard.\nSunset over the sea.", 19, 18, "repeated_lines"),
    "e": ("A red car parked on a quiet street.", 20, 8, "truncated"),
    "f": ("Two children play football in a sunny park.", 11, 8, ""),
    "g": ("The old man reads a newspaper on a bench.", 13, 9, ""),
    "h": ("It's a dog's life: a puppy sleeps.", 10, 7, ""),
}
# Sorted words [0, 0, 7, 8, 8, 8, 9, 18], tokens [0, 1, 10, 11, 13, 19, 20, 20]; numpy's linear
# percentiles sit at positions 0.35, 3.5 and 6.65 of 8 values.
WORDS = {"mean": 58 / 8, "p5": 0.0, "p50": 8.0, "p95": 9 + 0.65 * 9}
TOKENS = {"mean": 94 / 8, "p5": 0.35, "p50": 12.0, "p95": 20.0}
# a cat | sunset over the sea boat sails near shore with two people aboard | red car parked on
# quiet street | children play football in sunny park | old man reads newspaper bench |
# it's dog's life puppy sleeps
VOCABULARY = 2 + 12 + 6 + 6 + 5 + 5


def captions_table(cases=CASES, run_id="run1") -> pa.Table:
    """A captions table as capjob writes it (with a pass-through column)."""
    ids = list(cases)
    return pa.table(
        {
            "id": ids,
            "source_key": [f"img/{i}.jpg" for i in ids],
            "caption": [cases[i][0] for i in ids],
            "prompt_tokens": [100] * len(ids),
            "generated_tokens": [cases[i][1] for i in ids],
            "image_width": [448] * len(ids),
            "image_height": [336] * len(ids),
            "model": ["tiny_qwen25vl"] * len(ids),
            "run_id": [run_id] * len(ids),
            "label": ["photo"] * len(ids),
        }
    )


def write_output(root: pathlib.Path, table: pa.Table, files: int = 2) -> pathlib.Path:
    """<root>/captions/<run>-<n>.parquet, split over several files as the sink does."""
    (root / "captions").mkdir(parents=True, exist_ok=True)
    step = -(-table.num_rows // max(files, 1))
    for n in range(files):
        pq.write_table(table.slice(n * step, step), root / "captions" / f"run1-{n}.parquet")
    return root


# --- per caption -------------------------------------------------------------------------


def test_word_tokens_ignore_case_and_punctuation_keep_apostrophes():
    assert word_tokens("It's a Dog's LIFE, isn't it?") == ["it's", "a", "dog's", "life", "isn't", "it"]
    assert word_tokens(" \n-- ") == []


@pytest.mark.parametrize(
    "text,expected",
    [
        ("a cat a cat a cat a cat", True),  # "a cat a" three times
        ("a cat a cat a cat", True),  # "a cat a" only twice, but 2 of 4 3-grams = 50% > 30%
        ("the dog and the dog and the cat", True),  # no 3-gram thrice, but "the dog and" is 2/6 > 30%
        ("a small cat", False),  # its only 3-gram is 100% of them, but occurs once
        ("a cat", False),  # fewer words than n
        ("A man rides a bicycle down a busy street while a woman walks a dog on the pavement.", False),
    ],
)
def test_repeated_ngram(text, expected):
    assert has_repeated_ngram(word_tokens(text), n=3, repeats=3, share=0.3) is expected


def test_repeated_ngram_rules_decide_independently():
    # "a cat a" twice = 2 of 3 3-grams (67%): the share rule flags it, or the count rule at 2.
    assert has_repeated_ngram(word_tokens("a cat a cat a"), n=3, repeats=3, share=0.3)
    assert not has_repeated_ngram(word_tokens("a cat a cat a"), n=3, repeats=3, share=0.7)
    assert has_repeated_ngram(word_tokens("a cat a cat a"), n=3, repeats=2, share=1.0)


def test_repeated_lines_compare_words_and_skip_layout_lines():
    assert has_repeated_lines("A dog.\nA boat.\na DOG", repeats=2)
    assert not has_repeated_lines("A dog.\n\n---\n\n---\nA boat.", repeats=2)
    assert not has_repeated_lines("A dog.\nA dog.", repeats=3)
    assert not has_repeated_lines("", repeats=2)


def test_caption_flags_truncation_is_unknown_without_max_tokens():
    words = word_tokens("A red car.")
    flags = caption_flags("A red car.", words, 20, None, EvalConfig())
    assert flags.truncated is None and flags.names == "" and flags.words == 3
    assert caption_flags("A red car.", words, 20, 20, EvalConfig()).names == "truncated"
    assert caption_flags("A red car.", words, 19, 20, EvalConfig()).truncated is False


def test_vocabulary_size():
    assert vocabulary_size(word_tokens(c) for c, *_ in CASES.values()) == VOCABULARY
    assert vocabulary_size(map(word_tokens, ["The cat", "the CAT.", "a cat"])) == 3
    assert vocabulary_size([]) == 0


# --- over a table ------------------------------------------------------------------------


def test_evaluate_known_answers():
    ev = evaluate(captions_table(), EvalConfig(), max_tokens=MAX_TOKENS)
    assert ev.rows.schema == EVAL_SCHEMA
    rows = {r["id"]: r for r in ev.rows.to_pylist()}
    for i, (_, tokens, words, flags) in CASES.items():
        assert (rows[i]["words"], rows[i]["generated_tokens"], rows[i]["flags"]) == (words, tokens, flags), i
        assert rows[i]["empty"] == ("empty" in flags)
        assert rows[i]["truncated"] == ("truncated" in flags)
        assert rows[i]["degenerate"] == ("repeated" in flags)
    s = ev.stats
    assert (s["run"], s["models"], s["count"], s["max_tokens"]) == ("all", ["tiny_qwen25vl"], 8, MAX_TOKENS)
    assert s["words"] == pytest.approx(WORDS)
    assert s["generated_tokens"] == pytest.approx(TOKENS)
    assert s["empty"] == {"count": 2, "share": 0.25}
    assert s["truncated"] == {"count": 2, "share": 0.25}
    assert s["degenerate"] == {"count": 2, "share": 0.25, "repeated_ngram": 1, "repeated_lines": 1}
    assert s["vocabulary_size"] == VOCABULARY


def test_max_tokens_of_the_run_wins_over_the_configured_fallback():
    table = captions_table()
    assert evaluate(table, EvalConfig(max_tokens=11)).stats["truncated"] == {"count": 5, "share": 5 / 8}
    assert evaluate(table, EvalConfig(max_tokens=11), max_tokens=MAX_TOKENS).stats["truncated"]["count"] == 2
    unknown = evaluate(table, EvalConfig())
    assert unknown.stats["truncated"] == {"count": None, "share": None}
    assert unknown.rows.column("truncated").null_count == 8


def test_empty_table_and_missing_columns():
    ev = evaluate(captions_table(cases={}), EvalConfig(), max_tokens=MAX_TOKENS)
    assert ev.stats["count"] == 0 and ev.stats["words"]["p50"] is None and ev.stats["empty"]["share"] is None
    with pytest.raises(SourceError, match="caption"):
        evaluate(captions_table().drop_columns(["caption"]), EvalConfig())


def test_select_run():
    table = pa.concat_tables([captions_table(run_id="run1"), captions_table(run_id="run2").slice(0, 3)])
    assert select_run(table, "run2").num_rows == 3
    with pytest.raises(SourceError, match="run_id"):
        select_run(table.drop_columns(["run_id"]), "run1")


# --- config ------------------------------------------------------------------------------


@pytest.mark.parametrize("option", ["off", "stats", "judge"])
def test_eval_yaml_matches_the_dataclass(option):
    # Merging onto the structured schema fails on an unknown key or a wrongly typed value.
    merged = OmegaConf.merge(OmegaConf.structured(EvalConfig), OmegaConf.load(CONF_DIR / "eval" / f"{option}.yaml"))
    cfg = validate_eval(OmegaConf.to_object(merged))
    assert cfg.name == option and cfg.mode == EvalMode(option)
    # Every setting is spelled out in each option, as in the other groups.
    assert set(OmegaConf.load(CONF_DIR / "eval" / f"{option}.yaml")) == set(merged)


@pytest.mark.parametrize(
    "cfg,key",
    [
        (EvalConfig(max_tokens=0), "eval.max_tokens"),
        (EvalConfig(ngram=0), "eval.ngram"),
        (EvalConfig(ngram_repeats=1), "eval.ngram_repeats"),
        (EvalConfig(ngram_share=0.0), "eval.ngram_share"),
        (EvalConfig(line_repeats=1), "eval.line_repeats"),
        (EvalConfig(mode=EvalMode.judge), "eval.judge.model.source"),
    ],
)
def test_bad_eval_values_fail_naming_the_key(cfg, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate_eval(cfg)


# --- against a reference ----------------------------------------------------------------

# id -> (caption, reference): exact match ignores case and punctuation, not word order.
REFERENCED = {
    "r1": ("A red circle on a white background.", "a red circle on a white background"),
    "r2": ("a blue square and a red circle on a black background", "a red circle and a blue square on a black background"),
    "r3": ("a green star on a gray background", "a yellow star on a gray background"),
    "r4": ("", "a purple triangle on a white background"),
    "r5": ("a cat on a mat", None),  # no reference: not scored
}


def referenced_table() -> pa.Table:
    table = captions_table({k: (c, 8, 0, "") for k, (c, _) in REFERENCED.items()})
    return table.append_column("reference", pa.array([r for _, r in REFERENCED.values()], pa.string()))


def test_word_f1_known_values():
    assert word_f1(["a", "red", "circle"], ["a", "red", "circle"]) == 1.0
    assert word_f1(["a", "red", "circle"], ["circle", "red", "a"]) == 1.0  # a bag of words
    assert word_f1(["a", "red", "circle"], ["blue", "square"]) == 0.0
    # 2 shared of 3 and of 4 words: P = 2/3, R = 1/2, F1 = 4/7.
    assert word_f1(["a", "red", "dot"], ["a", "red", "big", "circle"]) == pytest.approx(4 / 7)
    assert word_f1([], []) == 1.0 and word_f1([], ["a"]) == 0.0


def test_reference_metrics_per_row_and_over_the_run():
    ev = evaluate(referenced_table(), EvalConfig(reference_column="reference"))
    rows = {r["id"]: r for r in ev.rows.to_pylist()}
    assert [rows[i]["exact_match"] for i in REFERENCED] == [True, False, False, False, None]
    assert rows["r2"]["word_f1"] == 1.0 and rows["r4"]["word_f1"] == 0.0 and rows["r5"]["word_f1"] is None
    assert rows["r3"]["word_f1"] == pytest.approx(6 / 7)  # 6 of 7 words shared both ways
    r = ev.stats["reference"]
    assert r["column"] == "reference" and r["count"] == 4
    assert r["exact_match"] == {"count": 1, "share": 0.25}
    assert r["word_f1"] == pytest.approx((1 + 1 + 6 / 7 + 0) / 4)
    assert 0 < r["bleu4"] < 1 and r["cider"] > 0
    md = render_markdown(ev.stats)
    assert "## Against the reference (`reference`)" in md and "| 1 (25.0%) | 0.714 |" in md


def test_coco_scores_rank_better_captions_higher():
    refs = [c for _, c in REFERENCED.values() if c]
    perfect = evaluate(captions_table({f"p{i}": (c, 8, 0, "") for i, c in enumerate(refs)})
                       .append_column("reference", pa.array(refs)), EvalConfig(reference_column="reference"))
    worse = evaluate(referenced_table(), EvalConfig(reference_column="reference"))
    assert perfect.stats["reference"]["exact_match"]["share"] == 1.0
    assert perfect.stats["reference"]["bleu4"] == pytest.approx(1.0, abs=1e-6)
    assert perfect.stats["reference"]["cider"] > worse.stats["reference"]["cider"]
    assert perfect.stats["reference"]["bleu4"] > worse.stats["reference"]["bleu4"]


def test_a_missing_reference_column_is_one_line():
    with pytest.raises(SourceError, match=r"eval.reference_column: 'truth' is not a column") as e:
        evaluate(captions_table(), EvalConfig(reference_column="truth"))
    assert "\n" not in str(e.value)


def test_cli_scores_against_a_reference_column(tmp_path, capsys):
    out = write_output(tmp_path / "out", referenced_table())
    main([str(out), "--reference-column", "reference"])
    stats = json.loads((out / "eval.json").read_text())
    assert stats["reference"]["exact_match"]["count"] == 1
    table = pq.read_table(out / "evaluation" / "all.parquet")
    assert table.column("exact_match").to_pylist().count(True) == 1


def test_compare_markdown_shows_reference_metrics():
    a = evaluate(referenced_table(), EvalConfig(reference_column="reference")).stats
    b = evaluate(captions_table(), EvalConfig()).stats
    lines = compare_markdown({"step-100": a, "step-600": b}).splitlines()
    assert "| exact match | word F1 | BLEU-4 | CIDEr-D |" in lines[0]
    assert "| 1 (25.0%) | 0.714 |" in lines[2] and lines[3].endswith("| n/a | n/a | n/a | n/a |")


# --- reports -----------------------------------------------------------------------------


def test_evaluate_output_writes_report_and_table(tmp_path):
    table = pa.concat_tables([captions_table(run_id="run1"), captions_table(run_id="run2").slice(0, 3)])
    out = write_output(tmp_path / "out", table)
    ev, written = evaluate_output(SinkConfig(path=str(out)), EvalConfig(), tmp_path / "report", run_id="run1", max_tokens=MAX_TOKENS)
    assert ev.stats["count"] == 8 and ev.stats["run"] == "run1"
    assert written == {
        "table": f"{out}/evaluation/run1.parquet",
        "json": str(tmp_path / "report" / "eval.json"),
        "markdown": str(tmp_path / "report" / "eval.md"),
        "histogram": str(tmp_path / "report" / "caption_length_hist.png"),
    }
    assert pq.read_table(out / "evaluation" / "run1.parquet").equals(ev.rows)

    stats = json.loads((tmp_path / "report" / "eval.json").read_text())
    assert stats["degenerate"]["count"] == 2 and stats["vocabulary_size"] == VOCABULARY
    assert stats["source"] == f"{out}/captions" and stats["evaluation_table"] == written["table"]

    md = (tmp_path / "report" / "eval.md").read_text()
    assert "| | mean | p5 | p50 | p95 |" in md
    assert "| words | 7.2 | 0.0 | 8.0 | 14.8 |" in md
    assert "| truncated | generated_tokens >= 20 (no finish reason in the output) | 2 (25.0%) |" in md
    assert "| degenerate | repeated 3-grams or repeated lines | 2 (25.0%) |" in md
    assert f"Vocabulary: {VOCABULARY} distinct" in md and "(caption_length_hist.png)" in md

    png = tmp_path / "report" / "caption_length_hist.png"
    assert png.read_bytes().startswith(PNG_SIGNATURE)
    with Image.open(png) as image:
        image.verify()
        assert image.format == "PNG" and image.size == (1000, 400)


@pytest.mark.parametrize("files", [0, 1])  # no caption file (all quarantined), or an empty one
def test_report_of_no_captions_still_writes(tmp_path, files):
    out = write_output(tmp_path / "out", captions_table(cases={}), files=files)
    ev, written = evaluate_output(SinkConfig(path=str(out)), EvalConfig(), tmp_path / "report", run_id="run1")
    assert ev.stats["count"] == 0
    assert "| words | n/a | n/a | n/a | n/a |" in pathlib.Path(written["markdown"]).read_text()
    assert pathlib.Path(written["histogram"]).read_bytes().startswith(PNG_SIGNATURE)


def test_compare_markdown():
    a = evaluate(captions_table(), EvalConfig(), max_tokens=MAX_TOKENS).stats
    b = evaluate(captions_table({k: CASES[k] for k in "fgh"}), EvalConfig()).stats
    lines = compare_markdown({"ckpt-1000": a, "ckpt-2000": b}).splitlines()
    assert lines[0].startswith("| | captions | words mean |") and len(lines) == 4
    assert lines[2] == "| ckpt-1000 | 8 | 7.2 | 8.0 | 14.8 | 11.8 | 2 (25.0%) | 2 (25.0%) | 2 (25.0%) | 36 |"
    assert lines[3] == "| ckpt-2000 | 3 | 8.0 | 8.0 | 8.9 | 11.3 | 0 (0.0%) | n/a | 0 (0.0%) | 20 |"


# --- capjob-eval -------------------------------------------------------------------------


def test_cli_defaults_to_the_output_dir(tmp_path, capsys):
    out = write_output(tmp_path / "out", captions_table())
    main([str(out), "--max-tokens", str(MAX_TOKENS)])
    printed = capsys.readouterr().out
    for name in ("eval.json", "eval.md", "caption_length_hist.png", "evaluation/all.parquet"):
        assert (out / name).is_file() and str(out / name) in printed
    assert json.loads((out / "eval.json").read_text())["truncated"]["count"] == 2


def test_cli_out_dir_and_unknown_truncation(tmp_path, capsys):
    out = write_output(tmp_path / "out", captions_table())
    main([str(out), "--out", str(tmp_path / "report")])
    stats = json.loads((tmp_path / "report" / "eval.json").read_text())
    assert stats["truncated"]["share"] is None and stats["count"] == 8
    assert "| truncated | max_tokens unknown" in (tmp_path / "report" / "eval.md").read_text()
    assert not (out / "eval.json").exists()


def test_cli_reads_a_jsonl_sink(tmp_path, capsys):
    sink = SinkConfig(path=str(tmp_path / "out"), format=SinkFormat.jsonl, compression="gzip")
    TableWriter(sink).write("captions", captions_table(), "run1-0")
    assert output_sink(sink.path).format == SinkFormat.jsonl
    main([sink.path, "--max-tokens", str(MAX_TOKENS)])
    assert json.loads((tmp_path / "out" / "eval.json").read_text())["degenerate"]["count"] == 2
    assert (tmp_path / "out" / "evaluation" / "all.parquet").is_file()


def bad_outputs(tmp: pathlib.Path) -> dict[str, tuple[str, str]]:
    write_output(tmp / "nocaption", captions_table().drop_columns(["caption"]), files=1)
    (tmp / "empty").mkdir()
    (write_output(tmp / "unwritable", captions_table()) / "evaluation").touch()  # a file where the folder goes
    return {
        "missing path": (str(tmp / "nope"), "does not exist"),
        "not an output": (str(tmp / "empty"), "no caption files under"),
        "no caption column": (str(tmp / "nocaption"), "no column(s) ['caption']"),
        "evaluation not writable": (str(tmp / "unwritable"), f"cannot write '{tmp / 'unwritable'}/evaluation'"),
    }


@pytest.mark.parametrize("case", ["missing path", "not an output", "no caption column", "evaluation not writable"])
def test_cli_bad_input_is_one_line(tmp_path, capsys, case):
    output, message = bad_outputs(tmp_path)[case]
    with pytest.raises(SystemExit) as e:
        main([output])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("capjob-eval: error: ") and message in err and err.count("\n") == 1


def test_cli_rejects_a_bad_max_tokens(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main([str(write_output(tmp_path / "out", captions_table())), "--max-tokens", "0"])
    assert e.value.code == 2 and "capjob-eval: error: argument --max-tokens: must be > 0" in capsys.readouterr().err


def test_cli_process_error_has_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", "from capjob.reporting.evaluation import main; main()", str(tmp_path / "nope")],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"capjob-eval: error: {str(tmp_path / 'nope')!r} does not exist"


def test_cli_on_s3(tmp_path, monkeypatch, capsys):
    s3fs = pytest.importorskip("s3fs")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        host, port = server.get_host_and_port()
        for key, value in {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "test",
                           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}.items():
            monkeypatch.setenv(key, value)
        s3fs.S3FileSystem.clear_instance_cache()  # a cached instance would keep another endpoint
        fs = s3fs.S3FileSystem()
        fs.mkdir("bucket")
        with fs.open("bucket/runs/r1/captions/run1-0.parquet", "wb") as f:
            pq.write_table(captions_table(), f)
        monkeypatch.chdir(tmp_path)
        main(["s3://bucket/runs/r1", "--max-tokens", str(MAX_TOKENS)])
        assert "s3://bucket/runs/r1/evaluation/all.parquet" in capsys.readouterr().out
        assert json.loads((tmp_path / "eval-r1" / "eval.json").read_text())["degenerate"]["count"] == 2
        assert fs.exists("bucket/runs/r1/evaluation/all.parquet")
    finally:
        server.stop()
