"""End to end on CPU: the real pipeline (Ray Data + Ray Data LLM + vLLM CPU) with the tiny model."""

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


def test_corrupt_images_are_quarantined_not_fatal(tmp_path):
    rows = [(n, b, "generated") for n, b in generated_images(6, seed=5)]
    rows += [(name, data, "broken") for name, (data, _) in broken_images().items()]
    (tmp_path / "data").mkdir()
    write_hf_parquet(rows, tmp_path / "data" / "part-0.parquet")
    proc = capjob("data.format=parquet", f"data.path={tmp_path}/data", "data.name=broken", f"sink.path={tmp_path}/out")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    captions = read_table(tmp_path / "out" / "captions")
    quarantine = read_table(tmp_path / "out" / "quarantine")
    assert captions.num_rows == 6
    assert quarantine.num_rows == len(broken_images())
    reasons = dict(zip(quarantine.column("source_key").to_pylist(), quarantine.column("reason").to_pylist()))
    for name, (_, kind) in broken_images().items():
        assert reasons[name].startswith(kind + ":"), (name, reasons[name])
    assert set(quarantine.column("stage").to_pylist()) == {"images"}
