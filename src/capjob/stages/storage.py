"""Storage shared by every layout: fsspec filesystems, per-protocol options, the one-line
errors of an unreadable location, and the fast probe that finds them before Ray starts.

``data.storage_options`` holds fsspec options. Flat keys (``client_kwargs``, ``anon``...) are
the options of the object store the data lives in: ``data.path``'s protocol, or, when data.path
is not on an object store, object-store URLs (``s3://``, ``gs://``...) in the cells. They never
reach ``http(s)://``, ``hf://`` or local cells -- an
S3 ``client_kwargs.endpoint_url`` handed to aiohttp fails every fetch. A key named after a
protocol (``http: {headers: {...}}``, ``s3: {...}``) holds that protocol's own options and
applies to it alone.
"""

from __future__ import annotations

import copy
import hashlib
import os
import re
from typing import Any, Iterator, Optional

import fsspec
import fsspec.core
import fsspec.implementations.local
import pyarrow.fs as pafs

from capjob.errors import ConfigError, SourceError, describe

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
# Object stores: the protocols that take the flat options when data.path is not on one.
OBJECT_STORES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss", "r2"})


def protocol_of(url: str) -> str:
    """fsspec's protocol of a path or URL ("file" for a plain path)."""
    protocol, _ = fsspec.core.split_protocol(url)
    return (protocol or "file").lower()


def _protocol_sections(storage_options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    known = set(fsspec.available_protocols()) | {"file", "http", "https"}
    flat, sections = {}, {}
    for k, v in (storage_options or {}).items():
        if str(k).lower() in known and isinstance(v, dict):
            sections[str(k).lower()] = v
        else:
            flat[k] = v
    return flat, sections


def options_for(url: str, storage_options: dict[str, Any], base: Optional[str] = None) -> dict[str, Any]:
    """The fsspec options for `url`: its own protocol section, plus the flat options when they
    are meant for it (`url` is on `base`'s protocol -- data.path's --, or on an object store)."""
    flat, sections = _protocol_sections(storage_options)
    protocol = protocol_of(url)
    base_protocol = protocol_of(base) if base is not None else None
    if base_protocol == protocol or (base_protocol not in OBJECT_STORES and protocol in OBJECT_STORES):
        options = dict(flat)
    else:
        options = {}
    own = sections.get(protocol) or (sections.get("http") if protocol == "https" else None) or {}
    return {**options, **own}


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
        return fsspec.url_to_fs(path, **options_for(path, storage_options, base=path))
    except (ImportError, ValueError, TypeError) as e:
        raise SourceError(f"cannot open {path!r}: {e}") from None


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, fsspec.implementations.local.LocalFileSystem)


def listing_digest(path: str, storage_options: dict[str, Any]) -> Optional[str]:
    """A digest of what `path` holds as its listing tells it, without reading a file: every
    file's name, size and version (the ETag an object store gives, else the modification time).
    Two equal digests mean no file was added, removed, resized or rewritten in between (a
    rewrite keeping size and mtime, e.g. `touch -d`, is not seen). None when the listing fails
    or gives no size for a file. Costs one listing: what a run's own driver pays for an image
    folder or a webdataset."""
    try:
        fs, root = filesystem_for(path, storage_options)
        fs.invalidate_cache()
        listed = fs.find(root, detail=True) if fs.isdir(root) else {root: fs.info(root)}
    except Exception:  # noqa: BLE001 - no digest: the caller takes the slow, certain path
        return None
    digest = hashlib.sha256()
    for name in sorted(listed):
        info = listed[name]
        version = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified") or info.get("last_modified")
        if info.get("size") is None or version is None:
            return None
        digest.update(f"{name}\0{info['size']}\0{version}\n".encode())
    return digest.hexdigest()[:32]


def is_s3(fs: fsspec.AbstractFileSystem) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("s3", "s3a")


def probe_filesystem(path: str, storage_options: dict[str, Any]) -> tuple[fsspec.AbstractFileSystem, str]:
    """Like filesystem_for, but for one-off checks: its own instance, short timeouts, few retries
    (only for S3; other filesystems as configured)."""
    fs, fs_path = filesystem_for(path, storage_options)
    if not is_s3(fs):
        return fs, fs_path
    options = copy.deepcopy(options_for(path, storage_options, base=path))
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


def describe_remote_error(path: str, error: BaseException) -> str:
    """One line saying what is wrong with a remote location, for any s3fs/botocore/aiohttp error."""
    chain, e = [], error
    while e is not None and len(chain) < 5:  # the root cause often holds the useful name
        chain.append(e)
        e = e.__cause__ or e.__context__
    text = " | ".join(f"{type(c).__name__}: {c}" for c in chain)
    lowered = text.lower()
    detail = describe(error, 200)
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
        if is_s3(fs):
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


def arrow_filesystem(path: str, storage_options: dict[str, Any]) -> Optional[pafs.FileSystem]:
    """Local paths use Ray's own filesystem resolution; remote ones the configured fsspec fs
    (pickled into Ray's read tasks, which resolve credentials from their own environment)."""
    fs, _ = filesystem_for(path, storage_options)
    if is_local(fs):
        return None
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def hidden(name: str) -> bool:
    return name.rstrip("/").rsplit("/", 1)[-1][:1] in "._"


def iter_files(path: str, storage_options: dict[str, Any], extensions: Optional[list[str]],
               max_depth: int = 8) -> Iterator[str]:
    """The visible files under `path` with one of `extensions` (None: any), lazily, in sorted
    order: a folder's files before its sub-folders. Each folder is listed only once the walk
    reaches it, so that a caller who stops after a few files pays a few listings, not a listing
    of the whole dataset. Remote files come back as URLs (with their protocol). SourceError
    (one line) when a listing fails."""
    fs, root = probe_filesystem(path, storage_options)
    suffixes = tuple("." + e.lower() for e in extensions) if extensions else ("",)
    protocol = "" if is_local(fs) else f"{path.split('://', 1)[0]}://"

    def walk(directory: str, depth: int) -> Iterator[str]:
        try:
            entries = sorted(fs.ls(directory, detail=True), key=lambda e: e["name"])
        except Exception as e:  # noqa: BLE001
            raise SourceError(f"data.path: {describe_remote_error(path, e)}") from None
        for e in entries:
            if e["type"] == "file" and not hidden(e["name"]) and e["name"].lower().endswith(suffixes):
                yield protocol + e["name"]
        if depth < max_depth:
            for e in entries:
                if e["type"] == "directory" and not hidden(e["name"]) and e["name"].rstrip("/") != directory.rstrip("/"):
                    yield from walk(e["name"], depth + 1)

    return walk(root, 0)


def first_file(path: str, storage_options: dict[str, Any], extensions: Optional[list[str]], max_depth: int = 8) -> Optional[str]:
    """The first (sorted) file under `path` with one of `extensions` (None: any visible file),
    descending into the first folders only as far as needed -- a cheap peek, not a listing of
    the whole dataset."""
    return next(iter_files(path, storage_options, extensions, max_depth), None)


def inspect_file(path: str, storage_options: dict[str, Any], kind: str, extensions: list[str], what: str) -> str:
    if kind == "file":
        return path
    found = first_file(path, storage_options, extensions)
    if found is None:
        raise SourceError(f"data.path: no {what} files ({', '.join('*.' + e for e in extensions)}) under {path!r}")
    return found


def open_file(url: str, storage_options: dict[str, Any]):
    fs, fs_path = probe_filesystem(url, storage_options)
    return fs.open(fs_path, "rb")
