"""reporting/report.py: the price of a caption, in the report and the console summary."""

from capjob.reporting import report


def base_report(**extra):
    return {"rows_read": 100, "skipped_done": 0, "captioned": 100, "quarantined": 0, "quarantined_images": 0,
            "quarantined_engine": 0, "wall_seconds": 120.0, "rows_per_second": 0.833, "generated_tokens_per_second": 10,
            "prompt_tokens_per_second": 50, "caption_words": {"mean": 9, "p50": 9, "p95": 11},
            "timeline": {"steady_rows_per_second": 2.0}, **extra}


def test_images_per_gpu_hour_and_cost_count_start_up_and_steady_apart():
    # 2 GPUs held for 120 s = 1/15 GPU-hour for 100 images: 1,500 images per GPU-hour; steady
    # 2 images/s on 2 GPUs = 3,600. At 3.00 per GPU-hour: 2.00 and 0.8333 per 1,000 images.
    p = report.price(100, 120.0, {"steady_rows_per_second": 2.0}, 2, 3.0)
    assert p == {"gpus_held": 2, "gpu_hours": 0.0667, "images_per_gpu_hour": 1500.0, "steady_images_per_gpu_hour": 3600.0,
                 "gpu_hour_price": 3.0, "cost_per_1000_images": 2.0, "steady_cost_per_1000_images": 0.8333}
    table = report.summary_table(base_report(**p))
    assert "| images per GPU-hour (whole run / steady) | 1500.0 / 3600.0 (2 GPU(s) held, 0.0667 GPU-hours) |" in table
    assert "| cost per 1,000 images (whole run / steady) | 2.0 / 0.8333 (at 3 per GPU-hour) |" in table


def test_no_price_no_cost_line_and_a_cpu_engine_holds_no_gpu():
    p = report.price(100, 120.0, {"steady_rows_per_second": 2.0}, 1, None)
    assert p["cost_per_1000_images"] is None and p["images_per_gpu_hour"] == 3000.0
    assert "cost per 1,000" not in report.summary_table(base_report(**p))
    cpu = report.price(100, 120.0, {"steady_rows_per_second": 2.0}, 0, 3.0)
    assert cpu["images_per_gpu_hour"] is None and cpu["cost_per_1000_images"] is None
    assert "| images per GPU-hour | - (no GPU held: the engine ran on CPU) |" in report.summary_table(base_report(**cpu))
    # nothing captioned (an interrupted start): no rate, no division by zero
    assert report.price(0, 5.0, {}, 1, 3.0)["images_per_gpu_hour"] is None


def test_items_line_measures_rows_read_and_shows_a_gap():
    # Issue 31: the line once took rows as items - skipped, so it always added up ("6 = 4 + 2"
    # with 6 rows read); the rows are now the rows read, and a gap is named.
    ok = report.summary_table(base_report(rows_read=6, source_items=8, skipped_by_source={"sample without an image (members: txt)": 2}))
    assert "| items seen = rows + skipped | 8 = 6 + 2 (sample without an image (members: txt): 2) |" in ok
    lost = report.summary_table(base_report(rows_read=6, source_items=6, skipped_by_source={"hidden file": 2}))
    assert "| items seen = rows + skipped | 6 ≠ 6 + 2: -2 item(s) unaccounted for (hidden file: 2) |" in lost
    limited = report.summary_table(base_report(rows_read=3, source_items=10, skipped_by_source={"hidden file": 2},
                                               config={"data": {"limit": 3}}))
    assert "| 10 ≠ 3 + 2: +5 item(s) data.limit=3: rows of the blocks read left untaken (hidden file: 2) |" in limited
