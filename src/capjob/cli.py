"""`capjob`: compose the Hydra config, check it, run the pipeline.

Errors a user can act on print as one `capjob: error: ...` line (exit 2), never a traceback:
capjob's own checks and Hydra's composition errors alike (an unknown group option, an unknown
key, even one added with `+`, a value of the wrong type). The overrides are composed once with
Hydra's compose API before Hydra's app runs, so that Hydra never prints its multi-line errors.

`capjob --multirun a=1,2 b=x,y` runs every combination in this process, one after the other
(see capjob.sweep): a failed run is recorded in its job directory instead of ending the sweep,
and each run shuts down the Ray it started before the next one begins.
"""

from __future__ import annotations

import itertools
import pathlib
import sys
from typing import Any

import hydra
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from capjob import console, preflight, sweep
from capjob.config import register_configs, to_typed
from capjob.errors import CapjobError, describe

# Flags after which Hydra prints something and exits, or reads another config: Hydra handles them.
HYDRA_ONLY_FLAGS = ("-h", "--help", "--hydra-help", "--info", "-i", "--shell-completion", "-sc",
                    "--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd", "--experimental-rerun")
# Flags that take a value (the next argument, unless written flag=value).
VALUE_FLAGS = ("--cfg", "-c", "--package", "-p")
MULTIRUN_FLAGS = ("-m", "--multirun")


def _conf_dir() -> str:
    packaged = pathlib.Path(__file__).parent / "conf"  # wheel installs
    return str(packaged if packaged.is_dir() else pathlib.Path(__file__).resolve().parents[2] / "conf")


def fail(message: str) -> None:
    console.error(f"capjob: error: {message}")
    sys.exit(2)


def run_composed(cfg: DictConfig, report_dir: str) -> Any:
    """One job from its composed Hydra config: the preflight, then the pipeline (pipeline.run's
    result), or the dry run's plan (None). Raises CapjobError subclasses with one-line messages.
    The entry point of `capjob`, of each sweep job and of each checkpoint capjob-watch evaluates."""
    preflight.check_keys(cfg)
    typed = to_typed(cfg)
    if typed.job.dry_run:
        preflight.dry_run(typed)
        return None
    checked = preflight.check_all(typed, read_done=False)  # what the dry run checks, in the same order
    # Ray, Ray Data and every stage load with the pipeline: only once the preflight passed, so
    # that a mistake is reported in seconds.
    from capjob import pipeline

    resolved = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    return pipeline.run(typed, resolved, report_dir=report_dir, checked=checked)


@hydra.main(version_base="1.3", config_path=_conf_dir(), config_name="config")
def _main(cfg: DictConfig) -> None:
    if HydraConfig.get().mode == RunMode.MULTIRUN:
        # Records failures, never raises for one; releases Ray. Each job's plan and progress are
        # a line each on the console; the rest (summary, Ray's and vLLM's logs) in its capjob.log.
        level = str(OmegaConf.select(cfg, "job.log_level") or "warning")
        sweep.run_job(cfg, run_composed, session=lambda job_dir, num: console.session(job_dir, level, brief_prefix=f"job {num}: "))
        return
    run_dir = HydraConfig.get().runtime.output_dir
    try:
        with console.session(run_dir, str(OmegaConf.select(cfg, "job.log_level") or "warning")):
            run_composed(cfg, run_dir)
    except (CapjobError, OmegaConfBaseException) as e:
        fail(str(e))
    except console.Interrupted as e:
        console.error(str(e))
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 - a fault capjob did not foresee: the traceback goes to the log
        where = f"; traceback in {console.log_path}" if console.log_path else ""
        console.error(f"capjob: failed: {describe(e, 500)}{where}")
        sys.exit(1)


def _overrides(argv: list[str]) -> tuple[list[str], bool]:
    """(config overrides, multirun) from the command line, Hydra's flags left out."""
    out, multirun, skip = [], False, False
    for arg in argv:
        if skip:
            skip = False
        elif arg in MULTIRUN_FLAGS:
            multirun = True
        elif arg in VALUE_FLAGS:
            skip = True
        elif not arg.startswith("-"):
            out.append(arg)
    return out, multirun


def _compositions(overrides: list[str], multirun: bool) -> list[list[str]]:
    """The override lists to check: the command's own, or for a sweep each swept value once
    (the other sweeps at their first value) rather than every combination."""
    if not multirun:
        return [overrides]
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)  # a parse error is the user's: raised
    try:
        values = [[o.input_line] if not o.is_sweep_override() else
                  [f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()] for o in parsed]
    except Exception:  # noqa: BLE001 - a sweep Hydra expands itself (glob over a group): Hydra checks it
        return []
    firsts = [v[0] for v in values]
    out = [firsts]
    for i, options in enumerate(values):
        out += [firsts[:i] + [v] + firsts[i + 1:] for v in options[1:]]
    return out


def check_command_line(argv: list[str]) -> None:
    """Compose the config the way Hydra's app will and refuse what it would refuse, or what it
    would silently accept (a key added with `+` that capjob does not know), as one line."""
    if any(a.split("=", 1)[0] in HYDRA_ONLY_FLAGS for a in argv):
        return
    overrides, multirun = _overrides(argv)
    try:
        with initialize_config_dir(config_dir=_conf_dir(), version_base="1.3", job_name="capjob"):
            for chosen in itertools.islice(_compositions(overrides, multirun), 64):
                cfg = compose(config_name="config", overrides=chosen)
                preflight.check_keys(cfg)
                if multirun:
                    _check_models_of_job(cfg)
    except CapjobError as e:
        fail(str(e))
    except (HydraException, OmegaConfBaseException) as e:
        fail(preflight.hydra_error_line(e))


def _check_models_of_job(cfg: DictConfig) -> None:
    """A sweep's models (each checkpoint, the judge's), checked before its first job starts: a
    broken checkpoint is one line now, not a failed job an hour into the sweep. A config that
    does not validate is left to its job, which records the failure and lets the sweep go on."""
    try:
        typed = to_typed(cfg)
    except (CapjobError, OmegaConfBaseException):
        return
    preflight.check_models(typed)


def main() -> None:
    import logging

    # Between a sweep's jobs (each job, like a single run, routes logging itself: console.session).
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    register_configs()
    check_command_line(sys.argv[1:])
    _main()


if __name__ == "__main__":
    main()
