"""capjob-watch without Ray: when a checkpoint counts as complete (stable listing, marker,
half-written folders), exactly-once evaluation across restarts and rewrites in place, the
leaderboard files and the stop conditions, on local folders and on an S3 server (moto). The
evaluation itself is a stand-in here; tests/test_watch_e2e.py runs real ones."""

import csv
import json
import pathlib
import subprocess
import sys

import pytest

from capjob.config import EvalConfig, EvalMode, WatchConfig, validate_watch
from capjob.errors import ConfigError
from capjob.watch import STATE_FILE, Checkpoint, Folder, Watcher, check_watch, checkpoint_config
from helpers.config import REPO, compose, model_files

PNG = b"\x89PNG"


class Clock:
    """A clock the test moves: idle timeouts and incomplete_after_s without waiting."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        self.now += seconds


def scores_by_step(checkpoint: Checkpoint) -> dict:
    """A stand-in evaluation: later checkpoints score higher."""
    return {"status": "succeeded", "exact_match": min(1.0, checkpoint.step / 1000), "word_f1": min(1.0, checkpoint.step / 800),
            "captioned": 8, "quarantined": 0}


def raising_at(step, error):
    """A stand-in evaluation that raises `error` on the checkpoint of that step."""

    def evaluate(checkpoint):
        if checkpoint.step == step:
            raise error
        return scores_by_step(checkpoint)

    return evaluate


def make_watcher(path, sink, evaluate=scores_by_step, clock=None, **cfg):
    clock = clock or Clock()
    calls = []

    def recorded(checkpoint):
        calls.append((checkpoint.name, checkpoint.fingerprint))
        return evaluate(checkpoint)

    watcher = Watcher(WatchConfig(path=str(path), poll_interval_s=1, **cfg), str(sink), recorded, clock=clock, sleep=clock.sleep,
                      say=lambda line: None)
    return watcher, calls


def ready_names(watcher):
    ready, _ = watcher.poll()
    return [c.name for c in ready]


# --- completeness ------------------------------------------------------------------------


def test_a_checkpoint_is_complete_once_two_listings_agree(tmp_path):
    model_files(tmp_path / "ckpt" / "step-100")
    watcher, _ = make_watcher(tmp_path / "ckpt", tmp_path / "sink")
    assert ready_names(watcher) == []  # first sight: the trainer may still be writing
    ready, busy = watcher.poll()
    assert [c.name for c in ready] == ["step-100"] and busy
    assert ready[0].step == 100 and ready[0].problem is None and ready[0].url == str(tmp_path / "ckpt" / "step-100")


def test_a_half_written_checkpoint_is_never_ready(tmp_path):
    """Written in two halves: config and tokenizer first, a pause (stable listings), then the
    weights and the processor. Not ready until the second half is there and listed twice."""
    full = model_files(tmp_path / "full")
    folder = tmp_path / "ckpt" / "checkpoint-200"
    folder.mkdir(parents=True)
    names = sorted(f.name for f in full.iterdir())
    first = [n for n in names if n in ("config.json", "tokenizer.json", "tokenizer_config.json")]
    for n in first:
        (folder / n).write_bytes((full / n).read_bytes())
    watcher, _ = make_watcher(tmp_path / "ckpt", tmp_path / "sink")
    for _ in range(4):  # stable, but lacking weights and processor: waiting, not idle
        ready, busy = watcher.poll()
        assert ready == [] and busy
    # a file still growing: another size between polls
    (folder / "model.safetensors").write_bytes(b"\0" * 100)
    assert ready_names(watcher) == []
    (folder / "model.safetensors").write_bytes(b"\0" * 2048)
    assert ready_names(watcher) == []
    for n in names:
        (folder / n).write_bytes((full / n).read_bytes())
    assert ready_names(watcher) == []  # changed since the last poll
    assert ready_names(watcher) == ["checkpoint-200"]


def test_a_stable_checkpoint_lacking_files_fails_after_incomplete_after_s(tmp_path):
    model_files(tmp_path / "ckpt" / "step-5", lacking=("preprocessor_config.json",))
    clock = Clock()
    watcher, calls = make_watcher(tmp_path / "ckpt", tmp_path / "sink", clock=clock, incomplete_after_s=60, max_checkpoints=1)
    assert ready_names(watcher) == [] and ready_names(watcher) == []
    clock.now += 61
    ready, _ = watcher.poll()
    assert [c.name for c in ready] == ["step-5"] and "preprocessor_config.json" in ready[0].problem
    assert watcher.run().startswith("watch.max_checkpoints=1")
    row = watcher.state.rows["step-5"]
    assert row["status"] == "failed" and "lacks preprocessor_config.json" in row["error"] and calls == []  # never captioned
    assert "| 5 | step-5 | model.source:" in (tmp_path / "sink" / "leaderboard.md").read_text()


def test_a_marker_decides_completeness(tmp_path):
    model_files(tmp_path / "ckpt" / "step-10")
    watcher, _ = make_watcher(tmp_path / "ckpt", tmp_path / "sink", marker="COMPLETE")
    assert ready_names(watcher) == [] and ready_names(watcher) == []  # stable, but no marker
    (tmp_path / "ckpt" / "step-10" / "COMPLETE").write_text("")
    assert ready_names(watcher) == ["step-10"]  # at once: the trainer said so
    # a marker beside missing files: a failed row naming them, not a wait
    model_files(tmp_path / "ckpt" / "step-20", weights=False)
    (tmp_path / "ckpt" / "step-20" / "COMPLETE").write_text("")
    ready, _ = watcher.poll()
    assert {c.name: c.problem for c in ready}["step-20"].endswith("lacks weights (*.safetensors)")


def test_only_step_and_checkpoint_folders_are_checkpoints(tmp_path):
    for name in ("step-3", "checkpoint-12", "step_7", "runs", "step-x", "checkpoint-4.tmp"):
        model_files(tmp_path / "ckpt" / name)
    (tmp_path / "ckpt" / "step-99").write_text("a file, not a folder")
    assert Folder(str(tmp_path / "ckpt")).checkpoints() == [("step-3", 3), ("step_7", 7), ("checkpoint-12", 12)]
    assert Folder(str(tmp_path / "nothing-yet")).checkpoints() == []  # before the trainer's first save


def test_a_file_url_is_watched_as_the_local_folder(tmp_path):
    model_files(tmp_path / "ckpt" / "step-1")
    watcher, calls = make_watcher(f"file://{tmp_path}/ckpt/", tmp_path / "sink", max_checkpoints=1)
    watcher.run()
    row = watcher.state.rows["step-1"]
    assert row["status"] == "succeeded" and row["path"] == str(tmp_path / "ckpt" / "step-1") and calls[0][0] == "step-1"


# --- exactly once ------------------------------------------------------------------------


def test_each_checkpoint_is_evaluated_once_across_restarts_and_again_when_rewritten(tmp_path):
    ckpt, sink = tmp_path / "ckpt", tmp_path / "sink"
    model_files(ckpt / "step-100")
    model_files(ckpt / "step-200")
    watcher, calls = make_watcher(ckpt, sink, max_checkpoints=2)
    assert watcher.run().startswith("watch.max_checkpoints=2")
    assert [c[0] for c in calls] == ["step-100", "step-200"]  # in training order
    state = json.loads((sink / STATE_FILE).read_text())["checkpoints"]
    assert set(state) == {"step-100", "step-200"} and all(r["fingerprint"] for r in state.values())

    # a restarted watcher (same sink) skips both; a third checkpoint is the only work
    model_files(ckpt / "step-300")
    again, calls = make_watcher(ckpt, sink, max_checkpoints=3)
    assert again.run().startswith("watch.max_checkpoints=3") and [c[0] for c in calls] == ["step-300"]

    # step-200 rewritten in place (another weights file): evaluated again, its row replaced
    old = state["step-200"]["fingerprint"]
    (ckpt / "step-200" / "model.safetensors").write_bytes(b"\1" * 4096)
    third, calls = make_watcher(ckpt, sink, idle_timeout_s=5)
    assert third.run().startswith("no new checkpoint for 5 s")
    assert [c[0] for c in calls] == ["step-200"] and calls[0][1] != old
    rows = list(csv.DictReader((sink / "leaderboard.csv").open()))
    assert [r["checkpoint"] for r in rows] == ["step-100", "step-200", "step-300"]  # one row each
    assert json.loads((sink / STATE_FILE).read_text())["checkpoints"]["step-200"]["fingerprint"] == calls[0][1]


def test_a_watcher_killed_during_an_evaluation_redoes_only_that_one(tmp_path):
    ckpt, sink = tmp_path / "ckpt", tmp_path / "sink"
    model_files(ckpt / "step-1")
    model_files(ckpt / "step-2")

    watcher, _ = make_watcher(ckpt, sink, raising_at(2, KeyboardInterrupt()))  # Ctrl-C (or a kill) in the middle of step-2's run
    with pytest.raises(KeyboardInterrupt):
        watcher.run()
    # what finished is recorded and on the leaderboard; what was running is not
    assert list(json.loads((sink / STATE_FILE).read_text())["checkpoints"]) == ["step-1"]
    assert [r["checkpoint"] for r in csv.DictReader((sink / "leaderboard.csv").open())] == ["step-1"]
    restarted, calls = make_watcher(ckpt, sink, max_checkpoints=2)
    restarted.run()
    assert [c[0] for c in calls] == ["step-2"]


def test_a_failed_evaluation_is_a_row_and_the_watcher_goes_on(tmp_path):
    ckpt, sink = tmp_path / "ckpt", tmp_path / "sink"
    for step in (1, 2, 3):
        model_files(ckpt / f"step-{step}")

    def second_fails(checkpoint):
        if checkpoint.step == 2:
            return {"status": "failed", "error": "EngineDeadError: the engine died loading the weights"}
        return scores_by_step(checkpoint)

    watcher, calls = make_watcher(ckpt, sink, second_fails, max_checkpoints=3)
    watcher.run()
    assert [c[0] for c in calls] == ["step-1", "step-2", "step-3"]
    md = (sink / "leaderboard.md").read_text()
    assert "| 2 | step-2 | EngineDeadError: the engine died loading the weights |" in md
    assert "**Best checkpoint: step-3** (step 3)" in md


# --- stop conditions -----------------------------------------------------------------------


def test_stop_file_idle_timeout_and_max_checkpoints(tmp_path):
    ckpt, sink = tmp_path / "ckpt", tmp_path / "sink"
    ckpt.mkdir()
    clock = Clock()
    idle, _ = make_watcher(ckpt, sink, clock=clock, idle_timeout_s=30)
    assert idle.run() == "no new checkpoint for 30 s (watch.idle_timeout_s)" and clock.now >= 1030
    # a checkpoint being written keeps the watcher busy, not idle
    model_files(ckpt / "step-1", lacking=("config.json",))
    busy, _ = make_watcher(ckpt, sink, clock=Clock(), idle_timeout_s=30)
    for _ in range(40):
        busy.poll()
        busy.clock.now += 1
        assert busy.stop_reason() is None
    # the stop file (the default name, in the watched folder): training is over; the watcher
    # first gives every checkpoint written before it a row (this one fails: no config.json)
    (ckpt / "WATCH_STOP").write_text("")
    busy.cfg.incomplete_after_s = 5
    assert busy.run() == f"stop file {ckpt}/WATCH_STOP found, every checkpoint before it evaluated"
    assert busy.state.rows["step-1"]["status"] == "failed" and "lacks config.json" in busy.state.rows["step-1"]["error"]
    elsewhere = tmp_path / "flags" / "stop-now"
    other, calls = make_watcher(ckpt, sink, stop_file=str(elsewhere))
    elsewhere.parent.mkdir()
    elsewhere.write_text("")
    assert other.run() == f"stop file {elsewhere} found, every checkpoint before it evaluated" and calls == []


def test_config_checks_are_one_line():
    with pytest.raises(ConfigError, match=r"^watch\.poll_interval_s: must be > 0"):
        validate_watch(WatchConfig(poll_interval_s=0))
    for bad in (-1, float("inf"), float("nan")):
        with pytest.raises(ConfigError, match=r"^watch\.poll_interval_s: must be > 0 seconds and finite"):
            validate_watch(WatchConfig(poll_interval_s=bad))
    with pytest.raises(ConfigError, match=r"^watch\.incomplete_after_s: must be >= 0"):
        validate_watch(WatchConfig(incomplete_after_s=-5))
    with pytest.raises(ConfigError, match=r"^watch\.idle_timeout_s: must be > 0"):
        validate_watch(WatchConfig(idle_timeout_s=-1))
    with pytest.raises(ConfigError, match=r"^watch\.marker: must be a file name"):
        validate_watch(WatchConfig(marker="a/b"))
    with pytest.raises(ConfigError, match=r"^watch\.max_checkpoints: must be >= 1"):
        validate_watch(WatchConfig(max_checkpoints=0))
    cfg = compose(["experiment=offline"])
    from capjob.config import to_typed

    typed = to_typed(cfg)
    with pytest.raises(ConfigError, match=r"^watch\.path: set the folder"):
        check_watch(typed)
    typed.watch.path = "/ckpt"
    with pytest.raises(ConfigError, match=r"^eval: the leaderboard ranks checkpoints by score"):
        check_watch(typed)
    typed.eval = EvalConfig(mode=EvalMode.stats, reference_column="reference")
    check_watch(typed)


def test_a_checkpoint_run_is_the_watchers_config_on_that_checkpoint():
    cfg = compose(["experiment=offline", "eval=stats", "eval.reference_column=reference", "sink.path=s3://b/val"])
    job = checkpoint_config(cfg, Checkpoint("step-7", 7, "s3://b/ckpt/step-7", "ab" * 8, 0.0), "s3://b/val/")
    assert (job.model.source, job.model.builder, job.model.name) == ("s3://b/ckpt/step-7", None, "step-7")
    assert job.sink.path == "s3://b/val/checkpoints/step-7" and job.job.resume is False and job.job.name == "sample-step-7"
    assert cfg.model.builder == "tiny_qwen25vl"  # the watcher's own config is left as it was


def test_capjob_watch_refuses_a_missing_path_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "capjob.watch", "experiment=offline", "eval=stats", "eval.reference_column=reference",
                           f"hydra.run.dir={tmp_path}"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == ["capjob: error: watch.path: set the folder (or s3://... prefix) the trainer writes "
                                                "its step-N/ checkpoints into"]


# --- the leaderboard -------------------------------------------------------------------------


def test_leaderboard_writes_leave_no_partial_files(tmp_path):
    ckpt, sink = tmp_path / "ckpt", tmp_path / "sink"
    model_files(ckpt / "step-1")
    watcher, _ = make_watcher(ckpt, sink, max_checkpoints=1)
    watcher.run()
    assert sorted(p.name for p in sink.iterdir()) == ["leaderboard.csv", "leaderboard.md", "leaderboard.png", "watch"]
    assert [p.name for p in (sink / "watch").iterdir()] == ["state.json"]  # no temporary file left behind


# --- S3 --------------------------------------------------------------------------------------


def put_checkpoint(s3, local, url):
    for f in sorted(local.iterdir()):
        s3.fs.put_file(str(f), f"{url}/{f.name}")


def test_a_checkpoint_prefix_on_s3_is_watched_the_same_way(s3_env, tmp_path):
    s3 = s3_env
    bucket = s3.bucket("watch-unit")
    ckpt, sink = f"s3://{bucket}/run7/checkpoints", f"s3://{bucket}/run7/validation"
    full = model_files(tmp_path / "full")
    # the first half of step-50: stable but lacking the weights and processor
    half = [f for f in sorted(full.iterdir()) if f.name in ("config.json", "tokenizer.json", "tokenizer_config.json")]
    for f in half:
        s3.fs.put_file(str(f), f"{ckpt}/step-50/{f.name}")
    watcher, calls = make_watcher(ckpt, sink, max_checkpoints=1)
    assert ready_names(watcher) == [] and ready_names(watcher) == []
    put_checkpoint(s3, full, f"{ckpt}/step-50")
    assert ready_names(watcher) == []
    ready, _ = watcher.poll()
    assert [c.url for c in ready] == [f"{ckpt}/step-50"] and ready[0].problem is None
    assert watcher.run().startswith("watch.max_checkpoints=1") and [c[0] for c in calls] == ["step-50"]
    assert json.loads(s3.fs.cat_file(f"{sink}/{STATE_FILE}"))["checkpoints"]["step-50"]["status"] == "succeeded"
    assert s3.fs.cat_file(f"{sink}/leaderboard.png")[:4] == PNG and "step-50" in s3.fs.cat_file(f"{sink}/leaderboard.csv").decode()

    # restarted: skipped; rewritten in place (new ETag): evaluated again
    again, calls = make_watcher(ckpt, sink, idle_timeout_s=3)
    again.run()
    assert calls == []
    s3.fs.pipe_file(f"{ckpt}/step-50/model.safetensors", b"\2" * 4096)
    third, calls = make_watcher(ckpt, sink, idle_timeout_s=3)
    third.run()
    assert [c[0] for c in calls] == ["step-50"]
    # a stop file on S3
    s3.fs.pipe_file(f"{ckpt}/WATCH_STOP", b"")
    stopped, _ = make_watcher(ckpt, sink)
    assert stopped.run() == f"stop file {ckpt}/WATCH_STOP found, every checkpoint before it evaluated"


# --- the command, without an engine --------------------------------------------------------------


def watch_command(tmp_path, *extra):
    return [sys.executable, "-m", "capjob.watch", "experiment=offline", "eval=stats", "eval.reference_column=reference",
            f"watch.path={tmp_path / 'ckpt'}", f"sink.path={tmp_path / 'sink'}", f"hydra.run.dir={tmp_path / 'run'}", *extra]


def test_capjob_watch_stops_with_one_line_and_the_leaderboard_written(tmp_path):
    """A checkpoint the trainer marked complete but that lacks its weights: a failed row (no
    engine starts), then the idle timeout stops the watcher with one line."""
    model_files(tmp_path / "ckpt" / "step-30", weights=False)
    (tmp_path / "ckpt" / "step-30" / "DONE").write_text("")
    proc = subprocess.run(watch_command(tmp_path, "watch.marker=DONE", "watch.poll_interval_s=0.2", "watch.idle_timeout_s=1"),
                          capture_output=True, text=True, cwd=REPO, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith(f"capjob-watch: watching {tmp_path / 'ckpt'} every 0.2 s;")
    assert lines[-2].startswith("capjob-watch: step-30 (step 30): failed: model.source: ") and "lacks weights" in lines[-2]
    assert lines[-1] == (f"capjob-watch: stopped: no new checkpoint for 1 s (watch.idle_timeout_s); 1 checkpoint(s) evaluated by "
                         f"this watcher, 1 on the leaderboard {tmp_path / 'sink'}/leaderboard.md")
    assert "| 30 | step-30 | model.source:" in (tmp_path / "sink" / "leaderboard.md").read_text()


@pytest.mark.parametrize("signum", ["SIGINT", "SIGTERM"])
def test_ctrl_c_or_sigterm_stops_the_watcher_with_one_line(tmp_path, signum):
    """Ctrl-C, and SIGTERM (`ray job stop`, kill): one line, exit 128 + the signal's number."""
    import signal
    import time

    (tmp_path / "ckpt").mkdir()
    out = tmp_path / "stdout.txt"
    with out.open("w") as stdout:
        proc = subprocess.Popen(watch_command(tmp_path, "watch.poll_interval_s=0.2"), stdout=stdout, stderr=subprocess.PIPE, text=True,
                                cwd=REPO)
        try:
            deadline = time.monotonic() + 120
            while "capjob-watch: watching" not in out.read_text() and time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.2)
            time.sleep(1)  # a few polls
            proc.send_signal(getattr(signal, signum))
            _, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 128 + getattr(signal, signum), err[-3000:]
    assert err.strip().splitlines() == [f"capjob-watch: interrupted; 0 checkpoint(s) on the leaderboard ({tmp_path / 'sink'}/"
                                        "leaderboard.md, up to date); run the same command to go on"]


def test_a_listing_that_fails_once_is_retried_and_a_bad_store_is_one_line(tmp_path, s3_env):
    model_files(tmp_path / "ckpt" / "step-1")
    watcher, calls = make_watcher(tmp_path / "ckpt", tmp_path / "sink", max_checkpoints=1)
    lines, listed = [], watcher.folder.checkpoints
    watcher.say = lines.append
    failures = iter([OSError("connection reset by peer")])

    def flaky():
        for error in failures:
            raise error
        return listed()

    watcher.folder.checkpoints = flaky
    assert watcher.run().startswith("watch.max_checkpoints=1") and [c[0] for c in calls] == ["step-1"]
    assert lines[0].startswith(f"capjob-watch: listing {tmp_path / 'ckpt'} failed (") and "trying again in 1 s" in lines[0]
    with pytest.raises(ConfigError, match=r"^watch\.path: the bucket of 's3://no-such-bucket-here/ckpt' does not exist"):
        make_watcher("s3://no-such-bucket-here/ckpt", tmp_path / "sink")


# --- waits that end ------------------------------------------------------------------------------


def test_an_empty_folder_or_a_marker_that_never_comes_is_a_failed_row_not_an_endless_wait(tmp_path):
    """The trainer died mid-save: an empty step folder, or files without the marker. Each is a
    failed row after watch.incomplete_after_s, so the stop file and the idle timeout still stop
    the watcher; a marker written later (a hidden _SUCCESS too) has the checkpoint evaluated."""
    ckpt, sink = tmp_path / "ckpt", tmp_path / "sink"
    (ckpt / "step-1").mkdir(parents=True)
    (ckpt / "WATCH_STOP").write_text("")
    clock = Clock()
    watcher, calls = make_watcher(ckpt, sink, clock=clock, incomplete_after_s=10)
    assert watcher.run() == f"stop file {ckpt}/WATCH_STOP found, every checkpoint before it evaluated"
    assert clock.now < 1100 and calls == []
    assert "is empty 10 s after it appeared" in watcher.state.rows["step-1"]["error"]

    (ckpt / "WATCH_STOP").unlink()
    model_files(ckpt / "step-2")
    clock = Clock()
    marked, calls = make_watcher(ckpt, sink, clock=clock, incomplete_after_s=10, idle_timeout_s=50, marker="_SUCCESS")
    assert marked.run() == "no new checkpoint for 50 s (watch.idle_timeout_s)" and clock.now < 1200 and calls == []
    assert "no _SUCCESS marker" in marked.state.rows["step-2"]["error"]
    (ckpt / "step-2" / "_SUCCESS").write_text("")
    again, calls = make_watcher(ckpt, sink, incomplete_after_s=10, idle_timeout_s=50, marker="_SUCCESS")
    again.run()
    assert [c[0] for c in calls] == ["step-2"] and again.state.rows["step-2"]["status"] == "succeeded"


def test_an_evaluation_that_raises_is_a_failed_row_and_the_watcher_goes_on(tmp_path):
    ckpt, sink = tmp_path / "ckpt", tmp_path / "sink"
    model_files(ckpt / "step-1")
    model_files(ckpt / "step-2")
    watcher, calls = make_watcher(ckpt, sink, raising_at(1, RuntimeError("Ray did not start: the GCS is unreachable\nsecond line")),
                                  max_checkpoints=2)
    assert watcher.run().startswith("watch.max_checkpoints=2") and [c[0] for c in calls] == ["step-1", "step-2"]
    assert watcher.state.rows["step-1"]["error"] == "RuntimeError: Ray did not start: the GCS is unreachable"
    assert "| 1 | step-1 | RuntimeError: Ray did not start: the GCS is unreachable |" in (sink / "leaderboard.md").read_text()


def test_checkpoint_folder_names_trainers_write(tmp_path):
    for name in ("global_step500", "step40", "step-000100", "iter_0000300", "checkpoint_7", "Checkpoint-9",
                 "latest", "tmp-checkpoint-8", "step-6.tmp", "step-5-tmp", "global_step"):
        (tmp_path / "ckpt" / name).mkdir(parents=True)
    assert Folder(str(tmp_path / "ckpt")).checkpoints() == [
        ("checkpoint_7", 7), ("Checkpoint-9", 9), ("step40", 40), ("step-000100", 100), ("iter_0000300", 300), ("global_step500", 500)]


def test_a_watch_path_that_cannot_hold_checkpoints_is_one_line(tmp_path):
    model_files(tmp_path / "run" / "checkpoints" / "step-100")
    with pytest.raises(ConfigError, match=r"^watch\.path: .*/run holds no step-N/ or checkpoint-N/ folder, .*/run/checkpoints does: "):
        make_watcher(tmp_path / "run", tmp_path / "sink")
    with pytest.raises(ConfigError, match=r"^watch\.path: .*/step-100 is a checkpoint itself \(it holds config.json and weights\); watch"):
        make_watcher(tmp_path / "run" / "checkpoints" / "step-100", tmp_path / "sink")
    make_watcher(tmp_path / "run" / "checkpoints", tmp_path / "sink")
    make_watcher(tmp_path / "run", tmp_path / "run")  # the sink's own checkpoints/<name>/ outputs are not checkpoints
    make_watcher(tmp_path / "not-yet", tmp_path / "sink")  # training has not started: fine
    model_files(tmp_path / "output", weights=False)  # the processor saved into the trainer's output folder at start
    make_watcher(tmp_path / "output", tmp_path / "sink")
    (tmp_path / "empty").mkdir()
    make_watcher(tmp_path / "empty", tmp_path / "sink")


# --- weights still being written -----------------------------------------------------------------


def real_weights(path):
    """A real safetensors file (the tiny model's) and its bytes."""
    from capjob import models

    built = pathlib.Path(models.resolve_model_source(None, models.TINY_QWEN25VL))
    return next(built.glob("*.safetensors")).read_bytes()


def test_weights_cut_short_or_a_missing_shard_are_never_captioned(tmp_path, s3_env):
    """Every file is there and the listing is stable, but the trainer paused half-way through
    the weights (a file shorter than its safetensors header says) or between two shards (the
    index names a shard not yet written): waiting, then a failed row naming what is missing."""
    weights = real_weights(tmp_path)
    ckpt, sink = tmp_path / "ckpt", tmp_path / "sink"
    half = model_files(ckpt / "step-1", weights=False)
    (half / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    sharded = model_files(ckpt / "step-2", weights=False)
    (sharded / "model-00001-of-00002.safetensors").write_bytes(weights)
    (sharded / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    clock = Clock()
    watcher, calls = make_watcher(ckpt, sink, clock=clock, incomplete_after_s=60)
    for _ in range(5):
        assert ready_names(watcher) == []
    clock.now += 61
    problems = {c.name: c.problem for c in watcher.poll()[0]}
    assert f"the rest of model.safetensors ({len(weights) // 2} of {len(weights)} bytes)" in problems["step-1"]
    assert "1 of the 2 weight shards model.safetensors.index.json lists (model-00002-of-00002.safetensors)" in problems["step-2"]
    # the rest written: complete
    (half / "model.safetensors").write_bytes(weights)
    (sharded / "model-00002-of-00002.safetensors").write_bytes(weights)
    assert ready_names(watcher) == [] and ready_names(watcher) == ["step-1", "step-2"]
    assert calls == []

    # the trainer's own state written before the model (an upload in another order): no weights yet
    state = model_files(ckpt / "checkpoint-4", weights=False)
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin"):
        (state / name).write_bytes(b"\0" * 64)
    assert "lacks weights (*.safetensors)" in watcher.model_problem("checkpoint-4")

    # the same on S3: an upload cut short
    s3 = s3_env
    url = f"s3://{s3.bucket('watch-weights')}/ckpt"
    put_checkpoint(s3, half, f"{url}/step-3")
    s3.fs.pipe_file(f"{url}/step-3/model.safetensors", weights[:1000])
    remote_watcher, _ = make_watcher(url, tmp_path / "sink3", incomplete_after_s=0)
    ready_names(remote_watcher)
    ready, _ = remote_watcher.poll()
    assert "lacks the rest of model.safetensors (1000 bytes" in ready[0].problem
