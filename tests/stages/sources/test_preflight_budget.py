"""Preflight's look at the data, per format (issue 31, cases 3 and 5), without Ray: a first file
that is not typical (no image, a column missing) is no reason to refuse; preflight reads on within
its budget and refuses only what it did not find, saying how much it read. And the rows of a file
that lacks a column get it, null (common.fill_columns)."""

from __future__ import annotations

import json
import logging
import pathlib

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from capjob.config import DataConfig, SourceFormat
from capjob.errors import SourceError
from capjob.stages import sources
from capjob.stages.sources import common, preflight
from capjob.stages.sources.common import fill_columns
from helpers.iolayouts import make_rows

ROWS = make_rows(4, seed=7, formats=("jpg", "png"))


@pytest.fixture()
def hf_cache(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


# --- parquet: files need not share one schema ----------------------------------------------


def ragged_parquet(root: pathlib.Path) -> pathlib.Path:
    """part-0: no rows and no columns; part-1: image only; part-2: image, txt and cls."""
    root.mkdir()
    pq.write_table(pa.table({}), root / "part-0.parquet")
    pq.write_table(pa.table({"image": [ROWS[0][1]]}), root / "part-1.parquet")
    pq.write_table(pa.table({"image": [ROWS[1][1], ROWS[2][1]], "txt": ["b", None], "cls": pa.array([1, 2], pa.int16())}),
                   root / "part-2.parquet")
    return root


def test_parquet_column_of_a_later_file_is_found_and_typed(tmp_path):
    root = ragged_parquet(tmp_path / "pq")
    cfg = DataConfig(format=SourceFormat.parquet, path=str(root), passthrough_columns=["txt", "cls"])
    preflight(cfg)
    kind, schema, listed = sources._inspect(cfg)
    assert (kind, listed) == ("directory", False)
    assert schema == pa.schema([("image", pa.binary()), ("txt", pa.string()), ("cls", pa.int16())])
    # Read with that schema (read_parquet), part-1's row gets both columns, null, typed as part-2 declares them.
    block = pads.dataset(root / "part-1.parquet", schema=schema).to_table()
    assert block.schema == schema and block.column("txt").to_pylist() == [None] and block.column("cls").to_pylist() == [None]


def test_parquet_column_in_no_file_is_refused_saying_how_many_were_read(tmp_path):
    root = ragged_parquet(tmp_path / "pq")
    with pytest.raises(SourceError) as e:
        preflight(DataConfig(format=SourceFormat.parquet, path=str(root), passthrough_columns=["caption"]))
    assert str(e.value) == ("data.passthrough_columns: column 'caption' not in the dataset (looked at all 3 parquet files "
                            "(3 rows)); available columns: ['cls', 'image', 'txt']")


def test_parquet_budget_spent_names_the_files_read(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "PREFLIGHT_BYTES", 1)
    root = ragged_parquet(tmp_path / "pq")
    with pytest.raises(SourceError, match=r"column 'image' not in the dataset \(looked at the first 1 parquet file \(0 rows, "):
        preflight(DataConfig(format=SourceFormat.parquet, path=str(root)))


# --- image folders: the first file need not be an image ---------------------------------------


def folder(root: pathlib.Path, files: dict[str, bytes]) -> pathlib.Path:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def test_image_folder_whose_first_files_are_not_images(tmp_path):
    # An image without an extension, after two files that are not images: found by its bytes.
    root = folder(tmp_path / "images", {"README.md": b"notes", "a_docs/captions.json": b"{}", "b/photo": ROWS[0][1]})
    preflight(DataConfig(format=SourceFormat.image_folder, path=str(root)))


def test_image_folder_without_any_image_is_refused_saying_how_much_was_read(tmp_path):
    # .cache/x.jpg is hidden: not an item the run reads.
    root = folder(tmp_path / "images", {"README.md": b"notes", "sub/labels.csv": b"a,b", ".cache/x.jpg": ROWS[0][1]})
    with pytest.raises(SourceError) as e:
        preflight(DataConfig(format=SourceFormat.image_folder, path=str(root)))
    assert str(e.value) == f"data.path: no image under {str(root)!r} (a file Pillow can open): looked at all 2 files"


def test_image_folder_budget_spent_warns_and_does_not_refuse(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(common, "PREFLIGHT_BYTES", 1)
    root = folder(tmp_path / "images", {"0.txt": b"not an image", "1.jpg": ROWS[0][1]})
    with caplog.at_level(logging.WARNING):
        preflight(DataConfig(format=SourceFormat.image_folder, path=str(root)))
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.startswith("data.path: looked at the first 1 file (") and "found no image yet; the run reads every file" in warning


# --- Hugging Face local folders ------------------------------------------------------------


def write_jsonl(path: pathlib.Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_hf_record_without_a_field_is_null_not_refused(tmp_path, hf_cache):
    write_jsonl(tmp_path / "hf" / "train" / "a.jsonl", [{"image": "x.jpg"}, {"image": "y.jpg", "txt": "hello"}])
    preflight(DataConfig(format=SourceFormat.hf, path=str(tmp_path / "hf"), passthrough_columns=["txt"]))


def test_hf_files_that_do_not_share_columns_fail_in_one_line_naming_the_cause(tmp_path, hf_cache):
    write_jsonl(tmp_path / "hf" / "train" / "a.jsonl", [{"image": "x.jpg"}])
    write_jsonl(tmp_path / "hf" / "train" / "b.jsonl", [{"image": "z.jpg", "txt": "hi"}])
    with pytest.raises(SourceError) as e:
        preflight(DataConfig(format=SourceFormat.hf, path=str(tmp_path / "hf"), passthrough_columns=["txt"]))
    message = str(e.value)
    assert "\n" not in message and "do not share one schema" in message and "columns of its first file" in message
    assert "column names don't match" in message
    # Only the first file: a column no row has is refused as such, saying how many rows were read.
    (tmp_path / "hf" / "train" / "b.jsonl").unlink()
    with pytest.raises(SourceError, match=r"^data\.passthrough_columns: column 'txt' not in the dataset \(looked at all 1 row\)"):
        preflight(DataConfig(format=SourceFormat.hf, path=str(tmp_path / "hf"), passthrough_columns=["txt"]))


# --- every block carries every column -------------------------------------------------------


def test_fill_columns_adds_only_what_a_block_lacks():
    block = pa.table({"image": [b"x", b"y"], "txt": ["a", None]})
    out = fill_columns(block, {"image": None, "txt": None, "cls": pa.int64(), "json": None})
    assert out.column_names == ["image", "txt", "cls", "json"]
    assert out.column("txt").to_pylist() == ["a", None] and out.column("cls").type == pa.int64()
    assert out.column("cls").to_pylist() == [None, None] and out.column("json").type == pa.null()
    assert fill_columns(block, {"image": None}) is block
