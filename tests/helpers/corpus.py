"""A corpus of broken and awkward images, the way scraped data brings them."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

from capjob.stages.sources.sample import _scene


def _save(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _png_with_declared_size(width: int, height: int) -> bytes:
    """A valid PNG header declaring a huge canvas, with almost no pixel data (a bomb)."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def broken_images() -> dict[str, tuple[bytes, str]]:
    """name -> (bytes, expected rejection kind)."""
    rng = np.random.default_rng(1)
    good_jpeg = _save(_scene(rng, 640, 480), "JPEG", quality=90)
    return {
        "truncated.jpg": (good_jpeg[: len(good_jpeg) // 2], "decode"),
        "empty.jpg": (b"", "empty"),
        "random.jpg": (rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(), "not_an_image"),
        "page.jpg": (b"<!DOCTYPE html><html><body>404 Not Found</body></html>", "not_an_image"),
        "bomb.png": (_png_with_declared_size(40000, 40000), "too_large"),
    }


def awkward_images() -> dict[str, tuple[bytes, tuple[int, int]]]:
    """name -> (bytes, size (w, h) as displayed): valid images that must be normalised."""
    rng = np.random.default_rng(2)
    scene = _scene(rng, 640, 480)
    frames = [_scene(rng, 120, 90) for _ in range(3)]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    sixteen = Image.fromarray((np.linspace(0, 65535, 200 * 100).reshape(100, 200)).astype(np.uint16))
    return {
        "cmyk.jpg": (_save(scene.convert("CMYK"), "JPEG"), (640, 480)),
        "sixteen_bit.png": (_save(sixteen, "PNG"), (200, 100)),
        "palette_alpha.png": (_save(scene.convert("RGBA").convert("P"), "PNG", transparency=0), (640, 480)),
        "rgba.png": (_save(scene.convert("RGBA"), "PNG"), (640, 480)),
        "gray.jpg": (_save(scene.convert("L"), "JPEG"), (640, 480)),
        "animated.gif": (gif.getvalue(), (120, 90)),
        "exif_rotated.jpg": (_save(scene, "JPEG", exif=exif.tobytes()), (480, 640)),
        "one_pixel.png": (_save(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG"), (1, 1)),
        "very_wide.png": (_save(_scene(rng, 4000, 16), "PNG"), (4000, 16)),
        "webp.webp": (_save(scene, "WEBP"), (640, 480)),
    }


# --- Files the decode rule must read (issue 31): built here, as the tools that write them do. ----


def psd(im: Image.Image) -> bytes:
    """A Photoshop file holding only its composite image (no layers), raw 8-bit, as many tools
    export flattened PSDs. im: mode L or RGB."""
    channels = {"L": 1, "RGB": 3}[im.mode]
    color_mode = {"L": 1, "RGB": 3}[im.mode]
    header = b"8BPS" + struct.pack(">H6xHIIHH", 1, channels, im.height, im.width, 8, color_mode)
    planes = b"".join(band.tobytes() for band in im.split())
    # Empty colour-mode data, image resources and layer/mask sections, then raw (0) image data.
    return header + struct.pack(">III", 0, 0, 0) + struct.pack(">H", 0) + planes


def icns_with_png(png: bytes, kind: bytes = b"ic10") -> bytes:
    """An Apple icon file with one entry (ic10: 1024x1024) holding `png`; Pillow's ICNS plugin
    learns the PNG's own size only when it loads the entry."""
    entry = kind + struct.pack(">I", 8 + len(png)) + png
    return b"icns" + struct.pack(">I", 8 + len(entry)) + entry


def icns_bomb(width: int = 40000, height: int = 40000) -> bytes:
    """An .icns whose 1024x1024 entry is a PNG declaring width x height pixels."""
    return icns_with_png(_png_with_declared_size(width, height))


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """The (type, body) chunks of a PNG."""
    chunks, pos = [], 8
    while pos + 8 <= len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        chunks.append((data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]))
        pos += 12 + length
    return chunks


def png_from_chunks(chunks: list[tuple[bytes, bytes]]) -> bytes:
    return b"\x89PNG\r\n\x1a\n" + b"".join(
        struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
        for kind, body in chunks)


def apng(frames: int = 3, size: tuple[int, int] = (60, 40)) -> bytes:
    """An animated PNG of `frames` frames, as Pillow writes it."""
    rng = np.random.default_rng(4)
    ims = [_scene(rng, *size) for _ in range(frames)]
    return _save(ims[0], "PNG", save_all=True, append_images=ims[1:], duration=100)


def apng_frame_count_out_of_range() -> bytes:
    """An APNG whose acTL declares 2**31 + 1 frames: Pillow ignores the animation and reads the
    default image; libpng refuses the whole file ('PNG unsigned integer out of range')."""
    chunks = png_chunks(apng())
    return png_from_chunks([(k, struct.pack(">II", 0x80000001, 0) if k == b"acTL" else b) for k, b in chunks])


def apng_frame_sequence_error() -> bytes:
    """An APNG missing its second fcTL, so frame 1's fdAT follows the first frame's IDAT with
    sequence number 2: Pillow refuses the first frame ('APNG contains frame sequence errors');
    libpng, reading the IDAT only, decodes it."""
    chunks = png_chunks(apng())
    second_fctl = [i for i, (k, _) in enumerate(chunks) if k == b"fcTL"][1]
    return png_from_chunks(chunks[:second_fctl] + chunks[second_fctl + 1:])


def astronomy_image(width: int = 256, height: int = 192) -> Image.Image:
    """A 16-bit (I;16) sky frame as a CCD writes it: a dark background of a few tens of counts,
    faint extended light and stars up to a few hundred, and saturated hot pixels at 65535."""
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[0:height, 0:width]
    sky = 40 + rng.normal(0, 4, (height, width))
    sky += 120 * np.exp(-(((xx - width * 0.4) / (width * 0.2)) ** 2 + ((yy - height * 0.5) / (height * 0.15)) ** 2))
    for x, y, peak in zip(rng.integers(0, width, 40), rng.integers(0, height, 40), rng.uniform(60, 180, 40)):
        sky += peak * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / 4.0)
    counts = np.clip(sky, 0, 65535).astype(np.uint16)
    counts.flat[rng.integers(0, counts.size, 12)] = 65535  # cosmic rays / hot pixels
    return Image.fromarray(counts)


def heic(im: Image.Image, orientation: int = 1) -> bytes:
    """im as HEIC (HEVC in HEIF), with an EXIF orientation tag as phones write it."""
    import pillow_heif

    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    pillow_heif.from_pillow(im).save(buf, quality=90, exif=exif.tobytes())
    return buf.getvalue()


def mpo(frames: int = 2, size: tuple[int, int] = (80, 60)) -> bytes:
    """A JPEG multi-picture file (stereo cameras, many phones) of `frames` frames."""
    rng = np.random.default_rng(8)
    ims = [_scene(rng, *size) for _ in range(frames)]
    return _save(ims[0], "MPO", save_all=True, append_images=ims[1:])
