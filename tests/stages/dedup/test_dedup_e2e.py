"""End to end on CPU (Ray Data + Ray Data LLM + vLLM CPU, tiny model), issue 32, in ONE run:
exact copies spread over many blocks, two prompts per image, two engine replicas, and a sink
left as a killed run leaves one (atomic caption files of some originals, its settings record,
a pending file of copies it never filled). Every copy carries its original's captions (a copy of
an image the killed run captioned carries that run's caption) and names it in duplicate_of;
no row is lost or written twice; each image reaches the engine once."""

from __future__ import annotations

import io
import json
import random
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, PngImagePlugin

from capjob.stages.sources.sample import write_hf_parquet
from helpers.config import REPO, compose
from helpers.references import shape_rows

pytestmark = pytest.mark.e2e

DISTINCT = 12
KILLED = 3  # originals the killed run captioned before it died
PROMPTS = ["+caption.prompts.short={prompt:'Name the shapes.',max_tokens:8}",
           "+caption.prompts.long={prompt:'Describe the image.',max_tokens:12}"]


def lossless_reencode(png: bytes) -> bytes:
    """The same pixels in other bytes (PNG at another compression level, with a text chunk)."""
    info = PngImagePlugin.PngInfo()
    info.add_text("comment", "re-encoded")
    buf = io.BytesIO()
    Image.open(io.BytesIO(png)).save(buf, "PNG", compress_level=1, pnginfo=info)
    assert buf.getvalue() != png
    return buf.getvalue()


def table(out, name) -> pa.Table:
    files = sorted((out / name).glob("*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files], promote_options="permissive") if files else pa.table({"id": []})


def killed_run_state(out, overrides: list[str], rows: list[tuple[str, bytes, str]]) -> dict[str, str]:
    """What a SIGKILLed run of the same command leaves in the sink: its settings record, one
    atomic captions file (the first KILLED originals, captioned), and a pending file of copies
    it set aside but never filled. Returns {key: caption} of what it captioned."""
    from capjob.config import to_typed
    from capjob.models import resolve_model_source
    from capjob.stages import ids, images, resume
    from capjob.stages.tables import TableWriter

    cfg = to_typed(compose(overrides))
    resume.record_settings(cfg.sink, "killed", resume.caption_settings(cfg, resolve_model_source(cfg.model.source, cfg.model.builder)))
    captioned = rows[:KILLED]
    digests = [ids.pixel_digest(images.decode_image(data, cfg.images).pixels) for _, data, _ in captioned]
    writer = TableWriter(cfg.sink)
    writer.write("captions", pa.Table.from_pylist([
        {"id": ids.row_id(key, data), "source_key": key, "caption_short": f"killed run short {i}", "caption_long": f"killed run long {i}",
         "prompt_tokens": 50, "generated_tokens": 20, "image_width": 64, "image_height": 64, "model": "tiny_qwen25vl",
         "run_id": "killed", "image_digest": digest, "duplicate_of": None, "label": label, "reference": None}
        for i, ((key, data, label), digest) in enumerate(zip(captioned, digests))]), "killed-0001")
    writer.write("pending", pa.table({"id": ["stale"], "source_key": ["copy_00.png"], "image_digest": [digests[0]],
                                      "original_digest": [digests[0]], "distance": [0], "image_width": [64], "image_height": [64],
                                      "run_id": ["killed"]}), "killed-0002")
    return {key: f"killed run short {i}" for i, (key, _, _) in enumerate(captioned)}


@pytest.fixture(scope="module")
def dedup_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dedup")
    rows, references = shape_rows(DISTINCT, seed=32)
    # Every image twice under two keys (copy_00 a lossless re-encode: other bytes, same pixels),
    # shuffled so that copies land in other blocks than their originals.
    copies = [(f"copy_{i:02d}.png", lossless_reencode(data) if i == 0 else data, label) for i, (_, data, label) in enumerate(rows)]
    everything = list(zip(rows + copies, references + references))
    random.Random(5).shuffle(everything)
    (tmp / "data").mkdir()
    write_hf_parquet([r for r, _ in everything], tmp / "data" / "part-0.parquet", [ref for _, ref in everything])
    path = tmp / "data" / "part-0.parquet"
    pq.write_table(pq.read_table(path).append_column("key", pa.array([r[0] for r, _ in everything])), path)
    out = tmp / "out"
    # data.format=parquet keeps the sample set's pass-through columns (label, reference).
    overrides = ["experiment=offline", "data.format=parquet", f"data.path={tmp}/data", "data.name=dedup", "data.key_column=key",
                 f"sink.path={out}", "caption.temperature=0", "caption.ignore_eos=true", *PROMPTS]
    killed = killed_run_state(out, overrides, rows)
    proc = subprocess.run([sys.executable, "-m", "capjob", *overrides, "data.partitions=12", "engine.batch_size=2",
                           "resources.concurrency=2", "job.run_id=resumed"], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out, everything, killed, proc


def test_every_row_once_and_every_image_captioned_once(dedup_run):
    out, everything, _, proc = dedup_run
    captions, quarantine = table(out, "captions"), table(out, "quarantine")
    assert quarantine.num_rows == 0
    keys = captions.column("source_key").to_pylist()
    assert len(keys) == len(set(keys)) == len(everything), "every row exactly once"
    assert len(set(captions.column("id").to_pylist())) == len(everything)
    originals = [r for r in captions.to_pylist() if r["duplicate_of"] is None]
    # Each distinct image got one engine caption over both runs; every other row is a copy.
    assert len(originals) == len({r["image_digest"] for r in originals}) == DISTINCT
    assert sum(r["run_id"] == "resumed" for r in originals) == DISTINCT - KILLED
    assert {p.name for p in (out / "pending").glob("*.parquet")} == {"killed-0002.parquet"}  # the run's own pending: filled, removed
    # Two engine replicas took the requests (one registry decided for both).
    report = json.loads((out / "reports" / "resumed" / "report.json").read_text())
    assert report["config"]["resources"]["concurrency"] == 2
    assert "workers     2 engine replica(s), CPU each" in proc.stdout


def test_every_copy_carries_its_originals_captions(dedup_run):
    out, everything, killed, _ = dedup_run
    rows = {r["id"]: r for r in table(out, "captions").to_pylist()}
    reference = {key: ref for (key, _, _), ref in everything}
    copies = [r for r in rows.values() if r["duplicate_of"] is not None]
    assert len(copies) == DISTINCT
    for copy in copies:
        original = rows[copy["duplicate_of"]]
        assert original["duplicate_of"] is None and original["image_digest"] == copy["image_digest"]
        assert (copy["caption_short"], copy["caption_long"]) == (original["caption_short"], original["caption_long"])
        assert copy["source_key"] != original["source_key"] and copy["label"] == original["label"]
        # its own pass-through values: its source row's true caption, the same scene's as its original's
        assert copy["run_id"] == "resumed" and copy["reference"] == reference[copy["source_key"]] == reference[original["source_key"]]
    # Copies of what the killed run captioned reuse its captions (written by it, not the engine now).
    by_key = {r["source_key"]: r for r in rows.values()}
    for key, caption in killed.items():
        copy = by_key[f"copy_{int(key[len('shapes_'):-len('.png')]):02d}.png"]
        assert copy["caption_short"] == caption and copy["duplicate_of"] == by_key[key]["id"]
    # The re-encoded PNG (other bytes, same pixels) is a copy too.
    assert by_key["copy_00.png"]["image_digest"] == by_key["shapes_00000.png"]["image_digest"]


def test_the_report_and_console_say_what_dedup_saved(dedup_run):
    out, everything, _, proc = dedup_run
    report = json.loads((out / "reports" / "resumed" / "report.json").read_text())
    dedup = report["dedup"]
    assert (report["skipped_done"], report["captioned"], report["quarantined"]) == (KILLED, len(everything) - KILLED, 0)
    assert dedup["mode"] == "exact" and dedup["copies_reused_caption"] == dedup["copies_set_aside"] == DISTINCT
    assert dedup["distinct_images_captioned"] == DISTINCT - KILLED
    assert dedup["engine_requests_saved"] == 2 * DISTINCT  # two prompts a copy
    engine = next(o for o in report["operators"] if "vLLMEngineStageUDF" in o["operator"])
    assert engine["input_rows"] == 2 * (DISTINCT - KILLED)  # one request per prompt of each image the engine captioned
    assert f"| dedup (exact) | {DISTINCT - KILLED} distinct images captioned, {DISTINCT} copies reused a caption; " \
           f"{2 * DISTINCT} engine requests saved; images/s {dedup['images_per_second']} every row / " \
           f"{dedup['distinct_images_per_second']} distinct |" in proc.stdout
    assert "Images captioned once" in (out / "reports" / "resumed" / "report.md").read_text()
