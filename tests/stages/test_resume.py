"""stages/resume.py: the completion record that lets the same command say "nothing left" before
Ray starts, and what invalidates it (the source's files, data.* settings, caption settings, the
sink's files)."""

from __future__ import annotations

import os


from capjob.config import DataConfig, SinkConfig, SourceFormat
from capjob.stages import resume
from capjob.stages.storage import listing_digest
from capjob.stages.tables import TableWriter, quarantine_table

SETTINGS = {"model.source": "/m", "caption.user_prompt": "Describe."}


def folder(tmp_path, names=("a.png", "b.png")):
    root = tmp_path / "src"
    root.mkdir(exist_ok=True)
    for n in names:
        (root / n).write_bytes(b"x" * 10)
    return root


def test_listing_digest_sees_added_removed_resized_and_rewritten_files(tmp_path):
    root = folder(tmp_path)
    first = listing_digest(str(root), {})
    assert first is not None and listing_digest(str(root), {}) == first
    (root / "c.png").write_bytes(b"y")
    added = listing_digest(str(root), {})
    assert added != first
    (root / "c.png").unlink()
    assert listing_digest(str(root), {}) == first
    (root / "a.png").write_bytes(b"x" * 11)
    resized = listing_digest(str(root), {})
    assert resized not in (first, added)
    stat = (root / "a.png").stat()
    os.utime(root / "a.png", (stat.st_atime, stat.st_mtime + 5))
    assert listing_digest(str(root), {}) != resized
    assert listing_digest(str(tmp_path / "missing"), {}) is None


def test_source_fingerprint_follows_row_selecting_settings_only(tmp_path):
    root = folder(tmp_path)
    data = DataConfig(format=SourceFormat.image_folder, path=str(root))
    base = resume.source_fingerprint(data)
    assert base is not None
    assert resume.source_fingerprint(DataConfig(format=SourceFormat.image_folder, path=str(root), partitions=7)) == base
    assert resume.source_fingerprint(DataConfig(format=SourceFormat.image_folder, path=str(root), limit=1)) != base
    assert resume.source_fingerprint(DataConfig(format=SourceFormat.image_folder, path=str(root), shuffle_seed=3)) != base
    # A hub dataset has no listing: always read to find what is left.
    assert resume.source_fingerprint(DataConfig(format=SourceFormat.hf, path="org/dataset")) is None


def sink_with_rows(tmp_path) -> TableWriter:
    writer = TableWriter(SinkConfig(path=str(tmp_path / "sink")))
    writer.write("quarantine", quarantine_table([{"id": "x", "source_key": "k", "stage": "images", "reason": "decode: bad"}]), "run1-a")
    return writer


def test_complete_record_round_trip_and_what_invalidates_it(tmp_path):
    writer = sink_with_rows(tmp_path)
    source = resume.source_fingerprint(DataConfig(format=SourceFormat.image_folder, path=str(folder(tmp_path))))
    assert resume.completed_rows(writer, source, SETTINGS) is None  # nothing recorded yet
    resume.record_complete(writer, "run1", source, SETTINGS, 2)
    assert resume.completed_rows(writer, source, SETTINGS) == 2
    # Other caption settings, another source: read the source.
    assert resume.completed_rows(writer, source, {**SETTINGS, "caption.user_prompt": "Other."}) is None
    assert resume.completed_rows(writer, "another", SETTINGS) is None
    assert resume.completed_rows(writer, None, SETTINGS) is None
    # The record is not a run's settings record.
    assert resume.recorded_settings(writer) == []
    # A file added to (or removed from) the sink since: read the source.
    writer.write("quarantine", quarantine_table([{"id": "y", "source_key": "k2", "stage": "images", "reason": "decode: bad"}]), "run2-b")
    assert resume.completed_rows(writer, source, SETTINGS) is None
    resume.record_complete(writer, "run2", source, SETTINGS, 2)
    assert resume.completed_rows(writer, source, SETTINGS) == 2
    # Starting over deletes it with the rows.
    resume.start_over(writer)
    assert resume.completed_rows(writer, source, SETTINGS) is None


def test_no_record_without_a_fingerprint(tmp_path):
    writer = sink_with_rows(tmp_path)
    resume.record_complete(writer, "run1", None, SETTINGS, 5)
    assert not (tmp_path / "sink" / "runs" / resume.COMPLETE).exists()
