"""Ray: join a cluster or start a local one sized so every stage of the pipeline can run.

Ray Data LLM gives each CPU stage its own actor pool and the engine its own actor; on a
2-core machine those requests exceed the physical cores and the pipeline waits forever for a
CPU. A local Ray therefore gets at least as many logical CPUs as the stages ask for (vLLM and
PIL release the GIL and share the cores fine), and a CPU engine asks for no GPU.

On a cluster it joins: the checks before any engine starts (GPUs from the autoscaler, custom
resources, node labels, local paths every node must see) and, while the job runs, the watch on
its nodes (NodeWatch: a node lost mid-job).
"""

from __future__ import annotations

import _thread
import contextlib
import hashlib
import importlib
import importlib.abc
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from typing import Any, Iterator, Optional

import ray
from ray.autoscaler.sdk import request_resources
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from capjob.config import (CapjobConfig, EngineConfig, ModelConfig, ResourcesConfig, cluster_labels, format_selector,
                           selector_matches)
from capjob.errors import CapjobError, ClusterError, ConfigError
from capjob.models import remote
from capjob.stages.caption.engine import ACCELERATOR_PREFIX, EnginePlacement, accelerator_types, cpu_stages, replica_gpus
from capjob.stages.caption.render import WATCH_SIGNAL, interrupted_by_watch
from capjob.stages.storage import protocol_of

log = logging.getLogger(__name__)

METRICS_REPORT_INTERVAL_MS = 1000


def cluster_address(resources: ResourcesConfig) -> Optional[str]:
    """The Ray cluster the job joins (resources.address, else RAY_ADDRESS), or None: a local Ray of its own."""
    return resources.address or os.environ.get("RAY_ADDRESS") or None


def local_cpus_needed(resources: ResourcesConfig, engine: EngineConfig, placement: EnginePlacement) -> int:
    """Logical CPUs a local Ray needs so that every stage's actor and task can run at once."""
    r = resources
    engine_cpus = r.concurrency if placement.gpus == 0 else 0
    stage_cpus = len(cpu_stages(engine)) * r.cpu_stage_concurrency * r.cpu_stage_cpus
    # Room beside the actors for a read and a repartition task (Ray Data's default of 1 CPU
    # each) and for a decode (+ preprocess) and a write (+ postprocess) task: with less, the
    # read and the repartition take every CPU left and the engine waits for decoded images.
    task_cpus = 2 + 2 * r.preprocess_cpus
    return math.ceil(engine_cpus + stage_cpus + task_cpus)


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
    threads in `threads` (ModuleNotFoundError), and passes every other import on. One instance
    stays first in sys.meta_path for good (_LEAVE_OUT): the list is never changed while another
    thread's import may be walking it, only the set of threads is."""

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


def init_ray(resources: ResourcesConfig, engine: EngineConfig, placement: EnginePlacement,
             metrics_export_port: Optional[int] = None) -> dict[str, Any]:
    """Join the cluster (cluster_address) or start a local Ray sized for every stage
    (local_cpus_needed). Returns {address, resources, dashboard_url}."""
    address = cluster_address(resources)
    kwargs: dict[str, Any] = {"ignore_reinit_error": True, "log_to_driver": True}
    if address:
        kwargs["address"] = address
    else:
        # "local": a Ray of this job's own. Without it ray.init joins whatever `ray start` last
        # left in /tmp/ray/ray_current_cluster on this machine (a live cluster: "num_cpus ...
        # must not be provided"; a stopped one: a hang), although no address was asked for.
        kwargs["address"] = "local"
        kwargs["num_cpus"] = max(resources.num_cpus or os.cpu_count() or 1, local_cpus_needed(resources, engine, placement))
        # None: Ray starts its dashboard when its dependencies are installed (ray[default]).
        kwargs["include_dashboard"] = _include_dashboard(resources)
        if metrics_export_port:
            kwargs["_metrics_export_port"] = metrics_export_port
            # Every second rather than every 10: a short run's last counts must reach the endpoint.
            kwargs["_system_config"] = {"metrics_report_interval_ms": METRICS_REPORT_INTERVAL_MS}
    context = ray.init(**kwargs)
    return {"address": address or "local", "resources": ray.cluster_resources(),
            "dashboard_url": getattr(context, "dashboard_url", None) or None}


def _include_dashboard(resources: ResourcesConfig) -> Optional[bool]:
    """resources.include_dashboard, unless CAPJOB_RAY_DASHBOARD=0/1 overrides it (the test suite
    sets 0: see README, "Tests")."""
    env = os.environ.get("CAPJOB_RAY_DASHBOARD")
    if env is not None and env != "":
        return env.lower() not in ("0", "false", "no")
    return resources.include_dashboard


# Ray's built-in resource names: what is not one of these (or a node:/accelerator_type: label)
# is a custom resource some nodes were started with.
BUILTIN_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")


def custom_resources(cluster_resources: dict[str, float]) -> list[str]:
    return sorted(k for k in cluster_resources if k not in BUILTIN_RESOURCES and not k.startswith(("node:", ACCELERATOR_PREFIX)))


def wait_for_gpus(resources: ResourcesConfig, engine: EngineConfig, timeout_s: float, poll_s: float = 5.0) -> int:
    """On a cluster whose GPU workers are scaled to zero (resources.wait_for_gpus_s): ask Ray's
    autoscaler for the engines' GPUs (ray.autoscaler.sdk.request_resources, one bundle of a
    replica's GPUs per replica) and wait until one replica's GPUs have joined, at most
    `timeout_s` seconds; then withdraw the request (the engine actors' own demand keeps the
    nodes, and asks for the rest). Returns the cluster's GPUs. Raises ConfigError at the timeout.
    A CPU engine, or a cluster that already has the GPUs, returns at once."""
    gpus = replica_gpus(resources, engine, True)
    have = int(ray.cluster_resources().get("GPU", 0))
    if gpus <= 0 or have >= gpus:
        return have
    request_resources(bundles=[{"GPU": gpus}] * resources.concurrency)
    log.info("asked the autoscaler for %d x %g GPU(s); waiting up to %g s", resources.concurrency, gpus, timeout_s)
    deadline = time.monotonic() + timeout_s
    try:
        while have < gpus:
            if time.monotonic() >= deadline:
                raise ConfigError(
                    f"resources.wait_for_gpus_s: no engine's {gpus:g} GPU(s) joined the cluster within {timeout_s:g} s "
                    f"(it has {have} GPU(s)); check the GPU worker group (maxReplicas, node pool quota) or raise the wait"
                )
            time.sleep(poll_s)
            have = int(ray.cluster_resources().get("GPU", 0))
    finally:
        request_resources(bundles=[])
    return have


def check_engine_resources(wanted: dict[str, float], cluster_resources: dict[str, float]) -> None:
    """resources.engine_resources: every custom resource an engine replica asks for is on some
    node, in at least that amount; otherwise its actor would wait forever, as for a missing
    accelerator type. Raises ConfigError naming the custom resources the cluster has."""
    for name, amount in (wanted or {}).items():
        if cluster_resources.get(name, 0) >= float(amount) > 0:
            continue
        have = custom_resources(cluster_resources)
        raise ConfigError(
            f"resources.engine_resources: no node of the cluster has {amount:g} of resource {name!r} "
            f"(custom resources it has: {', '.join(have) or 'none'}); start the engine nodes with "
            f"`ray start --resources='{{\"{name}\": 1}}'` or remove it"
        )


def check_label_selectors(resources: ResourcesConfig, placement: EnginePlacement, nodes: list[dict[str, Any]]) -> None:
    """resources.engine_label_selector and cpu_label_selector: some alive node (`nodes`:
    ray.nodes()) carries each selector's labels, and for a GPU engine one such node has a GPU;
    otherwise the engine actors (or the CPU side's tasks) would wait forever for a node. Raises
    ConfigError in one line naming the labels the cluster's nodes have."""
    alive = [n for n in nodes if n.get("Alive")]
    for key, selector in (("resources.engine_label_selector", resources.engine_label_selector),
                          ("resources.cpu_label_selector", resources.cpu_label_selector)):
        if not selector:
            continue
        matching = [n for n in alive if selector_matches(selector, n.get("Labels") or {})]
        have = cluster_labels([n.get("Labels") or {} for n in alive])
        if not matching:
            raise ConfigError(
                f"{key}: no alive node of the cluster carries {format_selector(selector)} (labels of its {len(alive)} "
                f"node(s): {have}); label the nodes (`ray start --labels=KEY=VALUE`, KubeRay: the group's labels) or change the selector"
            )
        if key == "resources.engine_label_selector" and placement.gpus and not any(
                n.get("Resources", {}).get("GPU", 0) >= min(placement.gpus, 1) for n in matching):
            raise ConfigError(
                f"{key}: the {len(matching)} node(s) carrying {format_selector(selector)} have no GPU for an engine "
                f"replica of {placement.gpus:g} GPU(s) (labels of the cluster's nodes: {have}); change the selector"
            )


# --- a node lost mid-job ------------------------------------------------------------------------


def node_name(node: dict[str, Any]) -> str:
    """A node as the error lines name it: "ip (node id prefix)"."""
    return f"{node.get('NodeManagerAddress')} ({node['NodeID'][:8]})"


def can_host_engine(node: dict[str, Any], resources: ResourcesConfig, placement: EnginePlacement) -> bool:
    """An alive node on which an engine replica fits once free: its labels (engine_label_selector),
    custom resources (engine_resources), accelerator type and a GPU (or, for a CPU engine, a CPU)."""
    have = node.get("Resources") or {}
    if not node.get("Alive") or not selector_matches(resources.engine_label_selector, node.get("Labels") or {}):
        return False
    if any(have.get(name, 0) < float(amount) for name, amount in resources.engine_resources.items()):
        return False
    if not placement.gpus:
        return have.get("CPU", 0) >= 1
    if placement.accelerator_type and placement.accelerator_type not in accelerator_types(have, [node]):
        return False
    return have.get("GPU", 0) >= min(placement.gpus, 1)


def missing_hosts(resources: ResourcesConfig, placement: EnginePlacement, nodes: list[dict[str, Any]]) -> Optional[str]:
    """What no alive node of `nodes` can run any more: the engines, or the CPU side
    (cpu_label_selector); None when both still have a node."""
    if not any(can_host_engine(n, resources, placement) for n in nodes):
        need = [f"labels {format_selector(resources.engine_label_selector)}" if resources.engine_label_selector else "",
                f"resources {resources.engine_resources}" if resources.engine_resources else "",
                f"{placement.gpus:g} GPU(s){' ' + placement.accelerator_type if placement.accelerator_type else ''}"
                if placement.gpus else "a CPU"]
        return f"no alive node can run an engine replica ({', '.join(x for x in need if x)})"
    if resources.cpu_label_selector and not any(
            n.get("Alive") and selector_matches(resources.cpu_label_selector, n.get("Labels") or {}) for n in nodes):
        return f"no alive node carries resources.cpu_label_selector {format_selector(resources.cpu_label_selector)}"
    return None


class NodeWatch:
    """The driver's watch on the cluster's nodes during the run's Ray Data execution (guard()): a
    daemon thread lists them (ray.nodes()) every poll_s seconds.

    A node alive when the watch started and dead later was lost (spot preemption, a drain, a
    killed raylet; Ray marks it dead once its heartbeats stop, ~20 s). Ray Data restarts the
    actors it held and retries its tasks wherever they still fit, and the run goes on. When no
    alive node can run an engine replica (or the CPU side) any more (missing_hosts), the watch
    waits up to resources.node_lost_wait_s for one to join (an autoscaler replacing the node),
    then stops the run with a ClusterError naming the lost node; so does a Ray error that ends
    the execution after a loss. The rows written so far stay in the sink: the same command
    resumes with the rest (stages/resume.py)."""

    def __init__(self, resources: ResourcesConfig, placement: EnginePlacement, poll_s: float = 2.0,
                 list_nodes: Any = None) -> None:
        self.resources, self.placement, self.poll_s = resources, placement, poll_s
        self.list_nodes = list_nodes or ray.nodes
        self.known = {n["NodeID"]: node_name(n) for n in self.list_nodes() if n.get("Alive")}
        self.lost: dict[str, str] = {}  # node id -> "ip (id prefix) left the cluster mid-job (Ray's death reason)"
        self.missing: Optional[str] = None
        self.missing_since: Optional[float] = None
        self.error: Optional[ClusterError] = None
        self._stop = threading.Event()
        self._armed = False
        self._lock = threading.Lock()

    def check(self, now: Optional[float] = None) -> Optional[ClusterError]:
        """One look at the nodes: records lost ones, and returns the error to stop with once
        missing_hosts has held for node_lost_wait_s (None meanwhile)."""
        now = time.monotonic() if now is None else now
        nodes = self.list_nodes()
        for n in nodes:
            if n["NodeID"] in self.known and not n.get("Alive") and n["NodeID"] not in self.lost:
                reason = n.get("DeathReasonMessage") or "no reason given"
                self.lost[n["NodeID"]] = f"node {node_name(n)} left the cluster mid-job ({reason})"
                log.warning("%s; Ray restarts its actors and retries its tasks where they fit", self.lost[n["NodeID"]])
        if not self.lost:
            return None
        self.missing = missing_hosts(self.resources, self.placement, nodes)
        if self.missing is None:
            self.missing_since = None
            return None
        self.missing_since = self.missing_since if self.missing_since is not None else now
        if now - self.missing_since < self.resources.node_lost_wait_s:
            return None
        return ClusterError(f"{self.lost_line()} and {self.missing}, none joined within {self.resources.node_lost_wait_s:g} s "
                            f"(resources.node_lost_wait_s); {RESUME_HINT}")

    def lost_line(self) -> str:
        return "; ".join(self.lost.values())

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                error = self.check()
            except Exception:  # noqa: BLE001 - Ray going down with the run: nothing left to watch
                return
            if error is not None:
                with self._lock:
                    self.error = error
                    if self._armed:
                        _thread.interrupt_main(WATCH_SIGNAL)
                return

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        """Around the run's Ray Data execution (main thread): the watch's error (its thread's
        KeyboardInterrupt) and any Ray error that ends the execution after a node was lost come
        out as one ClusterError naming the node. A KeyboardInterrupt arriving just after the
        guard closed is the caller's to map: check `error` first (pipeline.run does)."""
        main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(WATCH_SIGNAL, interrupted_by_watch) if main else None
        thread = threading.Thread(target=self._run, name="capjob-nodes", daemon=True)
        with self._lock:
            self._armed = main
        thread.start()
        try:
            yield
        except BaseException as e:
            with self._lock:
                self._armed = False
            if self.error is not None:
                raise self.error from None
            if not isinstance(e, (KeyboardInterrupt, CapjobError)):
                with contextlib.suppress(Exception):
                    self.check()  # Ray may report the failure before the watch's next look
                if self.lost:
                    cause = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                    raise ClusterError(f"{self.lost_line()} and the run failed with it ({type(e).__name__}: {cause[:300]}); "
                                       f"{RESUME_HINT}") from e
            raise
        finally:
            with self._lock:
                self._armed = False
            self._stop.set()
            if main:
                signal.signal(WATCH_SIGNAL, signal.SIG_DFL if previous is None else previous)


RESUME_HINT = ("the rows written so far are kept in the sink: run the same command to caption the rest "
               "(once the cluster has a node for them)")


# --- paths every node must see ----------------------------------------------------------------

PROBE_TIMEOUT_S = 120  # a node that must first start a worker process on a loaded machine


def path_signature(path: str) -> Optional[str]:
    """What a node sees at a local path, comparable between nodes: None (nothing there), the
    size of a file, or a digest of a folder's top-level names and file sizes (the first 1,000
    names). Two nodes on one shared mount (or with identical copies) agree; a node that lacks
    the folder, or has another one there, does not."""
    try:
        if not os.path.isdir(path):
            return f"file:{os.path.getsize(path)}" if os.path.isfile(path) else None
        entries = sorted((e.name, e.stat().st_size if e.is_file() else -1) for e in os.scandir(path)
                         if not e.name.startswith(".capjob-write-probe"))[:1000]
    except OSError:
        return None
    return "dir:" + hashlib.sha256(repr(entries).encode()).hexdigest()[:16]


def node_paths(paths: list[str]) -> dict[str, Optional[str]]:
    """Ray task body: path_signature of each path, as this node sees it."""
    return {p: path_signature(p) for p in paths}


def local_paths(cfg: CapjobConfig, model_source: Optional[str]) -> dict[str, str]:
    """{config key: absolute path} of the job's local paths (not URLs, not hub ids) that Ray
    tasks and actors open on their own nodes: the model folder, the data, the sink."""
    found: dict[str, str] = {}
    if model_source and not remote.is_url(model_source) and os.path.isdir(os.path.expanduser(model_source)):
        found["model.source" if cfg.model.source else "model.builder"] = os.path.abspath(os.path.expanduser(model_source))
    if cfg.data.path and protocol_of(cfg.data.path) == "file" and os.path.exists(os.path.expanduser(cfg.data.path)):
        found["data.path"] = os.path.abspath(os.path.expanduser(cfg.data.path.removeprefix("file://")))
    for key, path in (("sink.path", cfg.sink.path), ("sink.txt_dir", cfg.sink.txt_dir)):
        if path and protocol_of(path) == "file":
            found[key] = os.path.abspath(os.path.expanduser(path.removeprefix("file://")))
    return found


def unseen_paths(paths: dict[str, str], driver: dict[str, Optional[str]],
                 nodes: dict[str, dict[str, Optional[str]]]) -> list[tuple[str, str, str]]:
    """(config key, node, what the node sees) for every path some node does not see as the
    driver does: "nothing" or "other files"."""
    out = []
    for key, path in paths.items():
        for node, view in nodes.items():
            seen = view.get(path)
            if seen != driver.get(path):
                out.append((key, node, "nothing" if seen is None else "other files"))
                break
    return out


def refusal(model: ModelConfig, key: str, path: str, node: str, seen: str) -> str:
    """The one-line error for a local path a node does not see, naming the fix."""
    where = f"node {node} sees {seen} there"
    if key == "model.builder":
        name = f"{model.builder}"
        return (f"model.builder: the {name} model capjob built at {path} is on the driver's disk only ({where}); upload it "
                f"(e.g. `aws s3 sync {path} s3://BUCKET/models/{name}`) and set model.source=s3://BUCKET/models/{name}")
    if key == "model.source":
        fix = "put the checkpoint on object storage and set model.source=s3://BUCKET/... (each node downloads it), or on a mount every node shares"
    elif key == "data.path":
        fix = "set data.path to an object store URL (s3://BUCKET/...) or a mount every node shares"
    else:
        fix = f"set {key} to an object store URL (s3://BUCKET/...) or a mount every node shares"
    return f"{key}: {path} is a local path that not every node of the cluster sees ({where}); {fix}"


def check_paths_on_nodes(cfg: CapjobConfig, model_source: Optional[str], probe: Optional[Any] = None) -> int:
    """On a cluster: every local path of the job (local_paths) is seen by every alive node as by
    the driver, else ConfigError (refusal). `probe(paths) -> {node: {path: signature}}` asks the
    nodes (default: one zero-CPU Ray task pinned to each). Returns the number of nodes asked."""
    paths = local_paths(cfg, model_source)
    if not paths:
        return 0
    views = (probe or probe_nodes)(sorted(set(paths.values())))
    driver = node_paths(sorted(set(paths.values())))
    for key, node, seen in unseen_paths(paths, driver, views):
        raise ConfigError(refusal(cfg.model, key, paths[key], node, seen))
    return len(views)


def probe_nodes(paths: list[str]) -> dict[str, dict[str, Optional[str]]]:
    """{node "ip (id prefix)": node_paths(paths) there} for every alive node of the connected
    cluster. A node that does not answer within PROBE_TIMEOUT_S is left out (logged): its tasks
    would wait for it too."""

    probe = ray.remote(num_cpus=0, max_retries=0)(node_paths)
    refs = {}
    for n in ray.nodes():
        if n.get("Alive"):
            label = f"{n.get('NodeManagerAddress')} ({n['NodeID'][:8]})"
            refs[label] = probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(paths)
    ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=PROBE_TIMEOUT_S)
    out = {}
    for label, ref in refs.items():
        if ref in ready:
            out[label] = ray.get(ref)
        else:
            log.warning("node %s did not answer the path check within %d s; its view of %s is not checked", label, PROBE_TIMEOUT_S, paths)
    return out
