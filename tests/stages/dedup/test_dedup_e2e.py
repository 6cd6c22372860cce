"""End to end on CPU (Ray Data + Ray Data LLM + vLLM CPU, tiny model), issue 32: exact copies
spread over many blocks, two prompts per image, two engine replicas, and a driver SIGKILLed mid
run then resumed. Every image is captioned once across both runs; every copy carries its
original's captions, names it in duplicate_of, and no row is lost or written twice."""

from __future__ import annotations

import io
import json
import os
import random
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from capjob.stages.sources.sample import write_hf_parquet
from helpers.config import REPO
from helpers.references import shape_rows

pytestmark = pytest.mark.e2e

DISTINCT = 12
PROMPTS = ["+caption.prompts.short={prompt:'Name the shapes.',max_tokens:8}",
           "+caption.prompts.long={prompt:'Describe the image.',max_tokens:16}"]


def lossless_reencode(png: bytes) -> bytes:
    """The same pixels in other bytes (PNG at another compression level, with a text chunk)."""
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("comment", "re-encoded")
    buf = io.BytesIO()
    Image.open(io.BytesIO(png)).save(buf, "PNG", compress_level=1, pnginfo=info)
    assert buf.getvalue() != png
    return buf.getvalue()


def table(out, name) -> pa.Table:
    files = sorted((out / name).glob("*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files], promote_options="permissive") if files else pa.table({"id": []})


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dedup")
    rows, references = shape_rows(DISTINCT, seed=32)
    # Every image twice under two keys (one copy a lossless re-encode: other bytes, same
    # pixels), shuffled so that copies land in other blocks than their originals.
    copies = [(f"copy_{i:02d}.png", lossless_reencode(data) if i == 0 else data, label) for i, (_, data, label) in enumerate(rows)]
    everything = list(zip(rows + copies, references + references))
    random.Random(5).shuffle(everything)
    (tmp / "data").mkdir()
    write_hf_parquet([r for r, _ in everything], tmp / "data" / "part-0.parquet", [ref for _, ref in everything])
    out = tmp / "out"
    base = [sys.executable, "-m", "capjob", "experiment=offline", "dataset=parquet", f"data.path={tmp}/data", "data.name=dedup",
            "data.key_column=null", f"sink.path={out}", "data.partitions=12", "engine.batch_size=2", "caption.temperature=0", "caption.ignore_eos=true",
            *PROMPTS]
    first = subprocess.Popen([*base, "job.run_id=killed"], cwd=REPO, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not list((out / "captions").glob("*.parquet")):
        assert first.poll() is None, "the first run ended before it could be killed"
        assert time.time() < deadline, "no output files appeared"
        time.sleep(0.1)
    os.killpg(first.pid, signal.SIGKILL)  # the driver and its local Ray cluster, registry included
    first.wait()
    time.sleep(2)
    before = table(out, "captions")
    second = subprocess.run([*base, "job.run_id=resumed", "resources.concurrency=2"], cwd=REPO, capture_output=True, text=True,
                            timeout=900)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-5000:]
    return out, everything, before, second


def test_every_row_once_and_every_image_captioned_once(killed_and_resumed):
    out, everything, before, _ = killed_and_resumed
    captions, quarantine = table(out, "captions"), table(out, "quarantine")
    ids = captions.column("id").to_pylist() + quarantine.column("id").to_pylist()
    assert len(ids) == len(set(ids)) == len(everything), "every row exactly once across both runs"
    assert quarantine.num_rows == 0
    originals = [r for r in captions.to_pylist() if r["duplicate_of"] is None]
    # Each distinct image got one engine caption over both runs; every other row is a copy.
    assert len(originals) == len({r["image_digest"] for r in originals}) == DISTINCT
    assert 0 < before.num_rows, "the killed run wrote captions first"
    assert not list((out / "pending").glob("*.parquet")) or {p.name.split("-", 1)[0] for p in (out / "pending").glob("*.parquet")} == {"killed"}


def test_every_copy_carries_its_originals_captions(killed_and_resumed):
    out, _, _, _ = killed_and_resumed
    rows = {r["id"]: r for r in table(out, "captions").to_pylist()}
    copies = [r for r in rows.values() if r["duplicate_of"] is not None]
    assert len(copies) == DISTINCT
    for copy in copies:
        original = rows[copy["duplicate_of"]]
        assert original["duplicate_of"] is None and original["image_digest"] == copy["image_digest"]
        assert (copy["caption_short"], copy["caption_long"]) == (original["caption_short"], original["caption_long"])
        assert copy["reference"] == original["reference"]  # the same scene: a true caption that travels with the row
        assert copy["source_key"] != original["source_key"] and copy["id"] != original["id"]
    # The re-encoded PNG (other bytes, same pixels) and its source are one image: one is the other's copy.
    by_key = {r["source_key"]: r for r in rows.values()}
    pair = sorted((by_key["copy_00.png"], by_key["shapes_00000.png"]), key=lambda r: r["duplicate_of"] is not None)
    assert pair[0]["image_digest"] == pair[1]["image_digest"] and pair[1]["duplicate_of"] == pair[0]["id"]
    # Different images never share a caption row: the originals' captions fit their scenes.
    distinct = {r["reference"] for r in rows.values() if r["duplicate_of"] is None}
    assert len(distinct) == DISTINCT


def test_resumed_run_reports_what_dedup_saved(killed_and_resumed):
    out, _, _, second = killed_and_resumed
    report = json.loads((out / "reports" / "resumed" / "report.json").read_text())
    dedup = report["dedup"]
    rows = table(out, "captions").to_pylist()
    resumed_copies = [r for r in rows if r["run_id"] == "resumed" and r["duplicate_of"] is not None]
    assert dedup["mode"] == "exact" and dedup["copies_reused_caption"] == len(resumed_copies) > 0
    assert dedup["engine_requests_saved"] == 2 * dedup["copies_set_aside"] == 2 * len(resumed_copies)  # two prompts a copy
    assert dedup["distinct_images_captioned"] == report["captioned"] - len(resumed_copies)
    assert report["captioned"] + report["quarantined"] == report["rows_read"] - report["skipped_done"]
    assert report["captioned"] == sum(r["run_id"] == "resumed" for r in rows)
    assert f"| dedup (exact) | {dedup['distinct_images_captioned']} distinct images captioned, " in second.stdout
    assert "| images/s (every row / distinct images) |" in second.stdout
    assert "Images captioned once" in (out / "reports" / "resumed" / "report.md").read_text()
