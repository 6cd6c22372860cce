"""The dedup stage itself (a map_batches UDF fused into the decode task, before the engine):
each image's digest, its claim at the run's registry, and the copies written to the sink's
``pending`` table instead of going on to the engine. Also the registry's seed: the digests of
the images the sink already holds captions of.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from capjob import metrics
from capjob.config import DedupMode, SinkConfig, SinkFormat
from capjob.schema import (CAPTIONS, DUPLICATE_OF_COLUMN, IMAGE_DIGEST_COLUMN, PENDING, PHASH_COLUMN, block_digest,
                           missing_as_none)
from capjob.stages.dedup.registry import perceptual_hash, split_digests
from capjob.stages.ids import pixel_digest, take_rows
from capjob.stages.tables import TableWriter, as_writer, deserialize, table_format

# The pending table's own columns (the rest are the copy's pass-through columns): the digest
# whose caption the copy takes, and its Hamming distance to it (0: exact).
ORIGINAL_COLUMN = "original_digest"
DISTANCE_COLUMN = "distance"
# The ledger's counter of copies set aside (the progress line and the report).
COPIES_COUNTER = "dedup_copies"


@dataclass(frozen=True)
class ClaimTarget:
    """What the dedup stage needs: where pending copies go, the run, the registry actor's name
    (None: dedup.mode=off, the digest is only computed), and the mode."""

    sink: SinkConfig
    run_id: str
    registry: Optional[str]
    mode: DedupMode = DedupMode.exact
    passthrough_columns: list[str] = field(default_factory=list)


def claim_tokens(block_key: str, n: int) -> np.ndarray:
    """The claim token of each row of a block: odd (never registry.SINK_TOKEN), the same for
    the same block and position on every attempt, so a retried task gets back its own claims."""
    base = np.uint64(int.from_bytes(hashlib.blake2b(block_key.encode(), digest_size=8).digest(), "big"))
    with np.errstate(over="ignore"):
        return (base + np.arange(n, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)) | np.uint64(1)


_REGISTRIES: dict[str, Any] = {}


def _registry(name: str) -> Any:
    if name not in _REGISTRIES:
        import ray

        _REGISTRIES.clear()
        _REGISTRIES[name] = ray.get_actor(name)
    return _REGISTRIES[name]


def claim_copies(batch: dict[str, Any], *, target: ClaimTarget) -> dict[str, Any]:
    """map_batches UDF after prepare_images: add ``image_digest`` (and ``image_phash`` with
    dedup.mode=perceptual); with dedup on, claim every image at the registry, write the copies
    to pending/<run_id>-<block digest> (one atomic file: a retried task rewrites it) and keep
    the rows that hold their image."""
    digests = [pixel_digest(p) for p in batch["image"]]
    out = {**batch, IMAGE_DIGEST_COLUMN: np.asarray(digests, dtype=object)}
    phashes = None
    if target.mode == DedupMode.perceptual:
        phashes = [perceptual_hash(p) for p in batch["image"]]
        out[PHASH_COLUMN] = np.asarray([f"{h:016x}" for h in phashes], dtype=object)
    if target.registry is None or not digests:
        return out
    import ray

    ids = [str(i) for i in batch["id"]]
    key = block_digest(ids)
    first, originals, distances = ray.get(_registry(target.registry).claim.remote(digests, claim_tokens(key, len(ids)), phashes))
    copies = np.flatnonzero(~first)
    if copies.size:
        rows = []
        for i in copies:
            row = {"id": ids[i], "source_key": str(batch["source_key"][i]), IMAGE_DIGEST_COLUMN: digests[i],
                   ORIGINAL_COLUMN: originals[i] or digests[i], DISTANCE_COLUMN: int(distances[i]),
                   "image_width": int(batch["image_width"][i]), "image_height": int(batch["image_height"][i]),
                   "run_id": target.run_id}
            if phashes is not None:
                row[PHASH_COLUMN] = f"{phashes[i]:016x}"
            for column in target.passthrough_columns:
                value = missing_as_none(batch[column][i])
                row[column] = value.item() if isinstance(value, np.generic) else value
            rows.append(row)
        TableWriter(target.sink).write(PENDING, pa.Table.from_pylist(rows), f"{target.run_id}-{key}")
    metrics.record_many(target.run_id, f"dedup-{key}", {COPIES_COUNTER: int(copies.size)})
    return take_rows(out, first)


# --------------------------------------------------------------------------- the seed


@dataclass
class Seed:
    """The images a sink holds captions of (rows with no duplicate_of): the registry's start."""

    high: np.ndarray
    low: np.ndarray
    phashes: list[int] = field(default_factory=list)
    digests: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.high.size)


def file_columns(writer: TableWriter, name: str, wanted: list[str]) -> pa.Table:
    """The columns of `wanted` one sink file has (parquet: only those are read)."""
    if table_format(writer.cfg) == SinkFormat.parquet:
        with writer.fs.open(name, "rb") as f:
            parquet = pq.ParquetFile(f)
            present = [c for c in wanted if c in parquet.schema_arrow.names]
            return parquet.read(columns=present)
    table = deserialize(writer.fs.cat_file(name), name, writer.cfg.format)
    return table.select([c for c in wanted if c in table.column_names])


def captioned_mask(table: pa.Table) -> pa.Array:
    """Rows of a captions table that were captioned themselves (no duplicate_of) and hold a digest."""
    has = pc.is_valid(table.column(IMAGE_DIGEST_COLUMN))
    if DUPLICATE_OF_COLUMN in table.column_names:
        has = pc.and_(has, pc.is_null(table.column(DUPLICATE_OF_COLUMN)))
    return has


def seed_from_sink(sink: SinkConfig | TableWriter, mode: DedupMode) -> Seed:
    """The digests (and, perceptual, the hashes) of the captioned images in the sink, read
    file by file: the driver holds one file's digests as strings at a time, then 16 bytes an
    image. Rows from before image_digest existed are not in it (their images are captioned
    again if they come back under another id)."""
    writer = as_writer(sink)
    wanted = [IMAGE_DIGEST_COLUMN, DUPLICATE_OF_COLUMN] + ([PHASH_COLUMN] if mode == DedupMode.perceptual else [])
    highs, lows, phashes, digests = [], [], [], []
    for name in writer.list_files(CAPTIONS):
        table = file_columns(writer, name, wanted)
        if IMAGE_DIGEST_COLUMN not in table.column_names or not table.num_rows:
            continue
        table = table.filter(captioned_mask(table))
        hexes = table.column(IMAGE_DIGEST_COLUMN).to_pylist()
        high, low = split_digests(hexes)
        highs.append(high)
        lows.append(low)
        if mode == DedupMode.perceptual and PHASH_COLUMN in table.column_names:
            for digest, phash in zip(hexes, table.column(PHASH_COLUMN).to_pylist()):
                if phash is not None:
                    phashes.append(int(phash, 16))
                    digests.append(digest)
    if not highs:
        return Seed(np.empty(0, np.uint64), np.empty(0, np.uint64))
    return Seed(np.concatenate(highs), np.concatenate(lows), phashes, digests)
