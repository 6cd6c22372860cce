"""Reading throughput per input layout (issue 3): rows/s of capjob's read stage alone.

Generates ``--images`` small JPEGs (drawn gradients, 160 x 120, ~3-4 KB each), writes them in
every layout capjob reads -- parquet (HF-style ``image`` = {bytes, path} struct), HF
``save_to_disk``, an HF hub-style parquet folder read streaming, an image folder, webdataset tar
shards -- locally and, for the file layouts, into a bucket of a local S3-compatible server
(moto, as in the tests). Then, for each, it times ``capjob.stages.sources.read_source`` + iterating the
whole dataset in Ray (every image's bytes are touched; no decoding, no inference) on a local Ray
with ``--cpus`` CPUs, ``--repeats`` times, and prints a markdown table (median of the repeats).

Usage::

    python bench/read_bench.py                          # 2000 images, 3 repeats
    python bench/read_bench.py --images 16 --repeats 1  # smoke run
    python bench/read_bench.py --json read.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import platform
import shlex
import statistics
import sys
import tempfile
import time
import uuid

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the layout writers and the S3 server of the tests

from helpers.iolayouts import (make_rows, upload, write_hf_parquet_dir, write_hf_save_to_disk,  # noqa: E402
                       write_image_folder, write_parquet, write_webdataset)
from helpers.s3server import S3Server  # noqa: E402


def layouts(rows, root: pathlib.Path, shards: int) -> dict[str, tuple[pathlib.Path, dict]]:
    """name -> (local path, DataConfig kwargs)."""
    return {
        "parquet": (write_parquet(rows, root / "parquet", files=shards), dict(format="parquet", key_column="key", passthrough_columns=["label"])),
        "hf save_to_disk": (write_hf_save_to_disk(rows, root / "hf_disk", shards=shards), dict(format="hf", key_column="key", passthrough_columns=["label"])),
        "hf parquet folder, streaming": (write_hf_parquet_dir(rows, root / "hf_parquet", shards=shards),
                                         dict(format="hf", streaming=True, key_column="key", passthrough_columns=["label"])),
        "image_folder": (write_image_folder(rows, root / "image_folder", subdirs=shards), dict(format="image_folder")),
        "webdataset": (write_webdataset(rows, root / "webdataset", shards=shards), dict(format="webdataset", passthrough_columns=["cls"])),
    }


def time_read(path: str, kwargs: dict) -> tuple[int, int, float]:
    """(rows, image bytes, seconds) of read_source + a full iteration."""
    from capjob.config import DataConfig, SourceFormat
    from capjob.stages.sources import read_source

    t0 = time.perf_counter()
    source = read_source(DataConfig(path=path, **{**kwargs, "format": SourceFormat(kwargs["format"])}))
    rows = nbytes = 0
    for batch in source.dataset.iter_batches(batch_size=256, batch_format="pyarrow"):
        rows += batch.num_rows
        column = batch.column(source.image_column)
        if isinstance(column.type, __import__("pyarrow").StructType):
            column = column.combine_chunks().field("bytes")
        nbytes += sum(len(b) for b in column.to_pylist() if b)
    return rows, nbytes, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--shards", type=int, default=8, help="files/shards per layout")
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 2, help="CPUs of the local Ray")
    parser.add_argument("--no-s3", action="store_true", help="local layouts only")
    parser.add_argument("--json", type=pathlib.Path, help="write the results here")
    args = parser.parse_args(argv)

    import ray

    rows = make_rows(args.images, seed=0, size=(160, 120), formats=("jpg",))
    image_bytes = sum(len(b) for _, b, _ in rows)
    results = []
    with tempfile.TemporaryDirectory(prefix="capjob-read-bench-") as tmp:
        root = pathlib.Path(tmp)
        written = layouts(rows, root, args.shards)
        server = None if args.no_s3 else S3Server().start()
        try:
            cases = [(name, "local", str(path), kw) for name, (path, kw) in written.items()]
            if server:
                os.environ.update(server.env())  # the standard AWS variables, inherited by Ray's workers
                import datasets

                datasets.config.HF_DATASETS_CACHE = str(root / "hf-cache")
                bucket = server.bucket(f"bench-{uuid.uuid4().hex[:8]}")
                for name in ("parquet", "image_folder", "webdataset"):
                    path, kw = written[name]
                    cases.append((name, "S3 (moto, 127.0.0.1)", upload(path, server.fs, f"s3://{bucket}/{path.name}"), kw))
            ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
            ray.data.DataContext.get_current().enable_progress_bars = False
            logging.getLogger("ray.data").setLevel(logging.WARNING)
            for name in ("parquet", "hf save_to_disk"):  # warm-up: workers started, `datasets` imported
                time_read(str(written[name][0]), written[name][1])
            for name, where, path, kw in cases:
                runs = [time_read(path, kw) for _ in range(args.repeats)]
                n, nbytes, _ = runs[0]
                assert n == args.images and nbytes == image_bytes, (name, where, n, nbytes)
                seconds = statistics.median(r[2] for r in runs)
                results.append({"layout": name, "where": where, "rows": n, "seconds": round(seconds, 3),
                                "rows_per_s": round(n / seconds, 1), "MB_per_s": round(nbytes / seconds / 1e6, 2)})
                print(f"{name:<30} {where:<22} {n} rows in {seconds:.2f} s: {n / seconds:,.0f} rows/s", flush=True)
            ray.shutdown()
        finally:
            if server:
                server.stop()

    report = {
        "command": "python bench/read_bench.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
        "images": args.images, "image_kb_mean": round(image_bytes / len(rows) / 1024, 1), "repeats": args.repeats,
        "shards": args.shards, "ray_cpus": args.cpus, "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "rows": results,
    }
    print()
    print(f"{args.images} JPEGs of {report['image_kb_mean']} KB on average, {args.shards} files/shards per layout, "
          f"local Ray with {args.cpus} CPUs ({report['machine']}); median of {args.repeats} read(s):")
    print()
    print("| layout | where | rows | seconds | rows/s | MB/s |")
    print("|---|---|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['layout']} | {r['where']} | {r['rows']} | {r['seconds']:.2f} | {r['rows_per_s']:,.0f} | {r['MB_per_s']:.1f} |")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
