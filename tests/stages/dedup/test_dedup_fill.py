"""The dedup stage and the fill without Ray: copies set aside in the sink's pending table, then
joined with their originals' rows (captioned, failed, missing), across runs of one sink, with
several prompts and with sink=txt (stages/dedup/claim.py, fill.py)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from capjob import metrics
from capjob.config import DedupMode, SinkConfig, SinkFormat
from capjob.reporting import report
from capjob.schema import CAPTIONS, ERROR_COLUMN, PENDING, QUARANTINE, THUMBNAIL_COLUMN
from capjob.stages.dedup import claim, fill
from capjob.stages.dedup.registry import DedupRegistry
from capjob.stages.ids import pixel_digest
from capjob.stages.sinks import CaptionSink
from capjob.stages.tables import TableWriter


class FakeActor:
    """A DedupRegistry called as Ray would (claim.remote), in this process."""

    def __init__(self, reg: DedupRegistry):
        self.claim = type("Method", (), {"remote": staticmethod(reg.claim)})()


@pytest.fixture(autouse=True)
def no_ray(monkeypatch):
    import ray

    counts: dict[str, int] = {}

    def record_many(run_id, key, values):
        for name, n in values.items():
            counts[f"{run_id}/{name}/{key}"] = n

    monkeypatch.setattr(metrics, "record_many", record_many)
    monkeypatch.setattr(ray, "get", lambda value, **_: value)
    return counts


def image(value: int) -> np.ndarray:
    """A flat image of red `value`; values >= 1000: a smooth random photo (seed value) and,
    for 2000 + seed, the same photo with its pixels a little off (a near duplicate)."""
    if value >= 1000:
        rng = np.random.default_rng(value % 1000)
        small = Image.fromarray(rng.integers(0, 256, (5, 5, 3), dtype=np.uint8), "RGB").resize((40, 32), Image.Resampling.BICUBIC)
        pixels = np.asarray(small).astype(np.int16)
        if value >= 2000:
            pixels = pixels + rng.integers(-3, 4, pixels.shape)
        return np.clip(pixels, 0, 255).astype(np.uint8)
    pixels = np.zeros((32, 40, 3), np.uint8)
    pixels[:, :, 0] = value
    return pixels


def block(rows: list[tuple[str, int]], label: str = "l") -> dict[str, np.ndarray]:
    """A decoded block as prepare_images emits it: (id, image value) rows, one pass-through column."""
    images = np.empty(len(rows), dtype=object)
    for i, (_, v) in enumerate(rows):
        images[i] = image(v)
    return {"id": np.asarray([r for r, _ in rows], dtype=object), "source_key": np.asarray([f"key/{r}.png" for r, _ in rows], dtype=object),
            "image_width": np.full(len(rows), 40), "image_height": np.full(len(rows), 32), "image": images,
            "label": np.asarray([f"{label}-{r}" for r, _ in rows], dtype=object)}


def start(monkeypatch, sink: SinkConfig, run_id: str, mode: DedupMode = DedupMode.exact) -> claim.ClaimTarget:
    """The run's registry, seeded from the sink as pipeline.start does it."""
    seed = claim.seed_from_sink(sink, mode)
    reg = DedupRegistry(mode.value, 4, seed.high, seed.low, seed.phashes, seed.digests)
    monkeypatch.setattr(claim, "_registry", lambda name: FakeActor(reg))
    return claim.ClaimTarget(sink, run_id, "registry", mode, ["label"])


def engine(kept: dict[str, np.ndarray], run_id: str, fails: set[int] = frozenset(), prompts: tuple[str, ...] = ()) -> pa.Table:
    """What the records stage would emit for the kept rows: a caption naming the image's value,
    or an engine error for the values in `fails`."""
    rows = []
    for i, rid in enumerate(kept["id"]):
        value = int(kept["image"][i][0, 0, 0])
        text = {f"caption_{p}": f"{p}: value {value}" for p in prompts} or {"caption": f"value {value}"}
        rows.append({"id": rid, "source_key": kept["source_key"][i], **text, "prompt_tokens": 10, "generated_tokens": 5,
                     "image_width": 40, "image_height": 32, "model": "tiny", "run_id": run_id,
                     "image_digest": kept["image_digest"][i], "duplicate_of": None, "label": kept["label"][i],
                     ERROR_COLUMN: "boom: out of blocks" if value in fails else "", THUMBNAIL_COLUMN: None,
                     **({"image_phash": kept["image_phash"][i]} if "image_phash" in kept else {})})
    return pa.Table.from_pylist(rows)


def rows_of(sink: SinkConfig, table: str) -> dict[str, dict]:
    return {r["id"]: r for r in TableWriter(sink).read(table).to_pylist()}


def test_copies_across_blocks_get_their_originals_caption_and_a_failed_original_quarantines_its_copies(tmp_path, monkeypatch, no_ray):
    sink = SinkConfig(path=str(tmp_path / "out"))
    target = start(monkeypatch, sink, "runA")
    out = CaptionSink(sink, "runA", "tiny")
    b1 = claim.claim_copies(block([("r1", 1), ("r2", 2), ("r3", 1)]), target=target)
    assert b1["id"].tolist() == ["r1", "r2"] and b1["image_digest"][0] == pixel_digest(image(1))
    # A retried task: the same rows kept, the same pending file rewritten.
    again = claim.claim_copies(block([("r1", 1), ("r2", 2), ("r3", 1)]), target=target)
    assert again["id"].tolist() == ["r1", "r2"]
    b2 = claim.claim_copies(block([("r4", 2), ("r5", 3), ("r6", 1)]), target=target)
    assert b2["id"].tolist() == ["r5"]
    writer = TableWriter(sink)
    assert len(writer.list_files(PENDING)) == 2
    assert sum(v for k, v in no_ray.items() if k.startswith(f"runA/{claim.COPIES_COUNTER}/")) == 3
    out.write([engine(b1, "runA", fails={2}), engine(b2, "runA")], None)

    result = fill.fill_copies(writer, "runA", out, "tiny")
    assert (result.copies, result.quarantined) == (2, 1)
    captions, quarantine = rows_of(sink, CAPTIONS), rows_of(sink, QUARANTINE)
    assert set(captions) == {"r1", "r3", "r5", "r6"} and set(quarantine) == {"r2", "r4"}  # nothing lost, nothing twice
    for copy in ("r3", "r6"):
        row = captions[copy]
        assert row["caption"] == captions["r1"]["caption"] == "value 1"
        assert row["duplicate_of"] == "r1" and row["source_key"] == f"key/{copy}.png" and row["label"] == f"l-{copy}"
        assert row["run_id"] == "runA" and row["image_digest"] == captions["r1"]["image_digest"]
    assert captions["r1"]["duplicate_of"] is None and captions["r5"]["duplicate_of"] is None
    # The copy of the failed image: the original's stage and kind, and a reason that says why.
    assert quarantine["r4"]["stage"] == quarantine["r2"]["stage"] == "engine"
    assert quarantine["r4"]["reason"].startswith("engine: copy of r2 (same pixels), whose request failed")
    assert "boom: out of blocks" in quarantine["r4"]["reason"]
    assert not writer.list_files(PENDING)
    assert result.groups["r1"]["copies"] == 2 and {e["id"] for e in result.groups["r1"]["examples"]} == {"r3", "r6"}

    # Kill and resume: a later run of the same sink starts from the sink's digests. A copy of an
    # image captioned by runA reuses runA's caption; the failed image is tried again.
    target = start(monkeypatch, sink, "runB")
    assert len(claim.seed_from_sink(sink, DedupMode.exact)) == 2  # r1 and r5: copies are no seed
    out = CaptionSink(sink, "runB", "tiny")
    b3 = claim.claim_copies(block([("r7", 1), ("r8", 2), ("r9", 2)]), target=target)
    assert b3["id"].tolist() == ["r8"]
    out.write([engine(b3, "runB")], None)
    result = fill.fill_copies(writer, "runB", out, "tiny")
    captions = rows_of(sink, CAPTIONS)
    assert (result.copies, captions["r7"]["duplicate_of"], captions["r7"]["caption"]) == (2, "r1", "value 1")
    assert captions["r9"]["duplicate_of"] == "r8" and captions["r9"]["run_id"] == "runB"


def test_a_copy_whose_original_has_no_row_is_quarantined_as_dedup(tmp_path, monkeypatch):
    sink = SinkConfig(path=str(tmp_path / "out"))
    target = start(monkeypatch, sink, "run")
    claim.claim_copies(block([("a", 1), ("b", 1)]), target=target)  # the original's block is then lost
    result = fill.fill_copies(TableWriter(sink), "run", CaptionSink(sink, "run", "tiny"), "tiny")
    (row,) = rows_of(sink, QUARANTINE).values()
    assert (result.quarantined, row["id"], row["stage"]) == (1, "b", "dedup")
    assert row["reason"].startswith("dedup: copy of image_digest ") and "job.retry_quarantined=dedup" in row["reason"]
    assert result.quarantined_by_kind == {"dedup": 1}


@pytest.mark.parametrize("fmt", [SinkFormat.jsonl, SinkFormat.txt])
def test_several_prompts_and_other_formats_copy_every_caption_column(tmp_path, monkeypatch, fmt):
    sink = SinkConfig(path=str(tmp_path / "out"), format=fmt, compression="zstd" if fmt == SinkFormat.jsonl else "snappy")
    target = start(monkeypatch, sink, "run")
    out = CaptionSink(sink, "run", "tiny")
    kept = claim.claim_copies(block([("a", 1), ("b", 2), ("c", 1), ("d", 2)]), target=target)
    out.write([engine(kept, "run", prompts=("short", "long"))], None)
    # One pass per original: the fill's passes give the same rows as one.
    result = fill.fill_copies(TableWriter(sink), "run", out, "tiny", per_pass=1)
    captions = rows_of(sink, CAPTIONS)
    assert result.copies == 2 and set(captions) == {"a", "b", "c", "d"}
    for copy, original in (("c", "a"), ("d", "b")):
        assert captions[copy]["duplicate_of"] == original
        assert (captions[copy]["caption_short"], captions[copy]["caption_long"]) == (captions[original]["caption_short"],
                                                                                     captions[original]["caption_long"])
    if fmt == SinkFormat.txt:
        assert (tmp_path / "out" / "txt" / "key" / "c.txt").read_text() == "short: value 1"
        assert captions["c"]["txt_file"] == "key/c.txt"


def test_perceptual_mode_merges_a_near_duplicate_and_lists_its_group(tmp_path, monkeypatch):
    sink = SinkConfig(path=str(tmp_path / "out"))
    target = start(monkeypatch, sink, "run", DedupMode.perceptual)
    out = CaptionSink(sink, "run", "tiny")
    kept = claim.claim_copies(block([("a", 1001), ("b", 1002), ("near", 2001)]), target=target)
    assert kept["id"].tolist() == ["a", "b"] and len(kept["image_phash"][0]) == 16
    out.write([engine(kept, "run")], None)
    result = fill.fill_copies(TableWriter(sink), "run", out, "tiny")
    captions = rows_of(sink, CAPTIONS)
    near = captions["near"]
    assert near["duplicate_of"] == "a" and near["caption"] == captions["a"]["caption"]
    assert near["image_digest"] != captions["a"]["image_digest"]  # its own pixels, another digest
    (example,) = result.groups["a"]["examples"]
    assert example["id"] == "near" and 0 < example["distance"] <= 4
    # The next run finds the captioned image by its perceptual hash in the sink.
    target = start(monkeypatch, sink, "run2", DedupMode.perceptual)
    assert claim.claim_copies(block([("near2", 2001)]), target=target)["id"].tolist() == []


def test_off_only_adds_the_digest(tmp_path):
    sink = SinkConfig(path=str(tmp_path / "out"))
    kept = claim.claim_copies(block([("a", 1), ("b", 1)]), target=claim.ClaimTarget(sink, "run", None, DedupMode.off))
    assert kept["id"].tolist() == ["a", "b"] and kept["image_digest"][0] == kept["image_digest"][1]
    assert not TableWriter(sink).list_files(PENDING)


def test_report_and_console_give_the_savings_both_ways():
    result = fill.FillResult(copies=30, quarantined=2, groups={"r1": {"original": "r1", "source_key": "k1", "copies": 3,
                                                                      "examples": [{"id": "c", "source_key": "kc", "distance": 2}]}})
    summary = fill.summary(DedupMode.perceptual, result, captioned=100, set_aside=32, prompts=2, wall_seconds=10.0, report_groups=5)
    assert summary["distinct_images_captioned"] == 70 and summary["engine_requests_saved"] == 64
    assert (summary["images_per_second"], summary["distinct_images_per_second"]) == (10.0, 7.0)
    lines = report._dedup_lines({"dedup": summary})
    assert lines == ["| dedup (perceptual) | 70 distinct images captioned, 30 copies reused a caption, 2 quarantined with their "
                     "original; 64 engine requests saved; images/s 10.0 every row / 7.0 distinct |"]
    assert "| k1 | 3 | kc (2) |" in "\n".join(report._group_lines({"dedup": summary}))
    assert report._dedup_lines({"dedup": {**summary, "mode": "off"}}) == []
    none = fill.summary(DedupMode.exact, fill.FillResult(), captioned=10, set_aside=0, prompts=1, wall_seconds=5.0, report_groups=5)
    assert report._dedup_lines({"dedup": none}) == [] and none["distinct_images_captioned"] == 10  # no copy: no console line


def test_the_dedup_group_composes_and_is_no_caption_setting():
    from capjob.config import to_typed
    from capjob.errors import ConfigError
    from capjob.stages.resume import caption_settings
    from helpers.config import compose

    cfgs = {mode: to_typed(compose(["experiment=offline", f"dedup={mode}"])) for mode in ("exact", "off", "perceptual")}
    assert to_typed(compose(["experiment=offline"])).dedup.mode == DedupMode.exact  # on by default
    assert {m: c.dedup.mode.value for m, c in cfgs.items()} == {"exact": "exact", "off": "off", "perceptual": "perceptual"}
    # Which rows reach the engine, never what caption an image gets: one fingerprint for every mode.
    assert len({str(caption_settings(c, "no-such-model")) for c in cfgs.values()}) == 1
    with pytest.raises(ConfigError, match=r"^dedup.threshold: must be in 0..16 bits of 64, got 40$"):
        to_typed(compose(["experiment=offline", "dedup=perceptual", "dedup.threshold=40"]))
