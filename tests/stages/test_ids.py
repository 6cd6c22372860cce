"""Row ids, vLLM image uuids, done ids and the resume preflight (no Ray, no engine), plus one
short Ray run (e2e marker: it starts Ray) for data.limit's order and the done ids in the
object store."""

import functools
import json
import pickle
import time

import numpy as np
import pyarrow as pa
import pytest

from capjob.stages import resume
from capjob.config import SinkConfig, SinkFormat, to_typed
from capjob.errors import ConfigError
from capjob.schema import CAPTIONS, QUARANTINE
from capjob.stages.tables import quarantine_table, TableWriter
from capjob.stages import ids
from helpers.config import compose


def typed(*overrides):
    return to_typed(compose(["model=tiny_qwen25vl", *overrides]))


# --------------------------------------------------------------------------- case 1: ids


def test_two_images_under_one_key_get_two_ids_the_same_on_every_run():
    a, b = b"image-a", b"image-b"
    assert ids.row_id("k", a) != ids.row_id("k", b)
    assert ids.row_id("k", a) == ids.row_id("k", a) == ids.row_id(b"k", a)
    assert ids.row_id("k", a).startswith("k#") and ids.row_id(None, a).startswith("sha1:")
    assert ids.row_id("", a) == ids.row_id(None, a)
    # A path cell (fetched later) is named by its path.
    assert ids.row_id("k", None, "s3://b/1.jpg") != ids.row_id("k", None, "s3://b/2.jpg")


def batch(keys, images):
    return {"key": np.asarray(keys, dtype=object), "image": np.asarray(images, dtype=object)}


def test_assign_ids_keeps_every_row_and_numbers_exact_repeats_in_a_block():
    got, source_keys = ids.label_rows(batch(["k", "k", "k", "j"], [b"a", b"b", b"a", b"a"]), "image", "key")
    assert len(got) == len(set(got)) == 4
    assert got[2] == got[0] + "#2"  # same key, same bytes: the same item twice, numbered by position
    assert source_keys == ["k", "k", "k", "j"]


def test_assign_ids_skips_done_ids_only():
    rows = batch(["k", "k"], [b"a", b"b"])
    first, keys = ids.label_rows(rows, "image", "key")
    done = ids.DoneIds.from_hash_chunks([ids.hash_ids([first[0]])])
    again = ids.without_done(rows, first, keys, done)
    assert list(again["id"]) == [first[1]] and list(again["image"]) == [b"b"] and list(again["source_key"]) == ["k"]


def test_image_uuid_is_bound_to_the_pixels():
    a = np.zeros((28, 28, 3), np.uint8)
    b = a.copy()
    b[0, 0, 0] = 1
    assert ids.image_uuid(a) == ids.image_uuid(a.copy()) != ids.image_uuid(b)
    assert ids.image_uuid(np.zeros((56, 14, 3), np.uint8)) != ids.image_uuid(np.zeros((14, 56, 3), np.uint8))


def test_caption_request_names_the_image_by_its_pixels_not_the_row_id():
    from capjob.stages.caption.requests import CaptionRequest, RenderedPrompt

    request = CaptionRequest(typed().caption, typed().engine, RenderedPrompt("p", image_list=False, uuid_list=False, content_format="openai"))
    pixels = np.full((28, 28, 3), 7, np.uint8)
    one = request({"image": pixels, "id": "k#1"})["multimodal_uuids"]["image"]
    two = request({"image": pixels, "id": "other"})["multimodal_uuids"]["image"]
    other = request({"image": np.full((28, 28, 3), 8, np.uint8), "id": "k#1"})["multimodal_uuids"]["image"]
    assert one == two == ids.image_uuid(pixels) and other != one


def test_duplicates_report_counts_and_examples():
    table = pa.table({"id": ["k#1", "k#2", "j#1", "x#1", "x#1"], "source_key": ["k", "k", "j", "x", "x"]})
    d = ids.duplicates(table)
    assert d["keys_with_several_images"] == 1 and d["rows_under_shared_keys"] == 2 and d["key_examples"] == ["k"]
    assert d["ids_written_more_than_once"] == 1 and d["id_examples"] == ["x#1"]


# --------------------------------------------------------------------------- case 2: settings


def write_rows(sink, table_name, rows, stem):
    writer = TableWriter(sink)
    if table_name == QUARANTINE:
        writer.write(QUARANTINE, quarantine_table(rows), stem)
    else:
        writer.write(CAPTIONS, pa.Table.from_pylist(rows), stem)


def test_changed_caption_settings_stop_in_one_line_naming_them(tmp_path):
    cfg = typed(f"sink.path={tmp_path}/out")
    done = resume.prepare(cfg, "run1", "/models/x")
    assert len(done) == 0
    write_rows(cfg.sink, CAPTIONS, [{"id": "a#1", "caption": "c"}], "run1-x")
    assert len(resume.prepare(cfg, "run2", "/models/x")) == 1  # same settings: resumes
    changed = typed(f"sink.path={tmp_path}/out", "caption.temperature=0.9", "images.size=224")
    with pytest.raises(ConfigError) as e:
        resume.prepare(changed, "run3", "/models/x")
    message = str(e.value)
    assert "\n" not in message and message.startswith("job.resume:")
    assert "caption.temperature 0.3 -> 0.9" in message and "images.size 448 -> 224" in message
    assert "caption.max_tokens" not in message
    with pytest.raises(ConfigError, match="model.source"):
        resume.prepare(typed(f"sink.path={tmp_path}/out", "model.source=/other/ckpt"), "run4", "/other/ckpt")
    # force: resumes anyway, and records the new settings next to the old.
    forced = typed(f"sink.path={tmp_path}/out", "caption.temperature=0.9", "job.resume=force")
    assert len(resume.prepare(forced, "run5", "/models/x")) == 1
    assert {r for r, _ in resume.recorded_settings(cfg.sink)} >= {"run1", "run2", "run5"}


def test_resume_false_starts_over_instead_of_adding_a_second_copy(tmp_path, capsys):
    cfg = typed(f"sink.path={tmp_path}/out")
    resume.prepare(cfg, "run1", "/models/x")
    write_rows(cfg.sink, CAPTIONS, [{"id": "a#1", "caption": "c"}], "run1-x")
    write_rows(cfg.sink, QUARANTINE, [{"id": "b#1", "stage": "images", "reason": "decode: bad"}], "run1-y")
    fresh = typed(f"sink.path={tmp_path}/out", "job.resume=false", "caption.user_prompt=Other")
    assert len(resume.prepare(fresh, "run2", "/models/x")) == 0
    assert "deleted 2 caption/quarantine file(s)" in capsys.readouterr().out
    assert not TableWriter(cfg.sink).list_files(CAPTIONS) and not TableWriter(cfg.sink).list_files(QUARANTINE)
    assert [r for r, _ in resume.recorded_settings(cfg.sink)] == ["run2"]  # the old settings are gone with the rows
    # The next plain resume compares against the new settings.
    with pytest.raises(ConfigError, match="caption.user_prompt"):
        write_rows(cfg.sink, CAPTIONS, [{"id": "c#1", "caption": "c"}], "run2-x")
        resume.prepare(cfg, "run3", "/models/x")


def test_settings_of_a_run_that_wrote_nothing_do_not_bind_the_sink(tmp_path):
    resume.prepare(typed(f"sink.path={tmp_path}/out"), "crashed", "/models/x")  # then died before any write
    cfg = typed(f"sink.path={tmp_path}/out", "caption.max_tokens=64")
    resume.prepare(cfg, "run2", "/models/x")
    write_rows(cfg.sink, CAPTIONS, [{"id": "a#1", "caption": "c"}], "run2-x")
    assert len(resume.prepare(cfg, "run3", "/models/x")) == 1


def test_sink_without_recorded_settings_is_refused_unless_forced(tmp_path):
    cfg = typed(f"sink.path={tmp_path}/out")
    write_rows(cfg.sink, CAPTIONS, [{"id": "a", "caption": "c"}], "old-x")
    with pytest.raises(ConfigError, match="without a record of the settings"):
        resume.prepare(cfg, "run1", "/models/x")
    assert len(resume.prepare(typed(f"sink.path={tmp_path}/out", "job.resume=force"), "run1", "/models/x")) == 1


def test_model_revision_tells_two_checkpoints_with_equal_file_sizes_apart(tmp_path):
    for name, fill in (("a", b"\1"), ("b", b"\2")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps({"x": 1}))
        (tmp_path / name / "model.safetensors").write_bytes(fill * (3 << 20))
    assert resume.model_revision(str(tmp_path / "a")) != resume.model_revision(str(tmp_path / "b"))
    assert resume.model_revision(str(tmp_path / "a")) == resume.model_revision(str(tmp_path / "a"))


def test_retry_quarantined_reasons_are_not_done_and_their_old_rows_go(tmp_path, capsys):
    cfg = typed(f"sink.path={tmp_path}/out")
    resume.prepare(cfg, "run1", "/models/x")
    write_rows(cfg.sink, CAPTIONS, [{"id": "ok#1", "caption": "c"}], "run1-a")
    write_rows(cfg.sink, QUARANTINE, [
        {"id": "f#1", "stage": "images", "reason": "fetch: 503 Slow Down"},
        {"id": "d#1", "stage": "images", "reason": "decode: truncated"},
        {"id": "e#1", "stage": "engine", "reason": "engine: prompt too long"},
    ], "run1-q")
    retry = typed(f"sink.path={tmp_path}/out", "job.retry_quarantined=[fetch,engine]")
    done = resume.prepare(retry, "run2", "/models/x")
    assert list(done.contains(["ok#1", "d#1", "f#1", "e#1"])) == [True, True, False, False]
    assert "retrying 2 quarantined row(s)" in capsys.readouterr().out
    left = TableWriter(cfg.sink).read(QUARANTINE)
    assert left.column("id").to_pylist() == ["d#1"]


def test_done_ids_are_read_file_by_file_as_hashes(tmp_path):
    sink = SinkConfig(path=str(tmp_path / "out"))
    for i in range(3):
        write_rows(sink, CAPTIONS, [{"id": f"r{i}-{j}", "caption": "c"} for j in range(100)], f"run-{i}")
    done = resume.read_done_ids(sink)
    assert len(done) == 300 and done.hashes.dtype == np.uint64 and done.hashes.nbytes == 2400
    assert done.contains(["r0-0", "r2-99", "r3-0"]).tolist() == [True, True, False]
    jsonl = SinkConfig(path=str(tmp_path / "j"), format=SinkFormat.jsonl, compression="none")
    write_rows(jsonl, CAPTIONS, [{"id": "x", "caption": "c"}], "run-0")
    assert resume.read_done_ids(jsonl).contains(["x", "y"]).tolist() == [True, False]


def test_job_resume_values():
    assert typed("job.resume=force").job.resume == "force"
    assert typed("job.resume=false").job.resume is False
    with pytest.raises(ConfigError, match="job.resume: must be true, false or force"):
        typed("job.resume=sometimes")


# --------------------------------------------------------------------------- cases 3 and 4, on Ray


class UnevenShards:
    """A Ray Data datasource of `shards` read tasks whose first one is slow: the parallel read of
    the issue, where task finish order differs from source order."""

    @staticmethod
    def make(shards: int, rows: int, slow_s: float):
        from ray.data.block import BlockMetadata
        from ray.data.datasource import Datasource, ReadTask

        def read(shard: int):
            if shard == 0:
                time.sleep(slow_s)
            yield pa.table({"key": [f"s{shard}-{i:03d}" for i in range(rows)],
                            "image": [f"{shard}-{i}".encode() for i in range(rows)]})

        class Source(Datasource):
            def estimate_inmemory_data_size(self):
                return None

            def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
                meta = BlockMetadata(num_rows=None, size_bytes=None, input_files=None, exec_stats=None)
                return [ReadTask(functools.partial(read, i), meta, per_task_row_limit=per_task_row_limit) for i in range(shards)]

        return Source()


@pytest.mark.e2e
def test_limit_takes_the_first_rows_in_source_order_and_done_ids_travel_by_reference(tmp_path):
    """data.limit=N takes the first N rows in source order although the first read task finishes
    last; the done ids reach the id stage as an object-store reference."""
    import ray

    from capjob import metrics, plan

    cfg = typed("data.limit=30", f"sink.path={tmp_path}/out")
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        ledger = metrics.start_ledger("unit", "limit-run")  # noqa: F841 - held: an unreferenced actor is destroyed
        plan.configure_data_context(cfg)
        done = ids.DoneIds.from_hash_chunks([ids.hash_ids([ids.row_id("s0-003", b"0-3")])]).put()
        assert done.ref is not None and len(pickle.dumps(done)) < 1024  # the task arguments carry a reference
        ds = ray.data.read_datasource(UnevenShards.make(shards=4, rows=50, slow_s=3.0)).limit(cfg.data.limit)
        ds = ds.map_batches(ids.assign_ids, batch_format="numpy", fn_kwargs={
            "image_column": "image", "key_column": "key", "done": done, "run_id": "limit-run"})
        got = sorted(r["source_key"] for r in ds.select_columns(["source_key"]).take_all())
        assert got == [f"s0-{i:03d}" for i in range(30) if i != 3]
    finally:
        ray.shutdown()
        from ray.data import DataContext

        DataContext._set_current(None)


# --------------------------------------------------------------------------- data.shard=k/n


def test_shards_split_the_ids_disjointly_and_together_cover_each_once(monkeypatch):
    """Shards 0/3, 1/3, 2/3 of a few hundred rows: every row's id in exactly one shard, ids as an
    unsharded run gives them, and each shard's other rows counted as skipped with their reason."""
    from capjob import metrics

    recorded = {}
    monkeypatch.setattr(metrics, "record_many", lambda run_id, key, counts: recorded.setdefault(run_id, {}).update(counts))
    rows = batch([f"k{i % 250}" for i in range(300)], [f"img-{i}".encode() for i in range(300)])
    rows["caption_hint"] = [f"hint-{i}" for i in range(300)]  # a list column: filtered alongside
    unsharded = ids.assign_ids(rows, image_column="image", key_column="key", done=ids.DoneIds.from_hash_chunks([]), run_id="all")
    shards = [ids.assign_ids(rows, image_column="image", key_column="key", done=ids.DoneIds.from_hash_chunks([]),
                             run_id=f"s{k}", shard=(k, 3)) for k in range(3)]
    parts = [list(s["id"]) for s in shards]
    assert sorted(sum(parts, [])) == sorted(unsharded["id"])  # the union is one run, no id twice
    assert all(set(a).isdisjoint(b) for a in parts for b in parts if a is not b)
    assert all(40 < len(p) < 160 for p in parts)  # a hash split, not everything in one shard
    for k, s in enumerate(shards):
        assert [h.split("-")[1] for h in s["caption_hint"]] == [i.split("-")[1] for i in s["image"].astype(bytes).astype(str)]
        assert recorded[f"s{k}"] == {"read": len(parts[k]), "skipped": 0,
                                     f"source_skipped:other shard (data.shard={k}/3)": 300 - len(parts[k])}
    assert recorded["all"] == {"read": 300, "skipped": 0}
    # the same split again (another process, another day): hashes are SipHash with a fixed key
    again = ids.in_shard(ids.hash_ids(unsharded["id"]), (1, 3))
    assert sorted(np.asarray(unsharded["id"])[again]) == sorted(parts[1])


def test_a_shard_skips_its_own_done_ids_and_counts_them():
    rows = batch([f"k{i}" for i in range(60)], [f"img-{i}".encode() for i in range(60)])
    all_ids, _ = ids.label_rows(rows, "image", "key")
    done = ids.DoneIds.from_hash_chunks([ids.hash_ids(all_ids[:30])])
    mine = ids.in_shard(ids.hash_ids(all_ids), (2, 4))
    assert done.count_in((2, 4)) == int(mine[:30].sum()) and done.count_in(None) == 30
    assert ids.fewest_shard_rows(60, None) == 60 and ids.fewest_shard_rows(60, (2, 4)) == 0
    assert 0 < ids.fewest_shard_rows(1_000_000, (2, 4)) <= 250_000


def test_data_shard_is_validated_with_the_key_and_keys_the_resume_fingerprint(tmp_path):
    assert typed("data.shard=2/3").data.shard == "2/3"
    (tmp_path / "a.parquet").write_bytes(b"x")
    prints = {resume.source_fingerprint(typed("dataset=parquet", f"data.path={tmp_path}", *shard).data)
              for shard in ((), ("data.shard=0/3",), ("data.shard=1/3",))}
    assert len(prints) == 3 and None not in prints  # a finished shard never stands for another
    for bad in ("3/3", "1", "a/b", "-1/3", "0/0"):
        with pytest.raises(ConfigError, match=r"^data\.shard: must be k/n"):
            typed(f"data.shard={bad}")
