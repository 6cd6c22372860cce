"""Layout ``image_folder``: image files under a folder, recursive, local or any fsspec URL; a
file's path is its key.

The driver lists the folder once and identifies every file that is not named as an image by
its first bytes (a few KB each, read together), so the listing gives the exact row count (the
plan, the progress bar, and a resume's "nothing left to do"); then read tasks fetch each block
of files with concurrent requests (an object store is latency-bound one file at a time). Every
listed file is an item: an image row, or skipped with its reason --

* ``hidden file``: a name (or folder) starting with ``.`` or ``_`` (``.DS_Store``, ``_SUCCESS``);
* ``not an image (.<ext>)``: a file whose extension no installed decoder opens and whose bytes
  Pillow (with pillow-heif registered) does not identify. A file Pillow can read is an image
  however its extension is spelled (``.JPG``, ``.jfif``, ``.mpo``, ``.heic``, none), and so is a
  decompression bomb Pillow refuses to open (the image stage quarantines it as ``too_large``).

Whether an image row is then captioned is the image stage's decode rule (stages/images.py).

A file that cannot be fetched stays a row whose cell is ``{bytes: null, path}``: the image stage
fetches it again with retries and quarantines it with the true reason.
"""

from __future__ import annotations

import functools
import io
import struct
import warnings
from typing import Any, Callable, Optional

import pillow_heif
import pyarrow as pa
import ray.data
from PIL import Image, ImageFile, UnidentifiedImageError

from capjob.config import DataConfig
from capjob.errors import SourceError
from capjob.stages.sources.common import ITEM_COLUMN, SKIP_COLUMN
from capjob.stages.storage import describe_remote_error, filesystem_for, first_file, hidden, options_for

# Registered at import, so wherever files are identified (the driver, webdataset read tasks):
# HEIC/HEIF photos. The image stage (images.py) registers it where they are decoded.
pillow_heif.register_heif_opener()

# Files per block of paths, and files fetched together by one task.
FILES_PER_BLOCK = 256
FETCH_BATCH = 64
# Bytes read to tell whether a file without an image extension is an image.
SNIFF_BYTES = 4096
IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def _image_classes(cls: type) -> set[type]:
    subclasses = set(cls.__subclasses__())
    return subclasses.union(*(_image_classes(c) for c in subclasses))


@functools.cache
def image_extensions() -> frozenset[str]:
    """Extensions (lower case, no dot) of every format the installed Pillow can open: those of
    a registered opener, and of a format an opener returns (MPO, which Pillow's JPEG opener
    reads; PDF and Palm are registered for writing only)."""
    Image.init()
    readable = {f.upper() for f in Image.OPEN} | {str(c.format).upper() for c in _image_classes(ImageFile.ImageFile)}
    return frozenset(ext.lstrip(".").lower() for ext, fmt in Image.registered_extensions().items() if fmt.upper() in readable)


def extension(path: str) -> str:
    name = path.rstrip("/").rsplit("/", 1)[-1]
    return name.rsplit(".", 1)[-1].lower() if "." in name else ""


def _claims(accept: Optional[Callable[[bytes], Any]], prefix: bytes) -> bool:
    """Whether a decoder's signature check (Image.OPEN's accept) recognises `prefix`, as Image.open
    asks it (a check that fails on a short prefix does not recognise it)."""
    try:
        return accept is not None and accept(prefix) is True
    except (IndexError, TypeError, SyntaxError, ValueError, struct.error):  # what Image.open passes over
        return False


def _identified(data: bytes) -> Optional[bool]:
    """True: Pillow opens `data` as an image; None: a decoder claims its first bytes but cannot
    open them (cut short, or broken); False: no decoder claims them."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a decoder's remarks (a huge size, an odd chunk) are the image stage's
            with Image.open(io.BytesIO(data)):
                return True
    except UnidentifiedImageError:
        return None if any(_claims(accept, data[:16]) for _, accept in Image.OPEN.values()) else False
    except Image.DecompressionBombError:  # an image, too large: the image stage says so (too_large)
        return True
    except Exception:  # noqa: BLE001 - a decoder recognised the bytes and failed on them
        return None


def sniff_image(head: bytes, whole: Optional[Callable[[], bytes]] = None) -> bool:
    """Whether Pillow identifies (opens) a file from its first bytes `head`. Some formats keep
    what Pillow reads at open beyond the first KB (a TIFF's directory at the end, an ICO's or
    .icns's entries, a camera MPO's index): when a decoder claims `head` but cannot open it,
    `whole()` (the whole file; None: `head` is all there is) is tried."""
    verdict = _identified(head)
    if verdict is None and whole is not None:
        verdict = _identified(whole())
    return verdict is True


def preflight(cfg: DataConfig, kind: str) -> None:
    assert cfg.path is not None
    if kind == "directory" and first_file(cfg.path, cfg.storage_options, None) is None:
        raise SourceError(f"data.path: no files under {cfg.path!r}")


def _not_images(fs: Any, files: list[tuple[str, Optional[int]]]) -> list[bool]:
    """Which of `files` ((path, size in bytes or None), none named as an image) Pillow does not
    identify. Their first SNIFF_BYTES are read together, FILES_PER_BLOCK at a time; a file that
    cannot be read now stays a row (the image stage fetches it again, with retries, and gives
    the reason)."""
    out: list[bool] = []
    for i in range(0, len(files), FILES_PER_BLOCK):
        block = files[i:i + FILES_PER_BLOCK]
        # An empty object has no first byte to ask for (S3 answers 416).
        wanted = [p for p, size in block if size != 0]
        heads = dict(zip(wanted, fs.cat_ranges(wanted, 0, SNIFF_BYTES, on_error="return") if wanted else []))
        for p, size in block:
            head = heads.get(p, b"")
            if not isinstance(head, bytes):
                out.append(False)
                continue
            whole = (lambda p=p: fs.cat_file(p)) if len(head) == SNIFF_BYTES and size != SNIFF_BYTES else None
            try:
                out.append(not sniff_image(head, whole))
            except Exception:  # noqa: BLE001 - the whole file is unreadable now: a row, as above
                out.append(False)
    return out


def list_items(cfg: DataConfig) -> tuple[pa.Table, str]:
    """Every file under data.path as (path, item, skip reason or null), and the fsspec
    protocol. Paths are as the filesystem lists them (protocol-less for object stores). Files
    not named as images are identified here, by content (module docstring)."""
    assert cfg.path is not None
    fs, root = filesystem_for(cfg.path, cfg.storage_options)
    try:
        listed = fs.find(root, detail=True) if fs.isdir(root) else {root: fs.info(root)}
    except Exception as e:  # noqa: BLE001
        raise SourceError(f"data.path: {describe_remote_error(cfg.path, e)}") from None
    prefix = root.rstrip("/") + "/"
    known = image_extensions()
    paths = sorted(listed)
    skips: list[Optional[str]] = []
    for p in paths:
        relative = p[len(prefix):] if p.startswith(prefix) else p.rsplit("/", 1)[-1]
        skips.append("hidden file" if any(hidden(part) for part in relative.split("/")) else None)
    unnamed = [i for i, (p, s) in enumerate(zip(paths, skips)) if s is None and extension(p) not in known]
    for i, skip in zip(unnamed, _not_images(fs, [(paths[i], listed[paths[i]].get("size")) for i in unnamed])):
        if skip:
            skips[i] = f"not an image (.{extension(paths[i]) or 'no extension'})"
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    table = pa.table({"path": pa.array(paths, pa.string()), ITEM_COLUMN: pa.array(paths, pa.string()),
                      SKIP_COLUMN: pa.array(skips, pa.string())})
    return table, protocol


def fetch_files(batch: pa.Table, protocol: str, storage_options: dict[str, Any]) -> pa.Table:
    """map_batches UDF: the bytes of a block of listed files, fetched together (one attempt: the
    image stage retries what failed)."""
    import fsspec

    fs = fsspec.filesystem(protocol, **(storage_options or {}))
    paths = batch.column("path").to_pylist()
    skips = batch.column(SKIP_COLUMN).to_pylist()
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
        ITEM_COLUMN: batch.column(ITEM_COLUMN), SKIP_COLUMN: batch.column(SKIP_COLUMN),
    })


def read_image_folder(cfg: DataConfig) -> tuple[ray.data.Dataset, Optional[int]]:
    """(dataset of image rows and skip rows, the number of image rows: files named as images
    and files identified by content)."""
    table, protocol = list_items(cfg)
    if not table.num_rows:
        raise SourceError(f"data.path: no files under {cfg.path!r}")
    chunks = [table.slice(i, FILES_PER_BLOCK) for i in range(0, table.num_rows, FILES_PER_BLOCK)]
    options = options_for(cfg.path or "", cfg.storage_options, base=cfg.path)
    ds = ray.data.from_arrow(chunks).map_batches(
        fetch_files, fn_kwargs={"protocol": protocol, "storage_options": options},
        batch_size=FETCH_BATCH, batch_format="pyarrow",
    )
    return ds, table.column(SKIP_COLUMN).null_count
