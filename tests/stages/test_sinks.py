"""Sinks without inference: parquet and JSONL files, local and on a real S3 server (moto):
compression, rows per file, names that never collide, atomic writes, fast and clear errors."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import time
import uuid

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from capjob.config import SinkConfig, SinkFormat
from capjob.errors import SinkError
from capjob.schema import block_digest, CAPTIONS, QUARANTINE
from capjob.stages.sinks import CaptionSink
from capjob.stages.tables import TableWriter
from helpers.config import REPO
from helpers.s3server import free_port


def captions(n: int, start: int = 0, run_id: str = "run") -> pa.Table:
    ids = [f"img-{i:05d}" for i in range(start, start + n)]
    return pa.table({
        "id": ids,
        "source_key": [f"s3://b/{i}.jpg" for i in ids],
        "caption": [f"a photo № {i} — with ünïcode" for i in range(start, start + n)],
        "prompt_tokens": pa.array(range(start, start + n), pa.int64()),
        "generated_tokens": pa.array([8] * n, pa.int64()),
        "label": pa.array([i % 10 for i in range(start, start + n)], pa.int64()),
        "raw": pa.array([b"\x00\xff", b"text"] * (n // 2) + [b"x"] * (n % 2), pa.binary()),
        "model": ["tiny"] * n,
        "run_id": [run_id] * n,
    })


def sink(path, fmt="parquet", compression=None, **kw) -> SinkConfig:
    compression = compression or ("snappy" if fmt == "parquet" else "none")
    return SinkConfig(path=str(path), format=SinkFormat(fmt), compression=compression, **kw)


@pytest.mark.parametrize("codec", ["snappy", "zstd", "gzip", "none"])
def test_parquet_compression(codec, tmp_path):
    writer = TableWriter(sink(tmp_path, "parquet", codec))
    path = writer.write(CAPTIONS, captions(4), "run-a")
    assert path.endswith("/captions/run-a.parquet")
    meta = pq.ParquetFile(path).metadata
    assert meta.row_group(0).column(0).compression == ("UNCOMPRESSED" if codec == "none" else codec.upper())
    assert writer.read(CAPTIONS).equals(captions(4))


@pytest.mark.parametrize("codec,suffix", [("none", ".jsonl"), ("gzip", ".jsonl.gz"), ("zstd", ".jsonl.zst")])
def test_jsonl_compression(codec, suffix, tmp_path):
    writer = TableWriter(sink(tmp_path, "jsonl", codec))
    path = writer.write(CAPTIONS, captions(4), "run-a")
    assert path.endswith(f"/captions/run-a{suffix}")
    raw = open(path, "rb").read()
    if codec == "gzip":
        raw = gzip.decompress(raw)  # a standard .gz file
    elif codec == "zstd":
        raw = pa.CompressedInputStream(pa.BufferReader(raw), "zstd").read()
    rows = [json.loads(line) for line in raw.decode("utf-8").splitlines()]
    assert [r["id"] for r in rows] == [f"img-{i:05d}" for i in range(4)]
    assert rows[1]["caption"] == "a photo № 1 — with ünïcode" and "ünïcode" in raw.decode("utf-8")  # UTF-8, not \u escapes
    assert rows[0]["label"] == 0 and rows[0]["raw"] == "base64:AP8=" and rows[1]["raw"] == "text"
    back = writer.read(CAPTIONS, columns=["id", "caption"])
    assert back.column("id").to_pylist() == [r["id"] for r in rows]


def test_jsonl_reader_finds_every_compression(tmp_path):
    """Resume reads the ids of earlier runs whatever their compression was."""
    TableWriter(sink(tmp_path, "jsonl", "gzip")).write(CAPTIONS, captions(2), "run-a")
    TableWriter(sink(tmp_path, "jsonl", "none")).write(CAPTIONS, captions(3, start=2), "run-b")
    assert sorted(TableWriter(sink(tmp_path, "jsonl", "zstd")).read(CAPTIONS, ["id"]).column("id").to_pylist()) == [
        f"img-{i:05d}" for i in range(5)]


@pytest.mark.parametrize("fmt,codec", [("jsonl", "snappy"), ("parquet", "bz2"), ("jsonl", "lz4")])
def test_unknown_compression_is_refused(fmt, codec, tmp_path):
    with pytest.raises(SinkError, match=r"sink\.compression: .* allowed: "):
        TableWriter(sink(tmp_path, fmt, codec))


def test_local_writes_are_atomic_and_leave_no_temporary_files(tmp_path, monkeypatch):
    writer = TableWriter(sink(tmp_path, "jsonl", "gzip"))
    writer.write(CAPTIONS, captions(3), "run-ok")
    assert sorted(os.listdir(tmp_path / CAPTIONS)) == ["run-ok.jsonl.gz"]

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        writer.write(CAPTIONS, captions(3, start=3), "run-crash")
    assert sorted(os.listdir(tmp_path / CAPTIONS)) == ["run-ok.jsonl.gz"]  # neither the file nor its temp
    monkeypatch.undo()
    # A leftover hidden temp (a killed writer) is never read back.
    (tmp_path / CAPTIONS / ".run-x.1234.tmp").write_bytes(b"half a file")
    assert writer.list_files(CAPTIONS) == [str(tmp_path / CAPTIONS / "run-ok.jsonl.gz")]


@pytest.fixture
def no_ledger(monkeypatch):
    """CaptionSink.write reports counts to the run's ledger actor; these tests run without Ray."""
    from capjob import metrics

    monkeypatch.setattr(metrics, "record_many", lambda *args, **kwargs: None)


def test_file_names_never_collide(tmp_path, no_ledger):
    cfg = sink(tmp_path, "parquet")
    block = captions(4)

    def written(run_id: str, table: pa.Table) -> set[str]:
        CaptionSink(cfg, run_id, "tiny").write([table], None)
        return set(os.listdir(tmp_path / CAPTIONS))

    first = written("20261123T000000Z-aaaaaa", block)
    second = written("20261123T000000Z-bbbbbb", block)  # another run, same rows: a new file
    assert len(second) == 2
    third = written("20261123T000000Z-bbbbbb", captions(4, start=4))  # another block (worker): a new file
    assert len(third) == 3
    retried = written("20261123T000000Z-bbbbbb", block)  # the same task retried: the same file
    assert retried == third and first < third
    assert all(name.endswith(f"-{block_digest(block.column('id').to_pylist())}.parquet") for name in first)


def test_engine_failures_go_to_quarantine(tmp_path, no_ledger):
    table = captions(3).append_column("__inference_error__", pa.array(["", "boom", ""]))
    stats = CaptionSink(sink(tmp_path, "jsonl"), "run", "tiny").write([table], None)
    assert (stats["captioned"], stats["quarantined"]) == (2, 1)
    writer = TableWriter(sink(tmp_path, "jsonl"))
    assert writer.read(CAPTIONS).num_rows == 2 and "__inference_error__" not in writer.read(CAPTIONS).column_names
    assert writer.read(QUARANTINE).column("reason").to_pylist() == ["engine: boom"]


def test_empty_captions_are_quarantined_and_counted(tmp_path, monkeypatch):
    """A caption with no words (end-of-sequence first) is no success: the postprocess marks it,
    the sink quarantines it with its own reason and counts it for the report and the metrics."""
    from capjob import metrics
    from capjob.config import CaptionConfig
    from capjob.schema import DATA_COLUMN, EMPTY_CAPTION
    from capjob.stages.caption.records import CaptionRecord

    record = CaptionRecord("tiny", "run", [], CaptionConfig())
    row = {"id": "i", "source_key": "k", "image_width": 8, "image_height": 8, "num_generated_tokens": 1}
    assert record({DATA_COLUMN: {**row, "generated_text": " \n"}})["__inference_error__"] == EMPTY_CAPTION
    assert record({DATA_COLUMN: {**row, "generated_text": "a cat"}})["__inference_error__"] == ""

    recorded = {}
    monkeypatch.setattr(metrics, "record_many", lambda run_id, key, counts: recorded.update(counts))
    table = captions(4).append_column("__inference_error__", pa.array(["", EMPTY_CAPTION, "boom", EMPTY_CAPTION]))
    stats = CaptionSink(sink(tmp_path), "run", "tiny").write([table], None)
    assert (stats["captioned"], stats["quarantined"]) == (1, 3)
    assert recorded["rejected:empty_caption"] == 2 and recorded["rejected:engine"] == 1
    writer = TableWriter(sink(tmp_path))
    assert writer.read(CAPTIONS).num_rows == 1
    reasons = dict(zip(writer.read(QUARANTINE).column("id").to_pylist(), writer.read(QUARANTINE).column("reason").to_pylist()))
    assert reasons["img-00002"] == "engine: boom"
    assert reasons["img-00001"] == reasons["img-00003"] == EMPTY_CAPTION


def test_all_null_pass_through_blocks_keep_the_column_type(tmp_path, no_ledger):
    """A block whose pass-through column is all null (Arrow's null type) is written with the
    source's type, else string: the sink's files stay readable together."""
    cfg = sink(tmp_path)
    CaptionSink(cfg, "run", "tiny").write([captions(2).append_column("reference", pa.array(["a", None]))], None)
    CaptionSink(cfg, "run", "tiny").write([captions(2, start=2).append_column("reference", pa.nulls(2))], None)
    CaptionSink(cfg, "run", "tiny", column_types={"score": pa.int64()}).write(
        [captions(2, start=4).append_column("reference", pa.nulls(2)).append_column("score", pa.nulls(2))], None)
    files = sorted((tmp_path / CAPTIONS).glob("*.parquet"))
    assert {pq.read_schema(f).field("reference").type for f in files} == {pa.string()}
    assert any(pq.read_schema(f).field("score").type == pa.int64() for f in files if "score" in pq.read_schema(f).names)
    assert pq.read_table(tmp_path / CAPTIONS).num_rows == 6


def test_rows_per_file_gathers_blocks(tmp_path):
    """sink.rows_per_file is Ray Data's min_rows_per_write: blocks are gathered until a file holds
    at least that many rows."""
    import ray

    assert CaptionSink(sink(tmp_path, rows_per_file=7), "r", "m").min_rows_per_write == 7
    assert CaptionSink(sink(tmp_path), "r", "m").min_rows_per_write is None
    from capjob import metrics

    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    try:
        ledger = metrics.start_ledger("test", "run")  # CaptionSink.write reports to it  # noqa: F841
        rows = captions(40).drop_columns(["raw"])
        for rows_per_file, out in ((10, tmp_path / "ten"), (None, tmp_path / "blocks")):
            cfg = sink(out, "jsonl", "gzip", rows_per_file=rows_per_file)
            s = CaptionSink(cfg, "run", "tiny")
            ray.data.from_arrow(rows).repartition(20).write_datasink(s)
            assert s.totals["captioned"] == 40
            writer = TableWriter(cfg)
            files = writer.list_files(CAPTIONS)
            per_file = [sum(1 for _ in gzip.open(f)) for f in files]
            assert sum(per_file) == 40 == writer.read(CAPTIONS).num_rows
            if rows_per_file:
                assert len(files) <= 4 and min(per_file) >= 10, per_file
            else:
                assert len(files) == 20
    finally:
        ray.shutdown()


# --- S3 -------------------------------------------------------------------------------------


def test_s3_round_trip_readable_with_s3fs_and_pyarrow(s3_env):
    bucket = s3_env.bucket(f"out-{uuid.uuid4().hex[:8]}")
    for fmt, codec in (("parquet", "zstd"), ("jsonl", "gzip")):
        cfg = sink(f"s3://{bucket}/run/{fmt}", fmt, codec)
        writer = TableWriter(cfg)
        writer.check_writable()
        assert s3_env.fs.find(f"{bucket}/run/{fmt}") == []  # the probe object is gone
        writer.write(CAPTIONS, captions(4), "run-a")
        writer.write(CAPTIONS, captions(2, start=4), "run-b")
        files = s3_env.fs.ls(f"{bucket}/run/{fmt}/captions")
        assert len(files) == 2
        if fmt == "parquet":
            table = pq.read_table(f"{bucket}/run/{fmt}/captions", filesystem=s3_env.fs)
            assert sorted(table.column("id").to_pylist()) == [f"img-{i:05d}" for i in range(6)]
        else:
            lines = gzip.decompress(s3_env.fs.cat(f"{bucket}/run/{fmt}/captions/run-a.jsonl.gz")).decode().splitlines()
            assert json.loads(lines[0])["id"] == "img-00000"
        assert writer.read(CAPTIONS).num_rows == 6


def test_s3_sink_errors(s3_env, s3_auth):
    t0 = time.monotonic()
    with pytest.raises(SinkError, match="bucket of 's3://missing-sink-bucket/out' does not exist"):
        TableWriter(sink("s3://missing-sink-bucket/out")).check_writable()
    assert not s3_env.fs.exists("missing-sink-bucket")  # never created behind the user's back
    with pytest.raises(SinkError, match="cannot reach the storage endpoint"):
        TableWriter(sink("s3://b/out", storage_options={"client_kwargs": {"endpoint_url": f"http://127.0.0.1:{free_port()}"}})).check_writable()
    with pytest.raises(SinkError, match="access to 's3://b/out' denied"):
        TableWriter(sink("s3://b/out", storage_options={"client_kwargs": {"endpoint_url": s3_auth.endpoint}})).check_writable()
    with pytest.raises(SinkError, match="sink.storage_options.secret: credentials are not accepted"):
        TableWriter(sink("s3://b/out", storage_options={"secret": "s3cr3t"}))
    assert time.monotonic() - t0 < 60


def test_cli_sink_errors_are_one_line_before_ray(s3, tmp_path):
    """The sink is checked first: no Ray, no model, seconds."""
    for overrides, expected in (
        (["sink.path=s3://missing-sink-bucket-cli/out"], "sink.path: the bucket of 's3://missing-sink-bucket-cli/out' does not exist"),
        (["sink=jsonl", f"sink.path={tmp_path}/o", "sink.compression=snappy"], "sink.compression: 'snappy' is not available for sink.format=jsonl"),
        (["sink.path=s3://b/o", "+sink.storage_options.secret=s3cr3t"], "sink.storage_options.secret: credentials are not accepted"),
    ):
        t0 = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", "capjob", "experiment=offline", *overrides],
            cwd=REPO, env={**os.environ, **s3.env()}, capture_output=True, text=True, timeout=120,
        )
        errors = [line for line in proc.stderr.splitlines() if line.startswith("capjob: error:")]
        assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert expected in errors[0], errors[0]
        assert "s3cr3t" not in proc.stdout + proc.stderr
        assert "Started a local Ray instance" not in proc.stdout + proc.stderr
        assert time.monotonic() - t0 < 90


def test_a_quarantine_row_keeps_its_reason_to_the_bound_and_every_column():
    """Every writer of quarantine rows (the image stage, the sink's engine failures, dedup's
    fill) goes through tables.quarantine_table: a reason longer than MAX_REASON_CHARS (an engine
    error with its traceback) is cut there, a shorter one is kept whole, a missing column is null."""
    from capjob.stages.tables import MAX_REASON_CHARS, QUARANTINE_SCHEMA, quarantine_table

    long = "engine_error: " + "x" * (3 * MAX_REASON_CHARS)
    table = quarantine_table([{"id": "a", "stage": "engine", "reason": long}, {"id": "b", "reason": "decode: truncated"},
                              {"id": "c", "reason": None}])
    assert table.schema == QUARANTINE_SCHEMA
    reasons = table.column("reason").to_pylist()
    assert reasons[0] == long[:MAX_REASON_CHARS] and len(reasons[0]) == MAX_REASON_CHARS
    assert reasons[1:] == ["decode: truncated", None]
    assert table.column("image_digest").to_pylist() == [None, None, None]
