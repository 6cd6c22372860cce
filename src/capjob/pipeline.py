"""The captioning job, top to bottom as the data flows:

    start (preflight.check_all, model, resume, Ray, dedup registry) -> read -> repartition
    -> assign ids / skip done + decode, validate, resize (rejects -> quarantine) + dedup (copies
    -> pending) + caption requests -> Ray Data LLM processor (vLLM) -> caption records + write
    (engine failures -> quarantine) -> fill (the copies' rows) -> finish (accounting, report)

Nothing is materialised: Ray Data streams blocks through every stage into the sink. The stages
joined by "+" run as one Ray Data operator (fused tasks, same remote args): fewer copies of
each block wait in the object store between operators.

This module imports Ray and every stage at load: the CLI imports it only once preflight's
model check has passed (a missing model fails in about 2 s, before Ray is imported).
"""

from __future__ import annotations

import contextlib
import pathlib
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import fsspec
import pyarrow as pa
import ray
import ray.data

from capjob import console, metrics, preflight, runtime
from capjob.config import CapjobConfig, DedupMode, EvalMode, SourceFormat, parse_shard
from capjob.errors import AccountingError, ClusterError
from capjob.models import resolve_model_source
from capjob.plan import Plan, configure_data_context, make_plan, new_run_id
from capjob.prompts import prompt_specs
from capjob.reporting import report
from capjob.reporting.contact_sheet import run_contact_sheet
from capjob.reporting.evaluation import evaluate_output
from capjob.reporting.run_totals import (engine_crash_summary, engine_ready_at, run_duplicates, sample_captions,
                                         totals_from_sink)
from capjob.schema import CAPTIONS, QUARANTINE
from capjob.stages import ids, images, resume, sources
from capjob.stages.caption import engine_guard
from capjob.stages.caption.engine import (EnginePlacement, check_accelerator_type, decide_placement, largest_node_gpus,
                                          task_options)
from capjob.stages.caption.processor import build_caption_processor
from capjob.stages.caption.render import PromptWatch, needs_rendered_prompt, requests_fetch_prompt, submit_caption_prompt
from capjob.stages.dedup import claim as dedup_claim
from capjob.stages.dedup import fill as dedup_fill
from capjob.stages.dedup import registry as dedup_registry
from capjob.stages.sinks import CaptionSink
from capjob.stages.sources.cells import Fetcher
from capjob.stages.sources.common import ITEMS_COUNTER, SKIPPED_COUNTER, skipped_totals
from capjob.stages.sources.sample import ensure_sample_dataset
from capjob.stages.tables import TableWriter
from capjob.warmup import DriverWarmup



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
    # What caption-once saved (stages/dedup/fill.summary): distinct images, copies, requests saved.
    dedup: dict[str, Any] = field(default_factory=dict)

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
    done_count: int = 0  # done ids of this run's shard (data.shard; all of them without), before done went to the object store
    crashes: Any = None  # stages.engine_guard.CrashLedger actor (the driver's handle keeps it alive)
    prompt: Any = None  # render.submit_caption_prompt's result: the kept prompt, or its task running meanwhile
    # The driver's watch on that task when the requests fetch its result themselves (render.PromptWatch).
    prompt_watch: Optional[PromptWatch] = None
    # resume.source_fingerprint of the source, taken before it was read: what a finished run records.
    source_fingerprint: Optional[str] = None
    # On a cluster it joined: the watch on its nodes (a node lost mid-job), runtime.NodeWatch.
    node_watch: Optional[runtime.NodeWatch] = None
    dedup: Any = None  # stages.dedup.registry.DedupRegistry actor (None: dedup.mode=off)

    def guard_prompt(self) -> Any:
        """Around the Ray Data execution: a render that fails stops the run with its error."""
        return self.prompt_watch.guard() if self.prompt_watch is not None else contextlib.nullcontext()

    def prompt_error(self) -> Optional[BaseException]:
        return self.prompt_watch.error if self.prompt_watch is not None else None

    def guard_nodes(self) -> Any:
        """Around the Ray Data execution: a node lost mid-job stops the run in one line (runtime.NodeWatch)."""
        return self.node_watch.guard() if self.node_watch is not None else contextlib.nullcontext()

    def watch_error(self) -> Optional[BaseException]:
        """The error a watch (prompt render, nodes) stopped the run with, if one did."""
        return self.prompt_error() or (self.node_watch.error if self.node_watch is not None else None)


def start(cfg: CapjobConfig, run_id: str, checked: Optional[preflight.Checked], warmup: DriverWarmup) -> Started:
    """Every check that can fail before data flows (preflight.check_all, unless the caller ran
    it: `checked`), then the model, the done ids and Ray, and the checks that need the cluster
    (accelerator type, custom resources, node labels, paths every node must see). warmup: the
    caller's DriverWarmup, started here; the caller closes it before Ray is shut down."""
    clock, wall_clock = time.monotonic(), time.time()
    console.startup_mark("config composed, job starting")
    if checked is None:
        checked = preflight.check_all(cfg, read_done=False)  # the dry run's sequence; raises CapjobError
    console.startup_mark("preflight done (model, placement, sink, data, prompts, resume)")
    model_source = resolve_model_source(cfg.model.source, cfg.model.builder, say=console.out)
    # job.resume / retry_quarantined and the caption-settings fingerprint (refuses in one line),
    # then the sink's done ids and this run's settings record.
    done = resume.prepare(cfg, run_id, model_source)
    # What the registry starts from: the images the sink holds captions of (stages/dedup).
    seed = dedup_claim.seed_from_sink(cfg.sink, cfg.dedup.mode) if cfg.dedup.mode != DedupMode.off else None
    console.startup_mark("model source and done ids ready")
    warmup.start(model_source)  # the processor's imports (seconds) while Ray starts
    placement = checked.placement
    if placement is None:  # a cluster we join: its GPUs decide
        ray_info = runtime.init_ray(cfg.resources, cfg.engine, EnginePlacement(0, None))
        if cfg.resources.wait_for_gpus_s:  # GPU workers scaled to zero: ask the autoscaler, wait
            runtime.wait_for_gpus(cfg.resources, cfg.engine, cfg.resources.wait_for_gpus_s)
        placement = decide_placement(cfg.resources, cfg.engine, int(ray.cluster_resources().get("GPU", 0)), largest_node_gpus())
    else:
        ray_info = runtime.init_ray(cfg.resources, cfg.engine, placement, cfg.job.metrics_export_port)
    nodes = ray.nodes()
    check_accelerator_type(placement, ray.cluster_resources(), nodes)  # before any engine starts
    runtime.check_engine_resources(cfg.resources.engine_resources, ray.cluster_resources())
    runtime.check_label_selectors(cfg.resources, placement, nodes)
    watch = None
    if runtime.cluster_address(cfg.resources):  # Ray's tasks and actors open local paths on their own nodes
        runtime.check_paths_on_nodes(cfg, model_source)
        watch = runtime.NodeWatch(cfg.resources, placement)  # the nodes up now; one lost later stops the run in one line
    configure_data_context(cfg, placement)
    warmup.ray_up()  # the library's own actors, as soon as the warm-up's imports are done
    console.startup_mark("Ray up")
    # Its task overlaps what follows (a fresh worker importing vLLM, serial before).
    prompt = submit_caption_prompt(cfg, model_source, placement) if needs_rendered_prompt(cfg.engine) else None
    # Without engine.chat_template_stages nothing waits for the render before Ray Data starts:
    # the request builders fetch it; the driver only watches it (keeps it, checks it).
    prompt_watch = PromptWatch(prompt) if requests_fetch_prompt(cfg.engine, prompt) else None
    ledger = metrics.start_ledger(cfg.job.name, run_id)  # keep the handle: an unreferenced actor is destroyed
    crashes = engine_guard.start_ledger(run_id, cfg.engine.max_engine_deaths_per_batch, **metrics.on_driver_node())
    registry = (dedup_registry.start_registry(run_id, cfg.dedup.mode, cfg.dedup.threshold, seed, **metrics.on_driver_node())
                if seed is not None else None)
    console.startup_mark("prompt " + ("submitted" if prompt is not None else "not needed") + ", ledger actors started")
    return Started(run_id, model_source, placement, done.put(), ledger, clock, wall_clock, ray_info.get("dashboard_url"),
                   done_count=done.count_in(parse_shard(cfg.data.shard)), crashes=crashes, prompt=prompt, prompt_watch=prompt_watch,
                   node_watch=watch, dedup=registry)


def with_ids(ds: Any, source: Any, done: Any, run_id: str, options: dict[str, Any], shard: Optional[str] = None) -> Any:
    """The id stage (stages/ids.assign_ids): rows get `id` and `source_key`, rows of other shards
    (data.shard `shard`) and done ones leave, counts go to `run_id`'s ledger. One definition for
    the run and the nothing-left check. options: the pipeline's task_options (equal remote args
    fuse the stage with its neighbours)."""
    return ds.map_batches(
        ids.assign_ids,
        fn_kwargs={"image_column": source.image_column, "key_column": source.key_column, "done": done, "run_id": run_id,
                   "shard": parse_shard(shard)},
        batch_format="numpy",
        **options,
    )


def caption_flow(cfg: CapjobConfig, job: Started, source: Any, plan: Plan) -> Any:
    """The lazy Ray Dataset from source rows to output rows, stage by stage."""
    ds = source.dataset
    # Repartition first, straight after the read: the read's blocks (a whole parquet file, up to
    # resources.max_block_mib) are the largest in the job, and only the repartition holds them.
    if plan.rows_per_block:
        ds = ds.repartition(target_num_rows_per_block=plan.rows_per_block)
    elif plan.num_blocks:
        ds = ds.repartition(num_blocks=plan.num_blocks)
    # assign_ids, prepare_images and the processor's preprocess share task_options, so Ray Data
    # fuses them into one task per block: no copy of the raw or decoded block between them.
    # stable ids; rows of other shards (data.shard) and rows a previous run finished leave here
    ds = with_ids(ds, source, job.done, job.run_id, task_options(cfg.resources, cfg.job), cfg.data.shard)
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
        **task_options(cfg.resources, cfg.job),
    )
    # image_digest on every row; with dedup on, copies of an image already claimed leave for the
    # sink's pending table (the fill writes their rows after the stream).
    target = dedup_claim.ClaimTarget(cfg.sink, job.run_id, dedup_registry.registry_name(job.run_id) if job.dedup is not None else None,
                                     cfg.dedup.mode, list(source.passthrough_columns))
    ds = ds.map_batches(dedup_claim.claim_copies, fn_kwargs={"target": target}, batch_format="numpy",
                        **task_options(cfg.resources, cfg.job))
    return build_caption_processor(cfg, job.model_source, job.placement, job.run_id,
                                   passthrough_columns=source.passthrough_columns, expected_rows=source.num_rows,
                                   crash_ledger=engine_guard.ledger_name(job.run_id) if job.crashes is not None else None,
                                   pending_prompt=job.prompt)(ds)


def passthrough_types(source: Any) -> dict[str, Any]:
    """The Arrow types of the source's pass-through columns, when the reader knows its schema
    without reading data (parquet footers, HF features); {} otherwise."""
    try:
        schema = source.dataset.schema(fetch_if_missing=False)
        types = dict(zip(schema.names, schema.types)) if schema is not None else {}
        return {c: t for c, t in types.items() if c in source.passthrough_columns and isinstance(t, pa.DataType)}
    except Exception:  # noqa: BLE001 - a hint for the sink's typing; never worth failing the run
        return {}


def nothing_left(cfg: CapjobConfig, job: Started, source: Any, num_rows: Optional[int]) -> Optional[int]:
    """The rows of the source (of this run's shard, with data.shard) when every one is already
    in the sink, found before any engine starts; None when some are left or it was not checked.

    Only checked when the sink holds at least as many ids (of the shard) as the source has rows
    (as its shard can have: ids.fewest_shard_rows), so a resumed run that still has work pays
    nothing: then the source's ids are computed once, by the same assign_ids stage the run uses,
    counted against a ledger of their own (not the run's)."""
    shard = parse_shard(cfg.data.shard)
    if not job.done_count or num_rows is None or job.done_count < ids.fewest_shard_rows(num_rows, shard):
        return None
    probe_id = f"{job.run_id}-resume-check"
    probe = metrics.start_ledger(cfg.job.name, probe_id)
    try:
        left = with_ids(source.dataset, source, job.done, probe_id, task_options(cfg.resources, cfg.job), cfg.data.shard).count()
        rows = ray.get(probe.totals.remote(), timeout=30).get("read", 0) if shard is not None else num_rows
    finally:
        ray.kill(probe)
    if left:
        return None
    # the next run of the same command can tell before Ray starts
    resume.record_complete(cfg.sink, job.run_id, job.source_fingerprint, resume.caption_settings(cfg, job.model_source), rows)
    return rows


def progress_totals(job: Started, shard: Optional[str]) -> dict[str, int]:
    """The ledger's totals for the progress line, whose total is the source's rows less the
    ``skipped`` ones: the rows of other shards (data.shard) are not this run's either."""
    totals = ray.get(job.ledger.totals.remote(), timeout=5)
    parsed = parse_shard(shard)
    if parsed is not None:
        totals["skipped"] = totals.get("skipped", 0) + totals.get(SKIPPED_COUNTER + ids.shard_reason(parsed), 0)
    return totals


def completed_before(cfg: CapjobConfig, source_fingerprint: Optional[str]) -> Optional[int]:
    """The source's row count when the sink already holds all of it, known without Ray: a finished
    run recorded this source, these caption settings and the sink as it is now
    (resume.completed_rows). None: not known so (job.resume=false, job.retry_quarantined, a
    source without a fingerprint, anything changed): the run reads the source to find out."""
    if cfg.job.resume is False or cfg.job.retry_quarantined or source_fingerprint is None:
        return None
    model_source = resolve_model_source(cfg.model.source, cfg.model.builder, say=console.out)
    return resume.completed_rows(cfg.sink, source_fingerprint, resume.caption_settings(cfg, model_source))


def say_nothing_left(cfg: CapjobConfig, num_rows: int) -> None:
    of = f"shard {cfg.data.shard} of {cfg.data.name}" if cfg.data.shard else cfg.data.name
    console.headline(f"capjob: nothing left to do: all {num_rows} rows of {of} are already in "
                     f"{cfg.sink.path} (captions or quarantine); no engine started. job.resume=false captions them again")


def fill_copies(cfg: CapjobConfig, job: Started, sink: CaptionSink) -> None:
    """After the stream: the rows of the copies the dedup stage set aside (stages/dedup/fill.py),
    added to the sink's totals (captioned and quarantined count them; the report's dedup section)."""
    if job.dedup is None:
        return
    fill = dedup_fill.fill_copies(TableWriter(cfg.sink), job.run_id, sink, cfg.model.name, cfg.dedup.report_groups)
    sink.totals["captioned"] += fill.copies
    sink.totals["quarantined"] += fill.quarantined
    sink.totals["write_events"] = sink.totals.get("write_events", []) + fill.write_events
    sink.totals["dedup_fill"] = fill


def finish(cfg: CapjobConfig, job: Started, dataset: Any, sink: Any, resolved_config: dict[str, Any],
           report_dir: Optional[str], interrupted: bool = False) -> RunResult:
    """Account for every row, write the report, fail loudly on a mismatch. An interrupted run
    (Ctrl-C) gets a partial report from what it wrote, and no accounting check."""
    writer = TableWriter(cfg.sink)
    try:
        counts = ray.get(job.ledger.totals.remote(), timeout=30)
    except Exception:  # noqa: BLE001 - after Ctrl-C the ledger may be gone with Ray's workers
        counts = {}
    totals = totals_from_sink(cfg.sink, job.run_id, writer) if interrupted else sink.totals
    end = time.time()
    result = RunResult(
        run_id=job.run_id,
        output=writer.url(CAPTIONS),
        quarantine=writer.url(QUARANTINE),
        rows_read=counts.get("read", 0),
        skipped_done=counts.get("skipped", 0),
        captioned=totals["captioned"],
        quarantined_images=counts.get("images_rejected", 0),
        quarantined_engine=totals["quarantined"],
        wall_seconds=time.monotonic() - job.clock,
        duplicates=run_duplicates(cfg.sink, job.run_id, writer),
    )
    result.skipped_by_source = skipped_totals(counts)
    result.dedup = dedup_fill.summary(cfg.dedup.mode, totals.get("dedup_fill") or dedup_fill.FillResult(), result.captioned,
                                      counts.get(dedup_claim.COPIES_COUNTER, 0), len(prompt_specs(cfg.caption)),
                                      result.wall_seconds, cfg.dedup.report_groups)
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
    run_report.update(report.price(result.captioned, result.wall_seconds, timeline,
                                   job.placement.gpus * cfg.resources.concurrency, cfg.job.gpu_hour_price))
    crashes = engine_crash_summary(job.crashes)
    if crashes.get("guarded_batches"):  # what the engine guard cost each batch (ms of actor calls)
        run_report["engine_guard"] = {k: crashes[k] for k in ("guarded_batches", "ms_before_engine_per_batch", "ms_after_engine_per_batch")}
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
              **run_contact_sheet(writer, job.run_id, totals.get("samples", []), result.captioned)}
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
    # Read to its end and every row accounted for: the sink holds the whole source now.
    resume.record_complete(writer, job.run_id, job.source_fingerprint, resume.caption_settings(cfg, job.model_source),
                           result.rows_read)
    return result


def run(cfg: CapjobConfig, resolved_config: dict[str, Any], report_dir: Optional[str] = None,
        checked: Optional[preflight.Checked] = None) -> Optional[RunResult]:
    """The job: preflight, plan, stream every row to the sink, report. checked: the caller's
    preflight.check_all(cfg, read_done=False), if it ran it (the CLI does, before it imports
    this module). Raises CapjobError for what the user can fix, console.Interrupted on Ctrl-C
    (after writing a partial report). A dry run is preflight.dry_run, not this."""
    run_id = cfg.job.run_id or new_run_id()
    job: Optional[Started] = None
    dataset = sink = None
    warmup = DriverWarmup()  # started by start(); closed here, whatever happens
    try:
        if checked is None:
            checked = preflight.check_all(cfg, read_done=False)  # the dry run's sequence; raises CapjobError
        if cfg.data.format == SourceFormat.sample:
            ensure_sample_dataset(cfg.data.sample_size, cfg.data.sample_shapes)  # written once; its listing is its fingerprint
        # Taken before anything reads the source: a finished run records it (resume.record_complete).
        fingerprint = resume.source_fingerprint(cfg.data)
        done_rows = completed_before(cfg, fingerprint)
        if done_rows is not None:
            say_nothing_left(cfg, done_rows)
            return None
        job = start(cfg, run_id, checked, warmup)
        job.source_fingerprint = fingerprint
        source = sources.read_source(preflight.data_with_prompt_columns(cfg.data, cfg.caption), run_id)
        console.startup_mark("source read")
        # Ray Data does not count every source up front (the sample set); its files may tell.
        num_rows = source.num_rows if source.num_rows is not None else preflight.source_rows(cfg.data)
        done_rows = nothing_left(cfg, job, source, num_rows)
        if done_rows is not None:
            say_nothing_left(cfg, done_rows)
            return None
        plan = make_plan(cfg, run_id, job.model_source, job.placement, source.num_rows)
        lines = [plan.render(cfg)]
        if job.done_count:
            lines.append(f"  resume      {job.done_count} id(s) already in the sink are skipped")
        if job.dashboard_url:
            lines.append(f"  dashboard   http://{job.dashboard_url}")
        if console.log_path and console.quiet():
            lines.append(f"  log         {console.log_path} (Ray, vLLM; job.log_level=info shows them here)")
        console.brief("\n".join(lines), plan.headline(cfg) + (f" · log {console.log_path}" if console.log_path else ""))
        dataset = caption_flow(cfg, job, source, plan)
        console.startup_mark("caption flow built (processor, prompt); Ray Data execution starts")
        sink = CaptionSink(cfg.sink, run_id, cfg.model.name, cfg.caption, data_root=cfg.data.path,
                           column_types=passthrough_types(source))
        with console.Progress(lambda: progress_totals(job, cfg.data.shard), num_rows), job.guard_nodes(), job.guard_prompt():
            dataset.write_datasink(sink, ray_remote_args=task_options(cfg.resources, cfg.job))  # streams: nothing is materialised
            fill_copies(cfg, job, sink)
    except (ClusterError, KeyboardInterrupt) as e:
        # A watch's error (KeyboardInterrupt: its thread stopped the main one), else Ctrl-C.
        error = e if isinstance(e, ClusterError) else job.watch_error() if job is not None else None
        if isinstance(error, ClusterError) and job is not None:  # a node lost: a partial report of what was written
            with contextlib.suppress(Exception):
                finish(cfg, job, dataset, sink, resolved_config, report_dir, interrupted=True)
        if error is not None:
            raise error from None
        if job is None:
            raise console.Interrupted("capjob: interrupted while starting, before any caption; run the same command to start again") from None
        result = finish(cfg, job, dataset, sink, resolved_config, report_dir, interrupted=True)
        raise console.Interrupted(
            f"capjob: interrupted after {result.captioned} captions; run the same command to resume "
            f"(partial report: {job.report_dirs[0]})"
        ) from None
    finally:
        warmup.close()  # its thread makes no Ray call once the caller shuts Ray down
    result = finish(cfg, job, dataset, sink, resolved_config, report_dir)
    if cfg.eval.mode != EvalMode.off:
        evaluate(cfg, result, report_dir)
    return result


def evaluate(cfg: CapjobConfig, result: RunResult, report_dir: Optional[str]) -> None:
    """Caption statistics (and the judge pass) over this run's captions, next to its report."""
    local_dir = pathlib.Path(report_dir or f"outputs/eval/{result.run_id}")
    _, written = evaluate_output(cfg.sink, cfg.eval, local_dir, run_id=result.run_id,
                                 max_tokens=cfg.caption.max_tokens, resources=cfg.resources)
    fs, root = fsspec.url_to_fs(f"{cfg.sink.path.rstrip('/')}/reports/{result.run_id}", **cfg.sink.storage_options)
    for name in ("json", "markdown", "histogram"):
        if name in written:
            fs.put_file(str(written[name]), f"{root}/{pathlib.Path(written[name]).name}")
    console.out(f"evaluation: {local_dir} and {cfg.sink.path.rstrip('/')}/reports/{result.run_id}")
