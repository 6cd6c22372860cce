"""Ray: join a cluster or start a local one sized so every stage of the pipeline can run.

Ray Data LLM gives each CPU stage its own actor pool and the engine its own actor; on a
2-core machine those requests exceed the physical cores and the pipeline waits forever for a
CPU. A local Ray therefore gets at least as many logical CPUs as the stages ask for (vLLM and
PIL release the GIL and share the cores fine), and a CPU engine asks for no GPU.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from typing import Any, Optional

from capjob.config import CapjobConfig
from capjob.errors import ConfigError
from capjob.processor import EnginePlacement, cpu_stages

log = logging.getLogger(__name__)

METRICS_REPORT_INTERVAL_MS = 1000


def local_gpu_count() -> int:
    """GPUs on this machine, found without starting Ray or importing torch."""
    try:
        from ray._private.accelerators import NvidiaGPUAcceleratorManager

        return int(NvidiaGPUAcceleratorManager.get_current_node_num_accelerators() or 0)
    except Exception:  # noqa: BLE001 - no driver, no NVML
        return 0


def cluster_address(cfg: CapjobConfig) -> Optional[str]:
    return cfg.resources.address or os.environ.get("RAY_ADDRESS") or None


def replica_gpus(cfg: CapjobConfig, has_gpus: bool) -> float:
    """GPUs one engine replica asks for: gpus_per_worker, else TP x PP on a GPU cluster (0 = vLLM
    on CPU); 1/N of one GPU when resources.replicas_per_gpu = N share it."""
    r, e = cfg.resources, cfg.engine
    gpus = r.gpus_per_worker if r.gpus_per_worker is not None else (e.tensor_parallel_size * e.pipeline_parallel_size if has_gpus else 0)
    return 1 / r.replicas_per_gpu if gpus > 0 and r.replicas_per_gpu > 1 else gpus


def decide_placement(cfg: CapjobConfig, available_gpus: int, node_gpus: Optional[int] = None) -> EnginePlacement:
    """GPUs per engine replica, checked against what the cluster has (available_gpus in all,
    node_gpus on its largest node, None: not known). Raises ConfigError."""
    r, e = cfg.resources, cfg.engine
    model_parallel = e.tensor_parallel_size * e.pipeline_parallel_size
    gpus = replica_gpus(cfg, available_gpus > 0)
    if gpus > available_gpus:
        raise ConfigError(
            f"resources.gpus_per_worker: each engine replica needs {gpus:g} GPU(s) "
            f"(engine.tensor_parallel_size x engine.pipeline_parallel_size = {model_parallel}) "
            f"but the cluster has {available_gpus}; use resources=local on a CPU machine or lower TP/PP"
        )
    if gpus > 0 and gpus * r.concurrency > available_gpus + 1e-9:
        log.warning(
            "resources.concurrency=%d replicas x %g GPU(s) > %d GPU(s): replicas beyond %d will wait",
            r.concurrency, gpus, available_gpus, int(available_gpus / gpus + 1e-9),
        )
    if gpus == 0 and model_parallel > 1:
        raise ConfigError("engine.tensor_parallel_size: TP/PP > 1 needs GPUs and this cluster has none")
    return EnginePlacement(gpus=gpus, accelerator_type=r.accelerator_type if gpus else None, node_gpus=node_gpus)


def largest_node_gpus() -> int:
    """The most GPUs one alive node of the connected Ray cluster has."""
    import ray

    return int(max((n.get("Resources", {}).get("GPU", 0) for n in ray.nodes() if n.get("Alive")), default=0))


ACCELERATOR_PREFIX = "accelerator_type:"  # Ray's per-node label resource, e.g. accelerator_type:H200


def check_accelerator_type(placement: EnginePlacement, cluster_resources: dict[str, float]) -> None:
    """A GPU engine pinned to resources.accelerator_type needs a node with Ray's label for it
    (`accelerator_type:<type>` in ray.cluster_resources(); Ray names an NVIDIA H200 "H200").
    Without one, Ray Data's engine actor would stay pending forever (the autoscaler logs "No
    available node types can fulfill resource request"). Checked against the nodes up when the
    job starts. Raises ConfigError naming what the cluster has."""
    want = placement.accelerator_type
    if not want or not placement.gpus:
        return
    have = sorted(k[len(ACCELERATOR_PREFIX):] for k in cluster_resources if k.startswith(ACCELERATOR_PREFIX))
    if want in have:
        return
    gpus = int(cluster_resources.get("GPU", 0))
    types = f"accelerator type(s) {', '.join(have)}" if have else "no accelerator type label"
    raise ConfigError(
        f"resources.accelerator_type: no node of the cluster has accelerator type {want!r} "
        f"(it has {gpus} GPU(s), {types}); set resources.accelerator_type to one of those, or null for any GPU"
    )


def local_cpus_needed(cfg: CapjobConfig, placement: EnginePlacement) -> int:
    r = cfg.resources
    engine_cpus = r.concurrency if placement.gpus == 0 else 0
    stage_cpus = len(cpu_stages(cfg)) * r.cpu_stage_concurrency * r.cpu_stage_cpus
    # Room beside the actors for a read and a repartition task (Ray Data's default of 1 CPU
    # each) and for a decode (+ preprocess) and a write (+ postprocess) task: with less, the
    # read and the repartition take every CPU left and the engine waits for decoded images.
    task_cpus = 2 + 2 * r.preprocess_cpus
    return math.ceil(engine_cpus + stage_cpus + task_cpus)


# What the driver imports to build the Ray Data LLM processor (and the prompt-render task's
# stages): ray.data.llm imports vLLM, torch and transformers (its vLLM stage module and its
# SGLang config), 10-26 s of the driver's start-up on the 2-core CI machine (session 9).
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


def init_ray(cfg: CapjobConfig, placement: EnginePlacement, metrics_export_port: Optional[int] = None) -> dict[str, Any]:
    import ray

    address = cluster_address(cfg)
    kwargs: dict[str, Any] = {"ignore_reinit_error": True, "log_to_driver": True}
    if address:
        kwargs["address"] = address
    else:
        # "local": a Ray of this job's own. Without it ray.init joins whatever `ray start` last
        # left in /tmp/ray/ray_current_cluster on this machine (a live cluster: "num_cpus ...
        # must not be provided"; a stopped one: a hang), although no address was asked for.
        kwargs["address"] = "local"
        kwargs["num_cpus"] = max(cfg.resources.num_cpus or os.cpu_count() or 1, local_cpus_needed(cfg, placement))
        # None: Ray starts its dashboard when its dependencies are installed (ray[default]).
        kwargs["include_dashboard"] = _include_dashboard(cfg)
        if metrics_export_port:
            kwargs["_metrics_export_port"] = metrics_export_port
            # Every second rather than every 10: a short run's last counts must reach the endpoint.
            kwargs["_system_config"] = {"metrics_report_interval_ms": METRICS_REPORT_INTERVAL_MS}
    context = ray.init(**kwargs)
    return {"address": address or "local", "resources": ray.cluster_resources(),
            "dashboard_url": getattr(context, "dashboard_url", None) or None}


def _include_dashboard(cfg: CapjobConfig) -> Optional[bool]:
    """resources.include_dashboard, unless CAPJOB_RAY_DASHBOARD=0/1 overrides it (the test suite
    sets 0: see README, "Tests")."""
    env = os.environ.get("CAPJOB_RAY_DASHBOARD")
    if env is not None and env != "":
        return env.lower() not in ("0", "false", "no")
    return cfg.resources.include_dashboard


# Ray's built-in resource names: what is not one of these (or a node:/accelerator_type: label)
# is a custom resource some nodes were started with.
BUILTIN_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")


def custom_resources(cluster_resources: dict[str, float]) -> list[str]:
    return sorted(k for k in cluster_resources if k not in BUILTIN_RESOURCES and not k.startswith(("node:", ACCELERATOR_PREFIX)))


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
    import hashlib

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
    from capjob.models import remote
    from capjob.stages.sources.storage import protocol_of

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


def refusal(cfg: CapjobConfig, key: str, path: str, node: str, seen: str) -> str:
    """The one-line error for a local path a node does not see, naming the fix."""
    where = f"node {node} sees {seen} there"
    if key == "model.builder":
        name = f"{cfg.model.builder}"
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
        raise ConfigError(refusal(cfg, key, paths[key], node, seen))
    return len(views)


def probe_nodes(paths: list[str]) -> dict[str, dict[str, Optional[str]]]:
    """{node "ip (id prefix)": node_paths(paths) there} for every alive node of the connected
    cluster. A node that does not answer within PROBE_TIMEOUT_S is left out (logged): its tasks
    would wait for it too."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

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
