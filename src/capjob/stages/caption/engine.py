"""Stage: the vLLM engine of the caption step (and of the judge's text pass): where each replica
runs (placement), vLLM's engine args, and Ray Data LLM's vLLMEngineProcessorConfig.

Every function takes the config groups it reads (`engine`, `model`, `resources`, `job`), never
the whole job config. Ray Data LLM and vLLM are imported inside the functions that need them:
the preflight imports this module to size the dry run's plan without them.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from capjob.config import EngineConfig, JobConfig, ModelConfig, ResourcesConfig
from capjob.errors import ConfigError
from capjob.prompts import PromptSpec

log = logging.getLogger(__name__)

# The processor cache a multi-prompt run gets when engine.mm_processor_cache_gb is 0 (GiB).
MULTI_PROMPT_PROCESSOR_CACHE_GB = 1.0


@dataclass(frozen=True)
class EnginePlacement:
    """How one engine replica is placed: on `gpus` GPUs (a fraction when replicas share one),
    or on CPU when gpus == 0. node_gpus: the most GPUs one node of the cluster has (None:
    not known, taken as enough for one replica)."""

    gpus: float
    accelerator_type: Optional[str]
    node_gpus: Optional[int] = None

    @property
    def shares_gpu(self) -> bool:
        return 0 < self.gpus < 1

    @property
    def fits_one_node(self) -> bool:
        return self.node_gpus is None or self.gpus <= self.node_gpus


# --- placement ---------------------------------------------------------------------------------


def local_gpu_count() -> int:
    """GPUs on this machine, found without starting Ray or importing torch."""
    try:
        from ray._private.accelerators import NvidiaGPUAcceleratorManager

        return int(NvidiaGPUAcceleratorManager.get_current_node_num_accelerators() or 0)
    except Exception:  # noqa: BLE001 - no driver, no NVML
        return 0


def replica_gpus(resources: ResourcesConfig, engine: EngineConfig, has_gpus: bool) -> float:
    """GPUs one engine replica asks for: gpus_per_worker, else TP x PP on a GPU cluster (0 = vLLM
    on CPU); 1/N of one GPU when resources.replicas_per_gpu = N share it."""
    r, e = resources, engine
    gpus = r.gpus_per_worker if r.gpus_per_worker is not None else (e.tensor_parallel_size * e.pipeline_parallel_size if has_gpus else 0)
    return 1 / r.replicas_per_gpu if gpus > 0 and r.replicas_per_gpu > 1 else gpus


def decide_placement(resources: ResourcesConfig, engine: EngineConfig, available_gpus: int,
                     node_gpus: Optional[int] = None) -> EnginePlacement:
    """GPUs per engine replica, checked against what the cluster has (available_gpus in all,
    node_gpus on its largest node, None: not known). Raises ConfigError."""
    r, e = resources, engine
    model_parallel = e.tensor_parallel_size * e.pipeline_parallel_size
    gpus = replica_gpus(r, e, available_gpus > 0)
    if gpus > available_gpus:
        raise ConfigError(
            f"resources.gpus_per_worker: each engine replica needs {gpus:g} GPU(s) "
            f"(engine.tensor_parallel_size x engine.pipeline_parallel_size = {model_parallel}) "
            f"but the cluster has {available_gpus}; use resources=local on a CPU machine or lower TP/PP"
        )
    if gpus > 0 and gpus * r.concurrency > available_gpus + 1e-9:
        log.warning(
            "resources.concurrency=%d replicas x %g GPU(s) > %d GPU(s): replicas beyond %d will wait",
            r.concurrency, gpus, available_gpus, int(available_gpus / gpus + 1e-9),
        )
    if gpus == 0 and model_parallel > 1:
        raise ConfigError("engine.tensor_parallel_size: TP/PP > 1 needs GPUs and this cluster has none")
    return EnginePlacement(gpus=gpus, accelerator_type=r.accelerator_type if gpus else None, node_gpus=node_gpus)


def largest_node_gpus() -> int:
    """The most GPUs one alive node of the connected Ray cluster has."""
    import ray

    return int(max((n.get("Resources", {}).get("GPU", 0) for n in ray.nodes() if n.get("Alive")), default=0))


ACCELERATOR_PREFIX = "accelerator_type:"  # Ray's per-node resource, e.g. accelerator_type:H200
ACCELERATOR_LABEL = "ray.io/accelerator-type"  # Ray's default node label for it (Ray 2.49+)


def accelerator_types(cluster_resources: dict[str, float], nodes: Optional[Sequence[dict[str, Any]]] = None) -> list[str]:
    """The accelerator types of the cluster: the alive nodes' `ray.io/accelerator-type` labels
    (ray.nodes()' "Labels", where the Ray version has them) and the `accelerator_type:<type>`
    resources of ray.cluster_resources() (older Rays have only these; Ray Data LLM schedules
    by the resource)."""
    found = {k[len(ACCELERATOR_PREFIX):] for k in cluster_resources if k.startswith(ACCELERATOR_PREFIX)}
    found |= {n["Labels"][ACCELERATOR_LABEL] for n in nodes or () if n.get("Alive") and ACCELERATOR_LABEL in (n.get("Labels") or {})}
    return sorted(found)


def check_accelerator_type(placement: EnginePlacement, cluster_resources: dict[str, float],
                           nodes: Optional[Sequence[dict[str, Any]]] = None) -> None:
    """A GPU engine pinned to resources.accelerator_type needs a node of that type
    (accelerator_types: Ray's label or resource; Ray names an NVIDIA H200 "H200"). Without one,
    Ray Data's engine actor would stay pending forever (the autoscaler logs "No available node
    types can fulfill resource request"). Checked against the nodes up when the job starts
    (`nodes`: ray.nodes()). Raises ConfigError naming what the cluster has."""
    want = placement.accelerator_type
    if not want or not placement.gpus:
        return
    have = accelerator_types(cluster_resources, nodes)
    if want in have:
        return
    gpus = int(cluster_resources.get("GPU", 0))
    types = f"accelerator type(s) {', '.join(have)}" if have else "no accelerator type label"
    raise ConfigError(
        f"resources.accelerator_type: no node of the cluster has accelerator type {want!r} "
        f"(it has {gpus} GPU(s), {types}); set resources.accelerator_type to one of those, or null for any GPU"
    )


# --- vLLM's engine args and Ray Data LLM's processor config -----------------------------------


def executor_backend(engine: EngineConfig, placement: EnginePlacement) -> Optional[str]:
    """vLLM's distributed_executor_backend for one replica, or None for one GPU (ray.llm then
    runs vLLM's single-process "uni" executor).

    - TP > 1 on one node: "mp", vLLM's multiprocessing executor (vLLM's own default on one
      node). Ray Data LLM then gives the engine actor all TP x PP GPUs and vLLM starts one
      worker process per GPU inside it, instead of an actor holding no GPU plus a placement
      group of worker actors (vLLM's RayExecutorV2). TP=2 ran under "mp" on 2 x H200 where it
      had never run under the Ray executor (docs/benchmarks.md, "2 x H200").
    - PP only, or a replica larger than any node: "ray" (a replica spanning nodes needs it)."""
    e = engine
    if placement.gpus == 0 or e.tensor_parallel_size * e.pipeline_parallel_size == 1:
        return None
    if e.tensor_parallel_size > 1 and placement.fits_one_node:
        return "mp"
    return "ray"


def engine_kwargs(engine: EngineConfig, model: ModelConfig, placement: EnginePlacement,
                  prompts: Sequence[PromptSpec] = ()) -> dict[str, Any]:
    """vLLM's EngineArgs for one replica (a dict of its field names). prompts: the caption
    requests (prompts.prompt_specs), which decide the processor cache of a multi-prompt run and
    the grammar switch of JSON answers; () for a pass without them (the judge)."""
    e, m = engine, model
    kwargs: dict[str, Any] = {
        "max_model_len": e.max_model_len,
        "tensor_parallel_size": e.tensor_parallel_size,
        "pipeline_parallel_size": e.pipeline_parallel_size,
        "enforce_eager": e.enforce_eager,
        "dtype": m.dtype,
        "load_format": m.load_format,
        "trust_remote_code": m.trust_remote_code,
        "limit_mm_per_prompt": {"image": e.limit_images_per_prompt, "video": 0},
        "mm_processor_cache_gb": e.mm_processor_cache_gb,
    }
    if placement.gpus > 0:
        # vLLM reads the utilisation as a share of the whole GPU: replicas sharing one split it.
        kwargs["gpu_memory_utilization"] = e.gpu_memory_utilization * min(1.0, placement.gpus)
        if e.kv_cache_gib is not None:
            kwargs["kv_cache_memory_bytes"] = int(e.kv_cache_gib * 2**30)
    else:
        kwargs["kv_cache_memory_bytes"] = int(e.cpu_kv_cache_gib * 2**30)
    if e.max_num_seqs is not None:
        kwargs["max_num_seqs"] = e.max_num_seqs
    if e.max_num_batched_tokens is not None:
        kwargs["max_num_batched_tokens"] = e.max_num_batched_tokens
    if e.quantization:
        kwargs["quantization"] = e.quantization
    backend = executor_backend(e, placement)
    if backend:
        kwargs["distributed_executor_backend"] = backend
    if len(prompts) > 1 and not e.mm_processor_cache_gb:
        # The requests of one image (one per prompt) reach the engine together under one uuid:
        # a small processor cache runs the HF image processor once for them (vLLM's encoder
        # cache, keyed by the same uuid, shares the vision embeddings between them anyway).
        kwargs["mm_processor_cache_gb"] = MULTI_PROMPT_PROCESSOR_CACHE_GB
    if any(spec.json_schema for spec in prompts):
        # Compact JSON: vLLM's grammar otherwise allows whitespace between tokens, and a model may
        # spend its whole token budget on it (seen with the tiny model: newlines until
        # max_tokens, an unterminated object). An engine-wide switch of the xgrammar backend.
        kwargs["structured_outputs_config"] = {"backend": "xgrammar", "disable_any_whitespace": True}
    kwargs.update(e.extra_engine_kwargs)
    return kwargs


def engine_detokenize(engine: EngineConfig) -> dict[str, Any]:
    """SamplingParams entries: {"detokenize": False} when Ray Data LLM's Detokenize stage decodes
    the generated tokens (engine.detokenize_stage), so vLLM's front-end does not decode them a
    second time, token by token; else {} (vLLM's default: it decodes)."""
    return {"detokenize": False} if engine.detokenize_stage else {}


def cpu_stages(engine: EngineConfig, *, multimodal: bool = True, chat_template_stages: Optional[bool] = None) -> list[str]:
    """The processor's CPU stages that hold an actor each, in pipeline order (around the engine).
    multimodal: the caption pass, whose PrepareMultimodal and ChatTemplate stages run only with
    engine.chat_template_stages (else the prompt is rendered once); the judge's text pass keeps
    its ChatTemplate stage."""
    e = engine
    templated = e.chat_template_stages if chat_template_stages is None else chat_template_stages
    return [name for name, on in (
        ("PrepareMultimodal", multimodal and templated),
        ("ChatTemplate", templated or not multimodal),
        ("Tokenize", e.tokenize_stage),
        ("Detokenize", e.detokenize_stage),
    ) if on]


def engine_bundles(placement: EnginePlacement, extra: Optional[dict[str, float]] = None) -> Optional[dict[str, Any]]:
    """Ray resources of one engine replica; None = Ray Data LLM's default (TP x PP bundles of
    1 GPU + 1 CPU). `extra`: resources.engine_resources, custom resources added to every bundle
    (Ray Data LLM passes them on as the engine actor's `resources`)."""
    extra = {k: float(v) for k, v in (extra or {}).items()}
    if placement.gpus == 0:
        return {"bundles": [{"CPU": 1, **extra}]}  # a CPU engine must not ask Ray for a GPU
    if placement.shares_gpu:
        return {"bundles": [{"GPU": placement.gpus, **extra}]}
    if extra:
        return {"bundle_per_worker": {"GPU": 1, "CPU": 1, **extra}}
    return None


def given_content_format(engine: EngineConfig) -> str:
    """engine.chat_template_content_format before it is resolved for a model: "auto" reads as Ray
    Data LLM's default, "string"."""
    given = engine.chat_template_content_format
    return "string" if given == "auto" else given


def processor_config(engine: EngineConfig, model: ModelConfig, resources: ResourcesConfig, model_source: str,
                     placement: EnginePlacement, *, prompts: Sequence[PromptSpec] = (), multimodal: bool = True,
                     chat_template_stages: Optional[bool] = None, content_format: Optional[str] = None) -> Any:
    """Ray Data LLM's vLLMEngineProcessorConfig for one engine (the caption pass's, or the judge's
    text pass with multimodal=False): CPU placement when placement.gpus == 0, failed rows kept
    and flagged (ERROR_COLUMN). content_format: PrepareMultimodal's chat template content format
    as the render task resolved it (None: given_content_format). Imports ray.data.llm."""
    from ray.data.llm import vLLMEngineProcessorConfig

    r = resources
    cpu_stage = {"num_cpus": r.cpu_stage_cpus, "concurrency": r.cpu_stage_concurrency}
    enabled = set(cpu_stages(engine, multimodal=multimodal, chat_template_stages=chat_template_stages))
    return vLLMEngineProcessorConfig(
        model_source=model_source,
        engine_kwargs=engine_kwargs(engine, model, placement, prompts),
        batch_size=engine.batch_size,
        max_concurrent_batches=engine.max_concurrent_batches,
        # (n, n): every replica from the start. An int n lets Ray Data start one engine and add
        # the others only once a backlog builds, each after a minutes-long engine start.
        concurrency=(r.concurrency, r.concurrency),
        accelerator_type=placement.accelerator_type if placement.gpus else None,
        placement_group_config=engine_bundles(placement, r.engine_resources),
        prepare_multimodal_stage={"enabled": "PrepareMultimodal" in enabled, **cpu_stage,
                                  "chat_template_content_format": content_format or given_content_format(engine)},
        chat_template_stage={"enabled": "ChatTemplate" in enabled, **cpu_stage},
        tokenize_stage={"enabled": "Tokenize" in enabled, **cpu_stage},
        detokenize_stage={"enabled": "Detokenize" in enabled, **cpu_stage},
        # Failed rows come back with __inference_error__ (quarantine, or a judge failure).
        should_continue_on_error=True,
        log_engine_metrics=engine.log_engine_metrics,
        runtime_env={"env_vars": env} if (env := engine_env(engine, placement)) else None,
    )


def engine_env(engine: EngineConfig, placement: EnginePlacement) -> dict[str, str]:
    """The environment of the processor's actors (the engine's included): engine.env_vars, and
    for a CPU engine with engine.enforce_eager TORCH_COMPILE_DISABLE=1 (unless env_vars sets it).
    Why: enforce_eager turns off vLLM's model compilation, but vLLM 0.26's CPU sampler still
    wraps its random sampling in torch.compile (vllm/v1/sample/ops/topk_topp_sampler.py,
    compiled_random_sample), and its warm-up compiles it in every new engine process; Inductor
    then probes the CPU's vector ISAs by building and loading test libraries, each in a fresh
    Python that imports torch (torch/_inductor/cpu_vec_isa.py). With it disabled the function
    runs eagerly: the same sampling, seconds less engine start (docs/benchmarks.md, issue 36)."""
    env = {k: str(v) for k, v in engine.env_vars.items()}
    if placement.gpus == 0 and engine.enforce_eager:
        env.setdefault("TORCH_COMPILE_DISABLE", "1")
    return env


def task_options(resources: ResourcesConfig, job: JobConfig) -> dict[str, Any]:
    """Ray remote args of the pipeline's tasks (read side, preprocess, postprocess, write), with
    resources.cpu_label_selector as their `label_selector`. Equal args let Ray Data fuse
    neighbouring task stages into one operator."""
    return {"num_cpus": resources.preprocess_cpus, "max_retries": job.task_retries, "retry_exceptions": True,
            **cpu_placement(resources)}


def cpu_placement(resources: ResourcesConfig) -> dict[str, Any]:
    """{"label_selector": resources.cpu_label_selector} for a CPU-side task or actor's remote
    args, {} without one."""
    return {"label_selector": dict(resources.cpu_label_selector)} if resources.cpu_label_selector else {}


ENGINE_STAGE = "vLLMEngineStage"  # Ray Data LLM's name of the engine stage in Processor.stages


def place_stages(stages: dict[str, Any], resources: ResourcesConfig) -> None:
    """Ray Data LLM's processor stages (Processor.stages, built) put on labelled nodes: the engine
    stage's actors on resources.engine_label_selector, the CPU stages' (tokenize, detokenize,
    chat template) on resources.cpu_label_selector, as the actors' `label_selector` (Ray Data
    passes map_batches' remote args to the actor pool). vLLMEngineProcessorConfig has no such
    field. An engine on vLLM's Ray executor (engine.pipeline_parallel_size > 1, a replica
    larger than a node) runs in a placement group: its bundles get the selector instead
    (labelled_placement)."""
    for name, stage in stages.items():
        selector = resources.engine_label_selector if name == ENGINE_STAGE else resources.cpu_label_selector
        if not selector:
            continue
        kwargs = stage.map_batches_kwargs
        make_strategy = kwargs.get("ray_remote_args_fn")
        if name == ENGINE_STAGE and make_strategy is not None:
            kwargs["ray_remote_args_fn"] = functools.partial(labelled_placement, make_strategy, dict(selector))
        else:
            kwargs["label_selector"] = dict(selector)


def labelled_placement(make_strategy: Any, selector: dict[str, str]) -> dict[str, Any]:
    """Ray Data LLM's engine placement group (`make_strategy`: its _ray_scheduling_strategy_fn,
    a partial of (bundles per replica, accelerator type, placement group config)) with
    `selector` on every bundle (ray.util.placement_group's bundle_label_selector)."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    count, accelerator, config = make_strategy.args
    config = dict(config or {"bundles": [{"GPU": 1, "CPU": 1}] * count, "strategy": "PACK"})
    bundles = [dict(b, **({f"{ACCELERATOR_PREFIX}{accelerator}": 0.001} if accelerator else {})) for b in config.pop("bundles")]
    pg = ray.util.placement_group(bundles, bundle_label_selector=[dict(selector) for _ in bundles], **config)
    return {"scheduling_strategy": PlacementGroupSchedulingStrategy(pg, placement_group_capture_child_tasks=True)}
