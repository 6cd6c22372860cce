"""Caption evaluation: statistics over a captions table, per-row flags, reports.

Runs after captioning (``eval=stats``) or on an existing output (``capjob-eval OUTPUT``)::

    captions table -> per-row flags (empty, truncated, degenerate) -> aggregate statistics
        -> <sink.path>/evaluation/<run or 'all'>.parquet    one row per caption, keyed by id
        -> eval.json, eval.md, caption_length_hist.png       in a local report directory

Truncation is inferred as ``generated_tokens >= max_tokens``: the engine output capjob keeps
carries no finish reason, and a caption that used its whole token budget was almost surely
cut. A caption that ends exactly at the budget by itself is counted as truncated too.

Words are lower-cased ``\\w+`` tokens (apostrophes kept inside words), so punctuation and case
never count: "A cat." and "a cat" have the same words, n-grams and vocabulary.

With ``eval.reference_column`` (a column holding each image's true caption, such as
``reference`` in ``dataset=sample``), rows with a reference are also scored against it:
exact match (same word sequence), word-level F1 (bag-of-words overlap, as SQuAD scores
answers), and the COCO caption metrics BLEU-4 and CIDEr-D from pycocoevalcap (the scorers of
the MS-COCO caption evaluation server). pycocoevalcap normally tokenizes with Stanford's PTB
tokenizer (Java); here both sides are the same lower-cased word tokens instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np
import pyarrow as pa

from capjob.config import EvalConfig, EvalMode, ResourcesConfig, SinkConfig, SinkFormat
from capjob.errors import CapjobError, SinkError, SourceError
from capjob.reporting.judge import judge_output, render_judge_markdown
from capjob.reporting.outputs import EVALUATION, default_out_dir, output_sink, read_captions, require_columns, select_run
from capjob.schema import CAPTIONS, word_tokens
from capjob.stages.tables import TableWriter

REPORT_JSON = "eval.json"
REPORT_MD = "eval.md"
HISTOGRAM_PNG = "caption_length_hist.png"
PERCENTILES = (5, 50, 95)

EVAL_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("words", pa.int64()),
        ("generated_tokens", pa.int64()),
        ("empty", pa.bool_()),
        # Null when max_tokens is unknown: "not truncated" would be a guess.
        ("truncated", pa.bool_()),
        ("degenerate", pa.bool_()),
        # Comma-separated flag names (empty, truncated, repeated_ngram, repeated_lines); "" if none.
        ("flags", pa.string()),
        # Against eval.reference_column; null without a reference.
        ("exact_match", pa.bool_()),
        ("word_f1", pa.float64()),
    ]
)


# --- per caption -------------------------------------------------------------------------


def has_repeated_ngram(words: Sequence[str], n: int, repeats: int, share: float) -> bool:
    grams = list(zip(*(words[i:] for i in range(n))))
    # Most captions repeat no n-gram at all; a set answers that several times faster than Counter.
    if len(set(grams)) == len(grams):
        return False
    counts = Counter(grams)
    top = max(counts.values())
    # The share test needs a real repetition: a 3-word caption's only 3-gram is 100% of them.
    return top >= repeats or (top >= 2 and top / counts.total() > share)


def has_repeated_lines(text: str, repeats: int) -> bool:
    raw = text.splitlines()
    if len(raw) < repeats:  # the usual one-line caption: nothing to tokenize again
        return False
    # Lines compare by their words; lines without words (blank, "---") are layout, not content.
    lines = Counter(words for words in (tuple(word_tokens(line)) for line in raw) if words)
    return bool(lines) and max(lines.values()) >= repeats


@dataclass(frozen=True)
class RowFlags:
    words: int
    empty: bool
    truncated: Optional[bool]  # None: max_tokens unknown
    repeated_ngram: bool
    repeated_lines: bool

    @property
    def degenerate(self) -> bool:
        return self.repeated_ngram or self.repeated_lines

    @property
    def names(self) -> str:
        named = {
            "empty": self.empty,
            "truncated": bool(self.truncated),
            "repeated_ngram": self.repeated_ngram,
            "repeated_lines": self.repeated_lines,
        }
        return ",".join(name for name, on in named.items() if on)


def caption_flags(caption: str, words: Sequence[str], generated_tokens: int, max_tokens: Optional[int], cfg: EvalConfig) -> RowFlags:
    """`words`: word_tokens(caption), computed once by the caller for the vocabulary too."""
    return RowFlags(
        words=len(words),
        empty=not caption.strip(),
        truncated=None if max_tokens is None else generated_tokens >= max_tokens,
        repeated_ngram=has_repeated_ngram(words, cfg.ngram, cfg.ngram_repeats, cfg.ngram_share),
        repeated_lines=has_repeated_lines(caption, cfg.line_repeats),
    )


def word_f1(hypothesis: Sequence[str], reference: Sequence[str]) -> float:
    """Bag-of-words F1 of two word_tokens lists (SQuAD's answer F1): 1.0 for the same words in
    any order, 0.0 when none is shared; two empty lists agree (1.0)."""
    if not hypothesis or not reference:
        return float(not hypothesis and not reference)
    common = sum((Counter(hypothesis) & Counter(reference)).values())
    if not common:
        return 0.0
    precision, recall = common / len(hypothesis), common / len(reference)
    return 2 * precision * recall / (precision + recall)


def coco_scores(hypotheses: Sequence[Sequence[str]], references: Sequence[Sequence[str]]) -> dict[str, Optional[float]]:
    """Corpus BLEU-4 and CIDEr-D (pycocoevalcap) of word_tokens lists, one reference per row.
    None for no rows. CIDEr-D's idf comes from the references given, so it compares runs over
    the same references only (as on the COCO server)."""
    if not hypotheses:
        return {"bleu4": None, "cider": None}
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    res = {i: [" ".join(h)] for i, h in enumerate(hypotheses)}
    gts = {i: [" ".join(r)] for i, r in enumerate(references)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    return {"bleu4": float(bleu[3]), "cider": float(cider)}


def _reference_column(table: pa.Table, column: str) -> list[Optional[str]]:
    if column not in table.column_names:
        raise SourceError(f"eval.reference_column: {column!r} is not a column of the captions table "
                          f"(pass it through with data.passthrough_columns); columns: {sorted(table.column_names)}")
    return table.column(column).to_pylist()


# --- over a table ------------------------------------------------------------------------


def vocabulary_size(tokenized: Iterable[Sequence[str]]) -> int:
    """Distinct words over captions given as word_tokens lists."""
    return len(set().union(*tokenized))


def distribution(values: Sequence[int]) -> dict[str, Optional[float]]:
    """mean and p5/p50/p95 (numpy's linear interpolation); None for no values."""
    if not values:
        return {"mean": None, **{f"p{q}": None for q in PERCENTILES}}
    points = np.percentile(np.asarray(values, dtype=np.float64), PERCENTILES)
    return {"mean": float(np.mean(values)), **{f"p{q}": float(p) for q, p in zip(PERCENTILES, points)}}


def _share(count: Optional[int], total: int) -> dict[str, Any]:
    return {"count": count, "share": count / total if count is not None and total else None}


@dataclass
class Evaluation:
    rows: pa.Table  # EVAL_SCHEMA, one row per caption
    stats: dict[str, Any]  # JSON-ready; what eval.json holds


def evaluate(table: pa.Table, cfg: EvalConfig, *, max_tokens: Optional[int] = None, run: str = "all") -> Evaluation:
    """Flags and statistics of a captions table. `max_tokens` (the run's caption.max_tokens)
    wins over cfg.max_tokens, which is only the fallback when the run's value is unknown."""
    require_columns(table)
    limit = max_tokens if max_tokens is not None else cfg.max_tokens
    captions = [c or "" for c in table.column("caption").to_pylist()]  # a null caption is an empty one
    tokens = [int(t or 0) for t in table.column("generated_tokens").to_pylist()]
    words = [word_tokens(c) for c in captions]
    flags = [caption_flags(c, w, t, limit, cfg) for c, w, t in zip(captions, words, tokens)]
    n = len(flags)
    exact: list[Optional[bool]] = [None] * n
    f1: list[Optional[float]] = [None] * n
    reference: Optional[dict[str, Any]] = None
    if cfg.reference_column:
        refs = [None if r is None else word_tokens(str(r)) for r in _reference_column(table, cfg.reference_column)]
        scored = [i for i, r in enumerate(refs) if r is not None]
        for i in scored:
            exact[i], f1[i] = words[i] == refs[i], word_f1(words[i], refs[i])
        reference = {
            "column": cfg.reference_column,
            "count": len(scored),
            "exact_match": _share(sum(bool(exact[i]) for i in scored), len(scored)),
            "word_f1": float(np.mean([f1[i] for i in scored])) if scored else None,
            **coco_scores([words[i] for i in scored], [refs[i] for i in scored]),  # type: ignore[misc]
        }
    rows = pa.table(
        {
            "id": table.column("id").cast(pa.string()),
            "words": [f.words for f in flags],
            "generated_tokens": tokens,
            "empty": [f.empty for f in flags],
            "truncated": [f.truncated for f in flags],
            "degenerate": [f.degenerate for f in flags],
            "flags": [f.names for f in flags],
            "exact_match": exact,
            "word_f1": f1,
        },
        schema=EVAL_SCHEMA,
    )
    stats = {
        "run": run,
        "models": sorted({m for m in table.column("model").to_pylist() if m}) if "model" in table.column_names else [],
        "count": n,
        "max_tokens": limit,
        "words": distribution([f.words for f in flags]),
        "generated_tokens": distribution(tokens),
        "empty": _share(sum(f.empty for f in flags), n),
        "truncated": _share(None if limit is None else sum(bool(f.truncated) for f in flags), n),
        "degenerate": {
            **_share(sum(f.degenerate for f in flags), n),
            "repeated_ngram": sum(f.repeated_ngram for f in flags),
            "repeated_lines": sum(f.repeated_lines for f in flags),
        },
        "vocabulary_size": vocabulary_size(words),
        "settings": {"ngram": cfg.ngram, "ngram_repeats": cfg.ngram_repeats, "ngram_share": cfg.ngram_share, "line_repeats": cfg.line_repeats},
        **({"reference": reference} if reference is not None else {}),
    }
    return Evaluation(rows, stats)


# --- reports -----------------------------------------------------------------------------


def _num(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def _pct(part: Mapping[str, Any]) -> str:
    return "n/a" if part["share"] is None else f"{part['count']} ({100 * part['share']:.1f}%)"


def render_markdown(stats: Mapping[str, Any]) -> str:
    s = stats
    d = s["degenerate"]
    truncated_rule = f"generated_tokens >= {s['max_tokens']}" if s["max_tokens"] is not None else "max_tokens unknown"
    lines = [
        f"# Caption evaluation: run `{s['run']}`",
        "",
        f"- captions: {s['count']}",
        f"- models: {', '.join(s['models']) or 'n/a'}",
        *([f"- source: `{s['source']}`"] if s.get("source") else []),
        *([f"- per-row flags: `{s['evaluation_table']}`"] if s.get("evaluation_table") else []),
        "",
        "## Length",
        "",
        "| | mean | p5 | p50 | p95 |",
        "|---|---:|---:|---:|---:|",
        *(
            f"| {label} | " + " | ".join(_num(s[key][k]) for k in ("mean", "p5", "p50", "p95")) + " |"
            for label, key in (("words", "words"), ("generated tokens", "generated_tokens"))
        ),
        "",
        f"![caption length]({HISTOGRAM_PNG})",
        "",
        "## Flags",
        "",
        "| flag | rule | captions |",
        "|---|---|---:|",
        f"| empty | no text besides whitespace | {_pct(s['empty'])} |",
        f"| truncated | {truncated_rule} (no finish reason in the output) | {_pct(s['truncated'])} |",
        f"| degenerate | repeated {s['settings']['ngram']}-grams or repeated lines | {_pct(d)} |",
        f"| - repeated n-grams | one occurs >= {s['settings']['ngram_repeats']} times or covers > "
        f"{100 * s['settings']['ngram_share']:.0f}% | {d['repeated_ngram']} |",
        f"| - repeated lines | one occurs >= {s['settings']['line_repeats']} times | {d['repeated_lines']} |",
        "",
        f"Vocabulary: {s['vocabulary_size']} distinct lower-cased words.",
        "",
    ]
    if s.get("reference"):
        lines += _reference_markdown(s["reference"])
    if s.get("judge"):
        lines.append(render_judge_markdown(s["judge"]))
    return "\n".join(lines)


def _reference_markdown(r: Mapping[str, Any]) -> list[str]:
    return [
        f"## Against the reference (`{r['column']}`)",
        "",
        f"{r['count']} captions have a reference.",
        "",
        "| exact match | word F1 | BLEU-4 | CIDEr-D |",
        "|---:|---:|---:|---:|",
        f"| {_pct(r['exact_match'])} | {_score(r['word_f1'])} | {_score(r['bleu4'])} | {_score(r['cider'])} |",
        "",
    ]


def _score(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _histogram(ax: Any, values: list[int], stats: Mapping[str, Optional[float]], xlabel: str, y_locator: Any) -> None:
    """y_locator: a matplotlib.ticker.MaxNLocator(integer=True) (counts are integers)."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel("captions")
    if not values:
        ax.text(0.5, 0.5, "no captions", ha="center", va="center", transform=ax.transAxes)
        return
    # Integer-aligned bins: lengths are counts, and a bin straddling two integers misleads.
    low, high = min(values), max(values)
    step = max(1, int(np.ceil((high - low + 1) / 50)))
    ax.hist(values, bins=np.arange(low, high + step + 1, step) - 0.5, color="#4c72b0")
    ax.yaxis.set_major_locator(y_locator)
    for key, style in (("p5", ":"), ("p50", "--"), ("p95", ":"), ("mean", "-")):
        ax.axvline(stats[key], color="#c44e52", linestyle=style, label=f"{key} {stats[key]:.1f}")
    ax.legend(fontsize="small")


def plot_lengths(evaluation: Evaluation, path: Path) -> None:
    # matplotlib (seconds to import on 2 cores) loads when a report is drawn, as in report.py and
    # sweep_report.py: the CLI imports this module before its preflight (via the sweep report).
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    # The object-oriented API on an Agg canvas: no pyplot global state, no display needed.
    fig = Figure(figsize=(10, 4), layout="constrained")
    FigureCanvasAgg(fig)
    words_ax, tokens_ax = fig.subplots(1, 2)
    _histogram(words_ax, evaluation.rows.column("words").to_pylist(), evaluation.stats["words"], "words", MaxNLocator(integer=True))
    _histogram(tokens_ax, evaluation.rows.column("generated_tokens").to_pylist(), evaluation.stats["generated_tokens"], "generated tokens",
               MaxNLocator(integer=True))
    fig.suptitle(f"Caption length, run {evaluation.stats['run']} ({evaluation.stats['count']} captions)")
    fig.savefig(path, format="png", dpi=100)


def write_report(evaluation: Evaluation, out_dir: Path) -> dict[str, Path]:
    """eval.json, eval.md and caption_length_hist.png into a local directory."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / REPORT_JSON, "markdown": out_dir / REPORT_MD, "histogram": out_dir / HISTOGRAM_PNG}
    paths["json"].write_text(json.dumps(evaluation.stats, indent=2) + "\n")
    paths["markdown"].write_text(render_markdown(evaluation.stats))
    plot_lengths(evaluation, paths["histogram"])
    return paths


def write_eval_table(evaluation: Evaluation, sink: SinkConfig) -> str:
    """<sink.path>/evaluation/<run>.parquet, atomically, whatever the sink's format; returns its URL."""
    writer = TableWriter(replace(sink, format=SinkFormat.parquet))
    written = writer.write(EVALUATION, evaluation.rows, evaluation.stats["run"])
    return f"{writer.url(EVALUATION)}/{written.rsplit('/', 1)[-1]}"


def compare_markdown(results: Mapping[str, Mapping[str, Any]]) -> str:
    """One row per eval.json content (e.g. per model checkpoint), keyed by its label; judge
    columns when any of them has a judge section."""
    judged = any(s.get("judge") for s in results.values())
    referenced = any(s.get("reference") for s in results.values())
    lines = [
        "| | captions | words mean | words p50 | words p95 | tokens mean | empty | truncated | degenerate | vocabulary |"
        + (" exact match | word F1 | BLEU-4 | CIDEr-D |" if referenced else "")
        + (" judge mean | judge parsed |" if judged else ""),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|---:|---:|" if referenced else "")
        + ("---:|---:|" if judged else ""),
    ]
    for label, s in results.items():
        cells = [
            str(s["count"]),
            _num(s["words"]["mean"]),
            _num(s["words"]["p50"]),
            _num(s["words"]["p95"]),
            _num(s["generated_tokens"]["mean"]),
            _pct(s["empty"]),
            _pct(s["truncated"]),
            _pct(s["degenerate"]),
            str(s["vocabulary_size"]),
        ]
        if referenced:
            r = s.get("reference")
            cells += ([_pct(r["exact_match"]), _score(r["word_f1"]), _score(r["bleu4"]), _score(r["cider"])] if r
                      else ["n/a"] * 4)
        if judged:
            j = s.get("judge")
            cells += [_num(j["mean_score"]) if j else "n/a", f"{j['parsed']}/{j['count']}" if j else "n/a"]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# --- an output (the job's sink or an existing one) ---------------------------------------


def evaluate_output(
    sink: SinkConfig,
    cfg: EvalConfig,
    out_dir: Path,
    *,
    run_id: Optional[str] = None,
    max_tokens: Optional[int] = None,
    resources: Optional[ResourcesConfig] = None,
) -> tuple[Evaluation, dict[str, str]]:
    """Evaluate a sink's captions (one run's, or all) and write the table and the report.
    With cfg.mode == judge the judge pass (reporting/judge.py) runs too, on Ray with `resources` (the
    job's cfg.resources) for its CPU stages, and the report gets a `judge` section.
    Returns the evaluation and where each result went."""
    table = read_captions(sink)
    evaluation = evaluate(select_run(table, run_id) if run_id else table, cfg, max_tokens=max_tokens, run=run_id or "all")
    evaluation.stats["source"] = TableWriter(sink).url(CAPTIONS)
    try:
        evaluation.stats["evaluation_table"] = write_eval_table(evaluation, sink)
    except Exception as e:  # noqa: BLE001 - s3fs/botocore raise a zoo of types
        detail = (str(e).splitlines() or [""])[0][:300]  # one line: the CLI prints it as is
        raise SinkError(f"cannot write {TableWriter(sink).url(EVALUATION)!r}: {type(e).__name__}: {detail}") from None
    files = {name: str(path) for name, path in write_report(evaluation, out_dir).items()}
    written = {"table": evaluation.stats["evaluation_table"], **files}
    if cfg.mode == EvalMode.judge:
        # The statistics report is written first: it stays if the judge's engine cannot start.
        judged = judge_output(sink, cfg.judge, run_id=run_id, resources=resources)
        evaluation.stats["judge"] = judged.stats
        write_report(evaluation, out_dir)
        written["judge_table"] = judged.table_url
    return evaluation, written


# --- capjob-eval -------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        prog="capjob-eval",
        description="Caption statistics of an existing capjob output: eval.json, eval.md, "
        "caption_length_hist.png, and per-row flags in OUTPUT/evaluation/all.parquet.",
    )
    parser.add_argument("output", metavar="OUTPUT", help="the run's sink.path (local path or fsspec URL such as s3://bucket/prefix)")
    parser.add_argument("--max-tokens", type=_positive_int, default=None, help="the run's caption.max_tokens; without it truncation is not assessed")
    parser.add_argument("--out", type=Path, default=None, help="report directory (default: OUTPUT when local, else ./eval-<name>)")
    parser.add_argument("--reference-column", default=None, metavar="COLUMN",
                        help="column holding each image's true caption: exact match, word F1, BLEU-4 and CIDEr-D against it")
    args = parser.parse_args(argv)
    try:
        sink = output_sink(args.output)
        out_dir = args.out or default_out_dir(args.output)
        _, written = evaluate_output(sink, EvalConfig(name="stats", mode=EvalMode.stats, max_tokens=args.max_tokens,
                                                           reference_column=args.reference_column), out_dir)
    except (CapjobError, OSError) as e:
        print(f"capjob-eval: error: {e}", file=sys.stderr)
        sys.exit(2)
    for name, where in written.items():
        print(f"{name:<10} {where}")
