import io

import numpy as np
import pytest
from PIL import Image

from capjob.config import ImagesConfig, ResizeMode
from capjob.images import ImageRejected, decode_image, image_bytes
from corpus import awkward_images, broken_images

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
    assert image_bytes({"bytes": b"abc", "path": "x.jpg"}) == (b"abc", "x.jpg")
    assert image_bytes(b"abc") == (b"abc", None)
    assert image_bytes(None) == (None, None)
    with pytest.raises(TypeError):
        image_bytes(3.5)
