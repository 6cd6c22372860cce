"""Image cells, whatever the layout: what a cell holds, and the fetch of the ones that point elsewhere.

A cell of ``data.image_column`` is one of

* raw bytes (``binary``; a ``uint8`` array),
* an HF image struct ``{bytes, path}``; ``bytes`` null with a ``path`` is how ``datasets`` hands
  over files already on disk (its image-folder builder copies nothing): read from the path,
* text: a ``data:[<type>];base64,`` URI (RFC 2397) or bare base64 (the layout of VLM benchmark
  TSV/JSONL files) is decoded; anything else is a path or URL (``s3://``, ``https://``,
  ``hf://``...) and fetched,
* a list of images (``list<binary>``, ``list<struct>``): only with ``data.image_index`` or
  ``data.explode_images`` (see ``common.select_images``); alone it is the row's quarantine
  reason, never a crash.

Remote fetches (``Fetcher``) run concurrently per block (a thread pool of ``data.fetch.concurrency``),
with connect/read timeouts, a User-Agent, and bounded retries with exponential backoff for the
transient failures only: HTTP 408/425/429/5xx (RFC 9110 s.15.6; 501 and 505 are permanent),
timeouts and reset or refused connections. A 403 or 404 is final. What failed is the row's
quarantine reason: ``fetch: 503 Service Unavailable after 4 attempts: <url>``, ``fetch: timeout
(read > 30 s) after 4 attempts: <url>``.

Two rules of img2dataset's downloader (``img2dataset/downloader.py``), for the URL lists it reads:

* ``X-Robots-Tag`` (``data.fetch.respect_robots``, on by default): a response whose header names
  one of ``data.fetch.robots_directives`` (img2dataset's defaults: ``noai``, ``noimageai``,
  ``noindex``, ``noimageindex``) is not used. Each header value is ``[<user agent>:]
  <directive>[, <directive>...]``; a value without a user agent applies to every robot, one with
  a user agent only when it is ours (the product token of ``data.fetch.user_agent``,
  ``capjob``). The row is skipped, not quarantined: counted as ``robots: <directive>`` among the
  source's skipped items (``resolve_rows``), as img2dataset counts it and writes no sample.
* ``data.verify_hash_column``: the SHA-256 of each image's bytes (fetched or inline) must equal
  the row's hex digest there; a mismatch is quarantined ``hash_mismatch: expected <hex>, got
  <hex>``; a null digest is not checked.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import math
import os
import random
import re
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import numpy as np

from capjob import metrics
from capjob.config import DataConfig, FetchConfig
from capjob.schema import ImageRejected, block_digest
from capjob.stages.sources.common import SKIPPED_COUNTER
from capjob.stages.storage import options_for, protocol_of

# Shortest text taken for bare base64: a 1x1 PNG is 92 characters; a path is rarely this long
# without a '.' or a ':' (neither is in the base64 alphabet).
MIN_BASE64_CHARS = 64
_BASE64 = re.compile(r"^[A-Za-z0-9+/=_\-\s]+$")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
# Longest wait between two attempts, whatever the backoff or a server's Retry-After says.
MAX_BACKOFF_S = 8.0
_URL_CHARS = 300

Resolved = Union[bytes, str, ImageRejected]


class FetchSkipped(ImageRejected):
    """A fetched image its server asks not to use (X-Robots-Tag): the row is counted as skipped
    by the source (``resolve_rows``), never captioned nor quarantined."""


def decode_data_uri(text: str) -> bytes:
    """The bytes of a ``data:`` URI (RFC 2397: ``data:[<mediatype>][;base64],<data>``)."""
    header, sep, payload = text.partition(",")
    if not sep:
        raise ImageRejected("decode", "data: URI without a ',' before its data")
    if header.lower().endswith(";base64"):
        try:
            return base64.b64decode(_pad(re.sub(r"\s+", "", urllib.parse.unquote(payload))), validate=False)
        except (binascii.Error, ValueError) as e:
            raise ImageRejected("decode", f"data: URI with invalid base64 ({e})") from None
    return urllib.parse.unquote_to_bytes(payload)


def _pad(text: str) -> str:
    return text + "=" * (-len(text) % 4)


def _bare_base64(text: str) -> Optional[bytes]:
    if len(text) < MIN_BASE64_CHARS or not _BASE64.match(text):
        return None
    compact = re.sub(r"\s+", "", text)
    urlsafe = "-" in compact or "_" in compact
    try:
        data = (base64.urlsafe_b64decode if urlsafe else base64.b64decode)(_pad(compact))
    except (binascii.Error, ValueError):
        return None
    return data or None


def has_scheme(text: str) -> bool:
    """Whether `text` is a URL with a scheme (``s3://``, ``https://``, ``hf://``...)."""
    return bool(_SCHEME.match(text))


def resolve_text(text: str) -> Resolved:
    """A text cell: decoded bytes (data: URI, bare base64) or the location to fetch."""
    stripped = text.strip()
    if not stripped:
        return ImageRejected("empty", "empty text in the image column")
    if stripped[:5].lower() == "data:":
        try:
            return decode_data_uri(stripped)
        except ImageRejected as e:
            return e
    if _SCHEME.match(stripped):
        return stripped
    data = _bare_base64(stripped)
    if data is not None and not os.path.exists(stripped):
        return data
    return stripped


def _is_null(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or (
        isinstance(value, np.generic) and np.issubdtype(value.dtype, np.floating) and bool(np.isnan(value)))


def resolve_cell(cell: Any) -> Resolved:
    """bytes to decode, a location (path/URL) to fetch, or the reason the cell holds no image."""
    if _is_null(cell):
        return ImageRejected("empty", "no image (null cell)")
    if isinstance(cell, (bytes, bytearray, memoryview)):
        return bytes(cell)
    if isinstance(cell, np.ndarray) and cell.dtype == np.uint8:
        return cell.tobytes()
    if isinstance(cell, dict):
        data, path = cell.get("bytes"), cell.get("path")
        if data is not None:  # b"" is an empty file, not a missing one: quarantined as empty
            return bytes(data)
        if isinstance(path, str) and path:
            return resolve_text(path)
        return ImageRejected("empty", "no bytes and no path")
    if isinstance(cell, str):
        return resolve_text(cell)
    if isinstance(cell, (list, tuple)) or (isinstance(cell, np.ndarray) and cell.dtype == object):
        return ImageRejected("unsupported", f"a list of {len(cell)} images in the image column: "
                                            "set data.image_index=N or data.explode_images=true")
    return ImageRejected("unsupported", f"image cell of type {type(cell).__name__}")


def identity(cell: Any) -> tuple[Optional[bytes], Optional[str]]:
    """(bytes, location) that identify a cell for its content id: never raises."""
    resolved = resolve_cell(cell)
    if isinstance(resolved, bytes):
        return resolved, None
    if isinstance(resolved, str):
        return None, resolved
    if isinstance(cell, str):
        return None, cell
    return None, None


# --------------------------------------------------------------------------- fetching


class _Failure(Exception):
    def __init__(self, detail: str, transient: bool):
        super().__init__(detail)
        self.detail = detail
        self.transient = transient


def _transient_status(status: int) -> bool:
    return status in (408, 425, 429) or (500 <= status < 600 and status not in (501, 505))


_STATUS = re.compile(r"\b([45]\d\d)\b")


def _classify(error: BaseException) -> _Failure:
    """A fetch error of any fsspec filesystem (s3fs/botocore, gcsfs, aiohttp, local) as a
    one-line detail, transient or not."""
    import asyncio
    import socket

    name = type(error).__name__
    text = str(error).strip().splitlines()[0][:200] if str(error).strip() else name
    if isinstance(error, FileNotFoundError):
        return _Failure("not found", False)
    if isinstance(error, PermissionError):
        return _Failure(f"access denied ({text})", False)
    if isinstance(error, (TimeoutError, asyncio.TimeoutError, socket.timeout)) or "timeout" in name.lower():
        return _Failure("timeout", True)
    if isinstance(error, ConnectionError) or any(s in name for s in ("Connection", "EndpointConnection", "ServerDisconnected")):
        return _Failure(f"connection error ({name})", True)
    status = _STATUS.search(text)
    if status:
        code = int(status.group(1))
        return _Failure(f"{code} {text}", _transient_status(code))
    if any(s in text.lower() for s in ("slowdown", "throttl", "reset by peer", "service unavailable")):
        return _Failure(f"{name}: {text}", True)
    return _Failure(f"{name}: {text}", False)


_local = threading.local()


def _http_session(fetch: FetchConfig) -> Any:
    import requests

    session = getattr(_local, "session", None)
    if session is None:
        session = requests.Session()
        # Retries are ours (with the reason kept); the pool holds one connection per thread and host.
        adapter = requests.adapters.HTTPAdapter(pool_connections=16, pool_maxsize=max(16, fetch.concurrency), max_retries=0)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        _local.session = session
    session.max_redirects = fetch.max_redirects
    return session


def _http_get(url: str, fetch: FetchConfig, options: dict[str, Any]) -> tuple[bytes, float]:
    """The body of `url`; (bytes, seconds to wait before a retry or 0). Raises _Failure."""
    import requests

    headers = {"User-Agent": fetch.user_agent, **(options.get("headers") or {})}
    started = time.monotonic()
    try:
        with _http_session(fetch).get(url, headers=headers, stream=True,
                                      timeout=(fetch.connect_timeout_s, fetch.read_timeout_s)) as response:
            if response.status_code >= 400:
                failure = _Failure(f"{response.status_code} {response.reason or ''}".strip(), _transient_status(response.status_code))
                retry_after = response.headers.get("Retry-After", "")
                failure.retry_after = float(retry_after) if retry_after.isdigit() else 0.0  # type: ignore[attr-defined]
                raise failure
            if fetch.respect_robots:
                directive = disallowing_directive(response.raw.headers.getlist("X-Robots-Tag"), fetch)
                if directive:
                    raise FetchSkipped("robots", directive)
            chunks, size = [], 0
            # read1: whatever one socket read returns, so that a server dripping bytes cannot
            # hold the thread past the deadline (a full-chunk read would wait for 64 KiB).
            while chunk := response.raw.read1(1 << 16, decode_content=True):
                chunks.append(chunk)
                size += len(chunk)
                if size > fetch.max_bytes:
                    raise _Failure(f"larger than data.fetch.max_bytes={fetch.max_bytes}", False)
                if time.monotonic() - started > fetch.read_timeout_s:
                    raise _Failure(f"timeout (body not received in {fetch.read_timeout_s:g} s)", True)
            return b"".join(chunks), 0.0
    except _Failure:
        raise
    except requests.exceptions.ConnectTimeout:
        raise _Failure(f"timeout (connect > {fetch.connect_timeout_s:g} s)", True) from None
    except (requests.exceptions.ReadTimeout, requests.exceptions.Timeout):
        raise _Failure(f"timeout (read > {fetch.read_timeout_s:g} s)", True) from None
    except requests.exceptions.TooManyRedirects:
        raise _Failure(f"too many redirects (> {fetch.max_redirects})", False) from None
    except requests.exceptions.ChunkedEncodingError as e:
        raise _Failure(f"connection broken ({type(e).__name__})", True) from None
    except requests.exceptions.ConnectionError as e:
        root = e.args[0] if e.args else e
        reason = getattr(root, "reason", root)
        raise _Failure(f"connection error ({type(reason).__name__})", True) from None
    except requests.exceptions.RequestException as e:
        raise _Failure(f"{type(e).__name__}: {str(e)[:200]}", False) from None


def robots_token(user_agent: str) -> str:
    """The product token of a User-Agent (``capjob/0.1 (...)`` -> ``capjob``), lower case: the
    name an X-Robots-Tag value addresses robots by."""
    return re.split(r"[/\s(]", user_agent.strip(), maxsplit=1)[0].lower()


def disallowing_directive(values: list[str], fetch: FetchConfig) -> Optional[str]:
    """The first of `fetch.robots_directives` the X-Robots-Tag header values name for every robot
    or for ours, else None (img2dataset's ``is_disallowed``: ``[<user agent>:] <directive>, ...``)."""
    wanted = {d.strip().lower() for d in fetch.robots_directives}
    token = robots_token(fetch.user_agent)
    for value in values:
        agent, sep, rest = value.partition(":")
        if sep and agent.strip().lower() != token:
            continue
        for directive in (rest if sep else value).split(","):
            if directive.strip().lower() in wanted:
                return directive.strip().lower()
    return None


@dataclass(frozen=True)
class Fetcher:
    """Fetches image locations for the image stage (picklable: it travels into Ray tasks).

    `base` is data.path: object-store options apply to its protocol (storage.options_for)."""

    storage_options: dict[str, Any] = field(default_factory=dict)
    base: Optional[str] = None
    fetch: FetchConfig = field(default_factory=FetchConfig)
    # data.verify_hash_column: the column of expected SHA-256 digests (resolve_rows).
    hash_column: Optional[str] = None

    @classmethod
    def from_config(cls, data: DataConfig) -> "Fetcher":
        return cls(dict(data.storage_options or {}), data.path, data.fetch, data.verify_hash_column)

    def location(self, path: str) -> str:
        """A protocol-less object path of a remote data.path (as its listing gives) as a URL."""
        if _SCHEME.match(path) or self.base is None:
            return path
        base_protocol = protocol_of(self.base)
        if base_protocol in ("file", "local") or os.path.isabs(path) or os.path.exists(path):
            return path
        return f"{base_protocol}://{path}"

    def _once(self, url: str) -> bytes:
        protocol = protocol_of(url)
        options = options_for(url, self.storage_options, self.base)
        if protocol in ("http", "https"):
            return _http_get(url, self.fetch, options)[0]
        if protocol in ("file", "local"):
            path = url.split("://", 1)[1] if "://" in url else url
            try:
                with open(path, "rb") as f:
                    return f.read()
            except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
                raise _Failure("not found", False) from None
            except OSError as e:
                raise _classify(e) from None
        import fsspec

        try:
            fs, fs_path = fsspec.url_to_fs(url, **options)
            return fs.cat_file(fs_path)
        except Exception as e:  # noqa: BLE001 - every filesystem raises its own types
            raise _classify(e) from None

    def get(self, location: str) -> bytes:
        """The bytes at `location`, retrying transient failures. Raises ImageRejected("fetch", ...), or
        FetchSkipped("robots", ...) when the server's X-Robots-Tag forbids the use (never retried)."""
        url = self.location(location)
        attempts = 1 + max(0, self.fetch.retries)
        for attempt in range(attempts):
            try:
                return self._once(url)
            except _Failure as failure:
                if not failure.transient or attempt == attempts - 1:
                    tries = f" after {attempt + 1} attempts" if attempt else ""
                    raise ImageRejected("fetch", f"{failure.detail}{tries}: {url[:_URL_CHARS]}") from None
                wait = min(MAX_BACKOFF_S, self.fetch.backoff_s * 2**attempt * random.uniform(0.5, 1.5))
                time.sleep(max(wait, min(MAX_BACKOFF_S, getattr(failure, "retry_after", 0.0))))
        raise AssertionError("unreachable")

    def get_many(self, locations: list[str]) -> list[Union[bytes, ImageRejected]]:
        """Every location's bytes or rejection, in order; up to data.fetch.concurrency at a time
        (one slow host holds one thread, not the block)."""

        def one(location: str) -> Union[bytes, ImageRejected]:
            try:
                return self.get(location)
            except ImageRejected as e:
                return e

        if len(locations) <= 1 or self.fetch.concurrency <= 1:
            return [one(loc) for loc in locations]
        with ThreadPoolExecutor(max_workers=min(self.fetch.concurrency, len(locations))) as pool:
            return list(pool.map(one, locations))


def resolve_batch(cells: Any, fetcher: Fetcher) -> list[Union[bytes, ImageRejected]]:
    """Every cell of a block as bytes to decode or a rejection; remote cells fetched together."""
    resolved = [resolve_cell(c) for c in cells]
    pending = [i for i, r in enumerate(resolved) if isinstance(r, str)]
    for i, result in zip(pending, fetcher.get_many([resolved[i] for i in pending])):  # type: ignore[misc]
        resolved[i] = result
    return resolved  # type: ignore[return-value]


def expected_digest(cell: Any) -> Optional[str]:
    """A hash cell as lower-case hex: text (surrounding blanks ignored) or the 32 raw bytes of a
    digest; None for a null or empty cell (no check)."""
    if _is_null(cell):
        return None
    if isinstance(cell, (bytes, bytearray, memoryview)):
        raw = bytes(cell)
        return raw.hex() if len(raw) == hashlib.sha256().digest_size else raw.decode("ascii", "replace").strip().lower() or None
    return str(cell).strip().lower() or None


def verify_digest(data: bytes, expected: Optional[str]) -> Optional[ImageRejected]:
    """The rejection of bytes whose SHA-256 is not `expected` (hex), else None."""
    if expected is None:
        return None
    got = hashlib.sha256(data).hexdigest()
    return None if got == expected else ImageRejected("hash_mismatch", f"expected {expected}, got {got}")


def account_skipped(run_id: Optional[str], ids: list[str], reasons: list[str]) -> None:
    """Count rows skipped at the fetch in the run's ledger as the source's skipped items, per
    reason. The id stage counted them as read; the source's accounting (items seen = rows +
    skipped) counts them as skipped instead, so this block's entry also takes them out of
    ``read`` (under its own key: a retried block replaces it)."""
    if run_id is None or not reasons:
        return
    counts: dict[str, int] = {"read": -len(reasons)}
    for reason in reasons:
        counts[SKIPPED_COUNTER + reason] = counts.get(SKIPPED_COUNTER + reason, 0) + 1
    metrics.record_many(run_id, "fetch-" + block_digest(ids), counts)


def resolve_rows(batch: dict[str, Any], image_column: str, fetcher: Fetcher,
                 run_id: Optional[str]) -> list[Union[bytes, ImageRejected, None]]:
    """The image stage's view of a block (``batch`` with ``id``): each row's bytes to decode,
    its rejection (quarantined), or None for a row skipped at the fetch (X-Robots-Tag), which
    is counted in `run_id`'s ledger here. Bytes are checked against data.verify_hash_column."""
    resolved: list[Union[bytes, ImageRejected, None]] = list(resolve_batch(batch[image_column], fetcher))
    if fetcher.hash_column is not None:
        for i, (data, cell) in enumerate(zip(resolved, batch[fetcher.hash_column])):
            if isinstance(data, bytes):
                resolved[i] = verify_digest(data, expected_digest(cell)) or data
    skipped = [i for i, r in enumerate(resolved) if isinstance(r, FetchSkipped)]
    account_skipped(run_id, [str(i) for i in batch["id"]], [resolved[i].reason for i in skipped])  # type: ignore[union-attr]
    for i in skipped:
        resolved[i] = None
    return resolved
