import os
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "conf"


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Tests share one capjob cache (tiny model, sample set) that is not the user's."""
    cache = os.environ.get("CAPJOB_TEST_CACHE") or str(tmp_path_factory.mktemp("capjob-cache"))
    os.environ["CAPJOB_CACHE"] = cache
    yield cache


def compose(overrides: list[str] | None = None):
    """Compose conf/config.yaml with Hydra's compose API, as the CLI does."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from capjob.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides or [])
