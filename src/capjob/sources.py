"""Stage: read the configured dataset into a Ray Dataset, lazily.

Every layout ends as rows that carry the image in ``Source.image_column`` (raw bytes, an HF
``{bytes, path}`` struct, or a path/URL string), an optional key column and pass-through
columns. Problems a user can fix (missing path, bucket, credentials or column, an unreachable
endpoint) surface here as one SourceError line, before any inference starts.

Layouts (``data.format``):

* ``hf``           -- ``datasets.load_dataset`` (hub id or local folder of data files) or a
                      ``save_to_disk`` folder, ``data.split``, ``data.streaming``; read by Ray
                      tasks shard by shard (no copy of the dataset through the driver).
* ``parquet``      -- files or folders, local or any fsspec URL (``s3://...``).
* ``image_folder`` -- image files (jpg/png/webp/...), recursive, local or remote.
* ``webdataset``   -- tar shards (``ray.data.read_webdataset``), local or remote.

Remote storage: fsspec/s3fs with ``data.storage_options`` (e.g. ``{client_kwargs:
{endpoint_url: ...}}``); credentials come only from the environment or the standard AWS/fsspec
configuration (``AWS_ACCESS_KEY_ID``..., ``AWS_PROFILE``, ``~/.aws``), and
``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``) selects an S3-compatible store.
"""

from __future__ import annotations

import copy
import functools
import os
import re
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import fsspec
import fsspec.implementations.local
import pyarrow as pa
import pyarrow.fs as pafs
import ray.data
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from capjob.config import DataConfig, SourceFormat
from capjob.errors import ConfigError, SourceError

IMAGE_EXTENSIONS = ["jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff"]
# Webdataset members decoded to text (and ints for class indices); everything else stays bytes.
WEBDATASET_TEXT = {"txt", "text", "caption", "json", "jsonl", "url", "key", "id"}
WEBDATASET_INT = {"cls", "cls2", "index", "inx"}
# Rows per block read from a Hugging Face dataset (Ray splits blocks that grow larger).
HF_BATCH_ROWS = 256
# Shards a map-style dataset is cut into (Ray runs at most its read parallelism of them at once).
HF_MAX_SHARDS = 256
# Remote image folders: files per block of paths, and files fetched together by one task.
REMOTE_FILES_PER_BLOCK = 256
REMOTE_FETCH_BATCH = 64

# Options of the *probe* that checks a remote path before anything runs: fail in seconds when
# the endpoint does not answer instead of botocore's 60 s connect timeout x retries.
PROBE_S3_CONFIG = {"connect_timeout": 5, "read_timeout": 15, "retries": {"max_attempts": 2, "mode": "standard"}}
PROBE_S3_RETRIES = 1

# storage_options keys that would put a secret into the config (saved with every report).
_CREDENTIAL_KEY = re.compile(
    r"^(key|secret|token|password|passwd|credentials?|sas_token|account_key|client_secret)$"
    r"|secret|password|session_token|access_key|api[_-]?key|private[_-]?key",
    re.I,
)


@dataclass
class Source:
    dataset: ray.data.Dataset
    image_column: str
    key_column: Optional[str]
    passthrough_columns: list[str]
    # Known row count (after data.limit) when the layout gives it cheaply; None when streaming.
    num_rows: Optional[int]
    description: str


# --------------------------------------------------------------------------- storage


def check_storage_options(options: dict[str, Any], key: str) -> None:
    """Reject credentials in config: they belong in the environment / AWS config."""

    def walk(value: Any, prefix: str) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                name = f"{prefix}.{k}"
                if _CREDENTIAL_KEY.search(str(k)) and v not in (None, "", False):
                    raise ConfigError(
                        f"{name}: credentials are not accepted in the config (it is saved with every report); "
                        "use AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY(/AWS_SESSION_TOKEN), AWS_PROFILE or ~/.aws/credentials"
                    )
                walk(v, name)

    walk(options or {}, key)


def filesystem_for(path: str, storage_options: dict[str, Any]) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem and the protocol-less path for a local path or URL."""
    try:
        return fsspec.url_to_fs(path, **(storage_options or {}))
    except (ImportError, ValueError, TypeError) as e:
        raise SourceError(f"cannot open {path!r}: {e}") from None


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, fsspec.implementations.local.LocalFileSystem)


def _is_s3(fs: fsspec.AbstractFileSystem) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("s3", "s3a")


def probe_filesystem(path: str, storage_options: dict[str, Any]) -> tuple[fsspec.AbstractFileSystem, str]:
    """Like filesystem_for, but for one-off checks: its own instance, short timeouts, few retries
    (only for S3; other filesystems as configured)."""
    fs, fs_path = filesystem_for(path, storage_options)
    if not _is_s3(fs):
        return fs, fs_path
    options = copy.deepcopy(storage_options or {})
    config = options.setdefault("config_kwargs", {})
    for k, v in PROBE_S3_CONFIG.items():
        config.setdefault(k, v)
    options["skip_instance_cache"] = True
    options["use_listings_cache"] = False
    try:
        probe_fs = type(fs)(**options)
    except (ImportError, ValueError, TypeError) as e:
        raise SourceError(f"cannot open {path!r}: {e}") from None
    probe_fs.retries = PROBE_S3_RETRIES  # s3fs's own retry loop (a class attribute, 5 by default)
    return probe_fs, fs_path


def _first_line(error: BaseException, limit: int = 200) -> str:
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:limit]


def describe_remote_error(path: str, error: BaseException) -> str:
    """One line saying what is wrong with a remote location, for any s3fs/botocore/aiohttp error."""
    chain, e = [], error
    while e is not None and len(chain) < 5:  # the root cause often holds the useful name
        chain.append(e)
        e = e.__cause__ or e.__context__
    text = " | ".join(f"{type(c).__name__}: {c}" for c in chain)
    lowered = text.lower()
    detail = f"{type(error).__name__}: {_first_line(error)}"
    if "nosuchbucket" in lowered or "bucket does not exist" in lowered:
        return f"the bucket of {path!r} does not exist"
    # Not reaching the endpoint comes first: its message holds the URL, and a port may contain 403.
    if any(s in lowered for s in ("could not connect", "connect timeout", "connecttimeout", "endpointconnectionerror",
                                  "connection refused", "name or service not known", "temporary failure in name resolution",
                                  "unreachable", "timed out", "timeout", "cannot connect")):
        return f"cannot reach the storage endpoint for {path!r} ({detail})"
    if any(s in lowered for s in ("invalidaccesskeyid", "signaturedoesnotmatch", "invalidtoken", "expiredtoken",
                                  "accessdenied", "access denied", "forbidden", "permissionerror")) or re.search(r"\b403\b", lowered):
        return (f"access to {path!r} denied: check the credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                f"AWS_PROFILE or ~/.aws) ({detail})")
    if any(s in lowered for s in ("nocredentialserror", "unable to locate credentials", "partialcredentials")):
        return (f"no credentials for {path!r}: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE "
                f"(or storage_options.anon=true for a public bucket)")
    return f"cannot read {path!r}: {detail}"


def probe(path: str, storage_options: dict[str, Any], key: str = "data.path") -> str:
    """Fail fast, with one line, when `path` cannot be read: missing path or bucket, denied,
    unreachable endpoint. Returns "file" or "directory"."""
    fs, fs_path = probe_filesystem(path, storage_options)
    if is_local(fs):
        if not os.path.exists(fs_path):
            raise SourceError(f"{key} {path!r} does not exist")
        return "directory" if os.path.isdir(fs_path) else "file"
    try:
        try:
            return "directory" if fs.info(fs_path).get("type") == "directory" else "file"
        except FileNotFoundError:
            pass
        if _is_s3(fs):
            bucket = fs_path.split("/", 1)[0]
            try:
                fs.ls(bucket)  # raises FileNotFoundError for a missing bucket
            except FileNotFoundError:
                raise SourceError(f"{key}: the bucket {bucket!r} of {path!r} does not exist") from None
    except SourceError:
        raise
    except Exception as e:  # noqa: BLE001 - s3fs/botocore/aiohttp raise a zoo of types
        raise SourceError(f"{key}: {describe_remote_error(path, e)}") from None
    raise SourceError(f"{key} {path!r} does not exist")


def check_exists(path: str, storage_options: dict[str, Any]) -> tuple[fsspec.AbstractFileSystem, str]:
    probe(path, storage_options)
    return filesystem_for(path, storage_options)


def _arrow_filesystem(path: str, storage_options: dict[str, Any]) -> Optional[pafs.FileSystem]:
    """Local paths use Ray's own filesystem resolution; remote ones the configured fsspec fs
    (pickled into Ray's read tasks, which resolve credentials from their own environment)."""
    fs, _ = filesystem_for(path, storage_options)
    if is_local(fs):
        return None
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def _require_columns(available: list[str], cfg: DataConfig, image_column: str) -> None:
    wanted = [("data.image_column", image_column)]
    if cfg.key_column:
        wanted.append(("data.key_column", cfg.key_column))
    wanted += [("data.passthrough_columns", c) for c in cfg.passthrough_columns]
    for key, column in wanted:
        if column not in available:
            raise SourceError(f"{key}: column {column!r} not in the dataset; available columns: {sorted(available)}")


# --------------------------------------------------------------------------- Hugging Face


def _read_hf_shard(shard: Any, limit: Optional[int]) -> Iterator[pa.Table]:
    if limit is not None:
        shard = shard.take(limit)
    # Arrow format: image features stay {bytes, path} structs (no PIL decoding here).
    for batch in shard.with_format("arrow").iter(batch_size=HF_BATCH_ROWS):
        if batch.num_rows:
            yield batch


class HuggingFaceShards(Datasource):
    """A `datasets.IterableDataset` read by parallel Ray tasks, one group of its shards each.

    Unlike ``ray.data.from_huggingface`` this never asks the hub for a parquet export (which
    would ignore column selection and can be a partial copy of the dataset) and never copies
    a map-style dataset through the driver into the object store."""

    def __init__(self, dataset: Any, limit: Optional[int]):
        self._dataset = dataset
        self._limit = limit

    def estimate_inmemory_data_size(self) -> Optional[int]:
        return None

    def get_name(self) -> str:
        return "HuggingFace"

    def get_read_tasks(self, parallelism: int, per_task_row_limit: Optional[int] = None, data_context: Any = None) -> list[ReadTask]:
        shards = max(1, int(self._dataset.num_shards or 1))
        tasks = max(1, min(shards, parallelism if parallelism and parallelism > 0 else shards))
        out = []
        for i in range(tasks):
            shard = self._dataset.shard(num_shards=tasks, index=i) if tasks > 1 else self._dataset
            meta = BlockMetadata(num_rows=None, size_bytes=None, input_files=None, exec_stats=None)
            out.append(ReadTask(functools.partial(_read_hf_shard, shard, self._limit), meta, per_task_row_limit=per_task_row_limit))
        return out


def _hf_columns(hf: Any) -> list[str]:
    names = hf.column_names or (list(hf.features) if hf.features else None)
    if names is None:  # a streaming dataset without declared features: look at one row
        names = list(next(iter(hf.take(1)), {}).keys())
    return list(names)


def _hf_kind(path: str) -> str:
    """"saved" (save_to_disk folder), "local" (folder of data files) or "hub" (a repository id)."""
    if os.path.exists(path):
        if os.path.exists(os.path.join(path, "state.json")) or os.path.exists(os.path.join(path, "dataset_dict.json")):
            return "saved"
        return "local"
    if path.startswith(("/", "./", "../", "~")) or path.count("/") > 1 or "://" in path:
        raise SourceError(f"data.path {path!r} does not exist (for data.format=hf: a local folder or a hub id)")
    return "hub"


def _load_hf(cfg: DataConfig, streaming: bool) -> Any:
    """The split as a datasets.Dataset (or IterableDataset when streaming)."""
    import datasets

    path = cfg.path
    assert path is not None
    try:
        if _hf_kind(path) == "saved":
            loaded = datasets.load_from_disk(path)
            if isinstance(loaded, datasets.DatasetDict):
                if cfg.split not in loaded:
                    raise SourceError(f"data.split: {cfg.split!r} not in {path!r}; available splits: {sorted(loaded)}")
                loaded = loaded[cfg.split]
            return loaded
        return datasets.load_dataset(path, split=cfg.split, streaming=streaming)
    except SourceError:
        raise
    except FileNotFoundError as e:
        raise SourceError(f"data.path {path!r}: no such local dataset or hub repository ({_first_line(e)})") from None
    except ValueError as e:
        message = _first_line(e, 300)
        if "split" in message.lower():
            raise SourceError(f"data.split: {cfg.split!r}: {message}") from None
        raise SourceError(f"data.path {path!r}: {message}") from None
    except Exception as e:  # noqa: BLE001 - hub/network errors
        raise SourceError(
            f"cannot load Hugging Face dataset {path!r} (split {cfg.split!r}): {type(e).__name__}: {_first_line(e, 300)}"
        ) from None


def _read_hf(cfg: DataConfig) -> tuple[ray.data.Dataset, Optional[int], list[str]]:
    import datasets

    hf = _load_hf(cfg, cfg.streaming)
    columns = _hf_columns(hf)
    _require_columns(columns, cfg, cfg.image_column)
    wanted = [cfg.image_column] + ([cfg.key_column] if cfg.key_column else []) + list(cfg.passthrough_columns)
    hf = hf.select_columns(list(dict.fromkeys(wanted)))
    if isinstance(hf, datasets.Dataset):
        # Map-style (save_to_disk, or a hub/local dataset prepared into the HF cache): memory-
        # mapped arrow files, read by the tasks themselves, a few hundred rows per shard.
        num_rows: Optional[int] = len(hf)
        if cfg.limit is not None and cfg.shuffle_seed is None:
            hf = hf.select(range(min(cfg.limit, len(hf))))
            num_rows = len(hf)
        shards = max(1, min(HF_MAX_SHARDS, -(-len(hf) // HF_BATCH_ROWS)))
        ds = ray.data.read_datasource(HuggingFaceShards(hf.to_iterable_dataset(num_shards=shards), None))
        return ds, num_rows, columns
    # Streaming (hub or local data files): no row count; cap every shard at `limit` rows so
    # no more than needed is ever fetched, read.limit() then cuts the total.
    limit = cfg.limit if cfg.shuffle_seed is None else None
    return ray.data.read_datasource(HuggingFaceShards(hf, limit)), None, columns


# --------------------------------------------------------------------------- files


def _hidden(name: str) -> bool:
    return name.rstrip("/").rsplit("/", 1)[-1][:1] in "._"


def first_file(path: str, storage_options: dict[str, Any], extensions: list[str], max_depth: int = 8) -> Optional[str]:
    """The first (sorted) file under `path` with one of `extensions`, descending into the first
    folders only as far as needed -- a cheap peek, not a listing of the whole dataset."""
    fs, root = probe_filesystem(path, storage_options)
    suffixes = tuple("." + e.lower() for e in extensions)

    def walk(directory: str, depth: int) -> Optional[str]:
        entries = sorted(fs.ls(directory, detail=True), key=lambda e: e["name"])
        for e in entries:
            if e["type"] == "file" and not _hidden(e["name"]) and e["name"].lower().endswith(suffixes):
                return e["name"]
        if depth < max_depth:
            for e in entries:
                if e["type"] == "directory" and not _hidden(e["name"]) and e["name"].rstrip("/") != directory.rstrip("/"):
                    found = walk(e["name"], depth + 1)
                    if found:
                        return found
        return None

    try:
        found = walk(root, 0)
    except Exception as e:  # noqa: BLE001
        raise SourceError(f"data.path: {describe_remote_error(path, e)}") from None
    if found is None:
        return None
    return found if is_local(fs) else f"{path.split('://', 1)[0]}://{found}"


def _inspect_file(path: str, storage_options: dict[str, Any], kind: str, extensions: list[str], what: str) -> str:
    if kind == "file":
        return path
    found = first_file(path, storage_options, extensions)
    if found is None:
        raise SourceError(f"data.path: no {what} files ({', '.join('*.' + e for e in extensions)}) under {path!r}")
    return found


def _open(url: str, storage_options: dict[str, Any]):
    fs, fs_path = probe_filesystem(url, storage_options)
    return fs.open(fs_path, "rb")


def _parquet_columns(path: str, storage_options: dict[str, Any], kind: str) -> list[str]:
    import pyarrow.parquet as pq

    first = _inspect_file(path, storage_options, kind, ["parquet"], "parquet")
    try:
        with _open(first, storage_options) as f:
            return list(pq.read_schema(f).names)
    except Exception as e:  # noqa: BLE001
        raise SourceError(f"data.path: {describe_remote_error(first, e)}") from None


def _webdataset_columns(cfg: DataConfig, kind: str) -> list[str]:
    """The columns of the first sample of the first shard (read up to its last member)."""
    import tarfile

    assert cfg.path is not None
    first = _inspect_file(cfg.path, cfg.storage_options, kind, ["tar"], "tar")
    sample: dict[str, Any] = {}
    key = None
    try:
        with _open(first, cfg.storage_options) as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for member in tar:
                if not member.isreg():
                    continue
                directory, _, base = member.name.rpartition("/")
                if "." not in base:
                    continue
                stem, suffix = base.split(".", 1)
                if key is not None and f"{directory}/{stem}" != key:
                    break
                key = f"{directory}/{stem}"
                sample[suffix] = b""  # names only: contents are not needed
    except Exception as e:  # noqa: BLE001
        raise SourceError(f"data.path: {describe_remote_error(first, e)}") from None
    if not sample:
        raise SourceError(f"data.path: {first!r} holds no webdataset sample (files named <key>.<ext>)")
    return ["__key__", "__url__", *decode_webdataset_sample(sample, cfg.image_column)]


def _columns_without_ray(cfg: DataConfig) -> tuple[str, list[str]]:
    """(kind, columns) of a file-based layout, checked and peeked without Ray."""
    assert cfg.path is not None
    kind = probe(cfg.path, cfg.storage_options)
    if cfg.format == SourceFormat.parquet:
        return kind, _parquet_columns(cfg.path, cfg.storage_options, kind)
    if cfg.format == SourceFormat.webdataset:
        return kind, _webdataset_columns(cfg, kind)
    _inspect_file(cfg.path, cfg.storage_options, kind, IMAGE_EXTENSIONS, "image")
    return kind, ["bytes", "path"]


def _read_parquet(cfg: DataConfig) -> tuple[ray.data.Dataset, Optional[int], list[str]]:
    assert cfg.path is not None
    kind, columns = _columns_without_ray(cfg)
    fs = _arrow_filesystem(cfg.path, cfg.storage_options)
    try:
        # In folders only *.parquet files (not _SUCCESS, .crc...); a named file whatever its name.
        extensions = ["parquet"] if kind == "directory" else None
        ds = ray.data.read_parquet(cfg.path, filesystem=fs, file_extensions=extensions)
    except Exception as e:  # noqa: BLE001
        raise SourceError(f"data.path: {describe_remote_error(cfg.path, e)}") from None
    return ds, None, columns


def fetch_image_batch(batch: pa.Table, protocol: str, storage_options: dict[str, Any]) -> pa.Table:
    """map_batches UDF: the bytes of a batch of remote image files, fetched concurrently (s3fs
    issues the GETs together); a file that cannot be fetched gets null bytes (quarantined)."""
    fs = fsspec.filesystem(protocol, **(storage_options or {}))
    paths = batch.column("path").to_pylist()
    fetched = fs.cat(paths, on_error="return") if paths else {}
    data = [fetched.get(p) if isinstance(fetched.get(p), bytes) else None for p in paths]
    return pa.table({"bytes": pa.array(data, pa.binary()), "path": pa.array(paths, pa.string())})


def _read_image_folder(cfg: DataConfig) -> tuple[ray.data.Dataset, Optional[int], list[str]]:
    assert cfg.path is not None
    _, columns = _columns_without_ray(cfg)
    fs, root = filesystem_for(cfg.path, cfg.storage_options)
    if is_local(fs):
        try:
            ds = ray.data.read_binary_files(cfg.path, include_paths=True, file_extensions=IMAGE_EXTENSIONS)
        except Exception as e:  # noqa: BLE001
            raise SourceError(f"data.path: {describe_remote_error(cfg.path, e)}") from None
        return ds, None, columns
    # Object stores: one request per file is latency-bound when files are read one after the
    # other (as read_binary_files does, ~50 files/s per task); list once, then fetch each batch
    # of files with concurrent GETs. The listing also gives the row count.
    suffixes = tuple("." + e for e in IMAGE_EXTENSIONS)
    try:
        listed = fs.find(root, detail=False)
    except Exception as e:  # noqa: BLE001
        raise SourceError(f"data.path: {describe_remote_error(cfg.path, e)}") from None
    prefix = root.rstrip("/") + "/"
    files = sorted(
        p for p in listed
        if p.lower().endswith(suffixes) and not any(_hidden(part) for part in p[len(prefix):].split("/"))
    )
    if not files:
        raise SourceError(f"data.path: no image files ({', '.join('*.' + e for e in IMAGE_EXTENSIONS)}) under {cfg.path!r}")
    chunks = [pa.table({"path": files[i : i + REMOTE_FILES_PER_BLOCK]}) for i in range(0, len(files), REMOTE_FILES_PER_BLOCK)]
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    ds = ray.data.from_arrow(chunks).map_batches(
        fetch_image_batch, fn_kwargs={"protocol": protocol, "storage_options": cfg.storage_options},
        batch_size=REMOTE_FETCH_BATCH, batch_format="pyarrow",
    )
    return ds, len(files), columns


def decode_webdataset_sample(sample: dict[str, Any], image_column: str) -> dict[str, Any]:
    """read_webdataset decoder: images stay bytes (decoded once, in images.py) and land in
    `image_column` (the member with that extension, else the sample's first image member);
    text members become str, class indices int."""
    out: dict[str, Any] = {}
    first_image = None
    for name, value in sample.items():
        ext = name.rsplit(".", 1)[-1].lower()
        if name.startswith("__"):
            out[name] = value
        elif ext in IMAGE_EXTENSIONS:
            if first_image is None:
                first_image = value
        elif isinstance(value, (bytes, bytearray)) and (ext in WEBDATASET_TEXT or ext in WEBDATASET_INT):
            text = bytes(value).decode("utf-8", "replace").strip()
            if ext in WEBDATASET_INT:
                try:
                    out[name] = int(text)
                    continue
                except ValueError:
                    pass
            out[name] = text
        else:
            out[name] = value
    image = sample.get(image_column)
    out[image_column] = bytes(image) if isinstance(image, (bytes, bytearray)) else first_image
    return out


def _read_webdataset(cfg: DataConfig) -> tuple[ray.data.Dataset, Optional[int], list[str]]:
    assert cfg.path is not None
    _, columns = _columns_without_ray(cfg)
    fs = _arrow_filesystem(cfg.path, cfg.storage_options)
    try:
        ds = ray.data.read_webdataset(
            cfg.path, filesystem=fs, file_extensions=["tar"],
            decoder=functools.partial(decode_webdataset_sample, image_column=cfg.image_column),
        )
    except Exception as e:  # noqa: BLE001
        raise SourceError(f"data.path: {describe_remote_error(cfg.path, e)}") from None
    return ds, None, columns


# --------------------------------------------------------------------------- entry points


def _resolved_columns(cfg: DataConfig) -> tuple[str, Optional[str]]:
    """(image column, key column) as the layout defines them."""
    if cfg.format == SourceFormat.image_folder:
        return "bytes", cfg.key_column or "path"  # an image file is its own key: its path
    if cfg.format == SourceFormat.webdataset:
        return cfg.image_column, cfg.key_column or "__key__"
    return cfg.image_column, cfg.key_column


def _check_columns(cfg: DataConfig, columns: list[str]) -> None:
    image_column, key_column = _resolved_columns(cfg)
    _require_columns(columns, DataConfig(**{**cfg.__dict__, "key_column": key_column}), image_column)


def preflight(cfg: DataConfig) -> None:
    """Everything about the input a user can get wrong, checked without Ray and without reading
    the data: credentials kept out of the config, the path (or bucket, endpoint, access), the
    columns (from a parquet footer, the first webdataset sample, a local HF dataset's features).
    Seconds, so that the job can fail before it starts Ray or any engine. (A hub dataset is
    checked by read_source, when it is opened.)"""
    check_storage_options(cfg.storage_options, "data.storage_options")
    if cfg.format == SourceFormat.sample:
        return
    if not cfg.path:
        raise SourceError(f"data.path: is required for data.format={cfg.format.value}")
    if cfg.format == SourceFormat.hf:
        if _hf_kind(cfg.path) != "hub":  # local: metadata only (memory-mapped / schema-inferred)
            _require_columns(_hf_columns(_load_hf(cfg, streaming=_hf_kind(cfg.path) == "local")), cfg, cfg.image_column)
        return
    _check_columns(cfg, _columns_without_ray(cfg)[1])


def read_source(cfg: DataConfig) -> Source:
    """The configured dataset, limited, with its image/key columns resolved and checked."""
    check_storage_options(cfg.storage_options, "data.storage_options")
    image_column, key_column = _resolved_columns(cfg)
    if cfg.format == SourceFormat.sample:
        from capjob.sample_data import ensure_sample_dataset

        path = ensure_sample_dataset(cfg.sample_size, cfg.sample_shapes)
        ds, num_rows, columns = _read_parquet(DataConfig(path=path, format=SourceFormat.parquet))
        description = f"capjob sample ({path})"
    elif cfg.format == SourceFormat.hf:
        ds, num_rows, columns = _read_hf(cfg)
        description = f"Hugging Face dataset {cfg.path} [{cfg.split}]{' streaming' if cfg.streaming else ''}"
    elif cfg.format == SourceFormat.parquet:
        ds, num_rows, columns = _read_parquet(cfg)
        description = f"parquet {cfg.path}"
    elif cfg.format == SourceFormat.image_folder:
        ds, num_rows, columns = _read_image_folder(cfg)
        description = f"image folder {cfg.path}"
    elif cfg.format == SourceFormat.webdataset:
        ds, num_rows, columns = _read_webdataset(cfg)
        description = f"webdataset {cfg.path}"
    else:  # pragma: no cover - the enum is exhaustive
        raise SourceError(f"data.format: unknown {cfg.format}")

    _check_columns(cfg, columns)
    if cfg.shuffle_seed is not None:
        ds = ds.random_shuffle(seed=cfg.shuffle_seed)
    if cfg.limit is not None:
        ds = ds.limit(cfg.limit)
        # Unknown size: the limit is the plan's upper bound.
        num_rows = min(num_rows, cfg.limit) if num_rows is not None else cfg.limit
    return Source(
        dataset=ds,
        image_column=image_column,
        key_column=key_column,
        passthrough_columns=list(cfg.passthrough_columns),
        num_rows=num_rows,
        description=description,
    )
