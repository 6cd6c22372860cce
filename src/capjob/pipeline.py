"""The captioning job, top to bottom as the data flows:

    read -> repartition -> assign ids / skip done + decode, validate, resize (rejects -> quarantine)
         + chat request -> Ray Data LLM processor (vLLM) -> postprocess + write captions (engine
         failures -> quarantine)

Nothing is materialised: Ray Data streams blocks through every stage into the sink. The stages
joined by "+" run as one Ray Data operator (fused tasks, same remote args): fewer copies of
each block wait in the object store between operators.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import secrets
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from capjob.config import CapjobConfig, EvalMode
from capjob.errors import AccountingError
from capjob.processor import EnginePlacement, cpu_stages, task_options

# Rows per block when the plan has no better number: small blocks keep memory flat and feed
# the engine steadily (a block of 448 px images is ~0.6 MB per row once decoded).
DEFAULT_BLOCK_BATCHES = 4

log = logging.getLogger(__name__)


def new_run_id() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)


@dataclass
class Plan:
    run_id: str
    model_source: str
    placement: EnginePlacement
    rows_per_block: Optional[int]
    num_blocks: Optional[int]
    partitions_note: str
    stages: list[tuple[str, str]] = field(default_factory=list)

    def render(self, cfg: CapjobConfig) -> str:
        p = self.placement
        engine_where = f"{p.gpus:g} GPU(s){' of type ' + p.accelerator_type if p.accelerator_type else ''}" if p.gpus else "CPU"
        lines = [
            f"capjob plan  run_id={self.run_id}",
            f"  model       {cfg.model.name}: {self.model_source}",
            f"  workers     {cfg.resources.concurrency} engine replica(s), {engine_where} each "
            f"(TP={cfg.engine.tensor_parallel_size}, PP={cfg.engine.pipeline_parallel_size})",
            f"  partitions  {self.partitions_note}",
            "  stages",
        ]
        lines += [f"    {i:>2}. {name:<24} {detail}" for i, (name, detail) in enumerate(self.stages, 1)]
        return "\n".join(lines)


def max_block_rows(cfg: CapjobConfig) -> int:
    """The most rows a block holds when the plan sizes blocks itself."""
    return cfg.engine.batch_size * DEFAULT_BLOCK_BATCHES


def partitioning(cfg: CapjobConfig, num_rows: Optional[int]) -> tuple[Optional[int], Optional[int], str]:
    """(rows_per_block, num_blocks, explanation). rows_per_block repartitions while streaming;
    num_blocks (only for an explicit count over an unknown size) is a barrier."""
    d = cfg.data
    cap = max_block_rows(cfg)
    if d.partitions is not None:
        if num_rows is not None:
            rows = max(1, math.ceil(num_rows / d.partitions))
            return rows, None, f"{d.partitions} blocks of <= {rows} rows (data.partitions)"
        return None, d.partitions, f"{d.partitions} blocks (data.partitions; unknown size: a barrier before decoding)"
    workers = cfg.resources.concurrency
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
    rows_per_block, num_blocks, note = partitioning(cfg, num_rows)
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
        ("preprocess", "chat request (system + user prompt + image)" if cfg.engine.chat_template_stages
                       else "prompt (chat template applied once, before the run) + image"),
        *[(name, cpu_stage) for name in cpu_stages(cfg) if name != "Detokenize"],
        ("vLLM engine", f"{r.concurrency} replica(s) x {engine_res}, batch_size={e.batch_size} x {e.max_concurrent_batches} in flight, "
                        f"max_num_seqs={e.max_num_seqs or '128 (vLLM engine default)'}, max_model_len={e.max_model_len}"),
        *[(name, cpu_stage) for name in cpu_stages(cfg) if name == "Detokenize"],
        ("postprocess", "output schema; engine failures -> quarantine"),
        ("write", f"{cfg.sink.format.value} -> {cfg.sink.path}/captions (+ /quarantine)"),
    ]
    return Plan(run_id, model_source, placement, rows_per_block, num_blocks, note, stages)


@dataclass
class RunResult:
    run_id: str
    output: str
    quarantine: str
    rows_read: int
    skipped_done: int
    captioned: int
    quarantined_images: int
    quarantined_engine: int
    wall_seconds: float
    # Keys that reached several images and ids written more than once (stages/ids.duplicates).
    duplicates: dict[str, Any] = field(default_factory=dict)

    @property
    def quarantined(self) -> int:
        return self.quarantined_images + self.quarantined_engine

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "quarantined": self.quarantined}


@dataclass
class Started:
    """What the job set up before reading any data."""

    run_id: str
    model_source: str
    placement: EnginePlacement
    done: Any  # stages.ids.DoneIds, in the object store
    ledger: Any
    clock: float
    wall_clock: float


def dry_run_plan(cfg: CapjobConfig, run_id: str) -> Plan:
    """The plan for the target cluster, printed without Ray, GPUs or the model."""
    from capjob import runtime

    model_source = cfg.model.source or f"<built locally: {cfg.model.builder}>"
    gpus = runtime.replica_gpus(cfg, runtime.local_gpu_count() > 0)
    placement = EnginePlacement(gpus, cfg.resources.accelerator_type if gpus else None)
    return make_plan(cfg, run_id, model_source, placement, cfg.data.limit)


def start(cfg: CapjobConfig, run_id: str) -> Started:
    """Every check that can fail before data flows: GPUs, sink, done ids, model, Ray."""
    import ray

    from capjob import checkpoint, metrics, runtime, sinks, sources
    from capjob.models import resolve_model_source

    clock, wall_clock = time.monotonic(), time.time()
    address = runtime.cluster_address(cfg)
    placement = None if address else runtime.decide_placement(cfg, runtime.local_gpu_count())
    sinks.TableWriter(cfg.sink).check_writable()
    sources.preflight(cfg.data)  # path, bucket, credentials, columns: seconds, without Ray
    model_source = resolve_model_source(cfg.model.source, cfg.model.builder)
    # job.resume / retry_quarantined and the caption-settings fingerprint: refuses in one line.
    done = checkpoint.prepare(cfg, run_id, model_source)
    if placement is None:  # a cluster we join: its GPUs decide
        runtime.init_ray(cfg, EnginePlacement(0, None))
        placement = runtime.decide_placement(cfg, int(ray.cluster_resources().get("GPU", 0)))
    else:
        runtime.init_ray(cfg, placement, cfg.job.metrics_export_port)
    configure_data_context(cfg, placement)
    ledger = metrics.start_ledger(cfg.job.name, run_id)  # keep the handle: an unreferenced actor is destroyed
    return Started(run_id, model_source, placement, done.put(), ledger, clock, wall_clock)


# Ray Data splits the object-store budget between the operators (read ... write, about a dozen
# here); each needs room for a couple of its blocks or it waits, and the engine downstream idles.
OPERATORS_SHARING_THE_BUDGET = 12


def min_object_store_mib(cfg: CapjobConfig) -> int:
    """Object store below which the operators cannot each hold two blocks of decoded images (the
    pixels travel twice: the array and the request's image). On the H100, 0.66x this estimate
    cost 11 % of the images/s; 5x it kept the engine busy."""
    row_bytes = 2 * cfg.images.size * cfg.images.size * 3
    return math.ceil(OPERATORS_SHARING_THE_BUDGET * 2 * max_block_rows(cfg) * row_bytes / 2**20)


def configure_data_context(cfg: CapjobConfig, placement: Optional[EnginePlacement] = None) -> Any:
    """Ray Data's process-wide settings for this job: tolerated block errors and the object-store
    budget of the blocks in flight (resources.object_store_mib; a GPU engine warns when it is
    too small to keep the engine fed; a CPU engine is slow enough for any budget)."""
    import ray.data

    data_context = ray.data.DataContext.get_current()
    data_context.max_errored_blocks = cfg.job.max_errored_blocks
    # data.limit takes the first N rows in source order (files sorted by path, rows in file
    # order), the same N on every run: without this, Ray Data's limit keeps whichever blocks
    # arrive first from the parallel reads, so a resumed run could take other rows.
    data_context.execution_options.preserve_order = cfg.data.limit is not None
    budget = cfg.resources.object_store_mib
    if budget:
        needed = min_object_store_mib(cfg)
        if placement and placement.gpus and budget < needed:
            log.warning(
                "resources.object_store_mib=%d is below ~%d MiB, what the stages need to each hold two "
                "blocks of %d rows at images.size=%d: the engine may wait for data; raise it if the node has the memory",
                budget, needed, max_block_rows(cfg), cfg.images.size,
            )
        limits = data_context.execution_options.resource_limits
        data_context.execution_options.resource_limits = limits.copy(object_store_memory=budget * 2**20)
    if cfg.resources.max_block_mib:
        data_context.target_max_block_size = cfg.resources.max_block_mib * 2**20
    if cfg.resources.wait_for_engines_s:
        # Ray Data starts every actor pool before it runs a task: with this set, it blocks there.
        data_context.wait_for_min_actors_s = cfg.resources.wait_for_engines_s
    return data_context


def caption_flow(cfg: CapjobConfig, job: Started, source: Any, plan: Plan) -> Any:
    """The lazy Ray Dataset from source rows to output rows, stage by stage."""
    from capjob import images
    from capjob.processor import build_caption_processor
    from capjob.stages import ids

    ds = source.dataset
    # Repartition first, straight after the read: the read's blocks (a whole parquet file, up to
    # resources.max_block_mib) are the largest in the job, and only the repartition holds them.
    if plan.rows_per_block:
        ds = ds.repartition(target_num_rows_per_block=plan.rows_per_block)
    elif plan.num_blocks:
        ds = ds.repartition(num_blocks=plan.num_blocks)
    # assign_ids, prepare_images and the processor's preprocess share task_options, so Ray Data
    # fuses them into one task per block: no copy of the raw or decoded block between them.
    ds = ds.map_batches(  # stable ids; rows a previous run finished leave here
        ids.assign_ids,
        fn_kwargs={"image_column": source.image_column, "key_column": source.key_column,
                   "done": job.done, "run_id": job.run_id},
        batch_format="numpy",
        **task_options(cfg),
    )
    ds = ds.map_batches(  # decode once, validate, resize; rejects -> quarantine
        images.prepare_images,
        fn_kwargs={
            "cfg": cfg.images,
            "image_column": source.image_column,
            "passthrough_columns": source.passthrough_columns,
            "storage_options": cfg.data.storage_options,
            "quarantine": images.QuarantineTarget(cfg.sink, job.run_id, cfg.model.name),
        },
        batch_format="numpy",
        **task_options(cfg),
    )
    return build_caption_processor(cfg, job.model_source, job.placement, job.run_id)(ds)


def finish(cfg: CapjobConfig, job: Started, dataset: Any, sink: Any, resolved_config: dict[str, Any], report_dir: Optional[str]) -> RunResult:
    """Account for every row, write the report, fail loudly on a mismatch."""
    import ray

    from capjob import report, runtime, sinks

    writer = sinks.TableWriter(cfg.sink)
    counts = ray.get(job.ledger.totals.remote())
    totals = sink.totals
    result = RunResult(
        run_id=job.run_id,
        output=writer.url(sinks.CAPTIONS),
        quarantine=writer.url(sinks.QUARANTINE),
        rows_read=counts.get("read", 0),
        skipped_done=counts.get("skipped", 0),
        captioned=totals["captioned"],
        quarantined_images=counts.get("images_rejected", 0),
        quarantined_engine=totals["quarantined"],
        wall_seconds=time.monotonic() - job.clock,
        duplicates=run_duplicates(cfg, job.run_id),
    )
    by_reason = {k.split(":", 1)[1]: v for k, v in counts.items() if k.startswith("rejected:") and v}
    operators, stats_text = report.operator_stats(dataset)
    run_report = report.build(
        result=result.to_dict(),
        write_stats={**totals, "quarantined_by_reason": by_reason},
        operators=operators,
        resolved_config=resolved_config,
        cluster_resources=ray.cluster_resources(),
    )
    report_dirs = [f"{cfg.sink.path.rstrip('/')}/reports/{job.run_id}"] + ([report_dir] if report_dir else [])
    report.write(run_report, stats_text, report.plots(totals, job.wall_clock), report_dirs, cfg.sink.storage_options)
    print("\n" + report.summary_table(run_report))
    print(f"\ncaptions:   {result.output}\nquarantine: {result.quarantine}\nreport:     {' and '.join(report_dirs)}", flush=True)

    if cfg.job.metrics_export_port:
        # Keep the endpoint up for a few report intervals so a scraper sees the final counts.
        time.sleep(3 * runtime.METRICS_REPORT_INTERVAL_MS / 1000)
    dup = result.duplicates
    if dup.get("keys_with_several_images") or dup.get("ids_written_more_than_once"):
        print(f"duplicates: {dup['keys_with_several_images']} key(s) held several different images, each captioned "
              f"under its own id (e.g. {', '.join(map(str, dup['key_examples']))}); {dup['ids_written_more_than_once']} "
              f"id(s) were the same key and bytes more than once (e.g. {', '.join(dup['id_examples'])})", flush=True)
    expected = result.rows_read - result.skipped_done
    if expected != result.captioned + result.quarantined:
        raise AccountingError(
            f"rows in ({expected}) != captioned ({result.captioned}) + quarantined ({result.quarantined}); "
            f"run {job.run_id} lost or duplicated rows"
        )
    return result


def run_duplicates(cfg: CapjobConfig, run_id: str) -> dict[str, Any]:
    """stages/ids.duplicates over the rows this run wrote (its files start with its run id)."""
    import pyarrow as pa

    from capjob import sinks
    from capjob.stages import ids

    writer = sinks.TableWriter(cfg.sink)
    tables = [
        sinks.deserialize(writer.fs.cat_file(name), name, cfg.sink.format, ["id", "source_key"])
        for table in (sinks.CAPTIONS, sinks.QUARANTINE)
        for name in writer.list_files(table) if name.rsplit("/", 1)[-1].startswith(f"{run_id}-")
    ]
    empty = pa.table({"id": pa.array([], pa.string()), "source_key": pa.array([], pa.string())})
    return ids.duplicates(pa.concat_tables(tables, promote_options="permissive") if tables else empty)


def run(cfg: CapjobConfig, resolved_config: dict[str, Any], report_dir: Optional[str] = None) -> Optional[RunResult]:
    from capjob import sinks, sources

    run_id = cfg.job.run_id or new_run_id()
    if cfg.job.dry_run:
        print(dry_run_plan(cfg, run_id).render(cfg))
        return None
    job = start(cfg, run_id)
    source = sources.read_source(cfg.data)
    plan = make_plan(cfg, run_id, job.model_source, job.placement, source.num_rows)
    print(plan.render(cfg), flush=True)
    dataset = caption_flow(cfg, job, source, plan)
    sink = sinks.CaptionSink(cfg.sink, run_id, cfg.model.name)
    dataset.write_datasink(sink, ray_remote_args=task_options(cfg))  # streams: nothing is materialised
    result = finish(cfg, job, dataset, sink, resolved_config, report_dir)
    if cfg.eval.mode != EvalMode.off:
        evaluate(cfg, result, report_dir)
    return result


def evaluate(cfg: CapjobConfig, result: RunResult, report_dir: Optional[str]) -> None:
    """Caption statistics (and the judge pass) over this run's captions, next to its report."""
    import pathlib

    import fsspec

    from capjob.evaluation import evaluate_output

    local_dir = pathlib.Path(report_dir or f"outputs/eval/{result.run_id}")
    _, written = evaluate_output(cfg.sink, cfg.eval, local_dir, run_id=result.run_id,
                                 max_tokens=cfg.caption.max_tokens, resources=cfg.resources)
    fs, root = fsspec.url_to_fs(f"{cfg.sink.path.rstrip('/')}/reports/{result.run_id}", **cfg.sink.storage_options)
    for name in ("json", "markdown", "histogram"):
        if name in written:
            fs.put_file(str(written[name]), f"{root}/{pathlib.Path(written[name]).name}")
    print(f"evaluation: {local_dir} and {cfg.sink.path.rstrip('/')}/reports/{result.run_id}", flush=True)
