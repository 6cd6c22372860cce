"""The ``watch`` section: `capjob-watch` (capjob/watch.py), which follows a training run's
checkpoint folder and evaluates every checkpoint on a golden set as soon as it is complete.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from capjob.config.groups import require


@dataclass
class WatchConfig:
    """`watch.*`: read by capjob-watch only (a plain `capjob` run ignores it)."""

    # The folder (local path or fsspec URL, e.g. s3://bucket/run7/checkpoints/) whose `step-N/`
    # or `checkpoint-N/` subfolders are checkpoints (N: the training step). Object storage is
    # read with the environment's credentials, as model.source=s3://... is.
    path: Optional[str] = None
    # Seconds between two listings of `path`.
    poll_interval_s: float = 30.0
    # A file the trainer writes into a checkpoint folder once it is done (e.g. COMPLETE): the
    # folder counts as complete when it is there. null: complete when its files (names, sizes,
    # mtimes or ETags) are the same in two listings in a row and the model check passes
    # (config, tokenizer, processor, chat template, weights).
    marker: Optional[str] = None
    # A checkpoint whose files stopped changing but still lack a model file is reported as
    # failed (a leaderboard row naming the files) after this many seconds.
    incomplete_after_s: float = 600.0
    # Stop once the leaderboard holds this many checkpoints (restarts included). null: no limit.
    max_checkpoints: Optional[int] = None
    # Stop after this many seconds without a new or changing checkpoint. null: never.
    idle_timeout_s: Optional[float] = None
    # Training is over once this file exists (the trainer writes it last): the watcher evaluates
    # every checkpoint written before it, then stops. A path or URL, or a bare name looked for
    # in `path`. null: none.
    stop_file: Optional[str] = "WATCH_STOP"


def validate_watch(cfg: WatchConfig) -> WatchConfig:
    """Range checks the types cannot express. Raises ConfigError naming the key."""
    # inf passes `> 0` but is no interval (time.sleep(inf) raises OverflowError at the first wait).
    require(0 < cfg.poll_interval_s < math.inf, "watch.poll_interval_s", f"must be > 0 seconds and finite, got {cfg.poll_interval_s}")
    require(cfg.incomplete_after_s >= 0, "watch.incomplete_after_s", f"must be >= 0 seconds, got {cfg.incomplete_after_s}")
    require(cfg.max_checkpoints is None or cfg.max_checkpoints >= 1, "watch.max_checkpoints",
            f"must be >= 1 or null, got {cfg.max_checkpoints}")
    require(cfg.idle_timeout_s is None or cfg.idle_timeout_s > 0, "watch.idle_timeout_s", f"must be > 0 or null, got {cfg.idle_timeout_s}")
    require(cfg.marker is None or (bool(cfg.marker.strip()) and "/" not in cfg.marker), "watch.marker",
            f"must be a file name (no '/') or null, got {cfg.marker!r}")
    return cfg
