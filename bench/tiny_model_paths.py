#!/usr/bin/env python3
"""The tiny offline model's captions on the same shape scenes along each path: transformers,
vLLM's LLM.chat alone, and capjob's pipeline with Ray Data LLM's chat template content format
"string" (a newline after the image) and with capjob's default ("auto": vLLM's own choice).

Prints the wrong captions of each path out of --scenes, and each path's ratio to vLLM alone.
Results: docs/benchmarks.md, "Tiny trained model" (issue 16). About 5 minutes on 2 cores.

    python bench/tiny_model_paths.py --scenes 100 --seed 11
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def vllm_alone(model: str, count: int, seed: int) -> list[str]:
    """LLM.chat with capjob's default prompts, greedy, in a child process (vLLM's engine)."""
    code = f"""
import io, json, sys
from PIL import Image
from vllm import LLM, SamplingParams
from capjob.config import CaptionConfig
from capjob.stages.sources.sample import shape_images
c = CaptionConfig()
llm = LLM(model={model!r}, dtype="float32", enforce_eager=True, max_model_len=4096,
          limit_mm_per_prompt={{"image": 1, "video": 0}}, kv_cache_memory_bytes=2**30)
def chat(data):
    image = Image.open(io.BytesIO(data)).convert("RGB")
    return [{{"role": "system", "content": c.system_prompt}},
            {{"role": "user", "content": [{{"type": "image_pil", "image_pil": image}}, {{"type": "text", "text": c.user_prompt}}]}}]
outs = llm.chat([chat(d) for _, d, _ in shape_images({count}, {seed})], SamplingParams(temperature=0, max_tokens=32))
print("CAPTIONS" + json.dumps([o.outputs[0].text.strip() for o in outs]))
"""
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=900)
    line = [x for x in proc.stdout.splitlines() if x.startswith("CAPTIONS")]
    assert line, proc.stderr[-3000:]
    return json.loads(line[0][len("CAPTIONS"):])


def capjob(model: str, data: Path, out: Path, *overrides: str) -> list[str]:
    """capjob experiment=offline over the scenes' parquet; captions in source order."""
    import pyarrow.parquet as pq

    proc = subprocess.run([sys.executable, "-m", "capjob", "experiment=offline", "data.format=parquet", f"data.path={data}",
                           "data.name=shapes", f"model.source={model}", f"sink.path={out}/out", f"hydra.run.dir={out}/run",
                           *overrides], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = pq.read_table(out / "out" / "captions").to_pylist()
    by_name = {r["source_key"]: r["caption"].strip() for r in rows}
    return [by_name[f"shapes_{i:05d}.png"] for i in range(len(rows))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenes", type=int, default=100)
    parser.add_argument("--seed", type=int, default=11)
    args = parser.parse_args()

    import torch
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    from capjob import models
    from capjob.models import shapes, train
    from capjob.stages.sources.sample import shape_images, write_hf_parquet

    model = models.resolve_model_source(None, models.TINY_QWEN25VL)
    scenes = shape_images(args.scenes, args.seed)
    references = [ref for _, _, ref in scenes]
    paths: dict[str, list[str]] = {}

    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(model, dtype=torch.float32).eval()
    # The same scenes as the PNGs (lossless), captioned as tests/models/test_models.py holds the model to.
    paths["transformers generate"] = train.greedy_captions(hf, AutoProcessor.from_pretrained(model), shapes.scenes(args.scenes, args.seed))
    paths["vLLM LLM.chat alone"] = vllm_alone(model, args.scenes, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        data.mkdir()
        write_hf_parquet([(name, d, "shapes") for name, d, _ in scenes], data / "part-0.parquet", references)
        paths['capjob, content format "string" (Ray Data LLM\'s default)'] = capjob(
            model, data, Path(tmp) / "string", "engine.chat_template_content_format=string")
        paths['capjob, content format "auto" (default)'] = capjob(model, data, Path(tmp) / "auto")

    wrong = {name: sum(c != r for c, r in zip(caps, references)) for name, caps in paths.items()}
    base = wrong["vLLM LLM.chat alone"]
    print(f"| path | wrong of {args.scenes} | / vLLM alone |")
    print("|---|--:|--:|")
    for name, n in wrong.items():
        print(f"| {name} | {n} | {n / base:.1f}x |" if base else f"| {name} | {n} | - |")


if __name__ == "__main__":
    main()
