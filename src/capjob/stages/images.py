"""Stage: decode each image once, reject what cannot be captioned, normalise and resize the rest.

What is captioned -- one rule, applied by `decode_image` and stated in the README ("What counts
as an image"): an image is captioned when the installed decoders (Pillow and the plugins
registered with it: pillow-heif for HEIC/HEIF) decode it to pixels; a sequence (GIF, APNG,
multi-frame TIFF, MPO, layered PSD) gives the frame Pillow opens at, its first (a PSD's
composite). Pillow's verdict is the verdict: a faster decoder used below never refuses what
Pillow reads nor accepts what Pillow refuses. Everything else is quarantined with the cause:

* ``empty``: no bytes;
* ``not_an_image``: no decoder identifies the bytes (what they look like instead: HTML, JSON...);
* ``too_large``: the image, or one a container holds (an .icns entry, found only when it
  loads), is larger than ``images.max_pixels`` (Pillow's decompression-bomb limit is set to it),
  or decoding ran out of memory -- whichever decoder or step saw it;
* ``aspect_ratio``: too thin for a vision patch;
* ``decode``: anything else, with the decoder's own error (``<type>: <message>``).

A lazy ``Image.open`` (what the seed's ``is_valid_image`` does) only parses the header, so
truncated files pass it and crash the engine later. Here every image is fully decoded, its
declared size is checked before decoding (decompression bombs), and the decoded image is
reduced as early as possible: JPEGs decode at 1/2, 1/4 or 1/8 scale via ``draft`` when the
target is much smaller, then one resampling pass brings it to the configured size. What leaves
this stage is the small RGB array, never the original bytes.

PNG and WebP cannot be decoded at reduced scale, so their full decode is most of the cost.
Pillow's own PNG decoder (generic unfiltering, then unpacking to 4 bytes a pixel) and its WebP
path (the animation decoder, even for stills) take about twice as long as libpng and libwebp
called directly, so common PNG and WebP images go through imagecodecs' bindings to those
libraries; Pillow still parses the header and handles everything else (palette and 16-bit
grey PNGs, animations -- APNG frames are checked by Pillow only --, the other formats), and
decodes again whatever libpng or libwebp refuse, so only Pillow's own failure is a verdict.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import pillow_heif
from PIL import Image, ImageFile, JpegImagePlugin, UnidentifiedImageError

try:
    import imagecodecs
except ImportError:  # the Pillow path below decodes everything, only slower
    imagecodecs = None

from capjob import metrics
from capjob.config import ImagesConfig, ResizeMode, SinkConfig
from capjob.schema import QUARANTINE, ImageRejected, block_digest
from capjob.stages.sources.cells import resolve_rows
from capjob.stages.tables import TableWriter, quarantine_table

# Registered at import, so in every Ray worker that decodes (image_folder.py registers it where
# files are identified): HEIC/HEIF, as iPhones and many Android phones save photos. libheif
# applies the file's rotation and mirroring, and pillow-heif then reports EXIF orientation 1,
# so the orientation step below never turns a HEIC twice.
pillow_heif.register_heif_opener()

# Qwen2-VL-style processors refuse sides shorter than one 28 px patch and aspect ratios over 200.
_MAX_ASPECT = 200


@dataclass(frozen=True)
class DecodedImage:
    pixels: np.ndarray  # H x W x 3, uint8
    source_width: int
    source_height: int
    source_format: str


def _sniff(data: bytes) -> str:
    head = data[:64].lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html", b"<?xml", b"<svg")):
        return "looks like HTML/XML text"
    if head[:1] in (b"{", b"["):
        return "looks like JSON text"
    try:
        data[:64].decode("ascii")
        return "looks like plain text"
    except UnicodeDecodeError:
        return f"unknown binary format (starts with {data[:8].hex()})"


# One-channel modes wider than 8 bits: 16-bit grey (PNG, TIFF, astronomy and microscopy
# frames), 32-bit integers and floats (TIFF, FITS, SPIDER).
_WIDE_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I", "F"})
# The robust range of wide data: percentiles that a few saturated pixels, cosmic rays or hot
# pixels do not move (astropy's PercentileInterval(99), a common display default).
_ROBUST_PERCENTILES = (0.5, 99.5)
# Percentiles are estimated on at most about this many pixels (a regular subsample).
_PERCENTILE_SAMPLE = 1_000_000


def display_grey(im: Image.Image) -> Image.Image:
    """Mode L (0..255) of a one-channel image wider than 8 bits (_WIDE_MODES), H x W kept.

    Pillow's own conversion (``convert("L")``) clips each value to 0..255. Where the data already
    are display values -- 8-bit data stored wide, a dark sky frame whose few saturated stars and
    hot pixels clip -- that is what Pillow shows and what is kept, exactly. Where it would lose the
    picture -- a 16-bit photo or a 12-bit microscope frame (values above 255: white), floats in
    0..1 (black) -- the robust range (_ROBUST_PERCENTILES of the finite values) is stretched
    linearly onto 0..255 and the rest clipped. Scaling by the maximum instead (capjob before
    issue 31) turns a frame with one saturated pixel at 65535 black."""
    arr = np.asarray(im, dtype=np.float64)
    step = max(1, int(np.sqrt(arr.size / _PERCENTILE_SAMPLE)))
    sample = arr[::step, ::step]
    sample = sample[np.isfinite(sample)]
    lo, hi = (float(v) for v in np.percentile(sample, _ROBUST_PERCENTILES)) if sample.size else (0.0, 0.0)
    if not (0.0 <= lo and hi <= 255.0 and hi - lo > 1.0) and hi > lo:
        arr = (arr - lo) * (255.0 / (hi - lo))
    return Image.fromarray(np.clip(np.nan_to_num(arr, nan=0.0), 0, 255).astype(np.uint8), "L")


def _to_rgb(im: Image.Image) -> Image.Image:
    """Every mode a VLM cannot take becomes 8-bit RGB; transparency is flattened onto white."""
    if im.mode == "RGB":
        return im
    if im.mode in _WIDE_MODES:
        return display_grey(im).convert("RGB")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def _target_size(width: int, height: int, cfg: ImagesConfig) -> tuple[int, int]:
    if cfg.resize == ResizeMode.square:
        return cfg.size, cfg.size
    scale = min(1.0, cfg.size / max(width, height))
    w, h = max(1, round(width * scale)), max(1, round(height * scale))
    # Too thin or too small for a vision patch: stretch the short side up to min_side.
    floor = min(max(cfg.min_side, 1), cfg.size)
    return max(w, floor), max(h, floor)


_ORIENTATION = 0x0112  # EXIF Orientation tag
# What ImageOps.exif_transpose does for each EXIF orientation.
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
# Modes that can be resized before _to_rgb with the same result (up to rounding): converting
# L to RGB copies the channel, RGBX drops its padding byte, and flattening alpha onto white is
# linear, which commutes with PIL's (premultiplied) resampling. Everything else is normalised
# at full size first.
_RESIZE_FIRST = frozenset({"RGB", "RGBX", "L", "RGBA", "LA"})


def _orientation(im: Image.Image) -> Any:
    """The EXIF orientation of `im`, 1 where it has none or its EXIF block does not parse (a
    camera's or editor's damaged metadata): the pixels Pillow reads are captioned as they are."""
    try:
        return im.getexif().get(_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - Pillow raises SyntaxError, struct.error, ValueError... on damaged EXIF
        return 1


def _stored_target(width: int, height: int, orientation: Any, cfg: ImagesConfig) -> tuple[int, int]:
    """The output size in the image's stored orientation (EXIF 5-8 swap the sides)."""
    if orientation in (5, 6, 7, 8):
        target_w, target_h = _target_size(height, width, cfg)
        return target_h, target_w
    return _target_size(width, height, cfg)


# PNG modes whose pixels libpng returns as 1-4 channels of 8 (or 16) bits; palette and 16-bit
# grey PNGs keep Pillow's handling (_to_rgb).
_FAST_PNG_MODES = frozenset({"RGB", "RGBA", "L", "LA"})
_CHANNEL_MODES = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}


# APNG chunks: Pillow checks the frame sequence (and refuses a broken one) even when it reads
# only the first frame, libpng skips them, so such PNGs are Pillow's alone.
_APNG_CHUNKS = frozenset({b"acTL", b"fcTL", b"fdAT"})


def _png_chunk_types(data: bytes) -> set[bytes]:
    """The chunk types of a PNG, read from the chunk headers alone (a few hundred for a large
    image: far cheaper than scanning its bytes)."""
    types, pos = set(), 8
    while pos + 8 <= len(data):
        types.add(data[pos + 4:pos + 8])
        pos += 12 + int.from_bytes(data[pos:pos + 4], "big")
    return types


def _decode_fast(im: Image.Image, data: bytes) -> Image.Image | None:
    """The image decoded by libpng or libwebp where they read it as Pillow would; None where the
    file is Pillow's to decode. Raises what those libraries raise."""
    width, height = im.size
    if im.format == "WEBP" and im.mode in ("RGB", "RGBA") and not getattr(im, "is_animated", False):
        # Four bytes a pixel is Pillow's own layout, so the decoded buffer becomes the image
        # without a full-size copy (RGBX: the opaque case).
        mode = "RGBX" if im.mode == "RGB" else "RGBA"
        rgba = imagecodecs.webp_decode(data, hasalpha=True)
        return _with_info(Image.frombuffer(mode, (width, height), rgba, "raw", mode, 0, 1), im)
    if im.format == "PNG" and im.mode in _FAST_PNG_MODES:
        chunks = _png_chunk_types(data)
        # Pillow finds an eXIf chunk stored after the pixels only by decoding them itself.
        if chunks & _APNG_CHUNKS or ("exif" not in im.info and b"eXIf" in chunks):
            return None
        pixels = imagecodecs.png_decode(data)
        if pixels.dtype == np.uint16:  # 16-bit RGB(A)/LA: the high byte, as Pillow reads them
            pixels = (pixels >> 8).astype(np.uint8)
        channels = 1 if pixels.ndim == 2 else pixels.shape[2]
        return _with_info(Image.fromarray(pixels, _CHANNEL_MODES[channels]), im)
    return None


def _decode_pixels(im: Image.Image, data: bytes) -> Image.Image:
    """The fully decoded image: truncated or corrupt data raises here, with Pillow's error."""
    if imagecodecs is not None:
        try:
            fast = _decode_fast(im, data)
        except Exception:  # noqa: BLE001 - libpng/libwebp refuse some files Pillow reads (an APNG's frame count, a missing IEND): Pillow decides
            fast = None
        if fast is not None:
            return fast
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    im.load()
    return im


def _with_info(decoded: Image.Image, header: Image.Image) -> Image.Image:
    decoded.info = header.info  # EXIF orientation is read from it
    decoded.format = header.format
    return decoded


def rejection(error: BaseException, size: tuple[int, int]) -> ImageRejected:
    """The quarantine reason for an error a decoder raised on an image of `size` (w, h) pixels:
    its kind follows the cause, whichever decoder or step saw it (module docstring)."""
    if isinstance(error, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return ImageRejected("too_large", str(error))
    if isinstance(error, MemoryError):
        return ImageRejected("too_large", f"out of memory decoding {size[0]}x{size[1]}")
    return ImageRejected("decode", f"{type(error).__name__}: {error}")


def _check_size(width: int, height: int, cfg: ImagesConfig) -> None:
    if width <= 0 or height <= 0:
        raise ImageRejected("decode", f"invalid size {width}x{height}")
    if width * height > cfg.max_pixels:
        raise ImageRejected("too_large", f"{width * height:.2g} pixels ({width}x{height}) > images.max_pixels={cfg.max_pixels:.2g}")


def decode_image(data: bytes | None, cfg: ImagesConfig) -> DecodedImage:
    """Decode, validate and resize one image by the decode rule (module docstring): pixels
    H x W x 3 uint8, at most cfg.size a side. Raises ImageRejected with the reason."""
    if data is None or len(data) == 0:
        raise ImageRejected("empty", "0 bytes")
    # Pillow's bomb limit (process-wide) is images.max_pixels: raised for gigapixel scans, lowered
    # to save memory, it holds at open (twice it: an error) and where only loading reveals the
    # size (an .icns entry: a warning, an error below).
    Image.MAX_IMAGE_PIXELS = cfg.max_pixels
    try:
        with warnings.catch_warnings():
            # PIL warns (and above 2x errors) on huge declared sizes; images.max_pixels applies below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageRejected("not_an_image", _sniff(data)) from None
    except Exception as e:  # noqa: BLE001 - PIL raises many types for broken headers
        raise rejection(e, (0, 0)) from None

    width, height = im.size
    fmt = im.format or "unknown"
    _check_size(width, height, cfg)
    if max(width, height) / min(width, height) > _MAX_ASPECT * 10:
        raise ImageRejected("aspect_ratio", f"{width}x{height} is too thin to caption")

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # An image a container holds is sized only when it loads (an .icns entry): Pillow's
            # bomb warning there is the cause of a failure, not noise.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            # Pillow opens a sequence at its first frame (a PSD at its composite): no seek, which
            # single-frame PSD and SPIDER files refuse.
            jpeg = isinstance(im, JpegImagePlugin.JpegImageFile)  # JPEG, and MPO's first frame
            # Sizes are planned in the stored orientation and the (small) result is turned
            # upright at the end: rotating first would copy the full-size image.
            orientation = _orientation(im) if jpeg else None
            if jpeg:
                # Decode at the smallest DCT scale (1/2, 1/4, 1/8) that still covers the target's
                # longer side on both axes (asking for the exact target would often pick 1/8 where
                # 1/4 is taken now, for visibly softer 'fit' results).
                side = max(_stored_target(width, height, orientation, cfg))
                im.draft("RGB" if im.mode not in ("L", "CMYK") else im.mode, (side, side))
            im = _decode_pixels(im, data)
            if not jpeg:  # a container may settle its size at load (an .icns picks its largest entry)
                _check_size(*im.size, cfg)
                width, height = im.size
            if orientation is None:
                orientation = _orientation(im)
            target_w, target_h = _stored_target(width, height, orientation, cfg)
            if im.mode not in _RESIZE_FIRST:
                im = _to_rgb(im)
            if im.size != (target_w, target_h):
                # reducing_gap: a cheap box reduce first, then BICUBIC for the last factor of 2.
                im = im.resize((target_w, target_h), Image.Resampling.BICUBIC, reducing_gap=2.0)
            im = _to_rgb(im)
            transpose = _TRANSPOSE.get(orientation)
            if transpose is not None:
                im = im.transpose(transpose)
            pixels = np.asarray(im, dtype=np.uint8)
    except ImageRejected:
        raise
    except Exception as e:  # noqa: BLE001 - truncated/corrupt data raises OSError, SyntaxError, ValueError...
        raise rejection(e, (width, height)) from None
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ImageRejected("decode", f"unexpected decoded shape {pixels.shape}")
    return DecodedImage(pixels=pixels, source_width=width, source_height=height, source_format=fmt)


def prepare_images(
    batch: dict[str, np.ndarray],
    *,
    cfg: ImagesConfig,
    image_column: str,
    passthrough_columns: list[str],
    fetcher: Any,
    quarantine: "QuarantineTarget",
) -> dict[str, Any]:
    """map_batches UDF: decode every image once; valid ones continue as small RGB arrays,
    rejected ones are written to quarantine with their reason and leave the stream. Cells that
    point elsewhere are fetched first, together (`fetcher`: stages.sources.cells.Fetcher)."""
    ids = list(batch["id"])
    kept: list[int] = []
    pixels: list[np.ndarray] = []
    widths: list[int] = []
    heights: list[int] = []
    rejected: list[dict[str, Any]] = []
    for i, data in enumerate(resolve_rows(batch, image_column, fetcher, quarantine.run_id)):
        if data is None:  # skipped at the fetch (X-Robots-Tag): counted as the source's skipped item
            continue
        try:
            if isinstance(data, ImageRejected):
                raise data
            decoded = decode_image(data, cfg)
        except ImageRejected as rejection:
            rejected.append({"id": ids[i], "source_key": batch["source_key"][i], "stage": "images", "reason": rejection.reason})
            continue
        kept.append(i)
        pixels.append(decoded.pixels)
        widths.append(decoded.source_width)
        heights.append(decoded.source_height)
    quarantine.write(rejected, ids)
    out: dict[str, Any] = {
        "id": np.asarray([ids[i] for i in kept], dtype=object),
        "source_key": np.asarray([batch["source_key"][i] for i in kept], dtype=object),
        "image_width": np.asarray(widths, dtype=np.int64),
        "image_height": np.asarray(heights, dtype=np.int64),
    }
    # Filled one by one: equal shapes would otherwise broadcast into one 4-D array.
    image_array = np.empty(len(pixels), dtype=object)
    for j, p in enumerate(pixels):
        image_array[j] = p
    out["image"] = image_array
    for column in passthrough_columns:
        out[column] = np.asarray([batch[column][i] for i in kept], dtype=object)
    return out


@dataclass(frozen=True)
class QuarantineTarget:
    """Where the image stage sends rejects, and how it accounts for the rows it saw."""

    sink: SinkConfig
    run_id: str
    model_name: str

    def write(self, rejected: list[dict[str, Any]], batch_ids: list[str]) -> None:
        key = block_digest(batch_ids)
        if rejected:
            rows = [{**r, "model": self.model_name, "run_id": self.run_id} for r in rejected]
            TableWriter(self.sink).write(QUARANTINE, quarantine_table(rows), f"{self.run_id}-img-{key}")
        metrics.record(self.run_id, "images_in", key, len(batch_ids))
        metrics.record(self.run_id, "images_rejected", key, len(rejected))
        for kind in {r["reason"].split(":", 1)[0] for r in rejected}:
            count = sum(r["reason"].startswith(kind + ":") for r in rejected)
            metrics.record(self.run_id, f"rejected:{kind}", key, count)
