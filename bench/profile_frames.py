"""Where one thread of a py-spy profile spends its time: the innermost frames (self) and the
inclusive share of frames that matter for a vLLM engine (issue 22). Reads py-spy's raw format
(`py-spy record --format raw --threads`, as bench/gpu_bench.py's Profiler writes it).

    python3 bench/profile_frames.py WORK/profiles/capjob-rpg2-enginecore0.txt [...] [--duration 15 --rate 100]

Per file: the busiest thread among the engine core's main thread and the Ray Data actor's event
loop (run_loop), its busy share (samples / (duration x rate)), its top self frames (function,
file and line) and the inclusive share of KEY frames (the largest match of each).
"""

from __future__ import annotations

import argparse
import collections
import re
from typing import Any

# Frames named in docs/benchmarks.md's issue 22 section: the engine core's step (the encoder input
# batching, the vision encoder, the language model, the scheduler, sampling) and the front-end's
# input processing (HF image processor), output processing (detokenizer) and stat logging.
KEY = ("_reduce_data", "group_and_batch_mm_kwargs", "execute_mm_encoder", "embed_multimodal", "Qwen2Model.forward",
       "Scheduler.schedule", "update_from_output", "prepare_inputs", "Sampler", "process_inputs", "process_outputs",
       "_call_hf_processor", "decode_next", "StatLoggerManager.record", "Metric._record", "_generate_async")
THREADS = ("MainThread", "run_loop")


def _short(frame: str) -> str:
    return re.sub(r"\(/.*/(site-packages|python3\.\d+)/", "(", frame)


def analyze(text: str, duration: float = 15.0, rate: int = 100, top: int = 16) -> dict[str, Any]:
    """{'thread', 'samples', 'busy', 'self': [(frame with line, share)], 'incl': {key: (frame, share)}}
    for the busiest MainThread / run_loop thread of one raw profile."""
    stacks: dict[str, list[tuple[list[str], int]]] = collections.defaultdict(list)
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        if not count.isdigit() or not frames[0].startswith("thread") or not any(t in frames[0] for t in THREADS):
            continue
        stacks[frames[0]].append((frames[1:], int(count)))
    if not stacks:
        return {"thread": None, "samples": 0, "busy": 0.0, "self": [], "incl": {}}
    thread = max(stacks, key=lambda t: sum(n for _, n in stacks[t]))
    incl: collections.Counter = collections.Counter()
    own: collections.Counter = collections.Counter()
    total = 0
    for frames, n in stacks[thread]:
        total += n
        names = {re.sub(r":\d+\)$", ")", _short(f)) for f in frames}
        for name in names:
            incl[name] += n
        if frames:
            own[_short(frames[-1])] += n
    keys = {}
    for key in KEY:
        hits = [(name, c) for name, c in incl.items() if key in name]
        if hits:
            name, c = max(hits, key=lambda x: x[1])
            keys[key] = (name, round(c / total, 3))
    return {"thread": thread, "samples": total, "busy": round(total / (duration * rate), 3),
            "self": [(f, round(c / total, 3)) for f, c in own.most_common(top)], "incl": keys}


def render(path: str, result: dict[str, Any]) -> str:
    lines = [f"== {path}: {result['thread']}, {result['samples']} samples, busy {result['busy']}"]
    lines += [f"  self {share:.3f} {frame[:150]}" for frame, share in result["self"]]
    lines += [f"  incl {share:.3f} {frame[:120]}" for frame, share in result["incl"].values()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("profiles", nargs="+")
    parser.add_argument("--duration", type=float, default=15.0, help="the profile's seconds (gpu_bench --profile)")
    parser.add_argument("--rate", type=int, default=100, help="py-spy's samples per second")
    args = parser.parse_args()
    for path in args.profiles:
        with open(path, errors="replace") as f:
            print(render(path, analyze(f.read(), args.duration, args.rate)))


if __name__ == "__main__":
    main()
