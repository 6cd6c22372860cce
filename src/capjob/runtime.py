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
