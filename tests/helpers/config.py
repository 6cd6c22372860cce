"""The repository's paths and the config as the CLI composes it (Hydra's compose API)."""

import pathlib

REPO = pathlib.Path(__file__).resolve().parents[2]
CONF_DIR = REPO / "conf"
DATA_DIR = REPO / "tests" / "data"


def early_checkpoint(steps: int):
    """The tiny model after `steps` training steps (an early checkpoint for sweeps), built once
    into the tests' capjob cache and shared by the tests that sweep checkpoints."""
    from capjob import models
    from capjob.cache import cache_dir

    target = cache_dir() / "models" / f"{models.TINY_QWEN25VL}-{models.TINY_QWEN25VL_VERSION}-steps{steps}"
    return models.build_tiny_qwen25vl(target, train_steps=steps)


def compose(overrides: list[str] | None = None):
    """Compose conf/config.yaml with Hydra's compose API, as the CLI does."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from capjob.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides or [])
