"""Stage: the Ray Data LLM processor (vLLM) that turns prepared images into captions.

preprocess builds the request from the already-decoded small image: by default the prompt that
Ray Data LLM's PrepareMultimodal and ChatTemplate stages render, rendered once before the run
(every caption request shares it), plus the image; with `engine.chat_template_stages` the chat
messages, and the processor runs those two stages per row. Then [Tokenize] -> vLLM ->
[Detokenize] (per `engine.tokenize_stage` / `engine.detokenize_stage`); the output projection
keeps only the output schema (never the image).
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
    """preprocess: one prepared row -> chat messages + sampling params, or, given the prompt
    already rendered (engine.chat_template_stages=false), prompt + image for the engine."""

    def __init__(self, cfg: CapjobConfig, prompt: Optional["RenderedPrompt"] = None):
        c = cfg.caption
        self.system_prompt = c.system_prompt
        self.user_prompt = c.user_prompt
        self.prompt = prompt
        self.sampling_params = {
            "temperature": c.temperature,
            "top_p": c.top_p,
            "max_tokens": c.max_tokens,
            "ignore_eos": c.ignore_eos,
            **({"seed": c.seed} if c.seed is not None else {}),
        }

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        from PIL import Image

        from capjob.stages.ids import image_uuid

        pixels = np.ascontiguousarray(row["image"], dtype=np.uint8)
        image = Image.fromarray(pixels, "RGB")
        uuid = image_uuid(pixels)  # vLLM's cache key: the pixels it gets, never the row's key
        if self.prompt is not None:
            # What PrepareMultimodal + ChatTemplate would produce for this row, without them.
            p = self.prompt
            return {"prompt": p.text, "multimodal_data": {"image": [image] if p.image_list else image},
                    "multimodal_uuids": {"image": [uuid] if p.uuid_list else uuid},
                    "sampling_params": self.sampling_params, "image": None}
        # image=None: the array has served its purpose; don't carry it through every stage.
        return {"messages": self.messages(image, uuid), "sampling_params": self.sampling_params, "image": None}

    def messages(self, image: Any, uuid: str) -> list[dict[str, Any]]:
        return [
            {"role": "system", "content": self.system_prompt},
            {
                "role": "user",
                "content": [
                    # vLLM's multimodal cache key (stages/ids.image_uuid: a digest of the pixels).
                    {"type": "image_pil", "image_pil": image, "uuid": uuid},
                    {"type": "text", "text": self.user_prompt},
                ],
            },
        ]


@dataclass(frozen=True)
class RenderedPrompt:
    """The chat-templated prompt every caption request shares, and the shape (one item or a
    list) in which Ray Data LLM's PrepareMultimodal hands the image and its uuid to the engine."""

    text: str
    image_list: bool
    uuid_list: bool


def _render_with_stages(stages: list[Any], row: dict[str, Any]) -> RenderedPrompt:
    """Run Ray Data LLM's own PrepareMultimodal and ChatTemplate UDFs on one row (in a one-off
    Ray task: it imports vLLM and transformers, and its process exits afterwards)."""
    import asyncio

    async def run() -> dict[str, Any]:
        current = dict(row)
        for stage in stages:
            udf = stage.fn(data_column=DATA_COLUMN, expected_input_keys=list(stage.get_required_input_keys()),
                           **stage.fn_constructor_kwargs)
            current[udf.IDX_IN_BATCH_COLUMN] = 0
            async for out in udf.udf([current]):
                current.update(out)
        return current

    out = asyncio.run(run())
    mm, uuids = out["multimodal_data"], out.get("multimodal_uuids") or {}
    return RenderedPrompt(out["prompt"], isinstance(mm["image"], list), isinstance(uuids.get("image"), list))


def render_caption_prompt(cfg: CapjobConfig, model_source: str, placement: EnginePlacement) -> RenderedPrompt:
    """The caption prompt, rendered once by the stages engine.chat_template_stages would run
    for every row (same model config, chat template and content format)."""
    import ray
    from PIL import Image
    from ray.data.llm import build_processor

    config = processor_config(cfg, model_source, placement, chat_template_stages=True)
    stages = [s for name, s in build_processor(config).stages.items() if name in ("PrepareMultimodalStage", "ChatTemplateStage")]
    request = CaptionRequest(cfg)
    row = {"messages": request.messages(Image.new("RGB", (cfg.images.size, cfg.images.size)), "capjob-prompt"),
           "sampling_params": request.sampling_params}
    render = ray.remote(num_cpus=cfg.resources.cpu_stage_cpus, max_calls=1, runtime_env=config.runtime_env)(_render_with_stages)
    return ray.get(render.remote(stages, row))


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


def cpu_stages(cfg: CapjobConfig, *, multimodal: bool = True, chat_template_stages: Optional[bool] = None) -> list[str]:
    """The processor's CPU stages that hold an actor each, in pipeline order (around the engine).
    multimodal: the caption pass, whose PrepareMultimodal and ChatTemplate stages run only with
    engine.chat_template_stages (else the prompt is rendered once); the judge's text pass keeps
    its ChatTemplate stage."""
    e = cfg.engine
    templated = e.chat_template_stages if chat_template_stages is None else chat_template_stages
    return [name for name, on in (
        ("PrepareMultimodal", multimodal and templated),
        ("ChatTemplate", templated or not multimodal),
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


def processor_config(cfg: CapjobConfig, model_source: str, placement: EnginePlacement, *, multimodal: bool = True,
                     chat_template_stages: Optional[bool] = None):
    """The vLLMEngineProcessorConfig for `cfg`'s engine/resources (shared by the caption pass and
    the judge pass): CPU placement when placement.gpus == 0, failed rows kept and flagged."""
    from ray.data.llm import vLLMEngineProcessorConfig

    r = cfg.resources
    cpu_stage = {"num_cpus": r.cpu_stage_cpus, "concurrency": r.cpu_stage_concurrency}
    enabled = set(cpu_stages(cfg, multimodal=multimodal, chat_template_stages=chat_template_stages))
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


def task_options(cfg: CapjobConfig) -> dict[str, Any]:
    """Ray remote args of the pipeline's tasks (read side, preprocess, postprocess, write). Equal
    args let Ray Data fuse neighbouring task stages into one operator."""
    return {"num_cpus": cfg.resources.preprocess_cpus, "max_retries": cfg.job.task_retries, "retry_exceptions": True}


def build_caption_processor(cfg: CapjobConfig, model_source: str, placement: EnginePlacement, run_id: str):
    from ray.data.llm import build_processor

    config = processor_config(cfg, model_source, placement)
    prompt = None if cfg.engine.chat_template_stages else render_caption_prompt(cfg, model_source, placement)
    # The pipeline's task options: preprocess fuses into the decode task before it and
    # postprocess into the write task after it (Ray Data fuses tasks with equal remote args).
    processor = build_processor(
        config,
        preprocess=CaptionRequest(cfg, prompt),
        preprocess_map_kwargs=task_options(cfg),
        postprocess_map_kwargs=task_options(cfg),
    )
    # ray.llm routes failed rows around the user postprocess, returning their whole working
    # row (image, messages...). Replacing the wrapped postprocess makes every row, failed or
    # not, leave in the same small schema.
    processor.postprocess = CaptionRecord(cfg.model.name, run_id, list(cfg.data.passthrough_columns))
    return processor
