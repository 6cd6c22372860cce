"""Layout ``image_folder``: image files under a folder, recursive, local or any fsspec URL; a
file's path is its key.

The driver lists the folder once (the listing also gives the row count), then read tasks fetch
each block of files with concurrent requests (an object store is latency-bound one file at a
time). Every listed file is an item: an image row, or skipped with its reason --

* ``hidden file``: a name (or folder) starting with ``.`` or ``_`` (``.DS_Store``, ``_SUCCESS``);
* ``not an image (.<ext>)``: a file whose extension no installed decoder registers and whose
  first bytes Pillow does not identify. A file Pillow can read is an image however its
  extension is spelled (``.JPG``, ``.jfif``, none).

A file that cannot be fetched stays a row whose cell is ``{bytes: null, path}``: the image stage
fetches it again with retries and quarantines it with the true reason.
"""

from __future__ import annotations

import functools
import io
from typing import Any, Optional

import pyarrow as pa
import ray.data

from capjob.config import DataConfig
from capjob.errors import SourceError
from capjob.stages.sources.common import ITEM_COLUMN, SKIP_COLUMN
from capjob.stages.storage import describe_remote_error, filesystem_for, first_file, hidden, options_for

# Files per block of paths, and files fetched together by one task.
FILES_PER_BLOCK = 256
FETCH_BATCH = 64
# Bytes read to tell whether a file without an image extension is an image.
SNIFF_BYTES = 4096
IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


@functools.cache
def image_extensions() -> frozenset[str]:
    """Extensions (lower case, no dot) of every format the installed Pillow can open."""
    from PIL import Image

    return frozenset(ext.lstrip(".").lower() for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


def extension(path: str) -> str:
    name = path.rstrip("/").rsplit("/", 1)[-1]
    return name.rsplit(".", 1)[-1].lower() if "." in name else ""


def sniff_image(head: bytes) -> bool:
    """Whether Pillow identifies `head` (the first bytes of a file) as an image it can open."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(head)):
            return True
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return False
    except Exception:  # noqa: BLE001 - a header Pillow half-recognises
        return False


def preflight(cfg: DataConfig, kind: str) -> None:
    assert cfg.path is not None
    if kind == "directory" and first_file(cfg.path, cfg.storage_options, None) is None:
        raise SourceError(f"data.path: no files under {cfg.path!r}")


def list_items(cfg: DataConfig) -> tuple[pa.Table, str]:
    """Every file under data.path as (path, item, skip reason or null, to_sniff), and the
    fsspec protocol. Paths are as the filesystem lists them (protocol-less for object stores)."""
    assert cfg.path is not None
    fs, root = filesystem_for(cfg.path, cfg.storage_options)
    try:
        listed = fs.find(root, detail=False) if fs.isdir(root) else [root]
    except Exception as e:  # noqa: BLE001
        raise SourceError(f"data.path: {describe_remote_error(cfg.path, e)}") from None
    prefix = root.rstrip("/") + "/"
    known = image_extensions()
    paths, skips, sniff = [], [], []
    for p in sorted(listed):
        relative = p[len(prefix):] if p.startswith(prefix) else p.rsplit("/", 1)[-1]
        paths.append(p)
        if any(hidden(part) for part in relative.split("/")):
            skips.append("hidden file")
            sniff.append(False)
        else:
            skips.append(None)
            sniff.append(extension(p) not in known)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    table = pa.table({"path": pa.array(paths, pa.string()), ITEM_COLUMN: pa.array(paths, pa.string()),
                      SKIP_COLUMN: pa.array(skips, pa.string()), "__sniff__": pa.array(sniff, pa.bool_())})
    return table, protocol


def fetch_files(batch: pa.Table, protocol: str, storage_options: dict[str, Any]) -> pa.Table:
    """map_batches UDF: the bytes of a block of listed files, fetched together (one attempt: the
    image stage retries what failed). Files to sniff are read up to SNIFF_BYTES first and
    skipped when they are not images."""
    import fsspec

    fs = fsspec.filesystem(protocol, **(storage_options or {}))
    paths = batch.column("path").to_pylist()
    skips = batch.column(SKIP_COLUMN).to_pylist()
    sniff = batch.column("__sniff__").to_pylist()
    for i, p in enumerate(paths):
        if skips[i] is None and sniff[i]:
            try:
                with fs.open(p, "rb") as f:
                    head = f.read(SNIFF_BYTES)
            except Exception:  # noqa: BLE001 - unreadable now: a row, fetched again with retries
                continue
            if not sniff_image(head):
                skips[i] = f"not an image (.{extension(p) or 'no extension'})"
    wanted = [p for p, s in zip(paths, skips) if s is None]
    fetched = fs.cat(wanted, on_error="return") if wanted else {}
    local = protocol in ("file", "local")
    cells = []
    for p, s in zip(paths, skips):
        data = fetched.get(p) if s is None else None
        location = p if local else f"{protocol}://{p}"
        cells.append({"bytes": data if isinstance(data, bytes) else None, "path": location})
    return pa.table({
        "image": pa.array(cells, IMAGE_STRUCT), "path": pa.array(paths, pa.string()),
        ITEM_COLUMN: batch.column(ITEM_COLUMN), SKIP_COLUMN: pa.array(skips, pa.string()),
    })


def read_image_folder(cfg: DataConfig) -> tuple[ray.data.Dataset, Optional[int]]:
    """(dataset of image rows and skip rows, the number of files with an image extension)."""
    table, protocol = list_items(cfg)
    if not table.num_rows:
        raise SourceError(f"data.path: no files under {cfg.path!r}")
    chunks = [table.slice(i, FILES_PER_BLOCK) for i in range(0, table.num_rows, FILES_PER_BLOCK)]
    options = options_for(cfg.path or "", cfg.storage_options, base=cfg.path)
    ds = ray.data.from_arrow(chunks).map_batches(
        fetch_files, fn_kwargs={"protocol": protocol, "storage_options": options},
        batch_size=FETCH_BATCH, batch_format="pyarrow",
    )
    images = sum(1 for s, f in zip(table.column(SKIP_COLUMN).to_pylist(), table.column("__sniff__").to_pylist()) if s is None and not f)
    return ds, images
