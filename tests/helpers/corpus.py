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
