"""capjob.warmup: the start-up work beside Ray's start (DriverWarmup), each in a fresh Python:
what the driver imports and what it leaves out, and the library actors it starts early."""

import json
import subprocess
import sys
import textwrap
import threading

import pytest

from capjob.warmup import _LEAVE_OUT, leaving_out_driver_imports


def run_python(code: str, timeout: int = 240) -> dict:
    """Run `code` in a fresh interpreter; it prints one JSON line last, returned here."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_finder_refuses_the_left_out_packages_to_the_threads_inside_only():
    with leaving_out_driver_imports():
        with pytest.raises(ModuleNotFoundError, match="vllm.v1.engine"):
            _LEAVE_OUT.find_spec("vllm.v1.engine")
        with pytest.raises(ModuleNotFoundError):
            _LEAVE_OUT.find_spec("vllm")
        assert _LEAVE_OUT.find_spec("vllm_like_name") is None  # another package whose name starts the same
        assert _LEAVE_OUT.find_spec("ray.data.llm") is None
        seen = []
        other = threading.Thread(target=lambda: seen.append(_LEAVE_OUT.find_spec("vllm.v1.engine")))
        other.start()
        other.join()
        assert seen == [None]  # any other thread imports vLLM as usual
    assert _LEAVE_OUT.find_spec("vllm") is None  # and so does this one, once out
    # It stays installed: sys.meta_path is never changed under another thread's import.
    assert any(f is _LEAVE_OUT for f in sys.meta_path)


def test_a_closed_warmup_starts_no_ray():
    """After close() (the job's end, before Ray is shut down) the thread makes no Ray call:
    one would start a new default Ray (Ray's auto-init) under the next job of a sweep."""
    out = run_python("""
        import json
        import ray
        from capjob.warmup import DriverWarmup
        warmup = DriverWarmup(modules=("json",)).start()
        warmup.close()
        warmup.ray_up()
        warmup.thread.join(timeout=60)
        print(json.dumps({"alive": warmup.thread.is_alive(), "ray": ray.is_initialized(), "started": warmup.started_actors}))
    """)
    assert out == {"alive": False, "ray": False, "started": []}


def test_the_driver_imports_ray_data_llm_and_the_model_config_without_vllm(tmp_path):
    """The warm-up thread leaves the driver with Ray Data LLM (the processor's API) and the
    model's transformers config class imported, vLLM not imported, and no thread refused it
    any more: a later import of vLLM by any thread is an ordinary one. Ray Data LLM names no fatal vLLM error on
    this driver, as on one without vLLM installed (its engine actors import vLLM themselves)."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl"}))
    out = run_python(f"""
        import json, sys
        import ray, ray.data
        from capjob.warmup import DriverWarmup, _LEAVE_OUT
        warmup = DriverWarmup().start({str(model)!r})
        warmup.close()  # no Ray here: the thread imports, then ends
        warmup.thread.join(timeout=200)
        from ray.data.llm import build_processor, vLLMEngineProcessorConfig
        from ray.llm._internal.common.errors import VLLM_FATAL_ERRORS
        print(json.dumps({{
            "alive": warmup.thread.is_alive(),
            "vllm": sorted(m for m in sys.modules if m == "vllm" or m.startswith("vllm.")),
            "llm": "ray.data.llm" in sys.modules,
            "config_class": "transformers.models.qwen2_5_vl.configuration_qwen2_5_vl" in sys.modules,
            "refusing": sorted(_LEAVE_OUT.threads),
            "fatal": len(VLLM_FATAL_ERRORS),
        }}))
    """)
    assert out == {"alive": False, "vllm": [], "llm": True, "config_class": True, "refusing": [], "fatal": 0}


def test_a_warmup_closed_while_it_waits_for_the_telemetry_agent_makes_no_ray_call_after():
    """close() during the wait for the agent's answer: it returns at once (the thread's waits
    are short), the thread starts no more actors, and a Ray shut down after close() stays down
    (no auto-init of a default Ray)."""
    out = run_python("""
        import json, time
        import ray, ray.data
        from capjob.warmup import DriverWarmup
        ray.init(num_cpus=2, include_dashboard=False)
        warmup = DriverWarmup().start(None)
        warmup.ray_up()
        deadline = time.monotonic() + 120
        while warmup._answer is None and time.monotonic() < deadline:  # the agent asked, not yet answered
            time.sleep(0.01)
        t = time.monotonic()
        warmup.close()
        took = time.monotonic() - t
        ray.shutdown()
        warmup.thread.join(timeout=60)
        time.sleep(1)
        print(json.dumps({"took": took, "alive": warmup.thread.is_alive(), "ray": ray.is_initialized(),
                          "started": warmup.started_actors}))
    """)
    assert out["took"] < 1.0
    assert out["alive"] is False and out["ray"] is False
    assert out["started"] == ["llm_telemetry"]  # Ray Data's actors were not started after close()


def test_the_early_library_actors_are_the_ones_execution_uses():
    """start_llm_telemetry and start_data_actors make the named actors through Ray's own
    get-or-create helpers: a Ray Data execution and a processor build afterwards start no
    second stats actor, autoscaling coordinator, actor-location tracker or telemetry agent."""
    out = run_python("""
        import json
        import ray, ray.data
        from ray._private.state import actors  # the GCS's table (ray.util.state needs the dashboard)
        from capjob.warmup import start_data_actors, start_llm_telemetry
        ray.init(num_cpus=2, include_dashboard=False)
        agent = start_llm_telemetry()
        ray.get(agent.generate_report.remote(), timeout=60)
        started = start_data_actors()
        assert ray.data.range(8).map_batches(lambda b: b).count() == 8
        from ray.llm._internal.batch.observability.usage_telemetry.usage import get_or_create_telemetry_agent
        assert get_or_create_telemetry_agent().remote_telemetry_agent._actor_id == agent._actor_id
        names = [a["ActorClassName"] for a in actors().values() if a["State"] == "ALIVE"]
        print(json.dumps({"started": started, "names": names}))
    """)
    assert out["started"] == ["data_stats", "data_autoscaling", "data_actor_locations"]
    for name in ("_StatsActor", "_TelemetryAgent", "ActorLocationTracker"):
        assert out["names"].count(name) == 1, out["names"]
    assert sum("AutoscalingCoordinator" in n for n in out["names"]) == 1, out["names"]
