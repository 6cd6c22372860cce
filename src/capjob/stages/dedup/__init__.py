"""Stage: caption each distinct image once (``dedup``, on by default: config/dedup.py).

Where it runs: in the decode task, right after the image stage (the same fused Ray Data task:
no extra copy of a block, no barrier, no shuffle before the engine)::

    ids -> decode/resize -> dedup (claim.claim_copies) -> engine -> sink     ... stream ends
    -> fill (fill.fill_copies) -> accounting, report

The key: ``image_digest``, BLAKE2b-128 over the shape and RGB pixels the engine gets
(stages/ids.pixel_digest), computed once and also used as vLLM's multimodal uuid. Two rows are
one image when their normalised pixels are equal: same bytes certainly, a PNG and a lossless
re-encode of its pixels too, a JPEG re-encode not (other pixels). Among n distinct images two
share a 128-bit digest with probability about n^2 / 2^129 (3e-16 for a billion images), so a
collision, which would give an image another's caption, is not a risk a user must weigh; the
registry keeps the whole 128 bits, nothing shorter. ``dedup.mode=perceptual`` adds a 64-bit
DCT hash within ``dedup.threshold`` bits (registry.perceptual_hash): near duplicates, merged on
purpose and listed in the report.

Who is captioned: one ``DedupRegistry`` actor per run (registry.py) answers one call per block.
Ray runs an actor's calls one after another, so when copies of an image are in flight in two
blocks at once, the block whose call reaches the actor first holds the original (within a block,
the earliest row). That is arrival order, not source order: which copy's id becomes
``duplicate_of`` can differ between runs, the captions cannot (same pixels, same settings).
Cost: one actor round trip per block (the bench measures it) and 24 bytes an image in the
actor. A claim carries a token per (block, position), so a retried task gets its own claims
back instead of finding its rows already claimed.

The copies: they leave the stream before the engine, written durably to the sink's
``pending`` table (one atomic file per block, pending/<run_id>-<block digest>), and the fill
writes their rows after the stream ends, when every original has its caption or quarantine row
(fill.py: a copy of an image whose request failed is quarantined with that reason). Several
prompts per image need nothing more: a copy takes every caption column of its original. Each
copy row has its own id and source_key, the original's caption(s), token counts and model,
``duplicate_of`` = the original's id (null on every captioned row).

Kill and resume: the registry lives in the driver's job and dies with it; what it knew is in the
sink. A run starts by seeding its registry with the digests of the sink's captioned rows
(claim.seed_from_sink, file by file, 16 bytes an image). Pending copies of a killed run are not
done ids: the next run reads them again, finds their original's digest in the seed (or
captions the first copy itself, if the original never got its row) and fills them. So a copy
that arrives after its original was captioned in an earlier run of the same sink reuses that
caption; a killed run's pending files are left behind, read by nothing, removed with
job.resume=false.

Accounting: ``captioned`` counts every captions row, copies included; items seen = rows +
skipped holds as before (a copy is a row). The report's ``dedup`` section gives distinct images
captioned, copies that reused a caption, engine requests saved (copies x prompts), and images/s
counted both ways.
"""
