"""Smoke tests for the scripts in bench/: they run and report, on tiny inputs (no timing checks)."""

import json
import pathlib
import re
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_preprocess_bench_runs(tmp_path):
    out_json = tmp_path / "preprocess.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "preprocess_bench.py"), "--images", "6", "--repeats", "1",
         "--max-megapixels", "1.3", "--gen-jobs", "1", "--cache-dir", str(tmp_path / "cache"), "--json", str(out_json)],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"^ratio capjob/seed .*: \d+\.\d+x", proc.stdout, re.MULTILINE), proc.stdout
    assert "| all | 6 |" in proc.stdout  # the markdown table, with its total row
    result = json.loads(out_json.read_text())
    assert result["images"] == 6 and result["ratio"] > 0
    assert {row["format"] for row in result["rows"]} >= {"all"}
