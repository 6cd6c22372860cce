"""End to end on CPU (Ray Data + Ray Data LLM + vLLM CPU, tiny model), issue 20 in ONE run:
two prompts per image (one naming the `label` column, one constrained by a JSON schema),
sink=txt with a trigger-word prefix, and the contact sheet of the run's report."""

import json
import subprocess
import sys

import jsonschema
import pyarrow as pa
import pytest
from PIL import Image

from capjob.config import SinkConfig, SinkFormat
from capjob.stages.sources.sample import generated_images, write_hf_parquet
from helpers.config import REPO

pytestmark = pytest.mark.e2e

SCHEMA = {"type": "object", "properties": {"shape": {"type": "string", "enum": ["circle", "square", "triangle"]}},
          "required": ["shape"], "additionalProperties": False}
SCHEMA_OVERRIDE = "{type:object,properties:{shape:{type:string,enum:[circle,square,triangle]}},required:[shape],additionalProperties:false}"


@pytest.fixture(scope="module")
def caption_set_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("captionset")
    images = generated_images(5, seed=7)
    rows = [("dogs/rex.jpg", images[0][1], "a red circle"), ("dogs/rex.png", images[1][1], "a blue square"),
            ("odd name?<b>.webp", images[2][1], "a <green> triangle"), ("../up/.hidden.jpg", images[3][1], "two circles"),
            ("plain", images[4][1], None), ("broken.jpg", b"<html>404</html>", "x")]
    (tmp / "data").mkdir()
    write_hf_parquet(rows, tmp / "data" / "part-0.parquet")
    proc = subprocess.run(
        [sys.executable, "-m", "capjob", "experiment=offline", "dataset=parquet", f"data.path={tmp}/data",
         "sink=txt", f"sink.path={tmp}/out", "job.run_id=captionset", "caption.prefix='sks, '",
         "+caption.prompts.short={prompt:'Name the shapes in {label}.',max_tokens:8}",
         f"+caption.prompts.objects={{prompt:'List the shapes as JSON.',max_tokens:40,json_schema:{SCHEMA_OVERRIDE}}}"],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return tmp, rows, proc


def manifest(out) -> pa.Table:
    import pyarrow.parquet as pq

    return pa.concat_tables([pq.read_table(f) for f in sorted((out / "captions").glob("*.parquet"))])


def test_two_prompts_and_a_row_column_give_one_row_per_image(caption_set_run):
    tmp, rows, _ = caption_set_run
    table = manifest(tmp / "out")
    assert table.num_rows == 5 and len(set(table.column("id").to_pylist())) == 5
    assert table.column_names[:4] == ["id", "source_key", "caption_short", "caption_objects"]
    assert "caption" not in table.column_names
    # The column the prompt names is passed through.
    labels = dict(zip(table.column("source_key").to_pylist(), table.column("label").to_pylist()))
    assert labels == {key: label for key, _, label in rows if key != "broken.jpg"}
    assert all(c.strip() for c in table.column("caption_short").to_pylist())
    assert min(table.column("generated_tokens").to_pylist()) > 0


def test_json_schema_column_holds_the_parsed_object(caption_set_run):
    tmp, _, _ = caption_set_run
    for text in manifest(tmp / "out").column("caption_objects").to_pylist():
        jsonschema.validate(json.loads(text), SCHEMA)


def test_sidecar_txt_files(caption_set_run):
    from capjob.stages.resume import read_done_ids

    tmp, rows, _ = caption_set_run
    table = manifest(tmp / "out").to_pylist()
    txt = tmp / "out" / "txt"
    names = {r["source_key"]: r["txt_file"] for r in table}
    assert names["dogs/rex.jpg"] == names["dogs/rex.png"] == "dogs/rex.txt"
    assert names["plain"] == "plain.txt"
    assert names["odd name?<b>.webp"].startswith("odd name__b_-") and names["../up/.hidden.jpg"].startswith("up/_hidden-")
    for r in table:
        text = (txt / r["txt_file"]).read_text(encoding="utf-8")
        if r["txt_file"] == "dogs/rex.txt":  # two images, one name: it holds one of their captions
            assert text in {"sks, " + x["caption_short"] for x in table if x["txt_file"] == "dogs/rex.txt"}
        else:
            assert text == "sks, " + r["caption_short"]
    assert sorted(p.relative_to(txt).as_posix() for p in txt.rglob("*") if p.is_file()) == sorted(set(names.values()))
    report = json.loads((tmp / "out" / "reports" / "captionset" / "report.json").read_text())
    assert report["txt_collisions"]["count"] == 1 and list(report["txt_collisions"]["examples"]) == ["dogs/rex.txt"]
    # Resume: every image of the run is done, read back from the manifest and the quarantine.
    done = read_done_ids(SinkConfig(path=str(tmp / "out"), format=SinkFormat.txt))
    assert len(done) == len(rows) and done.contains([r["id"] for r in table]).all()


def test_contact_sheet_in_the_report(caption_set_run):
    tmp, _, proc = caption_set_run
    report_dir = tmp / "out" / "reports" / "captionset"
    png = Image.open(report_dir / "samples.png")
    assert png.format == "PNG" and png.size[0] == 880
    html = (report_dir / "samples.html").read_text(encoding="utf-8")
    assert html.count("<figure>") == 5 and "5 of 5 captioned" in html
    assert "odd name?&lt;b&gt;.webp" in html and "<b>.webp" not in html
    assert "broken.jpg" in html and "not_an_image: looks like HTML/XML text" in html
    assert "caption_objects" in html and "&#34;shape&#34;" in html
