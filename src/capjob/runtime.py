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
import logging
import math
import os
import signal
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
