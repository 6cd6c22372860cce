"""The offline `dataset=sample`: real photographs, generated images and shape scenes, in the seed's HF layout.

Written once per size as parquet with an ``image`` = ``{bytes, path}`` struct column (the
layout of BLIP3o's ``jpg`` and ImageNet's ``image``), a ``label`` column (photo, generated,
shapes) and a ``reference`` column, under the capjob cache. The photographs are the ones
scikit-image ships; the generated images cover the sizes, formats and modes scraped data
brings (JPEG/PNG/WebP/GIF, grayscale, palette, alpha, CMYK, 16-bit, EXIF-rotated, tiny and
very wide). The shape scenes (models/shapes.py, PNG) carry their true caption in
``reference`` (null for the other rows): the trained offline model captions them exactly,
so a caption written under another row's id shows.
"""

from __future__ import annotations

import io
import pathlib
import tempfile
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from capjob.cache import cache_dir
from capjob.models import shapes

SAMPLE_VERSION = "v3"
# Held out from training (models/train.py draws with other seeds).
SHAPES_SEED = 7


def bundled_photos() -> list[pathlib.Path]:
    """The colour/grayscale photographs scikit-image ships inside its wheel (no download)."""
    import skimage

    data_dir = pathlib.Path(skimage.__file__).parent / "data"
    names = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "hubble_deep_field.jpg",
             "motorcycle_left.png", "retina.jpg", "camera.png", "horse.png", "brick.png", "moon.png", "coins.png"]
    return [data_dir / n for n in names if (data_dir / n).exists()]


def _scene(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A drawn scene (gradient sky, ground, shapes) rather than noise, so resizing is realistic."""
    y = np.linspace(0, 1, height)[:, None, None]
    top, bottom = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    sky = (top * (1 - y) + bottom * y).astype(np.uint8)
    arr = np.broadcast_to(sky, (height, width, 3)).copy()
    im = Image.fromarray(arr, "RGB")
    draw = ImageDraw.Draw(im)
    draw.rectangle([0, int(height * 0.7), width, height], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    for _ in range(int(rng.integers(3, 9))):
        x0, y0 = int(rng.integers(0, max(1, width - 1))), int(rng.integers(0, max(1, height - 1)))
        x1, y1 = x0 + int(rng.integers(1, max(2, width // 3))), y0 + int(rng.integers(1, max(2, height // 3)))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=colour)
    return im


def _encode(im: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def generated_images(count: int, seed: int = 0) -> list[tuple[str, bytes]]:
    """`count` (name, encoded bytes) pairs cycling through formats, modes and shapes."""
    rng = np.random.default_rng(seed)
    sizes = [(640, 480), (1024, 768), (480, 640), (1920, 1080), (300, 300), (2000, 250), (64, 48), (1, 1), (3000, 2000)]
    out: list[tuple[str, bytes]] = []
    for i in range(count):
        w, h = sizes[i % len(sizes)]
        im = _scene(rng, w, h)
        kind = i % 8
        if kind == 0:
            out.append((f"gen_{i:05d}_rgb.jpg", _encode(im, "JPEG", quality=90)))
        elif kind == 1:
            out.append((f"gen_{i:05d}_rgb.png", _encode(im, "PNG")))
        elif kind == 2:
            out.append((f"gen_{i:05d}_gray.jpg", _encode(im.convert("L"), "JPEG", quality=85)))
        elif kind == 3:
            rgba = im.convert("RGBA")
            rgba.putalpha(Image.linear_gradient("L").resize(im.size))
            out.append((f"gen_{i:05d}_rgba.png", _encode(rgba, "PNG")))
        elif kind == 4:
            out.append((f"gen_{i:05d}_palette.gif", _encode(im.convert("P", palette=Image.Palette.ADAPTIVE), "GIF")))
        elif kind == 5:
            out.append((f"gen_{i:05d}_rgb.webp", _encode(im, "WEBP", quality=80)))
        elif kind == 6:
            out.append((f"gen_{i:05d}_cmyk.jpg", _encode(im.convert("CMYK"), "JPEG", quality=90)))
        else:
            exif = Image.Exif()
            exif[0x0112] = 6  # Orientation: rotate 90 CW on display
            out.append((f"gen_{i:05d}_exif6.jpg", _encode(im, "JPEG", quality=90, exif=exif.tobytes())))
    return out


def shape_images(count: int, seed: int = SHAPES_SEED) -> list[tuple[str, bytes, str]]:
    """`count` (name, PNG bytes, true caption) shape scenes."""
    return [(f"shapes_{i:05d}.png", _encode(shapes.render(scene), "PNG"), scene.caption)
            for i, scene in enumerate(shapes.scenes(count, seed))]


# The columns of the sample set's parquet (write_hf_parquet): what data.* may name for it.
SAMPLE_COLUMNS = ("image", "label", "reference")


def write_hf_parquet(rows: list[tuple[str, bytes, str]], path: pathlib.Path,
                     references: Optional[list[Optional[str]]] = None) -> None:
    """Write (name, bytes, label) rows as parquet with an HF-style `image` struct column and a
    `reference` column: the true caption, null where unknown (`references` None: all null)."""
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table(
        {
            "image": pa.array([{"bytes": b, "path": n} for n, b, _ in rows], type=image_type),
            "label": pa.array([label for _, _, label in rows], type=pa.string()),
            "reference": pa.array(references if references is not None else [None] * len(rows), type=pa.string()),
        }
    )
    pq.write_table(table, path)


def sample_rows(num_generated: int, num_shapes: int) -> int:
    """How many rows ensure_sample_dataset(num_generated, num_shapes) holds, without writing it."""
    return len(bundled_photos()) + num_generated + num_shapes


def sample_dataset_dir(num_generated: int = 24, num_shapes: int = 24) -> pathlib.Path:
    """Where ensure_sample_dataset(num_generated, num_shapes) writes the set (it may not exist yet)."""
    return cache_dir() / "datasets" / f"sample-{SAMPLE_VERSION}-{num_generated}-{num_shapes}"


def ensure_sample_dataset(num_generated: int = 24, num_shapes: int = 24) -> str:
    """The sample dataset's directory, written on first use (atomically) and reused after."""
    root = sample_dataset_dir(num_generated, num_shapes)
    if (root / "train-00000.parquet").exists():
        return str(root)
    rows = [(p.name, p.read_bytes(), "photo") for p in bundled_photos()]
    rows += [(n, b, "generated") for n, b in generated_images(num_generated)]
    shape_rows = shape_images(num_shapes)
    references: list[Optional[str]] = [None] * len(rows) + [caption for _, _, caption in shape_rows]
    rows += [(n, b, "shapes") for n, b, _ in shape_rows]
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}-"))
    write_hf_parquet(rows, tmp / "train-00000.parquet", references)
    try:
        tmp.rename(root)
    except OSError:  # another process won the race; its copy is identical
        for f in tmp.iterdir():
            f.unlink()
        tmp.rmdir()
    return str(root)
