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
from helpers.corpus import (
    apng_frame_count_out_of_range,
    apng_frame_sequence_error,
    astronomy_image,
    awkward_images,
    broken_images,
    heic,
    icns_bomb,
    mpo,
    psd,
)

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


# --- The decode rule (issue 31): what Pillow reads is captioned, as Pillow reads it ---------------


def _pillow_rgb(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def _spider(im: Image.Image) -> bytes:
    return _encode(im.convert("F"), "SPIDER")


@pytest.mark.parametrize("name,make", [
    ("mpo", lambda: mpo(frames=2, size=(160, 120))),
    ("psd rgb", lambda: psd(_photo("RGB").resize((160, 120)))),
    ("psd grey", lambda: psd(_photo("L").resize((160, 120)))),
    ("spider", lambda: _spider(_photo("L").resize((160, 120)))),
])
def test_single_and_first_frames_pillow_reads_are_captioned_as_pillow_reads_them(name, make):
    # Before: MPO skipped by the image folder, PSD 'attempt to seek outside sequence', SPIDER
    # 'attempt to seek in a non-stack file'.
    data = make()
    out = decode_image(data, CFG)
    assert out.pixels.shape == (120, 160, 3)
    assert np.abs(out.pixels.astype(int) - _pillow_rgb(data).astype(int)).max() <= 1


@pytest.mark.filterwarnings("ignore:Invalid APNG")  # Pillow's, when the test opens it
def test_an_apng_pillow_reads_is_captioned_though_libpng_refuses_it():
    import imagecodecs

    data = apng_frame_count_out_of_range()
    with pytest.raises(Exception, match="out of range"):
        imagecodecs.png_decode(data)
    out = decode_image(data, CFG)
    assert np.array_equal(out.pixels, _pillow_rgb(data))  # the default image, Pillow's frame 0


def test_an_apng_pillow_refuses_is_quarantined_though_libpng_reads_it():
    import imagecodecs

    data = apng_frame_sequence_error()
    imagecodecs.png_decode(data)  # libpng alone would caption it
    with pytest.raises(ImageRejected) as e:
        decode_image(data, CFG)
    assert e.value.reason == "decode: SyntaxError: APNG contains frame sequence errors"


def test_a_failure_of_the_fast_decoder_falls_back_to_pillow(monkeypatch):
    data = _encode(_photo("RGB"), "PNG")[:-12]  # no IEND: libpng stops, Pillow reads the pixels
    tried = []
    real = images.imagecodecs.png_decode
    monkeypatch.setattr(images.imagecodecs, "png_decode", lambda d: tried.append(1) or real(d))
    out = decode_image(data, CFG)
    assert tried and out.pixels.shape == (336, 448, 3)
    assert np.array_equal(out.pixels, _decode_with_pillow_only(data, CFG, monkeypatch))


@pytest.mark.parametrize("width,height", [(40000, 40000), (10000, 10000)])
def test_a_bomb_inside_a_container_is_too_large(width, height):
    # The .icns declares 1024x1024; its PNG entry declares the bomb's size, seen only at load:
    # above Pillow's limit (a warning) or twice it (an error), the kind is too_large either way.
    data = icns_bomb(width, height)
    with pytest.raises(ImageRejected) as e:
        decode_image(data, CFG)
    assert e.value.kind == "too_large" and f"({width * height} pixels)" in e.value.reason


def test_out_of_memory_while_decoding_is_too_large(monkeypatch):
    def exhausted(im, data):
        raise MemoryError()

    monkeypatch.setattr(images, "_decode_pixels", exhausted)
    with pytest.raises(ImageRejected) as e:
        decode_image(_encode(_photo("RGB"), "PNG"), CFG)
    assert e.value.reason == "too_large: out of memory decoding 640x480"


def test_a_sixteen_bit_sky_frame_shows_as_pillows_conversion_does():
    # Background ~40 counts, stars to a few hundred, hot pixels at 65535: scaling by the maximum
    # (before) gave a black frame; Pillow's convert shows the sky, and so does capjob, exactly.
    sky = astronomy_image(256, 192)
    for fmt in ("PNG", "TIFF"):
        out = decode_image(_encode(sky, fmt), CFG)
        shown = np.asarray(sky.convert("L"))
        assert np.array_equal(out.pixels, np.repeat(shown[:, :, None], 3, axis=2)), fmt
        assert out.pixels.mean() > 30


@pytest.mark.parametrize("mode,values", [
    ("I;16", np.linspace(0, 65535, 256 * 192)),  # a full-range 16-bit photo: white under Pillow's clip
    ("I;16", np.linspace(0, 4095, 256 * 192)),   # a 12-bit microscope frame
    ("F", np.linspace(0.0, 1.0, 256 * 192)),     # floats in 0..1: black under Pillow's clip
    ("I", np.linspace(-1000, 1000, 256 * 192)),  # signed data
])
def test_wide_data_beyond_the_display_range_is_stretched_over_its_robust_range(mode, values):
    arr = values.reshape(192, 256)
    arr[0, :8] = arr.max() * 20 if mode != "I;16" else 65535  # outliers do not set the range
    im = Image.fromarray(arr.astype({"I;16": np.uint16, "F": np.float32, "I": np.int32}[mode]))
    assert im.mode == mode
    out = decode_image(_encode(im, "TIFF"), CFG).pixels[:, :, 0].astype(float)
    lo, hi = np.percentile(arr, images._ROBUST_PERCENTILES)
    expected = np.clip((arr - lo) * 255.0 / (hi - lo), 0, 255).astype(np.uint8)
    assert np.abs(out - expected).max() <= 1
    assert out.min() == 0 and out.max() == 255 and 120 < out.mean() < 135


def _red_left_half() -> Image.Image:
    arr = np.zeros((120, 200, 3), np.uint8)
    arr[:, :100] = (230, 20, 20)
    return Image.fromarray(arr)


@pytest.mark.parametrize("fmt", ["HEIF", "AVIF"])
def test_phone_photos_decode_upright(fmt):
    # Stored landscape with EXIF orientation 6 (the camera held upright): shown portrait, the
    # stored left half on top -- turned once, whether the decoder (libheif) or capjob turns it.
    exif = Image.Exif()
    exif[0x0112] = 6
    data = heic(_red_left_half(), orientation=6) if fmt == "HEIF" else _encode(_red_left_half(), "AVIF", exif=exif.tobytes())
    out = decode_image(data, CFG)
    assert out.source_format == fmt and out.pixels.shape == (200, 120, 3)
    red = out.pixels[:, :, 0].astype(int) - out.pixels[:, :, 2]
    assert red[:90].mean() > 150 and red[110:].mean() < 30


@pytest.mark.parametrize("container", ["png", "icns"])
def test_images_max_pixels_is_the_limit_whatever_pillows_default(container, monkeypatch):
    """images.max_pixels is the cap, not Pillow's own bomb limit (MAX_IMAGE_PIXELS, 89M; twice it
    errors at open): raised (gigapixel scans, slides), an image above Pillow's limit is decoded;
    lowered, one above it is too_large, also where only loading reveals the size (an .icns entry
    declared 1024x1024 whose PNG declares 3000x3000: once decoded, and refused as `decode: ...`).
    A small Pillow limit stands for its default where the image must exceed it."""
    from helpers.corpus import icns_bomb, icns_with_png

    size = (100, 60) if container == "png" else (1024, 1024)
    png = _encode(Image.new("RGB", size, (200, 10, 10)), "PNG")
    data = png if container == "png" else icns_with_png(png)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    out = decode_image(data, ImagesConfig(size=448, max_pixels=size[0] * size[1] * 2))
    assert tuple(out.pixels[10, 10]) == (200, 10, 10) and (out.source_width, out.source_height) == size
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 89_478_485)
    lowered = ImagesConfig(size=448, max_pixels=2_000_000)
    with pytest.raises(ImageRejected) as e:
        decode_image(data if container == "png" else icns_bomb(3000, 3000), ImagesConfig(size=448, max_pixels=5000) if container == "png" else lowered)
    assert e.value.kind == "too_large", e.value.reason


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "JPEG"])
@pytest.mark.parametrize("exif", [b"Exif\x00\x00garbage", b"Exif\x00\x00II*\x00\xff\xff\xff\x7f", b"\x00" * 12])
def test_damaged_exif_never_costs_the_image(fmt, exif):
    """Pillow reads these pixels whatever their EXIF block holds; once a PNG or WebP whose eXIf
    did not parse was quarantined `decode: SyntaxError: not a TIFF file`. Orientation: none."""
    data = _encode(Image.new("RGB", (64, 48), (10, 200, 10)), fmt, exif=exif)
    out = decode_image(data, CFG)
    assert out.pixels.shape[:2] == (48, 64) and abs(int(out.pixels[24, 32, 1]) - 200) < 8
