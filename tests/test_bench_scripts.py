"""Smoke tests for the scripts in bench/: they run and report, on tiny inputs (no timing checks)."""

import json
import os
import pathlib
import re
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_preprocess_bench_runs(tmp_path):
    out_json = tmp_path / "preprocess.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "preprocess_bench.py"), "--images", "6", "--repeats", "1",
         "--max-megapixels", "1.3", "--gen-jobs", "1", "--cache-dir", str(tmp_path / "cache"), "--json", str(out_json)],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"^ratio capjob/seed .*: \d+\.\d+x", proc.stdout, re.MULTILINE), proc.stdout
    assert "| all | 6 |" in proc.stdout  # the markdown table, with its total row
    result = json.loads(out_json.read_text())
    assert result["images"] == 6 and result["ratio"] > 0 and result["ceiling"] > 0
    assert re.search(r"^ceiling on this mix .*: \d+\.\d+x", proc.stdout, re.MULTILINE), proc.stdout
    assert {row["format"] for row in result["rows"]} >= {"all"}


def test_gpu_bench_report_ratios_and_sweep(tmp_path):
    """The GPU report gives each ratio on capjob's steady images/s and on its engine operator's
    rows/s, and judges the target on the stricter; the best capjob sweep point is capjob's number."""
    sys.path.insert(0, str(REPO / "bench"))
    import gpu_bench

    assert gpu_bench.sweep_points(["engine.batch_size=16,64", "engine.max_num_seqs=256"]) == [
        {"engine.batch_size": "16", "engine.max_num_seqs": "256"}, {"engine.batch_size": "64", "engine.max_num_seqs": "256"}]
    results = [
        {"contender": "raw_vllm", "status": "ok", "images": 100, "images_per_s": 50.0, "output_tokens_per_s": 1.0},
        {"contender": "capjob", "point": {"engine.batch_size": "16"}, "status": "ok", "images": 100, "images_per_s": 40.0,
         "output_tokens_per_s": 1.0, "engine_op_rows_per_s": 30.0},
        {"contender": "capjob", "point": {"engine.batch_size": "64"}, "status": "ok", "images": 100, "images_per_s": 55.0,
         "output_tokens_per_s": 1.0, "engine_op_rows_per_s": 45.0},
        {"contender": "seed", "status": "ok", "images": 100, "images_per_s": 30.0, "output_tokens_per_s": 1.0, "engine_op_rows_per_s": 30.0},
        {"contender": "transformers", "status": "failed"},
    ]
    text = gpu_bench.render(results, tmp_path)
    assert "capjob / raw_vllm: **1.10x / 0.90x** (steady / engine operator; target >= 0.97x: NOT met on the stricter)" in text
    assert "capjob / seed: **1.83x / 1.50x** (steady / engine operator; target >= 1.5x: met on the stricter)" in text
    assert "| transformers | not run |" in text and "capjob / transformers" not in text
    assert (tmp_path / "gpu_bench.md").read_text().count("| engine.batch_size=") == 3  # best row + 2 sweep rows
    assert (tmp_path / "gpu_sweep.png").stat().st_size > 1000
    assert gpu_bench.engine_operator([{"operator": "MapBatches(vLLMEngineStageUDF)", "rows_per_second": 7.0}])["rows_per_second"] == 7.0


def test_gpu_bench_profile_stats_and_mfu(tmp_path):
    """Issue 22's readings: py-spy's raw stacks as each thread's busy share and heaviest frames,
    vLLM's stat lines as means over the lines with requests running, MFU from the FLOP count,
    and the table of every run."""
    sys.path.insert(0, str(REPO / "bench"))
    import gpu_bench

    stacks = tmp_path / "p.txt"
    stacks.write_text("thread (0x1);run (/x/site-packages/vllm/core.py:10);schedule (/x/site-packages/vllm/sched.py:5) 30\n"
                      "thread (0x1);run (/x/site-packages/vllm/core.py:12);execute (/x/site-packages/vllm/runner.py:7) 60\n"
                      "thread (0x2);send (/x/python3.12/threading.py:3) 10\n")
    summary = gpu_bench.summarize_profile(stacks, duration=1.0, rate=100)
    main = summary["thread (0x1)"]
    assert main["busy_share"] == 0.9 and summary["thread (0x2)"]["busy_share"] == 0.1
    assert main["frames"] == {"run (vllm/core.py)": 1.0, "execute (vllm/runner.py)": 0.667, "schedule (vllm/sched.py)": 0.333}
    log = tmp_path / "capjob.log"
    line = ("Engine 000: Avg prompt throughput: {p} tokens/s, Avg generation throughput: {g} tokens/s, Running: {r} reqs, "
            "Waiting: 0 reqs, GPU KV cache usage: 5.0%, Prefix cache hit rate: {h}%\n")
    log.write_text(line.format(p=0.0, g=0.0, r=0, h=0.0) + line.format(p=100.0, g=20000.0, r=1000, h=30.0)
                   + line.format(p=300.0, g=30000.0, r=1024, h=40.0).replace("Waiting: 0 reqs", "Waiting: 0 reqs, Preemptions: 2"))
    stats = gpu_bench.vllm_log_stats(log)
    assert stats["vllm_gen_tok_s"] == 25000.0 and stats["vllm_running"] == 1012.0 and stats["vllm_prefix_hit_pct"] == 35.0
    assert stats["vllm_stat_lines"] == 2 and gpu_bench.vllm_log_stats(tmp_path / "none.log") == {}
    assert gpu_bench.mfu_pct(127.5, 128) == 22.7 and gpu_bench.mfu_pct(127.5, 8) is None
    table = gpu_bench.runs_table([
        {"contender": "raw_vllm", "api": "generate", "label": "raw12k", "images": 12000, "images_per_s": 95.0, "start_s": 70,
         "first_caption_s": 110, "wall_s": 250, "decode_s": 40, "status": "ok"},
        {"contender": "capjob", "label": "P2", "set": ["engine.max_num_seqs=2048"], "images": 4000, "images_per_s": 250.0,
         "mfu_pct": 44.5, "status": "ok"}])
    assert "| raw12k raw_vllm (generate) | 12000 | 95.0 | – |" in table and "70 (first caption 110) | 250 (decode 40)" in table
    assert "| P2 capjob engine.max_num_seqs=2048 | 4000 | 250.0 |" in table and "| 44.5 |" in table


def test_gpu_check_table_fails_loudly():
    """bench/gpu_check.sh's verdict: a layout passes only if every image was written exactly once
    and nothing but a dummy model's empty captions was quarantined; a sweep's combination refused
    up front (ConfigError) is shown, not counted as a failure."""
    sys.path.insert(0, str(REPO / "bench"))
    import gpu_bench

    ok = {"contender": "capjob", "label": "one", "status": "ok", "captioned": 300, "quarantined": 0, "images_per_s": 120.0,
          "engine_op_rows_per_s": 100.0, "start_s": 150.0, "gpu_util_mean": 97.5, "guard_ms_per_batch": 1.8,
          "rows_written": 300, "distinct_ids": 300, "empty_captions": 0, "resources": "h200x1"}
    refused = {"contender": "capjob", "label": "sweep", "point": {"engine.tensor_parallel_size": "2", "resources.gpus_per_worker": "1"},
               "sweep_job": "2", "status": "failed: engine.tensor_parallel_size: ... must equal resources.gpus_per_worker = 1",
               "error_type": "ConfigError", "resources": "h200x2"}
    text, passed = gpu_bench.check_table([ok, refused], images=300)
    assert passed and "| one | ok | 300 | 0 | 120.0 | 97.5 | 150.0 | 1.8 | 100.0 |" in text
    assert "refused up front: engine.tensor_parallel_size" in text
    # Dummy weights: 12 empty captions quarantined, the engine did their work: a pass.
    empty = {**ok, "label": "fp8", "captioned": 288, "quarantined": 12, "empty_captions": 12}
    assert gpu_bench.check_table([empty], images=300)[1] is True
    crashed = {"contender": "capjob", "label": "tp2", "status": "failed (1)", "resources": "h200x2"}
    lost = {**ok, "label": "pp2", "captioned": 299, "rows_written": 299, "distinct_ids": 299}
    text, passed = gpu_bench.check_table([ok, crashed, lost], images=300)
    assert not passed and "| tp2 | FAILED: failed (1) |" in text and "FAILED: 299 of 300 captioned" in text
    # A row written twice, or quarantined for anything but an empty caption, fails it too.
    doubled = {**ok, "label": "two", "rows_written": 301, "distinct_ids": 300}
    other = {**empty, "label": "pp2", "captioned": 287, "quarantined": 13}
    assert gpu_bench.check_table([doubled], images=300)[1] is False
    assert gpu_bench.check_table([other], images=300)[1] is False
    assert gpu_bench.check_table([], images=300)[1] is False  # nothing ran: not a pass


def test_url_fetch_bench_runs(tmp_path):
    out_json = tmp_path / "url_fetch.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "url_fetch_bench.py"), "--urls", "20", "--slow", "0.2", "--json", str(out_json)],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| rows/s |" in proc.stdout and "| fetch: 403 Forbidden | 0 |" in proc.stdout, proc.stdout
    result = json.loads(out_json.read_text())
    old, new = result["results"].values()
    assert new["outcomes"]["fetch: 403 Forbidden"] == result["kinds"]["403"]  # the true reason, per URL
    kinds = result["kinds"]
    assert new["outcomes"]["image"] == kinds.get("ok", 0) + kinds.get("slow", 0) + kinds.get("flaky", 0)


def test_profile_frames_busy_self_and_key_frames():
    """bench/profile_frames.py (issue 22's profile tables): the busiest engine thread, its busy share
    over the window, innermost frames with their line, and each key frame's inclusive share."""
    sys.path.insert(0, str(REPO / "bench"))
    import profile_frames

    step = "thread (7): MainThread;run_busy_loop (/x/site-packages/vllm/v1/engine/core.py:10)"
    raw = "\n".join([
        f"{step};execute_mm_encoder (/x/site-packages/vllm/v1/worker/gpu/mm/encoder_runner.py:60);"
        "_reduce_data (/x/site-packages/vllm/multimodal/inputs.py:571) 30",
        f"{step};Qwen2Model.forward (/x/site-packages/vllm/model_executor/models/qwen2.py:400) 60",
        f"{step} 10",
        "thread (8): Thread-1 (process_input_sockets);poll (/x/site-packages/zmq/sugar/poll.py:1) 500",  # not an engine thread
        "garbage line",
    ])
    result = profile_frames.analyze(raw, duration=1.0, rate=200)
    assert result["thread"] == "thread (7): MainThread" and result["samples"] == 100 and result["busy"] == 0.5
    assert result["self"][0] == ("Qwen2Model.forward (vllm/model_executor/models/qwen2.py:400)", 0.6)
    assert result["incl"]["_reduce_data"] == ("_reduce_data (vllm/multimodal/inputs.py)", 0.3)
    assert result["incl"]["execute_mm_encoder"][1] == 0.3 and result["incl"]["Qwen2Model.forward"][1] == 0.6
    assert "busy 0.5" in profile_frames.render("p.txt", result)
    assert profile_frames.analyze("")["samples"] == 0


def test_nopin_sitecustomize_unpins_vllm_encoder_batches():
    """bench/nopin_site (issue 22's unpinned run): with GPU_BENCH_NO_PIN=1 every process that has the
    folder on PYTHONPATH batches vLLM's multimodal fields with pin_memory=False, whatever vLLM asks;
    without the variable nothing is hooked."""
    check = ("import sys, torch\n"
             "hooked = any(type(f).__name__ == '_Hook' for f in sys.meta_path)\n"
             "if not hooked: print('NOT HOOKED'); sys.exit(0)\n"
             "from vllm.multimodal import inputs\n"
             "seen = []\n"
             "def fake(self, batch, *, pin_memory): seen.append(pin_memory); return batch\n"
             "for name in ('MultiModalFlatField', 'MultiModalBatchedField'):\n"
             "    cls = getattr(inputs, name)\n"
             "    cls._reduce_data.__kwdefaults__['_original'] = fake  # what the hook's wrapper calls\n"
             "    cls._reduce_data(None, [torch.ones(1)], pin_memory=True)\n"
             "print('PINNED', seen)\n")
    env = {**__import__("os").environ, "PYTHONPATH": str(REPO / "bench" / "nopin_site")}
    off = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True, timeout=120)
    assert off.returncode == 0 and "NOT HOOKED" in off.stdout, off.stderr[-2000:]
    on = subprocess.run([sys.executable, "-c", check], env={**env, "GPU_BENCH_NO_PIN": "1"}, capture_output=True, text=True, timeout=300)
    assert on.returncode == 0, on.stderr[-2000:]
    assert "PINNED [False, False]" in on.stdout, on.stdout + on.stderr[-2000:]


def test_gpu_bench_startup_timeline(tmp_path):
    """capjob's start-up steps from its logs (issue 22, session 9): Ray's and vLLM's own timestamps,
    the caption dataset (not capjob's peek at the source), both engines' spawn and readiness."""
    import time

    sys.path.insert(0, str(REPO / "bench"))
    import gpu_bench

    started = time.mktime(time.strptime("2026-12-03 16:06:00", "%Y-%m-%d %H:%M:%S"))
    actor = "\x1b[36m(MapWorker(MapBatches(vLLMEngineStageUDFWithCrashLedger)) pid=7887)\x1b[0m"
    full = tmp_path / "full.log"
    full.write_text("\n".join([
        "2026-12-03 16:06:08,500\tINFO worker.py:2024 -- Started a local Ray instance.",
        "2026-12-03 16:06:09,000\tINFO console.py:55 -- start-up +9.1 s: Ray up",
        "2026-12-03 16:06:30,000\tINFO streaming_executor.py:214 -- Starting execution of Dataset peek_1. Full logs are in x",
        "2026-12-03 16:06:30,001\tINFO streaming_executor.py:215 -- Execution plan of Dataset peek_1: InputDataBuffer[Input] -> LimitOperator[limit=4]",
        "2026-12-03 16:06:58,250\tINFO streaming_executor.py:214 -- Starting execution of Dataset main_2. Full logs are in x",
        "2026-12-03 16:06:58,251\tINFO streaming_executor.py:215 -- Execution plan of Dataset main_2: InputDataBuffer[Input] -> "
        "ActorPoolMapOperator[MapBatches(vLLMEngineStageUDFWithCrashLedger)]",
        f"{actor} INFO 12-03 16:07:21 [model.py:623] Resolved architecture: Qwen2_5_VLForConditionalGeneration",
        f"{actor} (EngineCore pid=8544) INFO 12-03 16:07:44 [core.py:116] Initializing a V1 LLM engine (v0.26.0) with config: x",
        f"{actor} (EngineCore pid=8545) INFO 12-03 16:07:46 [core.py:116] Initializing a V1 LLM engine (v0.26.0) with config: x",
        f"{actor} (EngineCore pid=8544) INFO 12-03 16:08:00 [backends.py:400] torch.compile took 6.5 s in total",
        f"{actor} (EngineCore pid=8544) INFO 12-03 16:08:20 [core.py:347] init engine (profile, create kv cache, warmup model) took 33.21 s",
        f"{actor} (EngineCore pid=8545) INFO 12-03 16:08:21 [core.py:347] init engine (profile, create kv cache, warmup model) took 34.00 s",
    ]) + "\n")
    console = tmp_path / "console.log"
    console.write_text("2026-12-03 16:06:08,500\tINFO worker.py:2024 -- Started a local Ray instance.\n")
    t = gpu_bench.startup_timeline([console, full, tmp_path / "missing.log"], started)
    assert t == {"ray_up_s": 8.5, "ray_data_start_s": 58.2, "engine_actor_s": 81.0, "engine_core_spawn_s": 104.0,
                 "engine_core_spawn_last_s": 106.0, "engine_ready_s": 140.0, "engine_ready_last_s": 141.0, "torch_compile_s": [6.5],
                 "capjob_marks": {"Ray up": 9.1}}


def test_tiny_train_speed_bench_runs():
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "tiny_train_speed.py"), "--steps", "2", "--reps", "1"],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = re.findall(r"^\| (.+?) \| (\d+\.\d+) \| (\d+\.\d+)x \| (\d+\.\d+) \|$", proc.stdout, re.MULTILINE)
    assert [r[0] for r in rows] == ["1 thread, Conv3d (before)", "2 threads, Conv3d", "2 threads, matmul (now)"], proc.stdout
    assert rows[0][2] == "1.00"
    # the patch embedding's two forms are the same sums: the same loss after the same steps
    assert abs(float(rows[1][3]) - float(rows[2][3])) < 1e-3, proc.stdout


def test_gpu_check_runs_the_presets_in_its_own_folder(tmp_path):
    """bench/gpu_check.sh's plan (GPU_CHECK_PLAN=1 runs nothing): each layout is the card's
    throughput preset (not bare engine sizes) plus the layout's overrides, pinned to the card's
    Ray label; every one composes and validates; its work folder is not gpu_bench's."""
    sys.path.insert(0, str(REPO / "bench"))
    sys.path.insert(0, str(REPO / "tests"))
    from helpers.config import compose

    from capjob.config import to_typed
    from capjob.stages.caption.engine import decide_placement

    for gpu, label in (("H200", "H200"), ("H100", "H100"), ("H200", "NVIDIA_H200_NVL")):
        proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--gpu", gpu, "one", "preset", "fp8", "two", "tp2", "pp2"],
                              env={**os.environ, "GPU_CHECK_PLAN": "1", "OUT": str(tmp_path), "GPU_CHECK_LABEL": label,
                                   "CAPJOB_BENCH_DIR": str(tmp_path / "bench-images")},
                              capture_output=True, text=True, timeout=60, cwd=REPO)
        assert proc.returncode == 0, proc.stderr
        work = re.search(r"^work (.*)$", proc.stdout, re.MULTILINE).group(1)
        assert work != str(tmp_path / "bench-images") and "gpu-check" in work
        layouts = dict(re.findall(r"^layout (\w+): (.*)$", proc.stdout, re.MULTILINE))
        assert list(layouts) == ["one", "preset", "fp8", "two", "tp2", "pp2"]
        for layout, overrides in layouts.items():
            args = ["model=qwen25vl_3b_dummy", *overrides.split()]
            assert f"experiment={gpu.lower()}_throughput" in args
            assert (f"resources.accelerator_type={label}" in args) == (label != gpu)
            cfg = to_typed(compose(args))
            assert cfg.engine.name == "vllm_throughput" and cfg.engine.max_num_seqs == 1024
            gpus = 2 if layout in ("two", "tp2", "pp2") else 1
            placement = decide_placement(cfg.resources, cfg.engine, available_gpus=gpus, node_gpus=gpus)
            replicas = {"one": 1, "preset": 2 if gpu == "H200" else 1, "fp8": 2 if gpu == "H200" else 1, "two": 2, "tp2": 1, "pp2": 1}
            assert cfg.resources.concurrency == replicas[layout], (gpu, layout)
            assert placement.gpus == {"tp2": 2, "pp2": 2}.get(layout, 1 / cfg.resources.replicas_per_gpu)
        assert to_typed(compose(["model=qwen25vl_3b_dummy", *layouts["fp8"].split()])).engine.quantization == "fp8"


def test_dedup_bench_sets_and_report(tmp_path):
    """bench/dedup_bench.py (issue 32): the repeats set is half exact repeats under other names,
    the distinct set has none, and the report gives requests saved and the overhead both ways."""
    sys.path.insert(0, str(REPO / "bench"))
    import dedup_bench
    import pyarrow.parquet as pq

    sets = dedup_bench.build_sets(tmp_path, 8)
    repeats = pq.read_table(sets["repeats"] / "part-0.parquet").column("image").to_pylist()
    distinct = pq.read_table(sets["distinct"] / "part-0.parquet").column("image").to_pylist()
    assert len(repeats) == len(distinct) == 8
    assert len({c["bytes"] for c in repeats}) == 4 and len({c["path"] for c in repeats}) == 8
    assert len({c["bytes"] for c in distinct}) == 8
    runs = [{"set": s, "dedup": m, "round": r, "engine_requests": 8 if m == "off" or s == "distinct" else 4, "rows": 8,
             "wall_s": w, "report_wall_s": w, "rows_per_s": round(8 / w, 3), "steady_s": None, "engine_s": 1.0,
             "distinct": 4 if (s, m) == ("repeats", "exact") else 8, "copies": 4 if (s, m) == ("repeats", "exact") else 0,
             "requests_saved": 0}
            for r, (s, m, w) in enumerate([("repeats", "off", 100.0), ("repeats", "exact", 60.0), ("distinct", "off", 100.0),
                                           ("distinct", "exact", 102.0), ("distinct", "exact", 101.0), ("distinct", "exact", 110.0)])]
    rows = dedup_bench.medians(runs)
    assert [r["rounds"] for r in rows] == [1, 1, 1, 3]
    text = dedup_bench.render(rows)
    assert "repeats: dedup on sends 4 engine requests instead of 8 (4 saved); wall 60.0 s vs 100.0 s (0.60x)" in text
    assert "distinct: dedup overhead +2.0% of wall time (102.0 s vs 100.0 s; target < 3%)" in text
    assert "| repeats | exact | 4 | 8 | 4 | 4 | 60.0 |" in text
