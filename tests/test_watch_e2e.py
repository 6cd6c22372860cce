"""capjob-watch for real (Ray Data + vLLM CPU + the tiny model), following a "training run": a
background thread writes three checkpoints of the tiny model trained for 20, 200 and 1200 steps
into a watched folder over time (the second in two halves with a pause the watcher polls
through), the watcher is killed between the second and the third and started again on the same
sink. Each checkpoint is evaluated exactly once, the leaderboard ranks them in training order
and the Prometheus endpoint exports the latest scores. The lag from a checkpoint's last file to
its leaderboard row is printed (docs/benchmarks.md, "capjob-watch")."""

import csv
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import psutil
import pytest

from capjob import models
from capjob.models import remote
from capjob.watch import STATE_FILE
from helpers.config import REPO, early_checkpoint
from helpers.s3server import free_port

STEPS = (20, 200, 1200)  # 1200: the shipped build (models/train.py's TRAIN_STEPS)
POLL_S = 2
FIRST_HALF = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")


def checkpoint_source(steps: int) -> pathlib.Path:
    return pathlib.Path(models.resolve_model_source(None, models.TINY_QWEN25VL)) if steps == 1200 else early_checkpoint(steps)


def copy_files(source, target, names):
    target.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copy2(source / name, target / name)


def model_file_names(source):
    return sorted(f.name for f in source.iterdir() if f.is_file() and f.name != models.COMPLETE_MARKER)


def state_rows(sink):
    try:
        return json.loads((sink / STATE_FILE).read_text())["checkpoints"]
    except (OSError, ValueError, KeyError):
        return {}


def start_watcher(tmp, name, *extra):
    log = open(tmp / f"{name}.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "capjob.watch", "experiment=offline", "data.format=parquet", f"data.path={tmp / 'golden'}",
         "data.name=golden", "eval=stats", "eval.reference_column=reference", "caption.max_tokens=24",
         f"watch.path={tmp / 'ckpt'}", f"watch.poll_interval_s={POLL_S}", "watch.idle_timeout_s=900", f"sink.path={tmp / 'sink'}",
         f"hydra.run.dir={tmp / name}", *extra],
        stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    return proc, log


def kill_session(proc):
    """SIGKILL the watcher and everything of its session (its Ray), as a node loss would."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == proc.pid:
                p.kill()
        except (psutil.Error, ProcessLookupError, PermissionError):
            pass


@pytest.mark.e2e
def test_watcher_follows_a_training_run_across_a_kill(tmp_path):
    from capjob.stages.sources.sample import write_hf_parquet
    from helpers.references import shape_rows

    sources = {steps: checkpoint_source(steps) for steps in STEPS}  # trained once per test cache
    rows, references = shape_rows(8, seed=21)
    (tmp_path / "golden").mkdir()
    write_hf_parquet(rows, tmp_path / "golden" / "part-0.parquet", references)
    ckpt, sink = tmp_path / "ckpt", tmp_path / "sink"
    written: dict[str, float] = {}  # checkpoint -> time.time() its last file was written
    appeared: dict[str, float] = {}  # checkpoint -> time.time() its row was first seen in the sink
    killed = threading.Event()
    failures: list[BaseException] = []

    def trainer():
        try:
            write_checkpoints()
        except BaseException as e:  # a failed writer fails the test, not a 900 s wait
            failures.append(e)
            raise

    def write_checkpoints():
        names = model_file_names(sources[20])
        copy_files(sources[20], ckpt / "step-20", names)
        written["step-20"] = time.time()
        while "step-20" not in appeared:
            time.sleep(0.2)
        source = sources[200]
        names = model_file_names(source)
        copy_files(source, ckpt / "step-200", [n for n in names if n in FIRST_HALF])
        time.sleep(4 * POLL_S)  # the watcher lists the first half (stable, no weights or processor) several times
        copy_files(source, ckpt / "step-200", [n for n in names if n not in FIRST_HALF])
        written["step-200"] = time.time()
        killed.wait(900)
        copy_files(sources[1200], ckpt / "step-1200", model_file_names(sources[1200]))
        written["step-1200"] = time.time()

    def watch_rows(proc, wanted, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and len(appeared) < wanted and proc.poll() is None and not failures:
            for name in state_rows(sink):
                appeared.setdefault(name, time.time())
            time.sleep(0.2)
        for name in state_rows(sink):
            appeared.setdefault(name, time.time())

    metrics_port = free_port()
    writer = threading.Thread(target=trainer, daemon=True)
    first, log1 = start_watcher(tmp_path, "run1", f"job.metrics_export_port={metrics_port}")
    try:
        writer.start()
        watch_rows(first, 2, 900)
        assert set(appeared) == {"step-20", "step-200"}, (tmp_path / "run1.log").read_text()[-5000:]
        scraped = ""
        for _ in range(30):  # the gauges reach Ray's endpoint within a report interval
            try:
                scraped = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
            except OSError:
                scraped = ""
            if 'checkpoint="step-200"' in scraped:
                break
            time.sleep(1)
    finally:
        kill_session(first)  # between the second checkpoint and the third
        log1.close()
    killed.set()
    second, log2 = start_watcher(tmp_path, "run2", "watch.max_checkpoints=3")
    try:
        watch_rows(second, 3, 900)
        second.wait(timeout=120)
    finally:
        if second.poll() is None:
            kill_session(second)
        log2.close()
    writer.join(timeout=10)
    assert not failures, failures
    out2 = (tmp_path / "run2.log").read_text()
    assert second.returncode == 0, out2[-5000:]

    # exactly once: run 1 evaluated step-20 and step-200, run 2 only step-1200
    def job_dirs(run):
        return sorted(p.name.rsplit("-", 1)[0] for p in (tmp_path / run).iterdir() if p.is_dir())

    assert job_dirs("run1") == ["step-20", "step-200"] and job_dirs("run2") == ["step-1200"]
    # one Ray session for both of the first watcher's runs (Ray names a session dir after its driver's pid)
    assert len(list(pathlib.Path("/tmp/ray").glob(f"session_*_{first.pid}"))) == 1
    assert "2 checkpoint(s) already on the leaderboard" in out2
    assert "capjob-watch: stopped: watch.max_checkpoints=3 checkpoints on the leaderboard; 1 checkpoint(s) evaluated" in out2
    state = state_rows(sink)
    assert [r["status"] for r in state.values()] == ["succeeded"] * 3, state
    # step-200 was evaluated as written in full: the fingerprint of its final listing, found
    # complete only after its second half
    assert state["step-200"]["fingerprint"] == remote.revision(remote.listing(str(ckpt / "step-200")))
    assert state["step-200"]["complete_at"] >= time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(int(written["step-200"])))
    assert all(r["captioned"] == 8 and r["eval_captions"] == 8 for r in state.values())

    # ranked in training order of quality: each later checkpoint scores higher
    quality = [(state[f"step-{s}"]["exact_match"], state[f"step-{s}"]["word_f1"]) for s in STEPS]
    assert quality == sorted(quality) and len(set(quality)) == 3, quality
    table = list(csv.DictReader((sink / "leaderboard.csv").open()))
    assert [(r["checkpoint"], r["best"]) for r in table] == [("step-20", "False"), ("step-200", "False"), ("step-1200", "True")]
    md = (sink / "leaderboard.md").read_text()
    assert "3 checkpoints: 3 evaluated, 0 failed." in md and "**Best checkpoint: step-1200** (step 1200)" in md
    assert (sink / "leaderboard.png").read_bytes()[:4] == b"\x89PNG"
    # the first watcher's gauges, scraped before the kill
    assert 'capjob_watch_score{' in scraped and 'checkpoint="step-200"' in scraped and 'score="exact_match"' in scraped, scraped[-2000:]
    assert "capjob_watch_checkpoints" in scraped

    lags = {name: round(appeared[name] - written[name], 1) for name in written}
    print(f"\ncapjob-watch lag, last file written -> leaderboard row (s): {lags}; "
          f"watcher's own found-complete -> row: { {n: r['lag_s'] for n, r in state.items()} }")
    (tmp_path / "lags.json").write_text(json.dumps({"written_to_row_s": lags, "state": state}, indent=2))
