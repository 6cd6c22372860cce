"""Ray: join a cluster or start a local one sized so every stage of the pipeline can run.

Ray Data LLM gives each CPU stage its own actor pool and the engine its own actor; on a
2-core machine those requests exceed the physical cores and the pipeline waits forever for a
CPU. A local Ray therefore gets at least as many logical CPUs as the stages ask for (vLLM and
PIL release the GIL and share the cores fine), and a CPU engine asks for no GPU.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import threading
import time
from typing import Any, Optional

import ray
from ray.autoscaler.sdk import request_resources
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from capjob.config import CapjobConfig, EngineConfig, ModelConfig, ResourcesConfig
from capjob.errors import ConfigError
from capjob.models import remote
from capjob.stages.caption.engine import ACCELERATOR_PREFIX, EnginePlacement, cpu_stages, replica_gpus
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
# stages): ray.data.llm imports vLLM, torch and transformers (its vLLM stage module and its
# SGLang config): a large share of the driver's start-up (docs/benchmarks.md, start-up timeline).
ENGINE_DRIVER_MODULES = ("ray.data.llm",)


def import_in_background(modules: tuple[str, ...] = ENGINE_DRIVER_MODULES) -> threading.Thread:
    """Import `modules` in a daemon thread, so that the import overlaps what the main thread does
    meanwhile (Ray's start, which mostly waits on the processes it spawns). The main thread's own
    import of the same module waits for this one (Python's per-module import lock) and raises
    any error of it; this thread ignores errors. Call after the main thread imported the
    packages both share (ray, ray.data): two threads importing one package's modules in opposite
    orders could each wait for the other."""

    def run() -> None:
        import importlib

        for name in modules:
            try:
                importlib.import_module(name)
            except BaseException:  # noqa: BLE001 - the main thread's import raises it again, where it is handled
                return

    thread = threading.Thread(target=run, name="capjob-import", daemon=True)
    thread.start()
    return thread


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
