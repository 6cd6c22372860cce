"""Sweeps: `capjob --multirun ...` runs every combination of the swept overrides, one after the
other in this process (Hydra's basic launcher), each in its own job directory::

    <hydra.sweep.dir>/<job number>/
        sweep_job.json     what capjob records per job: overrides (redacted), status, error, output
        error.txt          failed jobs only: the error (and the traceback of an unexpected one)
        report.json/.md    the run report (succeeded jobs), as in a single run
        out/               the job's sink (captions, quarantine) unless sink.path was set

    <hydra.sweep.dir>/sweep.csv, sweep.md, sweep.png     written by SweepReport at the end

Each job starts its own local Ray (or joins the cluster in RAY_ADDRESS / resources.address) and
shuts it down when it ends, success or not, waiting until every process it started has exited:
the next job sizes Ray for its own config and finds all GPU memory free. A failing job is
recorded and the sweep goes on. The tables and the plot are reporting/sweep_report.py's
(`capjob-sweep-report DIR` rebuilds them).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import re
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, ContextManager, Optional

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from capjob import console
from capjob.config import SinkConfig
from capjob.errors import CapjobError, ConfigError
from capjob.reporting.report import REDACTED, SECRET_KEY, redact
from capjob.reporting.sweep_report import ERROR_TXT, JOB_RECORD, build_report, collect, override_key, override_value

log = logging.getLogger(__name__)

# The sink path every job would share if capjob did not give each job its own.
DEFAULT_SINK_PATH = SinkConfig().path  # outputs/${data.name}/${model.name}
JOB_SINK_DIR = "out"
# Seconds to wait for the processes a job's local Ray started (raylet, workers, vLLM) to exit.
RAY_EXIT_TIMEOUT_S = 60



# --- overrides ---------------------------------------------------------------------------


# A secret-looking override key, judged by its last component: `secret`, `hf_token`, `key` (s3fs),
# `aws_access_key_id`, `password`... but not `caption.max_tokens` or `engine.max_num_batched_tokens`,
# which sweeps vary and their tables must show.
SECRET_OVERRIDE = SECRET_KEY  # one definition of a secret key: reporting/report.py's


def redact_override(override: str) -> str:
    """`sink.storage_options.secret=abc` -> `sink.storage_options.secret=***`; a dict value with a
    secret-looking key inside is hidden whole."""
    if "=" not in override:
        return override
    key, value = override_key(override), override_value(override)
    inner_keys = re.findall(r"([\w-]+)\s*:", value) if value.lstrip().startswith("{") else []
    if any(SECRET_OVERRIDE.search(k) for k in [key.rsplit(".", 1)[-1], *inner_keys]):
        return override.split("=", 1)[0] + "=" + REDACTED
    return override


def _redact_hydra_yaml(path: Path) -> None:
    """Hydra's sweeper saves the whole config (command-line overrides verbatim) as multirun.yaml,
    whatever hydra.output_subdir says. Rewrite it with secrets redacted, as report.py does."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return
    if not isinstance(data, dict):
        return
    data = redact(data)
    overrides = (data.get("hydra") or {}).get("overrides") or {}
    redacted_any = False
    for name, values in list(overrides.items()):
        if isinstance(values, list):
            overrides[name] = [redact_override(str(v)) for v in values]
            redacted_any |= overrides[name] != [str(v) for v in values]
    job = (data.get("hydra") or {}).get("job") or {}
    # Per override, not a search of the joined string: "(^|_)token$" only matches a key's end.
    if isinstance(job.get("override_dirname"), str) and (redacted_any or SECRET_KEY.search(job["override_dirname"])):
        job["override_dirname"] = ",".join(sorted(redact_override(str(o)) for o in overrides.get("task") or []))
    path.write_text(yaml.safe_dump(data, sort_keys=False))


# --- one job of a multirun (called by cli.py) --------------------------------------------


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    tmp.replace(path)


def _uses_default_sink(cfg: DictConfig) -> bool:
    raw = OmegaConf.to_container(cfg.sink, resolve=False).get("path")  # type: ignore[union-attr]
    return raw == DEFAULT_SINK_PATH


def _shared_sink_owner(sweep_dir: Path, job_dir: Path, sink_path: str) -> Optional[str]:
    """The job of this sweep that already wrote to `sink_path`, if any."""
    for record_path in sorted(sweep_dir.glob(f"*/{JOB_RECORD}")):
        if record_path.parent.resolve() == job_dir.resolve():
            continue
        try:
            other = json.loads(record_path.read_text())
        except (OSError, ValueError):
            continue
        if other.get("sink_path") == sink_path:
            return str(other.get("num", record_path.parent.name))
    return None


def release_ray() -> dict[str, Any]:
    """Shut down the Ray this job started (or disconnect from a cluster) and wait until every
    process it spawned has exited, so nothing (CPU, RAM, GPU memory) carries into the next job.
    Ray Data's process-wide DataContext is reset too. Returns what happened, for the record."""
    info: dict[str, Any] = {"initialized": False}
    if "ray" not in sys.modules:
        return info
    import ray

    if ray.is_initialized():
        info["initialized"] = True
        try:
            info["node_id"] = ray.get_runtime_context().get_node_id()
        except Exception:  # noqa: BLE001 - informative only
            pass
        try:
            import psutil

            children = psutil.Process().children(recursive=True)
        except Exception:  # noqa: BLE001 - psutil missing: rely on ray.shutdown alone
            psutil, children = None, []
        # A driver that joined a cluster holds a connect-only Node too; only one that started
        # the cluster holds its head.
        started_local = bool(getattr(getattr(ray._private.worker, "_global_node", None), "head", False))
        info["cluster"] = "local (started by this job)" if started_local else "existing cluster (disconnected)"
        ray.shutdown(wait_for_processes=True)
        killed: list[dict[str, Any]] = []
        left: list[int] = []
        if psutil is not None and children:
            # A loaded machine can take a while to stop a vLLM engine; past the timeout, kill
            # what is left (only processes this job's Ray started) and make sure it is gone.
            _, alive = psutil.wait_procs(children, timeout=RAY_EXIT_TIMEOUT_S)
            for proc in alive:
                try:
                    name = proc.name()
                    proc.kill()
                    killed.append({"pid": proc.pid, "name": name})
                except psutil.Error:
                    pass
            _, still = psutil.wait_procs(alive, timeout=10)
            left = [p.pid for p in still]
        info["processes_started"] = len(children)
        info["processes_killed_after_timeout"] = killed
        info["processes_left"] = left
    reset_data_context()
    return info


def reset_data_context() -> dict[str, Any]:
    """Ray Data's process-wide DataContext back to its defaults: the next job configures its own
    (plan.configure_data_context) and inherits nothing of this one's. Returns {} (the record's
    "ray" entry when Ray stays up)."""
    if "ray.data" in sys.modules:
        try:
            from ray.data import DataContext

            DataContext._set_current(None)  # the next job gets a fresh context
        except Exception:  # noqa: BLE001 - private API; a stale context is no worse than before
            pass
    return {}


def new_record(num: Any, overrides: list[str]) -> dict[str, Any]:
    """A job's sweep_job.json before it runs (overrides redacted)."""
    return {
        "num": num,
        "status": "running",
        "overrides": [redact_override(o) for o in overrides],
        "started_at": _now(),
        "sink_path": None,
        "sink_path_from": None,
        "run_id": None,
        "output": None,
        "error": None,
        "error_type": None,
    }


def run_job(cfg: DictConfig, run: Callable[[DictConfig, str], Any],
            session: Callable[[str, int], ContextManager[Any]] = lambda job_dir, num: contextlib.nullcontext()) -> None:
    """Run one job of a multirun: never raises for a failed run (the sweep goes on), records
    status and error in <job dir>/sweep_job.json (and error.txt), always releases Ray.
    session(job dir, job number): the console session the job runs in, Ray's release included
    (cli.py: console.session's brief one)."""
    hc = HydraConfig.get()
    job_dir = Path(hc.runtime.output_dir)
    sweep_dir = Path(hc.sweep.dir)
    started = time.monotonic()
    record = new_record(hc.job.num, list(hc.overrides.task))
    release_ray()  # nothing should be left from the previous job; make sure
    with session(str(job_dir), hc.job.num):
        run_recorded(cfg, run, record, job_dir, sweep_dir, started, f"job {hc.job.num}")


def run_recorded(cfg: DictConfig, run: Callable[[DictConfig, str], Any], record: dict[str, Any], job_dir: Path,
                 sweep_dir: Path, started: float, label: str, release: bool = True) -> dict[str, Any]:
    """Run one job in `job_dir` and record it (sweep_job.json, error.txt): never raises for a
    failed run, only for Ctrl-C. label: what the console's error line calls the run ("job 3" in a
    sweep, "checkpoint step-200" for capjob-watch). release: shut Ray down afterwards (a sweep's
    job); False keeps it up for the next job (capjob-watch, whose checkpoints share one Ray
    session: only Ray Data's context is reset). Returns the record."""
    try:
        try:
            if _uses_default_sink(cfg):
                # Jobs sharing outputs/<data>/<model> would resume from each other (resume skips
                # done ids): each job writes into its own directory instead.
                cfg.sink.path = str(job_dir / JOB_SINK_DIR)
                record["sink_path_from"] = "job directory (sink.path not set)"
            else:
                record["sink_path_from"] = "config"
            record["sink_path"] = str(OmegaConf.select(cfg, "sink.path", throw_on_missing=True))
            owner = _shared_sink_owner(sweep_dir, job_dir, record["sink_path"])
            _write_json(job_dir / JOB_RECORD, record)
            resume = OmegaConf.select(cfg, "job.resume", default=True)
            if owner is not None and resume:
                raise ConfigError(
                    f"sink.path: {record['sink_path']!r} is also the output of job {owner} of this sweep; "
                    f"with job.resume=true this run would skip the rows job {owner} captioned. Leave sink.path "
                    "unset (each job writes into its own directory), make it differ per job "
                    f"(e.g. 'sink.path=s3://bucket/sweep/${{hydra:job.num}}') or set job.resume=false (which deletes job {owner}'s captions first)"
                )
            result = run(cfg, str(job_dir))
            if result is None:
                record["status"] = "dry_run"
            else:
                record.update(status="succeeded", run_id=result.run_id, output=result.output)
        except (CapjobError, OmegaConfBaseException) as e:
            console.error(f"capjob: error: {e}")
            record.update(status="failed", error=str(e), error_type=type(e).__name__)
            (job_dir / ERROR_TXT).write_text(f"capjob: error: {e}\n")
        except Exception as e:  # noqa: BLE001 - one run's crash must not end the sweep
            message = error_line(e)
            console.error(f"capjob: error: {label} failed: {message} (traceback in {job_dir / ERROR_TXT})")
            record.update(status="failed", error=message, error_type=type(e).__name__)
            job_dir.mkdir(parents=True, exist_ok=True)
            (job_dir / ERROR_TXT).write_text(message + "\n\n" + traceback.format_exc())
    finally:
        record["ray"] = release_ray() if release else reset_data_context()
        record["finished_at"] = _now()
        record["seconds"] = round(time.monotonic() - started, 2)
        _write_json(job_dir / JOB_RECORD, record)
    return record


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# A traceback's last line, `ValueError: ...` or `vllm.x.EngineDeadError: ...` (Python's format).
_EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_][\w]*\.)*([A-Za-z_]\w*(?:Error|Exception)): (.+)$")


def error_line(e: BaseException) -> str:
    """One line saying why a run crashed: `Type: message`. Ray wraps a stage's or an actor's
    exception (ActorDiedError, RayTaskError) in one whose first line names only the actor, the
    cause's own traceback following it in the message: the last exception line of that is the
    true reason (e.g. vLLM's weight-loading ValueError), given first. Terminal colour codes
    (Ray's) are removed."""
    lines = [line.strip() for line in _ANSI.sub("", str(e)).strip().splitlines()]
    first = lines[0] if lines else ""
    message = f"{type(e).__name__}: {first}" if first else type(e).__name__
    causes = [m for m in (_EXCEPTION_LINE.match(line) for line in lines[1:]) if m]
    if causes:
        name, text = causes[-1].groups()
        return f"{name}: {text} (raised in Ray as {message})"
    return message


class SweepReport(Callback):
    """Registered in conf/config.yaml (hydra.callbacks): redacts Hydra's multirun.yaml and writes
    sweep.csv / sweep.md / sweep.png into the sweep directory when a multirun ends."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # The sweeper writes multirun.yaml after this; when composing a job fails, no other
        # hook runs: redact at exit too.
        import atexit

        atexit.register(_redact_hydra_yaml, Path(str(config.hydra.sweep.dir)) / "multirun.yaml")

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            _redact_hydra_yaml(Path(HydraConfig.get().sweep.dir) / "multirun.yaml")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        _redact_hydra_yaml(sweep_dir / "multirun.yaml")
        try:
            paths = build_report(sweep_dir)
        except FileNotFoundError as e:
            print(f"capjob: sweep report: {e}", file=sys.stderr)
            return
        jobs = collect(sweep_dir)
        failed = sum(1 for j in jobs if j.status in ("failed", "unknown"))
        print(
            f"\ncapjob sweep: {len(jobs)} runs, {len(jobs) - failed} without error, {failed} failed\n\n"
            f"{first_table(Path(paths['markdown']).read_text())}\n\n"
            f"  table: {paths['markdown']}\n  csv:   {paths['csv']}\n  plot:  {paths['plot']}",
            flush=True,
        )


def first_table(markdown: str) -> str:
    """The first table of a markdown text (sweep.md's runs), for the console."""
    lines, table = markdown.splitlines(), []
    for line in lines:
        if line.startswith("|"):
            table.append(line)
        elif table:
            break
    return "\n".join(table)
