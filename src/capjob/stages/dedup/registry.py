"""The claim registry: which copy of an image is captioned (the first to claim its digest),
and, with dedup.mode=perceptual, which captioned image a near duplicate joins.

One ``DedupRegistry`` actor per run (``start_registry``) answers one call per block
(``claim``); Ray runs an actor's calls one at a time, so when two copies of an image are in
flight at once, the block whose call reaches the actor first holds the original, whatever the
source order. Its state is rebuilt at the start of every run from the sink's ``image_digest``
column (``seed_from_sink`` reads it file by file), so a killed driver loses nothing the sink
does not hold.

Memory: ``DigestClaims`` keeps each distinct image as its 128-bit digest (two uint64) and the
claim token of the row that holds it (uint64): 24 bytes an image in sorted numpy arrays (480 MB
for 20M distinct images), plus at most MERGE_AT recent claims in a dict. The perceptual index
is Python objects (about 300 bytes an image): meant for up to a few million images a run.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
from PIL import Image

from capjob.config import DedupMode

# Recent claims kept in a dict before they are merged into the sorted arrays (O(n) a merge,
# so about n / MERGE_AT merges over a run of n distinct images).
MERGE_AT = 1 << 18
# The token of a digest read from the sink: held by an earlier run, never by a row of this one
# (row tokens are odd: claim_tokens).
SINK_TOKEN = 0


def split_digests(digests: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(high, low) uint64 halves of 32-hex-digit digests (stages/ids.pixel_digest)."""
    if not len(digests):
        return np.empty(0, np.uint64), np.empty(0, np.uint64)
    both = np.frombuffer(bytes.fromhex("".join(digests)), dtype=">u8").reshape(-1, 2).astype(np.uint64)
    return np.ascontiguousarray(both[:, 0]), np.ascontiguousarray(both[:, 1])


class DigestClaims:
    """Exact claims: digest (high, low) -> the token of the row that holds it."""

    def __init__(self, high: Optional[np.ndarray] = None, low: Optional[np.ndarray] = None):
        high = np.empty(0, np.uint64) if high is None else np.asarray(high, np.uint64)
        low = np.empty(0, np.uint64) if low is None else np.asarray(low, np.uint64)
        order = np.argsort(high, kind="stable")
        self.high, self.low = high[order], low[order]
        self.token = np.full(self.high.size, SINK_TOKEN, np.uint64)
        self.recent: dict[int, int] = {}

    def __len__(self) -> int:
        return int(self.high.size) + len(self.recent)

    def _held(self, high: int, low: int, pos: int) -> Optional[int]:
        """The token under (high, low) in the sorted arrays, from the first position of `high`."""
        while pos < self.high.size and self.high[pos] == high:
            if self.low[pos] == low:
                return int(self.token[pos])
            pos += 1
        return None

    def holders(self, high: np.ndarray, low: np.ndarray) -> list[Optional[int]]:
        """The token holding each digest (None: unclaimed)."""
        pos = np.searchsorted(self.high, high)
        out: list[Optional[int]] = []
        for i in range(high.size):
            h, lo = int(high[i]), int(low[i])
            held = self._held(h, lo, int(pos[i])) if pos[i] < self.high.size and self.high[pos[i]] == high[i] else None
            out.append(self.recent.get((h << 64) | lo) if held is None else held)
        return out

    def claim_one(self, high: int, low: int, token: int) -> bool:
        """Claim an unclaimed digest (as holders() found it) for `token`; False if a row
        earlier in the same call took it meanwhile."""
        return self.recent.setdefault((high << 64) | low, token) == token

    def claim(self, high: np.ndarray, low: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        """Boolean mask: which rows hold their digest (the first to claim it, or a retry of
        that row: the same token); the others are copies. Within one call the earliest row
        wins."""
        first = np.zeros(high.size, bool)
        for i, held in enumerate(self.holders(high, low)):
            t = int(tokens[i])
            first[i] = held == t if held is not None else self.claim_one(int(high[i]), int(low[i]), t)
        self.merge_if_full()
        return first

    def merge_if_full(self) -> None:
        if len(self.recent) >= MERGE_AT:
            self._merge()

    def _merge(self) -> None:
        keys = np.fromiter(self.recent.keys(), dtype=object, count=len(self.recent))
        high = np.array([k >> 64 for k in keys], np.uint64)
        low = np.array([k & 0xFFFFFFFFFFFFFFFF for k in keys], np.uint64)
        token = np.fromiter(self.recent.values(), dtype=np.uint64, count=len(self.recent))
        high, low, token = (np.concatenate(p) for p in ((self.high, high), (self.low, low), (self.token, token)))
        order = np.argsort(high, kind="stable")
        self.high, self.low, self.token = high[order], low[order], token[order]
        self.recent = {}


# --------------------------------------------------------------------------- perceptual


def perceptual_hash(pixels: np.ndarray) -> int:
    """The 64-bit DCT perceptual hash (pHash, Zauner 2010; the algorithm of imagehash.phash):
    the image as 32x32 grey (Pillow, Lanczos), its 2-D DCT-II (scipy), the 8x8 lowest
    frequencies each compared with their median. Bit i is 1 where coefficient i (row-major) is
    above it."""
    from scipy.fft import dct

    grey = np.asarray(Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8), "RGB").convert("L")
                      .resize((32, 32), Image.Resampling.LANCZOS), dtype=np.float64)
    low = dct(dct(grey, axis=0, type=2), axis=1, type=2)[:8, :8]
    bits = (low > np.median(low)).ravel()
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


class PerceptualIndex:
    """Captioned images by 64-bit perceptual hash, searched within `threshold` bits (Hamming).
    Multi-index hashing (Norouzi et al. 2012): the hash is cut into threshold + 1 parts, and two
    hashes within threshold bits agree on at least one part (pigeonhole), so candidates come
    from one dict per part and are checked exactly."""

    def __init__(self, threshold: int):
        self.threshold = threshold
        parts = threshold + 1
        widths = [64 // parts + (1 if i < 64 % parts else 0) for i in range(parts)]
        shifts = np.cumsum([0] + widths[:-1]).tolist()
        self.parts = [(s, (1 << w) - 1) for s, w in zip(shifts, widths)]
        self.tables: list[dict[int, list[int]]] = [{} for _ in self.parts]
        self.hashes: list[int] = []
        self.digests: list[str] = []

    def __len__(self) -> int:
        return len(self.hashes)

    def nearest(self, phash: int) -> Optional[tuple[str, int]]:
        """(digest, distance) of the nearest image within the threshold, the earliest added on a
        tie; None when there is none."""
        best: Optional[tuple[int, int]] = None
        for (shift, mask), table in zip(self.parts, self.tables):
            for j in table.get((phash >> shift) & mask, ()):
                d = (self.hashes[j] ^ phash).bit_count()
                if d <= self.threshold and (best is None or (d, j) < best):
                    best = (d, j)
        return None if best is None else (self.digests[best[1]], best[0])

    def add(self, phash: int, digest: str) -> None:
        j = len(self.hashes)
        self.hashes.append(phash)
        self.digests.append(digest)
        for (shift, mask), table in zip(self.parts, self.tables):
            table.setdefault((phash >> shift) & mask, []).append(j)


# --------------------------------------------------------------------------- the actor


class DedupRegistry:
    """The run's registry (a Ray actor, ``start_registry``): exact claims, and with
    dedup.mode=perceptual the index of captioned images' perceptual hashes."""

    def __init__(self, mode: str, threshold: int, seed_high: np.ndarray, seed_low: np.ndarray,
                 seed_phashes: Sequence[int] = (), seed_digests: Sequence[str] = ()):
        self.claims = DigestClaims(seed_high, seed_low)
        self.index = PerceptualIndex(threshold) if DedupMode(mode) == DedupMode.perceptual else None
        for phash, digest in zip(seed_phashes, seed_digests):
            self.index.add(int(phash), digest)  # type: ignore[union-attr]
        self.calls = 0

    def claim(self, digests: Sequence[str], tokens: np.ndarray,
              phashes: Optional[Sequence[int]] = None) -> tuple[np.ndarray, list[Optional[str]], list[int]]:
        """One block's claims: (first mask, the original's digest of each row (None: its own,
        or not a copy), the Hamming distance to it (0 for exact copies)). A row not held
        exactly joins the nearest captioned image within the threshold (perceptual), else holds
        its digest; only rows that hold their digest enter the perceptual index."""
        self.calls += 1
        high, low = split_digests(digests)
        tokens = np.asarray(tokens, np.uint64)
        if self.index is None or phashes is None:
            return self.claims.claim(high, low, tokens), [None] * len(digests), [0] * len(digests)
        first = np.zeros(len(digests), bool)
        originals: list[Optional[str]] = [None] * len(digests)
        distances = [0] * len(digests)
        # A near duplicate never claims its own digest: an exact copy of it then finds the same
        # captioned image through the index, never a digest whose row holds no caption of its own.
        for i, held in enumerate(self.claims.holders(high, low)):
            t = int(tokens[i])
            if held is not None:
                first[i] = held == t
                continue
            near = self.index.nearest(int(phashes[i]))
            if near is not None and near[0] != digests[i]:
                originals[i], distances[i] = near
            elif self.claims.claim_one(int(high[i]), int(low[i]), t):
                first[i] = True
                self.index.add(int(phashes[i]), digests[i])
        self.claims.merge_if_full()
        return first, originals, distances

    def size(self) -> dict[str, int]:
        return {"digests": len(self.claims), "perceptual": len(self.index) if self.index is not None else 0,
                "calls": self.calls}


def registry_name(run_id: str) -> str:
    return f"capjob-dedup-{run_id}"


def start_registry(run_id: str, mode: DedupMode, threshold: int, seed: Any, **actor_options: Any) -> Any:
    """The run's DedupRegistry actor, seeded with `seed` (seed_from_sink's result). Keep the
    handle: an unreferenced actor is destroyed. actor_options: e.g. metrics.on_driver_node(),
    so that a lost worker node does not take it along."""
    import ray

    actor = ray.remote(num_cpus=0, max_restarts=0)(DedupRegistry)
    return actor.options(name=registry_name(run_id), **actor_options).remote(
        mode.value, threshold, ray.put(seed.high), ray.put(seed.low), seed.phashes, seed.digests)
