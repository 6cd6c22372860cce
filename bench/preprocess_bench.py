"""Preprocessing throughput per CPU core: capjob's image stage against the seed's (issue 9).

The seed preprocesses every image with::

    Image.open(BytesIO(b)).resize((225, 225), Image.Resampling.BICUBIC)

capjob's ``decode_image`` additionally validates (full decode, so truncated files are rejected),
applies EXIF orientation, caps declared pixels and normalises modes to RGB. This script times
both, side by side in one process (= one core), on the same bytes, and prints the ratio:

* ``seed``        -- the line above, then ``np.asarray(im.convert("RGB"))`` so that both
                     contenders hand over the same kind of output (a 225 x 225 x 3 uint8 array);
* ``capjob``      -- ``decode_image(b, ImagesConfig(size=225, resize=ResizeMode.square))``, the
                     same output size as the seed: this is the contender the ratio is about;
* ``capjob fit448`` -- capjob's default (``fit``, longest side 448), for information.

The images are a deterministic, cached "realistic mix": crops of the photographs scikit-image
ships (or drawn scenes where it is missing), upscaled to camera/web sizes between 0.3 and 12
megapixels with sensor-like grain added (so that they compress like photos, neither like noise
nor like flat colour), 70 % JPEG (some grayscale, some with an EXIF rotation), 15 % PNG and 15 %
WebP. Image ``i`` depends only on ``(--seed, i)``, so larger runs reuse smaller runs' files.

Timing: every image is timed individually for every contender, the contenders taking turns
image by image (the order rotates), so load from elsewhere on the machine hits all of them
alike; each image's time is the median over the repeats. Throughput per core = images / summed
CPU seconds of this single process (``time.process_time``, which leaves out the time spent
waiting for a core on a busy machine); the wall-clock ratio is printed too.

A fourth contender, ``decode_floor``, only decodes (JPEG at the draft scale, PNG/WebP with
libpng/libwebp) and does nothing else: what any preprocess that validates by decoding must pay.
seed time / decode-only time is the ceiling of the ratio on this mix, printed next to it.

Usage::

    python bench/preprocess_bench.py                       # 300 images, 3 repeats
    python bench/preprocess_bench.py --images 6 --repeats 1 # smoke run
    python bench/preprocess_bench.py --json results.json
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import io
import json
import os
import pathlib
import platform
import shlex
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, features

try:
    import imagecodecs
except ImportError:
    imagecodecs = None

try:
    from capjob.config import ImagesConfig, ResizeMode
    from capjob.stages.images import _FAST_PNG_MODES, decode_image
except ImportError:  # run from a checkout without the package installed
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "src"))
    from capjob.config import ImagesConfig, ResizeMode
    from capjob.stages.images import _FAST_PNG_MODES, decode_image

GENERATOR_VERSION = "v2"
SEED_SIZE = 225
TARGET_RATIO = 3.0

# (width, height, weight): phone/camera and web sizes from 0.3 to 12 megapixels.
SIZES = [
    (640, 480, 3),     # 0.31 MP
    (1024, 768, 3),    # 0.79 MP
    (1280, 960, 3),    # 1.23 MP
    (1920, 1080, 3),   # 2.07 MP
    (2048, 1536, 2),   # 3.15 MP
    (3000, 2000, 2),   # 6.00 MP
    (4000, 3000, 2),   # 12.0 MP
]
FORMATS = [("JPEG", 0.70), ("PNG", 0.15), ("WEBP", 0.15)]
EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
PHOTOS = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "hubble_deep_field.jpg",
          "motorcycle_left.png", "retina.jpg", "ihc.png", "immunohistochemistry.png", "color.png"]


# --------------------------------------------------------------------------- image mix


@dataclass(frozen=True)
class Spec:
    index: int
    width: int
    height: int
    fmt: str
    gray: bool
    orientation: int  # EXIF orientation tag (1 = none)
    quality: int
    progressive: bool

    @property
    def filename(self) -> str:
        mode = "L" if self.gray else "RGB"
        prog = "-prog" if self.progressive else ""
        return (f"{self.index:05d}-{self.width}x{self.height}-{mode}-o{self.orientation}-q{self.quality}{prog}"
                f".{EXTENSIONS[self.fmt]}")


def _spec(seed: int, index: int, max_megapixels: float | None = None) -> Spec:
    rng = np.random.default_rng([seed, index, 1])
    sizes = [s for s in SIZES if max_megapixels is None or s[0] * s[1] <= max_megapixels * 1e6] or SIZES[:1]
    weights = np.array([w for _, _, w in sizes], dtype=float)
    w, h, _ = sizes[int(rng.choice(len(sizes), p=weights / weights.sum()))]
    if rng.random() < 0.25:  # portrait shots
        w, h = h, w
    fmt = FORMATS[int(rng.choice(len(FORMATS), p=[p for _, p in FORMATS]))][0]
    gray = fmt == "JPEG" and rng.random() < 0.05
    orientation = 1
    if fmt == "JPEG" and rng.random() < 0.10:  # camera JPEG shot sideways: stored landscape, tag 6/8
        orientation = int(rng.choice([6, 8]))
    quality = int(rng.integers(75, 96)) if fmt != "PNG" else 0
    progressive = fmt == "JPEG" and rng.random() < 0.15  # web JPEGs are often progressive
    return Spec(index, w, h, fmt, gray, orientation, quality, progressive)


def _photo_paths() -> list[pathlib.Path]:
    found = importlib.util.find_spec("skimage")
    if found is None or found.origin is None:
        return []
    data_dir = pathlib.Path(found.origin).parent / "data"
    return [data_dir / n for n in PHOTOS if (data_dir / n).exists()]


def _drawn_scene(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    y = np.linspace(0, 1, height, dtype=np.float32)[:, None, None]
    top, bottom = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    arr = np.broadcast_to((top * (1 - y) + bottom * y).astype(np.uint8), (height, width, 3)).copy()
    im = Image.fromarray(arr, "RGB")
    draw = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(5, 15))):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        x1, y1 = x0 + int(rng.integers(8, max(9, width // 3))), y0 + int(rng.integers(8, max(9, height // 3)))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=colour)
    return im


_TILE: np.ndarray | None = None


def _noise_tile(seed: int) -> np.ndarray:
    global _TILE
    if _TILE is None:
        _TILE = np.random.default_rng([seed, 0, 3]).normal(0.0, 1.0, (1024, 1024, 3)).astype(np.float32)
    return _TILE


def _noise_field(rng: np.random.Generator, tile: np.ndarray, width: int, height: int, scale: int, channels: int) -> np.ndarray:
    """Gaussian noise with a grain of ``scale`` pixels: a random window of the tile, upsampled.
    A window of a tile (rather than fresh noise) keeps 12 MP images cheap to make; the repeat
    is 1024 rows away, far outside deflate's 32 KiB window and any JPEG block."""
    sw, sh = -(-width // scale) + 4, -(-height // scale) + 4
    oy, ox = int(rng.integers(0, 1024)), int(rng.integers(0, 1024))
    window = np.tile(tile[..., :channels], (-(-(sh + oy) // 1024), -(-(sw + ox) // 1024), 1))[oy:oy + sh, ox:ox + sw]
    if scale == 1:
        return window[:height, :width]
    box = (0.0, 0.0, width / scale, height / scale)
    planes = [np.asarray(Image.fromarray(np.ascontiguousarray(window[..., c]), "F")
                         .resize((width, height), Image.Resampling.BICUBIC, box=box)) for c in range(channels)]
    return np.stack(planes, axis=-1)


def _content(spec: Spec, seed: int) -> Image.Image:
    """Photo-like pixels: a random crop of a real photograph, upscaled to the target size, plus
    luminance grain, fine texture and slow colour variation -- so that the files are as big as
    camera/web photos of that size (JPEG ~1.5-2.5 bits per pixel, PNG ~13), not smooth blurs."""
    rng = np.random.default_rng([seed, spec.index, 2])
    photos = _photo_paths()
    if photos:
        src = Image.open(photos[int(rng.integers(len(photos)))]).convert("RGB")
        aspect = spec.width / spec.height
        cw = min(src.width, int(src.height * aspect))
        ch = int(cw / aspect)
        scale = rng.uniform(0.55, 1.0)
        cw, ch = max(16, int(cw * scale)), max(16, int(ch * scale))
        x0, y0 = int(rng.integers(0, src.width - cw + 1)), int(rng.integers(0, src.height - ch + 1))
        if rng.random() < 0.5:
            src = src.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        im = src.crop((x0, y0, x0 + cw, y0 + ch)).resize((spec.width, spec.height), Image.Resampling.BICUBIC)
    else:
        im = _drawn_scene(rng, spec.width, spec.height)
    tile = _noise_tile(seed)
    w, h = spec.width, spec.height
    arr = np.asarray(im, dtype=np.float32)
    arr += _noise_field(rng, tile, w, h, 1, 1) * float(rng.uniform(2.0, 4.0))     # sensor grain
    arr += _noise_field(rng, tile, w, h, 3, 1) * float(rng.uniform(6.0, 12.0))    # fine texture
    arr += _noise_field(rng, tile, w, h, 9, 3) * float(rng.uniform(4.0, 9.0))     # colour blotches
    im = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    if spec.gray:
        im = im.convert("L")
    return im


def _encode(spec: Spec, seed: int) -> bytes:
    im = _content(spec, seed)
    buf = io.BytesIO()
    if spec.fmt == "JPEG":
        kw: dict = {"quality": spec.quality, "progressive": spec.progressive}
        if spec.orientation != 1:
            # Stored landscape, displayed portrait: what phones write.
            exif = Image.Exif()
            exif[0x0112] = spec.orientation
            kw["exif"] = exif.tobytes()
        im.save(buf, "JPEG", **kw)
    elif spec.fmt == "PNG":
        im.save(buf, "PNG")  # zlib level 6, Pillow's default
    else:
        im.save(buf, "WEBP", quality=spec.quality)
    return buf.getvalue()


def _materialise(args: tuple[int, int, float | None, str]) -> str:
    seed, index, max_megapixels, directory = args
    spec = _spec(seed, index, max_megapixels)
    path = pathlib.Path(directory) / spec.filename
    if not path.exists():
        data = _encode(spec, seed)
        tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    return str(path)


def default_cache_dir() -> pathlib.Path:
    root = os.environ.get("CAPJOB_CACHE") or os.path.join(tempfile.gettempdir(), "capjob-cache")
    return pathlib.Path(root) / "bench"


def load_mix(n: int, seed: int, cache_dir: pathlib.Path, jobs: int,
             max_megapixels: float | None = None) -> list[tuple[Spec, bytes]]:
    directory = cache_dir / f"preprocess-{GENERATOR_VERSION}-seed{seed}"
    directory.mkdir(parents=True, exist_ok=True)
    specs = [_spec(seed, i, max_megapixels) for i in range(n)]
    missing = [(seed, s.index, max_megapixels, str(directory)) for s in specs if not (directory / s.filename).exists()]
    if missing:
        print(f"generating {len(missing)} images into {directory} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        if jobs > 1 and len(missing) > 1:
            with ProcessPoolExecutor(max_workers=jobs) as pool:
                list(pool.map(_materialise, missing, chunksize=1))
        else:
            for t in missing:
                _materialise(t)
        print(f"generated in {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
    return [(s, (directory / s.filename).read_bytes()) for s in specs]


# --------------------------------------------------------------------------- contenders


def seed_preprocess(b: bytes) -> np.ndarray:
    im = Image.open(io.BytesIO(b)).resize((SEED_SIZE, SEED_SIZE), Image.Resampling.BICUBIC)
    return np.asarray(im if im.mode == "RGB" else im.convert("RGB"))


SQUARE = ImagesConfig(size=SEED_SIZE, resize=ResizeMode.square)
FIT = ImagesConfig()  # capjob's default: fit, 448


def capjob_square(b: bytes) -> np.ndarray:
    return decode_image(b, SQUARE).pixels


def capjob_fit(b: bytes) -> np.ndarray:
    return decode_image(b, FIT).pixels


def decode_floor(b: bytes) -> None:
    """The least any validating preprocess must do: decode every byte once -- JPEGs at the DCT
    scale the 225 px output allows, PNG/WebP with libpng/libwebp, the fastest decoders at hand --
    and nothing else (no resize, no conversion). Its ratio to the seed is the ceiling for this mix."""
    im = Image.open(io.BytesIO(b))
    if im.format == "PNG" and imagecodecs is not None and im.mode in _FAST_PNG_MODES:  # as capjob picks libpng
        imagecodecs.png_decode(b)
    elif im.format == "WEBP" and imagecodecs is not None:
        imagecodecs.webp_decode(b, hasalpha=True)  # as capjob decodes it
    else:
        if im.format == "JPEG":
            im.draft("RGB" if im.mode not in ("L", "CMYK") else im.mode, (SEED_SIZE, SEED_SIZE))
        im.load()


CONTENDERS: dict[str, Callable[[bytes], np.ndarray | None]] = {
    "seed": seed_preprocess,
    "capjob": capjob_square,
    "capjob_fit448": capjob_fit,
    "decode_floor": decode_floor,
}


def run_benchmark(mix: list[tuple[Spec, bytes]], repeats: int) -> dict[str, dict[str, np.ndarray]]:
    """Seconds per image per contender -- CPU seconds of this process and wall seconds -- each
    the median over ``repeats``. The contenders take turns image by image (the order rotates),
    so a busy neighbour on the machine slows all of them alike; CPU time does not count the
    time this process waits for a core, which is what "per core" asks for."""
    names = list(CONTENDERS)
    fns = [CONTENDERS[n] for n in names]
    for fn in fns:  # first-call costs (imports, codec init) stay out of the timings
        for _, b in mix[: min(4, len(mix))]:
            fn(b)
    cpu = np.zeros((len(names), repeats, len(mix)))
    wall = np.zeros_like(cpu)
    clock, perf = time.process_time, time.perf_counter
    gc.collect()
    for r in range(repeats):
        for j, (_, b) in enumerate(mix):
            for k in range(len(names)):
                i = (k + r + j) % len(names)
                fn = fns[i]
                c0, w0 = clock(), perf()
                fn(b)
                w1, c1 = perf(), clock()
                cpu[i, r, j] = c1 - c0
                wall[i, r, j] = w1 - w0
    return {name: {"cpu": np.median(cpu[i], axis=0), "wall": np.median(wall[i], axis=0)} for i, name in enumerate(names)}


def output_difference(mix: list[tuple[Spec, bytes]]) -> dict[str, float]:
    """Mean |seed - capjob| per pixel (0-255) on the images without EXIF rotation (the seed
    ignores EXIF, so rotated ones differ by design): shows the speed is not bought with blur."""
    diffs: dict[str, list[float]] = {}
    for spec, b in mix:
        if spec.orientation != 1:
            continue
        a = seed_preprocess(b).astype(np.int16)
        c = capjob_square(b).astype(np.int16)
        assert a.shape == c.shape == (SEED_SIZE, SEED_SIZE, 3), (a.shape, c.shape)
        diffs.setdefault(spec.fmt, []).append(float(np.abs(a - c).mean()))
    return {fmt: float(np.mean(v)) for fmt, v in diffs.items()}


# --------------------------------------------------------------------------- report


def summarise(mix: list[tuple[Spec, bytes]], per_image: dict[str, dict[str, np.ndarray]]) -> list[dict]:
    groups: dict[str, list[int]] = {}
    for j, (spec, _) in enumerate(mix):
        groups.setdefault(spec.fmt, []).append(j)
    rows = []
    # Progressive JPEGs cost several times a baseline one at reduced scale: shown apart.
    jpeg_kinds = {"JPEG baseline": [j for j in groups.get("JPEG", []) if not mix[j][0].progressive],
                  "JPEG progressive": [j for j in groups.get("JPEG", []) if mix[j][0].progressive]}
    labelled = []
    for fmt, _ in FORMATS:
        if fmt in groups:
            labelled.append((fmt, groups[fmt]))
            if fmt == "JPEG":
                labelled += [(label, idx) for label, idx in jpeg_kinds.items() if idx]
    for label, idx in [*labelled, ("all", list(range(len(mix))))]:
        sel = np.asarray(idx)
        row: dict = {
            "format": label,
            "images": len(idx),
            "mean_megapixels": float(np.mean([mix[j][0].width * mix[j][0].height / 1e6 for j in idx])),
            "mean_mbytes": float(np.mean([len(mix[j][1]) / 1e6 for j in idx])),
        }
        for name, t in per_image.items():
            row[f"{name}_images_per_cpu_s"] = len(idx) / float(t["cpu"][sel].sum())
            row[f"{name}_images_per_wall_s"] = len(idx) / float(t["wall"][sel].sum())
        for clock in ("cpu", "wall"):
            seed = row[f"seed_images_per_{clock}_s"]
            row[f"ratio_{clock}"] = row[f"capjob_images_per_{clock}_s"] / seed
            row[f"ratio_fit448_{clock}"] = row[f"capjob_fit448_images_per_{clock}_s"] / seed
            row[f"ceiling_{clock}"] = row[f"decode_floor_images_per_{clock}_s"] / seed
        rows.append(row)
    return rows


def machine() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": cpu,
        "cores": cores,
        "python": platform.python_version(),
        "pillow": Image.__version__,
        "libjpeg_turbo": features.version("libjpeg_turbo"),
        "webp": features.version("webp"),
        # Pillow wheels inflate PNGs with zlib-ng where they bundle it.
        "zlib": (f"zlib-ng {features.version_feature('zlib_ng')}" if features.check_feature("zlib_ng")
                 else f"zlib {features.version('zlib')}"),
        "imagecodecs": imagecodecs.__version__ if imagecodecs is not None else None,
    }


def markdown(rows: list[dict], diffs: dict[str, float]) -> str:
    head = ("| format | images | mean MP | mean MB | seed img/s/core | capjob (square 225) img/s/core "
            "| **ratio** | capjob fit 448 img/s/core | ratio fit 448 | wall-clock ratio | mean abs diff vs seed "
            "| decode only img/s/core | ceiling ratio |")
    lines = [head, "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for r in rows:
        d = diffs.get(r["format"])
        if r["format"] == "all" and diffs:
            d = float(np.mean(list(diffs.values())))
        lines.append(
            f"| {r['format']} | {r['images']} | {r['mean_megapixels']:.2f} | {r['mean_mbytes']:.2f} "
            f"| {r['seed_images_per_cpu_s']:.1f} | {r['capjob_images_per_cpu_s']:.1f} | **{r['ratio_cpu']:.2f}x** "
            f"| {r['capjob_fit448_images_per_cpu_s']:.1f} | {r['ratio_fit448_cpu']:.2f}x | {r['ratio_wall']:.2f}x "
            f"| {'-' if d is None else f'{d:.2f}'} | {r['decode_floor_images_per_cpu_s']:.1f} | {r['ceiling_cpu']:.2f}x |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=300, help="images in the mix (default 300)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per contender (default 3); median per image")
    parser.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    parser.add_argument("--cache-dir", type=pathlib.Path, default=None,
                        help="where generated images are kept (default $CAPJOB_CACHE/bench or <tmp>/capjob-cache/bench)")
    parser.add_argument("--gen-jobs", type=int, default=os.cpu_count() or 1, help="processes generating missing images")
    parser.add_argument("--max-megapixels", type=float, default=None,
                        help="leave out the larger sizes (smoke runs); changes the mix")
    parser.add_argument("--json", type=pathlib.Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if args.images < 1 or args.repeats < 1:
        parser.error("--images and --repeats must be >= 1")

    command = shlex.join(["python", sys.argv[0], *(sys.argv[1:] if argv is None else argv)])
    mix = load_mix(args.images, args.seed, args.cache_dir or default_cache_dir(), args.gen_jobs, args.max_megapixels)
    info = machine()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    per_image = run_benchmark(mix, args.repeats)
    cpu_share = (time.process_time() - cpu0) / (time.perf_counter() - wall0)
    diffs = output_difference(mix)
    rows = summarise(mix, per_image)
    overall = rows[-1]

    print("## Preprocessing throughput per core: capjob vs the seed\n")
    print(f"Command: `{command}`\n")
    print(f"Machine: {info['cpu']}, {info['cores']} cores visible, one process timed (CPU time / wall time "
          f"during timing: {cpu_share:.2f}); Python {info['python']}, Pillow {info['pillow']} "
          f"(libjpeg-turbo {info['libjpeg_turbo']}, libwebp {info['webp']}, {info['zlib']}), "
          f"imagecodecs {info['imagecodecs'] or 'not installed: PNG/WebP through Pillow'}\n")
    print(f"Mix: {len(mix)} images, seed {args.seed}, {args.repeats} repeat(s), median per image, "
          f"throughput = images / CPU seconds of the one timed process; "
          f"seed = `Image.open(BytesIO(b)).resize((225, 225), BICUBIC)` + `np.asarray(.convert('RGB'))`; "
          f"capjob = `decode_image(b, ImagesConfig(size=225, resize=ResizeMode.square))`\n")
    print(markdown(rows, diffs))
    print()
    per_format = ", ".join(f"{r['format']} {r['ratio_cpu']:.2f}x" for r in rows[:-1])
    verdict = "meets" if overall["ratio_cpu"] >= TARGET_RATIO else "BELOW"
    print(f"per-format ratio capjob/seed: {per_format}")
    print(f"ratio capjob/seed (square 225, images/s per core, all formats): {overall['ratio_cpu']:.2f}x "
          f"({verdict} the {TARGET_RATIO:.0f}x target; wall-clock {overall['ratio_wall']:.2f}x)")
    print(f"ceiling on this mix (decode only, seed/decode-only time): {overall['ceiling_cpu']:.2f}x; "
          f"capjob reaches {overall['ratio_cpu'] / overall['ceiling_cpu']:.0%} of it")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "command": command, "machine": info, "cpu_share": cpu_share, "images": len(mix),
            "repeats": args.repeats, "seed": args.seed, "rows": rows, "mean_abs_diff_vs_seed": diffs,
            "ratio": overall["ratio_cpu"], "ratio_wall": overall["ratio_wall"], "target_ratio": TARGET_RATIO,
            "ceiling": overall["ceiling_cpu"],
        }, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
