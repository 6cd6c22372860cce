"""Stage: the Ray Data LLM processor (vLLM) that turns prepared images into captions.

preprocess builds the chat request from the already-decoded small image; the processor's own
stages then run PrepareMultimodal -> ChatTemplate -> [Tokenize] -> vLLM -> [Detokenize] (the
bracketed ones per `engine.tokenize_stage` / `engine.detokenize_stage`); the output projection keeps only the output schema (never the image).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from capjob.config import CapjobConfig

ERROR_COLUMN = "__inference_error__"
# The processor keeps each row's working data in this column (ray.llm Processor.DATA_COLUMN).
DATA_COLUMN = "__data"


@dataclass(frozen=True)
class EnginePlacement:
    """How one engine replica is placed: on `gpus` GPUs (a fraction when replicas share one),
    or on CPU when gpus == 0."""

    gpus: float
    accelerator_type: Optional[str]

    @property
    def shares_gpu(self) -> bool:
        return 0 < self.gpus < 1


def engine_kwargs(cfg: CapjobConfig, model_source: str, placement: EnginePlacement) -> dict[str, Any]:
    e, m = cfg.engine, cfg.model
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
    if e.pipeline_parallel_size > 1:
        # PP (and TP across nodes) needs Ray's executor; ray.llm picks it for TP > 1 itself.
        kwargs["distributed_executor_backend"] = "ray"
    kwargs.update(e.extra_engine_kwargs)
    return kwargs


class CaptionRequest:
    """preprocess: one prepared row -> chat messages + sampling params."""

    def __init__(self, cfg: CapjobConfig):
        c = cfg.caption
        self.system_prompt = c.system_prompt
        self.user_prompt = c.user_prompt
        self.sampling_params = {
            "temperature": c.temperature,
            "top_p": c.top_p,
            "max_tokens": c.max_tokens,
            "ignore_eos": c.ignore_eos,
            **({"seed": c.seed} if c.seed is not None else {}),
        }

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        from PIL import Image

        pixels = row["image"]
        image = Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8), "RGB")
        messages = [
            {"role": "system", "content": self.system_prompt},
            {
                "role": "user",
                "content": [
                    # The row id doubles as vLLM's multimodal cache key: no hashing of pixels.
                    {"type": "image_pil", "image_pil": image, "uuid": row["id"]},
                    {"type": "text", "text": self.user_prompt},
                ],
            },
        ]
        # image=None: the array has served its purpose; don't carry it through every stage.
        return {"messages": messages, "sampling_params": self.sampling_params, "image": None}


class CaptionRecord:
    """postprocess for every row, successful or failed: project to the output schema."""

    def __init__(self, model_name: str, run_id: str, passthrough_columns: list[str]):
        self.model_name = model_name
        self.run_id = run_id
        self.passthrough_columns = passthrough_columns

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        data = row[DATA_COLUMN]
        out = {
            "id": data["id"],
            "source_key": data["source_key"],
            "caption": data.get("generated_text") or "",
            "prompt_tokens": int(data.get("num_input_tokens") or 0),
            "generated_tokens": int(data.get("num_generated_tokens") or 0),
            "image_width": int(data["image_width"]),
            "image_height": int(data["image_height"]),
            "model": self.model_name,
            "run_id": self.run_id,
            ERROR_COLUMN: data.get(ERROR_COLUMN) or "",
        }
        for column in self.passthrough_columns:
            out[column] = data.get(column)
        return out


def cpu_stages(cfg: CapjobConfig, *, multimodal: bool = True) -> list[str]:
    """The processor's CPU stages that hold an actor each, in pipeline order (around the engine)."""
    e = cfg.engine
    return [name for name, on in (
        ("PrepareMultimodal", multimodal),
        ("ChatTemplate", True),
        ("Tokenize", e.tokenize_stage),
        ("Detokenize", e.detokenize_stage),
    ) if on]


def engine_bundles(placement: EnginePlacement) -> Optional[dict[str, Any]]:
    """Ray resources of one engine replica; None = Ray Data LLM's default (TP x PP whole GPUs)."""
    if placement.gpus == 0:
        return {"bundles": [{"CPU": 1}]}  # a CPU engine must not ask Ray for a GPU
    if placement.shares_gpu:
        return {"bundles": [{"GPU": placement.gpus}]}
    return None


def processor_config(cfg: CapjobConfig, model_source: str, placement: EnginePlacement, *, multimodal: bool = True):
    """The vLLMEngineProcessorConfig for `cfg`'s engine/resources (shared by the caption pass and
    the judge pass): CPU placement when placement.gpus == 0, failed rows kept and flagged."""
    from ray.data.llm import vLLMEngineProcessorConfig

    r = cfg.resources
    cpu_stage = {"num_cpus": r.cpu_stage_cpus, "concurrency": r.cpu_stage_concurrency}
    enabled = set(cpu_stages(cfg, multimodal=multimodal))
    return vLLMEngineProcessorConfig(
        model_source=model_source,
        engine_kwargs=engine_kwargs(cfg, model_source, placement),
        batch_size=cfg.engine.batch_size,
        max_concurrent_batches=cfg.engine.max_concurrent_batches,
        # (n, n): every replica from the start. An int n lets Ray Data start one engine and add
        # the others only once a backlog builds, each after a minutes-long engine start.
        concurrency=(r.concurrency, r.concurrency),
        accelerator_type=placement.accelerator_type if placement.gpus else None,
        placement_group_config=engine_bundles(placement),
        prepare_multimodal_stage={"enabled": "PrepareMultimodal" in enabled, **cpu_stage},
        chat_template_stage={"enabled": "ChatTemplate" in enabled, **cpu_stage},
        tokenize_stage={"enabled": "Tokenize" in enabled, **cpu_stage},
        detokenize_stage={"enabled": "Detokenize" in enabled, **cpu_stage},
        # Failed rows come back with __inference_error__ (quarantine, or a judge failure).
        should_continue_on_error=True,
        log_engine_metrics=True,
        runtime_env={"env_vars": {k: str(v) for k, v in cfg.engine.env_vars.items()}} if cfg.engine.env_vars else None,
    )


def build_caption_processor(cfg: CapjobConfig, model_source: str, placement: EnginePlacement, run_id: str):
    from ray.data.llm import build_processor

    r = cfg.resources
    config = processor_config(cfg, model_source, placement)
    processor = build_processor(
        config,
        preprocess=CaptionRequest(cfg),
        preprocess_map_kwargs={"num_cpus": r.preprocess_cpus},
        postprocess_map_kwargs={"num_cpus": r.preprocess_cpus},
    )
    # ray.llm routes failed rows around the user postprocess, returning their whole working
    # row (image, messages...). Replacing the wrapped postprocess makes every row, failed or
    # not, leave in the same small schema.
    processor.postprocess = CaptionRecord(cfg.model.name, run_id, list(cfg.data.passthrough_columns))
    return processor
