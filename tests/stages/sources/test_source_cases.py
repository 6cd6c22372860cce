"""Real datasets as they come (issue 17), without Ray or an engine: each layout's own functions
on small files this module writes, a local HTTP server (tests/httpserver.py) and moto S3.

One test per numbered case of the issue, and per format that items seen = rows + skipped."""

from __future__ import annotations

import base64
import io
import json
import pathlib
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from capjob.config import DataConfig, FetchConfig, ImagesConfig, SinkConfig, SourceFormat
from capjob.errors import SourceError
from capjob.schema import ImageRejected
from capjob.stages.images import decode_image
from capjob.stages.sources import hf, image_folder, preflight, webdataset
from capjob.stages.sources.cells import Fetcher, identity, resolve_batch, resolve_cell
from capjob.stages.sources.common import ITEM_COLUMN, SKIP_COLUMN, select_images
from capjob.stages.storage import options_for
from helpers.httpserver import LocalHTTPServer
from helpers.iolayouts import make_rows, write_tar

ROWS = make_rows(6, seed=5, formats=("jpg", "png", "webp"))
JPG = ROWS[0][1]
FAST = FetchConfig(retries=3, backoff_s=0.01, connect_timeout_s=2, read_timeout_s=1.0, concurrency=8)


@pytest.fixture(scope="module")
def http():
    with LocalHTTPServer({n: b for n, b, _ in ROWS}) as server:
        yield server


@pytest.fixture()
def hf_cache(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


def _decodes(data) -> bool:
    return not isinstance(data, ImageRejected) and decode_image(data, ImagesConfig(size=64)).pixels.ndim == 3


# --- 1. HF image folder: {bytes: None, path} cells ----------------------------------------


def write_hf_imagefolder(root: pathlib.Path) -> dict[str, bytes]:
    (root / "train").mkdir(parents=True)
    files = {}
    with open(root / "train" / "metadata.jsonl", "w") as meta:
        for i, (_, data, label) in enumerate(ROWS):
            name = f"{i:04d}.jpg" if i % 2 == 0 else f"{i:04d}.png"
            from PIL import Image

            im = Image.open(io.BytesIO(data)).convert("RGB")
            buf = io.BytesIO()
            im.save(buf, "JPEG" if name.endswith("jpg") else "PNG")
            (root / "train" / name).write_bytes(buf.getvalue())
            files[name] = buf.getvalue()
            meta.write(json.dumps({"file_name": name, "text": f"picture {i}"}) + "\n")
    return files


@pytest.mark.parametrize("streaming", [False, True])
def test_case1_hf_imagefolder_cells_are_read_from_their_path(tmp_path, hf_cache, streaming):
    files = write_hf_imagefolder(tmp_path / "ds")
    cfg = DataConfig(format=SourceFormat.hf, path=str(tmp_path / "ds"), image_column="image", streaming=streaming,
                     passthrough_columns=["text"])
    preflight(cfg)
    loaded = hf.load_hf(cfg, streaming)
    loaded = loaded.select_columns(["image", "text"])
    shard = loaded if streaming else loaded.to_iterable_dataset()
    cells = [c for t in hf._read_hf_shard(shard, None) for c in t.column("image").to_pylist()]
    assert len(cells) == len(files)
    assert all(c["bytes"] is None and c["path"] for c in cells)  # what datasets hands over
    resolved = resolve_batch(np.asarray(cells, dtype=object), Fetcher.from_config(cfg))
    assert sorted(resolved) == sorted(files.values())  # every image, read from its path
    assert all(_decodes(r) for r in resolved)


def test_case1_struct_path_on_s3_and_hf_style_urls(s3_env, http):
    s3_env.bucket("cells")
    s3_env.fs.pipe_file("cells/a/0000.jpg", JPG)
    fetcher = Fetcher()
    got = resolve_batch([{"bytes": None, "path": "s3://cells/a/0000.jpg"},
                         {"bytes": None, "path": f"{http.url}/img/{ROWS[1][0]}"},
                         {"bytes": None, "path": None}, {"bytes": b"", "path": "empty.jpg"}], fetcher)
    assert got[0] == JPG and got[1] == ROWS[1][1]
    assert isinstance(got[2], ImageRejected) and got[2].reason == "empty: no bytes and no path"
    assert got[3] == b""  # an empty file stays one: decode_image quarantines it as "empty: 0 bytes"


# --- 2. a column holding a list of images --------------------------------------------------


def write_list_parquet(path: pathlib.Path, item: str) -> pathlib.Path:
    path.mkdir(parents=True, exist_ok=True)
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    lists = [[ROWS[0][1], ROWS[1][1]], [ROWS[2][1]], []]
    if item == "struct":
        images = pa.array([[{"bytes": b, "path": None} for b in row] for row in lists], pa.list_(struct))
    else:
        images = pa.array(lists, pa.list_(pa.binary()))
    pq.write_table(pa.table({"images": images, "key": ["a", "b", "c"]}), path / "part-0.parquet")
    return path


@pytest.mark.parametrize("item", ["binary", "struct"])
def test_case2_image_lists_fail_in_preflight_naming_the_options(tmp_path, item):
    path = write_list_parquet(tmp_path / "lists", item)
    with pytest.raises(SourceError) as e:
        preflight(DataConfig(format=SourceFormat.parquet, path=str(path), image_column="images", key_column="key"))
    message = str(e.value)
    assert "holds a list of images" in message and "data.image_index" in message and "data.explode_images" in message
    assert "\n" not in message
    preflight(DataConfig(format=SourceFormat.parquet, path=str(path), image_column="images", image_index=0))
    preflight(DataConfig(format=SourceFormat.parquet, path=str(path), image_column="images", explode_images=True))
    single = _single_image_parquet(tmp_path / "single")
    with pytest.raises(SourceError, match="data.image_index: 'image' in .* is not a list of images"):
        preflight(DataConfig(format=SourceFormat.parquet, path=str(single), image_column="image", image_index=0))


def _single_image_parquet(path: pathlib.Path) -> pathlib.Path:
    path.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"image": pa.array([JPG], pa.binary())}), path / "part-0.parquet")
    return path


def test_case2_image_index_and_explode():
    lists = np.empty(3, dtype=object)
    lists[0], lists[1], lists[2] = np.array([b"A", b"B"], dtype=object), np.array([b"C"], dtype=object), np.array([], dtype=object)
    batch = {"images": lists, "key": np.array(["a", "b", "c"], dtype=object), "label": np.array([1, 2, 3])}
    second = select_images(batch, image_column="images", key_column="key", image_index=1, keyed_column="__image_key__")
    assert list(second["images"]) == [b"B", None, None]  # rows with fewer images: no image (quarantined as empty)
    assert list(second["__image_key__"]) == ["a#1", "b#1", "c#1"]
    rows = select_images(batch, image_column="images", key_column="key", image_index=None, keyed_column="__image_key__")
    assert list(rows["__image_key__"]) == ["a#0", "a#1", "b#0", "c#0"]
    assert list(rows["images"]) == [b"A", b"B", b"C", None]  # the empty list stays a row (never lost)
    assert list(rows["label"]) == [1, 1, 2, 3]
    # Without an option a list cell is that row's quarantine reason, not a TypeError in a task.
    reason = resolve_cell(lists[0])
    assert isinstance(reason, ImageRejected) and reason.kind == "unsupported" and "data.image_index" in reason.detail


# --- 3. base64 text and data: URIs ---------------------------------------------------------


def test_case3_base64_and_data_uris_are_decoded(tmp_path):
    b64 = base64.b64encode(JPG).decode()
    cells = [b64, f"data:image/jpeg;base64,{b64}", "data:image/png;base64," + base64.b64encode(ROWS[1][1]).decode(),
             b64[:40] + "\n" + b64[40:], base64.urlsafe_b64encode(JPG).decode().rstrip("=")]
    resolved = resolve_batch(cells, Fetcher())
    assert resolved == [JPG, JPG, ROWS[1][1], JPG, JPG]
    # A path or URL stays a location; a short text is not taken for base64.
    (tmp_path / "img").write_bytes(JPG)
    assert resolve_cell(str(tmp_path / "img")) == str(tmp_path / "img")
    assert resolve_cell("https://example.org/a.jpg") == "https://example.org/a.jpg"
    assert resolve_cell("abcd") == "abcd"


def test_case3_base64_jsonl_through_the_hf_loader(tmp_path, hf_cache):
    (tmp_path / "bench").mkdir()
    with open(tmp_path / "bench" / "test.jsonl", "w") as f:  # split "test", as datasets names it
        for i, (_, data, _) in enumerate(ROWS):
            f.write(json.dumps({"index": i, "image": base64.b64encode(data).decode(), "question": "?"}) + "\n")
    cfg = DataConfig(format=SourceFormat.hf, path=str(tmp_path / "bench"), split="test", image_column="image", key_column="index")
    preflight(cfg)
    loaded = hf.load_hf(cfg, streaming=True).select_columns(["image", "index"])
    cells = [c for t in hf._read_hf_shard(loaded, None) for c in t.column("image").to_pylist()]
    assert resolve_batch(cells, Fetcher()) == [b for _, b, _ in ROWS]


# --- 4. webdataset keys as webdataset defines them -----------------------------------------


def rows_of(path: pathlib.Path, shard: str, image_column: str = "image"):
    with open(path, "rb") as f:
        out = list(webdataset.shard_rows(f, shard, image_column))
    return [r for r in out if r.get(SKIP_COLUMN) is None], [r for r in out if r.get(SKIP_COLUMN) is not None]


def test_case4_dotted_names_split_into_one_row_per_image(tmp_path):
    jpg, png, webp = ROWS[0][1], ROWS[1][1], ROWS[2][1]
    tar = write_tar(tmp_path / "s0.tar", [
        ("2023.05.01_beach.jpg", jpg), ("2023.05.01_beach.txt", b"beach"),
        ("2023.05.02_dog.jpg", png), ("2023.05.02_dog.txt", b"dog"), ("2023.json", b"{}"),
        ("2024.05.03_cat.webp", webp),
    ])
    rows, skipped = rows_of(tar, "s0.tar")
    assert webdataset.base_plus_ext("2023.05.01_beach.jpg") == ("2023", "05.01_beach.jpg")  # webdataset's own rule
    by_key = {r["__key__"]: r for r in rows}
    assert set(by_key) == {"s0.tar/2023.05.01_beach", "s0.tar/2023.05.02_dog", "s0.tar/2024"}
    assert by_key["s0.tar/2023.05.01_beach"]["image"] == jpg and by_key["s0.tar/2023.05.01_beach"]["txt"] == "beach"
    assert by_key["s0.tar/2023.05.02_dog"]["image"] == png and by_key["s0.tar/2023.05.02_dog"]["txt"] == "dog"
    assert by_key["s0.tar/2023.05.02_dog"]["json"] == "{}"  # the sample's shared member joins every row
    assert by_key["s0.tar/2024"]["image"] == webp
    assert skipped == []


def test_case4_ids_unique_across_shards_and_bad_samples_cost_only_themselves(tmp_path):
    jpg = ROWS[0][1]
    a = write_tar(tmp_path / "a.tar", [("k1.jpg", jpg), ("k1.cls", b"1"), ("k2.cls", b"2"), ("k2.json", b"{}"),
                                       ("k3.jpg", jpg), ("k3.png", ROWS[1][1])])
    b = write_tar(tmp_path / "b.tar", [("k1.jpg", jpg), ("noext", b"x"), ("__meta__", b"m"), ("k4.bin", b"\x00\x01")])
    rows_a, skip_a = rows_of(a, "a.tar")
    rows_b, skip_b = rows_of(b, "b.tar")
    keys = [r["__key__"] for r in rows_a + rows_b]
    assert len(keys) == len(set(keys)) and "a.tar/k1" in keys and "b.tar/k1" in keys
    assert {r["__key__"] for r in rows_a} == {"a.tar/k1", "a.tar/k3.jpg", "a.tar/k3.png"}  # same stem: full names
    assert [s[SKIP_COLUMN] for s in skip_a] == ["sample without an image (members: cls, json)"]
    assert sorted(s[SKIP_COLUMN] for s in skip_b) == ["member without an extension", "sample without an image (members: bin)", "webdataset metadata"]
    # A truncated shard: the samples before the damage are rows, the rest one counted item.
    data = a.read_bytes()
    with tarfile.open(a) as t:
        cut = t.getmember("k3.jpg").offset_data + 10  # inside a member's data
    (tmp_path / "cut.tar").write_bytes(data[:cut])
    rows_c, skip_c = rows_of(tmp_path / "cut.tar", "cut.tar")
    assert [r["__key__"] for r in rows_c] == ["cut.tar/k1"]
    assert skip_c[-1][SKIP_COLUMN].startswith("unreadable shard")


# --- 5. storage options per protocol --------------------------------------------------------


def test_case5_s3_options_never_reach_http(http):
    options = {"client_kwargs": {"endpoint_url": "http://127.0.0.1:9"}, "anon": True, "http": {"headers": {"X-Test": "1"}}}
    assert options_for("s3://b/x.jpg", options, base="s3://b/") == {"client_kwargs": {"endpoint_url": "http://127.0.0.1:9"}, "anon": True}
    assert options_for("https://h/x.jpg", options, base="s3://b/") == {"headers": {"X-Test": "1"}}
    assert options_for("/local/x.jpg", options, base="s3://b/") == {}
    assert options_for("hf://datasets/u/r/x.jpg", options, base="/data/hf") == {}
    assert options_for("gs://b/x.jpg", options, base="s3://b/") == {}  # S3's options are not GCS's
    assert options_for("s3://b/x.jpg", options, base="/data/urls.parquet") == {"client_kwargs": {"endpoint_url": "http://127.0.0.1:9"}, "anon": True}
    fetcher = Fetcher(options, "s3://bucket/urls.parquet", FAST)
    assert fetcher.get(f"{http.url}/img/{ROWS[0][0]}") == JPG  # was TypeError / "not found"


# --- 6. transient failures: retried, the true reason kept, retried again on request --------


def test_case6_retries_transient_errors_only(http):
    fetcher = Fetcher(fetch=FAST)
    name = ROWS[0][0]
    assert fetcher.get(f"{http.url}/flaky/2/{name}") == JPG
    assert http.requests[f"/flaky/2/{name}"] == 3
    with pytest.raises(ImageRejected) as e:
        fetcher.get(f"{http.url}/status/403")
    assert e.value.reason == f"fetch: 403 Forbidden: {http.url}/status/403" and http.requests["/status/403"] == 1
    with pytest.raises(ImageRejected) as e:
        fetcher.get(f"{http.url}/status/503")
    assert e.value.reason.startswith("fetch: 503 Service Unavailable after 4 attempts") and http.requests["/status/503"] == 4
    with pytest.raises(ImageRejected) as e:
        fetcher.get(f"{http.url}/slow/3/{name}")
    assert e.value.reason.startswith("fetch: timeout (read > 1 s) after 4 attempts")
    with pytest.raises(ImageRejected) as e:
        fetcher.get(f"{http.url}/status/404")
    assert e.value.reason.startswith("fetch: 404 Not Found") and http.requests["/status/404"] == 1
    with pytest.raises(ImageRejected) as e:
        fetcher.get(f"{http.url}/reset")
    assert e.value.reason.startswith("fetch: connection") and http.requests["/reset"] == 4


def test_case6_remote_folder_fetch_failure_is_refetched_with_its_reason(s3_env, tmp_path):
    s3_env.bucket("folder6")
    s3_env.fs.pipe_file("folder6/imgs/a.jpg", JPG)
    cfg = DataConfig(format=SourceFormat.image_folder, path="s3://folder6/imgs")
    table, protocol = image_folder.list_items(cfg)
    s3_env.fs.rm_file("folder6/imgs/a.jpg")  # gone between the listing and the fetch
    out = image_folder.fetch_files(table, protocol, {})
    cell = out.column("image").to_pylist()[0]
    assert cell == {"bytes": None, "path": "s3://folder6/imgs/a.jpg"}  # not "empty: 0 bytes"
    got = resolve_batch([cell], Fetcher.from_config(cfg))[0]
    assert isinstance(got, ImageRejected) and got.reason == "fetch: not found: s3://folder6/imgs/a.jpg"


def test_case6_retry_quarantined_reasons_on_a_later_run(tmp_path):
    from helpers.config import compose

    from capjob.config import to_typed

    assert to_typed(compose(["job.retry_quarantined=[fetch,engine]"])).job.retry_quarantined == ["fetch", "engine"]
    from capjob.stages.resume import read_done_ids
    from capjob.schema import QUARANTINE
    from capjob.stages.tables import quarantine_table, TableWriter

    sink = SinkConfig(path=str(tmp_path / "out"))
    rows = [{"id": "f", "source_key": "f", "stage": "images", "reason": "fetch: 503 Service Unavailable after 4 attempts: u", "model": "m", "run_id": "r"},
            {"id": "d", "source_key": "d", "stage": "images", "reason": "decode: broken", "model": "m", "run_id": "r"},
            {"id": "e", "source_key": "e", "stage": "engine", "reason": "engine: boom", "model": "m", "run_id": "r"}]
    TableWriter(sink).write(QUARANTINE, quarantine_table(rows), "r-1")
    def done(*retry):  # which of the three ids a run skips (done ids are hashes: stages/ids.DoneIds)
        ids = read_done_ids(sink, list(retry))
        return {i for i, hit in zip("fde", ids.contains(list("fde")).tolist()) if hit}

    assert done() == {"f", "d", "e"}
    assert done("fetch") == {"d", "e"}
    assert done("fetch", "engine") == {"d"}


# --- 7. URL lists at scale ------------------------------------------------------------------


def test_case7_concurrent_fetches_with_timeouts_and_a_user_agent(http):
    fetcher = Fetcher(fetch=FetchConfig(concurrency=8, retries=0, read_timeout_s=1.0, max_redirects=3, user_agent="capjob-test/1"))
    name = ROWS[0][0]
    urls = [f"{http.url}/slow/0.3/{name}?{i}" for i in range(8)] + [
        f"{http.url}/status/404", f"{http.url}/status/403", f"{http.url}/loop/1", f"{http.url}/html", f"{http.url}/drip/0.2"]
    http.max_in_flight = 0
    got = fetcher.get_many(urls)
    assert got[:8] == [JPG] * 8
    assert http.max_in_flight >= 4  # fetched together, not one after the other
    reasons = [g.reason.split(":", 2)[1].strip() for g in got[8:] if isinstance(g, ImageRejected)]
    assert reasons == ["404 Not Found", "403 Forbidden", "too many redirects (> 3)", "timeout (body not received in 1 s)"]
    html = got[11]
    with pytest.raises(ImageRejected, match="not_an_image: looks like HTML"):
        decode_image(html, ImagesConfig())
    assert http.user_agents >= {"capjob-test/1"}


# --- items seen = rows + skipped, per format ------------------------------------------------


def test_image_folder_items_are_rows_or_skipped(tmp_path):
    root = tmp_path / "folder"
    (root / "a" / ".cache").mkdir(parents=True)
    (root / "a" / "x.JPG").write_bytes(JPG)
    (root / "a" / "y.jfif").write_bytes(JPG)
    (root / "a" / "noext").write_bytes(ROWS[1][1])  # a PNG without an extension: an image
    (root / "a" / "z.png.tmp").write_bytes(ROWS[1][1])
    (root / "a" / "notes.txt").write_text("hello")
    (root / "a" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (root / "a" / ".cache" / "t.jpg").write_bytes(JPG)
    (root / "_SUCCESS").write_bytes(b"")
    files = [p for p in root.rglob("*") if p.is_file()]
    cfg = DataConfig(format=SourceFormat.image_folder, path=str(root))
    preflight(cfg)
    table, protocol = image_folder.list_items(cfg)
    out = image_folder.fetch_files(table, protocol, {})
    skips = out.column(SKIP_COLUMN).to_pylist()
    rows = [p for p, s in zip(out.column("path").to_pylist(), skips) if s is None]
    assert len(files) == out.num_rows == len(rows) + sum(s is not None for s in skips)
    assert sorted(pathlib.Path(p).name for p in rows) == ["noext", "x.JPG", "y.jfif", "z.png.tmp"]
    assert sorted(s for s in skips if s) == ["hidden file", "hidden file", "hidden file", "not an image (.txt)"]
    assert all(c["bytes"] for c, s in zip(out.column("image").to_pylist(), skips) if s is None)


def test_webdataset_items_are_rows_or_skipped(tmp_path):
    members = [("a.jpg", JPG), ("a.txt", b"t"), ("b.json", b"{}"), ("c.0.jpg", JPG), ("c.1.png", ROWS[1][1]),
               ("c.0.txt", b"zero"), ("c.2.txt", b"orphan"), ("d", b"x"), ("e.jpg", b"not really"), ("e.jpg", JPG)]
    tar = write_tar(tmp_path / "s.tar", members)
    rows, skipped = rows_of(tar, "s.tar")
    # Items: samples a, b, c, e and the stray members d and the second e.jpg.
    assert {r["__key__"] for r in rows} == {"s.tar/a", "s.tar/c.0", "s.tar/c.1", "s.tar/e"}
    assert sorted(s[SKIP_COLUMN] for s in skipped) == ["member without an extension", "repeated suffix in a sample",
                                                      "sample without an image (members: json)"]
    by_key = {r["__key__"]: r for r in rows}
    assert by_key["s.tar/c.0"]["txt"] == "zero" and by_key["s.tar/c.1"]["2.txt"] == "orphan"  # every member is somewhere
    assert by_key["s.tar/a"]["txt"] == "t" and by_key["s.tar/e"]["image"] == b"not really"  # quarantined by the decoder
    tar2 = write_tar(tmp_path / "t.tar", [("k.0.jpg", JPG), ("k.0.png", JPG), ("k.0.txt", b"whose?")])
    rows2, skipped2 = rows_of(tar2, "t.tar")
    assert {r["__key__"] for r in rows2} == {"t.tar/k.0.jpg", "t.tar/k.0.png"}
    assert [(s[ITEM_COLUMN], s[SKIP_COLUMN]) for s in skipped2] == [("t.tar/k.0.txt", "member of no image row")]


def test_parquet_and_hf_cells_are_rows_whatever_they_hold():
    cells = [JPG, {"bytes": JPG, "path": "x"}, None, float("nan"), np.float32("nan"), "", [JPG], 3]
    resolved = resolve_batch(cells, Fetcher())
    assert resolved[:2] == [JPG, JPG]
    assert [r.reason.split(":")[0] for r in resolved[2:]] == ["empty", "empty", "empty", "empty", "unsupported", "unsupported"]
    assert all(identity(c) is not None for c in cells)  # ids never raise either


def test_unreadable_sources_fail_in_preflight_in_one_line(tmp_path):
    (tmp_path / "wds").mkdir()
    (tmp_path / "wds" / "shard-0.tar").write_bytes(b"this is not a tar file" * 100)
    with pytest.raises(SourceError, match="holds no webdataset sample with an image") as e:
        preflight(DataConfig(format=SourceFormat.webdataset, path=str(tmp_path / "wds")))
    assert "\n" not in str(e.value)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".hidden").write_bytes(b"x")
    with pytest.raises(SourceError, match="no files under"):
        preflight(DataConfig(format=SourceFormat.image_folder, path=str(tmp_path / "empty")))
