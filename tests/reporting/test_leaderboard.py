"""The checkpoint leaderboard (reporting/leaderboard.py): rows in training order, the best
checkpoint by score, failed checkpoints with their reason, the csv and the plot."""

import csv
import io

from capjob.reporting import leaderboard

PNG = b"\x89PNG"


def test_leaderboard_files_rank_by_score_and_name_failures(tmp_path):
    rows = [
        {"checkpoint": "step-300", "step": 300, "status": "succeeded", "exact_match": 0.9, "word_f1": 0.95, "lag_s": 40.0},
        {"checkpoint": "step-100", "step": 100, "status": "succeeded", "exact_match": 0.1, "word_f1": 0.4},
        {"checkpoint": "step-200", "step": 200, "status": "failed", "error": "model.source: /c/step-200 lacks weights\nmore"},
        {"checkpoint": "step-400", "step": 400, "status": "succeeded", "exact_match": 0.9, "word_f1": 0.97},
    ]
    files = leaderboard.render(rows, "/sink")
    md = files["leaderboard.md"].decode()
    assert "4 checkpoints: 3 evaluated, 1 failed." in md
    assert "**Best checkpoint: step-400** (step 400): exact match 0.9, word F1 0.97." in md
    table = [line for line in md.splitlines() if line.startswith("| ") and "step-" in line][:4]
    assert [line.split(" | ")[2] for line in table] == ["step-100", "step-200", "step-300", "step-400"]  # training order
    assert table[3].startswith("| ★ best | 400 |")
    assert "| 200 | step-200 | model.source: /c/step-200 lacks weights |" in md
    parsed = list(csv.DictReader(io.StringIO(files["leaderboard.csv"].decode())))
    assert [(r["step"], r["best"], r["status"]) for r in parsed] == [("100", "False", "succeeded"), ("200", "False", "failed"),
                                                                    ("300", "False", "succeeded"), ("400", "True", "succeeded")]
    assert files["leaderboard.png"][:4] == PNG
    assert leaderboard.render([], "/sink")["leaderboard.png"][:4] == PNG  # before the first checkpoint too


def test_a_run_that_captioned_nothing_is_a_failed_row(tmp_path):
    from capjob.reporting.sweep_report import Job

    job = Job("x", tmp_path, {"status": "succeeded", "run_id": "r1"},
              {"captioned": 0, "quarantined": 8, "quarantined_by_reason": {"engine_crash": 8}}, {"count": 0})
    row = leaderboard.row_from_job(job)
    assert row["status"] == "failed" and row["error"] == "no caption: all 8 rows quarantined (engine_crash 8)"
    failed = leaderboard.row_from_job(Job("y", tmp_path, {"status": "failed", "error": "ConfigError: model.source: broken"}))
    assert failed["status"] == "failed" and failed["error"] == "ConfigError: model.source: broken"
    assert leaderboard.best_row([{**row, "checkpoint": "a", "step": 1}]) is None
