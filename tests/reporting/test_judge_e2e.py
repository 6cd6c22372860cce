"""The judge pass end to end on CPU: Ray Data LLM + vLLM CPU with the tiny model as judge.

The tiny model's answers are noise: what is tested is that every caption gets exactly one judge
row, that an engine failure (a prompt longer than the judge's max_model_len) is counted rather
than crashing the pass, that the counts add up, and that eval.json / eval.md carry the judge.
"""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from capjob.config import (EngineConfig, EvalConfig, EvalMode, JudgeConfig, ModelConfig, ResourcesConfig, SinkConfig,
                           validate_eval)
from capjob.reporting.evaluation import evaluate_output
from capjob.reporting.judge import JUDGE_SCHEMA

pytestmark = pytest.mark.e2e

RUN = "run1"
# ~6000 characters: far more tokens than the judge's max_model_len (512), so the engine fails it.
TOO_LONG = " ".join(f"word{i} with a red boat near the {i % 7} hills" for i in range(160))
CAPTIONS = {
    "ok-1": "A small red boat rests on the sand of a quiet beach at sunset.",
    "ok-2": "A brown dog runs across a green field with a blue ball in its mouth.",
    "empty": "",
    "blank": "   \n ",
    "degenerate": "a cat a cat a cat a cat a cat a cat a cat a cat",
    "too-long": TOO_LONG,
}


def captions_table(captions: dict[str, str], run_id: str) -> pa.Table:
    ids = list(captions)
    return pa.table(
        {
            "id": ids,
            "source_key": [f"img/{i}.jpg" for i in ids],
            "caption": [captions[i] for i in ids],
            "prompt_tokens": [300] * len(ids),
            "generated_tokens": [len(captions[i].split()) for i in ids],
            "image_width": [448] * len(ids),
            "image_height": [336] * len(ids),
            "model": ["tiny_qwen25vl"] * len(ids),
            "run_id": [run_id] * len(ids),
        }
    )


@pytest.fixture
def local_ray():
    import ray

    # Logical CPUs above the 2 physical ones: every stage actor and the engine must fit.
    ray.init(num_cpus=8, include_dashboard=False)
    try:
        yield
    finally:
        ray.shutdown()


def test_judge_pass_scores_or_counts_every_caption(tmp_path, local_ray):
    out = tmp_path / "out"
    (out / "captions").mkdir(parents=True)
    pq.write_table(captions_table(CAPTIONS, RUN), out / "captions" / f"{RUN}-0.parquet")
    # Another run's caption in the same sink: judging run1 must leave it out.
    pq.write_table(captions_table({"other": "A cat sleeps on a windowsill."}, "run0"), out / "captions" / "run0-0.parquet")

    cfg = validate_eval(
        EvalConfig(
            name="judge",
            mode=EvalMode.judge,
            judge=JudgeConfig(model=ModelConfig(name="", builder="tiny_qwen25vl"), max_tokens=16,
                              engine=EngineConfig(max_model_len=512, cpu_kv_cache_gib=0.5, batch_size=4, limit_images_per_prompt=0,
                                                  enforce_eager=True, env_vars={"VLLM_ENABLE_V1_MULTIPROCESSING": "0"})),
        )
    )
    report_dir = tmp_path / "report"
    evaluation, written = evaluate_output(
        SinkConfig(path=str(out)), cfg, report_dir, run_id=RUN, max_tokens=32,
        resources=ResourcesConfig(preprocess_cpus=0.5, cpu_stage_cpus=0.25),
    )

    # One judge row per caption of the run, nothing else.
    table = pq.read_table(out / "evaluation" / f"judge-{RUN}.parquet")
    assert table.schema == JUDGE_SCHEMA
    assert sorted(table.column("id").to_pylist()) == sorted(CAPTIONS)
    assert set(table.column("run_id").to_pylist()) == {RUN}
    assert written["judge_table"].endswith(f"evaluation/judge-{RUN}.parquet")
    rows = {r["id"]: r for r in table.to_pylist()}

    # The over-long prompt is an engine failure, counted; every other caption got an answer.
    assert rows["too-long"]["status"] == "failed" and rows["too-long"]["error"]
    assert rows["too-long"]["score"] is None and not rows["too-long"]["parsed"]
    for key in set(CAPTIONS) - {"too-long"}:
        row = rows[key]
        assert row["status"] in ("parsed", "unparseable") and not row["error"]
        assert row["generated_tokens"] > 0 and row["raw"]
        assert row["parsed"] == (row["status"] == "parsed") == (row["score"] in (1, 2, 3, 4, 5))

    j = json.loads((report_dir / "eval.json").read_text())["judge"]
    assert j == evaluation.stats["judge"]
    assert j["count"] == len(CAPTIONS) == j["parsed"] + j["unparseable"] + j["failed"]
    assert j["failed"] == 1 and j["judged"] == len(CAPTIONS) - 1
    assert sum(j["histogram"].values()) == j["parsed"]
    assert (j["mean_score"] is None) == (j["parsed"] == 0)
    assert j["model"] == "tiny_qwen25vl" and j["run"] == RUN
    # The statistics half is there too, over the same 6 captions.
    assert evaluation.stats["count"] == len(CAPTIONS)

    md = (report_dir / "eval.md").read_text()
    assert md.count("## Judge") == 1 and "| engine failures | 1 (16.7%) |" in md
    assert "# Caption evaluation" in md  # after the statistics
    print("\n" + md)
