"""Layout ``webdataset``: tar shards (``*.tar``, ``*.tar.gz``, ``*.tgz``), local or any fsspec URL.

Samples are formed as the webdataset library forms them (``webdataset.tariterators``:
``base_plus_ext`` and ``group_by_keys``): a member's key is its path up to the first dot of its
base name, the rest (lower-cased) its suffix, and consecutive members with one key are one
sample. Metadata members (``__*__``) are skipped as webdataset skips them.

What webdataset leaves to its user, capjob decides here, with every member accounted for:

* A sample with several image members (``2023.05.01_beach.jpg`` and ``2023.05.02_dog.jpg`` share
  the key ``2023``; ``k.0.jpg``/``k.1.jpg`` are one sample with two images) is split: one row per
  image member, keyed by the member's name without its image extension (``2023.05.01_beach``;
  the full name where two image members share a stem). A member whose name starts with that
  stem joins its row (``2023.05.01_beach.txt`` as column ``txt``); the others join every row of
  the sample under their suffix. So does a sample of one image with a dotted key: ``img.0001.txt``
  beside ``img.0001.jpg`` is the row's ``txt``.
* ``data.image_column`` naming an extension (``jpg``) picks that member; the sample's other
  image members are skipped (``image member not selected``).
* An image member is one whose last extension a Pillow decoder registers, or whose bytes Pillow
  identifies.
* Skipped and counted: samples without an image (``sample without an image (members: json,
  txt)``: caption-only or metadata shards, and a member whose key joins no image, as ``k_extra.txt``
  next to ``k.jpg``), members without a key or an extension, a repeated suffix in one sample,
  non-tar files next to the shards, and the rest of a shard that cannot be read past some point
  (``unreadable shard``). One item per image row and per skipped entry (a sample, or a member):
  items seen = rows + skipped.
* Ragged samples: every row carries every configured column (``data.passthrough_columns``, the
  key), null where its sample lacks that member; members the job does not read are not columns. A
  member's column type follows its suffix (text, int for class indices, else bytes), in every
  block, so that blocks without a member still concatenate with blocks that have it; a row whose
  configured class index is not an integer is skipped (``member 'cls' is not an integer``).
* Preflight reads shards in order until it has seen a sample with an image and, on image rows,
  every configured column, or until its budget (common.Looked) is spent. It refuses a dataset
  without an image only when it has read every shard, and a column no image row it read has,
  saying how much it read; when the budget ends before any image it warns and the run reads on.

A row's key (``__key__``) is ``<shard path relative to data.path>/<sample key>``: unique across
shards by construction, as two shards may hold the same sample key.
"""

from __future__ import annotations

import functools
import re
import tarfile
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import pyarrow as pa
import ray.data
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from capjob.config import DataConfig
from capjob.errors import SourceError
from capjob.stages.sources.common import ITEM_COLUMN, SKIP_COLUMN, Looked, log
from capjob.stages.sources.image_folder import SNIFF_BYTES, extension, image_extensions, sniff_image
from capjob.stages.storage import describe_remote_error, filesystem_for, hidden, iter_files, open_file

# Members decoded to text (and ints for class indices); everything else stays bytes.
TEXT_SUFFIXES = {"txt", "text", "caption", "json", "jsonl", "url", "key", "id"}
INT_SUFFIXES = {"cls", "cls2", "index", "inx"}
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
ROWS_PER_BLOCK = 256
# webdataset.tariterators.base_plus_ext and the metadata rule of tar_file_iterator.
_BASE_PLUS_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
_SKIP_META = re.compile(r"__[^/]*__($|/)")


def base_plus_ext(path: str) -> tuple[Optional[str], Optional[str]]:
    match = _BASE_PLUS_EXT.match(path)
    return (match.group(1), match.group(2)) if match else (None, None)


def _decode(suffix: str, value: bytes) -> Any:
    last = suffix.rsplit(".", 1)[-1]
    if last in TEXT_SUFFIXES or last in INT_SUFFIXES:
        text = value.decode("utf-8", "replace").strip()
        if last in INT_SUFFIXES:
            try:
                return int(text)
            except ValueError:
                pass
        return text
    return value


def member_type(suffix: str) -> pa.DataType:
    """The column type of a member with `suffix` (as _decode decodes it): string for text,
    int64 for class indices, binary for the rest (images, tensors)."""
    last = suffix.rsplit(".", 1)[-1]
    return pa.string() if last in TEXT_SUFFIXES else pa.int64() if last in INT_SUFFIXES else pa.binary()


def _is_image(suffix: str, value: bytes) -> bool:
    last = suffix.rsplit(".", 1)[-1]
    if last in image_extensions():
        return True
    if last in TEXT_SUFFIXES or last in INT_SUFFIXES:
        return False
    # As image_folder identifies a file: the whole member where Pillow needs more than its head.
    head = value[:SNIFF_BYTES]
    return sniff_image(head, (lambda: value) if len(value) > len(head) else None)


def sample_rows(key: str, members: dict[str, bytes], image_column: str) -> Iterator[dict[str, Any]]:
    """The rows of one sample (see the module docstring), and a skip row per member not used.
    Rows carry `__key__` = `key` (+ '.' + stem when split), the image in `image_column`, and
    the other members by suffix."""
    if image_column != "image" and image_column in members:
        images = [image_column]
        for s in members:
            if s != image_column and _is_image(s, members[s]):
                yield {ITEM_COLUMN: f"{key}.{s}", SKIP_COLUMN: f"image member not selected (data.image_column={image_column})"}
        rest = {s: v for s, v in members.items() if s not in images and not _is_image(s, v)}
        yield {"__key__": key, image_column: members[image_column], **{s: _decode(s, v) for s, v in rest.items()}}
        return
    images = [s for s, v in members.items() if _is_image(s, v)]
    if not images:
        yield {ITEM_COLUMN: key, SKIP_COLUMN: f"sample without an image (members: {', '.join(sorted(members))})"}
        return
    others = {s: v for s, v in members.items() if s not in images}
    if len(images) == 1:
        # A dotted key (`img.0001.jpg`: suffix `0001.jpg`) names its members as a split sample does:
        # `img.0001.txt` is the row's `txt`; the key stays the sample's.
        stem = images[0].rsplit(".", 1)[0] if "." in images[0] else ""
        own = {o: o[len(stem) + 1:] for o in others if stem and o.startswith(stem + ".")}
        yield {"__key__": key, image_column: members[images[0]],
               **{o: _decode(o, v) for o, v in others.items() if o not in own}, **{own[o]: _decode(o, others[o]) for o in own}}
        return
    stems = {s: (s.rsplit(".", 1)[0] if "." in s else "") for s in images}
    taken: set[str] = set()
    for s in images:
        stem = stems[s]
        unique = stem and list(stems.values()).count(stem) == 1
        own = {o[len(stem) + 1:]: v for o, v in others.items() if unique and o.startswith(stem + ".")}
        taken.update(f"{stem}.{o}" for o in own)
        shared = {o: v for o, v in others.items() if not any(o.startswith(t + ".") for t in stems.values() if t)}
        row_key = f"{key}.{stem}" if unique else f"{key}.{s}"
        yield {"__key__": row_key, image_column: members[s],
               **{o: _decode(o, v) for o, v in shared.items()}, **{o: _decode(o, v) for o, v in own.items()}}
    for o in others:
        if o not in taken and any(o.startswith(t + ".") for t in stems.values() if t):
            yield {ITEM_COLUMN: f"{key}.{o}", SKIP_COLUMN: "member of no image row"}


def shard_rows(fileobj: Any, shard: str, image_column: str, looked: Optional[Looked] = None) -> Iterator[dict[str, Any]]:
    """Every member of one tar stream as rows (with `__key__` prefixed by `shard`) or skip rows;
    `looked` (preflight) counts the members."""
    current: Optional[str] = None
    members: dict[str, bytes] = {}

    def flush() -> Iterator[dict[str, Any]]:
        if current is not None and members:
            for row in sample_rows(f"{shard}/{current}", members, image_column):
                yield row

    try:
        with tarfile.open(fileobj=fileobj, mode="r|*") as tar:
            for info in tar:
                name = info.name
                if looked is not None and not info.isdir():
                    looked.count("members")
                if not info.isreg():
                    if not info.isdir():
                        yield {ITEM_COLUMN: f"{shard}/{name}", SKIP_COLUMN: "not a regular file"}
                    continue
                item = f"{shard}/{name}"
                if ("/" not in name and name.startswith("__") and name.endswith("__")) or _SKIP_META.match(name):
                    yield {ITEM_COLUMN: item, SKIP_COLUMN: "webdataset metadata"}
                    continue
                key, suffix = base_plus_ext(name)
                if key is None or suffix is None:
                    reason = "hidden file" if hidden(name) else "member without an extension"
                    yield {ITEM_COLUMN: item, SKIP_COLUMN: reason}
                    continue
                suffix = suffix.lower()
                data = tar.extractfile(info).read()  # type: ignore[union-attr]
                if key != current:
                    yield from flush()
                    current, members = key, {}
                if suffix in members:
                    yield {ITEM_COLUMN: item, SKIP_COLUMN: "repeated suffix in a sample"}
                    continue
                members[suffix] = data
        yield from flush()
    except (tarfile.TarError, OSError, EOFError) as e:
        yield from flush()
        yield {ITEM_COLUMN: f"{shard}#unreadable", SKIP_COLUMN: f"unreadable shard ({type(e).__name__})"}


def _read_shards(shards: list[tuple[str, str]], others: list[tuple[str, str]], storage_options: dict[str, Any],
                 image_column: str, columns: list[str]) -> Iterator[pa.Table]:
    rows: list[dict[str, Any]] = [{ITEM_COLUMN: rel, SKIP_COLUMN: reason} for rel, reason in others]
    for url, rel in shards:
        try:
            with open_file(url, storage_options) as f:
                for row in shard_rows(f, rel, image_column):
                    row.setdefault("__url__", url)
                    rows.append(row)
                    if len(rows) >= ROWS_PER_BLOCK:
                        yield _table(rows, image_column, columns)
                        rows = []
        except Exception as e:  # noqa: BLE001 - a shard that cannot be opened costs its own items only
            rows.append({ITEM_COLUMN: f"{rel}#unreadable", SKIP_COLUMN: f"unreadable shard ({type(e).__name__})", "__url__": url})
    if rows:
        yield _table(rows, image_column, columns)


def _table(rows: list[dict[str, Any]], image_column: str, columns: list[str] = ()) -> pa.Table:  # type: ignore[assignment]
    """One block: every row with every column of the block and of `columns` (the configured
    ones, present whether or not a sample of this block has the member); a column without a
    value in the block typed by its suffix (member_type), the image column binary."""
    for i, row in enumerate(rows):
        row.setdefault(ITEM_COLUMN, row.get("__key__"))
        # A class index that is not an integer (`dog.cls`) cannot share its column's int64 with
        # the other blocks' (Ray Data concatenates them): that row is skipped, saying so.
        wrong = next((c for c in columns if c != image_column and member_type(c) == pa.int64() and isinstance(row.get(c), str)), None)
        if wrong is not None and row.get(SKIP_COLUMN) is None:
            rows[i] = {ITEM_COLUMN: row[ITEM_COLUMN], SKIP_COLUMN: f"member {wrong!r} is not an integer", "__url__": row.get("__url__")}
    # from_pylist takes its columns from the first row only: give every row every column. With
    # `columns`, only those: members the job does not read are not columns (nor can their types clash).
    names = list(dict.fromkeys(["__key__", "__url__", image_column, SKIP_COLUMN, ITEM_COLUMN, *columns,
                                *(() if columns else (k for r in rows for k in r))]))
    rows = [{c: r.get(c) for c in names} for r in rows]
    try:
        table = pa.Table.from_pylist(rows)
    except (pa.ArrowInvalid, pa.ArrowTypeError):  # a member decoded as int in one sample, text in another
        fixed = [{k: (v if v is None or isinstance(v, (bytes, str)) or k == image_column else str(v)) for k, v in r.items()} for r in rows]
        table = pa.Table.from_pylist(fixed)
    for i, f in enumerate(table.schema):
        if pa.types.is_null(f.type):
            type_ = pa.string() if f.name in ("__key__", "__url__", ITEM_COLUMN, SKIP_COLUMN) else (
                pa.binary() if f.name == image_column else member_type(f.name))
            table = table.set_column(i, f.name, pa.nulls(table.num_rows, type_))
    return table


class WebDatasetShards(Datasource):
    """Tar shards read by Ray tasks, a contiguous group of shards per task; every block carries
    `columns` (the configured ones)."""

    def __init__(self, shards: list[tuple[str, str]], others: list[tuple[str, str]], storage_options: dict[str, Any],
                 image_column: str, columns: Optional[list[str]] = None):
        self._shards, self._others = shards, others
        self._options, self._image_column = storage_options, image_column
        self._columns = list(columns or [])

    def estimate_inmemory_data_size(self) -> Optional[int]:
        return None

    def get_name(self) -> str:
        return "WebDataset"

    def get_read_tasks(self, parallelism: int, per_task_row_limit: Optional[int] = None, data_context: Any = None) -> list[ReadTask]:
        n = max(1, min(len(self._shards), parallelism if parallelism and parallelism > 0 else len(self._shards)))
        groups = [self._shards[i::n] for i in range(n)]
        tasks = []
        for i, group in enumerate(groups):
            others = self._others if i == 0 else []
            meta = BlockMetadata(num_rows=None, size_bytes=None, input_files=None, exec_stats=None)
            tasks.append(ReadTask(functools.partial(_read_shards, group, others, self._options, self._image_column, self._columns), meta,
                                  per_task_row_limit=per_task_row_limit))
        return tasks


def list_shards(cfg: DataConfig) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """([(shard URL, path relative to data.path)], [(other file, skip reason)])."""
    assert cfg.path is not None
    fs, root = filesystem_for(cfg.path, cfg.storage_options)
    try:
        if not fs.isdir(root):
            return [(cfg.path, root.rsplit("/", 1)[-1])], []
        listed = sorted(fs.find(root, detail=False))
    except Exception as e:  # noqa: BLE001
        raise SourceError(f"data.path: {describe_remote_error(cfg.path, e)}") from None
    prefix = root.rstrip("/") + "/"
    protocol = "" if "://" not in cfg.path else cfg.path.split("://", 1)[0] + "://"
    shards, others = [], []
    for p in listed:
        rel = p[len(prefix):] if p.startswith(prefix) else p
        if any(hidden(part) for part in rel.split("/")):
            others.append((rel, "hidden file"))
        elif p.lower().endswith(SHARD_SUFFIXES):
            shards.append((protocol + p, rel))
        else:
            others.append((rel, f"not a tar shard (.{extension(p) or 'no extension'})"))
    if not shards:
        raise SourceError(f"data.path: no tar shards ({', '.join('*' + s for s in SHARD_SUFFIXES)}) under {cfg.path!r}")
    return shards, others


class _Counted:
    """A file object that adds the bytes read from it to `looked.bytes`."""

    def __init__(self, f: Any, looked: Looked):
        self._f, self._looked = f, looked

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self._looked.bytes += len(data)
        return data


@dataclass
class Scan:
    """What preflight found in the shards it read: `columns` of the image rows (empty: no image
    row), `looked` (how much), `everything` (every shard read to its end)."""

    columns: list[str] = field(default_factory=list)
    looked: Looked = field(default_factory=lambda: Looked("shard", parts={"members": 0}))
    everything: bool = False


def _shard_urls(cfg: DataConfig, kind: str) -> Iterator[str]:
    assert cfg.path is not None
    if kind == "file":
        yield cfg.path
        return
    found = False
    for url in iter_files(cfg.path, cfg.storage_options, [s.lstrip(".") for s in SHARD_SUFFIXES]):
        found = True
        yield url
    if not found:
        raise SourceError(f"data.path: no tar shards ({', '.join('*' + s for s in SHARD_SUFFIXES)}) under {cfg.path!r}")


def scan(cfg: DataConfig, kind: str, wanted: list[str]) -> Scan:
    """Preflight's read of the shards, in order (a lazy walk: no listing of the whole dataset),
    until an image row has been seen and every `wanted` column on some image row, or the
    budget (common.Looked) is spent, or every shard has been read. Without Ray. SourceError
    (one line) when the first shard cannot be opened at all, or when every shard has been read
    and none holds a sample with an image."""
    assert cfg.path is not None
    found = Scan()
    columns: dict[str, None] = {}
    unreadable = 0
    for url in _shard_urls(cfg, kind):
        found.looked.seen += 1
        try:
            with open_file(url, cfg.storage_options) as f:
                for row in shard_rows(_Counted(f, found.looked), "", cfg.image_column, found.looked):
                    if row.get(SKIP_COLUMN) is None and "__key__" in row:
                        columns.update(dict.fromkeys(["__url__", *(c for c in row if c != ITEM_COLUMN)]))
                        if all(c in columns for c in wanted):
                            found.columns = list(columns)
                            return found
                    elif str(row.get(SKIP_COLUMN)).startswith("unreadable shard"):
                        unreadable += 1
                    if found.looked.spent():
                        found.columns = list(columns)
                        return found
        except Exception as e:  # noqa: BLE001
            if found.looked.seen == 1:  # the first shard: most likely every one (access, endpoint)
                raise SourceError(f"data.path: {describe_remote_error(url, e)}") from None
            unreadable += 1
        if found.looked.spent():
            found.columns = list(columns)
            return found
    found.columns, found.everything = list(columns), True
    if unreadable:
        found.looked.count("unreadable", unreadable)
    if not columns:
        raise SourceError(f"data.path: {cfg.path!r} holds no webdataset sample with an image (members named <key>.<ext>): "
                          f"{found.looked.describe(True)}")
    return found


# preflight's findings per (path, image column, wanted columns, options): read_source checks what
# preflight checked, without reading the shards (nor warning) twice.
_PREFLIGHTS: dict[str, tuple[Optional[list[str]], str]] = {}


def preflight(cfg: DataConfig, kind: str, wanted: list[str]) -> tuple[Optional[list[str]], str]:
    """(columns of the image rows preflight read, how much it read): None when its budget ended
    before any sample with an image (warned: the rest may hold images, the run reads on)."""
    key = repr((cfg.path, kind, cfg.image_column, wanted, cfg.storage_options))
    if key in _PREFLIGHTS:
        return _PREFLIGHTS[key]
    found = scan(cfg, kind, wanted)
    looked = found.looked.describe(found.everything)
    if not found.columns:
        log.warning("data.path: %s and found no webdataset sample with an image yet; the run reads every shard "
                    "(samples without an image are counted as skipped)", looked)
    _PREFLIGHTS[key] = (found.columns or None, looked)
    return _PREFLIGHTS[key]


def read_webdataset(cfg: DataConfig, columns: list[str]) -> ray.data.Dataset:
    """Every shard under data.path; every block carries `columns` (image, key, pass-through)."""
    shards, others = list_shards(cfg)
    return ray.data.read_datasource(WebDatasetShards(shards, others, cfg.storage_options, cfg.image_column, columns))
