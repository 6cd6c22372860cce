"""Resume at scale: a small new input against a sink that already holds millions of done ids.

For each size (fabricated id-only sinks: parquet files of `--rows-per-file` ids each under
<sink>/captions, plus the run record the resume preflight checks) and each method, in a fresh
process with its own local Ray:

* ``hashes`` (capjob now): resume.prepare reads the ids file by file into sorted 64-bit
  hashes (stages/ids.DoneIds), placed once in the object store; the id stage maps them.
* ``frozenset`` (capjob before, issue 18): a Python frozenset of the id strings on the driver,
  carried in the id stage's arguments, so every task process unpickles its own copy.
* ``ray_checkpoint`` (Ray Data's CheckpointConfig loader): the array Ray builds from the same
  ids with its own ``convert_and_sort_checkpointed_ids`` task (an object array for string ids),
  and the memory each CheckpointFilter actor then asks for -- the load step only (capjob's ids
  are derived after the read, so the filter itself cannot run on them; stages/resume.py).

Measured: seconds from the process start (before Ray) to the first row past the id/skip stage
(the engine's start, 60-90 s on CPU, would dominate "first engine batch" and is the same for
every method), the driver's peak RSS, and the id stage task's RSS and USS at its first batch.
The new input (256 rows) holds 128 ids that are in the sink: every method must skip exactly those.

    python bench/resume_bench.py --sizes 5000000 20000000 --methods hashes frozenset ray_checkpoint
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import subprocess
import sys
import tempfile
import time

NEW_ROWS = 256
DONE_IN_INPUT = 128


def input_rows():
    from capjob.stages.ids import row_id

    keys = [f"new-{i:05d}" for i in range(NEW_ROWS)]
    images = [f"image-{i}".encode() * 8 for i in range(NEW_ROWS)]
    return keys, images, [row_id(k, b) for k, b in zip(keys, images)]


def fabricate(root: pathlib.Path, size: int, rows_per_file: int) -> pathlib.Path:
    """<root>/sink-<size>: `size` done ids (the first DONE_IN_INPUT of the new input among them)
    in parquet files of `rows_per_file`, and the input folder next to it."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = root / f"sink-{size}"
    marker = sink / ".complete"
    keys, images, ids = input_rows()
    if not marker.exists():
        (sink / "captions").mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(size)
        for start in range(0, size, rows_per_file):
            n = min(rows_per_file, size - start)
            digests = rng.integers(0, 2**47, n)
            chunk = [f"{start + j:012d}#{d:012x}" for j, d in enumerate(digests.tolist())]
            if start == 0:
                chunk[:DONE_IN_INPUT] = ids[:DONE_IN_INPUT]
            pq.write_table(pa.table({"id": pa.array(chunk, pa.string())}), sink / "captions" / f"fab-{start:012d}.parquet")
        marker.write_text("ok")
    data = root / "input"
    if not data.exists():
        data.mkdir()
        pq.write_table(pa.table({"key": keys, "image": pa.array(images, pa.binary())}), data / "part-0.parquet")
    return sink


def child(args: argparse.Namespace) -> None:
    """One measurement, in its own process (peak RSS is per process)."""
    t0 = time.monotonic()
    import numpy as np
    import psutil
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    from capjob import metrics
    from capjob.stages import resume
    from capjob.config import CapjobConfig, DataConfig, SinkConfig, SourceFormat
    from capjob.schema import CAPTIONS
    from capjob.stages.tables import TableWriter
    from capjob.stages import ids

    sink = SinkConfig(path=args.sink)
    cfg = CapjobConfig(sink=sink, data=DataConfig(format=SourceFormat.parquet, path=args.input, key_column="key", image_column="image"))
    cfg.model.builder = "bench"
    result: dict = {"method": args.method, "done_ids": args.size}
    resume.record_settings(sink, "fabricated", resume.caption_settings(cfg, "/bench/model"))
    if args.method == "hashes":
        done = resume.prepare(cfg, "bench", "/bench/model")
        result["id_set_bytes"] = int(done.hashes.nbytes)
    elif args.method == "frozenset":
        writer = TableWriter(sink)
        done_set: set = set()
        for name in writer.list_files(CAPTIONS):
            done_set.update(pq.read_table(name, columns=["id"]).column("id").to_pylist())
        frozen = frozenset(done_set)
        del done_set
    result["loaded_s"] = round(time.monotonic() - t0, 2)

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=2 * 2**30)
    ledger = metrics.start_ledger("bench", "bench")  # noqa: F841 - held: an unreferenced actor is destroyed

    if args.method == "ray_checkpoint":
        from ray.data.checkpoint.checkpoint_filter import convert_and_sort_checkpointed_ids
        from ray.data.checkpoint.interfaces import CheckpointConfig

        table = ray.data.read_parquet(f"{args.sink}/captions", columns=["id"]).to_arrow_refs()
        merged = pa.concat_tables(ray.get(table))
        del table
        ref, size_ref = convert_and_sort_checkpointed_ids.remote(merged, "id")
        size = ray.get(size_ref)
        result["loaded_s"] = round(time.monotonic() - t0, 2)
        result["id_set_bytes"] = int(size)
        # What Ray asks for each CheckpointFilter actor (plan_read_op: CHECKPOINT_MEMORY_SAFETY_FACTOR).
        from ray.data._internal.planner.checkpoint import plan_read_op

        factor = getattr(plan_read_op, "CHECKPOINT_MEMORY_SAFETY_FACTOR", None)
        result["filter_actor_memory_request_bytes"] = int(max(CheckpointConfig.CHECKPOINT_ACTOR_MEMORY_BYTES, size * factor)) if factor else None

        @ray.remote
        def resolve(array_ref):
            import psutil as p

            before = p.Process().memory_full_info()
            array = ray.get(array_ref[0])
            after = p.Process().memory_full_info()
            return {"task_rss_bytes": after.rss, "task_uss_bytes": after.uss, "task_uss_growth_bytes": after.uss - before.uss,
                    "dtype": str(array.dtype), "n": int(array.size)}

        result.update(ray.get(resolve.remote([ref])))
        result["first_row_s"] = None
    else:
        def measured(batch, **kwargs):
            proc = psutil.Process()
            out = ids.assign_ids(batch, **kwargs) if args.method == "hashes" else old_assign_ids(batch, **kwargs)
            info = proc.memory_full_info()
            out["task_rss"] = np.full(len(out["id"]), info.rss, dtype=np.int64)
            out["task_uss"] = np.full(len(out["id"]), info.uss, dtype=np.int64)
            return out

        kwargs = {"image_column": "image", "key_column": "key", "run_id": "bench"}
        kwargs.update({"done": done.put()} if args.method == "hashes" else {"done_ids": frozen})
        ds = ray.data.read_parquet(args.input).map_batches(measured, batch_format="numpy", fn_kwargs=kwargs, batch_size=None)
        rows = []
        first = None
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            first = first or time.monotonic() - t0
            rows += list(batch["id"])
            result["task_rss_bytes"], result["task_uss_bytes"] = int(batch["task_rss"][0]), int(batch["task_uss"][0])
        result["first_row_s"] = round(first, 2)
        result["rows_out"] = len(rows)
        assert len(rows) == NEW_ROWS - DONE_IN_INPUT, len(rows)
    result["driver_peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    ray.shutdown()
    print("RESULT " + json.dumps(result), flush=True)


def old_assign_ids(batch, *, image_column, key_column, done_ids, run_id):
    """capjob's id stage before issue 18, with today's ids: a frozenset membership test."""
    from capjob.stages import ids

    row_ids, source_keys = ids.label_rows(batch, image_column, key_column)
    import numpy as np

    mask = np.asarray([i not in done_ids for i in row_ids], dtype=bool)
    out = {k: np.asarray(v, dtype=object)[mask] for k, v in batch.items()}
    out["id"] = np.asarray(row_ids, dtype=object)[mask]
    out["source_key"] = np.asarray(source_keys, dtype=object)[mask]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[5_000_000, 20_000_000])
    parser.add_argument("--methods", nargs="+", default=["hashes", "frozenset", "ray_checkpoint"])
    parser.add_argument("--rows-per-file", type=int, default=10_000)
    parser.add_argument("--root", default=os.path.join(tempfile.gettempdir(), "capjob-resume-bench"))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--sink", help=argparse.SUPPRESS)
    parser.add_argument("--input", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    root = pathlib.Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    results = []
    for size in args.sizes:
        t = time.monotonic()
        sink = fabricate(root, size, args.rows_per_file)
        print(f"sink of {size:,} done ids: {sink} ({time.monotonic() - t:.0f} s to fabricate or find)", flush=True)
        for method in args.methods:
            proc = subprocess.run([sys.executable, __file__, "--child", "--method", method, "--size", str(size),
                                   "--sink", str(sink), "--input", str(root / "input")], capture_output=True, text=True)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                print(f"{method} @ {size:,}: failed (rc {proc.returncode})\n{proc.stderr[-3000:]}", flush=True)
                continue
            r = json.loads(line[7:])
            results.append(r)
            mib = lambda v: f"{v / 2**20:,.0f}" if v else "-"  # noqa: E731
            print(f"{method:>14} @ {size:>11,}: loaded {r['loaded_s']:>6} s, first row {r.get('first_row_s') or '-':>6} s, "
                  f"driver peak RSS {mib(r['driver_peak_rss_bytes'])} MiB, id set {mib(r.get('id_set_bytes'))} MiB, "
                  f"task RSS {mib(r.get('task_rss_bytes'))} MiB / USS {mib(r.get('task_uss_bytes'))} MiB"
                  + (f", filter actor asks {mib(r['filter_actor_memory_request_bytes'])} MiB" if r.get("filter_actor_memory_request_bytes") else ""),
                  flush=True)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
