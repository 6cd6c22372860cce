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
from capjob.processor import (EnginePlacement, PromptWatch, cpu_stages, needs_rendered_prompt, requests_fetch_prompt,
                              submit_caption_prompt, task_options)

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
        ("preprocess", ("chat request (system + user prompt + image)" if cfg.engine.chat_template_stages
                        else "prompt (chat template applied once per run, while the engines start) + image")
                       + (f", one request per prompt ({len(cfg.caption.prompts)})" if cfg.caption.prompts else "")),
        *[(name, cpu_stage) for name in cpu_stages(cfg) if name != "Detokenize"],
        ("vLLM engine", f"{r.concurrency} replica(s) x {engine_res}, batch_size={e.batch_size} x {e.max_concurrent_batches} in flight, "
                        f"max_num_seqs={e.max_num_seqs or '128 (vLLM engine default)'}, max_model_len={e.max_model_len}"),
        *[(name, cpu_stage) for name in cpu_stages(cfg) if name == "Detokenize"],
        ("postprocess", "output schema; engine failures -> quarantine"),
        *([("regroup", f"1 actor: the {len(cfg.caption.prompts)} request(s) of each image -> one row "
                       f"({', '.join('caption_' + n for n in cfg.caption.prompts)})")] if cfg.caption.prompts else []),
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
    # Items the source looked at (files, members, rows) = rows it emitted + skipped_by_source.
    source_items: int = 0
    skipped_by_source: dict[str, int] = field(default_factory=dict)
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
    dashboard_url: Optional[str] = None
    report_dirs: list[str] = field(default_factory=list)
    done_count: int = 0  # len(done) before it went to the object store
    crashes: Any = None  # stages.engine_guard.CrashLedger actor (the driver's handle keeps it alive)
    prompt: Any = None  # processor.submit_caption_prompt's result: the kept prompt, or its task running meanwhile
    # The driver's watch on that task when the requests fetch its result themselves (processor.PromptWatch).
    prompt_watch: Optional[PromptWatch] = None

    def guard_prompt(self) -> Any:
        """Around the Ray Data execution: a render that fails stops the run with its error."""
        import contextlib

        return self.prompt_watch.guard() if self.prompt_watch is not None else contextlib.nullcontext()

    def prompt_error(self) -> Optional[BaseException]:
        return self.prompt_watch.error if self.prompt_watch is not None else None


def dry_run_plan(cfg: CapjobConfig, run_id: str, num_rows: Optional[int] = None) -> Plan:
    """The plan for the target cluster, printed without Ray, GPUs or the model (num_rows: the
    source's rows where known without reading it, else data.limit)."""
    from capjob import runtime

    model_source = cfg.model.source or f"<built locally: {cfg.model.builder}>"
    gpus = runtime.replica_gpus(cfg, runtime.local_gpu_count() > 0)
    placement = EnginePlacement(gpus, cfg.resources.accelerator_type if gpus else None)
    return make_plan(cfg, run_id, model_source, placement, num_rows if num_rows is not None else cfg.data.limit)


def start(cfg: CapjobConfig, run_id: str) -> Started:
    """Every check that can fail before data flows: model, GPUs, sink, data, done ids, Ray."""
    from capjob import preflight
    from capjob.console import startup_mark

    clock, wall_clock = time.monotonic(), time.time()
    startup_mark("config composed, job starting")
    # First, before the imports of Ray (seconds): a missing model is the commonest first mistake.
    preflight.check_model(cfg.model.source, cfg.model.builder, cfg.model.load_format)
    import ray

    from capjob import checkpoint, metrics, runtime, sinks
    from capjob.stages import engine_guard, sources
    from capjob.models import resolve_model_source

    startup_mark("model checked, driver modules imported")

    address = runtime.cluster_address(cfg)
    local_gpus = None if address else runtime.local_gpu_count()
    placement = None if address else runtime.decide_placement(cfg, local_gpus, node_gpus=local_gpus)
    sinks.TableWriter(cfg.sink).check_writable()
    sources.preflight(cfg.data)  # path, bucket, credentials, columns: seconds, without Ray
    preflight_prompt_columns(cfg)
    preflight.check_hub_dataset(cfg.data)
    model_source = resolve_model_source(cfg.model.source, cfg.model.builder)
    # job.resume / retry_quarantined and the caption-settings fingerprint: refuses in one line.
    done = checkpoint.prepare(cfg, run_id, model_source)
    startup_mark("preflight done (sink, data, model source, done ids)")
    import ray.data  # noqa: F401 - before the thread below: it imports ray.data.llm, the main thread ray.data's modules
    runtime.import_in_background()  # the processor's imports (vLLM: 10-26 s) while Ray starts
    if placement is None:  # a cluster we join: its GPUs decide
        ray_info = runtime.init_ray(cfg, EnginePlacement(0, None))
        placement = runtime.decide_placement(cfg, int(ray.cluster_resources().get("GPU", 0)), runtime.largest_node_gpus())
    else:
        ray_info = runtime.init_ray(cfg, placement, cfg.job.metrics_export_port)
    runtime.check_accelerator_type(placement, ray.cluster_resources())  # before any engine starts
    runtime.check_engine_resources(cfg.resources.engine_resources, ray.cluster_resources())
    if address:  # Ray's tasks and actors open local paths on their own nodes: each must see them
        runtime.check_paths_on_nodes(cfg, model_source)
    configure_data_context(cfg, placement)
    startup_mark("Ray up")
    # Its task overlaps what follows (a fresh worker importing vLLM: 25-38 s, serial before).
    prompt = submit_caption_prompt(cfg, model_source, placement) if needs_rendered_prompt(cfg) else None
    # Without engine.chat_template_stages nothing waits for the render before Ray Data starts:
    # the request builders fetch it; the driver only watches it (keeps it, checks it).
    watch = PromptWatch(prompt) if requests_fetch_prompt(cfg, prompt) else None
    ledger = metrics.start_ledger(cfg.job.name, run_id)  # keep the handle: an unreferenced actor is destroyed
    crashes = engine_guard.start_ledger(run_id, cfg.engine.max_engine_deaths_per_batch)
    startup_mark("prompt " + ("submitted" if prompt is not None else "not needed") + ", ledger actors started")
    return Started(run_id, model_source, placement, done.put(), ledger, clock, wall_clock, ray_info.get("dashboard_url"),
                   done_count=len(done), crashes=crashes, prompt=prompt, prompt_watch=watch)


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
    from capjob import console

    if console.quiet():  # the log file would only collect the bars' redraws
        data_context.enable_progress_bars = False
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


def data_with_prompt_columns(cfg: CapjobConfig) -> Any:
    """cfg.data with the input columns the caption prompts name added to the pass-through ones."""
    import dataclasses

    from capjob.processor import prompt_columns

    extra = [c for c in prompt_columns(cfg.caption) if c not in cfg.data.passthrough_columns]
    return dataclasses.replace(cfg.data, passthrough_columns=[*cfg.data.passthrough_columns, *extra]) if extra else cfg.data


def preflight_prompt_columns(cfg: CapjobConfig) -> None:
    """The columns a caption prompt names ({label}) exist in the dataset: checked like the
    pass-through columns (after those, so that an error here is the prompt's), reported as
    the prompt's key."""
    from capjob.stages import sources
    from capjob.errors import ConfigError, SourceError
    from capjob.processor import prompt_specs

    data = data_with_prompt_columns(cfg)
    if data is cfg.data:
        return
    try:
        sources.preflight(data)
    except SourceError as e:
        for spec in prompt_specs(cfg.caption):
            missing = next((f for f in spec.fields if repr(f) in str(e) and f not in cfg.data.passthrough_columns), None)
            if missing:
                raise ConfigError(f"{spec.key}: names column {{{missing}}}, which the dataset does not have ({e})") from None
        raise


def with_ids(cfg: CapjobConfig, ds: Any, source: Any, done: Any, run_id: str) -> Any:
    """The id stage (stages/ids.assign_ids): rows get `id` and `source_key`, done ones leave,
    counts go to `run_id`'s ledger. One definition for the run and the nothing-left check."""
    from capjob.stages import ids

    return ds.map_batches(
        ids.assign_ids,
        fn_kwargs={"image_column": source.image_column, "key_column": source.key_column, "done": done, "run_id": run_id},
        batch_format="numpy",
        **task_options(cfg),
    )


def caption_flow(cfg: CapjobConfig, job: Started, source: Any, plan: Plan) -> Any:
    """The lazy Ray Dataset from source rows to output rows, stage by stage."""
    from capjob import images
    from capjob.processor import build_caption_processor
    from capjob.stages.sources import Fetcher

    ds = source.dataset
    # Repartition first, straight after the read: the read's blocks (a whole parquet file, up to
    # resources.max_block_mib) are the largest in the job, and only the repartition holds them.
    if plan.rows_per_block:
        ds = ds.repartition(target_num_rows_per_block=plan.rows_per_block)
    elif plan.num_blocks:
        ds = ds.repartition(num_blocks=plan.num_blocks)
    # assign_ids, prepare_images and the processor's preprocess share task_options, so Ray Data
    # fuses them into one task per block: no copy of the raw or decoded block between them.
    ds = with_ids(cfg, ds, source, job.done, job.run_id)  # stable ids; rows a previous run finished leave here
    ds = ds.map_batches(  # decode once, validate, resize; rejects -> quarantine
        images.prepare_images,
        fn_kwargs={
            "cfg": cfg.images,
            "image_column": source.image_column,
            "passthrough_columns": source.passthrough_columns,
            "fetcher": Fetcher.from_config(cfg.data),
            "quarantine": images.QuarantineTarget(cfg.sink, job.run_id, cfg.model.name),
        },
        batch_format="numpy",
        **task_options(cfg),
    )
    from capjob.stages.engine_guard import ledger_name

    return build_caption_processor(cfg, job.model_source, job.placement, job.run_id,
                                   passthrough_columns=source.passthrough_columns, expected_rows=source.num_rows,
                                   crash_ledger=ledger_name(job.run_id) if job.crashes is not None else None,
                                   pending_prompt=job.prompt)(ds)


def engine_ready_at() -> Optional[float]:
    """When the last of this job's Ray Data actors (engine replicas, CPU-stage actors) finished
    starting: the GCS sets an actor's start time once its constructor, here vLLM's start-up,
    has returned. Unix seconds; None where the actor table cannot tell (best effort)."""
    import ray

    try:
        job_id = ray.get_runtime_context().get_job_id()
        times = [a["StartTime"] / 1000 for a in ray._private.state.actors().values()
                 if "MapWorker" in (a.get("ActorClassName") or "") and a.get("JobID") == job_id and a.get("StartTime")]
    except Exception:  # noqa: BLE001 - a private API: no marker rather than no report
        return None
    return max(times) if times else None


def totals_from_sink(cfg: CapjobConfig, run_id: str) -> dict[str, Any]:
    """The write totals of a run that never reached on_write_complete (interrupted), rebuilt
    from the files it wrote: each write is one file named <run_id>-<digest>, atomic."""
    import os

    from capjob import sinks
    from capjob.evaluation import word_tokens
    from capjob.sinks import ENGINE_STAGES

    writer = sinks.TableWriter(cfg.sink)
    totals: dict[str, Any] = {"captioned": 0, "quarantined": 0, "prompt_tokens": 0, "generated_tokens": 0,
                              "caption_words": [], "caption_tokens": [], "write_events": []}
    for table_name in (sinks.CAPTIONS, sinks.QUARANTINE):
        for name in writer.list_files(table_name):
            if not name.rsplit("/", 1)[-1].startswith(f"{run_id}-"):
                continue
            table = sinks.deserialize(writer.fs.cat_file(name), name, cfg.sink.format)
            if table_name == sinks.QUARANTINE:
                totals["quarantined"] += sum(1 for s in table.column("stage").to_pylist() if s in ENGINE_STAGES)
                continue
            tokens = table.column("generated_tokens").to_pylist()
            totals["captioned"] += table.num_rows
            totals["prompt_tokens"] += sum(table.column("prompt_tokens").to_pylist())
            totals["generated_tokens"] += sum(tokens)
            totals["caption_tokens"] += tokens
            totals["caption_words"] += [len(word_tokens(c)) for c in table.column("caption").to_pylist()]
            mtime = writer.fs.modified(name).timestamp() if not writer.local else os.path.getmtime(name)
            totals["write_events"].append((mtime, table.num_rows))
    return totals


def finish(cfg: CapjobConfig, job: Started, dataset: Any, sink: Any, resolved_config: dict[str, Any],
           report_dir: Optional[str], interrupted: bool = False) -> RunResult:
    """Account for every row, write the report, fail loudly on a mismatch. An interrupted run
    (Ctrl-C) gets a partial report from what it wrote, and no accounting check."""
    import ray

    from capjob import console, report, runtime, sinks
    from capjob.reporting.contact_sheet import run_contact_sheet
    from capjob.stages.sources.common import ITEMS_COUNTER, skipped_totals

    writer = sinks.TableWriter(cfg.sink)
    try:
        counts = ray.get(job.ledger.totals.remote(), timeout=30)
    except Exception:  # noqa: BLE001 - after Ctrl-C the ledger may be gone with Ray's workers
        counts = {}
    totals = totals_from_sink(cfg, job.run_id) if interrupted else sink.totals
    end = time.time()
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
    result.skipped_by_source = skipped_totals(counts)
    # Layouts without skippable items (parquet, hf) emit every item they read as a row.
    result.source_items = counts.get(ITEMS_COUNTER, result.rows_read + sum(result.skipped_by_source.values()))
    by_reason = {k.split(":", 1)[1]: v for k, v in counts.items() if k.startswith("rejected:") and v}
    operators, stats_text = report.operator_stats(dataset)
    timeline = report.timeline(totals.get("write_events", []), job.wall_clock, end, engine_ready_at())
    try:
        resources = ray.cluster_resources()
    except Exception:  # noqa: BLE001 - interrupted: Ray may be shutting down
        resources = {}
    run_report = report.build(
        result=result.to_dict(),
        write_stats={**totals, "quarantined_by_reason": by_reason},
        operators=operators,
        resolved_config=resolved_config,
        cluster_resources=resources,
        timeline=timeline,
        interrupted=interrupted,
    )
    crashes = engine_crash_summary(job)
    if crashes.get("engine_deaths"):
        # The engine deaths a batch was retried after, and the rows quarantined as engine_crash.
        run_report["engine_crashes"] = crashes
    if totals.get("write_nodes"):
        run_report["write_nodes"] = dict(sorted(totals["write_nodes"].items()))  # {Ray node id: rows written there}
    if "txt_collisions" in totals:
        collisions = totals["txt_collisions"]
        run_report["txt_collisions"] = {"count": len(collisions), "examples": dict(list(collisions.items())[:20])}
    report_dirs = [f"{cfg.sink.path.rstrip('/')}/reports/{job.run_id}"] + ([report_dir] if report_dir else [])
    images = {**report.plots(totals, job.wall_clock, timeline),
              **run_contact_sheet(cfg.sink, job.run_id, totals.get("samples", []), result.captioned)}
    report.write(run_report, stats_text, images, report_dirs, cfg.sink.storage_options)
    job.report_dirs = report_dirs
    if interrupted:
        return result
    console.out("\n" + report.summary_table(run_report))
    if totals.get("samples"):
        console.out(sample_captions(totals["samples"], result.captioned))
    console.out(f"captions:   {result.output}\nquarantine: {result.quarantine}\nreport:     {' and '.join(report_dirs)}")

    if cfg.job.metrics_export_port:
        # Keep the endpoint up for a few report intervals so a scraper sees the final counts.
        time.sleep(3 * runtime.METRICS_REPORT_INTERVAL_MS / 1000)
    dup = result.duplicates
    if dup.get("keys_with_several_images") or dup.get("ids_written_more_than_once"):
        console.out(f"duplicates: {dup['keys_with_several_images']} key(s) held several different images, each captioned "
                    f"under its own id (e.g. {', '.join(map(str, dup['key_examples']))}); {dup['ids_written_more_than_once']} "
                    f"id(s) were the same key and bytes more than once (e.g. {', '.join(dup['id_examples'])})")
    expected = result.rows_read - result.skipped_done
    if expected != result.captioned + result.quarantined:
        raise AccountingError(
            f"rows in ({expected}) != captioned ({result.captioned}) + quarantined ({result.quarantined}); "
            f"run {job.run_id} lost or duplicated rows"
        )
    return result


def engine_crash_summary(job: Started) -> dict[str, Any]:
    """stages.engine_guard.CrashLedger.summary of the run ({} when there is no ledger)."""
    import ray

    if job.crashes is None:
        return {}
    try:
        return ray.get(job.crashes.summary.remote(), timeout=30)
    except Exception:  # noqa: BLE001 - after Ctrl-C the ledger may be gone with Ray's workers
        return {}


SAMPLE_CAPTIONS = 3


def passthrough_types(source: Any) -> dict[str, Any]:
    """The Arrow types of the source's pass-through columns, when the reader knows its schema
    without reading data (parquet footers, HF features); {} otherwise."""
    try:
        import pyarrow as pa

        schema = source.dataset.schema(fetch_if_missing=False)
        types = dict(zip(schema.names, schema.types)) if schema is not None else {}
        return {c: t for c, t in types.items() if c in source.passthrough_columns and isinstance(t, pa.DataType)}
    except Exception:  # noqa: BLE001 - a hint for the sink's typing; never worth failing the run
        return {}


def sample_captions(samples: list[dict[str, Any]], captioned: int) -> str:
    """A few captions for the console, rows with a known true caption (`reference`) first,
    each marked right or wrong against it."""
    if not samples:
        return ""
    chosen = sorted(samples, key=lambda r: r.get("reference") is None)[:SAMPLE_CAPTIONS]
    lines = [f"sample captions ({len(chosen)} of {captioned}):"]
    for r in chosen:
        text = next(iter(r["captions"].values()), "") or ""
        mark = "" if r.get("reference") is None else ("  [= reference]" if text.strip() == r["reference"] else
                                                      f"  [reference: {r['reference']}]")
        caption = " ".join(text.split())
        lines.append(f"  {str(r.get('source_key'))[-32:]:<32} {caption[:100]}{mark}")
    return "\n".join(lines)


def nothing_left(cfg: CapjobConfig, job: Started, source: Any, num_rows: Optional[int]) -> bool:
    """True when every row of the source is already in the sink, found before any engine starts.

    Only checked when the sink holds at least as many ids as the source has rows (a resumed run
    that still has work pays nothing): then the source's ids are computed once, by the same
    assign_ids stage the run uses, counted against a ledger of their own (not the run's)."""
    import ray

    from capjob import metrics

    if not job.done_count or num_rows is None or job.done_count < num_rows:
        return False
    probe_id = f"{job.run_id}-resume-check"
    probe = metrics.start_ledger(cfg.job.name, probe_id)
    try:
        left = with_ids(cfg, source.dataset, source, job.done, probe_id).count()
    finally:
        ray.kill(probe)
    return left == 0


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
    """The job: preflight, plan, stream every row to the sink, report. Raises CapjobError for
    what the user can fix, console.Interrupted on Ctrl-C (after writing a partial report)."""
    from capjob import console, preflight

    run_id = cfg.job.run_id or new_run_id()
    if cfg.job.dry_run:
        checked = preflight.run_all(cfg)  # data, model, sink, done ids: what the real run checks first
        console.out(dry_run_plan(cfg, run_id, checked.rows).render(cfg))
        console.out(checked.render(cfg.job.resume))
        return None
    job: Optional[Started] = None
    dataset = sink = None
    try:
        job = start(cfg, run_id)  # the model checked first, before Ray and Ray Data are imported (seconds)
        import ray

        from capjob import sinks
        from capjob.stages import sources

        source = sources.read_source(data_with_prompt_columns(cfg), run_id)
        console.startup_mark("source read")
        # Ray Data does not count every source up front (the sample set); its files may tell.
        num_rows = source.num_rows if source.num_rows is not None else preflight.source_rows(cfg.data)
        if nothing_left(cfg, job, source, num_rows):
            console.out(f"capjob: nothing left to do: all {num_rows} rows of {cfg.data.name} are already in "
                        f"{cfg.sink.path} (captions or quarantine); no engine started. job.resume=false captions them again")
            return None
        plan = make_plan(cfg, run_id, job.model_source, job.placement, source.num_rows)
        console.out(plan.render(cfg))
        if job.done_count:
            console.out(f"  resume      {job.done_count} id(s) already in the sink are skipped")
        if job.dashboard_url:
            console.out(f"  dashboard   http://{job.dashboard_url}")
        if console.log_path and console.quiet():
            console.out(f"  log         {console.log_path} (Ray, vLLM; job.log_level=info shows them here)")
        dataset = caption_flow(cfg, job, source, plan)
        console.startup_mark("caption flow built (processor, prompt); Ray Data execution starts")
        sink = sinks.CaptionSink(cfg.sink, run_id, cfg.model.name, cfg.caption, data_root=cfg.data.path,
                                 column_types=passthrough_types(source))
        with console.Progress(lambda: ray.get(job.ledger.totals.remote(), timeout=5), num_rows), job.guard_prompt():
            dataset.write_datasink(sink, ray_remote_args=task_options(cfg))  # streams: nothing is materialised
    except KeyboardInterrupt:
        if job is not None and job.prompt_error() is not None:  # the watch stopped the run
            raise job.prompt_error() from None
        if job is None:
            raise console.Interrupted("capjob: interrupted while starting, before any caption; run the same command to start again") from None
        result = finish(cfg, job, dataset, sink, resolved_config, report_dir, interrupted=True)
        raise console.Interrupted(
            f"capjob: interrupted after {result.captioned} captions; run the same command to resume "
            f"(partial report: {job.report_dirs[0]})"
        ) from None
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
    from capjob import console

    console.out(f"evaluation: {local_dir} and {cfg.sink.path.rstrip('/')}/reports/{result.run_id}")
