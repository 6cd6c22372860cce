"""Sources without inference: every layout, local and on a real S3 server (moto), read through
capjob's read_source by a small local Ray; the errors a user can fix, in process and from the CLI."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import time
import uuid

import pytest

from capjob.config import DataConfig, SourceFormat, to_typed
from capjob.errors import CapjobError, ConfigError
from capjob.stages.sources import preflight, read_source
from helpers.config import REPO, compose
from helpers.iolayouts import (key_of, make_rows, upload, write_hf_parquet_dir, write_hf_save_to_disk, write_image_folder,
                       write_parquet, write_webdataset)
from helpers.s3server import free_port

N = 8
ROWS = make_rows(N, seed=3, formats=("jpg", "png", "webp"))
KEYS = {key_of(n) for n, _, _ in ROWS}
LABELS = {key_of(n): lab for n, _, lab in ROWS}
DATA = {key_of(n): b for n, b, _ in ROWS}


@pytest.fixture(scope="module")
def ray_local(s3_env, tmp_path_factory):
    """A small local Ray whose workers inherit the AWS_* variables of the s3 server."""
    import datasets
    import ray

    saved_cache = datasets.config.HF_DATASETS_CACHE
    datasets.config.HF_DATASETS_CACHE = str(tmp_path_factory.mktemp("hf-cache"))  # not the user's
    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    yield
    ray.shutdown()
    datasets.config.HF_DATASETS_CACHE = saved_cache


@pytest.fixture(scope="module")
def layouts(s3_env, tmp_path_factory) -> dict[str, str]:
    """Every layout written locally and uploaded to a bucket: name -> path or URL."""
    root = tmp_path_factory.mktemp("layouts")
    local = {
        "parquet": write_parquet(ROWS, root / "parquet", files=2),
        "parquet_bytes": write_parquet(ROWS, root / "parquet_bytes", files=1, image_as="bytes"),
        "hf_disk": write_hf_save_to_disk(ROWS, root / "hf_disk", dataset_dict=True),
        "hf_disk_single": write_hf_save_to_disk(ROWS, root / "hf_disk_single", dataset_dict=False),
        "hf_parquet": write_hf_parquet_dir(ROWS, root / "hf_parquet"),
        "image_folder": write_image_folder(ROWS, root / "image_folder"),
        "webdataset": write_webdataset(ROWS, root / "webdataset", shards=2),
    }
    bucket = s3_env.bucket(f"src-{uuid.uuid4().hex[:8]}")
    paths = {k: str(v) for k, v in local.items()}
    for name in ("parquet", "image_folder", "webdataset"):
        paths[f"s3_{name}"] = upload(local[name], s3_env.fs, f"s3://{bucket}/{name}")
    paths["s3_parquet_file"] = f"s3://{bucket}/parquet/part-00000.parquet"
    paths["bucket"] = bucket
    return paths


def read(**kwargs):
    kwargs["format"] = SourceFormat(kwargs["format"])
    source = read_source(DataConfig(**kwargs))
    return source, source.dataset.take_all()


def image_bytes(cell) -> bytes:
    return cell["bytes"] if isinstance(cell, dict) else cell


CASES = {
    # name: (layout, DataConfig kwargs, expected key column, expected num_rows)
    "parquet": ("parquet", dict(format="parquet", key_column="key", passthrough_columns=["label"]), "key", N),
    "parquet_bytes": ("parquet_bytes", dict(format="parquet", key_column="key", passthrough_columns=["label"]), "key", N),
    "s3_parquet": ("s3_parquet", dict(format="parquet", key_column="key", passthrough_columns=["label"]), "key", N),
    "hf_disk": ("hf_disk", dict(format="hf", key_column="key", passthrough_columns=["label"]), "key", N),
    "hf_disk_streaming": ("hf_disk_single", dict(format="hf", streaming=True, key_column="key", passthrough_columns=["label"]), "key", N),
    "hf_parquet": ("hf_parquet", dict(format="hf", key_column="key", passthrough_columns=["label"]), "key", N),
    "hf_parquet_streaming": ("hf_parquet", dict(format="hf", streaming=True, key_column="key", passthrough_columns=["label"]), "key", N),
    "image_folder": ("image_folder", dict(format="image_folder"), "path", N),
    "s3_image_folder": ("s3_image_folder", dict(format="image_folder"), "path", N),
    "webdataset": ("webdataset", dict(format="webdataset", passthrough_columns=["cls", "json"]), "__key__", N),
    "s3_webdataset": ("s3_webdataset", dict(format="webdataset", passthrough_columns=["cls", "json"]), "__key__", N),
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_layout_reads_every_row(case, ray_local, layouts):
    layout, kwargs, key_column, _ = CASES[case]
    source, rows = read(path=layouts[layout], **kwargs)
    assert len(rows) == N
    assert source.key_column == key_column
    keys = [str(r[key_column]) for r in rows]
    stems = {pathlib.PurePosixPath(k).name.rsplit(".", 1)[0] for k in keys}
    assert stems == KEYS, keys
    for row in rows:
        stem = pathlib.PurePosixPath(str(row[key_column])).name.rsplit(".", 1)[0]
        assert image_bytes(row[source.image_column]) == DATA[stem]  # the original bytes, undecoded
        if "label" in source.passthrough_columns:
            assert row["label"] == LABELS[stem]
        if "cls" in source.passthrough_columns:
            assert row["cls"] == LABELS[stem] and f'"key": "{stem}"' in row["json"]
    if layout.startswith("hf"):  # only the wanted columns are read
        assert set(rows[0]) == {"image", "key", "label"}


def test_row_counts_known_where_cheap(ray_local, layouts):
    assert read(format="hf", path=layouts["hf_disk"], key_column="key")[0].num_rows == N
    assert read(format="hf", path=layouts["hf_parquet"], streaming=True)[0].num_rows is None
    assert read(format="parquet", path=layouts["parquet"])[0].num_rows is None
    assert read(format="parquet", path=layouts["parquet"], limit=5)[0].num_rows == 5  # the plan's upper bound
    assert read(format="image_folder", path=layouts["s3_image_folder"])[0].num_rows == N  # listed anyway


@pytest.mark.parametrize(
    "layout,kwargs",
    [
        ("parquet", dict(format="parquet")),
        ("hf_disk", dict(format="hf")),
        ("hf_parquet", dict(format="hf", streaming=True)),
        ("s3_image_folder", dict(format="image_folder")),
        ("webdataset", dict(format="webdataset")),
    ],
)
def test_limit(layout, kwargs, ray_local, layouts):
    source, rows = read(path=layouts[layout], limit=3, **kwargs)
    assert len(rows) == 3
    assert source.num_rows == 3


def test_shuffle_with_a_seed_keeps_every_row(ray_local, layouts):
    _, rows = read(format="parquet", path=layouts["parquet"], key_column="key", shuffle_seed=7)
    assert sorted(r["key"] for r in rows) == sorted(KEYS)
    _, limited = read(format="hf", path=layouts["hf_disk"], key_column="key", shuffle_seed=7, limit=4)
    assert len(limited) == 4 and {r["key"] for r in limited} <= KEYS


def test_single_parquet_file_on_s3_and_path_column(ray_local, layouts, tmp_path):
    source, rows = read(format="parquet", path=layouts["s3_parquet_file"], key_column="key")
    assert len(rows) == N // 2
    # An image column holding URLs: read as strings, fetched by the image stage with fsspec.
    import pyarrow as pa
    import pyarrow.parquet as pq

    from capjob.stages.sources.cells import Fetcher

    folder = layouts["s3_image_folder"]
    urls = [f"{folder}/cls_{lab % 2}/{'nested/' if i % 2 else ''}{name}" for i, (name, _, lab) in enumerate(ROWS)]
    (tmp_path / "urls").mkdir()
    pq.write_table(pa.table({"url": urls}), tmp_path / "urls" / "part-0.parquet")
    source, rows = read(format="parquet", path=str(tmp_path / "urls"), image_column="url")
    assert sorted(r["url"] for r in rows) == sorted(urls)
    assert Fetcher().get(urls[0]) == ROWS[0][1]


# --- errors, in process ---------------------------------------------------------------------


def fails(match: str, **kwargs) -> str:
    """Both the preflight (no Ray: what the CLI runs before starting anything) and read_source
    fail with the same one-line message, in seconds."""
    kwargs["format"] = SourceFormat(kwargs["format"])
    messages = []
    for check in (preflight, read_source):
        t0 = time.monotonic()
        with pytest.raises(CapjobError) as e:
            check(DataConfig(**kwargs))
        messages.append(str(e.value))
        assert match in messages[-1], messages[-1]
        assert "\n" not in messages[-1]
        assert time.monotonic() - t0 < 30, "errors must come fast"
    assert messages[0] == messages[1]
    return messages[0]


@pytest.mark.parametrize("fmt", ["parquet", "hf", "image_folder", "webdataset"])
def test_missing_local_path(fmt, ray_local, tmp_path):
    fails("does not exist", format=fmt, path=str(tmp_path / "nope"))


def test_missing_bucket_and_prefix(ray_local, layouts):
    fails("bucket 'no-such-bucket-x' of 's3://no-such-bucket-x/data' does not exist", format="parquet", path="s3://no-such-bucket-x/data")
    fails("does not exist", format="image_folder", path=f"s3://{layouts['bucket']}/no/such/prefix")


@pytest.mark.parametrize(
    "layout,kwargs,key",
    [
        ("parquet", dict(format="parquet", image_column="jpg"), "data.image_column"),
        ("s3_parquet", dict(format="parquet", key_column="uid"), "data.key_column"),
        ("hf_disk", dict(format="hf", passthrough_columns=["caption"]), "data.passthrough_columns"),
        ("hf_parquet", dict(format="hf", streaming=True, image_column="jpg"), "data.image_column"),
        ("webdataset", dict(format="webdataset", passthrough_columns=["txt"]), "data.passthrough_columns"),
        ("image_folder", dict(format="image_folder", passthrough_columns=["label"]), "data.passthrough_columns"),
    ],
)
def test_missing_column_names_the_key_and_the_columns(layout, kwargs, key, ray_local, layouts):
    message = fails(key, path=layouts[layout], **kwargs)
    assert "available columns" in message


def test_missing_split(ray_local, layouts):
    fails("data.split", format="hf", path=layouts["hf_disk"], split="validation")


def test_unreachable_endpoint_fails_fast(ray_local):
    options = {"client_kwargs": {"endpoint_url": f"http://127.0.0.1:{free_port()}"}}
    fails("cannot reach the storage endpoint", format="parquet", path="s3://bucket/data", storage_options=options)


def test_wrong_credentials(ray_local, s3_auth):
    options = {"client_kwargs": {"endpoint_url": s3_auth.endpoint}}
    fails("access to 's3://bucket/data' denied", format="webdataset", path="s3://bucket/data", storage_options=options)


@pytest.mark.parametrize("option", [{"secret": "x"}, {"key": "AKIA"}, {"client_kwargs": {"aws_secret_access_key": "x"}}, {"token": "t"}])
def test_credentials_in_config_are_refused(option):
    with pytest.raises(ConfigError, match="credentials are not accepted"):
        read_source(DataConfig(format=SourceFormat.parquet, path="s3://b/x", storage_options=option))


def test_endpoint_option_composes():
    cfg = to_typed(compose(["dataset=parquet", "data.path=s3://b/x", "+data.storage_options.client_kwargs.endpoint_url=http://127.0.0.1:9000"]))
    assert cfg.data.storage_options == {"client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}}
    cfg = to_typed(compose(["sink=jsonl", "sink.path=s3://b/out", "+sink.storage_options={client_kwargs: {endpoint_url: 'http://h:1'}}"]))
    assert cfg.sink.storage_options["client_kwargs"]["endpoint_url"] == "http://h:1"


@pytest.mark.parametrize("option", ["imagenet_hf", "image_folder", "webdataset", "parquet", "blip3o"])
def test_dataset_options(option):
    cfg = to_typed(compose([f"dataset={option}", "data.path=s3://bucket/x"]))
    assert cfg.data.name == option and cfg.data.format.value in {"hf", "image_folder", "webdataset", "parquet"}
    if option == "imagenet_hf":
        assert (cfg.data.image_column, cfg.data.passthrough_columns) == ("image", ["label"])


def test_automatic_partitions_are_a_multiple_of_the_workers():
    from capjob.plan import partitioning

    cfg = to_typed(compose(["experiment=offline", "resources.concurrency=3"]))
    rows, blocks, note = partitioning(cfg.data, cfg.engine, cfg.resources, 1200)
    assert -(-1200 // rows) >= cfg.data.partitions_per_worker * 3 and "automatic" in note
    cfg = to_typed(compose(["experiment=offline", "data.partitions=5"]))
    assert partitioning(cfg.data, cfg.engine, cfg.resources, 100)[0] == 20 and partitioning(cfg.data, cfg.engine, cfg.resources, None)[1] == 5


# --- errors from the CLI: one line, exit 2, before any inference ----------------------------


def capjob_cli(*overrides: str, env: dict[str, str], tmp_path: pathlib.Path) -> subprocess.CompletedProcess:
    # model.source: a model is never loaded when the input fails, so skip building the tiny one.
    cmd = [sys.executable, "-m", "capjob", "experiment=offline",
           f"sink.path={tmp_path}/out", *overrides]
    return subprocess.run(cmd, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1", **env},
                          capture_output=True, text=True, timeout=240)


def assert_one_error_line(proc: subprocess.CompletedProcess, *expected: str) -> str:
    errors = [line for line in proc.stderr.splitlines() if line.startswith("capjob: error:")]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "vLLM" not in proc.stdout + proc.stderr.replace(errors[0], "")  # no engine was started
    for text in expected:
        assert text in errors[0], errors[0]
    return errors[0]


def test_cli_unreachable_endpoint(s3, tmp_path):
    env = s3.env(AWS_ENDPOINT_URL=f"http://127.0.0.1:{free_port()}")
    t0 = time.monotonic()
    proc = capjob_cli("dataset=parquet", "data.path=s3://bucket/images", env=env, tmp_path=tmp_path)
    assert_one_error_line(proc, "cannot reach the storage endpoint", "s3://bucket/images")
    assert time.monotonic() - t0 < 120


def test_cli_missing_bucket(s3, tmp_path):
    proc = capjob_cli("dataset=webdataset", "data.path=s3://missing-bucket-cli/shards", env=s3.env(), tmp_path=tmp_path)
    assert_one_error_line(proc, "bucket 'missing-bucket-cli'", "does not exist")


def test_cli_wrong_credentials(s3_auth, tmp_path):
    proc = capjob_cli("dataset=image_folder", "data.path=s3://bucket/images", env=s3_auth.env(AWS_SECRET_ACCESS_KEY="wrong"), tmp_path=tmp_path)
    assert_one_error_line(proc, "access to 's3://bucket/images' denied", "AWS_ACCESS_KEY_ID")


def test_cli_missing_column(s3_env, layouts, tmp_path):
    proc = capjob_cli("dataset=parquet", f"data.path={layouts['s3_parquet']}", "data.image_column=jpg",
                      env=s3_env.env(), tmp_path=tmp_path)
    assert_one_error_line(proc, "data.image_column: column 'jpg' not in the dataset", "'image'", "'label'")


def test_cli_missing_local_path(tmp_path):
    proc = capjob_cli("dataset=image_folder", f"data.path={tmp_path}/nope", env={}, tmp_path=tmp_path)
    assert_one_error_line(proc, f"data.path '{tmp_path}/nope' does not exist")


def test_read_bench_runs(tmp_path):
    """bench/read_bench.py on a handful of images (no timing checks)."""
    out = tmp_path / "read.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "read_bench.py"), "--images", "6", "--repeats", "1",
                           "--shards", "2", "--json", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "| webdataset | S3 (moto, 127.0.0.1) | 6 |" in proc.stdout
    result = __import__("json").loads(out.read_text())
    assert len(result["rows"]) == 8 and all(r["rows"] == 6 and r["rows_per_s"] > 0 for r in result["rows"])


def test_storage_options_endpoint_reaches_the_ray_workers(ray_local, tmp_path):
    """data.storage_options.client_kwargs.endpoint_url wins over AWS_ENDPOINT_URL, in the
    driver's checks and in Ray's read tasks alike (the fsspec filesystem is pickled into them)."""
    from helpers.s3server import S3Server

    with S3Server() as other:  # the environment still points at the session's server
        other.bucket("elsewhere")
        url = upload(write_parquet(ROWS, tmp_path / "pq", files=2), other.fs, "s3://elsewhere/pq")
        options = {"client_kwargs": {"endpoint_url": other.endpoint}}
        for fmt in ("parquet", "webdataset"):
            if fmt == "webdataset":
                url = upload(write_webdataset(ROWS, tmp_path / "wds"), other.fs, "s3://elsewhere/wds")
            _, rows = read(format=fmt, path=url, storage_options=options)
            assert len(rows) == N


def test_remote_errors_name_the_cause_whatever_the_port():
    from capjob.stages.storage import describe_remote_error

    unreachable = OSError('Could not connect to the endpoint URL: "http://127.0.0.1:38403/bucket/data"')
    assert describe_remote_error("s3://bucket/data", unreachable).startswith("cannot reach the storage endpoint")
    forbidden = OSError("An error occurred (403) when calling the HeadObject operation: Forbidden")
    assert describe_remote_error("s3://bucket/data", forbidden).startswith("access to 's3://bucket/data' denied")


# --- issue 17: items seen = rows + skipped, through Ray and the run's ledger -----------------


def _ledger_read(cfg: DataConfig):
    import ray

    from capjob import metrics
    from capjob.stages.sources.common import ITEMS_COUNTER, skipped_totals

    run_id = f"t{uuid.uuid4().hex[:8]}"
    ledger = metrics.start_ledger("test", run_id)
    source = read_source(cfg, run_id)
    rows = source.dataset.take_all()
    totals = ray.get(ledger.totals.remote())
    ray.kill(ledger)
    return source, rows, totals.get(ITEMS_COUNTER, 0), skipped_totals(totals)


@pytest.mark.parametrize("layout", ["image_folder", "s3_image_folder"])
def test_image_folder_items_seen_are_rows_plus_skipped(layout, ray_local, layouts):
    source, rows, items, skipped = _ledger_read(DataConfig(format=SourceFormat.image_folder, path=layouts[layout]))
    assert len(rows) == N and items == N + 3  # README.txt, labels.json, .thumbnails/<image>
    assert skipped == {"not an image (.txt)": 1, "not an image (.json)": 1, "hidden file": 1}
    assert all(image_bytes(r["image"]) == DATA[pathlib.PurePosixPath(r["path"]).stem] for r in rows)


def test_webdataset_items_seen_are_rows_plus_skipped(ray_local, tmp_path):
    import io
    import tarfile

    root = write_webdataset(ROWS, tmp_path / "wds", shards=2)
    with tarfile.open(root / "shard-00002.tar", "w") as tar:  # a sample without an image, dotted names
        for name, data in [("lonely.cls", b"1"), ("2023.05.01_a.jpg", ROWS[0][1]), ("2023.05.02_b.jpg", ROWS[1][1])]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (root / "index.json").write_text("{}")
    source, rows, items, skipped = _ledger_read(DataConfig(format=SourceFormat.webdataset, path=str(root)))
    keys = sorted(r["__key__"] for r in rows)
    assert len(rows) == N + 2 and len(set(keys)) == len(keys)
    assert "shard-00002.tar/2023.05.01_a" in keys and "shard-00002.tar/2023.05.02_b" in keys
    assert skipped == {"sample without an image (members: cls)": 1, "not a tar shard (.json)": 1}
    assert items == len(rows) + 2


def test_ragged_rows_carry_every_passthrough_column_in_every_block(ray_local, tmp_path):
    """Issue 31, case 5: a block none of whose rows has a pass-through field still carries it
    (null), in every format whose rows can lack one; items seen = rows + skipped."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from helpers.iolayouts import write_tar

    def blocks(source):
        return list(source.dataset.iter_batches(batch_size=None, batch_format="pyarrow"))

    (tmp_path / "pq").mkdir()
    pq.write_table(pa.table({"image": [ROWS[0][1]], "key": ["a"]}), tmp_path / "pq" / "part-0.parquet")
    pq.write_table(pa.table({"image": [ROWS[1][1]], "key": ["b"], "txt": ["cap b"]}), tmp_path / "pq" / "part-1.parquet")
    source = read_source(DataConfig(format=SourceFormat.parquet, path=str(tmp_path / "pq"), key_column="key", passthrough_columns=["txt"]))
    assert all(b.schema.field("txt").type == pa.string() for b in blocks(source))
    assert sorted((r["key"], r["txt"]) for r in source.dataset.take_all()) == [("a", None), ("b", "cap b")]

    write_tar(tmp_path / "wds" / "shard-0.tar", [("x.txt", b"caption only"), ("x.json", b"{}")])
    write_tar(tmp_path / "wds" / "shard-1.tar", [("a.jpg", ROWS[0][1])])
    write_tar(tmp_path / "wds" / "shard-2.tar", [("b.jpg", ROWS[1][1]), ("b.txt", b"cap b"), ("b.cls", b"4"), ("c.txt", b"orphan")])
    cfg = DataConfig(format=SourceFormat.webdataset, path=str(tmp_path / "wds"), passthrough_columns=["txt", "cls"])
    preflight(cfg)
    source, rows, items, skipped = _ledger_read(cfg)
    for b in blocks(read_source(cfg)):
        assert b.schema.field("txt").type == pa.string() and b.schema.field("cls").type == pa.int64()
    assert sorted((r["__key__"], r["txt"], r["cls"]) for r in rows) == [("shard-1.tar/a", None, None), ("shard-2.tar/b", "cap b", 4)]
    assert skipped == {"sample without an image (members: json, txt)": 1, "sample without an image (members: txt)": 1}
    assert items == len(rows) + 2 == 4


def test_list_of_images_exploded_through_read_source(ray_local, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    images = pa.array([[{"bytes": ROWS[0][1], "path": None}, {"bytes": ROWS[1][1], "path": None}], [{"bytes": ROWS[2][1], "path": None}], []],
                      pa.list_(struct))
    (tmp_path / "lists").mkdir()
    pq.write_table(pa.table({"images": images, "key": ["a", "b", "c"]}), tmp_path / "lists" / "p.parquet")
    base = dict(format=SourceFormat.parquet, path=str(tmp_path / "lists"), image_column="images", key_column="key")
    source = read_source(DataConfig(**base, explode_images=True))
    rows = source.dataset.take_all()
    assert sorted(r[source.key_column] for r in rows) == ["a#0", "a#1", "b#0", "c#0"]
    by_key = {r[source.key_column]: r["images"] for r in rows}
    assert by_key["a#1"]["bytes"] == ROWS[1][1] and by_key["c#0"] is None
    source = read_source(DataConfig(**base, image_index=0))
    assert sorted((r[source.key_column], r["images"] is not None) for r in source.dataset.take_all()) == [("a#0", True), ("b#0", True), ("c#0", False)]


def test_cli_list_of_images_fails_before_ray(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "multi").mkdir()
    pq.write_table(pa.table({"images": pa.array([[ROWS[0][1], ROWS[1][1]]], pa.list_(pa.binary())), "id": ["a"]}),
                   tmp_path / "multi" / "p.parquet")
    proc = capjob_cli("dataset=parquet", f"data.path={tmp_path}/multi", "data.image_column=images", env={}, tmp_path=tmp_path)
    assert_one_error_line(proc, "data.image_column: 'images'", "holds a list of images", "data.image_index=N", "data.explode_images=true")
