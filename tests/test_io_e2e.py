"""End to end on CPU, data in and out: every source layout and every sink (parquet/JSONL, local
and S3 on a real S3-compatible server) through the real pipeline (Ray Data + Ray Data LLM +
vLLM CPU, tiny model). Each run costs 1.5 to 2 minutes on a small machine, so six runs cover
every source layout and every sink format, each sink format both local and on S3, and the
parquet layout both local and on S3 (the HF layouts local: the hub is out of reach; every
layout is read both local and on S3 without the engine in test_sources.py):

    source                           parquet sink            jsonl sink
    hf save_to_disk (local)                                  S3
    hf parquet folder, streaming     S3
    parquet                          S3 -> S3
    parquet of real cells (local)    local -> local
    image folder                                             S3 -> S3 (gzip)
    webdataset (tar shards)                                  S3 -> local
    webdataset: caption-only shard, ragged members           local -> local
"""

from __future__ import annotations

import gzip
import json
import os
import pathlib
import subprocess
import sys
import uuid

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers.config import REPO
from helpers.iolayouts import key_of, make_rows, upload, write_hf_parquet_dir, write_hf_save_to_disk, write_image_folder, write_parquet, write_webdataset

pytestmark = pytest.mark.e2e

N = 6
ROWS = make_rows(N, seed=11, size=(160, 120), formats=("jpg", "png", "webp"))
KEYS = {key_of(n) for n, _, _ in ROWS}
LABELS = {key_of(n): lab for n, _, lab in ROWS}


@pytest.fixture(scope="module")
def bucket(s3) -> str:
    return s3.bucket(f"e2e-{uuid.uuid4().hex[:8]}")


def capjob(s3, tmp_path: pathlib.Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, **s3.env(), "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "hf-cache")}
    proc = subprocess.run(
        [sys.executable, "-m", "capjob", "experiment=offline", "caption.max_tokens=8", *overrides],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def read_local(folder: pathlib.Path) -> pa.Table:
    tables = [pq.read_table(f) for f in sorted(folder.glob("*.parquet"))]
    rows = []
    for f in sorted(folder.glob("*.jsonl*")):
        text = gzip.decompress(f.read_bytes()) if f.name.endswith(".gz") else f.read_bytes()
        rows += [json.loads(line) for line in text.decode().splitlines()]
    return pa.concat_tables(tables) if tables else pa.Table.from_pylist(rows)


def read_s3(s3, url: str) -> pa.Table:
    """Read back with s3fs / pyarrow only (not with capjob's own reader)."""
    prefix = url.split("://", 1)[1]
    files = [f for f in s3.fs.find(prefix) if not f.rsplit("/", 1)[-1].startswith((".", "_"))]
    if all(f.endswith(".parquet") for f in files):
        return pq.read_table(files, filesystem=s3.fs)
    rows = []
    for f in files:
        data = s3.fs.cat(f)
        text = gzip.decompress(data) if f.endswith(".gz") else data
        rows += [json.loads(line) for line in text.decode().splitlines()]
    return pa.Table.from_pylist(rows)


def check(captions: pa.Table, ids: set[str], label_column: str | None = "label") -> None:
    assert captions.num_rows == N, captions.num_rows
    key_part = lambda i: i.rsplit("#", 1)[0]  # noqa: E731 - ids are <key>#<content digest>
    assert {key_part(i) for i in captions.column("id").to_pylist()} == {key_part(i) for i in ids}
    assert all(c.strip() for c in captions.column("caption").to_pylist())
    assert min(captions.column("generated_tokens").to_pylist()) > 0
    assert set(captions.column("model").to_pylist()) == {"tiny_qwen25vl"}
    assert "image" not in captions.column_names
    if label_column:
        # A webdataset key is <shard>/<sample key>: compare by the sample key.
        by_key = dict(zip((pathlib.PurePosixPath(k).name for k in captions.column("source_key").to_pylist()),
                          captions.column(label_column).to_pylist()))
        assert {k: int(v) for k, v in by_key.items()} == LABELS


def test_hf_save_to_disk_to_jsonl_on_s3(s3, bucket, tmp_path):
    data = write_hf_save_to_disk(ROWS, tmp_path / "hf")
    out = f"s3://{bucket}/out/hf-to-jsonl"
    capjob(s3, tmp_path, "dataset=imagenet_hf", f"data.path={data}", "data.streaming=false", "data.key_column=key",
           "sink=jsonl", f"sink.path={out}")
    files = s3.fs.find(f"{bucket}/out/hf-to-jsonl/captions")
    assert files and all(f.endswith(".jsonl") for f in files), files
    check(read_s3(s3, f"{out}/captions"), KEYS)


def test_parquet_on_s3_to_parquet_on_s3(s3, bucket, tmp_path):
    data = upload(write_parquet(ROWS, tmp_path / "pq", files=2), s3.fs, f"s3://{bucket}/in/parquet")
    out = f"s3://{bucket}/out/parquet-to-parquet"
    proc = capjob(s3, tmp_path, "dataset=parquet", f"data.path={data}", "data.key_column=key",
                  "data.passthrough_columns=[label]", "sink.compression=zstd", f"sink.path={out}")
    check(read_s3(s3, f"{out}/captions"), KEYS)
    assert f"{out}/captions" in proc.stdout
    assert s3.fs.find(f"{bucket}/out/parquet-to-parquet/reports")  # the run report went to S3 too
    assert not s3.fs.find(f"{bucket}/out/parquet-to-parquet/quarantine")


def test_image_folder_on_s3_to_jsonl_gzip_on_s3(s3, bucket, tmp_path):
    data = upload(write_image_folder(ROWS, tmp_path / "imgs"), s3.fs, f"s3://{bucket}/in/images")
    out = f"s3://{bucket}/out/folder-to-jsonl"
    capjob(s3, tmp_path, "dataset=image_folder", f"data.path={data}", "sink=jsonl", "sink.compression=gzip",
           f"sink.path={out}")
    assert all(f.endswith(".jsonl.gz") for f in s3.fs.find(f"{bucket}/out/folder-to-jsonl/captions"))
    captions = read_s3(s3, f"{out}/captions")
    check(captions, {i for i in captions.column("id").to_pylist()}, label_column=None)
    # An image file's key is its path in the bucket.
    assert {pathlib.PurePosixPath(i).stem for i in captions.column("id").to_pylist()} == KEYS
    assert all(i.startswith(f"{bucket}/in/images/cls_") for i in captions.column("source_key").to_pylist())


def wds_ids(shards: int = 2) -> set[str]:
    """Ids of write_webdataset's samples: <shard>/<key>, unique across shards."""
    return {f"shard-{i % shards:05d}.tar/{key_of(n)}" for i, (n, _, _) in enumerate(ROWS)}


def test_hf_parquet_folder_streaming_to_parquet_on_s3(s3, bucket, tmp_path):
    data = write_hf_parquet_dir(ROWS, tmp_path / "hub-layout", shards=2)
    out = f"s3://{bucket}/out/hf-stream"
    capjob(s3, tmp_path, "dataset=imagenet_hf", f"data.path={data}", "data.streaming=true", "data.key_column=key",
           "data.limit=100", f"sink.path={out}", f"+sink.storage_options.client_kwargs.endpoint_url={s3.endpoint}")
    check(read_s3(s3, f"{out}/captions"), KEYS)


def test_webdataset_on_s3_to_jsonl_local(s3, bucket, tmp_path):
    """Also issue 17: a shard whose member names carry dots and one sample without an image (it
    once failed the run after the engine started) -- the two dotted images are captioned as two
    rows, the sample without an image and a stray file are counted as skipped in the report."""
    import io
    import tarfile

    data = write_webdataset(ROWS, tmp_path / "wds", shards=2)
    with tarfile.open(data / "shard-00002.tar", "w") as tar:
        for name, member in [("2023.05.01_beach.jpg", ROWS[0][1]), ("2023.05.01_beach.cls", b"1"),
                             ("2023.05.02_dog.jpg", ROWS[1][1]), ("2023.05.02_dog.cls", b"2"), ("lonely.cls", b"3")]:
            info = tarfile.TarInfo(name)
            info.size = len(member)
            tar.addfile(info, io.BytesIO(member))
    (data / "README.md").write_text("shards\n")
    url = upload(data, s3.fs, f"s3://{bucket}/in/wds")
    capjob(s3, tmp_path, "dataset=webdataset", f"data.path={url}", "data.passthrough_columns=[cls]",
           "sink=jsonl", f"sink.path={tmp_path}/out", "sink.rows_per_file=4", "job.run_id=wds-run")
    captions = read_local(tmp_path / "out" / "captions")
    dotted = {"shard-00002.tar/2023.05.01_beach", "shard-00002.tar/2023.05.02_dog"}
    # ids are <key>#<content digest> (stages/ids.py): the keys are the webdataset keys.
    assert set(captions.column("source_key").to_pylist()) == wds_ids() | dotted
    assert all(i.startswith(k + "#") for i, k in zip(captions.column("id").to_pylist(), captions.column("source_key").to_pylist()))
    cls = dict(zip(captions.column("source_key").to_pylist(), captions.column("cls").to_pylist()))
    assert {int(cls[k]) for k in dotted} == {1, 2}
    import pyarrow.compute as pc

    check(captions.filter(pc.is_in(captions.column("source_key"), pa.array(sorted(wds_ids())))), wds_ids(), label_column="cls")
    sizes = [len(f.read_text().splitlines()) for f in (tmp_path / "out" / "captions").glob("*.jsonl")]
    assert sum(sizes) == N + 2 and len(sizes) <= 3, sizes  # blocks gathered into files of >= 4 rows
    report = json.loads((tmp_path / "out" / "reports" / "wds-run" / "report.json").read_text())
    assert report["skipped_by_source"] == {"sample without an image (members: cls)": 1, "not a tar shard (.md)": 1}
    assert report["source_items"] == N + 2 + 2 and report["captioned"] == N + 2
    assert "| items seen = rows + skipped | 10 = 8 + 2" in (tmp_path / "out" / "reports" / "wds-run" / "report.md").read_text()


def test_webdataset_caption_only_shard_and_ragged_members_local(s3, tmp_path):
    """Issue 31, cases 3 and 5: shard 0 holds only text, JSON and tensor members (once refused in
    preflight); shard 1 holds images whose .txt/.cls members are ragged (once KeyError: 'txt' in a
    Ray task), and members whose key joins no image. Every image is captioned, each pass-through
    value is its sample's or null, every skipped sample is counted with the members it held, and
    the report's items seen = rows read + skipped."""
    from helpers.iolayouts import write_tar

    data = tmp_path / "wds"
    write_tar(data / "shard-00000.tar", [("m0.txt", b"caption only"), ("m0.json", b"{}"), ("m0.npy", b"\x93NUMPY\x01\x00"),
                                         ("m1.txt", b"another"), ("m1.json", b"{}")])
    images = [b for _, b, _ in ROWS]
    write_tar(data / "shard-00001.tar", [
        ("a.jpg", images[0]), ("a.txt", b"cap a"),
        ("b.png", images[1]), ("b.cls", b"2"),
        ("c.webp", images[2]), ("c.txt", b"cap c"), ("c.cls", b"3"),
        ("d.jpg", images[3]),
        ("e.txt", b"orphan"),                          # a key without an image
        ("f.jpg", images[4]), ("f_extra.txt", b"x"),  # key f_extra: not f's
    ])
    capjob(s3, tmp_path, "dataset=webdataset", f"data.path={data}", "data.passthrough_columns=[txt,cls]",
           "sink=jsonl", f"sink.path={tmp_path}/out", "job.run_id=ragged")
    captions = read_local(tmp_path / "out" / "captions")
    got = {k.rsplit("/", 1)[-1]: (t, c) for k, t, c in zip(*(captions.column(n).to_pylist() for n in ("source_key", "txt", "cls")))}
    assert got == {"a": ("cap a", None), "b": (None, 2), "c": ("cap c", 3), "d": (None, None), "f": (None, None)}
    assert all(c.strip() for c in captions.column("caption").to_pylist())
    run = tmp_path / "out" / "reports" / "ragged"
    report = json.loads((run / "report.json").read_text())
    assert report["skipped_by_source"] == {"sample without an image (members: json, npy, txt)": 1,
                                           "sample without an image (members: json, txt)": 1,
                                           "sample without an image (members: txt)": 2}
    assert report["captioned"] == report["rows_read"] == 5 and report["source_items"] == 5 + 4
    assert "| items seen = rows + skipped | 9 = 5 + 4 (sample without an image (members: json, npy, txt): 1; " in (run / "report.md").read_text()


def test_real_cells_parquet_local_to_parquet_local(s3, tmp_path):
    """Issue 17, cases 3, 5, 6 and 7 in one run: a parquet whose image cells are what real
    datasets hold -- a local path, base64 text, a data: URI, URLs on a
    local HTTP server (one answers 503 twice then the image, one 403, one HTML) -- while
    data.storage_options carries S3 options (they must not reach the HTTP fetches)."""
    import base64

    from helpers.httpserver import LocalHTTPServer

    names = [n for n, _, _ in ROWS]
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / names[0]).write_bytes(ROWS[0][1])
    with LocalHTTPServer({n: b for n, b, _ in ROWS}) as http:
        cells = {
            "path": str(tmp_path / "files" / names[0]),
            "base64": base64.b64encode(ROWS[1][1]).decode(),
            "data-uri": "data:image/png;base64," + base64.b64encode(ROWS[2][1]).decode(),
            "url": f"{http.url}/img/{names[3]}",
            "url-503-twice": f"{http.url}/flaky/2/{names[4]}",
            "url-403": f"{http.url}/status/403",
            "url-html": f"{http.url}/html",
        }
        (tmp_path / "pq").mkdir()
        pq.write_table(pa.table({"key": list(cells), "image": list(cells.values())}), tmp_path / "pq" / "part-0.parquet")
        capjob(s3, tmp_path, "dataset=parquet", f"data.path={tmp_path}/pq", "data.key_column=key",
               "+data.storage_options.client_kwargs.endpoint_url=http://127.0.0.1:9", "+data.storage_options.anon=true",
               "data.fetch.backoff_s=0.05", f"sink.path={tmp_path}/out", "job.run_id=cells-run")
        assert http.requests[f"/flaky/2/{names[4]}"] == 3 and http.requests["/status/403"] == 1
    captions = read_local(tmp_path / "out" / "captions")
    assert sorted(captions.column("source_key").to_pylist()) == ["base64", "data-uri", "path", "url", "url-503-twice"]
    quarantine = read_local(tmp_path / "out" / "quarantine")
    reasons = dict(zip(quarantine.column("source_key").to_pylist(), quarantine.column("reason").to_pylist()))
    assert reasons["url-403"].startswith("fetch: 403 Forbidden: http://127.0.0.1:")
    assert reasons["url-html"] == "not_an_image: looks like HTML/XML text"
    assert len(reasons) == 2


def test_llava_json_set_local_to_parquet_local(s3, tmp_path):
    """Issue 31, case 4: a LLaVA-Instruct set (helpers.iolayouts.write_llava_json) through
    dataset=llava_json: the text-only record is counted as skipped, the missing file and the
    unreachable URL are quarantined with their reasons, the record fields pass through with their
    structure, and the two records of one image are two rows of one content digest."""
    from helpers.iolayouts import write_llava_json

    path, records = write_llava_json(ROWS, tmp_path / "llava")
    capjob(s3, tmp_path, "dataset=llava_json", f"data.path={path}", "data.fetch.retries=0", f"sink.path={tmp_path}/out",
           "job.run_id=llava-run")
    captions = read_local(tmp_path / "out" / "captions")
    by_key = {r["source_key"]: r for r in captions.to_pylist()}
    assert sorted(by_key) == ["llava_instruct.json:0", "llava_instruct.json:1", "llava_instruct.json:4", "llava_instruct.json:6"]
    assert by_key["llava_instruct.json:1"]["source_id"] == "17" and by_key["llava_instruct.json:0"]["source_id"] == "000000000000"
    assert by_key["llava_instruct.json:1"]["conversations"] == records[1]["conversations"]
    assert pa.types.is_list(captions.schema.field("conversations").type)
    ids = {k: r for k, r in zip(captions.column("source_key").to_pylist(), captions.column("id").to_pylist())}
    assert ids["llava_instruct.json:0"].rsplit("#", 1)[1] == ids["llava_instruct.json:1"].rsplit("#", 1)[1]
    quarantine = read_local(tmp_path / "out" / "quarantine")
    reasons = dict(zip(quarantine.column("source_key").to_pylist(), quarantine.column("reason").to_pylist()))
    assert reasons == {"llava_instruct.json:3": f"fetch: not found: {tmp_path}/llava/coco/train2017/404.jpg",
                       "llava_instruct.json:5": "fetch: connection error (NewConnectionError): http://127.0.0.1:9/x.jpg"}
    report = json.loads((tmp_path / "out" / "reports" / "llava-run" / "report.json").read_text())
    assert report["skipped_by_source"] == {"record without an image": 1}
    assert report["source_items"] == 7 and report["captioned"] == 4 and report["quarantined"] == 2
    assert "| items seen = rows + skipped | 7 = 6 + 1 (record without an image: 1) |" in \
        (tmp_path / "out" / "reports" / "llava-run" / "report.md").read_text()


def test_img2dataset_url_shard_local_to_jsonl_local(s3, tmp_path):
    """Issue 31, case 6: a URL shard as img2dataset reads them (pandas, index=True: URL, TEXT,
    sha256hash, __index_level_0__) against a local HTTP server: a wrong digest is quarantined
    hash_mismatch, a null one is not checked, X-Robots-Tag noai/noimageai rows are counted as
    skipped (another robot's directive is not ours), and items seen = rows + skipped holds."""
    import hashlib
    import urllib.parse

    import pandas as pd

    from helpers.httpserver import LocalHTTPServer

    (n0, b0, _), (n1, b1, _), (n2, _, _) = ROWS[:3]
    wrong = hashlib.sha256(b"not the image").hexdigest()
    with LocalHTTPServer({n: b for n, b, _ in ROWS}) as http:
        robots = lambda value, name: f"{http.url}/robots/{urllib.parse.quote(value, safe='')}/{name}"  # noqa: E731
        frame = pd.DataFrame({
            "URL": [f"{http.url}/img/{n0}", f"{http.url}/img/{n1}", robots("noai", n2), robots("otherbot: noai", n0),
                    f"{http.url}/img/{n1}?again", robots("noindex, noimageai", n1)],
            "TEXT": [f"alt text {i}" for i in range(6)],
            "sha256hash": [hashlib.sha256(b0).hexdigest(), wrong, None, None, None, None],
        }, index=pd.Index(range(100, 106)))
        (tmp_path / "urls").mkdir()
        frame.to_parquet(tmp_path / "urls" / "00000.parquet", index=True)
        capjob(s3, tmp_path, "dataset=parquet", f"data.path={tmp_path}/urls", "data.image_column=URL", "data.key_column=__index_level_0__",
               "data.passthrough_columns=[TEXT]", "data.verify_hash_column=sha256hash", "data.fetch.retries=0", "sink=jsonl",
               f"sink.path={tmp_path}/out", "job.run_id=i2d-run")
    captions = {r["source_key"]: r for r in read_local(tmp_path / "out" / "captions").to_pylist()}
    assert sorted(captions) == ["100", "103", "104"]
    assert captions["100"]["TEXT"] == "alt text 0" and captions["100"]["sha256hash"] == hashlib.sha256(b0).hexdigest()
    quarantine = read_local(tmp_path / "out" / "quarantine")
    assert dict(zip(quarantine.column("source_key").to_pylist(), quarantine.column("reason").to_pylist())) == {
        "101": f"hash_mismatch: expected {wrong}, got {hashlib.sha256(b1).hexdigest()}"}
    report = json.loads((tmp_path / "out" / "reports" / "i2d-run" / "report.json").read_text())
    assert report["skipped_by_source"] == {"robots: noai": 1, "robots: noindex": 1}
    assert (report["source_items"], report["rows_read"], report["captioned"], report["quarantined"]) == (6, 4, 3, 1)
    assert "| items seen = rows + skipped | 6 = 4 + 2 (robots: noai: 1; robots: noindex: 1) |" in \
        (tmp_path / "out" / "reports" / "i2d-run" / "report.md").read_text()
