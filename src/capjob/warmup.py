"""The driver's start-up work beside Ray's start (DriverWarmup): the imports the processor
build needs, without vLLM, the model's config class, and the library's own actors.

Measured on the 2-core machine, capjob's first caption is the end of a chain: Ray's start, the
driver's import of Ray Data LLM and the processor build, then the engine actor's worker, its
vLLM import and engine start, which can only begin when Ray Data executes. This module takes
the driver's part off that chain where it can (docs/benchmarks.md, "Session 16").
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.abc
import json
import logging
import os
import sys
import threading
from typing import Any, Iterator, Optional

import ray

log = logging.getLogger(__name__)


# What the driver imports to build the Ray Data LLM processor (and the prompt-render task's
# stages): ray.data.llm, with torch and transformers: a large share of the driver's start-up
# (docs/benchmarks.md, start-up timeline).
ENGINE_DRIVER_MODULES = ("ray.data.llm",)
# What that import leaves out. The driver never runs vLLM (its engine actors do), and Ray Data
# LLM imports vLLM lazily wherever it runs it; on the driver it imports vLLM only to name
# vLLM's fatal errors, behind an `except ImportError` kept for drivers without vLLM
# (ray/llm/_internal/common/errors.py, Ray 2.58.1). Importing it anyway costs the driver one
# more full vLLM import (docs/benchmarks.md, "Session 16").
DRIVER_LEAVES_OUT = ("vllm",)


class _LeaveOut(importlib.abc.MetaPathFinder):
    """A finder that refuses the packages `names` (and their submodules) to the imports of the
    threads in `threads` (ModuleNotFoundError), and passes every other import on. One instance,
    _LEAVE_OUT, is put first in sys.meta_path once and stays: the list is never changed while
    another thread's import may be walking it, only the set of threads is."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self.names = names
        self.threads: set[int] = set()

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> None:
        if threading.get_ident() in self.threads and fullname.split(".", 1)[0] in self.names:
            raise ModuleNotFoundError(f"No module named {fullname!r} (left out of the driver's import)", name=fullname)
        return None


_LEAVE_OUT = _LeaveOut(DRIVER_LEAVES_OUT)
_LEAVE_OUT_LOCK = threading.Lock()


@contextlib.contextmanager
def leaving_out_driver_imports() -> Iterator[None]:
    """Within: this thread's imports refuse DRIVER_LEAVES_OUT (other threads' do not)."""
    with _LEAVE_OUT_LOCK:
        if not any(f is _LEAVE_OUT for f in sys.meta_path):
            sys.meta_path.insert(0, _LEAVE_OUT)
        _LEAVE_OUT.threads.add(threading.get_ident())
    try:
        yield
    finally:
        _LEAVE_OUT.threads.discard(threading.get_ident())


def import_model_config(model_source: Optional[str]) -> None:
    """Import the transformers config class of a local model folder (config.json's model_type,
    transformers' CONFIG_MAPPING): the module Ray Data LLM's processor build imports when it
    reads the model's config with AutoConfig (ray/llm/_internal/batch/processor/
    vllm_engine_proc.py). Anything else (a hub id, a URL, no config.json) imports nothing."""
    if not model_source or not os.path.isfile(os.path.join(model_source, "config.json")):
        return
    from transformers import CONFIG_MAPPING  # here, not at load: DriverWarmup's thread imports it

    with open(os.path.join(model_source, "config.json")) as f:
        model_type = json.load(f).get("model_type")
    if model_type in CONFIG_MAPPING:
        CONFIG_MAPPING[model_type]  # the lazy mapping imports the class's module on access


def start_llm_telemetry() -> Any:
    """Start Ray Data LLM's telemetry agent, the named actor its processor build gets or
    creates and then waits on to record the processor (usage_telemetry/usage.py,
    push_telemetry_report, Ray 2.58.1); returns its handle without waiting (None where that
    failed: the build starts it). Call with Ray initialised: Ray's auto-init would start one."""
    try:  # imported here: in DriverWarmup's thread, once ray.data.llm is
        from ray.llm._internal.batch.observability.usage_telemetry.usage import get_or_create_telemetry_agent

        return get_or_create_telemetry_agent().remote_telemetry_agent
    except Exception:  # an optimisation only: the build starts it
        log.debug("Ray Data LLM's telemetry agent not started early", exc_info=True)
        return None


def start_data_actors() -> list[str]:
    """Start the named actors Ray Data's execution gets or creates when it begins: its stats
    actor, autoscaling coordinator and actor-location tracker (Ray 2.58.1's own get-or-create
    helpers, so execution finds these very actors, never copies). Started early, their workers
    start while the driver is busy rather than beside the engine's. Best effort: one that fails,
    and those after it, are left to execution. Returns the names started. Call with Ray
    initialised: Ray's auto-init would start one."""
    started = []
    try:  # imported here: in DriverWarmup's thread, not at load
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import \
            get_or_create_autoscaling_coordinator
        from ray.data._internal.execution.node_trackers.actor_location import get_or_create_actor_location_tracker
        from ray.data._internal.stats import get_or_create_stats_actor

        for name, make in (("data_stats", get_or_create_stats_actor), ("data_autoscaling", get_or_create_autoscaling_coordinator),
                           ("data_actor_locations", get_or_create_actor_location_tracker)):
            make()
            started.append(name)
    except Exception:  # an optimisation only: execution starts them
        log.debug("Ray Data's actors not started early", exc_info=True)
    return started


# How long the warm-up waits for the telemetry agent's first answer before it starts Ray Data's
# actors anyway (a new worker takes 1-3 s on 2 busy cores).
TELEMETRY_WAIT_S = 30.0


class DriverWarmup:
    """The driver's start-up work that can overlap Ray's start, in one daemon thread: import
    ENGINE_DRIVER_MODULES without DRIVER_LEAVES_OUT (leaving_out_driver_imports), the model's
    config class (import_model_config), and, once the caller says Ray is up (ray_up()), the
    library's own actors: Ray Data LLM's telemetry agent (start_llm_telemetry: the processor
    build waits for it) as soon as both the imports and Ray are there, then, once it answers,
    Ray Data's (start_data_actors).

    The main thread's own import of the same modules waits for this one (Python's per-module
    import lock) and raises any error of it; this thread ignores errors: a module it failed to
    import is imported again, in full, by the main thread. Start it after the main thread
    imported the packages both share (ray, ray.data): two threads importing one package's
    modules in opposite orders could each wait for the other.

    close() before Ray is shut down: a Ray call of the thread after the shutdown would start a
    new default Ray (Ray's auto-init). Every Ray call of the thread holds a lock and first
    checks that it is not closed and that Ray is up."""

    def __init__(self, modules: tuple[str, ...] = ENGINE_DRIVER_MODULES) -> None:
        self.modules = modules
        self.model_source: Optional[str] = None
        self._ray_up = threading.Event()
        self._closed = False
        self._lock = threading.Lock()  # held by each Ray call of the thread, and by close()
        self._answer: Any = None  # the telemetry agent's first answer, awaited
        self._asked = False
        self.started_actors: list[str] = []
        self.thread = threading.Thread(target=self._run, name="capjob-warmup", daemon=True)

    def start(self, model_source: Optional[str] = None) -> "DriverWarmup":
        self.model_source = model_source
        self.thread.start()
        return self

    def ray_up(self) -> None:
        """Ray is initialised: the thread may start the library's actors (after its imports)."""
        self._ray_up.set()

    def close(self) -> None:
        """Returns once no Ray call of the thread is under way, and none follows (a close()
        interrupted while it waits has already stopped the next one)."""
        self._closed = True
        self._ray_up.set()  # a thread still waiting for Ray wakes up, and ends
        with self._lock:
            pass

    def _ray_call(self, call: Any) -> Any:
        """call() under the lock while open and Ray is up; None otherwise, or when it fails."""
        with self._lock:
            if self._closed or not ray.is_initialized():
                return None
            try:
                return call()
            except Exception:  # an optimisation only: the build and execution start what is missing
                log.debug("the driver's warm-up: a Ray call failed", exc_info=True)
                return None

    def _run(self) -> None:
        try:
            with leaving_out_driver_imports():
                for name in self.modules:
                    importlib.import_module(name)
        except BaseException:  # noqa: BLE001 - the main thread's import raises it again, where it is handled
            return
        if self._ray_up.is_set():
            self._ask_telemetry()
        with contextlib.suppress(Exception):
            import_model_config(self.model_source)
        self._ray_up.wait()
        if not self._asked:
            self._ask_telemetry()
        # Ray Data's actors once the agent answers: Ray starts workers in the order they are
        # asked for, and the build waits for that one. In short waits: close() waits for one.
        for _ in range(int(TELEMETRY_WAIT_S / 0.2)):
            if self._ray_call(lambda: self._answer is None or bool(ray.wait([self._answer], timeout=0.2)[0])) is not False:
                break
        self._ray_call(lambda: self.started_actors.extend(start_data_actors()))
        with self._lock:
            self._answer = None  # the last Ray handle, released while Ray is still up

    def _ask_telemetry(self) -> None:
        self._asked = True

        def ask() -> None:
            agent = start_llm_telemetry()
            if agent is not None:
                self.started_actors.append("llm_telemetry")
                self._answer = agent.generate_report.remote()

        self._ray_call(ask)
