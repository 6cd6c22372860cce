"""LLaVA / ShareGPT / LLaMA-Factory JSON sets (issue 31, case 4), without Ray or an engine: the
reader's own functions on sets this module writes in the public layouts, the image stage's fetch
of their paths, and the ids two records of one image get."""

from __future__ import annotations

import gzip
import json
import os
import time

import numpy as np
import pyarrow as pa
import pytest

from capjob.config import DataConfig, FetchConfig, SourceFormat
from capjob.errors import SourceError
from capjob.schema import ImageRejected
from capjob.stages.ids import KEY_DIGEST_HEX, label_rows
from capjob.stages.sources import json_records, preflight
from capjob.stages.sources.cells import Fetcher, resolve_batch
from capjob.stages.sources.common import ITEM_COLUMN, SKIP_COLUMN, account, select_images
from capjob.stages.sources.json_records import IMAGE_COLUMN, NO_IMAGE, RECORD_KEY_COLUMN
from helpers.iolayouts import make_rows, write_llava_json

ROWS = make_rows(3, seed=4)


def numpy_batch(table: pa.Table) -> dict[str, np.ndarray]:
    """A block as the stages' numpy batches hold it (Ray Data's own conversion)."""
    from ray.data.block import BlockAccessor

    return BlockAccessor.for_block(table).to_batch_format("numpy")


def read_all(cfg: DataConfig) -> pa.Table:
    """What the Ray read yields, without Ray: the read UDF over the file list, then the ledger's filter."""
    listed = json_records.preflight(cfg)
    files = json_records.list_files(cfg)
    table = pa.table({"url": [u for u, _ in files], "name": [n for _, n in files]})
    blocks = list(json_records.read_files(table, image_field=cfg.image_column, image_root=cfg.image_root, listed=listed,
                                          storage_options=cfg.storage_options, types=json_records.column_types(cfg)))
    return pa.concat_tables(blocks, promote_options="permissive")


@pytest.mark.parametrize("as_lines", [False, True])
def test_llava_records_become_rows_with_paths_joined_to_the_files_folder(tmp_path, as_lines):
    path, records = write_llava_json(ROWS, tmp_path / "llava", as_lines)
    cfg = DataConfig(format=SourceFormat.json, path=str(path), passthrough_columns=["source_id", "conversations", "source_model"])
    preflight(cfg)
    table = read_all(cfg)
    name = path.name
    assert table.column(ITEM_COLUMN).to_pylist() == [f"{name}:{i}" for i in range(7)]  # every record is an item
    assert table.column(SKIP_COLUMN).to_pylist() == [None, None, NO_IMAGE, None, None, None, None]
    rows = account(table, None).to_pylist()
    folder = str(tmp_path / "llava")
    assert [r[IMAGE_COLUMN] for r in rows] == [
        f"{folder}/coco/train2017/000000000000.jpg", f"{folder}/coco/train2017/000000000000.jpg", f"{folder}/coco/train2017/404.jpg",
        str(tmp_path / "elsewhere.jpg"), "http://127.0.0.1:9/x.jpg", f"{folder}/coco/train2017/000000000001.jpg"]
    assert rows[1]["image"] == "./coco/train2017/000000000000.jpg"  # the record's own text, for pass-through
    # `id` and `model` are capjob's own output columns: the fields are source_id and source_model.
    assert [r["source_id"] for r in rows] == ["000000000000", "17", "missing", "absolute", "url", "second"]  # one type: text
    assert rows[0]["conversations"] == records[0]["conversations"]  # nested values keep their structure
    assert [r["source_model"] for r in rows] == [None, "gpt-4", None, None, None, None]  # absent keys are null
    assert rows[0][RECORD_KEY_COLUMN] == f"{name}:0"


def test_two_records_of_one_image_are_two_rows_of_one_content_digest_and_a_missing_file_its_own_reason(tmp_path):
    path, _ = write_llava_json(ROWS, tmp_path / "llava")
    rows = account(read_all(DataConfig(format=SourceFormat.json, path=str(path))), None)
    batch = numpy_batch(rows)
    ids, keys = label_rows(batch, IMAGE_COLUMN, RECORD_KEY_COLUMN)
    assert keys[:2] == ["llava_instruct.json:0", "llava_instruct.json:1"]
    assert ids[0] != ids[1] and ids[0][-KEY_DIGEST_HEX:] == ids[1][-KEY_DIGEST_HEX:]
    resolved = resolve_batch(batch[IMAGE_COLUMN], Fetcher(base=str(path), fetch=FetchConfig(retries=0)))
    assert resolved[0] == resolved[1] == ROWS[0][1] and resolved[3] == ROWS[2][1] and resolved[5] == ROWS[1][1]
    assert isinstance(resolved[2], ImageRejected)
    assert resolved[2].reason == f"fetch: not found: {tmp_path}/llava/coco/train2017/404.jpg"


def test_llama_factory_images_list_takes_the_list_options(tmp_path):
    (tmp_path / "data" / "mllm_demo_data").mkdir(parents=True)
    for i, (_, data, _) in enumerate(ROWS):
        (tmp_path / "data" / "mllm_demo_data" / f"{i}.jpg").write_bytes(data)
    records = [
        {"messages": [{"role": "user", "content": "<image>Who are they?"}, {"role": "assistant", "content": "Players."}],
         "images": ["mllm_demo_data/0.jpg"]},
        {"messages": [{"role": "user", "content": "<image><image>Compare."}, {"role": "assistant", "content": "Alike."}],
         "images": ["mllm_demo_data/1.jpg", "mllm_demo_data/2.jpg"]},
        {"messages": [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi"}], "images": []},
    ]
    path = tmp_path / "data" / "mllm_demo.json"
    path.write_text(json.dumps(records))
    cfg = DataConfig(format=SourceFormat.json, path=str(path), image_column="images", passthrough_columns=["messages"])
    with pytest.raises(SourceError, match=r"data.image_column: 'images' in the first 3 records of .* holds a list of images"):
        preflight(cfg)
    exploded = DataConfig(**{**cfg.__dict__, "explode_images": True})
    preflight(exploded)
    table = read_all(exploded)
    assert table.column(SKIP_COLUMN).to_pylist() == [None, None, NO_IMAGE]  # a text-only record: skipped, counted
    rows = account(table, None)
    out = select_images(numpy_batch(rows), image_column=IMAGE_COLUMN, key_column=RECORD_KEY_COLUMN, image_index=None, keyed_column="k")
    folder = tmp_path / "data" / "mllm_demo_data"
    assert list(out[IMAGE_COLUMN]) == [str(folder / "0.jpg"), str(folder / "1.jpg"), str(folder / "2.jpg")]
    assert list(out["k"]) == ["mllm_demo.json:0#0", "mllm_demo.json:1#0", "mllm_demo.json:1#1"]
    assert [list(m) for m in out["messages"]] == [records[0]["messages"], records[1]["messages"], records[1]["messages"]]


def test_image_root_folder_of_files_and_what_is_skipped(tmp_path):
    """data.image_root instead of the file's folder; a folder of JSON files (not its subfolders,
    not its other files); bad lines, non-objects and a truncated array counted, never fatal."""
    root = tmp_path / "images"
    root.mkdir()
    (root / "a.jpg").write_bytes(ROWS[0][1])
    sets = tmp_path / "sets"
    (sets / "nested").mkdir(parents=True)
    (sets / "part-0.jsonl").write_text('{"image": "a.jpg", "k": 1}\nnot json\n\n[1, 2]\n{"image": "a.jpg"}\n')
    with gzip.open(sets / "part-1.json.gz", "wt") as f:
        f.write('[{"image": "a.jpg"}, 3, {"image": "a.jpg"}, {"ima')
    (sets / "dataset_info.json").write_text('{\n  "mllm_demo": {"file_name": "mllm_demo.json"}\n}\n')
    (sets / "nested" / "ignored.jsonl").write_text('{"image": "a.jpg"}\n')
    (sets / "README.md").write_text("not an item\n")
    cfg = DataConfig(format=SourceFormat.json, path=str(sets), image_root=str(root), passthrough_columns=["k"])
    preflight(cfg)
    table = read_all(cfg)
    skips = dict(zip(table.column(ITEM_COLUMN).to_pylist(), table.column(SKIP_COLUMN).to_pylist()))
    assert skips == {
        "dataset_info.json:0": "not a JSON array or JSON Lines file",
        "part-0.jsonl:0": None, "part-0.jsonl:1": "invalid JSON line", "part-0.jsonl:2": "not a JSON object (list)",
        "part-0.jsonl:3": None,
        "part-1.json.gz:0": None, "part-1.json.gz:1": "not a JSON object (int)", "part-1.json.gz:2": None,
        "part-1.json.gz:3": "unreadable JSON after 3 records (JSONDecodeError)",
    }
    rows = account(table, None).to_pylist()
    assert {r[IMAGE_COLUMN] for r in rows} == {str(root / "a.jpg")}
    assert [r["k"] for r in rows] == ["1", None, None, None]


def test_image_root_on_s3(s3_env, tmp_path):
    """Records on S3, images under an S3 prefix: locations are s3:// URLs the fetch reads."""
    bucket = s3_env.bucket("json-sets")
    s3_env.fs.pipe(f"{bucket}/sets/llava.json", json.dumps([{"id": "a", "image": "coco/0.jpg"}]).encode())
    s3_env.fs.pipe(f"{bucket}/img/coco/0.jpg", ROWS[0][1])
    cfg = DataConfig(format=SourceFormat.json, path=f"s3://{bucket}/sets/llava.json", image_root=f"s3://{bucket}/img",
                     passthrough_columns=["source_id"])
    preflight(cfg)
    rows = account(read_all(cfg), None)
    assert rows.column(IMAGE_COLUMN).to_pylist() == [f"s3://{bucket}/img/coco/0.jpg"]
    assert resolve_batch(rows.column(IMAGE_COLUMN).to_pylist(), Fetcher(base=cfg.path)) == [ROWS[0][1]]
    default = account(read_all(DataConfig(format=SourceFormat.json, path=f"s3://{bucket}/sets/llava.json")), None)
    assert default.column(IMAGE_COLUMN).to_pylist() == [f"s3://{bucket}/sets/coco/0.jpg"]  # the file's folder


def test_preflight_errors_name_the_key_and_what_was_looked_at(tmp_path):
    path, _ = write_llava_json(ROWS, tmp_path / "llava")
    base = DataConfig(format=SourceFormat.json, path=str(path))
    with pytest.raises(SourceError, match=r"data.image_column: no image in field 'jpg' of the first 7 records of .*; "
                                          r"fields there: \['conversations', 'image', 'source_id', 'source_model'\]"):
        preflight(DataConfig(**{**base.__dict__, "image_column": "jpg"}))
    with pytest.raises(SourceError, match=r"data.passthrough_columns: no field 'caption' in the first 7 records"):
        preflight(DataConfig(**{**base.__dict__, "passthrough_columns": ["caption"]}))
    with pytest.raises(SourceError, match=r"data.image_index: 'image' in the first 7 records .* is not a list of images"):
        preflight(DataConfig(**{**base.__dict__, "image_index": 0}))
    with pytest.raises(SourceError, match=r"data.image_root '/nowhere' does not exist"):
        preflight(DataConfig(**{**base.__dict__, "image_root": "/nowhere"}))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(SourceError, match=r"data.path: no JSON files \(\*.json, \*.jsonl, \*.ndjson\) in "):
        preflight(DataConfig(**{**base.__dict__, "path": str(tmp_path / "empty")}))


def test_a_large_array_streams(tmp_path):
    """100k records (LLaVA-150k's order of size) read in blocks, record by record."""
    n = 100_000
    record = {"id": "0", "image": "coco/train2017/000000000000.jpg",
              "conversations": [{"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": "x" * 200}]}
    path = tmp_path / "big.json"
    with open(path, "w") as f:
        f.write("[" + ",".join([json.dumps(record)] * n) + "]")
    started = time.monotonic()
    table = pa.table({"url": [str(path)], "name": ["big.json"]})
    sizes = [b.num_rows for b in json_records.read_files(table, image_field="image", image_root=None, listed=False, storage_options={})]
    assert sum(sizes) == n and max(sizes) == json_records.ROWS_PER_BLOCK
    assert time.monotonic() - started < 60, os.cpu_count()


def test_a_pass_through_column_named_like_an_output_column_is_refused():
    """Any layout: a pass-through `id`, `model` or `caption` would be overwritten by capjob's own."""
    from capjob.config import to_typed
    from capjob.errors import ConfigError
    from helpers.config import compose

    for column in ("id", "model", "caption"):
        with pytest.raises(ConfigError, match=rf"^data.passthrough_columns: '{column}' is a column capjob writes itself \(id, source_key, "
                                              r"prompt_tokens.*\): its value would be lost \(with data.format=json a record's field of "
                                              r"that name is the column source_<name>\)"):
            to_typed(compose(["dataset=llava_json", "data.path=x.json", f"data.passthrough_columns=[{column}]"]))
    assert to_typed(compose(["dataset=llava_json", "data.path=x.json"])).data.passthrough_columns == ["source_id", "conversations"]


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16", "utf-16-be", "utf-32"])
@pytest.mark.parametrize("layout", ["array", "indented", "lines"])
def test_a_byte_order_mark_or_utf16_file_reads_every_record(tmp_path, encoding, layout):
    """Windows tools write JSON with a UTF-8 BOM (Notepad, .NET) or as UTF-16 (PowerShell 5's
    Out-File); RFC 8259 section 8.1 lets a parser ignore the BOM. Once a BOM'd array read as one
    'not a JSON object (list)' item and preflight refused it."""
    _, records = write_llava_json(ROWS, tmp_path / "llava")
    text = {"array": json.dumps(records), "indented": json.dumps(records, indent=2).replace("\n", "\r\n"),
            "lines": "\r\n".join(json.dumps(r) for r in records) + "\r\n"}[layout]
    data = text.encode(encoding)
    if encoding == "utf-16-be":
        data = b"\xfe\xff" + data
    path = tmp_path / "llava" / "set.json"
    path.write_bytes(data)
    read = list(json_records.iter_records(str(path), {}))
    assert [r for r, _ in read] == records
    table = read_all(DataConfig(format=SourceFormat.json, path=str(path)))
    assert table.num_rows == len(records) and table.column(SKIP_COLUMN).to_pylist().count(NO_IMAGE) == 1


@pytest.mark.parametrize("indent", [None, 2])
def test_records_wrapped_in_an_object_are_refused_naming_the_field(tmp_path, indent):
    """`{"data": [records]}` (a dict with a list of records under one key) is not read: preflight
    says which field holds the records and how to write them out, in one line."""
    _, records = write_llava_json(ROWS, tmp_path / "llava")
    path = tmp_path / "llava" / "wrapped.json"
    path.write_text(json.dumps({"version": 1, "data": records}, indent=indent))
    with pytest.raises(SourceError, match=r"^data.path: '.*wrapped.json' is one JSON object whose field 'data' holds the records; "
                                          r"capjob reads a JSON array or JSON Lines file of records \(write that list out: "
                                          r"jq '.data' wrapped.json\)$"):
        preflight(DataConfig(format=SourceFormat.json, path=str(path)))


def test_fields_whose_types_differ_between_blocks_never_stop_the_job(tmp_path, monkeypatch):
    """Ray Data concatenates the read's blocks (the repartition), and cannot unite a column that
    is a list in one block and text in another, or int64 and double (once ArrowConversionError,
    fatal). Fields the job does not read are not columns; a nested field's numbers are floats
    (JSON has one number type); a field the first records hold as text holds nested values as
    JSON text; a record whose nested value cannot share the first records' type is skipped with
    the reason. Every record is still an item."""
    from ray.data._internal.arrow_ops.transform_pyarrow import concat

    monkeypatch.setattr(json_records, "ROWS_PER_BLOCK", 2)
    monkeypatch.setattr(json_records, "PREFLIGHT_RECORDS", 2)
    _, records = write_llava_json(ROWS, tmp_path / "llava")
    image = records[0]["image"]
    conv = records[0]["conversations"]
    mixed = [
        {"image": image, "conversations": conv, "bbox": [1, 2, 3, 4], "meta": {"w": 1}, "note": "a"},
        {"image": image, "conversations": conv, "bbox": [1, 2, 3, 4], "meta": {"w": "x"}, "note": "b"},
        {"image": image, "conversations": "plain text, not turns", "bbox": [0.5, 1, 2, 3], "meta": 3, "note": {"k": 1}},
        {"image": image, "conversations": conv, "bbox": [5, 6, 7, 8], "meta": [], "note": ["c"]},
        {"image": image, "conversations": [], "bbox": None, "note": None},
    ]
    path = tmp_path / "llava" / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in mixed))
    cfg = DataConfig(format=SourceFormat.json, path=str(path), passthrough_columns=["conversations", "bbox", "note"])
    preflight(cfg)
    files = json_records.list_files(cfg)
    table = pa.table({"url": [u for u, _ in files], "name": [n for _, n in files]})
    blocks = list(json_records.read_files(table, image_field="image", image_root=None, listed=False, storage_options={},
                                          types=json_records.column_types(cfg)))
    whole = concat(blocks)  # what the repartition does
    assert "meta" not in whole.column_names  # not read: never a column
    assert whole.column(ITEM_COLUMN).to_pylist() == [f"mixed.jsonl:{i}" for i in range(5)]
    assert whole.column(SKIP_COLUMN).to_pylist() == [
        None, None, "field 'conversations' holds str (string) where the first records hold "
                    "list<item: struct<from: string, value: string>>", None, None]
    rows = account(whole, None).to_pylist()
    assert [r["bbox"] for r in rows] == [[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0], None]
    assert [r["note"] for r in rows] == ["a", "b", '["c"]', None]
    assert rows[0]["conversations"] == conv and rows[3]["conversations"] == []


@pytest.mark.parametrize("chunk", [7, 1 << 20])
def test_an_array_with_nan_reads_every_record_as_json_lines_do(tmp_path, monkeypatch, chunk):
    """Python's json.dumps writes NaN and Infinity by default; a JSON array holding them lost
    every record after the first such value ('unreadable JSON after 1 records'), while the same
    records as JSON Lines were read. Both now parse as Python's json module parses, streamed in
    windows (a small one here: values cut across windows, numbers included)."""
    monkeypatch.setattr(json_records, "ARRAY_CHUNK", chunk)
    records = [{"image": "a.jpg", "score": 1.0}, {"image": "b.jpg", "score": float("nan")}, {"image": "c.jpg", "score": float("inf")},
               {"image": "d.jpg", "n": 12345678901234567890, "text": "a ] , [ \" inside"}, [1, 2], {"image": "e.jpg"}]
    for layout, text in (("set.json", json.dumps(records, indent=1)), ("set.jsonl", "\n".join(json.dumps(r) for r in records))):
        (tmp_path / layout).write_text(text)
        read = list(json_records.iter_records(str(tmp_path / layout), {}))
        assert [r["image"] for r, _ in read if r is not None] == ["a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg"], layout
        assert [s for _, s in read if s is not None] == ["not a JSON object (list)"]
        assert read[3][0]["n"] == 12345678901234567890 and read[3][0]["text"] == "a ] , [ \" inside"
    (tmp_path / "cut.json").write_text(json.dumps(records)[:-5])
    read = list(json_records.iter_records(str(tmp_path / "cut.json"), {}))
    assert read[-1] == (None, "unreadable JSON after 5 records (JSONDecodeError)")


def test_a_damaged_first_line_of_json_lines_costs_that_line_only(tmp_path):
    """A JSON Lines file whose first line does not parse (cut short, a stray header) was counted
    as one item 'not a JSON array or JSON Lines file', its records lost; a pretty-printed object
    or a CSV still is one such item."""
    _, records = write_llava_json(ROWS, tmp_path / "llava")
    path = tmp_path / "llava" / "damaged.jsonl"
    path.write_text('{"id": "cut", "ima\n[1, 2]\n' + "\n".join(json.dumps(r) for r in records) + "\n")
    read = list(json_records.iter_records(str(path), {}))
    assert read[:2] == [(None, "invalid JSON line"), (None, "not a JSON object (list)")]
    assert [r for r, _ in read[2:]] == records
    for name, text in (("pretty.json", json.dumps({"info": {"v": 1}, "data": records}, indent=2)),
                       ("table.csv.jsonl", "id,image\n" + "".join(f"{i},x{i}.jpg\n" for i in range(20)))):
        (tmp_path / name).write_text(text)
        assert list(json_records.iter_records(str(tmp_path / name), {})) == [(None, "not a JSON array or JSON Lines file")], name


def test_preflight_reads_past_text_only_records_and_refuses_only_having_read_everything(tmp_path, monkeypatch, caplog):
    """Issue 31's rule for every layout: a text-only file sorted first (or a text-only head of a
    mix) longer than preflight's 1,000 records once refused the set ('no image in field'); it
    reads on within its budget, refuses only what it has read to the end, and warns where the
    budget ends first."""
    import logging

    from capjob.stages.sources import common

    root = tmp_path / "set"
    root.mkdir()
    (root / "a_text_only.json").write_text(json.dumps([{"id": i, "conversations": [{"from": "human", "value": "hi"}]} for i in range(1200)]))
    (root / "b_coco.json").write_text(json.dumps([{"id": "x", "image": "coco/1.jpg", "conversations": [], "bbox": [1, 2]}]))
    cfg = DataConfig(format=SourceFormat.json, path=str(root), passthrough_columns=["bbox"])
    assert preflight(cfg) is None and json_records.preflight(cfg) is False
    assert json_records.column_types(cfg) == {"bbox": pa.list_(pa.float64())}  # typed by the records with an image
    (root / "b_coco.json").unlink()
    with pytest.raises(SourceError, match=r"^data.image_column: no image in field 'image' of the first 1200 records of .* \(looked at all "
                                          r"1 file \(1,200 records\)\); fields there: \['conversations', 'source_id'\]$"):
        preflight(DataConfig(format=SourceFormat.json, path=str(root)))
    (root / "b_coco.json").write_text(json.dumps([{"id": "x", "image": "coco/1.jpg"}]))
    monkeypatch.setattr(common, "PREFLIGHT_BYTES", 10_000)
    with caplog.at_level(logging.WARNING):
        assert json_records.preflight(DataConfig(format=SourceFormat.json, path=str(root))) is False
    assert "looked at the first 1 of 2 files" in caplog.text and "found no record with an image in field 'image' yet" in caplog.text
