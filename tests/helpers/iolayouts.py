"""Small image datasets in every layout capjob reads, written by the tests (and bench/read_bench.py).

Each writer takes ``rows``: a list of ``(key, image bytes, label)`` and writes one layout under a
directory. Keys are unique strings (``img-00003``); labels are small ints. ``upload`` copies a
written layout into an S3 bucket (any fsspec filesystem).
"""

from __future__ import annotations

import io
import json
import pathlib
import tarfile
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

Row = tuple[str, bytes, int]

FORMATS = [("jpg", "JPEG"), ("png", "PNG"), ("webp", "WEBP")]


def make_rows(count: int, seed: int = 0, size: tuple[int, int] = (96, 72), formats: Iterable[str] = ("jpg",)) -> list[Row]:
    """`count` small images (drawn gradients + a box, so they compress like pictures), cycling
    through `formats`; label = index % 10."""
    rng = np.random.default_rng(seed)
    fmts = [f for f in FORMATS if f[0] in set(formats)] or FORMATS[:1]
    rows: list[Row] = []
    w, h = size
    y = np.linspace(0, 1, h)[:, None, None]
    for i in range(count):
        top, bottom = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        arr = np.broadcast_to((top * (1 - y) + bottom * y).astype(np.uint8), (h, w, 3)).copy()
        x0, y0 = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
        arr[y0 : y0 + h // 3, x0 : x0 + w // 3] = rng.integers(0, 256, 3)
        ext, pil_format = fmts[i % len(fmts)]
        buf = io.BytesIO()
        Image.fromarray(arr, "RGB").save(buf, format=pil_format, **({"quality": 85} if pil_format != "PNG" else {}))
        rows.append((f"img-{i:05d}.{ext}", buf.getvalue(), i % 10))
    return rows


def key_of(name: str) -> str:
    return name.rsplit(".", 1)[0]


IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def write_parquet(rows: list[Row], root: pathlib.Path, files: int = 2, image_as: str = "struct") -> pathlib.Path:
    """Parquet files `part-<i>.parquet` with columns image ({bytes, path} struct, raw bytes or a
    path string), key, label, caption_hint (text that is not passed through)."""
    root.mkdir(parents=True, exist_ok=True)
    chunks = [rows[i::files] for i in range(files)]
    for i, chunk in enumerate(chunks):
        if not chunk:
            continue
        if image_as == "struct":
            image = pa.array([{"bytes": b, "path": n} for n, b, _ in chunk], type=IMAGE_STRUCT)
        elif image_as == "bytes":
            image = pa.array([b for _, b, _ in chunk], type=pa.binary())
        else:
            raise ValueError(image_as)
        table = pa.table(
            {
                "image": image,
                "key": pa.array([key_of(n) for n, _, _ in chunk], pa.string()),
                "label": pa.array([lab for _, _, lab in chunk], pa.int64()),
                "caption_hint": pa.array([f"picture {n}" for n, _, _ in chunk], pa.string()),
            }
        )
        pq.write_table(table, root / f"part-{i:05d}.parquet")
    return root


def _hf_dataset(rows: list[Row]):
    import datasets

    features = datasets.Features(
        {"image": datasets.Image(), "key": datasets.Value("string"), "label": datasets.ClassLabel(num_classes=10)}
    )
    return datasets.Dataset.from_dict(
        {
            "image": [{"bytes": b, "path": n} for n, b, _ in rows],
            "key": [key_of(n) for n, _, _ in rows],
            "label": [lab for _, _, lab in rows],
        },
        features=features,
    )


def write_hf_save_to_disk(rows: list[Row], root: pathlib.Path, dataset_dict: bool = True, shards: int = 2) -> pathlib.Path:
    """`Dataset(Dict).save_to_disk` layout (arrow files + state.json), split `train`."""
    import datasets

    ds = _hf_dataset(rows)
    target = datasets.DatasetDict({"train": ds}) if dataset_dict else ds
    target.save_to_disk(str(root), num_shards={"train": shards} if dataset_dict else shards)
    return root


def write_hf_parquet_dir(rows: list[Row], root: pathlib.Path, shards: int = 2) -> pathlib.Path:
    """A hub-style repository folder: data/train-0000i-of-0000n.parquet (with HF feature metadata)."""
    ds = _hf_dataset(rows)
    (root / "data").mkdir(parents=True, exist_ok=True)
    for i in range(shards):
        ds.shard(shards, i, contiguous=True).to_parquet(str(root / "data" / f"train-{i:05d}-of-{shards:05d}.parquet"))
    return root


def write_image_folder(rows: list[Row], root: pathlib.Path, subdirs: int = 2) -> pathlib.Path:
    """Images spread over nested class folders (cls_<label % subdirs>/nested/...), plus files
    that are not images and a hidden folder (both ignored by the reader)."""
    for i, (name, data, label) in enumerate(rows):
        folder = root / f"cls_{label % subdirs}" / ("nested" if i % 2 else "")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    (root / "README.txt").write_text("not an image\n")
    (root / ".thumbnails").mkdir(exist_ok=True)  # hidden: skipped, like any name starting with . or _
    (root / ".thumbnails" / rows[0][0]).write_bytes(rows[0][1])
    (root / "cls_0" / "labels.json").write_text("{}\n")
    return root


def write_tar(path: pathlib.Path, members: list[tuple[str, bytes]]) -> pathlib.Path:
    """A tar shard holding `members` ((name, bytes)), in this order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def write_webdataset(rows: list[Row], root: pathlib.Path, shards: int = 2) -> pathlib.Path:
    """Tar shards shard-<i>.tar: per sample <key>.<jpg|png|webp>, <key>.cls, <key>.json."""
    root.mkdir(parents=True, exist_ok=True)

    def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    for s in range(shards):
        with tarfile.open(root / f"shard-{s:05d}.tar", "w") as tar:
            for name, data, label in rows[s::shards]:
                key, ext = name.rsplit(".", 1)
                add(tar, f"{key}.{ext}", data)
                add(tar, f"{key}.cls", str(label).encode())
                add(tar, f"{key}.json", json.dumps({"key": key, "label": label}).encode())
    return root


def upload(local: pathlib.Path, fs, url: str) -> str:
    """Copy a local layout (file or folder) to `url` (e.g. s3://bucket/prefix) on `fs`."""
    target = url.split("://", 1)[-1].rstrip("/")
    if local.is_dir():
        for f in sorted(local.rglob("*")):
            if f.is_file():
                fs.pipe_file(f"{target}/{f.relative_to(local).as_posix()}", f.read_bytes())
    else:
        fs.pipe_file(target, local.read_bytes())
    return url


def write_llava_json(rows: list[Row], root: pathlib.Path, as_lines: bool = False) -> tuple[pathlib.Path, list[dict]]:
    """A LLaVA-Instruct set (issue 31): a JSON array (or JSON Lines) file beside its
    coco/train2017/ images, from the first three `rows`: two records of one image (ids of both
    types, as in LLaVA-665k), a text-only record, a missing image file, an absolute path (to a file
    outside `root`), an unreachable URL, and a record of another image. Returns (file, records)."""
    images = root / "coco" / "train2017"
    images.mkdir(parents=True)
    for i, (_, data, _) in enumerate(rows[:2]):
        (images / f"{i:012d}.jpg").write_bytes(data)
    elsewhere = root.parent / "elsewhere.jpg"
    elsewhere.write_bytes(rows[2][1])

    def turns(question: str) -> list[dict]:
        return [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": "An answer."}]

    records = [
        {"id": "000000000000", "image": "coco/train2017/000000000000.jpg", "conversations": turns("What is this?")},
        {"id": 17, "image": "./coco/train2017/000000000000.jpg", "conversations": turns("Describe it."), "model": "gpt-4"},
        {"id": "text-only", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
        {"id": "missing", "image": "coco/train2017/404.jpg", "conversations": turns("Where?")},
        {"id": "absolute", "image": str(elsewhere), "conversations": turns("And this?")},
        {"id": "url", "image": "http://127.0.0.1:9/x.jpg", "conversations": turns("Online?")},
        {"id": "second", "image": "coco/train2017/000000000001.jpg", "conversations": turns("Colours?")},
    ]
    path = root / ("llava.jsonl" if as_lines else "llava_instruct.json")
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n" if as_lines else json.dumps(records, indent=1))
    return path, records
