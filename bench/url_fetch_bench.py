"""URL lists at scale (issue 17, case 7): one block of an img2dataset-style URL list fetched the
old way (one fsspec request after the other, no timeout, no retry) and the new way
(stages.sources.cells.Fetcher: a thread pool, connect/read timeouts, bounded retries of
transient errors, a User-Agent), side by side, against a local HTTP server on 127.0.0.1
(tests/helpers/httpserver.py) whose URLs are a mix of what real lists hold:

    ok        the image after `--latency` s (a remote host's round trip)
    slow      the image after `--slow` s
    flaky     503 twice, then the image
    404, 403  gone / denied
    loop      a redirect loop
    html      200 with an HTML page instead of an image

It prints rows/s (every URL is a row: captioned or quarantined), images fetched and the
reasons of the others, old vs new. Nothing is timed in the tests; this is a measurement.

    python bench/url_fetch_bench.py --urls 400 --json /tmp/url_fetch.json
"""

from __future__ import annotations

import argparse
import collections
import json
import pathlib
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "src"), str(REPO / "tests")]

from helpers.httpserver import LocalHTTPServer  # noqa: E402
from helpers.iolayouts import make_rows  # noqa: E402

from capjob.config import FetchConfig, ImagesConfig  # noqa: E402
from capjob.schema import ImageRejected  # noqa: E402
from capjob.stages.images import decode_image  # noqa: E402
from capjob.stages.sources.cells import Fetcher  # noqa: E402

MIX = [("ok", 0.70), ("slow", 0.05), ("flaky", 0.05), ("404", 0.05), ("403", 0.05), ("loop", 0.05), ("html", 0.05)]


def url_list(base: str, count: int, latency: float, slow: float, names: list[str]) -> list[tuple[str, str]]:
    out = []
    for i in range(count):
        # Spread the kinds evenly through the list, as they come in a real one.
        position = (i * 0.6180339887) % 1.0
        acc = 0.0
        for kind, share in MIX:
            acc += share
            if position < acc:
                break
        name = names[i % len(names)]
        url = {
            "ok": f"{base}/slow/{latency}/{name}/{i}",
            "slow": f"{base}/slow/{slow}/{name}/{i}",
            "flaky": f"{base}/flaky/2/{name}/{i}",
            "404": f"{base}/status/404/{i}",
            "403": f"{base}/status/403/{i}",
            "loop": f"{base}/loop/{i}",
            "html": f"{base}/html/{i}",
        }[kind]
        out.append((kind, url))
    return out


def outcome(result: bytes | ImageRejected) -> str:
    """'image' or the quarantine reason without the URL."""
    if isinstance(result, ImageRejected):
        return result.reason.split(": http", 1)[0]
    try:
        decode_image(result, ImagesConfig(size=64))
        return "image"
    except ImageRejected as e:
        return e.reason


def old_fetch(urls: list[str]) -> list[bytes | ImageRejected]:
    """What capjob did before: fsspec.open(url).read() per cell, in order, no timeout or retry."""
    import fsspec

    out: list[bytes | ImageRejected] = []
    for url in urls:
        try:
            with fsspec.open(url, "rb") as f:
                out.append(f.read())
        except Exception as e:  # noqa: BLE001 - as the old image stage caught it
            out.append(ImageRejected("fetch", f"{type(e).__name__}: {str(e)[:60]}"))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--urls", type=int, default=400)
    parser.add_argument("--latency", type=float, default=0.05, help="seconds before an ok URL answers")
    parser.add_argument("--slow", type=float, default=2.0, help="seconds before a slow URL answers")
    parser.add_argument("--concurrency", type=int, default=FetchConfig.concurrency)
    parser.add_argument("--json", type=pathlib.Path)
    args = parser.parse_args()

    rows = make_rows(8, seed=1, size=(320, 240))
    with LocalHTTPServer({n: b for n, b, _ in rows}) as http:
        urls = url_list(http.url, args.urls, args.latency, args.slow, [n for n, _, _ in rows])
        kinds = collections.Counter(k for k, _ in urls)
        results = {}
        for name, fetch in (
            ("old: sequential fsspec", old_fetch),
            ("new: Fetcher", Fetcher(fetch=FetchConfig(concurrency=args.concurrency, backoff_s=0.1)).get_many),
        ):
            http.requests.clear()
            started = time.perf_counter()
            got = fetch([u for _, u in urls])
            seconds = time.perf_counter() - started
            results[name] = {"seconds": round(seconds, 2), "rows_per_s": round(len(urls) / seconds, 1),
                             "outcomes": collections.Counter(outcome(g) for g in got), "requests": sum(http.requests.values())}

    old, new = results.values()
    print(f"{args.urls} URLs ({', '.join(f'{k} {v}' for k, v in kinds.items())}); ok answers after {args.latency} s, slow after {args.slow} s\n")
    print("| | old: sequential fsspec | new: Fetcher (concurrency %d) |" % args.concurrency)
    print("|---|---|---|")
    print(f"| wall s | {old['seconds']} | {new['seconds']} |")
    print(f"| rows/s | {old['rows_per_s']} | {new['rows_per_s']} ({new['rows_per_s'] / old['rows_per_s']:.1f}x) |")
    print(f"| HTTP requests | {old['requests']} | {new['requests']} |")
    for reason in sorted(set(old["outcomes"]) | set(new["outcomes"]), key=lambda r: (r != "image", r)):
        print(f"| {reason} | {old['outcomes'].get(reason, 0)} | {new['outcomes'].get(reason, 0)} |")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "kinds": kinds, "results": results}, indent=2, default=dict))


if __name__ == "__main__":
    main()
