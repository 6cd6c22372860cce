"""The checkpoint leaderboard of `capjob-watch` (capjob/watch.py): one row per checkpoint of a
training run, in training-step order, with its scores on the golden set.

    leaderboard.md    the table, the best checkpoint named above it, failed checkpoints with their reason
    leaderboard.csv   the same rows, one column per field (ROW_FIELDS)
    leaderboard.png   the score against the training step; the best checkpoint starred, failed ones as x

A row is a plain dict (the watcher keeps it in <sink>/watch/state.json): `checkpoint`, `step`,
`status` ("succeeded" | "failed"), `error`, the scores of eval.json (`exact_match`, `word_f1`,
`bleu4`, `cider` against eval.reference_column; `judge_mean_score` with eval=judge) and the
run's counts. `row_from_job` builds one from a finished job's folder (sweep_report.load_job).
Quality order, as the sweep's checkpoint comparison: exact match, then word F1; without a
reference, the judge's mean score.
"""

from __future__ import annotations

import io
from typing import Any, Optional

from capjob.errors import first_line
from capjob.reporting.sweep_report import Job, csv_text, fmt_value, md_cell

LEADERBOARD_MD, LEADERBOARD_CSV, LEADERBOARD_PNG = "leaderboard.md", "leaderboard.csv", "leaderboard.png"
SCORES = ("exact_match", "word_f1", "bleu4", "cider", "judge_mean_score")
ROW_FIELDS = ["step", "checkpoint", "status", "best", *SCORES, "eval_captions", "captioned", "quarantined", "rows_per_second",
              "seconds", "complete_at", "finished_at", "lag_s", "fingerprint", "path", "run_id", "output", "error"]


def row_from_job(job: Optional[Job]) -> dict[str, Any]:
    """The leaderboard fields of a finished job (status, error, scores, counts). A job that
    succeeded but captioned nothing (every row quarantined: the engine died on each batch, every
    image rejected) is a failed checkpoint, its reason the quarantine's reasons."""
    if job is None:
        return {"status": "failed", "error": "the job left no record (killed before it started?)"}
    row: dict[str, Any] = {"status": "succeeded" if job.status == "succeeded" else "failed", "error": job.error,
                           "run_id": job.record.get("run_id"), "output": job.record.get("output")}
    for key in ("captioned", "quarantined", "rows_per_second"):
        row[key] = job.metric(key)
    evaluation = job.evaluation or {}
    reference = evaluation.get("reference") or {}
    row.update(eval_captions=evaluation.get("count"), exact_match=(reference.get("exact_match") or {}).get("share"),
               word_f1=reference.get("word_f1"), bleu4=reference.get("bleu4"), cider=reference.get("cider"),
               judge_mean_score=(evaluation.get("judge") or {}).get("mean_score"))
    if row["status"] == "succeeded" and not row["captioned"]:
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(((job.report or {}).get("quarantined_by_reason") or {}).items()))
        row.update(status="failed", error=f"no caption: all {row['quarantined'] or 0} rows quarantined ({reasons or 'no reason recorded'})")
    return row


def quality(row: dict[str, Any]) -> Optional[tuple[float, ...]]:
    """The row's rank key (higher is better), None when it has no score."""
    if row.get("status") != "succeeded":
        return None
    if row.get("exact_match") is not None:
        return (float(row["exact_match"]), float(row.get("word_f1") or 0.0))
    if row.get("judge_mean_score") is not None:
        return (float(row["judge_mean_score"]),)
    return None


def best_row(rows: list[dict[str, Any]]) -> Optional[dict[str, Any]]:
    """The best-scored row; among equals the earliest step (the cheaper checkpoint to keep)."""
    scored = [r for r in rows if quality(r) is not None]
    return max(scored, key=lambda r: (quality(r), -int(r.get("step") or 0))) if scored else None


def ordered(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows in training order (step, then name)."""
    return sorted(rows, key=lambda r: (int(r.get("step") or 0), str(r.get("checkpoint"))))


def _metric_label(rows: list[dict[str, Any]]) -> tuple[str, str]:
    if any(r.get("exact_match") is not None for r in rows):
        return "exact_match", "exact match"
    return "judge_mean_score", "judge mean score"


def csv_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    best = best_row(rows)
    return [{**r, "best": r is best} for r in ordered(rows)]


def markdown(rows: list[dict[str, Any]], title: str) -> str:
    best = best_row(rows)
    failed = [r for r in rows if r.get("status") != "succeeded"]
    lines = [f"# capjob-watch leaderboard `{title}`", "",
             f"{len(rows)} checkpoint{'' if len(rows) == 1 else 's'}: {len(rows) - len(failed)} evaluated, {len(failed)} failed.", ""]
    if best is not None:
        lines += [f"**Best checkpoint: {best['checkpoint']}** (step {best['step']}): " + ", ".join(
            f"{label} {fmt_value(best.get(key))}" for key, label in (("exact_match", "exact match"), ("word_f1", "word F1"),
                                                                 ("judge_mean_score", "judge mean score")) if best.get(key) is not None) + ".", ""]
    elif rows:
        lines += ["No checkpoint has a score yet (eval.reference_column or eval=judge gives one).", ""]
    lines += ["| | step | checkpoint | exact match | word F1 | BLEU-4 | CIDEr-D | judge | captioned | quarantined | rows/s | lag s | status |",
              "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in ordered(rows):
        cells = ["★ best" if r is best else "", md_cell(r.get("step")), md_cell(r.get("checkpoint")),
                 *[md_cell(r.get(k)) for k in SCORES], md_cell(r.get("captioned")), md_cell(r.get("quarantined")),
                 md_cell(r.get("rows_per_second")), md_cell(r.get("lag_s")), md_cell(r.get("status"))]
        lines.append("| " + " | ".join(cells) + " |")
    if failed:
        lines += ["", "## Failed checkpoints", "", "| step | checkpoint | reason |", "|---:|---|---|"]
        lines += [f"| {md_cell(r.get('step'))} | {md_cell(r.get('checkpoint'))} | {md_cell(first_line(r.get('error'), 300))} |" for r in ordered(failed)]
    lines += ["", f"![score against training step]({LEADERBOARD_PNG})", ""]
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]]) -> bytes:
    """The score against the training step: one line per score (exact match and word F1, or the
    judge's mean), the best checkpoint starred, failed checkpoints as red x on the axis."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 3.6))
    ax = fig.subplots()
    ok = [r for r in ordered(rows) if quality(r) is not None]
    key, label = _metric_label(rows)
    series = [(key, label)] + ([("word_f1", "word F1")] if key == "exact_match" else [])
    for name, text in series:
        points = [(r["step"], r[name]) for r in ok if r.get(name) is not None]
        if points:
            ax.plot(*zip(*points), marker="o", label=text)
    best = best_row(rows)
    if best is not None and best.get(key) is not None:
        ax.scatter([best["step"]], [best[key]], marker="*", s=260, color="tab:orange", zorder=4, label=f"best: {best['checkpoint']}")
    failed = [r for r in rows if r.get("status") != "succeeded"]
    if failed:
        ax.scatter([r.get("step") or 0 for r in failed], [0] * len(failed), marker="x", color="tab:red", zorder=3, label="failed")
    if not ok:
        ax.text(0.5, 0.5, "no scored checkpoint yet", transform=ax.transAxes, ha="center", va="center")
    ax.set_xlabel("training step")
    ax.set_ylabel("score" if key == "exact_match" else label)
    if key == "exact_match":
        ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3)
    if ok or failed:
        ax.legend(loc="best", fontsize="small")
    fig.suptitle("capjob-watch: golden-set score by checkpoint")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def render(rows: list[dict[str, Any]], title: str) -> dict[str, bytes]:
    """{file name: content} of the three leaderboard files."""
    return {LEADERBOARD_MD: markdown(rows, title).encode(), LEADERBOARD_CSV: csv_text(ROW_FIELDS, csv_rows(rows)).encode(),
            LEADERBOARD_PNG: plot(rows)}
