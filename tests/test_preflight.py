"""One preflight for the dry run and the run: every check that can stop a run before Ray starts,
for every source format, stops `job.dry_run=true` with the same `capjob: error:` line as the run
(preflight.check_all is the one sequence both make). The run is the real pipeline.run; Ray's
start is replaced by a failure so that a check the run skipped would show instead of a job."""

import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from capjob import preflight
from capjob.config import to_typed
from capjob.errors import CapjobError
from helpers.config import REPO, compose, model_files
from helpers.iolayouts import make_rows, write_hf_parquet_dir, write_image_folder, write_llava_json, write_parquet, write_webdataset

MODEL_FILES = ("config.json", "tokenizer.json", "preprocessor_config.json", "chat_template.json", "model.safetensors")


def fake_model(root, lacking=()):
    """A folder with the tiny model's files (loaded and rendered by preflight; weights a stand-in)."""
    return model_files(root, lacking)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """One small input per source format, as the README's dataset table reads them."""
    root = tmp_path_factory.mktemp("inputs")
    rows = make_rows(4)
    return {
        "sample": ["dataset=sample", "data.sample_size=2", "data.sample_shapes=2"],
        "parquet": ["dataset=parquet", f"data.path={write_parquet(rows, root / 'parquet')}", "data.key_column=key",
                    "data.passthrough_columns=[label]"],
        "hf": ["dataset=imagenet_hf", f"data.path={write_hf_parquet_dir(rows, root / 'hf')}", "data.key_column=key",
               "data.passthrough_columns=[label]"],
        "image_folder": ["dataset=image_folder", f"data.path={write_image_folder(rows, root / 'folder')}"],
        "webdataset": ["dataset=webdataset", f"data.path={write_webdataset(rows, root / 'shards')}",
                       "data.passthrough_columns=[cls]"],
        "json": ["dataset=llava_json", f"data.path={write_llava_json(rows, root / 'llava')[0]}"],
    }


def sink_with_captions(sink, settings=None):
    """A sink holding one caption file and, with `settings`, a run record of those settings."""
    (sink / "captions").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": ["x#sha1:0"], "source_key": ["x"], "caption": ["a cat"]}), sink / "captions" / "r0-0.parquet")
    if settings is not None:
        (sink / "runs").mkdir(exist_ok=True)
        (sink / "runs" / "r0.json").write_text(json.dumps({"run_id": "r0", "settings": settings}))
    return sink


def template_in_tokenizer_config(root):
    """A checkpoint whose chat template lives only in tokenizer_config.json (as some are saved):
    the multimodal processor Ray Data LLM's ChatTemplate stage loads does not read it there."""
    folder = fake_model(root, lacking=("chat_template.json",))
    template = json.loads((model_files(root.parent / f"{root.name}-full") / "chat_template.json").read_text())["chat_template"]
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    return folder


# (name, overrides given the test's tmp_path, the key the line starts with, formats it applies to)
CHECKS = [
    ("missing model", lambda t: ["model.source=/nonexistent/capjob-model"], "model.source", None),
    ("model without chat template", lambda t: [f"model.source={fake_model(t / 'bare', lacking=('chat_template.json',))}"],
     "model.source", None),
    ("chat template only in tokenizer_config.json", lambda t: [f"model.source={template_in_tokenizer_config(t / 'tc')}"],
     "model.source", ("parquet",)),
    ("broken tokenizer", lambda t: [f"model.source={(fake_model(t / 'bt') / 'tokenizer.json').write_text('{') and t / 'bt'}"],
     "model.source", ("parquet",)),
    ("layout needs GPUs", lambda t: ["resources.gpus_per_worker=2", "engine.tensor_parallel_size=2"], "resources.gpus_per_worker", None),
    ("unwritable sink", lambda t: [f"sink.path={(t / 'file').write_text('x') and t / 'file'}/out"], "sink.path", None),
    ("unknown compression", lambda t: ["sink.compression=bogus"], "sink.compression", None),
    ("secret in storage options", lambda t: ["+data.storage_options.secret=abc"], "data.storage_options", None),
    ("missing data path", lambda t: [f"data.path={t / 'nothing-here'}"], "data.path", ("parquet", "hf", "image_folder", "webdataset", "json")),
    ("missing pass-through column", lambda t: ["data.passthrough_columns=[nope]"], "data.passthrough_columns", None),
    ("missing hash column", lambda t: ["data.verify_hash_column=nope"], "data.verify_hash_column", None),
    ("prompt names a missing column", lambda t: ["caption.user_prompt='Alt text: {alt}'"], "caption.user_prompt", None),
    ("captions without a settings record", lambda t: [f"sink.path={sink_with_captions(t / 'old')}"], "job.resume", None),
    ("captions of other settings", lambda t: [f"sink.path={sink_with_captions(t / 'other', {'caption.temperature': 0.9})}"],
     "job.resume", None),
]
FORMATS = ("sample", "parquet", "hf", "image_folder", "webdataset", "json")


@pytest.fixture()
def no_ray(monkeypatch):
    """Ray's start fails the test: every case must stop in the preflight, before Ray."""
    from capjob import pipeline

    def reached_ray(*args, **kwargs):
        raise AssertionError("the run passed its preflight and started Ray")

    monkeypatch.setattr(pipeline.runtime, "init_ray", reached_ray)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name,overrides,key,formats", CHECKS, ids=[c[0] for c in CHECKS])
def test_dry_run_stops_where_the_run_stops(tmp_path, inputs, no_ray, fmt, name, overrides, key, formats):
    if formats is not None and fmt not in formats:
        pytest.skip(f"{name}: not a check of data.format={fmt}")
    from capjob import pipeline

    model = fake_model(tmp_path / "model")
    base = [*inputs[fmt], f"model.source={model}", f"sink.path={tmp_path / 'out'}", "job.run_id=parity"]
    cfg = lambda dry: to_typed(compose([*base, *overrides(tmp_path), f"job.dry_run={dry}"]))  # noqa: E731
    with pytest.raises(CapjobError) as dry:
        preflight.dry_run(cfg(True))
    with pytest.raises(CapjobError) as run:
        pipeline.run(cfg(False), {}, report_dir=str(tmp_path / "report"))
    assert str(dry.value) == str(run.value)
    assert str(dry.value).startswith(key), str(dry.value)
    assert "\n" not in str(dry.value)


def test_a_valid_config_passes_both_and_the_dry_run_writes_nothing(tmp_path, inputs):
    model = fake_model(tmp_path / "model")
    out = tmp_path / "out"
    checked = preflight.dry_run(to_typed(compose([*inputs["parquet"], f"model.source={model}", f"sink.path={out}"])))
    assert checked.rows == 4 and checked.done == 0 and checked.placement.gpus == 0
    assert not any(p.is_file() for p in out.rglob("*"))  # the write probe is gone, nothing recorded


def test_the_estimate_is_a_range_when_the_sink_holds_ids_of_other_inputs(tmp_path, inputs):
    """A sink holding more ids than the source has rows may hold none of them: the dry run says
    how many rows are left as a range, never "at most 0"."""
    out = tmp_path / "out"
    (out / "captions").mkdir(parents=True)
    ids = [f"elsewhere-{i}#sha1:{i}" for i in range(20)]
    pq.write_table(pa.table({"id": ids, "source_key": ids, "caption": ["c"] * 20}), out / "captions" / "r0-0.parquet")
    model = fake_model(tmp_path / "model")
    checked = preflight.check_all(to_typed(compose([*inputs["parquet"], f"model.source={model}", f"sink.path={out}",
                                                   "job.resume=force"])))
    assert (checked.done, checked.rows) == (20, 4)
    assert checked.render("force").endswith("left to caption: 0 to 4 (which rows the sink holds is known once they are read)")
    assert checked.render(False).startswith("  sink        20 id(s) already there; job.resume=false: all 4 rows")


@pytest.mark.parametrize("extra", [[], ["job.dry_run=true"]], ids=["run", "dry run"])
def test_the_cli_prints_the_same_one_line_error_with_exit_2(tmp_path, inputs, extra):
    model = fake_model(tmp_path / "model")
    result = subprocess.run(
        [sys.executable, "-m", "capjob", *inputs["sample"], f"model.source={model}", f"sink.path={tmp_path / 'out'}",
         "caption.user_prompt='Alt text: {alt}'", f"hydra.run.dir={tmp_path / 'run'}", *extra],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("capjob: error: caption.user_prompt: names column {alt}, which the dataset does not have")
