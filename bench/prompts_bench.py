"""What a second prompt costs: the offline job (tiny model, vLLM CPU) with one prompt, then with
two prompts per image (caption.prompts), side by side on the same images.

Each contender runs as its own `capjob` subprocess (a fresh Ray and engine each). Both generate
exactly `--max-tokens` tokens per request (caption.ignore_eos), so the two-prompt run does twice
the decoding; what the bench shows is what the prompt side costs on top (the image is decoded
once per image, and its requests share one multimodal uuid, so vLLM's processor cache and
encoder cache serve the second). Reported per contender: the whole run's wall time and
images/s, and the vLLM engine operator's wall time (Ray Data's stats, start-up excluded).
Ratios two/one: > 1 costs more.

    python bench/prompts_bench.py --images 48 --max-tokens 16
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]


def run(name: str, overrides: list[str], out: pathlib.Path) -> dict:
    run_id = f"prompts-{name}"
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "capjob", "experiment=offline", f"sink.path={out / name}",
                           f"job.run_id={run_id}", *overrides], cwd=REPO, capture_output=True, text=True)
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    report = json.loads((out / name / "reports" / run_id / "report.json").read_text())
    engine = next(o for o in report["operators"] if "vLLMEngineStageUDF" in o["operator"])
    return {"name": name, "images": report["captioned"], "wall_s": round(wall, 1), "images_per_s": report["rows_per_second"],
            "engine_s": engine["wall_seconds"], "prompt_tokens": report["prompt_tokens"], "generated_tokens": report["generated_tokens"]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=48, help="generated sample images (plus the bundled photos)")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--out", type=pathlib.Path, default=None)
    args = parser.parse_args(argv)
    out = args.out or pathlib.Path(tempfile.mkdtemp(prefix="prompts-bench-"))
    common = [f"data.sample_size={args.images}", f"caption.max_tokens={args.max_tokens}", "caption.ignore_eos=true",
              "caption.temperature=0"]
    one = run("one", [*common, "caption.user_prompt='Describe this image briefly.'"], out)
    two = run("two", [*common, "+caption.prompts.short='Describe this image briefly.'",
                      "+caption.prompts.detailed='Describe this image in detail.'"], out)
    print("| prompts | images | run wall s | images/s | engine operator s | prompt tokens | generated tokens |")
    print("|---|---|---|---|---|---|---|")
    for r in (one, two):
        print(f"| {r['name']} | {r['images']} | {r['wall_s']} | {r['images_per_s']} | {r['engine_s']} | {r['prompt_tokens']} | {r['generated_tokens']} |")
    print(f"ratio two/one, run wall time: {two['wall_s'] / one['wall_s']:.2f}x")
    print(f"ratio two/one, engine operator time: {two['engine_s'] / one['engine_s']:.2f}x")
    print(f"ratio two/one, generated tokens: {two['generated_tokens'] / max(1, one['generated_tokens']):.2f}x")


if __name__ == "__main__":
    main()
