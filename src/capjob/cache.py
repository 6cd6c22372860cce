"""Where capjob keeps what it builds on first use (tiny model, sample dataset)."""

import os
import pathlib


def cache_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("CAPJOB_CACHE", pathlib.Path.home() / ".cache" / "capjob"))
