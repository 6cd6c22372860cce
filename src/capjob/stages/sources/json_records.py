"""Layout ``json``: files of JSON records, as VLM instruction sets hold them -- a JSON array of
objects, or JSON Lines (one object a line):

* LLaVA-Instruct / ShareGPT4V: ``{"id": "000000033471", "image": "coco/train2017/000000033471.jpg",
  "conversations": [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", "value": "..."}]}``
* LLaMA-Factory (``sharegpt`` format, multimodal): ``{"messages": [{"role": "user", "content":
  "<image>..."}, ...], "images": ["mllm_demo_data/1.jpg"]}``

``data.path``: one file, or a folder whose ``*.json`` / ``*.jsonl`` / ``*.ndjson`` files
(compressed ``.gz``, ``.zst``, ``.bz2``, ``.xz`` by suffix) are read -- not its subfolders, where
the images usually are; its other files are not items. Local or any fsspec URL. Text is UTF-8,
a byte order mark ignored, or UTF-16/32 known by its BOM (RFC 8259, section 8.1: Windows tools
write both). A file that is one object holding the records under a key (``{"data": [...]}``) is
refused in preflight, naming the key.

Images: ``data.image_column`` names the record's image field, a path or a list of paths (a list
takes ``data.image_index`` / ``data.explode_images``, as any list column). A relative path is
joined to ``data.image_root`` (default: the folder of the JSON file holding the record), local or
any fsspec URL; absolute paths and URLs stay as they are. The joined location is the row's image
(``IMAGE_COLUMN``), fetched by the image stage like any path cell, so a missing file is
quarantined ``fetch: not found: <path>``; the record's own field keeps its text for pass-through.

Rows: one per record. Its key is ``data.key_column`` or, without one, the record's place
``<file relative to data.path>:<index>`` (0-based), so that two records of one image are two
rows, whose ids share the image's content digest (ids.py). Every top-level field the job reads
(``data.key_column``, ``data.passthrough_columns``; the rest are never columns) is a column,
null in records without it, named as the field -- but a field named like a column capjob's
output rows have (``id``, ``model``, ``caption``...: schema.ROW_COLUMNS) is the column
``source_<name>`` (LLaVA's ``id`` is ``source_id``), so that it can pass through.

Ray Data concatenates the blocks of every file, which needs one type per column
(column_types, fixed from the first records): top-level numbers and booleans become their JSON
text (LLaVA-665k's ``id`` is a number in one record and text in the next); nested values
(``conversations``) keep their structure, their numbers as floats (JSON has one number type; an
integer above 2**53 loses precision); a field the first records hold as text (or mixed) holds
nested values as JSON text; a record whose nested value cannot share the first records' type
(text where they hold lists) is skipped, saying so.

Every record is an item: a row, or skipped and counted (common.account) -- a record without an
image (a text-only conversation: the field missing, null, empty or ``[]``), a value that is not a
JSON object, a line that is not JSON, a file that is neither a JSON array nor JSON Lines, the rest
of a file that stops parsing, a record with several images where the first records held one
(``data.image_index`` / ``data.explode_images`` need the field to be a list from the start), and
a nested value of another type than the first records' (above).

Large files stream: arrays record by record through the json module's C scanner on a window of
the text (array_items; ijson, which rejects the ``NaN`` and ``Infinity`` that Python's
``json.dumps`` writes, only finds a wrapped file's key), lines one by one, into
blocks of ``ROWS_PER_BLOCK`` rows, a file per read task: a 1 GB array of 665k records is never in
memory whole.
"""

from __future__ import annotations

import codecs
import contextlib
import io
import json
import os
import posixpath
from dataclasses import dataclass, field
from typing import Any, Collection, Iterator, Optional

import pyarrow as pa
import ray.data

from capjob.config import DataConfig
from capjob.errors import SourceError
from capjob.schema import CAPTION_COLUMN, ROW_COLUMNS
from capjob.stages.sources.cells import has_scheme
from capjob.stages.sources.common import ITEM_COLUMN, SKIP_COLUMN, Looked, check_image_list, log
from capjob.stages.storage import describe_remote_error, filesystem_for, hidden, probe

# The row's image location (image_root joined), and its default key (the record's place).
IMAGE_COLUMN = "__image__"
RECORD_KEY_COLUMN = "__record__"
JSON_SUFFIXES = (".json", ".jsonl", ".ndjson")
COMPRESSION_SUFFIXES = (".gz", ".zst", ".bz2", ".xz")
ROWS_PER_BLOCK = 1024
# Preflight reads until this many records with an image (their fields type the columns), within
# its budget (common.Looked).
PREFLIGHT_RECORDS = 1000
NO_IMAGE = "record without an image"
# Lines that do not parse as a JSON object, before any that does, after which a file is no JSON Lines file.
LEADING_BAD_LINES = 8


def is_json_file(name: str) -> bool:
    lower = name.lower()
    for suffix in COMPRESSION_SUFFIXES:
        lower = lower.removesuffix(suffix)
    return lower.endswith(JSON_SUFFIXES)


def list_files(cfg: DataConfig) -> list[tuple[str, str]]:
    """[(file URL or path, its name relative to data.path)]: data.path itself, or the JSON files
    directly in the folder, sorted."""
    assert cfg.path is not None
    fs, root = filesystem_for(cfg.path, cfg.storage_options)
    try:
        if not fs.isdir(root):
            return [(cfg.path, root.rstrip("/").rsplit("/", 1)[-1])]
        entries = sorted(e["name"] for e in fs.ls(root, detail=True) if e["type"] == "file")
    except Exception as e:  # noqa: BLE001
        raise SourceError(f"data.path: {describe_remote_error(cfg.path, e)}") from None
    protocol = "" if "://" not in cfg.path else cfg.path.split("://", 1)[0] + "://"
    names = [(p, p.rstrip("/").rsplit("/", 1)[-1]) for p in entries]
    files = [(protocol + p, name) for p, name in names if not hidden(name) and is_json_file(name)]
    if not files:
        raise SourceError(f"data.path: no JSON files ({', '.join('*' + s for s in JSON_SUFFIXES)}) in {cfg.path!r}")
    return files


# RFC 8259 (section 8.1) wants UTF-8 without a byte order mark but lets a parser ignore one; Windows
# tools write a UTF-8 BOM (Notepad, .NET) or UTF-16 with one (PowerShell 5's Out-File). Longest first.
_BOMS = ((codecs.BOM_UTF32_LE, "utf-32-le"), (codecs.BOM_UTF32_BE, "utf-32-be"), (codecs.BOM_UTF8, "utf-8"),
         (codecs.BOM_UTF16_LE, "utf-16-le"), (codecs.BOM_UTF16_BE, "utf-16-be"))


class _Utf8(io.RawIOBase):
    """A binary stream of UTF-8: `head` (bytes already read), then the rest of `f`, both in
    `encoding` (transcoded as they are read)."""

    def __init__(self, head: bytes, f: Any, encoding: str, looked: Optional[Looked] = None):
        self._head, self._f, self._looked = head, f, looked
        self._decoder = None if encoding == "utf-8" else codecs.getincrementaldecoder(encoding)()
        self._pending = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._pending:
            chunk, self._head = (self._head, b"") if self._head else (self._f.read(max(len(buffer), 4)), b"")
            if self._looked is not None:
                self._looked.bytes += len(chunk)
            if self._decoder is None:
                self._pending = chunk
                break
            self._pending = self._decoder.decode(chunk, final=not chunk).encode("utf-8")
            if not chunk:
                break
        data, self._pending = self._pending[:len(buffer)], self._pending[len(buffer):]
        buffer[:len(data)] = data
        return len(data)


@contextlib.contextmanager
def _open(url: str, storage_options: dict[str, Any], looked: Optional[Looked] = None) -> Iterator[Any]:
    """The file (decompressed by suffix) as a UTF-8 byte stream without its byte order mark:
    UTF-16/32 files (known by their BOM) are transcoded as they are read; `looked` counts the
    bytes read (preflight's budget)."""
    fs, path = filesystem_for(url, storage_options)
    with fs.open(path, "rb", compression="infer") as f:
        head = f.read(4)
        bom, encoding = next(((b, e) for b, e in _BOMS if head.startswith(b)), (b"", "utf-8"))
        yield io.BufferedReader(_Utf8(head[len(bom):], f, encoding, looked))


def iter_records(url: str, storage_options: dict[str, Any],
                 looked: Optional[Looked] = None) -> Iterator[tuple[Optional[dict[str, Any]], Optional[str]]]:
    """(record, None) or (None, skip reason) for every item of a JSON array or JSON Lines file.
    Both parse as Python's json module parses (``NaN`` and ``Infinity``, which its ``dumps``
    writes by default, included)."""
    with _open(url, storage_options) as f:
        head = f.read(4096).lstrip()
    if looked is not None:
        looked.bytes += len(head)
    if head[:1] == b"[":
        count = 0
        try:
            with _open(url, storage_options, looked) as f:
                for value in array_items(io.TextIOWrapper(f, encoding="utf-8")):
                    count += 1
                    yield _record(value)
        except (ValueError, OSError, EOFError) as e:
            yield None, f"unreadable JSON after {count} records ({type(e).__name__})"
        return
    with _open(url, storage_options, looked) as f:
        # Lines that do not parse before the first object line: a damaged first line of JSON
        # Lines costs that line; LEADING_BAD_LINES of them and no object yet (a pretty-printed
        # object, a CSV...) are no JSON Lines file.
        leading: list[str] = []
        records = False
        for line in f:
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except ValueError:
                if records:
                    yield None, "invalid JSON line"
                    continue
                value = None
                leading.append("invalid JSON line")
            else:
                if not records and not isinstance(value, dict):  # a pretty-printed value's line (`  "x"`)...
                    leading.append(str(_record(value)[1]))
            if not records and (value is None or not isinstance(value, dict)):
                if len(leading) >= LEADING_BAD_LINES:
                    yield None, "not a JSON array or JSON Lines file"
                    return
                continue
            if not records:
                records = True
                yield from ((None, reason) for reason in leading)
            yield _record(value)
        if not records and leading:
            yield None, "not a JSON array or JSON Lines file"


# Characters read at a time from a JSON array; a value longer than this is read in several.
ARRAY_CHUNK = 1 << 20
_WHITESPACE = " \t\n\r"


def array_items(text: Any) -> Iterator[Any]:
    """The items of the JSON array a text stream holds, one at a time (json.JSONDecoder's C
    scanner on a window of ARRAY_CHUNK characters: a large file is never in memory whole).
    Raises ValueError (json.JSONDecodeError) where the array stops parsing."""
    decoder = json.JSONDecoder()
    buffer, pos, eof = text.read(ARRAY_CHUNK).lstrip(_WHITESPACE)[1:], 0, False
    expect_value = True  # after '[' or ','
    while True:
        while pos < len(buffer) and buffer[pos] in _WHITESPACE:
            pos += 1
        if pos >= len(buffer) - 1 and not eof:  # keep a character of look-ahead past the value
            more = text.read(ARRAY_CHUNK)
            buffer, pos, eof = buffer[pos:] + more, 0, not more
            continue
        if pos >= len(buffer):
            raise json.JSONDecodeError("unterminated array", buffer, pos)
        if buffer[pos] == "]":
            return
        if not expect_value:
            if buffer[pos] != ",":
                raise json.JSONDecodeError("expected ',' or ']'", buffer, pos)
            pos, expect_value = pos + 1, True
            continue
        try:
            value, end = decoder.raw_decode(buffer, pos)
        except json.JSONDecodeError:
            if eof:
                raise
            end = None
        if end is None or (end >= len(buffer) and not eof):  # cut by the window (a number may go on): read more
            more = text.read(max(ARRAY_CHUNK, len(buffer)))
            buffer, pos, eof = buffer[pos:] + more, 0, not more
            continue
        yield value
        pos, expect_value = end, False


def wrapped_field(url: str, storage_options: dict[str, Any]) -> Optional[str]:
    """The field of a file that is one JSON object holding its records as a list of objects
    under one key (``{"version": 1, "data": [{...}, ...]}``), or None. Streams up to that key."""
    import ijson

    with _open(url, storage_options) as f:
        events = ijson.parse(f)
        try:
            if next(events)[1] != "start_map":
                return None
            key = None
            for prefix, event, value in events:
                if prefix == "" and event == "map_key":
                    key = value
                elif prefix == key and event == "start_array":
                    if next(events)[1] == "start_map":
                        return key
                elif prefix == "" and event == "end_map":
                    return None
        except (ijson.JSONError, ValueError, OSError, EOFError, StopIteration):
            return None
    return None


def _record(value: Any) -> tuple[Optional[dict[str, Any]], Optional[str]]:
    if isinstance(value, dict):
        return value, None
    return None, f"not a JSON object ({type(value).__name__})"


def locate(path: str, root: str) -> str:
    """An image path of a record as a location: joined to `root` when relative."""
    text = path.strip()
    if not text or has_scheme(text) or text.startswith(("/", "data:")):
        return text
    if "://" in root:
        scheme, rest = root.split("://", 1)
        return f"{scheme}://{posixpath.normpath(posixpath.join(rest, text))}"
    return os.path.normpath(os.path.join(root, text))


def column_name(field: str) -> str:
    """The column of a record's field: its name, but ``source_<name>`` for a name capjob's output
    rows use (``id``, ``model``, ``caption``...), whose value would otherwise be overwritten."""
    return f"source_{field}" if field in (*ROW_COLUMNS, CAPTION_COLUMN) else field


def _text(value: Any) -> Any:
    """A top-level field as the column holds it (module docstring)."""
    if isinstance(value, (bool, int, float)):
        return json.dumps(value)
    return _numbers_as_floats(value) if isinstance(value, (list, dict)) else value


def _numbers_as_floats(value: Any) -> Any:
    """A nested value with its numbers as floats: JSON has one number type (RFC 8259, section 6),
    and `[1, 2]` in one block and `[0.5, 2]` in another must be one column type."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return float(value)
    if isinstance(value, list):
        return [_numbers_as_floats(v) for v in value]
    if isinstance(value, dict):
        return {k: _numbers_as_floats(v) for k, v in value.items()}
    return value


def record_row(record: dict[str, Any], item: str, image_field: str, root: str, listed: bool,
               fields: Optional[Collection[str]] = None) -> dict[str, Any]:
    """The row of one record: its fields (those whose columns are in `fields`; None: all), the
    image location(s), its place; or a skip row."""
    value = record.get(image_field)
    images = value if isinstance(value, list) else [value]
    if value is None or not [v for v in images if v not in (None, "")]:
        return {ITEM_COLUMN: item, SKIP_COLUMN: NO_IMAGE}
    if not listed and len(images) > 1:
        return {ITEM_COLUMN: item, SKIP_COLUMN: f"record with {len(images)} images where the first records held one"}
    row = {column_name(k): _text(v) for k, v in record.items()
           if k not in (IMAGE_COLUMN, RECORD_KEY_COLUMN, ITEM_COLUMN, SKIP_COLUMN) and (fields is None or column_name(k) in fields)}
    located = [locate(v, root) if isinstance(v, str) else None for v in images]
    row[image_field] = images if listed else images[0]
    row[IMAGE_COLUMN] = located if listed else located[0]
    row[RECORD_KEY_COLUMN] = item
    row[ITEM_COLUMN] = item
    row[SKIP_COLUMN] = None
    return row


def _column(values: list[Any]) -> pa.Array:
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):  # mixed types within the block
        return pa.array([None if v is None else json.dumps(v, ensure_ascii=False) for v in values], pa.string())


def _as_json_text(values: list[Any]) -> pa.Array:
    return pa.array([json.dumps(v, ensure_ascii=False) if isinstance(v, (list, dict)) else v for v in values], pa.string())


def _agrees(values: list[Any], expected: pa.DataType) -> bool:
    """Whether `values` make one Arrow column that Arrow's permissive promotion (what Ray Data
    applies when it concatenates blocks) unites with a column of type `expected`."""
    try:
        found = pa.array(values).type
        pa.unify_schemas([pa.schema([("c", expected)]), pa.schema([("c", found)])], promote_options="permissive")
        return True
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OverflowError):
        return False


def _table(rows: list[dict[str, Any]], types: Optional[dict[str, Optional[pa.DataType]]] = None) -> pa.Table:
    """A block of rows; with `types` (column_types), every column a block of any file can
    concatenate with: a text column holds nested values as JSON text, and a record whose nested
    value cannot share the first records' type is a skip row saying so."""
    for column, expected in (types or {}).items():
        if expected is None or expected == pa.string() or _agrees([r.get(column) for r in rows], expected):
            continue
        for i, row in enumerate(rows):
            value = row.get(column)
            if value is not None and not _agrees([value], expected):
                rows[i] = {ITEM_COLUMN: row[ITEM_COLUMN], SKIP_COLUMN: f"field {column!r} holds {type(value).__name__} {_arrow_type(value)} "
                                                                      f"where the first records hold {expected}"}
    columns = list(dict.fromkeys(k for r in rows for k in r))
    return pa.table({c: _as_json_text([r.get(c) for r in rows]) if (types or {}).get(c) == pa.string() else _column([r.get(c) for r in rows])
                     for c in columns})


def _arrow_type(value: Any) -> str:
    try:
        return f"({pa.array([value]).type})"
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        return "(mixed types)"


def read_files(batch: pa.Table, *, image_field: str, image_root: Optional[str], listed: bool,
               storage_options: dict[str, Any], types: Optional[dict[str, Optional[pa.DataType]]] = None) -> Iterator[pa.Table]:
    """map_batches UDF over the file list (``url``, ``name`` columns): every item of each file as
    a row or a skip row, in blocks of ROWS_PER_BLOCK. With `types` (column_types: the fields the
    job reads), only those fields are columns, typed alike in every block; None: every field."""
    rows: list[dict[str, Any]] = []
    fields = None if types is None else set(types)
    for url, name in zip(batch.column("url").to_pylist(), batch.column("name").to_pylist()):
        root = image_root or folder_of(url)
        for index, (record, reason) in enumerate(iter_records(url, storage_options)):
            item = f"{name}:{index}"
            rows.append({ITEM_COLUMN: item, SKIP_COLUMN: reason} if record is None
                        else record_row(record, item, image_field, root, listed, fields))
            if len(rows) >= ROWS_PER_BLOCK:
                yield _table(rows, types)
                rows = []
    if rows:
        yield _table(rows, types)


def folder_of(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[0] if "://" in url else os.path.dirname(os.path.abspath(url))


def _absolute(path: Optional[str]) -> Optional[str]:
    """A local path as an absolute one (Ray's workers do not share the driver's directory)."""
    return path if path is None or "://" in path else os.path.abspath(path)


def preflight(cfg: DataConfig) -> bool:
    """Checks data.path, data.image_root and the fields the options name against the records
    _sample reads, without Ray. Returns whether the image field holds lists (False where the
    budget ended before any image: warned, the run reads on). Raises SourceError (one line)."""
    assert cfg.path is not None
    probe(cfg.path, cfg.storage_options)
    if cfg.image_root:
        probe(cfg.image_root, cfg.storage_options, "data.image_root")
    files = list_files(cfg)
    found = _sample(cfg, files)
    fields, first_image = found.fields, found.first_image
    looked = f"the first {found.looked.parts['records']} records of {cfg.path!r} ({found.looked.describe(found.everything)})"
    if first_image is None:
        wrapped = wrapped_field(files[0][0], cfg.storage_options)
        if wrapped is not None:
            raise SourceError(f"data.path: {files[0][0]!r} is one JSON object whose field {wrapped!r} holds the records; capjob reads "
                              f"a JSON array or JSON Lines file of records (write that list out: jq '.{wrapped}' {files[0][1]})")
    if not found.looked.parts["records"] and found.everything:
        raise SourceError(f"data.path: no JSON records in {cfg.path!r} ({found.skipped[0] if found.skipped else 'empty'})")
    if first_image is None and found.everything:
        raise SourceError(f"data.image_column: no image in field {cfg.image_column!r} of {looked}; fields there: {sorted(fields)}")
    wanted = ([("data.key_column", cfg.key_column)] if cfg.key_column else []) + [("data.passthrough_columns", c) for c in cfg.passthrough_columns]
    for key, column in wanted:
        if column not in fields and column != RECORD_KEY_COLUMN:
            raise SourceError(f"{key}: no field {column!r} in {looked}; fields there: {sorted(fields)}")
    if first_image is None:
        log.warning("data.path: %s and found no record with an image in field %r yet; the run reads every record "
                    "(records without an image are counted as skipped)", looked, cfg.image_column)
        return False
    image_type = pa.list_(pa.string()) if isinstance(first_image, list) else pa.string()
    return check_image_list(cfg, image_type, looked)


@dataclass
class Sample:
    """What preflight read: the first PREFLIGHT_RECORDS `records` with an image (they type the
    columns: column_types), the `fields` of every record read, the `first_image` field value,
    the skip reasons met, how much was read (`looked`), and whether that is `everything`."""

    records: list[dict[str, Any]] = field(default_factory=list)
    fields: set[str] = field(default_factory=set)
    first_image: Any = None
    skipped: list[str] = field(default_factory=list)
    looked: Looked = field(default_factory=lambda: Looked("file", parts={"records": 0}))
    everything: bool = False


def _sample(cfg: DataConfig, files: list[tuple[str, str]]) -> Sample:
    """Records in order, as preflight reads any source: past files or records without an image
    (a text-only set sorted first, a text-only head of a mix), until PREFLIGHT_RECORDS records
    with an image and every field the options name are seen, or the budget (common.Looked) is
    spent, or everything is read. Raises SourceError (one line) where the files cannot be read."""
    assert cfg.path is not None
    wanted = [c for c in [cfg.key_column, *cfg.passthrough_columns] if c and c != RECORD_KEY_COLUMN]
    found = Sample()
    found.looked.total = len(files)
    try:
        for url, _ in files:
            found.looked.seen += 1
            for record, reason in iter_records(url, cfg.storage_options, found.looked):
                if record is None:
                    found.skipped.append(str(reason))
                else:
                    found.looked.count("records")
                    found.fields.update(column_name(k) for k in record)
                    if record.get(cfg.image_column) not in (None, "", []):
                        if found.first_image is None:
                            found.first_image = record[cfg.image_column]
                        if len(found.records) < PREFLIGHT_RECORDS:
                            found.records.append(record)
                if (len(found.records) >= PREFLIGHT_RECORDS and all(c in found.fields for c in wanted)) or found.looked.spent():
                    return found
    except Exception as e:  # noqa: BLE001
        raise SourceError(f"data.path: {describe_remote_error(cfg.path, e)}") from None
    found.everything = True
    return found


def column_types(cfg: DataConfig) -> dict[str, Optional[pa.DataType]]:
    """{column: Arrow type} of the fields the job reads (data.key_column, data.passthrough_columns),
    as the first records (_sample) hold them: text where they mix kinds (then every block holds
    nested values there as JSON text), None where they are all null. Fixed here, once, so that
    blocks of every file concatenate (_table): a field may hold a list in one record and text in
    another far away, and Ray Data cannot unite such blocks."""
    records = _sample(cfg, list_files(cfg)).records
    wanted = [c for c in dict.fromkeys([*([cfg.key_column] if cfg.key_column else []), *cfg.passthrough_columns]) if c != RECORD_KEY_COLUMN]
    rows = [{column_name(k): _text(v) for k, v in record.items()} for record in records]
    types: dict[str, Optional[pa.DataType]] = {}
    for column in wanted:
        values = [row[column] for row in rows if row.get(column) is not None]
        types[column] = _column(values).type if values else None
    return types


def read_json_records(cfg: DataConfig, listed: bool) -> ray.data.Dataset:
    """Rows and skip rows of every record (module docstring); `listed`: preflight's verdict."""
    assert cfg.path is not None
    files = list_files(DataConfig(**{**cfg.__dict__, "path": _absolute(cfg.path)}))
    table = pa.table({"url": [u for u, _ in files], "name": [n for _, n in files]})
    return ray.data.from_arrow([table.slice(i, 1) for i in range(table.num_rows)]).map_batches(
        read_files, batch_size=1, batch_format="pyarrow",
        fn_kwargs={"image_field": cfg.image_column, "image_root": _absolute(cfg.image_root), "listed": listed,
                   "storage_options": cfg.storage_options, "types": column_types(cfg)},
    )
