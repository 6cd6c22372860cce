import io
import zlib

import numpy as np
import pytest
from PIL import Image

from capjob.config import ImagesConfig, ResizeMode
from capjob.stages import images
from capjob.schema import ImageRejected
from capjob.stages.images import decode_image
from capjob.stages.sources.cells import identity, resolve_cell
from helpers.corpus import awkward_images, broken_images

CFG = ImagesConfig(size=448)


@pytest.mark.parametrize("name", sorted(broken_images()))
def test_broken_images_are_rejected_with_a_reason(name):
    data, kind = broken_images()[name]
    with pytest.raises(ImageRejected) as e:
        decode_image(data, CFG)
    assert e.value.kind == kind
    assert e.value.reason.startswith(f"{kind}: ") and len(e.value.reason) > len(kind) + 3


def test_truncated_jpeg_passes_a_lazy_open_but_not_capjob():
    data, _ = broken_images()["truncated.jpg"]
    Image.open(io.BytesIO(data))  # the seed's is_valid_image check: no error
    with pytest.raises(ImageRejected, match="^decode: .*truncated"):
        decode_image(data, CFG)


def test_html_is_named_as_such():
    with pytest.raises(ImageRejected, match="HTML"):
        decode_image(broken_images()["page.jpg"][0], CFG)


@pytest.mark.parametrize("name", sorted(awkward_images()))
def test_awkward_images_become_small_rgb(name):
    data, (w, h) = awkward_images()[name]
    out = decode_image(data, CFG)
    assert out.pixels.dtype == np.uint8 and out.pixels.ndim == 3 and out.pixels.shape[2] == 3
    height, width = out.pixels.shape[:2]
    assert max(width, height) <= CFG.size
    assert min(width, height) >= CFG.min_side  # one vision patch at least
    if min(w, h) >= CFG.min_side:
        # Aspect kept (within rounding) for images that need no stretching.
        assert abs(width / height - w / h) < 0.05 * (w / h)


def test_exif_orientation_is_applied():
    out = decode_image(awkward_images()["exif_rotated.jpg"][0], CFG)
    height, width = out.pixels.shape[:2]
    assert height > width  # stored landscape, displayed portrait


def test_sixteen_bit_keeps_its_range():
    out = decode_image(awkward_images()["sixteen_bit.png"][0], CFG)
    assert out.pixels.min() < 10 and out.pixels.max() > 245  # scaled, not clipped to white


def test_alpha_is_flattened_on_white():
    im = Image.new("RGBA", (100, 100), (0, 0, 0, 0))
    buf = io.BytesIO()
    im.save(buf, "PNG")
    out = decode_image(buf.getvalue(), CFG)
    assert out.pixels.mean() > 250


def test_large_jpeg_decodes_reduced_and_reports_source_size():
    rng = np.random.default_rng(3)
    big = Image.fromarray(rng.integers(0, 256, (3000, 4000, 3), dtype=np.uint8))
    buf = io.BytesIO()
    big.save(buf, "JPEG", quality=80)
    out = decode_image(buf.getvalue(), CFG)
    assert (out.source_width, out.source_height) == (4000, 3000)
    assert out.pixels.shape == (336, 448, 3)


def test_square_mode_matches_the_seed_size():
    data, _ = awkward_images()["webp.webp"]
    out = decode_image(data, ImagesConfig(size=225, resize=ResizeMode.square))
    assert out.pixels.shape == (225, 225, 3)


def test_image_cells():
    assert resolve_cell({"bytes": b"abc", "path": "x.jpg"}) == b"abc"
    assert resolve_cell({"bytes": None, "path": "x.jpg"}) == "x.jpg"
    assert resolve_cell(b"abc") == b"abc"
    assert resolve_cell(None).reason == "empty: no image (null cell)"
    assert resolve_cell(3.5).reason == "unsupported: image cell of type float"
    assert identity({"bytes": None, "path": "x.jpg"}) == (None, "x.jpg") and identity(3.5) == (None, None)


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _photo(mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(5)
    smooth = np.kron(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8), np.ones((16, 16, 1), np.uint8))
    return Image.fromarray(smooth).convert(mode)


def _decode_with_pillow_only(data: bytes, cfg: ImagesConfig, monkeypatch) -> np.ndarray:
    with monkeypatch.context() as m:
        m.setattr(images, "imagecodecs", None)
        return decode_image(data, cfg).pixels


@pytest.mark.parametrize(
    "fmt,mode", [("PNG", "RGB"), ("PNG", "RGBA"), ("PNG", "L"), ("PNG", "LA"), ("WEBP", "RGB"), ("WEBP", "RGBA")]
)
def test_png_and_webp_use_libpng_libwebp_with_pillows_result(fmt, mode, monkeypatch):
    data = _encode(_photo(mode), fmt, **({"quality": 90} if fmt == "WEBP" else {}))
    opened = Image.open(io.BytesIO(data))
    assert images._decode_pixels(opened, data) is not opened  # decoded by libpng/libwebp, not Pillow
    for cfg in (CFG, ImagesConfig(size=225, resize=ResizeMode.square)):
        fast = decode_image(data, cfg).pixels
        pillow = _decode_with_pillow_only(data, cfg, monkeypatch)
        assert fast.shape == pillow.shape
        assert np.abs(fast.astype(int) - pillow.astype(int)).max() <= 2


def test_sixteen_bit_rgb_png_keeps_the_high_byte(monkeypatch):
    rgb16 = (np.asarray(_photo("RGB"), dtype=np.uint16) * 257).astype(">u2")
    data = _png(rgb16.shape[1], rgb16.shape[0], bit_depth=16, color_type=2, rows=rgb16)
    fast = decode_image(data, CFG).pixels
    assert np.array_equal(fast, _decode_with_pillow_only(data, CFG, monkeypatch))


# A flipped byte in a WebP is not among them: libwebp has no checksum and decodes other pixels.
@pytest.mark.parametrize("fmt,damage", [("PNG", "truncated"), ("PNG", "flipped byte"), ("WEBP", "truncated")])
def test_damaged_png_and_webp_are_rejected(fmt, damage):
    data = _encode(Image.fromarray(np.random.default_rng(6).integers(0, 256, (300, 400, 3), dtype=np.uint8)), fmt)
    if damage == "truncated":
        data = data[: len(data) // 2]
    else:
        data = data[:2000] + bytes([data[2000] ^ 0xFF]) + data[2001:]  # inside IDAT: CRC error
    with pytest.raises(ImageRejected, match="^decode: "):
        decode_image(data, CFG)


def test_png_exif_after_the_pixels_still_turns_the_image():
    exif = Image.Exif()
    exif[0x0112] = 6
    payload = exif.tobytes()[6:]  # eXIf holds the TIFF structure without JPEG's "Exif\0\0"
    plain = _encode(_photo("RGB"), "PNG")
    iend = plain.rindex(b"IEND") - 4
    data = plain[:iend] + _chunk(b"eXIf", payload) + plain[iend:]
    opened = Image.open(io.BytesIO(data))
    assert images._decode_pixels(opened, data) is opened  # Pillow's decoder reads the late eXIf
    out = decode_image(data, CFG)
    height, width = out.pixels.shape[:2]
    assert height > width  # stored 640x480, shown rotated


def _chunk(kind: bytes, body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")


def _png(width: int, height: int, *, bit_depth: int, color_type: int, rows: np.ndarray) -> bytes:
    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([bit_depth, color_type, 0, 0, 0])
    raw = b"".join(b"\x00" + rows[y].tobytes() for y in range(height))
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(raw)) + _chunk(b"IEND", b"")
