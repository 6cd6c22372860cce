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


def test_timeline_rates_cover_the_time_they_say():
    # A run started at t=1000 whose engine was ready at +50 s, first block (8 rows) written at
    # +60 s, then 8 rows every 2 s up to +76 s (64 rows after the first block), ended at +80 s.
    events = [(1060.0 + 2 * i, 8) for i in range(9)]
    t = report.timeline(events, 1000.0, 1080.0, engine_ready_at=1050.0)
    assert (t["wall_seconds"], t["engine_ready_s"], t["first_caption_s"], t["startup_seconds"]) == (80.0, 50.0, 60.0, 60.0)
    assert t["startup_seconds"] + t["steady_seconds"] == t["wall_seconds"]
    assert (t["steady_rows"], t["steady_seconds"], t["steady_rows_per_second"]) == (64, 20.0, 3.2)
    # Blocks landing together (a partial report's file times, several writers) are not a rate:
    # 30 rows within 0.2 s of a 4.6 rows/s run used to read "steady 149 images/s".
    burst = report.timeline([(1060.0, 2), (1060.1, 15), (1060.2, 15)], 1000.0, 1066.5)
    assert burst["steady_rows_per_second"] == round(30 / 6.5, 3)
    # One block only: no steady rate, and the split still adds up.
    one = report.timeline([(1060.0, 8)], 1000.0, 1061.0)
    assert one["steady_rows_per_second"] is None and one["startup_seconds"] + one["steady_seconds"] == 61.0


def test_summary_line_shows_the_rows_and_seconds_of_each_rate():
    t = report.timeline([(1060.0 + 2 * i, 8) for i in range(9)], 1000.0, 1080.0)
    table = report.summary_table(base_report(captioned=72, wall_seconds=80.0, rows_per_second=0.9, timeline=t))
    assert "| rows/s (whole run / steady) | 0.9 (72 rows / 80.0 s) / 3.2 (64 rows after the first block / 20.0 s) |" in table
    assert "| wall time | 80.0 s = start-up 60.0 s (to the first caption) + steady captioning 20.0 s |" in table


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
