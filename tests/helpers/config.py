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


def model_files(path: pathlib.Path, lacking: tuple[str, ...] = (), weights: bool = True) -> pathlib.Path:
    """A model folder with the tiny model's real config, tokenizer, processor and chat template
    (what preflight loads and renders) and a stand-in weights file (never loaded here), minus the
    files named in `lacking`: a checkpoint as a trainer writes one, or one with a file missing."""
    import shutil

    from capjob import models

    built = pathlib.Path(models.resolve_model_source(None, models.TINY_QWEN25VL))
    path.mkdir(parents=True, exist_ok=True)
    for f in built.iterdir():
        if f.is_file() and f.name not in lacking and f.name != models.COMPLETE_MARKER and not f.name.endswith(".safetensors"):
            shutil.copy(f, path / f.name)
    if weights and "model.safetensors" not in lacking:
        (path / "model.safetensors").write_bytes(b"\0" * 2048)
    return path
