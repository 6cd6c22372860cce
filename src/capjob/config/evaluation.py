"""The ``eval`` group: caption evaluation after the run (reporting/evaluation.py) and its judge pass
(reporting/judge.py), with their range checks.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Optional

from capjob.config.groups import EngineConfig, ModelConfig, require, validate_engine
from capjob.models import BUILD_VERSIONS as MODEL_BUILDERS


class EvalMode(str, enum.Enum):
    off = "off"
    stats = "stats"  # statistics and per-row flags
    judge = "judge"  # statistics plus a judge model scoring each caption (reporting/judge.py)


def _judge_model() -> ModelConfig:
    return ModelConfig(name="", source=None)


def _judge_engine() -> EngineConfig:
    # Text-only: no image slots (vLLM then skips a VLM's vision tower); a caption and the
    # judge's prompt fit 4096 tokens.
    return EngineConfig(max_model_len=4096, limit_images_per_prompt=0)


@dataclass
class JudgeConfig:
    """The judge pass (mode=judge, reporting/judge.py): a model with its own engine that reads
    each caption and scores it 1-5 with a short reason. Text-only: it sees the caption, not the
    image. `model` and `engine` are the caption pass's groups (model.*, engine.*) with the
    judge's own values: eval.judge.model.source, eval.judge.engine.max_model_len..."""

    # source: hub id or local path; null with builder set: a model capjob builds. name: the
    # label in the report and the judge table; "": the last part of source (or the builder).
    model: ModelConfig = field(default_factory=_judge_model)
    engine: EngineConfig = field(default_factory=_judge_engine)
    system_prompt: str = "You are a strict and consistent judge of image captions. You answer in exactly the format you are asked for."
    # {caption} is replaced by the caption under evaluation (str.replace: braces in captions are safe).
    prompt: str = (
        "Below is a caption written for an image. You cannot see the image: judge the caption as a "
        "description. Is it fluent, specific and self-consistent, free of repetition, truncation, "
        "boilerplate and filler?\n\n"
        'Caption: """{caption}"""\n\n'
        "Rate it from 1 (empty, garbled, repetitive or unusable) to 5 (clear, specific, complete). "
        "Answer in exactly this format:\n"
        "Score: <1-5>\n"
        "Reason: <one short sentence>"
    )
    temperature: float = 0.0
    seed: Optional[int] = None
    max_tokens: int = 64
    # Judge engine replicas (the judge's resources.concurrency).
    concurrency: int = 1
    # GPUs per judge replica: null = engine.tensor_parallel_size when the cluster has GPUs, else 0 (CPU).
    gpus_per_worker: Optional[int] = None
    # The judge's raw answer is kept in the judge table, cut to this many characters.
    raw_chars: int = 1000


@dataclass
class EvalConfig:
    """`eval` group: caption evaluation after the run, consumed by reporting/evaluation.py."""

    name: str = "off"
    mode: EvalMode = EvalMode.off
    # Truncation threshold when the run's caption.max_tokens is not known (capjob-eval on an
    # existing output); None there leaves truncation unknown rather than guessed.
    max_tokens: Optional[int] = None
    # Degenerate captions: an n-gram of `ngram` words occurring >= `ngram_repeats` times, or the
    # most frequent one (occurring twice or more) covering > `ngram_share` of all n-grams...
    ngram: int = 3
    ngram_repeats: int = 3
    ngram_share: float = 0.3
    # ...or a line (same words) occurring >= `line_repeats` times.
    line_repeats: int = 2
    # A column of the captions table holding each image's true caption (e.g. `reference`,
    # passed through from the input): exact match, word F1, BLEU-4 and CIDEr-D against it.
    reference_column: Optional[str] = None
    judge: JudgeConfig = field(default_factory=JudgeConfig)


# Here rather than in reporting/evaluation.py, which imports pyarrow and the judge (seconds on 2
# cores): every run checks its config before the model preflight, which should come first.
def validate_eval(cfg: EvalConfig) -> EvalConfig:
    """Range checks the types cannot express. Raises ConfigError naming the key."""
    require(cfg.max_tokens is None or cfg.max_tokens > 0, "eval.max_tokens", f"must be > 0 or null, got {cfg.max_tokens}")
    require(cfg.ngram >= 1, "eval.ngram", f"must be >= 1, got {cfg.ngram}")
    require(cfg.ngram_repeats >= 2, "eval.ngram_repeats", f"must be >= 2, got {cfg.ngram_repeats}")
    require(0 < cfg.ngram_share <= 1, "eval.ngram_share", f"must be in (0, 1], got {cfg.ngram_share}")
    require(cfg.line_repeats >= 2, "eval.line_repeats", f"must be >= 2, got {cfg.line_repeats}")
    if cfg.mode == EvalMode.judge:
        j = cfg.judge
        require(bool(j.model.source) or bool(j.model.builder), "eval.judge.model.source",
                 "set a hub id or local path (or eval.judge.model.builder)")
        require(j.model.builder in (None, *MODEL_BUILDERS), "eval.judge.model.builder",
                 f"unknown builder {j.model.builder!r}; allowed: {', '.join(MODEL_BUILDERS)}")
        validate_engine(j.engine, "eval.judge.engine")
        require("{caption}" in j.prompt, "eval.judge.prompt", "must contain the placeholder {caption}")
        require(j.max_tokens > 0, "eval.judge.max_tokens", f"must be > 0, got {j.max_tokens}")
        require(j.concurrency >= 1, "eval.judge.concurrency", f"must be >= 1, got {j.concurrency}")
        require(j.temperature >= 0, "eval.judge.temperature", f"must be >= 0, got {j.temperature}")
        require(j.engine.max_model_len > j.max_tokens, "eval.judge.engine.max_model_len",
                 f"must be > eval.judge.max_tokens ({j.max_tokens}), got {j.engine.max_model_len}")
        tp = j.engine.tensor_parallel_size
        require(j.gpus_per_worker is None or j.gpus_per_worker in (0, tp), "eval.judge.gpus_per_worker",
                 f"must be null, 0 (CPU) or eval.judge.engine.tensor_parallel_size ({tp}), got {j.gpus_per_worker}")
        require(j.raw_chars >= 0, "eval.judge.raw_chars", f"must be >= 0, got {j.raw_chars}")
    return cfg


