"""A new user's first hour: each mistake ends in one `capjob: error:` line (exit 2) within seconds,
before Ray starts; the console, the report and the plots say what a person needs.

The CLI runs as a subprocess, as a user runs it. RAY_TMPDIR points into the test's folder, so
"Ray never started" is checked as "Ray created no session there"."""

import json
import os
import pathlib
import subprocess
import sys
import time

import pyarrow as pa
import pytest

from capjob.config import CapjobConfig, SinkConfig, SinkFormat
from helpers.config import REPO, compose, model_files

PREFLIGHT_LIMIT_S = 15


def capjob(tmp_path, *args, env=None):
    ray_tmp = tmp_path / "ray-tmp"
    ray_tmp.mkdir(exist_ok=True)
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "capjob", *args, f"hydra.run.dir={tmp_path}/run"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
        env={**os.environ, "RAY_TMPDIR": str(ray_tmp), "HF_HUB_OFFLINE": "1", **(env or {})},
    )
    proc.seconds = time.monotonic() - started
    proc.ray_started = any(ray_tmp.iterdir())
    return proc


def assert_one_line_error(proc, *fragments):
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("capjob: error: "), proc.stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert proc.seconds < PREFLIGHT_LIMIT_S, f"{proc.seconds:.1f} s"
    assert not proc.ray_started
    return lines[0]


def model_folder(path: pathlib.Path, *, processor=True, chat_template=True) -> pathlib.Path:
    """A checkpoint folder as a trainer writes it: the tiny model's files (weights a stand-in),
    without the processor or the chat template when asked."""
    return model_files(path, lacking=(() if processor else ("preprocessor_config.json",))
                       + (() if chat_template else ("chat_template.json",)))


# --- preflight: model, data, sink -------------------------------------------------------------


@pytest.mark.parametrize("case", ["missing_dir", "no_processor", "no_chat_template", "hub_offline", "hub_unreachable"])
def test_a_model_that_is_not_there_is_one_line_before_ray(tmp_path, case):
    env = None
    if case == "missing_dir":
        source, fragments = "/no/such/dir", ("model.source", "/no/such/dir", "not a folder")
    elif case == "no_processor":
        source, fragments = str(model_folder(tmp_path / "ckpt", processor=False)), ("model.source", "preprocessor_config.json")
    elif case == "no_chat_template":
        source, fragments = str(model_folder(tmp_path / "ckpt", chat_template=False)), ("model.source", "chat_template")
    elif case == "hub_offline":
        source, fragments = "capjob-tests/no-such-model", ("model.source", "not in the local Hugging Face cache", "HF_HUB_OFFLINE")
    else:  # a hub nobody listens to: the network error is one line too
        from helpers.prometheus import free_port

        source, fragments = "capjob-tests/no-such-model", ("model.source", "not reachable", "not in the local cache")
        env = {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}"}
    proc = capjob(tmp_path, "experiment=offline", f"model.source={source}", f"sink.path={tmp_path}/out",
                  f"hydra.run.dir={tmp_path}/run", env=env)
    assert_one_line_error(proc, *fragments)


@pytest.mark.parametrize("hub", ["offline", "unreachable"])
def test_the_judges_model_is_checked_before_the_run(tmp_path, hub):
    """eval=judge as configured by default names a hub model: one line before Ray when it is
    neither cached nor reachable, not a failure after the whole set was captioned."""
    from helpers.prometheus import free_port

    env = {} if hub == "offline" else {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}"}
    proc = capjob(tmp_path, "experiment=offline", "eval=judge", f"sink.path={tmp_path}/out", env=env)
    assert_one_line_error(proc, "eval.judge.model.source", "Qwen/Qwen2.5-7B-Instruct")


def test_a_complete_checkpoint_folder_passes_the_model_check(tmp_path):
    from capjob.config import ModelConfig
    from capjob.errors import ConfigError
    from capjob.preflight import check_model, check_model_renders

    folder = model_folder(tmp_path / "ckpt")
    assert check_model(str(folder), None) == f"local folder {tmp_path / 'ckpt'}"
    check_model_renders(folder, ModelConfig(), "You caption images.")
    # Older checkpoints keep the template inside tokenizer_config.json: the files are there, but
    # the multimodal processor the render loads does not read it.
    old = model_folder(tmp_path / "old", chat_template=False)
    template = json.loads((folder / "chat_template.json").read_text())["chat_template"]
    (old / "tokenizer_config.json").write_text(json.dumps({**json.loads((old / "tokenizer_config.json").read_text()),
                                                           "chat_template": template}))
    assert check_model(str(old), None).startswith("local folder")
    with pytest.raises(ConfigError, match=r"^model\.source: .*/old: the chat template does not render a one-image message"):
        check_model_renders(old, ModelConfig(), "You caption images.")


@pytest.mark.parametrize("fault", ["tokenizer.json", "preprocessor_config.json", "chat_template.json", "config.json"])
def test_a_corrupt_model_file_is_one_line_before_ray(tmp_path, fault):
    """Each file the render reads, corrupted (truncated JSON): one line naming the folder, exit 2,
    in seconds, Ray never started."""
    folder = model_folder(tmp_path / "ckpt")
    (folder / fault).write_text((folder / fault).read_text()[:40])
    proc = capjob(tmp_path, "experiment=offline", f"model.source={folder}", f"sink.path={tmp_path}/out")
    assert_one_line_error(proc, "model.source", str(folder))


def test_a_trainer_checkpoint_names_where_its_processor_is(tmp_path):
    """Weights + config only, the processor files in the run's folder above (as trainers save
    them): the line says what is missing and where those files are."""
    from capjob.errors import ConfigError
    from capjob.preflight import check_model

    run = model_files(tmp_path / "run", weights=False)
    (run / "config.json").unlink()
    ckpt = tmp_path / "run" / "step-100"
    ckpt.mkdir()
    (ckpt / "config.json").write_text((model_files(tmp_path / "full") / "config.json").read_text())
    (ckpt / "model.safetensors").write_bytes(b"\0" * 64)
    with pytest.raises(ConfigError, match=r"^model\.source: .*step-100 lacks tokenizer\.json.*\(they are in .*/run: trainers save"):
        check_model(str(ckpt), None)


@pytest.mark.parametrize("case", ["data", "model", "sink"])
def test_dry_run_runs_every_preflight(tmp_path, case):
    args = ["experiment=offline", "job.dry_run=true", f"sink.path={tmp_path}/out"]
    if case == "data":
        args += ["data.format=parquet", f"data.path={tmp_path}/no-such-data"]
        fragments = ("data.path", "no-such-data", "does not exist")
    elif case == "model":
        args += [f"model.source={tmp_path}/no-such-model"]
        fragments = ("model.source", "no-such-model")
    else:  # a sink below a regular file can never be created
        (tmp_path / "a-file").write_text("x")
        args[-1] = f"sink.path={tmp_path}/a-file/out"
        fragments = ("sink.path", "a-file")
    assert_one_line_error(capjob(tmp_path, *args), *fragments)


def test_dry_run_says_what_the_sink_holds_and_what_is_left(tmp_path):
    from capjob.schema import CAPTIONS, QUARANTINE
    from capjob.stages.tables import TableWriter

    writer = TableWriter(SinkConfig(path=str(tmp_path / "out")))
    writer.write(CAPTIONS, pa.table({"id": ["a", "b", "c"]}), "earlier-run-1")
    writer.write(QUARANTINE, pa.table({"id": ["d"]}), "earlier-run-1")
    # Captions without a record of their settings: the dry run refuses as the run does (job.resume).
    refused = capjob(tmp_path, "experiment=offline", "job.dry_run=true", "data.sample_size=6", f"sink.path={tmp_path}/out")
    assert_one_line_error(refused, "job.resume", "without a record of the settings")
    proc = capjob(tmp_path, "experiment=offline", "job.dry_run=true", "data.sample_size=6", f"sink.path={tmp_path}/out",
                  "job.resume=force")
    assert proc.returncode == 0, proc.stderr[-3000:]
    # 12 photos + 6 generated images + 24 shape scenes (data.sample_shapes); the sink's 4 ids may
    # be none of theirs (they are not), so between 38 and 42 are left.
    assert "4 id(s) already in the sink; source rows: 42; left to caption: 38 to 42" in proc.stdout
    assert not proc.ray_started and proc.seconds < PREFLIGHT_LIMIT_S


# --- keys, Hydra's own errors, --help -----------------------------------------------------------


@pytest.mark.parametrize("override", ["engine.batchsize=4", "+engine.batchsize=4"])
def test_a_misspelled_key_is_refused_with_the_close_ones(tmp_path, override):
    line = assert_one_line_error(capjob(tmp_path, "experiment=offline", override), "engine.batchsize", "unknown key")
    assert "did you mean engine.batch_size" in line
    assert "+engine" not in line  # Hydra's hint to add the key with + is not repeated


@pytest.mark.parametrize("args, fragments", [
    (["model=nope"], ("model=nope", "no such option", "tiny_qwen25vl")),
    (["engine.batch_size=abc"], ("engine.batch_size", "'abc'", "Integer")),
    (["data.format=csv"], ("data.format", "csv", "image_folder")),
    (["engine.batch_size=[1"], ("engine.batch_size=[1",)),
    (["--multirun", "engine.batch_size=4,8", "engine.batchsize=2"], ("engine.batchsize", "did you mean engine.batch_size")),
])
def test_hydras_own_errors_follow_capjobs_convention(tmp_path, args, fragments):
    assert_one_line_error(capjob(tmp_path, "experiment=offline", *args), *fragments)


def test_unknown_keys_anywhere_but_free_form_dicts():
    from capjob.preflight import check_keys, unknown_keys
    from capjob.errors import ConfigError

    cfg = compose(["+engine.batchsize=4", "+egine.batch_size=2", "+eval.judge.temprature=0",
                   "+engine.env_vars.VLLM_X=1", "+data.storage_options.anon=true"])
    assert unknown_keys(cfg, CapjobConfig) == ["engine.batchsize", "eval.judge.temprature", "egine"]
    with pytest.raises(ConfigError, match=r"engine\.batchsize: unknown key; did you mean engine\.batch_size"):
        check_keys(cfg)
    check_keys(compose(["+engine.extra_engine_kwargs.seed=1"]))


def test_help_says_what_capjob_is_with_examples(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "capjob", "--help"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    head = proc.stdout.splitlines()[:10]
    assert head[0].startswith("capjob: caption an image dataset")
    assert sum(line.strip().startswith("capjob ") for line in head) == 3
    assert "powered by Hydra" not in proc.stdout


# --- console, report, plots ----------------------------------------------------------------------


def test_progress_line():
    from capjob.console import progress_line

    assert progress_line(0, 0, 36, None) == "captioned 0 / 36 · waiting for the first caption · quarantined 0"
    assert progress_line(12, 2, 36, 2.0) == "captioned 12 / 36 · 2.00 images/s · ETA 11 s · quarantined 2"
    assert progress_line(5, 0, None, 0.5) == "captioned 5 · 0.50 images/s · quarantined 0"


def test_progress_off_a_terminal_prints_a_line_per_quarter(capsys):
    from capjob.console import Progress

    counts = iter([{"captioned": n, "skipped": 4} for n in (0, 3, 6, 9, 10, 11, 12, 16)])
    last = {}

    def totals():
        last.update(next(counts, last))
        return dict(last)

    with Progress(totals, total_rows=20, interval_s=0.01):
        time.sleep(0.5)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" · ")[0] for line in lines] == ["captioned 6 / 16", "captioned 9 / 16", "captioned 12 / 16", "captioned 16 / 16"]


def test_timeline_splits_start_up_from_steady_captioning():
    from capjob.reporting.report import throughput_series, timeline

    t0 = 1000.0
    events = [(t0 + 60, 8), (t0 + 62, 8), (t0 + 64, 8)]
    t = timeline(events, t0, t0 + 65, engine_ready_at=t0 + 55)
    assert t["engine_ready_s"] == 55 and t["first_caption_s"] == 60
    assert t["startup_seconds"] == 60 and t["steady_seconds"] == 5
    assert t["steady_rows_per_second"] == 3.2  # 16 rows after the first block, over the 5 steady seconds
    starts, rate = throughput_series(events, t0, t0 + 65)
    assert starts[0] == 0 and rate[starts < 55].sum() == 0  # from t = 0: nothing before the first caption
    assert rate.sum() * (starts[1] - starts[0]) == pytest.approx(24)


class _Op:
    def __init__(self, name, rows_in, rows_out, seconds):
        self.operator_name, self.total_input_num_rows, self.time_total_s = name, rows_in, seconds
        self.output_num_rows = type("M", (), {"sum": rows_out})() if rows_out is not None else None


class _Level:
    def __init__(self, ops, parents=()):
        self.operators_stats, self.parents = ops, list(parents)

    def to_string(self):
        return "stats"


class _Stats:
    def __init__(self, summary):
        self._summary = summary

    def get_stats_summary(self):
        return self._summary


def test_operator_table_in_pipeline_order_without_none_and_write_rows():
    from capjob.reporting import report

    read = _Level([_Op("ReadFiles", None, None, 0.0), _Op("ReadFilesParquetV2", None, 36, 0.5)])
    engine = _Level([_Op("MapBatches(vLLMEngineStageUDF)", 36, 36, 9.0)], [read])
    write = _Level([_Op("Map(CaptionRecord)->Write", 36, 2, 3.0)], [engine])  # 2 written blocks
    rows, _ = report.operator_stats(_Stats(write))
    assert [r["operator"] for r in rows] == ["ReadFilesParquetV2", "MapBatches(vLLMEngineStageUDF)", "Map(CaptionRecord)->Write"]
    assert rows[-1]["output_rows"] == 36 and rows[-1]["rows_per_second"] == 12.0
    md = report.markdown({
        "run_id": "r", "output": "o", "quarantine": "q", "config_hash": "h", "gpus": {"count": 0, "types": []}, "versions": {},
        "rows_read": 36, "skipped_done": 0, "captioned": 36, "quarantined": 0, "quarantined_images": 0, "quarantined_engine": 0,
        "wall_seconds": 70.0, "rows_per_second": 0.5, "generated_tokens_per_second": 1, "prompt_tokens_per_second": 1,
        "caption_words": {"mean": 1, "p50": 1, "p95": 1}, "quarantined_by_reason": {}, "operators": rows,
        "timeline": {"first_caption_s": 60.0, "engine_ready_s": 55.0, "startup_seconds": 60.0, "steady_seconds": 10.0,
                     "steady_rows_per_second": 3.2},
    })
    assert "None" not in md
    assert "| wall time | 70.0 s = start-up 60.0 s (to the first caption, engine ready at 55.0 s) + steady captioning 10.0 s |" in md


def test_jsonl_zstd_reads_back_with_pandas(tmp_path):
    import pandas as pd

    from capjob.schema import CAPTIONS

    from capjob.stages.tables import TableWriter

    writer = TableWriter(SinkConfig(path=str(tmp_path), format=SinkFormat.jsonl, compression="zstd"))
    path = writer.write(CAPTIONS, pa.table({"id": ["a", "b"], "caption": ["a cat", "a dog"]}), "run-1")
    assert path.endswith(".jsonl.zst")
    assert pd.read_json(path, lines=True)["caption"].tolist() == ["a cat", "a dog"]


def test_dashboard_on_unless_switched_off(monkeypatch):
    from capjob.runtime import _include_dashboard

    cfg = CapjobConfig()
    monkeypatch.delenv("CAPJOB_RAY_DASHBOARD", raising=False)
    assert _include_dashboard(cfg.resources) is None  # ray.init's own default: on where ray[default] is installed
    monkeypatch.setenv("CAPJOB_RAY_DASHBOARD", "0")
    assert _include_dashboard(cfg.resources) is False
    cfg.resources.include_dashboard = True
    monkeypatch.setenv("CAPJOB_RAY_DASHBOARD", "")
    assert _include_dashboard(cfg.resources) is True



# --- Ctrl-C: a real run, interrupted as a terminal does (SIGINT to the process group) -----------


@pytest.mark.e2e
def test_ctrl_c_is_one_line_and_leaves_a_partial_report(tmp_path):
    import re
    import signal

    import pyarrow.parquet as pq

    out = tmp_path / "out"
    proc = subprocess.Popen(
        # 300 shape scenes: the trained model captions the sample's 96 rows in ~12 s once the
        # engine is up, so the first file could land as the run ends and Ctrl-C find nothing to stop.
        [sys.executable, "-m", "capjob", "experiment=offline", "data.sample_size=60", "data.sample_shapes=300", "engine.batch_size=4",
         f"sink.path={out}", f"hydra.run.dir={tmp_path}/run"],
        cwd=REPO, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # As a terminal would: a pytest started in the background of a non-interactive shell
        # inherits SIGINT ignored, and Python then never turns it into KeyboardInterrupt.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.time() + 600
    while not list((out / "captions").glob("*.parquet")):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, "no caption was written"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-3000:]
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr[-3000:]
    match = re.fullmatch(r"capjob: interrupted after (\d+) captions; run the same command to resume \(partial report: (.+)\)", lines[0])
    assert match, lines[0]
    written = sum(pq.read_metadata(f).num_rows for f in (out / "captions").glob("*.parquet"))
    assert int(match.group(1)) == written > 0
    report = json.loads((pathlib.Path(match.group(2)) / "report.json").read_text())
    assert report["interrupted"] is True and report["captioned"] == written
    assert "Interrupted" in (tmp_path / "run" / "report.md").read_text()
    assert "Traceback" not in stdout + stderr
