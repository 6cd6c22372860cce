"""The claim registry without Ray: who holds an image, retries, merges, the sink's seed, and the
perceptual index (stages/dedup/registry.py)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from capjob.config import DedupMode
from capjob.stages.dedup import registry
from capjob.stages.dedup.claim import claim_tokens
from capjob.stages.dedup.registry import DedupRegistry, DigestClaims, PerceptualIndex, perceptual_hash, split_digests
from capjob.stages.ids import pixel_digest


def digest(i: int) -> str:
    return f"{i:032x}"


def test_split_digests_round_trips_the_128_bits():
    high, low = split_digests(["0123456789abcdef" "fedcba9876543210", "f" * 32])
    assert high.tolist() == [0x0123456789ABCDEF, 2**64 - 1] and low.tolist() == [0xFEDCBA9876543210, 2**64 - 1]
    assert high.dtype == np.uint64


def test_first_claim_holds_the_image_later_ones_are_copies_and_a_retry_gets_its_own_back():
    reg = DedupRegistry("exact", 4, np.empty(0, np.uint64), np.empty(0, np.uint64))
    a = claim_tokens("block-a", 3)
    first, originals, _ = reg.claim([digest(1), digest(2), digest(1)], a)
    assert first.tolist() == [True, True, False]  # within one call the earliest row wins
    assert originals == [None, None, None]  # exact: a copy's original has its own digest
    b = claim_tokens("block-b", 2)
    assert reg.claim([digest(2), digest(3)], b)[0].tolist() == [False, True]
    # The task of block a retried: its rows get their own claims back, the copy stays a copy.
    assert reg.claim([digest(1), digest(2), digest(1)], a)[0].tolist() == [True, True, False]
    assert reg.size()["digests"] == 3


def test_claim_tokens_are_odd_distinct_and_the_same_on_every_attempt():
    t = claim_tokens("k", 1000)
    assert (t & np.uint64(1)).all() and len(set(t.tolist())) == 1000
    assert (t == claim_tokens("k", 1000)).all() and not (t == claim_tokens("other", 1000)).any()


def test_digests_that_share_their_high_64_bits_stay_two_images(monkeypatch):
    monkeypatch.setattr(registry, "MERGE_AT", 2)
    claims = DigestClaims()
    same_high = np.array([7, 7, 7], np.uint64)
    tokens = np.array([1, 3, 5], np.uint64)
    assert claims.claim(same_high, np.array([1, 2, 1], np.uint64), tokens).tolist() == [True, True, False]
    assert claims.recent == {} and claims.high.size == 2  # merged into the sorted arrays
    # after the merge: found in the sorted arrays, by all 128 bits
    assert claims.claim(same_high, np.array([2, 1, 3], np.uint64), np.array([9, 1, 11], np.uint64)).tolist() == [False, True, True]


def test_many_claims_across_merges_match_a_set(monkeypatch):
    monkeypatch.setattr(registry, "MERGE_AT", 64)
    rng = np.random.default_rng(0)
    claims, seen = DigestClaims(), set()
    for block in range(50):
        high = rng.integers(0, 40, 30, dtype=np.uint64)  # few values: many repeats, shared highs
        low = rng.integers(0, 3, 30, dtype=np.uint64)
        first = claims.claim(high, low, claim_tokens(str(block), 30))
        expect = []
        for h, lo in zip(high.tolist(), low.tolist()):
            expect.append((h, lo) not in seen)
            seen.add((h, lo))
        assert first.tolist() == expect
    assert len(claims) == len(seen)


def test_digests_from_the_sink_are_held_by_an_earlier_run():
    high, low = split_digests([digest(5)])
    reg = DedupRegistry("exact", 4, high, low)
    assert reg.claim([digest(5), digest(6)], claim_tokens("b", 2))[0].tolist() == [False, True]


def photo(seed: int, size: int = 96) -> np.ndarray:
    """A smooth random image (blurred noise): structure a perceptual hash can see."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small, "RGB").resize((size, size), Image.Resampling.BICUBIC))


def jpeg(pixels: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, "JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def test_perceptual_hash_is_close_for_a_reencode_and_far_for_another_image():
    a, b = photo(1), photo(2)
    d_reencode = (perceptual_hash(a) ^ perceptual_hash(jpeg(a, 70))).bit_count()
    d_other = (perceptual_hash(a) ^ perceptual_hash(b)).bit_count()
    assert d_reencode <= 4 < 16 <= d_other, (d_reencode, d_other)
    assert pixel_digest(a) != pixel_digest(jpeg(a, 70))  # the exact key tells them apart
    assert perceptual_hash(a) == perceptual_hash(a.copy()) and 0 < perceptual_hash(a) < 2**64


def test_perceptual_index_finds_the_nearest_within_the_threshold_only():
    index = PerceptualIndex(threshold=3)
    index.add(0b1111, "d0")
    index.add(0xFFFF << 40, "d1")
    assert index.nearest(0b0111) == ("d0", 1)
    assert index.nearest(0b0000) is None  # 4 bits away
    assert index.nearest((0xFFFF << 40) ^ (1 << 41) ^ (1 << 50)) == ("d1", 2)
    rng = np.random.default_rng(3)
    hashes = [int(h) for h in rng.integers(0, 2**63, 300, dtype=np.int64)]
    brute = PerceptualIndex(threshold=6)
    for i, h in enumerate(hashes[:200]):
        brute.add(h, str(i))
    for h in hashes[200:] + [hashes[5] ^ 0b101101, hashes[9] ^ (0b1111 << 50)]:
        near = [(bin(h ^ g).count("1"), i) for i, g in enumerate(hashes[:200]) if bin(h ^ g).count("1") <= 6]
        expect = (str(min(near)[1]), min(near)[0]) if near else None
        assert brute.nearest(h) == expect


def test_perceptual_registry_merges_near_copies_onto_the_captioned_image():
    a = photo(1)
    near, other = jpeg(a, 60), photo(2)
    hashes = [perceptual_hash(p) for p in (a, near, other)]
    digests = [pixel_digest(p) for p in (a, near, other)]
    reg = DedupRegistry(DedupMode.perceptual.value, 6, np.empty(0, np.uint64), np.empty(0, np.uint64))
    first, originals, distances = reg.claim(digests, claim_tokens("x", 3), hashes)
    assert first.tolist() == [True, False, True]
    assert originals[1] == digests[0] and 0 < distances[1] <= 6
    # An exact copy of the near copy joins the captioned image, never the near copy (no caption row).
    first, originals, _ = reg.claim([digests[1]], claim_tokens("y", 1), [hashes[1]])
    assert first.tolist() == [False] and originals == [digests[0]]
    # Seeded from a sink: the hashes of captioned images are found again.
    high, low = split_digests([digests[0]])
    seeded = DedupRegistry("perceptual", 6, high, low, [hashes[0]], [digests[0]])
    assert seeded.claim([digests[1]], claim_tokens("z", 1), [hashes[1]])[1] == [digests[0]]
