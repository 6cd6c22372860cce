"""`capjob-watch`: follow a training run's checkpoint folder and caption and score a golden set
with every checkpoint as soon as the trainer has finished writing it, each exactly once, with a
leaderboard rewritten after each one.

    capjob-watch watch.path=s3://bucket/run7/checkpoints/ dataset=parquet data.path=<golden set> \\
        eval=stats eval.reference_column=reference sink.path=s3://bucket/run7/validation

The watched folder (watch.path; local or any fsspec URL, listed afresh every
watch.poll_interval_s) holds one folder per checkpoint, `step-N/` or `checkpoint-N/` (as the
Hugging Face Trainer writes them), N the training step. A checkpoint is complete when
watch.marker is set and that file is in its folder, or else when its listing (names, sizes,
mtimes or ETags: models/remote.listing) is the same in two polls in a row and preflight's model
check passes (config, tokenizer, processor, chat template, weights). A folder still being
written changes between polls or lacks a file, so it is never captioned half-loaded; one that
stops changing but still lacks a model file is a failed row after watch.incomplete_after_s.

What the sink holds (sink.path):

    watch/state.json        every checkpoint with a leaderboard row, with the fingerprint
                            (models/remote.revision of its listing) it was evaluated at
    leaderboard.md/.csv/.png  reporting/leaderboard.py, rewritten (atomically) after each checkpoint
    checkpoints/<name>/     each checkpoint's captions, quarantine and run report

state.json is written (atomically) before the leaderboard: a watcher killed at any point and
started again skips every checkpoint in it whose fingerprint is unchanged, re-evaluates one
rewritten in place (another fingerprint), and re-runs one it was killed in. Each evaluation is
a capjob run (cli's run, through sweep.run_recorded: the sweep's record, error.txt and failure
handling) with model.source = the checkpoint and job.resume=false, its job folder under the
watcher's Hydra run dir. A failed run (missing files, a load error, an engine that died) is a
row with its reason, and the watcher goes on.

One Ray session serves every checkpoint: Ray starts with the first run (with
job.metrics_export_port, with the watcher, so that the endpoint is up from the start) and stays
up, Ray Data's context reset between runs; vLLM needs a new engine for new weights, which each
run's processor starts and ends. After a failed run Ray is shut down and started afresh. The kept prompt (render.prompt_cache_path) is reused across checkpoints with the same
processor files. Decoded images are not kept between runs: decoding is fused with the id and
preprocess stages in one Ray Data task (pipeline.caption_flow), and for a golden set of
hundreds of images it is a fraction of a second against an engine start of tens of seconds.

Stops (a line saying why, the leaderboard up to date) on watch.max_checkpoints,
watch.idle_timeout_s, or Ctrl-C (exit 130) or SIGTERM (143) at once, and on watch.stop_file (the trainer's "training
is over") once every checkpoint written before it has a row. With Ray up, the latest scores are
Prometheus gauges on Ray's metrics endpoint (metrics.publish_scores).
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import logging
import re
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import fsspec
import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from capjob import cli, console, metrics, preflight, runtime, sweep
from capjob.config import CapjobConfig, EvalMode, WatchConfig, register_configs, to_typed
from capjob.errors import CapjobError, ConfigError, describe, first_line
from capjob.models import remote
from capjob.reporting import leaderboard
from capjob.reporting.sweep_report import fmt_value, load_job
from capjob.stages.caption.engine import EnginePlacement
from capjob.stages.storage import describe_remote_error
from capjob.stages.tables import write_atomic

# `step-1200`, `checkpoint-1200` (transformers.Trainer's PREFIX_CHECKPOINT_DIR), `step_1200`,
# `step1200`, zero-padded `step-001200`, DeepSpeed's `global_step1200`, Megatron's `iter_0001200`.
CHECKPOINT_DIR = re.compile(r"^(?:step|checkpoint|global_step|iter)[-_]?(\d+)$", re.IGNORECASE)
STATE_FILE = "watch/state.json"
CHECKPOINTS_DIR = "checkpoints"
EMPTY = "empty"  # the fingerprint of a checkpoint folder without a file


def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).isoformat(timespec="seconds")


@dataclass
class Checkpoint:
    """A complete checkpoint folder. url: what model.source takes (a local path or a URL);
    fingerprint: remote.revision of its listing; problem: why it cannot be captioned (missing
    files), or None."""

    name: str
    step: int
    url: str
    fingerprint: str
    complete_at: float  # time.time() when the watcher found it complete
    problem: Optional[str] = None


class Folder:
    """The watched folder, through fsspec (local paths and URLs alike)."""

    def __init__(self, path: str):
        # A local folder (file:// URLs included) as an absolute path: model.source takes
        # `ckpt/step-1` for a hub id and `file:///ckpt/step-1` for a missing folder.
        fs, root = fsspec.url_to_fs(path.rstrip("/") or "/") if "://" in path else (None, path)
        if fs is None or isinstance(fs, fsspec.implementations.local.LocalFileSystem):
            self.path = str(Path(root).expanduser().resolve())
        else:
            self.path = path.rstrip("/")
        self.fs, root = fsspec.url_to_fs(self.path)
        self.root = str(root).rstrip("/")

    def refresh(self) -> None:
        """Forget cached listings (s3fs keeps them): every poll sees the store as it is now."""
        self.fs.invalidate_cache()

    def checkpoints(self) -> list[tuple[str, int]]:
        """(name, step) of every checkpoint folder, by step; [] while the folder does not exist."""
        try:
            entries = self.fs.ls(self.root, detail=True)
        except FileNotFoundError:
            return []
        found = []
        for e in entries:
            name = str(e["name"]).rstrip("/").rsplit("/", 1)[-1]
            match = CHECKPOINT_DIR.match(name)
            if match and e.get("type") == "directory":
                found.append((name, int(match.group(1))))
        return sorted(found, key=lambda c: (c[1], c[0]))

    def misplaced(self, sink: str) -> Optional[str]:
        """Why this folder cannot be the one checkpoints are written into (it is a checkpoint
        itself, or its checkpoints are one folder down), or None. For a one-line error at start:
        either way no poll would ever find a checkpoint. sink: the watcher's sink.path, whose
        checkpoints/<name>/ folders (inside the watched folder when sink.path is) are no checkpoints."""
        outputs = Folder(sink).url(CHECKPOINTS_DIR)
        try:
            entries = self.fs.ls(self.root, detail=True)
        except FileNotFoundError:
            return None
        if self.checkpoints():
            return None
        names = {str(e["name"]).rstrip("/").rsplit("/", 1)[-1]: e.get("type") for e in entries}
        # config.json and weights: a model (a trainer may save its processor into its output folder at start).
        if names.get("config.json") == "file" and any(kind == "file" and preflight.is_weights(n) for n, kind in names.items()):
            parent = self.path.rsplit("/", 1)[0]
            return (f"{self.path} is a checkpoint itself (it holds config.json and weights); watch the folder the trainer writes "
                    f"them into ({parent})")
        for name, kind in sorted(names.items()):
            if kind == "directory" and self.url(name) != outputs and Folder(self.url(name)).checkpoints():
                return f"{self.path} holds no step-N/ or checkpoint-N/ folder, {self.url(name)} does: set watch.path to it"
        return None

    def url(self, name: str) -> str:
        return f"{self.path}/{name}"

    def listing(self, name: str) -> list[dict[str, Any]]:
        try:
            return remote.listing(self.url(name), fs=self.fs, root=f"{self.root}/{name}")
        except FileNotFoundError:
            return []

    def exists(self, relative: str) -> bool:
        return bool(self.fs.exists(f"{self.root}/{relative}"))


class State:
    """<sink>/watch/state.json: {"checkpoints": {name: leaderboard row}}, rewritten whole (and
    atomically) after each checkpoint."""

    def __init__(self, sink: str):
        self.sink = sink.rstrip("/")
        self.fs, root = fsspec.url_to_fs(self.sink)
        self.root = str(root).rstrip("/")
        self.rows: dict[str, dict[str, Any]] = {}
        try:
            data = json.loads(self.fs.cat_file(f"{self.root}/{STATE_FILE}"))
            self.rows = dict(data.get("checkpoints") or {})
        except FileNotFoundError:
            pass
        except (ValueError, AttributeError) as e:
            raise ConfigError(f"sink.path: {self.sink}/{STATE_FILE} is not the watcher's JSON ({e}); move it away to start over") from None
        except Exception as e:  # noqa: BLE001 - s3fs/botocore/aiohttp raise many types
            raise ConfigError(f"sink.path: {describe_remote_error(self.sink, e)}") from None

    def finished(self, name: str, fingerprint: Optional[str]) -> bool:
        row = self.rows.get(name)
        return row is not None and row.get("fingerprint") == fingerprint

    def record(self, row: dict[str, Any]) -> None:
        self.rows[row["checkpoint"]] = row
        self.write(STATE_FILE, json.dumps({"version": 1, "checkpoints": self.rows}, indent=2, default=str).encode() + b"\n")

    def write(self, relative: str, data: bytes) -> None:
        path = f"{self.root}/{relative}"
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        write_atomic(self.fs, path, data)

    def write_leaderboard(self) -> None:
        for name, data in leaderboard.render(list(self.rows.values()), self.sink).items():
            self.write(name, data)


@dataclass
class _Seen:
    fingerprint: Optional[str]
    since: float  # clock() when this listing was first seen


class Watcher:
    """The poll loop. evaluate(checkpoint) -> the row's result fields (leaderboard.row_from_job);
    publish(row, rows): after each row (Prometheus). clock/sleep: injectable for tests."""

    def __init__(self, cfg: WatchConfig, sink: str, evaluate: Callable[[Checkpoint], dict[str, Any]], *,
                 load_format: str = "auto", publish: Optional[Callable[[dict[str, Any], list[dict[str, Any]]], Any]] = None,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
                 say: Callable[[str], None] = console.headline):
        if not cfg.path:
            raise ConfigError("watch.path: set the folder (or s3://... prefix) the trainer writes its step-N/ checkpoints into")
        self.cfg, self.evaluate, self.load_format, self.publish = cfg, evaluate, load_format, publish
        self.clock, self.sleep, self.say = clock, sleep, say
        self.folder = Folder(cfg.path)
        try:  # bad credentials, endpoint or bucket: one line now, not a retry loop
            misplaced = self.folder.misplaced(sink)
            if misplaced:
                raise ConfigError(f"watch.path: {misplaced}")
            bucket = self.folder.root.split("/", 1)[0]
            if "://" in self.folder.path and not self.folder.fs.exists(bucket):
                raise ConfigError(f"watch.path: the bucket of {cfg.path!r} does not exist")
        except CapjobError:
            raise
        except Exception as e:  # noqa: BLE001 - s3fs/botocore/aiohttp raise many types
            raise ConfigError(f"watch.path: {describe_remote_error(cfg.path, e)}") from None
        self.state = State(sink)
        self.seen: dict[str, _Seen] = {}
        self.evaluated = 0  # by this process
        self.last_activity = clock()

    def poll(self) -> tuple[list[Checkpoint], bool]:
        """(the complete checkpoints without a row at their fingerprint, by step; whether any
        checkpoint is waiting for a row: new, changing or being evaluated, which is not idleness)."""
        self.folder.refresh()
        ready, busy = [], False
        for name, step in self.folder.checkpoints():
            entries = self.folder.listing(name)
            marked = bool(self.cfg.marker) and bool(entries) and self.folder.exists(f"{name}/{self.cfg.marker}")
            if marked and not any(e["name"] == self.cfg.marker for e in entries):
                # A hidden marker (_SUCCESS) is not in the listing: a marker written after a
                # failed "no marker" row must still change the fingerprint (evaluated again).
                entries = [*entries, {"name": self.cfg.marker, "size": 0, "etag": "marker"}]
            fingerprint = remote.revision(entries) if entries else EMPTY
            now = self.clock()
            previous = self.seen.get(name)
            changed = previous is None or previous.fingerprint != fingerprint
            if changed:
                self.seen[name] = _Seen(fingerprint, now)
            if self.state.finished(name, fingerprint):
                continue
            busy = True
            # Waiting has a bound: a folder left empty, or one whose marker never comes (the
            # trainer died mid-save), is a failed row after incomplete_after_s unchanged, not a
            # wait that keeps the idle timeout and the stop file from ever firing.
            stuck = not changed and now - self.seen[name].since >= self.cfg.incomplete_after_s
            if not entries:
                if stuck:
                    ready.append(Checkpoint(name, step, self.folder.url(name), EMPTY, time.time(),
                                            f"{self.folder.url(name)} is empty {self.cfg.incomplete_after_s:g} s after it appeared "
                                            "(watch.incomplete_after_s): the trainer created it and wrote nothing"))
                continue  # an empty folder: the trainer has just created it
            if self.cfg.marker and not marked:
                if stuck:
                    ready.append(Checkpoint(name, step, self.folder.url(name), fingerprint, time.time(),
                                            f"no {self.cfg.marker} marker in {self.folder.url(name)} after its files were unchanged for "
                                            f"{self.cfg.incomplete_after_s:g} s (watch.incomplete_after_s): the trainer did not finish it"))
                continue
            if not self.cfg.marker and changed:
                continue  # complete only once a second listing finds the same files
            problem = self.model_problem(name)
            if problem and not self.cfg.marker and not stuck:
                continue  # stable but lacking files: the trainer may write them last
            ready.append(Checkpoint(name, step, self.folder.url(name), fingerprint, time.time(), problem))
        if busy:
            self.last_activity = self.clock()
        return ready, busy

    def model_problem(self, name: str) -> Optional[str]:
        """What preflight's model check finds missing in the checkpoint (config, tokenizer,
        processor, chat template, weights), or None."""
        try:
            preflight.check_model(self.folder.url(name), None, self.load_format)
        except ConfigError as e:
            return str(e)
        return None

    def stop_reason(self) -> Optional[str]:
        """Why to stop now (watch.max_checkpoints, watch.idle_timeout_s), or None."""
        limit = self.cfg.max_checkpoints
        if limit is not None and len(self.state.rows) >= limit:
            return f"watch.max_checkpoints={limit} checkpoints on the leaderboard"
        idle = self.cfg.idle_timeout_s
        if idle is not None and self.clock() - self.last_activity >= idle:
            return f"no new checkpoint for {idle:g} s (watch.idle_timeout_s)"
        return None

    def stop_file_found(self) -> bool:
        stop = self.stop_file()
        if stop is None:
            return False
        fs, path = fsspec.url_to_fs(stop)
        fs.invalidate_cache()
        return bool(fs.exists(path))

    def stop_file(self) -> Optional[str]:
        name = self.cfg.stop_file
        if not name:
            return None
        return name if "/" in name else self.folder.url(name)

    def run(self) -> str:
        """Poll, evaluate, repeat until a stop condition; returns why it stopped. Ctrl-C
        (KeyboardInterrupt) propagates with every finished checkpoint recorded."""
        if self.state.rows:
            self.state.write_leaderboard()  # a watcher killed between state and leaderboard left it behind
            self.say(f"capjob-watch: {len(self.state.rows)} checkpoint(s) already on the leaderboard ({self.leaderboard_path()}); "
                     "evaluating only new or rewritten ones")
        while True:
            reason = self.stop_reason()
            if reason:
                return reason
            # Looked for before the listing: every checkpoint written before the stop file is in it.
            try:
                stopping = self.stop_file_found()
                ready, busy = self.poll()
            except Exception as e:  # noqa: BLE001 - a store that fails one listing (throttled, a network blip): poll again
                self.say(f"capjob-watch: listing {self.folder.path} failed ({describe_remote_error(self.folder.path, e)}); "
                         f"trying again in {self.cfg.poll_interval_s:g} s")
                self.sleep(self.cfg.poll_interval_s)
                continue
            if stopping and not busy:
                return f"stop file {self.stop_file()} found, every checkpoint before it evaluated"
            for checkpoint in ready:
                self.evaluate_one(checkpoint)
                self.last_activity = self.clock()
                reason = self.stop_reason()
                if reason:
                    return reason
            if not ready:
                self.sleep(self.cfg.poll_interval_s)

    def evaluate_one(self, checkpoint: Checkpoint) -> dict[str, Any]:
        self.say(f"capjob-watch: {checkpoint.name} (step {checkpoint.step}) is complete; evaluating it")
        if checkpoint.problem:
            result = {"status": "failed", "error": checkpoint.problem}
        else:
            try:
                result = self.evaluate(checkpoint)
            except Exception as e:  # one checkpoint's failure (Ray, the store, the job's record) is its row, not the watcher's end
                logging.getLogger(__name__).debug("capjob-watch: evaluating %s failed", checkpoint.name, exc_info=True)
                result = {"status": "failed", "error": describe(e, 500)}
        finished = time.time()
        row = {**result, "checkpoint": checkpoint.name, "step": checkpoint.step, "path": checkpoint.url,
               "fingerprint": checkpoint.fingerprint, "complete_at": _iso(checkpoint.complete_at), "finished_at": _iso(finished),
               "lag_s": round(finished - checkpoint.complete_at, 1)}
        self.state.record(row)  # first: a watcher killed now skips it next time and rewrites the leaderboard
        self.state.write_leaderboard()
        self.evaluated += 1
        if self.publish is not None:
            try:
                self.publish(row, list(self.state.rows.values()))
            except Exception as e:  # noqa: BLE001 - the gauges are a view; the leaderboard is written
                logging.getLogger(__name__).warning("capjob-watch: publishing the scores failed: %s", e)
        scores = ", ".join(f"{k} {fmt_value(row.get(k))}" for k in leaderboard.SCORES if row.get(k) is not None)
        outcome = scores or "no score" if row["status"] == "succeeded" else f"failed: {first_line(row.get('error'), 300)}"
        self.say(f"capjob-watch: {checkpoint.name} (step {checkpoint.step}): {outcome} · leaderboard {self.leaderboard_path()}")
        return row

    def leaderboard_path(self) -> str:
        return f"{self.state.sink}/{leaderboard.LEADERBOARD_MD}"


# --- the command ---------------------------------------------------------------------------


def check_watch(cfg: CapjobConfig) -> None:
    """What the watcher needs before its first poll: a watched path and scores to rank by.
    Raises ConfigError (one line)."""
    if not cfg.watch.path:
        raise ConfigError("watch.path: set the folder (or s3://... prefix) the trainer writes its step-N/ checkpoints into")
    if not (cfg.eval.mode == EvalMode.judge or (cfg.eval.mode == EvalMode.stats and cfg.eval.reference_column)):
        raise ConfigError("eval: the leaderboard ranks checkpoints by score: set eval=stats eval.reference_column=<the golden "
                          "set's caption column>, or eval=judge")


def checkpoint_config(cfg: DictConfig, checkpoint: Checkpoint, sink: str) -> DictConfig:
    """The run of one checkpoint: the watcher's config with model.source = the checkpoint, its
    own sink folder, and job.resume=false (a run killed half-way starts over: its scores cover
    the whole golden set)."""
    job = copy.deepcopy(cfg)
    job.model.source = checkpoint.url
    job.model.builder = None
    job.model.name = checkpoint.name
    job.sink.path = f"{sink.rstrip('/')}/{CHECKPOINTS_DIR}/{checkpoint.name}"
    job.job.resume = False
    job.job.run_id = None
    return job


def run_checkpoint(cfg: DictConfig, checkpoint: Checkpoint, sink: str, work_dir: Path,
                   restart_ray: Callable[[], None] = lambda: None) -> dict[str, Any]:
    """Evaluate one checkpoint as a capjob run in <work_dir>/<name>-<fingerprint>; the row's
    result fields. Ray stays up after the run (the first run starts it); after a failed one it
    is shut down and restart_ray() called. Never raises for a failed run; Ctrl-C propagates."""
    job_dir = work_dir / f"{checkpoint.name}-{checkpoint.fingerprint[:8]}"
    record = sweep.new_record(checkpoint.step, [f"model.source={checkpoint.url}"])
    level = str(OmegaConf.select(cfg, "job.log_level") or "warning")
    with console.session(str(job_dir), level, brief_prefix=f"{checkpoint.name}: ", shutdown_ray=False):
        record = sweep.run_recorded(checkpoint_config(cfg, checkpoint, sink), cli.run_composed, record, job_dir, work_dir,
                                    time.monotonic(), f"checkpoint {checkpoint.name}", release=False)
    if record.get("status") != "succeeded":
        sweep.release_ray()  # a failed run may leave an engine or Ray itself broken: the next run starts afresh
        restart_ray()
    return leaderboard.row_from_job(load_job(job_dir))


def start_ray(cfg: CapjobConfig) -> None:
    """Ray as the runs start it (runtime.init_ray, sized for this config), for the metrics
    endpoint (job.metrics_export_port) to be up before the first run and after a failed one;
    the runs then join it. Without a metrics port the first run starts Ray."""
    if cfg.job.metrics_export_port:
        placement = preflight.local_placement(cfg.resources, cfg.engine) or EnginePlacement(0, None)
        runtime.init_ray(cfg.resources, cfg.engine, placement, cfg.job.metrics_export_port)


def publisher(job_name: str) -> Callable[[dict[str, Any], list[dict[str, Any]]], Any]:
    handles: list[Any] = []  # the gauges' actor lives as long as a handle does

    def publish(row: dict[str, Any], rows: list[dict[str, Any]]) -> None:
        best = leaderboard.best_row(rows)
        latest = {"checkpoint": row["checkpoint"], "step": row["step"], "scores": {k: row.get(k) for k in leaderboard.SCORES}}
        handle = metrics.publish_scores(job_name, latest, best["step"] if best else None, len(rows))
        handles[:] = [handle] if handle is not None else []

    return publish


@hydra.main(version_base="1.3", config_path=cli._conf_dir(), config_name="config")
def _main(cfg: DictConfig) -> None:
    work_dir = Path(HydraConfig.get().runtime.output_dir)
    watcher: Optional[Watcher] = None
    try:
        preflight.check_keys(cfg)
        typed = to_typed(cfg)
        check_watch(typed)
        sink, publish = typed.sink.path, publisher(typed.job.name)
        watcher = Watcher(typed.watch, sink, lambda c: run_checkpoint(cfg, c, sink, work_dir, lambda: start_ray(typed)),
                          load_format=typed.model.load_format, publish=publish)
        start_ray(typed)
        if watcher.state.rows and typed.job.metrics_export_port:  # a restarted watcher exports the scores it has at once
            rows = list(watcher.state.rows.values())
            publish(max(rows, key=lambda r: str(r.get("finished_at"))), rows)
        console.headline(f"capjob-watch: watching {typed.watch.path} every {typed.watch.poll_interval_s:g} s; "
                         f"leaderboard {watcher.leaderboard_path()}; stop file {watcher.stop_file() or '(none)'}")
        reason = watcher.run()
    except (CapjobError, OmegaConfBaseException) as e:
        sweep.release_ray()
        cli.fail(str(e))
    except KeyboardInterrupt:
        sweep.release_ray()
        rows = len(watcher.state.rows) if watcher else 0
        where = f" ({watcher.leaderboard_path()}, up to date)" if watcher else ""
        console.error(f"capjob-watch: interrupted; {rows} checkpoint(s) on the leaderboard{where}; run the same command to go on")
        sys.exit(128 + _STOPPED_BY[0])
    sweep.release_ray()
    console.headline(f"capjob-watch: stopped: {reason}; {watcher.evaluated} checkpoint(s) evaluated by this watcher, "
                     f"{len(watcher.state.rows)} on the leaderboard {watcher.leaderboard_path()}")


_STOPPED_BY = [signal.SIGINT]  # the signal that ended the watcher: exit 128 + its number


def _terminate(signum: int, frame: Any) -> None:
    """SIGTERM (`ray job stop`, a scheduler's stop, `kill`) stops the watcher as Ctrl-C does: Ray
    and the engine shut down, one line, instead of dying with an engine left running."""
    del frame
    _STOPPED_BY[0] = signum
    raise KeyboardInterrupt


def main() -> None:
    signal.signal(signal.SIGTERM, _terminate)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    register_configs()
    if any(a in cli.MULTIRUN_FLAGS for a in sys.argv[1:]):
        cli.fail("capjob-watch runs one watcher: leave out --multirun (each checkpoint it finds is its own run)")
    cli.check_command_line(sys.argv[1:])
    _main()


if __name__ == "__main__":
    main()
