"""stages/sources/webdataset.py without Ray (issue 31, cases 3 and 5): shards without images are
counted, not refused, unless preflight has read every shard; ragged samples carry every configured
member column, null where they lack it; every member is a row's or counted with its reason."""

from __future__ import annotations

import logging
import pathlib
import re

import numpy as np
import pyarrow as pa
import pytest

from capjob.config import DataConfig, SourceFormat
from capjob.errors import SourceError
from capjob.stages.sources import common, image_folder, preflight, webdataset
from capjob.stages.sources.common import ITEM_COLUMN, SKIP_COLUMN
from helpers.iolayouts import make_rows, upload, write_tar

IMAGES = [data for _, data, _ in make_rows(6, seed=31, formats=("jpg", "png", "webp"))]
# Caption-only / metadata shard: text, JSON and tensor members, no image.
CAPTIONS_ONLY = [("x1.txt", b"a caption"), ("x1.json", b"{}"), ("x1.npy", b"\x93NUMPY\x01\x00"),
                 ("x2.txt", b"another"), ("x2.json", b"{}")]
# Ragged image shard: .txt/.cls on some samples only; `e.txt` (no image of its key) and
# `f_extra.txt` (its key is `f_extra`, not `f`) join no image.
RAGGED = [("a.jpg", IMAGES[0]), ("a.txt", b"cap a"),
          ("b.png", IMAGES[1]), ("b.cls", b"2"),
          ("c.webp", IMAGES[2]), ("c.txt", b"cap c"), ("c.cls", b"3"),
          ("d.jpg", IMAGES[3]),
          ("e.txt", b"orphan"),
          ("f.jpg", IMAGES[4]), ("f_extra.txt", b"extra")]


def shards(root: pathlib.Path, *contents: list[tuple[str, bytes]]) -> pathlib.Path:
    for i, members in enumerate(contents):
        write_tar(root / f"shard-{i:05d}.tar", members)
    return root


def wds(path, **kwargs) -> DataConfig:
    return DataConfig(format=SourceFormat.webdataset, path=str(path), **kwargs)


def read_all(root: pathlib.Path, columns: list[str]) -> list[pa.Table]:
    """The blocks one read task yields over every shard (without Ray)."""
    found, others = webdataset.list_shards(wds(root))
    return list(webdataset._read_shards(found, others, {}, "image", ["image", "__key__", *columns]))


# --- the shard reader ----------------------------------------------------------------------


def test_ragged_members_are_null_where_a_sample_lacks_them_and_orphans_say_what_they_hold(tmp_path):
    tar = write_tar(tmp_path / "s.tar", RAGGED)
    with open(tar, "rb") as f:
        out = list(webdataset.shard_rows(f, "s.tar", "image"))
    rows = {r["__key__"]: r for r in out if r.get(SKIP_COLUMN) is None}
    skipped = sorted((r[ITEM_COLUMN], r[SKIP_COLUMN]) for r in out if r.get(SKIP_COLUMN) is not None)
    assert sorted(rows) == ["s.tar/a", "s.tar/b", "s.tar/c", "s.tar/d", "s.tar/f"]
    assert skipped == [("s.tar/e", "sample without an image (members: txt)"),
                       ("s.tar/f_extra", "sample without an image (members: txt)")]
    assert len(out) == len(rows) + len(skipped)  # items = rows + skipped: nothing dropped without a word
    table = webdataset._table(out, "image", ["txt", "cls"])
    by_key = {k: (t, c) for k, t, c, s in zip(*(table.column(n).to_pylist() for n in ("__key__", "txt", "cls", SKIP_COLUMN)))
              if s is None}
    assert by_key == {"s.tar/a": ("cap a", None), "s.tar/b": (None, 2), "s.tar/c": ("cap c", 3), "s.tar/d": (None, None),
                      "s.tar/f": (None, None)}


def test_every_block_carries_every_configured_column_typed_by_its_suffix(tmp_path, monkeypatch):
    # One sample per block: blocks without a .txt or .cls at all still have the columns, typed as
    # the blocks that have them, so that the blocks concatenate (Ray's repartition) and the image
    # stage finds every pass-through column (once KeyError: 'txt' in a Ray task).
    monkeypatch.setattr(webdataset, "ROWS_PER_BLOCK", 1)
    root = shards(tmp_path / "wds", CAPTIONS_ONLY, RAGGED)
    blocks = read_all(root, ["txt", "cls", "npy"])
    assert len(blocks) > 5
    for block in blocks:
        assert block.schema.field("txt").type == pa.string() and block.schema.field("cls").type == pa.int64()
        assert block.schema.field("npy").type == pa.binary() and block.schema.field("image").type == pa.binary()
    table = pa.concat_tables(blocks, promote_options="default")
    rows = [r for r in table.to_pylist() if r[SKIP_COLUMN] is None]
    assert {r["__key__"]: (r["txt"], r["cls"]) for r in rows} == {
        "shard-00001.tar/a": ("cap a", None), "shard-00001.tar/b": (None, 2), "shard-00001.tar/c": ("cap c", 3),
        "shard-00001.tar/d": (None, None), "shard-00001.tar/f": (None, None)}
    reasons = sorted(r[SKIP_COLUMN] for r in table.to_pylist() if r[SKIP_COLUMN] is not None)
    assert reasons == ["sample without an image (members: json, npy, txt)", "sample without an image (members: json, txt)",
                       "sample without an image (members: txt)", "sample without an image (members: txt)"]


# --- preflight: shards without images ---------------------------------------------------------


def test_caption_only_first_shard_is_not_refused(tmp_path):
    root = shards(tmp_path / "wds", CAPTIONS_ONLY, CAPTIONS_ONLY, RAGGED)
    preflight(wds(root))
    # `cls`: absent from the first samples with an image (a), present on later ones (b, c).
    preflight(wds(root, passthrough_columns=["txt", "cls"]))


def test_no_image_in_any_shard_is_refused_saying_how_much_was_read(tmp_path):
    root = shards(tmp_path / "wds", CAPTIONS_ONLY, CAPTIONS_ONLY, [("y.txt", b"t")])
    with pytest.raises(SourceError) as e:
        preflight(wds(root))
    assert str(e.value) == (f"data.path: {str(root)!r} holds no webdataset sample with an image (members named <key>.<ext>): "
                            "looked at all 3 shards (11 members)")


def test_a_column_no_image_row_has_is_refused_saying_how_much_was_read(tmp_path):
    root = shards(tmp_path / "wds", CAPTIONS_ONLY, RAGGED)
    with pytest.raises(SourceError) as e:
        preflight(wds(root, passthrough_columns=["txt", "caption"]))
    assert str(e.value).startswith("data.passthrough_columns: column 'caption' not in the dataset (looked at all 2 shards "
                                   "(16 members)); available columns: ['__key__', '__url__', 'cls', 'image', 'txt']")
    # .npy is a member of caption-only samples only: no row ever carries it.
    with pytest.raises(SourceError, match=r"column 'npy' not in the dataset \(looked at all 2 shards"):
        preflight(wds(root, passthrough_columns=["npy"]))


def test_budget_spent_before_any_image_warns_and_does_not_refuse(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(common, "PREFLIGHT_BYTES", 1)  # spent after the first member read
    root = shards(tmp_path / "wds", CAPTIONS_ONLY, RAGGED)
    with caplog.at_level(logging.WARNING):
        preflight(wds(root, passthrough_columns=["whatever"]))  # columns unknown without an image: not refused
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert re.match(r"data\.path: looked at the first 1 shard \(4 members, 0\.0 MiB in \d+\.\d s; preflight reads at most ", warning)
    assert "found no webdataset sample with an image yet; the run reads every shard" in warning


def test_budget_spent_after_an_image_refuses_a_missing_column_saying_so(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "PREFLIGHT_BYTES", 1)
    root = shards(tmp_path / "wds", RAGGED, RAGGED)
    with pytest.raises(SourceError, match=r"column 'cls' not in the dataset \(looked at the first 1 shard \(3 members, .*preflight "
                                          r"reads at most .* MiB or 10 s\)\)"):
        preflight(wds(root, passthrough_columns=["cls"]))


def test_unreadable_first_shard_is_counted_and_later_shards_read(tmp_path):
    root = tmp_path / "wds"
    root.mkdir()
    (root / "shard-00000.tar").write_bytes(b"not a tar file" * 100)
    write_tar(root / "shard-00001.tar", RAGGED)
    preflight(wds(root, passthrough_columns=["txt"]))
    (root / "shard-00001.tar").unlink()
    with pytest.raises(SourceError, match=r"looked at all 1 shard \(0 members, 1 unreadable\)$"):
        preflight(wds(root))


def test_caption_only_first_shard_on_s3(s3_env, tmp_path):
    local = shards(tmp_path / "wds", CAPTIONS_ONLY, RAGGED)
    url = upload(local, s3_env.fs, f"s3://{s3_env.bucket('wds31')}/shards")
    preflight(wds(url, passthrough_columns=["txt", "cls"]))
    with pytest.raises(SourceError, match=r"'caption' not in the dataset \(looked at all 2 shards \(16 members\)\)"):
        preflight(wds(url, passthrough_columns=["caption"]))


def test_a_dotted_key_names_its_members_as_a_split_sample_does(tmp_path):
    """`img.0001.jpg` + `img.0001.txt` is one sample `img` whose suffixes are `0001.jpg`/`0001.txt`
    (webdataset's base_plus_ext): its text passes through as `txt`, as in a sample split by its
    image stems, not as a column `0001.txt` that data.passthrough_columns=[txt] never sees (once
    null there, without a word); a member of the whole sample keeps its suffix."""
    tar = write_tar(tmp_path / "s.tar", [("img.0001.jpg", IMAGES[0]), ("img.0001.txt", b"dotted"), ("img.json", b"{}"),
                                         ("a.jpg", IMAGES[1]), ("a.txt", b"plain")])
    with open(tar, "rb") as f:
        out = list(webdataset.shard_rows(f, "s.tar", "image"))
    rows = {r["__key__"]: {k: v for k, v in r.items() if k != "image"} for r in out}
    assert rows == {"s.tar/img": {"__key__": "s.tar/img", "txt": "dotted", "json": "{}"},
                    "s.tar/a": {"__key__": "s.tar/a", "txt": "plain"}}


def test_a_member_identified_by_content_is_read_whole_as_an_image_folder_file_is(tmp_path):
    """An image member under a suffix no decoder registers is identified by its bytes, as
    image_folder identifies a file: from the whole member where what Pillow reads at open lies
    beyond the first bytes (an ICO's entries, a TIFF's directory), not from those alone."""
    import io

    from PIL import Image

    noise = Image.fromarray(np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    buf = io.BytesIO()
    noise.save(buf, "ICO", sizes=[(16, 16), (32, 32), (64, 64)])
    assert len(buf.getvalue()) > image_folder.SNIFF_BYTES
    tar = write_tar(tmp_path / "s.tar", [("k.bin", buf.getvalue()), ("k.txt", b"an icon")])
    with open(tar, "rb") as f:
        out = list(webdataset.shard_rows(f, "s.tar", "image"))
    assert [(r.get("__key__"), r.get(SKIP_COLUMN), r.get("txt")) for r in out] == [("s.tar/k", None, "an icon")]


def test_a_class_index_that_is_not_an_integer_never_stops_the_job(tmp_path, monkeypatch):
    """`c.cls` holding `dog` among integer class indices made one block's `cls` text and the
    others' int64, which Ray Data cannot concatenate (the repartition: fatal), whether or not
    the job read `cls`. Unread members are not columns; a read one skips that row, saying why."""
    from ray.data._internal.arrow_ops.transform_pyarrow import concat

    monkeypatch.setattr(webdataset, "ROWS_PER_BLOCK", 2)
    root = shards(tmp_path / "wds", [("a.jpg", IMAGES[0]), ("a.cls", b"3"), ("b.jpg", IMAGES[1]), ("b.cls", b"4"),
                                     ("c.jpg", IMAGES[2]), ("c.cls", b"dog"), ("d.jpg", IMAGES[3]), ("d.cls", b"5")])
    unread = concat(read_all(root, []))
    assert "cls" not in unread.column_names and unread.column(SKIP_COLUMN).null_count == 4
    read = concat(read_all(root, ["cls"]))
    assert list(zip(read.column(ITEM_COLUMN).to_pylist(), read.column(SKIP_COLUMN).to_pylist(), read.column("cls").to_pylist())) == [
        ("shard-00000.tar/a", None, 3), ("shard-00000.tar/b", None, 4),
        ("shard-00000.tar/c", "member 'cls' is not an integer", None), ("shard-00000.tar/d", None, 5)]
