"""Layout image_folder: what counts as an image file (by extension, or by content), and the
row count the listing gives (issue 31: files identified by content were left out of it)."""

from __future__ import annotations

import io
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from capjob.config import DataConfig, SourceFormat
from capjob.stages.sources import image_folder
from capjob.stages.sources.common import SKIP_COLUMN
from capjob.stages.sources.sample import _scene
from helpers.config import REPO
from helpers.corpus import heic, mpo


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _photo(seed: int, size: tuple[int, int] = (96, 64)) -> Image.Image:
    return _scene(np.random.default_rng(seed), *size)


def test_image_extensions_are_every_format_pillow_opens():
    known = image_extensions = image_folder.image_extensions()
    # MPO is read by Pillow's JPEG opener, HEIC/HEIF by pillow-heif, AVIF by Pillow itself.
    assert {"jpg", "jpeg", "png", "webp", "mpo", "heic", "heif", "avif", "psd", "icns", "tif", "fits"} <= known
    assert not {"pdf", "palm", "txt"} & image_extensions  # Pillow writes PDF and Palm, never reads them


# name -> (bytes, skip reason or None for an image row)
def _folder_files() -> dict[str, tuple[bytes, str | None]]:
    noise = Image.fromarray(np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    ico = _encode(noise, "ICO", sizes=[(16, 16), (32, 32), (64, 64)])
    assert len(ico) > image_folder.SNIFF_BYTES  # its entries lie beyond the first bytes read
    return {
        "a.jpg": (_encode(_photo(1), "JPEG"), None),
        "sub/b.png": (_encode(_photo(2), "PNG"), None),
        "sub/stereo.mpo": (mpo(), None),
        "sub/phone.HEIC": (heic(_photo(4)), None),
        "photo": (_encode(_photo(5), "JPEG"), None),           # no extension: identified by content
        "icon.dat": (ico, None),                               # identified from the whole file
        "scan.bin": (_encode(_photo(6), "TIFF"), None),
        "notes.txt": (b"a caption\n", "not an image (.txt)"),
        "p4.txt": (b"P4 is what the PPM reader claims, but this is text\n" * 100, "not an image (.txt)"),
        "blank": (b"", "not an image (.no extension)"),
        "model.safetensors": (np.random.default_rng(0).integers(0, 256, 9000, dtype=np.uint8).tobytes(), "not an image (.safetensors)"),
        ".hidden.jpg": (_encode(_photo(7), "JPEG"), "hidden file"),
        "_SUCCESS": (b"", "hidden file"),
    }


def _write(root: pathlib.Path, files: dict[str, tuple[bytes, str | None]]) -> None:
    for name, (data, _) in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)


def _count_and_rows(cfg: DataConfig, monkeypatch) -> tuple[int, dict[str, str | None]]:
    """read_image_folder's count (Ray Data stubbed: the count comes from the driver's listing)
    and every listed file's skip reason after its block is fetched."""
    class Stub:
        def map_batches(self, *args, **kwargs):
            return self

    monkeypatch.setattr(image_folder.ray.data, "from_arrow", lambda chunks: Stub())
    _, count = image_folder.read_image_folder(cfg)
    table, protocol = image_folder.list_items(cfg)
    out = image_folder.fetch_files(table, protocol, cfg.storage_options)
    rows = dict(zip(out.column("path").to_pylist(), out.column(SKIP_COLUMN).to_pylist()))
    assert all(c["bytes"] for c, s in zip(out.column("image").to_pylist(), rows.values()) if s is None)
    return count, rows


def test_files_identified_by_content_are_counted_and_non_images_are_not(tmp_path, monkeypatch):
    files = _folder_files()
    _write(tmp_path / "imgs", files)
    count, rows = _count_and_rows(DataConfig(format=SourceFormat.image_folder, path=str(tmp_path / "imgs")), monkeypatch)
    got = {pathlib.Path(p).relative_to(tmp_path / "imgs").as_posix(): s for p, s in rows.items()}
    assert got == {name: skip for name, (_, skip) in files.items()}
    assert count == sum(skip is None for _, skip in files.values()) == 7  # before: 4 (the named images)


def test_a_remote_folder_is_identified_the_same_way(s3_env, monkeypatch):
    files = _folder_files()
    s3_env.bucket("identify")
    for name, (data, _) in files.items():
        s3_env.fs.pipe_file(f"identify/imgs/{name}", data)
    count, rows = _count_and_rows(DataConfig(format=SourceFormat.image_folder, path="s3://identify/imgs"), monkeypatch)
    assert {p.split("identify/imgs/", 1)[1]: s for p, s in rows.items()} == {name: skip for name, (_, skip) in files.items()}
    assert count == 7


@pytest.mark.e2e
def test_phone_photos_and_unnamed_images_are_captioned_and_a_resume_counts_them(tmp_path):
    """The real pipeline over a folder of named, unnamed, MPO and HEIC images: each is captioned,
    the accounting adds up, and the same command again says nothing is left, with the true count."""
    files = _folder_files()
    _write(tmp_path / "imgs", files)
    images = sum(skip is None for _, skip in files.values())

    def capjob(run: str) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [sys.executable, "-m", "capjob", "experiment=offline", "caption.max_tokens=8", "dataset=image_folder",
             f"data.path={tmp_path / 'imgs'}", f"sink.path={tmp_path / 'out'}", f"hydra.run.dir={tmp_path / run}", f"job.run_id={run}"],
            cwd=REPO, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
        return proc

    first = capjob("first")
    assert f"captioned {images} / {images}" in first.stdout
    import pyarrow.parquet as pq

    captions = pq.read_table(sorted((tmp_path / "out" / "captions").glob("*.parquet")))
    keys = {pathlib.Path(k).name for k in captions.column("source_key").to_pylist()}
    assert keys == {pathlib.Path(n).name for n, (_, skip) in files.items() if skip is None}
    report = json.loads((tmp_path / "out" / "reports" / "first" / "report.json").read_text())
    skipped = {"hidden file": 2, "not an image (.txt)": 2, "not an image (.no extension)": 1, "not an image (.safetensors)": 1}
    assert report["skipped_by_source"] == skipped and report["captioned"] == images
    assert report["source_items"] == len(files) == images + sum(skipped.values())  # items seen = rows + skipped
    again = capjob("again")
    assert again.stdout.strip().splitlines() == [
        f"capjob: nothing left to do: all {images} rows of image_folder are already in {tmp_path / 'out'} "
        "(captions or quarantine); no engine started. job.resume=false captions them again"]


def test_a_decompression_bomb_is_an_image_whatever_its_name(tmp_path):
    """A bomb Pillow refuses at open (twice its limit) is an image too large, not 'not an image':
    named or not, it is a row, and the image stage quarantines it as too_large (once an
    extensionless one was skipped as `not an image (.no extension)`)."""
    from capjob.config import ImagesConfig
    from capjob.schema import ImageRejected
    from capjob.stages.images import decode_image
    from helpers.corpus import icns_bomb

    bomb = _encode(Image.new("1", (20000, 20000)), "PNG")
    assert image_folder.sniff_image(bomb) and image_folder.sniff_image(icns_bomb())
    (tmp_path / "imgs").mkdir()
    for name in ("bomb", "bomb.dat", "bomb.png"):
        (tmp_path / "imgs" / name).write_bytes(bomb)
    table, _ = image_folder.list_items(DataConfig(format=SourceFormat.image_folder, path=str(tmp_path / "imgs")))
    assert table.column(SKIP_COLUMN).to_pylist() == [None, None, None]
    with pytest.raises(ImageRejected) as e:
        decode_image(bomb, ImagesConfig())
    assert e.value.kind == "too_large"
