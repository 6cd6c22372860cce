"""Stage: the caption step assembled, the one module that builds Ray Data LLM's processor.

    [expand_prompts] -> preprocess (requests.CaptionRequest) -> [PrepareMultimodal, ChatTemplate]
    -> [Tokenize] -> vLLM (engine.processor_config; engine_guard) -> [Detokenize]
    -> postprocess (records.CaptionRecord) -> [RegroupPrompts]

The bracketed steps run only with the settings that need them (caption.prompts,
engine.chat_template_stages, engine.tokenize_stage / detokenize_stage). The parts live in their
own modules and never import this one: requests.py (prepare), render.py (the prompt rendered
once), engine.py (placement, engine args, the processor config), records.py (record),
engine_guard.py (a row that kills the engine). Ray Data LLM is imported when the processor is
built, never at module load.
"""

from __future__ import annotations

from typing import Any, Optional

from capjob.config import CapjobConfig
from capjob.console import startup_mark
from capjob.models.remote import node_local_stage_udfs
from capjob.prompts import prompt_specs
from capjob.stages.caption.engine import EnginePlacement, cpu_placement, place_stages, processor_config, task_options
from capjob.stages.caption.engine_guard import guard_engine_stage
from capjob.stages.caption.records import CaptionRecord, RegroupPrompts
from capjob.stages.caption.render import needs_rendered_prompt, render_caption_prompt, requests_fetch_prompt
from capjob.stages.caption.requests import CaptionRequest, expand_prompts
from capjob.stages.samples import thumbnail_every


def build_caption_processor(cfg: CapjobConfig, model_source: str, placement: EnginePlacement, run_id: str,
                            passthrough_columns: Optional[list[str]] = None, expected_rows: Optional[int] = None,
                            crash_ledger: Optional[str] = None, pending_prompt: Any = None):
    """dataset -> dataset of output rows: [expand to one request per prompt] -> the Ray Data LLM
    processor -> [regroup to one row per image]. passthrough_columns: the source's (data's
    pass-through plus the columns the prompts name); expected_rows sizes the thumbnail sample.
    crash_ledger: the name of the run's engine_guard.CrashLedger actor, which the engine stage
    then uses to quarantine a row that kills the engine (None: Ray Data LLM's engine stage as
    is, which retries such a row without end). pending_prompt: render.submit_caption_prompt's
    result, if the job submitted it early; a PendingPrompt (its render task still running) is
    handed to the request builder as is, without engine.chat_template_stages (the caller
    watches it: render.PromptWatch), so that the processor is built, and Ray Data and the
    engines start, while it renders."""
    from ray.data.llm import build_processor

    startup_mark("Ray Data LLM imported")
    if requests_fetch_prompt(cfg.engine, pending_prompt):
        # Nothing built here depends on the prompt: PrepareMultimodal (the stage that takes the
        # content format) is off, and each preprocess task fetches the prompt on its first row.
        rendered, prompt = None, pending_prompt
    else:
        # Rendered (and its content format resolved) before the processor is built: the per-row
        # stages of engine.chat_template_stages need the same format.
        rendered = render_caption_prompt(cfg, model_source, placement, pending_prompt) if needs_rendered_prompt(cfg.engine) else None
        prompt = None if cfg.engine.chat_template_stages else rendered
    specs = prompt_specs(cfg.caption)
    config = processor_config(cfg.engine, cfg.model, cfg.resources, model_source, placement, prompts=specs,
                              content_format=rendered.content_format if rendered else None)
    options = task_options(cfg.resources, cfg.job)
    # The pipeline's task options: preprocess fuses into the decode task before it and
    # postprocess into the write task after it (Ray Data fuses tasks with equal remote args).
    processor = build_processor(
        config,
        preprocess=CaptionRequest(cfg.caption, cfg.engine, prompt, thumbnail_every(expected_rows)),
        preprocess_map_kwargs=options,
        postprocess_map_kwargs=options,
    )
    node_local_stage_udfs(processor.stages, model_source)  # each stage loads a model URL on its own node
    place_stages(processor.stages, cfg.resources)  # the engines and CPU stages on their labelled nodes
    # ray.llm routes failed rows around the user postprocess, returning their whole working
    # row (image, messages...). Replacing the wrapped postprocess makes every row, failed or
    # not, leave in the same small schema.
    columns = list(cfg.data.passthrough_columns) if passthrough_columns is None else list(passthrough_columns)
    processor.postprocess = CaptionRecord(cfg.model.name, run_id, columns, cfg.caption)
    if crash_ledger:
        guard_engine_stage(processor, crash_ledger, cfg.engine.max_engine_deaths_per_batch, cfg.engine.in_process_engine_core)
    if specs[0].name is None:
        return processor
    names = [spec.name for spec in specs]

    def flow(ds: Any) -> Any:
        ds = ds.map_batches(expand_prompts, fn_kwargs={"names": names}, batch_format="numpy", **options)
        ds = processor(ds)
        # One actor sees every request row, so the rows of an image always meet; it only moves
        # small rows (the captions), so it takes no CPU from the engine's share.
        return ds.map_batches(RegroupPrompts, fn_constructor_kwargs={"names": names}, batch_format="pyarrow",
                              batch_size=None, concurrency=1, num_cpus=0, **cpu_placement(cfg.resources))

    return flow
