"""Typed configuration: one dataclass per Hydra config group, validated before Ray starts.

Hydra merges the YAML groups in ``conf/`` onto these dataclasses (registered as the schema
``capjob_schema``), so an unknown key or a wrongly typed value fails during composition.
Range and consistency checks that types cannot express live in ``validate``.

The groups live in ``groups.py`` (the caption job's), ``evaluation.py`` (``eval``) and
``dedup.py`` (``dedup``); this module composes them into ``CapjobConfig`` and re-exports every
name, so callers import from ``capjob.config``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from capjob.config.dedup import DedupConfig, DedupMode, validate_dedup
from capjob.config.evaluation import EvalConfig, EvalMode, JudgeConfig, validate_eval
from capjob.config.labels import cluster_labels, format_selector, selector_matches, validate_label_selector
from capjob.config.groups import (CHAT_TEMPLATE_CONTENT_FORMATS, CaptionConfig, DataConfig, EngineConfig, FetchConfig,
                                  ImagesConfig, JobConfig, ModelConfig, ResizeMode, ResourcesConfig, SinkConfig, SinkFormat,
                                  SourceFormat, parse_shard, require, validate_engine)
from capjob.config.watch import WatchConfig, validate_watch
from capjob.console import LOG_LEVELS
from capjob.errors import ConfigError
from capjob.models import BUILD_VERSIONS as MODEL_BUILDERS
from capjob.prompts import caption_columns, validate_prompts
from capjob.schema import ROW_COLUMNS

__all__ = [
    "CHAT_TEMPLATE_CONTENT_FORMATS", "CapjobConfig", "CaptionConfig", "DataConfig", "DedupConfig", "DedupMode", "EngineConfig", "EvalConfig", "EvalMode",
    "FetchConfig", "ImagesConfig", "JobConfig", "JudgeConfig", "ModelConfig", "ResizeMode", "ResourcesConfig", "SinkConfig",
    "SinkFormat", "SourceFormat", "parse_shard", "register_configs", "require", "to_typed", "validate", "validate_engine",
    "validate_dedup", "validate_eval", "validate_label_selector", "selector_matches", "format_selector", "cluster_labels",
    "WatchConfig", "validate_watch",
]


@dataclass
class CapjobConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    sink: SinkConfig = field(default_factory=SinkConfig)
    caption: CaptionConfig = field(default_factory=CaptionConfig)
    images: ImagesConfig = field(default_factory=ImagesConfig)
    job: JobConfig = field(default_factory=JobConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    watch: WatchConfig = field(default_factory=WatchConfig)  # capjob-watch only


def register_configs() -> None:
    ConfigStore.instance().store(name="capjob_schema", node=CapjobConfig)


def validate(cfg: CapjobConfig) -> CapjobConfig:
    """Checks the types cannot express. Raises ConfigError naming the key."""
    d, m, e, r, c, i = cfg.data, cfg.model, cfg.engine, cfg.resources, cfg.caption, cfg.images
    require(d.limit is None or d.limit > 0, "data.limit", f"must be a positive integer or null, got {d.limit}")
    require(d.partitions is None or d.partitions > 0, "data.partitions", f"must be a positive integer or null (automatic), got {d.partitions}")
    parse_shard(d.shard)
    require(d.partitions_per_worker > 0, "data.partitions_per_worker", f"must be > 0, got {d.partitions_per_worker}")
    require(d.format == SourceFormat.sample or bool(d.path), "data.path", f"is required for data.format={d.format.value}")
    require(d.image_index is None or d.image_index >= 0, "data.image_index", f"must be >= 0 or null, got {d.image_index}")
    require(d.image_index is None or not d.explode_images, "data.explode_images", "set data.image_index or data.explode_images, not both")
    f = d.fetch
    require(f.concurrency >= 1, "data.fetch.concurrency", f"must be >= 1, got {f.concurrency}")
    require(f.retries >= 0, "data.fetch.retries", f"must be >= 0, got {f.retries}")
    require(f.connect_timeout_s > 0 and f.read_timeout_s > 0, "data.fetch.read_timeout_s",
             f"timeouts must be > 0, got connect {f.connect_timeout_s}, read {f.read_timeout_s}")
    require(f.backoff_s >= 0, "data.fetch.backoff_s", f"must be >= 0, got {f.backoff_s}")
    require(all(isinstance(x, str) and x.strip() and ":" not in x and "," not in x for x in f.robots_directives),
             "data.fetch.robots_directives", f"must be directive names such as noai, got {list(f.robots_directives)}")
    require(d.image_root is None or d.format == SourceFormat.json, "data.image_root",
             f"applies to data.format=json only, got data.format={d.format.value}")
    require(d.verify_hash_column != d.image_column, "data.verify_hash_column", "names the image column itself")
    require(d.sample_size >= 0, "data.sample_size", f"must be >= 0, got {d.sample_size}")
    require(d.sample_shapes >= 0, "data.sample_shapes", f"must be >= 0, got {d.sample_shapes}")
    require(bool(m.source) or bool(m.builder), "model.source", "set a hub id or local path (or model.builder for a locally built model)")
    require(m.builder in (None, *MODEL_BUILDERS), "model.builder", f"unknown builder {m.builder!r}; allowed: {', '.join(MODEL_BUILDERS)}")
    validate_engine(e)
    require(r.concurrency >= 1, "resources.concurrency", f"must be >= 1, got {r.concurrency}")
    require(r.gpus_per_worker is None or r.gpus_per_worker >= 0, "resources.gpus_per_worker", f"must be >= 0 or null, got {r.gpus_per_worker}")
    model_parallel = e.tensor_parallel_size * e.pipeline_parallel_size
    require(r.replicas_per_gpu >= 1, "resources.replicas_per_gpu", f"must be >= 1, got {r.replicas_per_gpu}")
    if r.replicas_per_gpu > 1:
        require(model_parallel == 1, "resources.replicas_per_gpu",
                 f"sharing a GPU needs engine.tensor_parallel_size = pipeline_parallel_size = 1, got TP x PP = {model_parallel}")
        require(r.gpus_per_worker in (None, 1), "resources.replicas_per_gpu",
                 f"sharing a GPU needs resources.gpus_per_worker null or 1, got {r.gpus_per_worker}")
        require(e.kv_cache_gib is not None, "engine.kv_cache_gib",
                 f"must be set when resources.replicas_per_gpu={r.replicas_per_gpu}: engines sharing a GPU "
                 "cannot size their KV cache by profiling memory at the same time (e.g. engine.kv_cache_gib=16)")
    if r.gpus_per_worker is None:
        pass  # decided against the cluster's GPUs in runtime.py
    elif r.gpus_per_worker > 0:
        require(
            model_parallel == r.gpus_per_worker,
            "engine.tensor_parallel_size",
            f"engine.tensor_parallel_size x engine.pipeline_parallel_size = {model_parallel} "
            f"must equal resources.gpus_per_worker = {r.gpus_per_worker}",
        )
    else:
        require(model_parallel == 1, "engine.tensor_parallel_size", "TP/PP > 1 needs GPUs: set resources.gpus_per_worker = TP x PP")
    require(r.num_cpus is None or r.num_cpus >= 1, "resources.num_cpus", f"must be >= 1 or null, got {r.num_cpus}")
    require(r.preprocess_cpus > 0, "resources.preprocess_cpus", f"must be > 0, got {r.preprocess_cpus}")
    require(r.object_store_mib is None or r.object_store_mib >= 16, "resources.object_store_mib", f"must be null or >= 16, got {r.object_store_mib}")
    require(r.wait_for_engines_s is None or r.wait_for_engines_s >= 1, "resources.wait_for_engines_s", f"must be null or >= 1, got {r.wait_for_engines_s}")
    require(r.wait_for_gpus_s is None or r.wait_for_gpus_s >= 1, "resources.wait_for_gpus_s", f"must be null or >= 1, got {r.wait_for_gpus_s}")
    require(r.max_block_mib is None or r.max_block_mib >= 1, "resources.max_block_mib", f"must be null or >= 1, got {r.max_block_mib}")
    require(r.cpu_stage_cpus > 0, "resources.cpu_stage_cpus", f"must be > 0, got {r.cpu_stage_cpus}")
    require(r.node_lost_wait_s >= 0, "resources.node_lost_wait_s", f"must be >= 0, got {r.node_lost_wait_s}")
    validate_label_selector(r.engine_label_selector, "resources.engine_label_selector")
    validate_label_selector(r.cpu_label_selector, "resources.cpu_label_selector")
    require(r.cpu_stage_concurrency >= 1, "resources.cpu_stage_concurrency", f"must be >= 1, got {r.cpu_stage_concurrency}")
    resume = cfg.job.resume
    if isinstance(resume, str) and resume.strip().lower() in ("true", "false"):
        resume = cfg.job.resume = resume.strip().lower() == "true"
    require(resume is True or resume is False or resume == "force", "job.resume", f"must be true, false or force, got {resume!r}")
    require(cfg.job.task_retries >= 0, "job.task_retries", f"must be >= 0, got {cfg.job.task_retries}")
    require(cfg.job.gpu_hour_price is None or cfg.job.gpu_hour_price >= 0, "job.gpu_hour_price",
             f"must be >= 0 (a price per GPU-hour), got {cfg.job.gpu_hour_price}")
    require(cfg.job.log_level.lower() in LOG_LEVELS, "job.log_level", f"must be one of {', '.join(LOG_LEVELS)}, got {cfg.job.log_level!r}")
    require(cfg.job.max_errored_blocks >= 0, "job.max_errored_blocks", f"must be >= 0, got {cfg.job.max_errored_blocks}")
    require(c.max_tokens > 0, "caption.max_tokens", f"must be > 0, got {c.max_tokens}")
    require(c.temperature >= 0, "caption.temperature", f"must be >= 0, got {c.temperature}")
    require(0 < c.top_p <= 1, "caption.top_p", f"must be in (0, 1], got {c.top_p}")
    require(bool(c.user_prompt.strip()), "caption.user_prompt", "must not be empty")
    validate_prompts(c)
    written = (*ROW_COLUMNS, *caption_columns(c))
    for column in d.passthrough_columns:
        require(column not in written, "data.passthrough_columns",
                 f"{column!r} is a column capjob writes itself ({', '.join(written)}): its value would be lost "
                 "(with data.format=json a record's field of that name is the column source_<name>)")
    require(not c.prompts or cfg.eval.mode == EvalMode.off, "eval.mode",
             "evaluation reads the single `caption` column; with caption.prompts run capjob-eval on a copy of the output instead, or eval=off")
    if cfg.sink.format != SinkFormat.txt:
        require(not (c.prefix or c.suffix), "caption.prefix", "prefix/suffix apply to sink=txt only; the caption columns stay as generated")
    elif cfg.sink.txt_column is not None:
        require(cfg.sink.txt_column in caption_columns(c), "sink.txt_column",
                 f"{cfg.sink.txt_column!r} is not a caption column; allowed: {', '.join(caption_columns(c))}")
    require(i.size >= 28, "images.size", f"must be >= 28 (one vision patch), got {i.size}")
    require(i.max_pixels > 0, "images.max_pixels", f"must be > 0, got {i.max_pixels}")
    validate_eval(cfg.eval)
    validate_dedup(cfg.dedup)
    validate_watch(cfg.watch)
    return cfg


def to_typed(cfg: DictConfig) -> CapjobConfig:
    """Resolve interpolations, build the dataclasses and validate them."""
    typed = OmegaConf.to_object(cfg)
    if not isinstance(typed, CapjobConfig):
        raise ConfigError("the composed config is not a capjob config (was conf/config.yaml replaced?)")
    return validate(typed)
