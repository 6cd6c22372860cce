"""`capjob`: compose the Hydra config, validate it, run the pipeline.

Errors a user can act on print as one `capjob: error: ...` line (exit 2), never a traceback.

`capjob --multirun a=1,2 b=x,y` runs every combination in this process, one after the other
(see capjob.sweep): a failed run is recorded in its job directory instead of ending the sweep,
and each run shuts down the Ray it started before the next one begins.
"""

from __future__ import annotations

import logging
import pathlib
import sys
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from capjob.config import register_configs, to_typed
from capjob.errors import CapjobError


def _conf_dir() -> str:
    packaged = pathlib.Path(__file__).parent / "conf"  # wheel installs
    return str(packaged if packaged.is_dir() else pathlib.Path(__file__).resolve().parents[2] / "conf")


def _run(cfg: DictConfig, report_dir: str) -> Any:
    typed = to_typed(cfg)
    from capjob import pipeline

    resolved = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    return pipeline.run(typed, resolved, report_dir=report_dir)


@hydra.main(version_base="1.3", config_path=_conf_dir(), config_name="config")
def _main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.get().mode == RunMode.MULTIRUN:
        from capjob import sweep

        sweep.run_job(cfg, _run)  # records failures, never raises for one; releases Ray
        return
    try:
        _run(cfg, HydraConfig.get().runtime.output_dir)
    except (CapjobError, OmegaConfBaseException) as e:
        print(f"capjob: error: {e}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    register_configs()
    _main()


if __name__ == "__main__":
    main()
