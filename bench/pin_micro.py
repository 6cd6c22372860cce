"""Issue 22: why vLLM's batching of a step's images for the vision encoder costs ~6.4 ms an image
on the lent H200 (py-spy, 2026-12-03: 78 % of the engine core in MultiModalFlatField._reduce_data,
`torch.concat(batch, out=torch.empty(..., pin_memory=True))`, vllm/multimodal/inputs.py:571).

Replays that code outside vLLM: each "step" takes n images' pixel values (256 patches x 1176
float32 = 1.2 MB each, Qwen2.5-VL at 225x225, each a tensor over its own received buffer, as
vLLM's msgpack decoder makes them), allocates the output (pinned or not), concatenates, and
copies it to the GPU non_blocking (vLLM's _nested_tensors_h2d). n follows one fixed random
sequence (1..160 images a step), so the pinned sizes vary as in the engine. Times are CPU
wall time of each part, per image, split into the first steps (cold allocator) and the rest.

    python3 bench/pin_micro.py            # every configuration, one subprocess each (its env)
    python3 bench/pin_micro.py --one      # the current process's configuration only
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

PATCHES, DIM = 256, 1176
STEPS, COLD = 60, 5

CONFIGS = {  # name -> (env additions, torch threads or None)
    "default": ({}, None),
    "threads1": ({}, 1),
    "bg_threads": ({"PYTORCH_ALLOC_CONF": "pinned_use_background_threads:True"}, None),
    "host_register": ({"PYTORCH_CUDA_ALLOC_CONF": "pinned_use_cuda_host_register:True,pinned_num_register_threads:8"}, None),
}


def one(threads: int | None) -> dict:
    import random

    import torch

    if threads:
        torch.set_num_threads(threads)
    dev = torch.device("cuda")
    torch.zeros(1, device=dev)
    rng = random.Random(0)
    sizes = [rng.randint(1, 160) for _ in range(STEPS)]
    raw = torch.randn(PATCHES, DIM).numpy().tobytes()
    # One buffer per image, as received (vLLM: torch.frombuffer over the zmq frame).
    srcs = [torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(torch.float32).view(PATCHES, DIM) for _ in range(160)]
    out = {"torch_threads": torch.get_num_threads()}
    for pin in (True, False):
        alloc, cat, h2d, imgs = [], [], [], []
        for n in sizes:
            batch = srcs[:n]
            t0 = time.perf_counter()
            buf = torch.empty((n * PATCHES, DIM), dtype=torch.float32, pin_memory=pin)
            t1 = time.perf_counter()
            torch.concat(batch, dim=0, out=buf)
            t2 = time.perf_counter()
            g = buf.to(dev, non_blocking=True)
            t3 = time.perf_counter()
            torch.cuda.synchronize()
            del g, buf
            alloc.append(t1 - t0), cat.append(t2 - t1), h2d.append(t3 - t2), imgs.append(n)

        def per_img(xs: list[float], sl: slice) -> float:
            return round(1e3 * sum(xs[sl]) / sum(imgs[sl]), 3)

        for part, sl in (("cold", slice(0, COLD)), ("warm", slice(COLD, None))):
            out[f"{'pinned' if pin else 'pageable'}_{part}"] = {
                "alloc_ms_per_img": per_img(alloc, sl), "concat_ms_per_img": per_img(cat, sl), "h2d_launch_ms_per_img": per_img(h2d, sl),
                "total_ms_per_img": round(per_img(alloc, sl) + per_img(cat, sl) + per_img(h2d, sl), 3)}
    return out


def main() -> None:
    if "--one" in sys.argv:
        name = os.environ.get("PIN_MICRO_CONFIG", "default")
        print("PIN_MICRO", json.dumps({"config": name, **one(CONFIGS[name][1])}), flush=True)
        return
    for name, (env, _) in CONFIGS.items():
        t = time.time()
        proc = subprocess.run([sys.executable, __file__, "--one"], env={**os.environ, **env, "PIN_MICRO_CONFIG": name},
                              capture_output=True, text=True, timeout=120)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("PIN_MICRO")), None)
        print(line or f"PIN_MICRO {name} failed ({proc.returncode}): {proc.stderr[-600:]}", f"({time.time() - t:.1f} s)", flush=True)


if __name__ == "__main__":
    main()
