"""The sweep report: one table, csv and plot for a `capjob --multirun` directory.

Reads what each job left in its folder (<job>/sweep_job.json, report.json, eval.json: see
capjob.sweep) and writes sweep.csv, sweep.md (every job with its swept values and metrics, the
fastest first; a checkpoint table when a model key is swept; the caption evaluation side by
side) and sweep.png (rows/s against each swept parameter). `capjob-sweep-report DIR` rebuilds
them for a finished sweep; capjob.sweep.SweepReport writes them when a multirun ends.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from capjob.errors import first_line
from capjob.reporting.evaluation import compare_markdown

log = logging.getLogger(__name__)

JOB_RECORD = "sweep_job.json"
ERROR_TXT = "error.txt"
REPORT_JSON = "report.json"
EVAL_JSON = "eval.json"
SWEEP_CSV, SWEEP_MD, SWEEP_PNG = "sweep.csv", "sweep.md", "sweep.png"

METRICS = [
    ("rows_per_second", "rows/s"),
    ("generated_tokens_per_second", "gen tokens/s"),
    ("captioned", "captioned"),
    ("quarantined", "quarantined"),
    ("wall_seconds", "wall s"),
    ("images_per_gpu_hour", "images/GPU-h"),
    ("cost_per_1000_images", "cost/1k images"),
]


# reporting/report.price's fields, as sweep.csv columns.
PRICE_COLUMNS = ("gpus_held", "images_per_gpu_hour", "steady_images_per_gpu_hour", "gpu_hour_price", "cost_per_1000_images",
                 "steady_cost_per_1000_images")


def override_key(override: str) -> str:
    """`+engine.batch_size=8` -> `engine.batch_size`; `model=tiny_qwen25vl` -> `model`."""
    return override.split("=", 1)[0].lstrip("+~")


def override_value(override: str) -> str:
    return override.split("=", 1)[1] if "=" in override else ""


# --- collecting a sweep directory --------------------------------------------------------


@dataclass
class Job:
    name: str  # the job's directory name (the job number with Hydra's default subdir)
    directory: Path
    record: dict[str, Any] = field(default_factory=dict)
    report: Optional[dict[str, Any]] = None
    evaluation: Optional[dict[str, Any]] = None

    @property
    def num(self) -> Any:
        return self.record.get("num", self.name)

    @property
    def status(self) -> str:
        status = self.record.get("status")
        if status is None:
            return "succeeded" if self.report else "unknown"
        if status == "running":
            return "failed"  # the process ended inside the job (killed, out of memory)
        return status

    @property
    def error(self) -> Optional[str]:
        if self.record.get("status") == "running":
            return "did not finish (process killed or crashed while the job ran)"
        if self.record.get("error"):
            return self.record["error"]
        if self.status == "unknown":
            return f"no {JOB_RECORD} and no {REPORT_JSON}"
        return None

    @property
    def overrides(self) -> list[str]:
        return list(self.record.get("overrides") or [])

    def metric(self, key: str) -> Any:
        return (self.report or {}).get(key)

    @property
    def words(self) -> dict[str, Any]:
        return (self.report or {}).get("caption_words") or {}


def _load_json(path: Path) -> Optional[dict[str, Any]]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _find_eval(job: Job) -> Optional[dict[str, Any]]:
    """eval.json of the job: in its directory, its (local) sink, or the sink's report folder."""
    candidates = [job.directory / EVAL_JSON]
    sink = job.record.get("sink_path")
    if sink and "://" not in sink:
        candidates.append(Path(sink) / EVAL_JSON)
        run_id = job.record.get("run_id") or (job.report or {}).get("run_id")
        if run_id:
            candidates.append(Path(sink) / "reports" / run_id / EVAL_JSON)
    candidates += sorted(job.directory.glob(f"**/{EVAL_JSON}"))
    for path in candidates:
        if path.is_file():
            data = _load_json(path)
            if data and "count" in data:
                return data
    return None


def _job_sort_key(path: Path) -> tuple[int, Any]:
    return (0, int(path.name)) if path.name.isdigit() else (1, path.name)


def collect(sweep_dir: Path) -> list[Job]:
    """Every job directory under the sweep dir (one holding sweep_job.json or report.json)."""
    jobs = [load_job(directory) for directory in sorted((p for p in sweep_dir.iterdir() if p.is_dir()), key=_job_sort_key)]
    return [job for job in jobs if job is not None]


def load_job(directory: Path) -> Optional[Job]:
    """The job in `directory` (its sweep_job.json, report.json and eval.json); None when it holds
    neither record nor report."""
    record = _load_json(directory / JOB_RECORD)
    report = _load_json(directory / REPORT_JSON)
    if record is None and report is None:
        return None
    job = Job(directory.name, directory, record or {}, report)
    job.evaluation = _find_eval(job)
    return job


def _as_number(value: str) -> Optional[float]:
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def _sorted_values(values: set[str]) -> list[str]:
    if all(_as_number(v) is not None for v in values):
        return sorted(values, key=lambda v: _as_number(v))  # type: ignore[arg-type, return-value]
    return sorted(values)


def swept_parameters(jobs: list[Job]) -> tuple[list[str], dict[str, str]]:
    """(keys whose value differs between jobs, in command-line order; the overrides all share)."""
    order: list[str] = []
    values: dict[str, set[str]] = {}
    for job in jobs:
        seen = {override_key(o): override_value(o) for o in job.overrides}
        for key in seen:
            if key not in values:
                order.append(key)
                values[key] = set()
        for key in order:
            values[key].add(seen.get(key, ""))  # "" = not set in this job
    swept = [k for k in order if len(values[k]) > 1]
    fixed = {k: next(iter(values[k])) for k in order if len(values[k]) == 1}
    return swept, fixed


def params_of(job: Job) -> dict[str, str]:
    return {override_key(o): override_value(o) for o in job.overrides}


# --- tables ------------------------------------------------------------------------------


def ranked(jobs: list[Job]) -> list[Job]:
    """Succeeded jobs by rows/s (fastest first), then dry runs, then failed ones by number."""
    def key(job: Job) -> tuple[int, float, tuple[int, Any]]:
        rank = {"succeeded": 0, "dry_run": 1}.get(job.status, 2)
        speed = job.metric("rows_per_second")
        return (rank, -(speed if isinstance(speed, (int, float)) else -1.0), _job_sort_key(job.directory))

    return sorted(jobs, key=key)


def best_job(jobs: list[Job]) -> Optional[Job]:
    candidates = [j for j in jobs if j.status == "succeeded" and isinstance(j.metric("rows_per_second"), (int, float))]
    return max(candidates, key=lambda j: j.metric("rows_per_second")) if candidates else None


def csv_rows(jobs: list[Job]) -> tuple[list[str], list[dict[str, Any]]]:
    swept, _ = swept_parameters(jobs)
    has_eval = any(j.evaluation for j in jobs)
    best = best_job(jobs)
    header = ["job", "status", "best", *swept, "rows_per_second", "generated_tokens_per_second", "captioned",
              "quarantined", "rows_read", "wall_seconds", *PRICE_COLUMNS, "caption_words_mean", "caption_words_p50",
              "caption_words_p95"]
    if has_eval:
        header += ["eval_captions", "eval_empty_share", "eval_truncated_share", "eval_degenerate_share", "eval_vocabulary_size",
                   "eval_judge_mean_score", "eval_exact_match", "eval_word_f1", "eval_bleu4", "eval_cider"]
    header += ["run_id", "output", "overrides", "error", "job_dir"]
    rows = []
    for job in ranked(jobs):
        params = params_of(job)
        row: dict[str, Any] = {"job": job.num, "status": job.status, "best": job is best, **{k: params.get(k, "") for k in swept}}
        for key in ("rows_per_second", "generated_tokens_per_second", "captioned", "quarantined", "rows_read", "wall_seconds",
                    *PRICE_COLUMNS):
            row[key] = job.metric(key)
        for p in ("mean", "p50", "p95"):
            row[f"caption_words_{p}"] = job.words.get(p)
        if has_eval:
            e = job.evaluation or {}
            row.update(
                eval_captions=e.get("count"),
                eval_empty_share=(e.get("empty") or {}).get("share"),
                eval_truncated_share=(e.get("truncated") or {}).get("share"),
                eval_degenerate_share=(e.get("degenerate") or {}).get("share"),
                eval_vocabulary_size=e.get("vocabulary_size"),
                eval_judge_mean_score=(e.get("judge") or {}).get("mean_score"),
                eval_exact_match=((e.get("reference") or {}).get("exact_match") or {}).get("share"),
                eval_word_f1=(e.get("reference") or {}).get("word_f1"),
                eval_bleu4=(e.get("reference") or {}).get("bleu4"),
                eval_cider=(e.get("reference") or {}).get("cider"),
            )
        row.update(
            run_id=job.record.get("run_id") or (job.report or {}).get("run_id"),
            output=job.record.get("output") or (job.report or {}).get("output"),
            overrides=" ".join(job.overrides),
            error=job.error,
            job_dir=str(job.directory),
        )
        rows.append(row)
    return header, rows


def csv_text(header: list[str], rows: list[dict[str, Any]]) -> str:
    """The rows as CSV under `header` (keys outside it dropped, None as an empty cell)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=header, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in rows)
    return buf.getvalue()


def fmt_value(value: Any) -> str:
    """A table cell's text: "–" for nothing, "yes"/"" for a flag, three significant digits for a
    float below 100 and none above."""
    if value is None or value == "":
        return "–"
    if isinstance(value, bool):
        return "yes" if value else ""
    if isinstance(value, float):
        # three significant digits below 100 (0.0183 rows/s stays apart from 0.022), none above
        return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"
    return str(value)


def md_cell(text: Any) -> str:
    """fmt_value's text made safe for one Markdown table cell (no "|", no line break)."""
    return fmt_value(text).replace("|", "\\|").replace("\n", " ")


def _is_model_key(key: str) -> bool:
    return key == "model" or key.startswith("model.")


def _short(value: str) -> str:
    """A path-like checkpoint value shortened for a table label or an axis tick."""
    value = value.rstrip("/")
    return value.rsplit("/", 1)[-1] if "/" in value and (len(value) > 24 or "://" in value) else value


def markdown(sweep_dir: Path, jobs: list[Job]) -> str:
    swept, fixed = swept_parameters(jobs)
    best = best_job(jobs)
    counts = {s: sum(1 for j in jobs if j.status == s) for s in ("succeeded", "failed", "dry_run", "unknown")}
    summary = f"{len(jobs)} run{'' if len(jobs) == 1 else 's'}: {counts['succeeded']} succeeded, {counts['failed']} failed"
    if counts["dry_run"]:
        summary += f", {counts['dry_run']} dry runs"
    if counts["unknown"]:
        summary += f", {counts['unknown']} without a result"
    lines = [f"# capjob sweep `{sweep_dir}`", "", summary + ".", ""]
    if swept:
        values = {k: _sorted_values({params_of(j).get(k, "") for j in jobs}) for k in swept}
        lines.append("Swept: " + "; ".join(f"`{k}` = {', '.join(v or '(unset)' for v in values[k])}" for k in swept) + ".  ")
    if fixed:
        lines.append("Same for every run: `" + " ".join(f"{k}={v}" for k, v in fixed.items()) + "`.")
    lines.append("")
    if best is not None:
        chosen = " ".join(f"{k}={params_of(best).get(k, '')}" for k in swept) or " ".join(best.overrides) or "(defaults)"
        lines += [
            f"**Best: job {best.num}** (`{chosen}`): {fmt_value(best.metric('rows_per_second'))} rows/s, "
            f"{fmt_value(best.metric('generated_tokens_per_second'))} generated tokens/s.",
            "",
        ]
    header = ["", "job", *[f"`{k}`" for k in swept], *[label for _, label in METRICS], "caption words mean / p50 / p95", "status"]
    lines += ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 2 + ["---"] * len(swept) + ["---:"] * (len(METRICS) + 1) + ["---"]) + "|"]
    for job in ranked(jobs):
        params = params_of(job)
        w = job.words
        cells = [
            "★ best" if job is best else "",
            str(job.num),
            *[md_cell(params.get(k, "")) for k in swept],
            *[md_cell(job.metric(key)) for key, _ in METRICS],
            f"{fmt_value(w.get('mean'))} / {fmt_value(w.get('p50'))} / {fmt_value(w.get('p95'))}" if w else "–",
            job.status.replace("_", " "),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    failed = [j for j in jobs if j.status in ("failed", "unknown")]
    if failed:
        lines += ["", "## Failed runs", "", "| job | overrides | error |", "|---|---|---|"]
        for job in failed:
            lines.append(f"| {job.num} | `{md_cell(' '.join(job.overrides))}` | {md_cell(first_line(job.error, 300))} |")
    model_keys = [k for k in swept if _is_model_key(k)]
    if model_keys:
        lines += ["", "## Checkpoint comparison", "", _checkpoint_table(jobs, model_keys, swept)]
    evaluated = [j for j in ranked(jobs) if j.evaluation]
    if evaluated:
        lines += ["", "## Caption evaluation", "", _eval_table(evaluated, model_keys or swept)]
    outputs = [j for j in jobs if j.record.get("output") or (j.report or {}).get("output")]
    if outputs:
        lines += ["", "## Outputs", "", "| job | captions |", "|---|---|"]
        lines += [f"| {j.num} | `{j.record.get('output') or j.report.get('output')}` |" for j in outputs]  # type: ignore[union-attr]
    lines += ["", f"![rows/s against each swept parameter]({SWEEP_PNG})", ""]
    return "\n".join(lines)


def _label(job: Job, keys: list[str]) -> str:
    params = params_of(job)
    return " ".join(_short(params.get(k, "")) if len(keys) == 1 else f"{k}={_short(params.get(k, ''))}" for k in keys) or f"job {job.num}"


def _reference_score(job: Job) -> Optional[dict[str, Any]]:
    """The job's scores against a reference caption (eval.reference_column), if it has them."""
    reference = (job.evaluation or {}).get("reference")
    return reference if reference and reference.get("count") else None


def _checkpoint_table(jobs: list[Job], model_keys: list[str], swept: list[str]) -> str:
    """One row per job, by checkpoint; with scores against a reference caption, best first by
    exact match (then word F1) and the best checkpoint named above the table."""
    other = [k for k in swept if k not in model_keys]
    scored = any(_reference_score(j) for j in jobs)
    lines = [
        "| checkpoint | job | " + "".join(f"`{k}` | " for k in other) + ("exact match | word F1 | " if scored else "")
        + "rows/s | captioned | words mean | words p50 | words p95 | output |",
        "|---|---|" + "---|" * len(other) + ("---:|---:|" if scored else "") + "---:|---:|---:|---:|---:|---|",
    ]

    def order(job: Job) -> tuple[Any, ...]:
        r = _reference_score(job)
        quality = (-(r["exact_match"]["share"] or 0.0), -(r["word_f1"] or 0.0)) if r else (1.0, 1.0)
        return (*(quality if scored else ()), _label(job, model_keys), _job_sort_key(job.directory))

    ordered = sorted(jobs, key=order)
    if scored and _reference_score(ordered[0]):
        best = ordered[0]
        r = _reference_score(best)
        lines[:0] = [f"**Best checkpoint: {md_cell(_label(best, model_keys))}** (job {best.num}): "
                     f"{100 * r['exact_match']['share']:.1f}% exact match, word F1 {r['word_f1']:.3f} "
                     f"against `{r['column']}` ({r['count']} captions).", ""]
    for job in ordered:
        params, w, r = params_of(job), job.words, _reference_score(job)
        output = job.record.get("output") or (job.report or {}).get("output")
        quality = (f"{100 * r['exact_match']['share']:.1f}% | {r['word_f1']:.3f} | " if r else "– | – | ") if scored else ""
        lines.append(
            f"| {md_cell(_label(job, model_keys))} | {job.num} | " + "".join(f"{md_cell(params.get(k, ''))} | " for k in other) + quality
            + f"{md_cell(job.metric('rows_per_second')) if job.status == 'succeeded' else job.status} | {md_cell(job.metric('captioned'))} | "
            f"{md_cell(w.get('mean'))} | {md_cell(w.get('p50'))} | {md_cell(w.get('p95'))} | {('`' + output + '`') if output else '–'} |"
        )
    return "\n".join(lines)


def _eval_table(jobs: list[Job], keys: list[str]) -> str:
    results: dict[str, dict[str, Any]] = {}
    for job in jobs:
        label = f"{_label(job, keys)} (job {job.num})" if keys else f"job {job.num}"
        results[label] = job.evaluation  # type: ignore[assignment]
    try:
        return compare_markdown(results).rstrip("\n")
    except Exception as e:  # noqa: BLE001 - an eval.json of another version: show what is there
        log.warning("caption evaluation table: %s", e)
        lines = ["| | captions | vocabulary |", "|---|---:|---:|"]
        lines += [f"| {label} | {md_cell(s.get('count'))} | {md_cell(s.get('vocabulary_size'))} |" for label, s in results.items()]
        return "\n".join(lines)


# --- plot --------------------------------------------------------------------------------


def plot(jobs: list[Job]) -> bytes:
    """One panel per swept parameter: rows/s of every succeeded run against the parameter's value
    (the line joins the best run at each value); the best run overall is starred."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    swept, _ = swept_parameters(jobs)
    ok = [j for j in jobs if j.status == "succeeded" and isinstance(j.metric("rows_per_second"), (int, float))]
    best = best_job(jobs)
    panels = swept or ["job"]
    fig = Figure(figsize=(4.2 * len(panels), 3.4))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, key in zip(axes, panels):
        value_of = (lambda j: str(j.num)) if key == "job" else (lambda j, k=key: params_of(j).get(k, ""))
        categories = _sorted_values({value_of(j) for j in jobs}) if jobs else []
        position = {v: i for i, v in enumerate(categories)}
        if ok:
            xs = [position[value_of(j)] for j in ok]
            ys = [j.metric("rows_per_second") for j in ok]
            ax.scatter(xs, ys, color="tab:blue", zorder=3, label="run")
            best_at = {}
            for x, y in zip(xs, ys):
                best_at[x] = max(best_at.get(x, y), y)
            ax.plot(sorted(best_at), [best_at[x] for x in sorted(best_at)], color="tab:blue", alpha=0.5, label="best at each value")
            if best is not None:
                ax.scatter([position[value_of(best)]], [best.metric("rows_per_second")], marker="*", s=220,
                           color="tab:orange", zorder=4, label="best")
        failed = [j for j in jobs if j.status in ("failed", "unknown") and value_of(j) in position]
        if failed:
            ax.scatter([position[value_of(j)] for j in failed], [0] * len(failed), marker="x", color="tab:red", zorder=3, label="failed")
        if not ok:
            ax.text(0.5, 0.5, "no successful runs", transform=ax.transAxes, ha="center", va="center")
        ax.set_xticks(range(len(categories)))
        ax.set_xticklabels([_short(c) or "(unset)" for c in categories], rotation=20 if any(len(c) > 8 for c in categories) else 0)
        ax.set_xlim(-0.5, max(len(categories) - 0.5, 0.5))
        ax.set_ylim(0, max(ys) * 1.15 if ok and max(ys) > 0 else 1)
        ax.set_xlabel(key)
        ax.set_ylabel("captioned rows / s")
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(loc="best", fontsize="small")
    fig.suptitle("capjob sweep: throughput by parameter")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


# --- the report --------------------------------------------------------------------------


def build_report(sweep_dir: str | Path, out_dir: str | Path | None = None) -> dict[str, Path]:
    """sweep.csv, sweep.md and sweep.png for a multirun directory. Raises FileNotFoundError when
    it holds no capjob job."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"{sweep_dir} is not a directory")
    jobs = collect(sweep_dir)
    if not jobs:
        raise FileNotFoundError(f"no capjob jobs under {sweep_dir} (expected <job dir>/{JOB_RECORD} or {REPORT_JSON})")
    out = Path(out_dir) if out_dir else sweep_dir
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / SWEEP_CSV, "markdown": out / SWEEP_MD, "plot": out / SWEEP_PNG}
    paths["csv"].write_text(csv_text(*csv_rows(jobs)))
    paths["markdown"].write_text(markdown(sweep_dir, jobs))
    paths["plot"].write_bytes(plot(jobs))
    return paths


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        prog="capjob-sweep-report",
        description="Rebuild sweep.csv, sweep.md and sweep.png from a capjob multirun directory "
        "(the hydra.sweep.dir holding one folder per job).",
    )
    parser.add_argument("sweep_dir", metavar="DIR", type=Path, help="the multirun directory, e.g. multirun/2025-01-31/12-00-00")
    parser.add_argument("--out", type=Path, default=None, help="where to write the files (default: DIR)")
    args = parser.parse_args(argv)
    try:
        paths = build_report(args.sweep_dir, args.out)
    except (FileNotFoundError, OSError) as e:
        print(f"capjob-sweep-report: error: {e}", file=sys.stderr)
        sys.exit(2)
    for name, path in paths.items():
        print(f"{name:<9} {path}")


if __name__ == "__main__":
    main()
