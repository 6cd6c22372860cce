"""The job's plan: how the input is cut into blocks, what each stage runs on, and Ray Data's
process-wide settings for it (the object-store budget of the blocks in flight).

`make_plan` is what the console prints before a run (and all a dry run prints besides the
preflight's findings); `configure_data_context` applies the plan's budget to Ray Data.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import secrets
from dataclasses import dataclass, field
from typing import Any, Optional

from capjob import console
from capjob.config import CapjobConfig, DataConfig, EngineConfig, ImagesConfig, ResourcesConfig, format_selector
from capjob.stages.caption.engine import EnginePlacement, cpu_stages, local_gpu_count, replica_gpus

log = logging.getLogger(__name__)


def new_run_id() -> str:
    """A fresh run id: the UTC start time and a random suffix, e.g. 20261207T063000Z-1a2b3c."""
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)


# Rows per block when the plan has no better number: small blocks keep memory flat and feed
# the engine steadily (a block of 448 px images is ~0.6 MB per row once decoded).
DEFAULT_BLOCK_BATCHES = 4


@dataclass
class Plan:
    run_id: str
    model_source: str
    placement: EnginePlacement
    rows_per_block: Optional[int]
    num_blocks: Optional[int]
    partitions_note: str
    stages: list[tuple[str, str]] = field(default_factory=list)

    def headline(self, cfg: CapjobConfig) -> str:
        """The plan in one line (a sweep job's console)."""
        p = self.placement
        where = f"{p.gpus:g} GPU(s){' ' + p.accelerator_type if p.accelerator_type else ''}" if p.gpus else "CPU"
        return (f"run_id={self.run_id} · {cfg.model.name}: {self.model_source} · {cfg.resources.concurrency} engine "
                f"replica(s) on {where} · {self.partitions_note}")

    def render(self, cfg: CapjobConfig) -> str:
        p = self.placement
        engine_where = f"{p.gpus:g} GPU(s){' of type ' + p.accelerator_type if p.accelerator_type else ''}" if p.gpus else "CPU"
        lines = [
            f"capjob plan  run_id={self.run_id}",
            f"  model       {cfg.model.name}: {self.model_source}",
            f"  workers     {cfg.resources.concurrency} engine replica(s), {engine_where} each "
            f"(TP={cfg.engine.tensor_parallel_size}, PP={cfg.engine.pipeline_parallel_size})"
            + "".join(f"; {what} on nodes labelled {format_selector(selector)}" for what, selector in (
                ("engines", cfg.resources.engine_label_selector), ("CPU side", cfg.resources.cpu_label_selector)) if selector),
            f"  partitions  {self.partitions_note}",
            "  stages",
        ]
        lines += [f"    {i:>2}. {name:<24} {detail}" for i, (name, detail) in enumerate(self.stages, 1)]
        return "\n".join(lines)


def max_block_rows(engine: EngineConfig) -> int:
    """The most rows a block holds when the plan sizes blocks itself."""
    return engine.batch_size * DEFAULT_BLOCK_BATCHES


def partitioning(data: DataConfig, engine: EngineConfig, resources: ResourcesConfig, num_rows: Optional[int]) -> tuple[Optional[int], Optional[int], str]:
    """(rows_per_block, num_blocks, explanation). rows_per_block repartitions while streaming;
    num_blocks (only for an explicit count over an unknown size) is a barrier."""
    d = data
    cap = max_block_rows(engine)
    if d.partitions is not None:
        if num_rows is not None:
            rows = max(1, math.ceil(num_rows / d.partitions))
            return rows, None, f"{d.partitions} blocks of <= {rows} rows (data.partitions)"
        return None, d.partitions, f"{d.partitions} blocks (data.partitions; unknown size: a barrier before decoding)"
    workers = resources.concurrency
    target = d.partitions_per_worker * workers
    if num_rows is None:
        return cap, None, f"blocks of <= {cap} rows (automatic; size unknown: 4 x engine.batch_size)"
    rows = max(1, min(cap, math.ceil(num_rows / target)))
    blocks = math.ceil(num_rows / rows)
    return rows, None, (
        f"{blocks} blocks of <= {rows} rows (automatic: >= data.partitions_per_worker={d.partitions_per_worker} "
        f"x {workers} worker(s), <= 4 x engine.batch_size rows each)"
    )


def make_plan(cfg: CapjobConfig, run_id: str, model_source: str, placement: EnginePlacement, num_rows: Optional[int]) -> Plan:
    rows_per_block, num_blocks, note = partitioning(cfg.data, cfg.engine, cfg.resources, num_rows)
    r, e = cfg.resources, cfg.engine
    cpu_stage = f"{r.cpu_stage_concurrency} actor(s) x {r.cpu_stage_cpus} CPU"
    engine_res = f"{placement.gpus:g} GPU" if placement.gpus else "1 CPU (vLLM CPU)"
    source = cfg.data.path or "capjob sample"
    stages = [
        ("read", f"{cfg.data.format.value}: {source}" + (f", limit {cfg.data.limit}" if cfg.data.limit else "")),
        ("repartition", note),
        ("assign ids / resume", {True: "skip ids already in the sink (same caption settings)", "force": "skip ids already in the sink, whatever their settings",
                                 False: "start over (the sink's captions and quarantine are deleted first)"}[cfg.job.resume]),
        ("decode+validate+resize", f"{r.preprocess_cpus} CPU/task, {cfg.images.resize.value} {cfg.images.size}px, rejects -> quarantine"),
        ("preprocess", ("chat request (system + user prompt + image)" if cfg.engine.chat_template_stages
                        else "prompt (chat template applied once per run, while the engines start) + image")
                       + (f", one request per prompt ({len(cfg.caption.prompts)})" if cfg.caption.prompts else "")),
        *[(name, cpu_stage) for name in cpu_stages(e) if name != "Detokenize"],
        ("vLLM engine", f"{r.concurrency} replica(s) x {engine_res}, batch_size={e.batch_size} x {e.max_concurrent_batches} in flight, "
                        f"max_num_seqs={e.max_num_seqs or '128 (vLLM engine default)'}, max_model_len={e.max_model_len}"),
        *[(name, cpu_stage) for name in cpu_stages(e) if name == "Detokenize"],
        ("postprocess", "output schema; engine failures -> quarantine"),
        *([("regroup", f"1 actor: the {len(cfg.caption.prompts)} request(s) of each image -> one row "
                       f"({', '.join('caption_' + n for n in cfg.caption.prompts)})")] if cfg.caption.prompts else []),
        ("write", f"{cfg.sink.format.value} -> {cfg.sink.path}/captions (+ /quarantine)"),
    ]
    return Plan(run_id, model_source, placement, rows_per_block, num_blocks, note, stages)


# Ray Data splits the object-store budget between the operators (read ... write, about a dozen
# here); each needs room for a couple of its blocks or it waits, and the engine downstream idles.
OPERATORS_SHARING_THE_BUDGET = 12


def min_object_store_mib(images: ImagesConfig, engine: EngineConfig) -> int:
    """Object store below which the operators cannot each hold two blocks of decoded images (the
    pixels travel twice: the array and the request's image). On the H100, 0.66x this estimate
    cost 11 % of the images/s; 5x it kept the engine busy."""
    row_bytes = 2 * images.size * images.size * 3
    return math.ceil(OPERATORS_SHARING_THE_BUDGET * 2 * max_block_rows(engine) * row_bytes / 2**20)


def configure_data_context(cfg: CapjobConfig, placement: Optional[EnginePlacement] = None) -> Any:
    """Ray Data's process-wide settings for this job: tolerated block errors and the object-store
    budget of the blocks in flight (resources.object_store_mib; a GPU engine warns when it is
    too small to keep the engine fed; a CPU engine is slow enough for any budget)."""
    import ray.data

    data_context = ray.data.DataContext.get_current()
    data_context.max_errored_blocks = cfg.job.max_errored_blocks
    if console.quiet():  # the log file would only collect the bars' redraws
        data_context.enable_progress_bars = False
    # data.limit takes the first N rows in source order (files sorted by path, rows in file
    # order), the same N on every run: without this, Ray Data's limit keeps whichever blocks
    # arrive first from the parallel reads, so a resumed run could take other rows.
    data_context.execution_options.preserve_order = cfg.data.limit is not None
    budget = cfg.resources.object_store_mib
    if budget:
        needed = min_object_store_mib(cfg.images, cfg.engine)
        if placement and placement.gpus and budget < needed:
            log.warning(
                "resources.object_store_mib=%d is below ~%d MiB, what the stages need to each hold two "
                "blocks of %d rows at images.size=%d: the engine may wait for data; raise it if the node has the memory",
                budget, needed, max_block_rows(cfg.engine), cfg.images.size,
            )
        limits = data_context.execution_options.resource_limits
        data_context.execution_options.resource_limits = limits.copy(object_store_memory=budget * 2**20)
    if cfg.resources.max_block_mib:
        data_context.target_max_block_size = cfg.resources.max_block_mib * 2**20
    if cfg.resources.wait_for_engines_s:
        # Ray Data starts every actor pool before it runs a task: with this set, it blocks there.
        data_context.wait_for_min_actors_s = cfg.resources.wait_for_engines_s
    return data_context


def dry_run_plan(cfg: CapjobConfig, run_id: str, placement: Optional[EnginePlacement], num_rows: Optional[int] = None) -> Plan:
    """The plan for the target cluster, printed without Ray, GPUs or the model. placement: the
    preflight's (a local cluster); None when the job joins a cluster, whose GPUs decide once
    Ray is up: planned as one replica of TP x PP GPUs where this machine has a GPU, else CPU.
    num_rows: the source's rows where known without reading it, else data.limit."""
    model_source = cfg.model.source or f"<built locally: {cfg.model.builder}>"
    if placement is None:
        gpus = replica_gpus(cfg.resources, cfg.engine, local_gpu_count() > 0)
        placement = EnginePlacement(gpus, cfg.resources.accelerator_type if gpus else None)
    return make_plan(cfg, run_id, model_source, placement, num_rows if num_rows is not None else cfg.data.limit)
