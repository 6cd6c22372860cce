"""Stage: give every input row its id, skip the ids a previous run finished, and name each
image for vLLM by its content.

Row id (the ``id`` column, what resume and the report count by), scheme ``ID_SCHEME``:

* a row with a key (``data.key_column``, a webdataset's shard + ``__key__``, an image file's
  path): ``<key>#<12 hex of sha1(image bytes)>``. Two different images under one key (a key
  column with duplicates, byte-different files that reuse a name) get two ids, by
  construction, without any global state, and the same two ids on every run whatever order
  the blocks arrive in: resume can never mistake one for the other. ``source_key`` keeps
  the bare key for joins.
* a row without a key: ``sha1:<hex of the image bytes>``.
* a path/URL cell (bytes fetched later): the same, with the digest of the path, which names
  the content.

Exact duplicates -- the same key (or none) and the same bytes -- are the same item listed
twice. Within a block the 2nd, 3rd... occurrence get ``#2``, ``#3`` (by position in the
block, so deterministic); across blocks nothing is shared between the id tasks, so both
copies keep one id (nothing is lost), and the run report lists every key that reached more
than one id and every id written more than once (``duplicates``: counts and examples). Which
copies reach the engine is the dedup stage's decision (stages/dedup: by pixels, whatever the
ids): one copy is captioned, the others reuse its caption.

The image's name for vLLM (``multi_modal_uuids``, the key of vLLM's multimodal feature cache,
which vLLM requires to be unique per image) is ``image_uuid``: a digest of the decoded,
resized pixels the engine actually receives, never the row id.

Shards (``data.shard=k/n``, one of n runs into one sink, e.g. a Slurm array task): after the
ids are assigned, a run keeps the rows whose id's 64-bit hash (``hash_ids``) is k modulo n. Every
run derives the same ids and the same hashes without talking to the others, so the n shards are
disjoint, their union is the whole source, and a row's id is the one an unsharded run gives it.
The rows of other shards are counted as the source's skipped items, reason
``other shard (data.shard=k/n)``, so that items seen = rows + skipped holds in each run's report.

Done ids travel to the tasks as a ``DoneIds`` array (sorted 64-bit hashes of the ids, 8 bytes
an id), placed once in Ray's object store: every task maps the same shared-memory copy
(zero-copy numpy), instead of unpickling a Python set of strings per task (about 100 bytes
an id). docs/benchmarks.md, "Resume at scale", has the numbers.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import pyarrow as pa

from capjob import metrics
from capjob.schema import block_digest
from capjob.stages.sources.cells import identity
from capjob.stages.sources.common import SKIPPED_COUNTER

# Bumped whenever the way ids are derived changes: a sink written under another scheme holds
# ids this run would never match, so the resume fingerprint includes it.
ID_SCHEME = 2
# Hex digits of the content digest appended to a key: 48 bits, so two different images under
# one key collide with probability 2^-48.
KEY_DIGEST_HEX = 12
# Examples of duplicate keys/ids kept for the report.
DUPLICATE_EXAMPLES = 5


def content_digest(data: Optional[bytes]) -> str:
    return hashlib.sha1(data or b"").hexdigest()


def row_id(key: Any, data: Optional[bytes], path: Optional[str] = None) -> str:
    """The id of one row (module docstring): ``key#digest`` or ``sha1:digest`` of the image bytes,
    or, for a cell that is only a path/URL (fetched later), of the path."""
    if isinstance(key, bytes):
        key = key.decode()
    content = data if data is not None else (path or "").encode()
    if key is not None and str(key) != "":
        return f"{key}#{content_digest(content)[:KEY_DIGEST_HEX]}"
    return content_id(content)


def content_id(data: Optional[bytes]) -> str:
    return "sha1:" + content_digest(data)


def number_repeats(ids: Sequence[str]) -> list[str]:
    """Exact duplicates inside one block: the n-th occurrence (n >= 2) of an id gets ``#n``."""
    seen: Counter[str] = Counter()
    out = []
    for rid in ids:
        seen[rid] += 1
        out.append(rid if seen[rid] == 1 else f"{rid}#{seen[rid]}")
    return out


def pixel_digest(pixels: np.ndarray) -> str:
    """32 hex digits of BLAKE2b-128 over the shape and the RGB pixels the engine gets: the
    image's ``image_digest`` (the key of exact dedup, stages/dedup) and its vLLM name. 128 bits:
    among n distinct images two share a digest with probability about n^2 / 2^129 (3e-16 for a
    billion images); BLAKE2b has no known collision attack."""
    h = hashlib.blake2b(digest_size=16)
    h.update(repr(pixels.shape).encode())
    h.update(np.ascontiguousarray(pixels).data)
    return h.hexdigest()


def image_uuid(pixels: np.ndarray, digest: Optional[str] = None) -> str:
    """vLLM's name for an image (``multi_modal_uuids``): its pixel_digest (``digest``, when the
    dedup stage computed it already), so two images never share vLLM's cached features and the
    same pixels always hit them, whatever the row's key."""
    return "px:" + (digest or pixel_digest(pixels))


# --------------------------------------------------------------------------- done ids


def hash_ids(ids: Any) -> np.ndarray:
    """64-bit hashes (uint64) of string ids: a pyarrow array/chunked array, or any sequence of
    str. pandas' vectorised SipHash with its fixed key (``pandas.util.hash_array``), so every
    process hashes alike. Two distinct ids share a hash with probability 2^-64 per pair:
    resuming n new rows against d done ids wrongly skips a row with probability about
    n*d/2^64 (5e-6 for 20M done ids and 5M new rows)."""
    import pandas as pd

    if isinstance(ids, (pa.Array, pa.ChunkedArray)):
        values = ids.to_numpy(zero_copy_only=False)
    else:
        values = np.asarray(list(ids), dtype=object)
    if values.size == 0:
        return np.empty(0, dtype=np.uint64)
    return pd.util.hash_array(values.astype(object, copy=False), categorize=False)


def in_shard(hashes: np.ndarray, shard: tuple[int, int]) -> np.ndarray:
    """Boolean mask: which of the ids hashed to `hashes` (``hash_ids``) belong to shard
    ``(k, n)``: hash mod n == k (module docstring)."""
    k, n = shard
    return hashes % np.uint64(n) == np.uint64(k)


def shard_reason(shard: tuple[int, int]) -> str:
    """The skip reason of the rows of other shards, as the report lists it."""
    return f"other shard (data.shard={shard[0]}/{shard[1]})"


def fewest_shard_rows(num_rows: int, shard: Optional[tuple[int, int]]) -> int:
    """A lower bound, but for a chance below 1e-9, on the rows of `shard` among `num_rows` (each row
    falls in it with chance 1/n: binomial, 6 standard deviations below its mean); `num_rows`
    without a shard. Only for deciding whether an exact check is worth its read."""
    if shard is None:
        return num_rows
    p = 1.0 / shard[1]
    return max(0, int(num_rows * p - 6.0 * float(np.sqrt(num_rows * p * (1.0 - p)))))


@dataclass(frozen=True)
class DoneIds:
    """The ids a sink already holds, as sorted unique 64-bit hashes. ``hashes`` is 8 bytes an
    id (160 MB for 20M ids); ``ref`` is its one copy in the object store once ``put``."""

    hashes: np.ndarray
    ref: Any = None

    @classmethod
    def from_hash_chunks(cls, chunks: Iterable[np.ndarray]) -> "DoneIds":
        chunks = [c for c in chunks if c.size]
        if not chunks:
            return cls(np.empty(0, dtype=np.uint64))
        merged = np.concatenate(chunks) if len(chunks) > 1 else chunks[0]
        merged.sort(kind="stable")
        if merged.size > 1:  # unique in place: the sorted array, minus repeats
            keep = np.empty(merged.size, dtype=bool)
            keep[0] = True
            np.not_equal(merged[1:], merged[:-1], out=keep[1:])
            merged = merged[keep]
        return cls(merged)

    def __len__(self) -> int:
        return int(self.hashes.size)

    def count_in(self, shard: Optional[tuple[int, int]]) -> int:
        """How many of the done ids belong to `shard` (all of them for None)."""
        return len(self) if shard is None else int(in_shard(self.hashes, shard).sum())

    def put(self) -> "DoneIds":
        """Place the array in Ray's object store once; tasks get it by reference."""
        import ray

        return DoneIds(np.empty(0, dtype=np.uint64), ray.put(self.hashes)) if self.hashes.size else self

    def array(self) -> np.ndarray:
        if self.ref is None:
            return self.hashes
        cached = _RESOLVED.get(self.ref.hex())
        if cached is None:
            import ray

            cached = ray.get(self.ref)  # numpy from the object store: a read-only shared-memory view
            _RESOLVED.clear()  # one run's set per worker process at a time
            _RESOLVED[self.ref.hex()] = cached
        return cached

    def contains(self, ids: Sequence[str]) -> np.ndarray:
        """Boolean mask: which of `ids` are done (binary search in the sorted hashes)."""
        done = self.array()
        if not len(ids) or not done.size:
            return np.zeros(len(ids), dtype=bool)
        hashes = hash_ids(ids)
        pos = np.searchsorted(done, hashes)
        pos[pos == done.size] = 0
        return done[pos] == hashes


_RESOLVED: dict[str, np.ndarray] = {}


def label_rows(batch: dict[str, np.ndarray], image_column: str, key_column: Optional[str]) -> tuple[list[str], list[str]]:
    """(ids, source keys) of a block's rows, in order (module docstring)."""
    images = batch[image_column]
    keys = batch[key_column] if key_column else [None] * len(images)
    ids, source_keys = [], []
    for key, cell in zip(keys, images):
        data, path = identity(cell)
        # An HF {bytes, path} cell names its file even when its bytes are there: the source key.
        name = path or (cell.get("path") if isinstance(cell, dict) else None) or None
        if isinstance(key, bytes):
            key = key.decode()
        rid = row_id(key, data, path)
        ids.append(rid)
        source_keys.append(str(key) if key is not None and str(key) != "" else (name or rid))
    return number_repeats(ids), source_keys


def take_rows(batch: dict[str, Any], mask: np.ndarray) -> dict[str, Any]:
    """The rows of a numpy block where `mask` is true."""
    return {name: np.asarray(col, dtype=object)[mask] if not isinstance(col, np.ndarray) else col[mask] for name, col in batch.items()}


def without_done(batch: dict[str, np.ndarray], ids: list[str], source_keys: list[str], done: DoneIds) -> dict[str, Any]:
    """The block with ``id`` and ``source_key`` added and the done rows left out."""
    return take_rows({**batch, "id": np.asarray(ids, dtype=object), "source_key": np.asarray(source_keys, dtype=object)},
                     ~done.contains(ids))


def assign_ids(
    batch: dict[str, np.ndarray],
    *,
    image_column: str,
    key_column: Optional[str],
    done: DoneIds,
    run_id: str,
    shard: Optional[tuple[int, int]] = None,
) -> dict[str, Any]:
    """map_batches UDF: add ``id`` and ``source_key``, drop the rows of other shards (`shard`
    (k, n), module docstring) and those whose id is already done, and count them in the run's
    ledger: rows of other shards as the source's skipped items, done ones as ``skipped``."""
    ids, source_keys = label_rows(batch, image_column, key_column)
    block = block_digest(ids)  # of every id of the block: a retried block replaces its own entries
    counts: dict[str, int] = {}
    if shard is not None:
        mine = in_shard(hash_ids(ids), shard)
        counts[SKIPPED_COUNTER + shard_reason(shard)] = int((~mine).sum())
        batch = take_rows(batch, mine)
        ids = [i for i, m in zip(ids, mine) if m]
        source_keys = [k for k, m in zip(source_keys, mine) if m]
    out = without_done(batch, ids, source_keys, done)
    metrics.record_many(run_id, block, {"read": len(ids), "skipped": len(ids) - len(out["id"]), **counts})
    return out


def duplicates(table: pa.Table) -> dict[str, Any]:
    """What the run's output says about repeated keys and ids (``id`` and ``source_key``
    columns of its captions + quarantine rows): keys that reached more than one id (several
    different images under one key, each captioned under its own id) and ids written more than
    once (exact duplicates in different blocks), each with a count and a few examples."""
    if table.num_rows == 0:
        return {"keys_with_several_images": 0, "rows_under_shared_keys": 0, "key_examples": [],
                "ids_written_more_than_once": 0, "id_examples": []}
    by_key = table.select(["source_key", "id"]).group_by("source_key").aggregate([("id", "count_distinct")])
    shared = by_key.filter(pa.compute.greater(by_key.column("id_count_distinct"), 1))
    by_id = table.select(["id"]).group_by("id").aggregate([("id", "count")])
    repeated = by_id.filter(pa.compute.greater(by_id.column("id_count"), 1))
    return {
        "keys_with_several_images": shared.num_rows,
        "rows_under_shared_keys": int(pa.compute.sum(shared.column("id_count_distinct")).as_py() or 0),
        "key_examples": sorted(shared.column("source_key").to_pylist())[:DUPLICATE_EXAMPLES],
        "ids_written_more_than_once": repeated.num_rows,
        "id_examples": sorted(repeated.column("id").to_pylist())[:DUPLICATE_EXAMPLES],
    }
