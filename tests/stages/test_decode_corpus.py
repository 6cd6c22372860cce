"""The decode rule (stages/images.py) against Pillow's own verdict, over a corpus generated from
Pillow's registries: every format the installed Pillow (with pillow-heif) can write, in every
mode it accepts, every multi-frame writer with several frames, the containers no writer covers
(a flattened PSD, APNGs whose chunks libpng and Pillow read differently, a bomb in an .icns),
and truncated copies of all of them.

Pillow's verdict: ``Image.open`` identifies the bytes, frame 0 loads and converts to RGB, with its
decompression-bomb warning as an error. capjob's must be the same for every file, and a refusal
must carry the cause's kind and the decoder's own message.
"""

from __future__ import annotations

import functools
import io
import warnings

import numpy as np
import pytest
from PIL import Image, ImageFile, UnidentifiedImageError

from capjob.config import ImagesConfig
from capjob.schema import ImageRejected
from capjob.stages.images import _target_size, decode_image
from capjob.stages.sources.image_folder import image_extensions, sniff_image
from helpers.corpus import (
    _scene,
    apng_frame_count_out_of_range,
    apng_frame_sequence_error,
    heic,
    icns_bomb,
    psd,
)

# Pillow's remarks on the corpus's odd files, when the tests themselves open them.
pytestmark = pytest.mark.filterwarnings("ignore:Invalid APNG", "ignore:IM image format is deprecated")

# Every mode Pillow has; each writer takes those it accepts (a refusal to save is not a file).
MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV", "I", "I;16", "I;16B", "I;16L", "F")
SIZE = (64, 48)  # above images.min_side, below images.size: capjob neither stretches nor shrinks it
CFG = ImagesConfig(size=448)
_ALPHA = ("LA", "PA", "RGBA", "RGBa", "La")


def _in_mode(mode: str) -> Image.Image:
    scene = _scene(np.random.default_rng(len(mode) * 31 + ord(mode[-1])), *SIZE)
    try:
        im = scene.convert(mode)
    except ValueError:  # no conversion from RGB: the mode's own bytes
        raw = np.random.default_rng(3).integers(0, 256, len(Image.new(mode, SIZE).tobytes()), dtype=np.uint8)
        im = Image.frombytes(mode, SIZE, raw.tobytes())
    if mode == "P":
        im.info["transparency"] = 0
    return im


def _save(im: Image.Image, fmt: str, **kw) -> bytes | None:
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            im.save(buf, format=fmt, **kw)
    except Exception:  # noqa: BLE001 - this writer does not take this mode
        return None
    return buf.getvalue() or None


@functools.cache
def corpus() -> dict[str, bytes]:
    """name -> bytes; names are '<FORMAT>-<mode>' (+ '-seq' for several frames, + '-cut<n>')."""
    Image.init()
    files: dict[str, bytes] = {}
    for fmt in sorted(Image.SAVE):
        for mode in MODES:
            data = _save(_in_mode(mode), fmt)
            if data is not None:
                files[f"{fmt}-{mode}"] = data
    for fmt in sorted(Image.SAVE_ALL):
        frames = [_in_mode("RGB").rotate(90 * i) for i in range(3)]
        data = _save(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100)
        if data is not None:
            files[f"{fmt}-RGB-seq"] = data
    files["PSD-RGB"] = psd(_in_mode("RGB"))
    files["PSD-L"] = psd(_in_mode("L"))
    files["HEIF-RGB-oriented"] = heic(_in_mode("RGB"), orientation=6)
    files["APNG-frame-count-out-of-range"] = apng_frame_count_out_of_range()
    files["APNG-frame-sequence-error"] = apng_frame_sequence_error()
    files["ICNS-bomb"] = icns_bomb()
    files["ICNS-bomb-above-warning"] = icns_bomb(10000, 10000)
    for name, data in list(files.items()):
        files[f"{name}-cut{len(data) // 2}"] = data[: len(data) // 2]
        files[f"{name}-cut{len(data) - 16}"] = data[:-16]
    return files


def pillow_verdict(data: bytes) -> tuple[Image.Image | None, BaseException | None]:
    """(frame 0 in RGB, None) or (None, Pillow's error)."""
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            im.load()
            return im.convert("RGB"), None
    except Exception as e:  # noqa: BLE001 - the verdict is whatever Pillow raised
        return None, e


def test_the_corpus_covers_pillows_writers_and_modes():
    files = corpus()
    written = {name.split("-")[0] for name in files}
    assert {"MPO", "PSD", "SPIDER", "TIFF", "GIF", "PNG", "WEBP", "AVIF", "HEIF", "ICNS", "JPEG", "BMP", "TGA"} <= written
    assert {"PNG-RGB-seq", "TIFF-RGB-seq", "GIF-RGB-seq", "MPO-RGB-seq", "WEBP-RGB-seq"} <= set(files)
    assert {"TIFF-I;16", "TIFF-F", "TIFF-CMYK", "TIFF-LAB", "PNG-I;16", "JPEG-CMYK", "SPIDER-F"} <= set(files)


@pytest.mark.parametrize("name", sorted(corpus()))
def test_capjob_captions_exactly_what_pillow_reads(name):
    data = corpus()[name]
    expected, error = pillow_verdict(data)
    try:
        out = decode_image(data, CFG)
    except ImageRejected as rejection:
        assert error is not None, f"{name}: Pillow reads it, capjob quarantined it: {rejection.reason}"
        if isinstance(error, UnidentifiedImageError):
            assert rejection.kind == "not_an_image"
        elif isinstance(error, (Image.DecompressionBombError, Image.DecompressionBombWarning, MemoryError)):
            assert rejection.reason == f"too_large: {error}"
        else:
            assert rejection.reason == f"decode: {type(error).__name__}: {error}"
        return
    assert error is None, f"{name}: Pillow refuses it ({type(error).__name__}: {error}), capjob captioned it"
    assert out.pixels.dtype == np.uint8 and out.pixels.shape[2] == 3
    if name == "HEIF-RGB-oriented":
        assert out.pixels.shape[:2] == (SIZE[0], SIZE[1])  # turned upright once (by libheif)
        return
    width, height = _target_size(expected.width, expected.height, CFG)  # ICNS writes 1024 px: shrunk
    assert out.pixels.shape[:2] == (height, width)
    mode = Image.open(io.BytesIO(data)).mode
    if (width, height) == expected.size and mode not in _ALPHA and "transparency" not in Image.open(io.BytesIO(data)).info and not mode.startswith(("I", "F")):
        # Without alpha to flatten or a wide range to map, the pixels are Pillow's own.
        assert np.abs(out.pixels.astype(int) - np.asarray(expected, dtype=int)).max() <= 2, name


@pytest.mark.parametrize("name", sorted(corpus()))
def test_a_file_is_an_image_by_content_whatever_its_name(name):
    """What the image folder counts as an image (identified by its bytes, with no extension) is
    what Pillow identifies; and a format Pillow identifies has its extensions recognised."""
    data = corpus()[name]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fmt = Image.open(io.BytesIO(data)).format
    except Exception:  # noqa: BLE001 - not identified
        fmt = None
    assert sniff_image(data[:4096], (lambda: data) if len(data) > 4096 else None) is (fmt is not None)
    if fmt is not None:
        registered = {ext.lstrip(".") for ext, f in Image.registered_extensions().items() if f == fmt}
        assert registered <= image_extensions(), fmt
