"""Beyond one machine: model checkpoints on object storage, engines pinned to another node (by a
custom resource, or by node labels on "spot" nodes), a node lost mid-job, and the preflight that
refuses a local path some node does not see or a label no node carries.

Fast: the refusal (its decision and one-line message, with the nodes' views given), engine
resources, a model URL's preflight and capjob's per-node fetch against moto's S3 server.
e2e: a two-node Ray cluster on this machine (two `ray start` processes, each with its own temp
dir, Hugging Face cache and capjob cache, and its own labels: the head `ray.io/market-type=on-demand`,
the other `spot`, as KubeRay sets them); the engine is pinned by a custom resource to the node
that is not the driver's, the checkpoint comes from S3 (moto), and a sweep of it with two engine
replicas runs there. Then a job puts its engines on the spot node by label, and that node is
killed while captions are written: a replacement joins, the job finishes on it, every row once."""

import csv
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import tempfile
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers.config import REPO, compose
from test_jobs import free_ports, ray_start_children, stop_ray_start

VENV_BIN = pathlib.Path(sys.executable).parent
ENGINE_RESOURCE = "vlm_node"  # the custom resource of the "GPU" node, as accelerator_type:<X> on a real cluster


# --- fast: the preflight refusal ------------------------------------------------------------------


def typed(*overrides):
    from capjob.config import to_typed

    return to_typed(compose(["experiment=offline", *overrides]))


def test_preflight_refuses_a_local_path_a_node_does_not_see(tmp_path):
    from capjob import runtime
    from capjob.errors import ConfigError

    ckpt = tmp_path / "ckpt" / "step-1000"
    ckpt.mkdir(parents=True)
    (ckpt / "config.json").write_text("{}")
    data = tmp_path / "data"
    data.mkdir()
    (data / "part-0.parquet").write_bytes(b"x" * 10)
    out = tmp_path / "out"
    out.mkdir()
    cfg = typed(f"model.source={ckpt}", "data.format=parquet", f"data.path={data}", f"sink.path={out}")

    def shared(paths):  # a node on the same disk (or a shared mount): it sees what the driver sees
        return {"10.0.0.1 (aaaaaaaa)": runtime.node_paths(paths)}

    assert runtime.check_paths_on_nodes(cfg, str(ckpt), probe=shared) == 1

    def gpu_node_without(missing, other=False):
        def probe(paths):
            view = runtime.node_paths(paths)
            view[str(missing)] = "dir:0000" if other else None
            return {"10.0.0.1 (aaaaaaaa)": runtime.node_paths(paths), "10.0.0.2 (bbbbbbbb)": view}
        return probe

    with pytest.raises(ConfigError) as e:
        runtime.check_paths_on_nodes(cfg, str(ckpt), probe=gpu_node_without(ckpt))
    assert str(e.value) == (f"model.source: {ckpt} is a local path that not every node of the cluster sees (node 10.0.0.2 (bbbbbbbb) "
                            "sees nothing there); put the checkpoint on object storage and set model.source=s3://BUCKET/... "
                            "(each node downloads it), or on a mount every node shares")
    with pytest.raises(ConfigError, match=r"^data\.path: .* \(node 10\.0\.0\.2 \(bbbbbbbb\) sees other files there\); "
                                          r"set data\.path to an object store URL \(s3://BUCKET/\.\.\.\) or a mount every node shares$"):
        runtime.check_paths_on_nodes(cfg, str(ckpt), probe=gpu_node_without(data, other=True))
    with pytest.raises(ConfigError, match=r"^sink\.path: .*; set sink\.path to an object store URL"):
        runtime.check_paths_on_nodes(cfg, str(ckpt), probe=gpu_node_without(out))
    # A model capjob built on the driver: the fix is to upload it.
    built = typed("data.format=parquet", f"data.path={data}", f"sink.path={out}")
    with pytest.raises(ConfigError, match=r"^model\.builder: the tiny_qwen25vl model capjob built at .* is on the driver's disk only .*"
                                          r"aws s3 sync .* and set model\.source=s3://BUCKET/models/tiny_qwen25vl$"):
        runtime.check_paths_on_nodes(built, str(ckpt), probe=gpu_node_without(ckpt))
    assert "\n" not in str(e.value)
    # Object-store URLs and hub ids are nobody's local path: nothing to ask the nodes.
    remote = typed("model.source=s3://b/ckpt/step-1000", "data.format=parquet", "data.path=s3://b/data", "sink.path=s3://b/out")
    assert runtime.local_paths(remote, "s3://b/ckpt/step-1000") == {}
    assert runtime.check_paths_on_nodes(remote, "s3://b/ckpt/step-1000", probe=gpu_node_without(ckpt)) == 0


def test_engine_resources_pin_the_engine_bundle_and_are_checked():
    from capjob import runtime
    from capjob.errors import ConfigError
    from capjob.stages.caption.engine import engine_bundles, EnginePlacement

    assert engine_bundles(EnginePlacement(0, None), {ENGINE_RESOURCE: 0.001}) == {"bundles": [{"CPU": 1, ENGINE_RESOURCE: 0.001}]}
    assert engine_bundles(EnginePlacement(0.5, "L4"), {"x": 1}) == {"bundles": [{"GPU": 0.5, "x": 1.0}]}
    assert engine_bundles(EnginePlacement(2, "H200"), {"x": 1}) == {"bundle_per_worker": {"GPU": 1, "CPU": 1, "x": 1.0}}
    assert engine_bundles(EnginePlacement(1, None)) is None  # Ray Data LLM's default
    cluster = {"CPU": 4.0, "memory": 1e9, "node:127.0.0.1": 1.0, "node:__internal_head__": 1.0, ENGINE_RESOURCE: 1.0}
    runtime.check_engine_resources({ENGINE_RESOURCE: 0.001}, cluster)
    with pytest.raises(ConfigError) as e:
        runtime.check_engine_resources({"gpu_pool": 0.001}, cluster)
    assert str(e.value) == ("resources.engine_resources: no node of the cluster has 0.001 of resource 'gpu_pool' (custom resources it "
                            f"has: {ENGINE_RESOURCE}); start the engine nodes with `ray start --resources='{{\"gpu_pool\": 1}}'` or remove it")
    cfg = typed(f"+resources.engine_resources.{ENGINE_RESOURCE}=0.001")
    assert cfg.resources.engine_resources == {ENGINE_RESOURCE: 0.001}


def test_wait_for_gpus_asks_the_autoscaler_then_withdraws_the_request(monkeypatch):
    """GPU workers scaled to zero (a KubeRay RayJob): the engines' GPUs are requested from the
    autoscaler and waited for; the request is withdrawn once they joined, or at the timeout,
    which fails in one line naming the key."""
    from capjob import runtime
    from capjob.errors import ConfigError

    cfg = typed("resources=l4x10", "resources.wait_for_gpus_s=30")
    requests, gpus = [], iter([0, 0, 1, 3])
    monkeypatch.setattr(runtime, "request_resources", lambda bundles: requests.append(bundles))
    monkeypatch.setattr(runtime.ray, "cluster_resources", lambda: {"CPU": 8.0, "GPU": float(next(gpus))})
    assert runtime.wait_for_gpus(cfg.resources, cfg.engine, 30, poll_s=0) == 1
    assert requests == [[{"GPU": 1}] * 10, []]
    requests.clear()
    monkeypatch.setattr(runtime.ray, "cluster_resources", lambda: {"CPU": 8.0})
    with pytest.raises(ConfigError, match=r"^resources\.wait_for_gpus_s: no engine's 1 GPU\(s\) joined the cluster within 0\.01 s \(it has 0"):
        runtime.wait_for_gpus(cfg.resources, cfg.engine, 0.01, poll_s=0)
    assert requests == [[{"GPU": 1}] * 10, []]
    requests.clear()
    cpu = typed("resources.gpus_per_worker=0")
    assert runtime.wait_for_gpus(cpu.resources, cpu.engine, 30) == 0  # a CPU engine: nothing asked
    assert requests == []


# --- fast: node labels and a node lost mid-job (ray.nodes() as Ray 2.58 lists them) ------------------


def node(node_id, labels, alive=True, **resources):
    return {"NodeID": node_id * 56, "NodeManagerAddress": f"10.0.0.{ord(node_id) - 96}", "Alive": alive,
            "Labels": {"ray.io/node-id": node_id * 56, **labels}, "Resources": {"CPU": 8.0, **resources},
            "DeathReasonMessage": "" if alive else "health check failed due to missing too many heartbeats"}


CLUSTER = [node("a", {"ray.io/market-type": "on-demand"}), node("b", {"ray.io/market-type": "spot", "pool": "l4"}, GPU=1.0)]


def test_label_selectors_are_checked_against_the_alive_nodes():
    from capjob import runtime
    from capjob.errors import ConfigError
    from capjob.stages.caption.engine import EnginePlacement

    spot = typed("+resources.engine_label_selector={ray.io/market-type: spot}", "+resources.cpu_label_selector={ray.io/market-type: on-demand}")
    runtime.check_label_selectors(spot.resources, EnginePlacement(1, None), CLUSTER)
    with pytest.raises(ConfigError) as e:
        runtime.check_label_selectors(typed("+resources.engine_label_selector={pool: h100}").resources, EnginePlacement(1, None), CLUSTER)
    assert str(e.value) == ("resources.engine_label_selector: no alive node of the cluster carries pool=h100 (labels of its 2 node(s): "
                            "pool=l4, ray.io/market-type=on-demand, ray.io/market-type=spot); label the nodes "
                            "(`ray start --labels=KEY=VALUE`, KubeRay: the group's labels) or change the selector")
    with pytest.raises(ConfigError, match=r"^resources\.cpu_label_selector: no alive node of the cluster carries ray\.io/market-type=spot "):
        runtime.check_label_selectors(typed("+resources.cpu_label_selector={ray.io/market-type: spot}").resources,
                                      EnginePlacement(1, None), [CLUSTER[0], {**CLUSTER[1], "Alive": False}])
    with pytest.raises(ConfigError, match=r"^resources\.engine_label_selector: the 1 node\(s\) carrying ray\.io/market-type=on-demand have no GPU"):
        runtime.check_label_selectors(typed("+resources.engine_label_selector={ray.io/market-type: on-demand}").resources,
                                      EnginePlacement(1, None), CLUSTER)
    runtime.check_label_selectors(typed("+resources.engine_label_selector={ray.io/market-type: on-demand}").resources,
                                  EnginePlacement(0, None), CLUSTER)  # a CPU engine needs no GPU there


def test_label_selectors_reach_the_engine_and_the_cpu_side(monkeypatch):
    """The engine stage's actors get engine_label_selector, the processor's CPU stages and
    capjob's tasks cpu_label_selector; an engine in a placement group (vLLM's Ray executor)
    gets it on every bundle."""
    import functools
    from types import SimpleNamespace

    from capjob.stages.caption.engine import ENGINE_STAGE, labelled_placement, place_stages, task_options

    cfg = typed("+resources.engine_label_selector={ray.io/market-type: spot}", "+resources.cpu_label_selector={ray.io/market-type: on-demand}")
    assert task_options(cfg.resources, cfg.job)["label_selector"] == {"ray.io/market-type": "on-demand"}
    assert "label_selector" not in task_options(typed().resources, typed().job)
    stages = {ENGINE_STAGE: SimpleNamespace(map_batches_kwargs={"num_gpus": 1}), "TokenizeStage": SimpleNamespace(map_batches_kwargs={})}
    place_stages(stages, cfg.resources)
    assert stages[ENGINE_STAGE].map_batches_kwargs == {"num_gpus": 1, "label_selector": {"ray.io/market-type": "spot"}}
    assert stages["TokenizeStage"].map_batches_kwargs == {"label_selector": {"ray.io/market-type": "on-demand"}}

    def rays_strategy(count, accelerator, config):  # the shape of Ray Data LLM's _ray_scheduling_strategy_fn
        raise AssertionError("replaced")

    pg_stage = SimpleNamespace(map_batches_kwargs={"ray_remote_args_fn": functools.partial(rays_strategy, 2, "L4", None)})
    place_stages({ENGINE_STAGE: pg_stage}, cfg.resources)
    fn = pg_stage.map_batches_kwargs["ray_remote_args_fn"]
    assert "label_selector" not in pg_stage.map_batches_kwargs and fn.func is labelled_placement
    assert fn.args[1] == {"ray.io/market-type": "spot"}
    made = []
    monkeypatch.setattr("ray.util.placement_group", lambda bundles, **kw: made.append((bundles, kw)) or "pg")
    assert fn()["scheduling_strategy"].placement_group == "pg"
    assert made == [([{"GPU": 1, "CPU": 1, "accelerator_type:L4": 0.001}] * 2,
                     {"bundle_label_selector": [{"ray.io/market-type": "spot"}] * 2, "strategy": "PACK"})]
    from capjob.plan import make_plan
    from capjob.stages.caption.engine import EnginePlacement

    text = make_plan(cfg, "r", "/m", EnginePlacement(0, None), 10).render(cfg)
    assert "; engines on nodes labelled ray.io/market-type=spot; CPU side on nodes labelled ray.io/market-type=on-demand\n" in text


def test_node_watch_waits_for_a_replacement_then_stops_in_one_line():
    from capjob import runtime
    from capjob.errors import ClusterError
    from capjob.stages.caption.engine import EnginePlacement

    cfg = typed("+resources.engine_label_selector={ray.io/market-type: spot}", "resources.node_lost_wait_s=30")
    nodes = list(CLUSTER)
    watch = runtime.NodeWatch(cfg.resources, EnginePlacement(1, None), list_nodes=lambda: nodes)
    assert watch.check(now=0) is None and not watch.lost
    nodes = [CLUSTER[0], node("b", {"ray.io/market-type": "spot", "pool": "l4"}, alive=False, GPU=1.0)]
    assert watch.check(now=10) is None and watch.missing.startswith("no alive node can run an engine replica")  # waiting
    nodes.append(node("c", {"ray.io/market-type": "spot"}, GPU=1.0))  # a replacement joined: the run goes on
    assert watch.check(now=50) is None and watch.missing is None
    nodes.pop()
    assert watch.check(now=60) is None  # gone again: the wait starts over
    error = watch.check(now=90)
    assert isinstance(error, ClusterError) and "\n" not in str(error)
    assert str(error) == ("node 10.0.0.2 (bbbbbbbb) left the cluster mid-job (health check failed due to missing too many heartbeats) "
                          "and no alive node can run an engine replica (labels ray.io/market-type=spot, 1 GPU(s)), none joined "
                          "within 30 s (resources.node_lost_wait_s); " + runtime.RESUME_HINT)
    # Without a selector the head can host a CPU engine: a lost node costs nothing but the retries.
    cpu = runtime.NodeWatch(typed().resources, EnginePlacement(0, None), list_nodes=lambda: nodes)
    cpu.known["b" * 56] = "10.0.0.2 (bbbbbbbb)"
    assert cpu.check(now=0) is None and cpu.lost and cpu.missing is None


def test_node_watch_names_the_lost_node_in_rays_error():
    """A Ray error that ends the execution after a node was lost comes out as one ClusterError
    line naming the node; one without a lost node passes through unchanged."""
    from capjob import runtime
    from capjob.errors import ClusterError
    from capjob.stages.caption.engine import EnginePlacement

    nodes = list(CLUSTER)
    watch = runtime.NodeWatch(typed().resources, EnginePlacement(1, None), poll_s=3600, list_nodes=lambda: nodes)
    with pytest.raises(RuntimeError):
        with watch.guard():
            raise RuntimeError("unrelated")
    nodes = [CLUSTER[0], {**CLUSTER[1], "Alive": False, "DeathReasonMessage": "node drained"}]
    with pytest.raises(ClusterError) as e:
        with watch.guard():
            raise RuntimeError("ray.exceptions.ObjectLostError: Failed to retrieve object\n(traceback...)")
    assert str(e.value).startswith("node 10.0.0.2 (bbbbbbbb) left the cluster mid-job (node drained) and the run failed with it "
                                   "(RuntimeError: ray.exceptions.ObjectLostError: Failed to retrieve object); the rows written so far")


# --- fast: models on object storage (moto) ---------------------------------------------------------


def upload_model(s3, local_dir, url):
    """The model folder's files (hidden ones too, as `aws s3 sync` would) under `url`."""
    bucket = url.split("://", 1)[1].split("/", 1)[0]
    s3.bucket(bucket)
    root = url.split("://", 1)[1].rstrip("/")
    for f in sorted(pathlib.Path(local_dir).iterdir()):
        if f.is_file():
            s3.fs.put_file(str(f), f"{root}/{f.name}")


def fake_model(folder):
    folder.mkdir(parents=True)
    for name in ("config.json", "tokenizer.json", "preprocessor_config.json", "chat_template.json"):
        (folder / name).write_text(json.dumps({"name": name}))
    (folder / "model.safetensors").write_bytes(b"\0" * 2048)
    return folder


def test_model_url_preflight_and_fetch_once_per_node_and_revision(s3_env, tmp_path):
    from capjob import preflight
    from capjob.stages.resume import model_revision
    from capjob.errors import ConfigError
    from capjob.models import remote

    upload_model(s3_env, fake_model(tmp_path / "m"), "s3://ckpts/run/step-10")
    described = preflight.check_model("s3://ckpts/run/step-10", None)
    assert described.startswith("s3://ckpts/run/step-10 (5 files, revision ") and "Ray Data LLM's loader" in described
    # any other fsspec URL: s3a:// is s3fs too, but not a scheme Ray Data LLM's loader takes
    assert "capjob's fetch" in preflight.check_model("s3a://ckpts/run/step-10", None)
    with pytest.raises(ConfigError, match=r"^model\.source: no files under s3://ckpts/run/step-99 "):
        preflight.check_model("s3://ckpts/run/step-99", None)
    s3_env.fs.rm("ckpts/run/step-10/chat_template.json")
    with pytest.raises(ConfigError, match=r"^model\.source: s3://ckpts/run/step-10 lacks chat_template\.jinja or chat_template\.json"):
        preflight.check_model("s3://ckpts/run/step-10", None)
    s3_env.fs.put_file(str(tmp_path / "m" / "chat_template.json"), "ckpts/run/step-10/chat_template.json")

    cache = tmp_path / "node-cache"
    first = remote.fetch("s3a://ckpts/run/step-10", cache)
    assert sorted(p.name for p in first.iterdir()) == sorted([*(p.name for p in (tmp_path / "m").iterdir()), remote.COMPLETE_MARKER])
    assert (first / "model.safetensors").read_bytes() == b"\0" * 2048
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert remote.fetch("s3a://ckpts/run/step-10", cache) == first  # same ETags: no second download
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    rev = model_revision("s3://ckpts/run/step-10")
    # a checkpoint rewritten in place: other ETags, another copy (and another resume fingerprint)
    s3_env.fs.pipe_file("ckpts/run/step-10/model.safetensors", b"\1" * 2048)
    second = remote.fetch("s3a://ckpts/run/step-10", cache)
    assert second != first and (second / "model.safetensors").read_bytes() == b"\1" * 2048
    assert model_revision("s3://ckpts/run/step-10") not in (rev, "unresolved") and rev.startswith("etag:")
    assert not [p for p in cache.iterdir() if ".fetching-" in p.name]  # staging folders never stay


def test_stage_udfs_load_a_model_url_on_their_own_node(s3_env, tmp_path, monkeypatch):
    """node_local_stage_udfs: a Ray Data LLM stage built for a model URL that Ray's loader does not
    take (s3a://) copies the model into its own node's capjob cache when its actor starts (here:
    the UDF constructed in this process) and loads the tokenizer from there; Ray's own schemes
    are left to Ray Data LLM's engine stage."""
    from ray.llm._internal.batch.stages import DetokenizeStage, vLLMEngineStage

    from capjob import models
    from capjob.models import remote

    dummy = models.resolve_model_source(None, models.QWEN25VL_3B_DUMMY)  # real tokenizer files, no weights
    upload_model(s3_env, dummy, "s3://ckpts/dummy")
    monkeypatch.setenv("CAPJOB_CACHE", str(tmp_path / "node-cache"))
    url = "s3a://ckpts/dummy"
    stage = DetokenizeStage(fn_constructor_kwargs={"model": url, "trust_remote_code": False}, map_batches_kwargs={"concurrency": 1})
    original = stage.fn
    remote.node_local_stage_udfs({"DetokenizeStage": stage}, url)
    assert issubclass(stage.fn, original) and stage.fn.__name__ == original.__name__
    udf = stage.fn(data_column="__data", expected_input_keys=["generated_tokens"], **stage.fn_constructor_kwargs)
    ids = udf.tokenizer.encode("a red circle on a white background")
    assert udf.tokenizer.decode(ids) == "a red circle on a white background"
    copies = list((tmp_path / "node-cache" / "models" / remote.REMOTE_DIR).glob("ckpts--dummy-*"))
    assert len(copies) == 1 and (copies[0] / "tokenizer.json").read_bytes() == (pathlib.Path(dummy) / "tokenizer.json").read_bytes()
    assert stage.fn_constructor_kwargs["model"] == url  # the stage's kwargs stay as built (Ray Data keys its UDF instances by them)

    engine_kwargs = {"max_model_len": 512, "load_format": "dummy"}
    for source, wrapped in (("s3://ckpts/dummy", False), (url, True)):
        engine = vLLMEngineStage(fn_constructor_kwargs={"model": source, "engine_kwargs": dict(engine_kwargs), "batch_size": 1,
                                                        "max_concurrent_batches": 1},
                                 map_batches_kwargs={"concurrency": 1})
        before = engine.fn
        remote.node_local_stage_udfs({"vLLMEngineStage": engine}, source)
        assert (engine.fn is not before) == wrapped, source


# --- e2e: a two-node cluster on this machine ----------------------------------------------------------


class RayNode:
    """One `ray start --block` on 127.0.0.1 with its own ports, temp dir and environment (its
    workers inherit it: each node gets its own Hugging Face and capjob caches). No `ray stop`:
    that would stop every Ray on the machine."""

    def __init__(self, name, env, head_address=None, num_cpus=2, resources=None, object_store_mib=200, labels=None):
        node_mgr, obj_mgr, metrics, agent, agent_grpc, env_agent, gcs, client = free_ports(8)
        self.temp_dir = tempfile.mkdtemp(prefix=f"cj-{name}-")  # short: Ray's socket paths must fit 107 chars
        cmd = [str(VENV_BIN / "ray"), "start", "--block", "--node-ip-address=127.0.0.1", f"--num-cpus={num_cpus}",
               f"--object-store-memory={object_store_mib * 2**20}", f"--node-manager-port={node_mgr}",
               f"--object-manager-port={obj_mgr}", f"--metrics-export-port={metrics}", f"--dashboard-agent-listen-port={agent}",
               f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={env_agent}", "--disable-usage-stats"]
        if head_address is None:
            self.address = f"127.0.0.1:{gcs}"
            cmd += ["--head", f"--port={gcs}", f"--ray-client-server-port={client}", "--include-dashboard=false",
                    f"--temp-dir={self.temp_dir}"]
        else:
            self.address = head_address
            # A worker node takes the head's session dir (its --temp-dir only names its own files' root).
            cmd += [f"--address={head_address}"]
        if resources:
            cmd.append(f"--resources={json.dumps(resources)}")
        if labels:  # custom node labels; Ray's own ray.io/* ones come from the environment (RAY_NODE_MARKET_TYPE...)
            cmd.append("--labels=" + ",".join(f"{k}={v}" for k, v in labels.items()))
        self.env = {**os.environ, **env, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"}
        self.env.pop("RAY_ADDRESS", None)
        self.log_path = pathlib.Path(self.temp_dir) / "ray-start.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def terminate(self):
        """SIGTERM to `ray start --block`: it stops what it started (see stop)."""
        self.started = ray_start_children(self.proc)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def stop(self):
        """Wait for the node to stop; kill by pid what it started and left alive."""
        if not hasattr(self, "started"):
            self.terminate()
        stop_ray_start(self.proc, self.log, self.temp_dir, self.started)


def wait_for_nodes(address, count, nodes, timeout=180):
    """Until the GCS at `address` lists `count` alive nodes; returns {node id: resources}."""
    code = ("import json, ray; ray.init(address=%r, logging_level='ERROR'); "
            "print(json.dumps({n['NodeID']: n['Resources'] for n in ray.nodes() if n['Alive']}))") % address
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        for node in nodes:
            if node.proc.poll() is not None:
                raise RuntimeError(f"ray start exited {node.proc.returncode}: {node.log_path.read_text()[-3000:]}")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=nodes[0].env)
        last = proc.stdout + proc.stderr
        if proc.returncode == 0:
            alive = json.loads(proc.stdout.strip().splitlines()[-1])
            if len(alive) >= count:
                return alive
        time.sleep(2)
    raise TimeoutError(f"{count} Ray nodes not up after {timeout}s: {last[-2000:]}")


# The nodes' labels: Ray's own ray.io/market-type (from RAY_NODE_MARKET_TYPE, as KubeRay sets it
# for a group) and a custom one (`ray start --labels`).
HEAD_LABELS = {"ray.io/market-type": "on-demand", "capjob-pool": "cpu"}
GPU_LABELS = {"ray.io/market-type": "spot", "capjob-pool": "engines"}
# The head's GCS marks a node dead after 5 missed health checks, one a second (Ray's defaults:
# one every 3 s): a killed node is noticed in ~5 s rather than ~20 s.
FAST_HEALTH_CHECKS = {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "5"}


def gpu_node(head_address, gpu_env):
    """The "GPU" node: the engine resource and the spot labels."""
    env = {**gpu_env, "RAY_NODE_MARKET_TYPE": GPU_LABELS["ray.io/market-type"]}
    return RayNode("gpu", env, head_address=head_address, num_cpus=3, resources={ENGINE_RESOURCE: 1},
                   labels={"capjob-pool": GPU_LABELS["capjob-pool"]})


@pytest.fixture(scope="module")
def two_nodes(s3_env, tmp_path_factory):
    """Head (the driver's node: the capjob process joins it, on-demand) and a second node holding
    the engine resource (spot); each with its own HF_HOME and CAPJOB_CACHE (the head's capjob
    cache is the tests' own, where the tiny model is built: the driver's disk)."""
    root = tmp_path_factory.mktemp("nodes")
    head_env = {"HF_HOME": str(root / "head-hf")}
    gpu_env = {"HF_HOME": str(root / "gpu-hf"), "CAPJOB_CACHE": str(root / "gpu-capjob-cache")}
    head = RayNode("head", {**head_env, **FAST_HEALTH_CHECKS, "RAY_NODE_MARKET_TYPE": HEAD_LABELS["ray.io/market-type"]},
                   num_cpus=3, labels={"capjob-pool": HEAD_LABELS["capjob-pool"]})
    nodes = [head]
    try:
        nodes.append(gpu_node(head.address, gpu_env))
        resources = wait_for_nodes(head.address, 2, nodes)
        yield {"address": head.address, "head_env": head_env, "gpu_env": gpu_env, "resources": resources, "nodes": nodes}
    finally:
        for node in reversed(nodes):  # the worker node first, then the head; both stop in parallel
            node.terminate()
        for node in reversed(nodes):
            node.stop()


ROWS = 20  # the bar (>= 95% exact) then allows one miss (docs/benchmarks.md, tiny model v4)


@pytest.mark.e2e
def test_checkpoint_sweep_from_s3_on_two_nodes(two_nodes, s3_env, tmp_path):
    """A sweep over a checkpoint on S3, on the two-node cluster, with two engine replicas: both
    engines land on the node that is not the driver's and load the checkpoint from S3 into that
    node's own cache (the driver only ever holds the tokenizer files), every row is captioned
    exactly once under its own image's id, and the job's tasks write from both nodes. One job:
    the sweep's between-jobs path and the comparison of two checkpoints run in test_sweep's
    local sweep (each job here costs ~2 minutes on a 2-core machine)."""
    from capjob import models, sweep
    from capjob.stages.sources.sample import write_hf_parquet
    from helpers.references import assert_captions_fit_their_images, shape_rows

    url = "s3://ckpts/tiny/step-1000"
    upload_model(s3_env, models.resolve_model_source(None, models.TINY_QWEN25VL), url)
    rows, references = shape_rows(ROWS, seed=24)
    write_hf_parquet(rows, tmp_path / "part-0.parquet", references)
    s3_env.bucket("data")
    s3_env.fs.put_file(str(tmp_path / "part-0.parquet"), "data/shapes/part-0.parquet")

    d = tmp_path / "sweep"
    env = {**os.environ, **two_nodes["head_env"], "RAY_ADDRESS": two_nodes["address"]}
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "capjob", "--multirun", "experiment=offline", "data.format=parquet", "data.path=s3://data/shapes",
         # six blocks: six write tasks, which Ray Data spreads over the nodes
         "data.name=shapes", "data.partitions=6", "caption.max_tokens=24", "eval=stats", "eval.reference_column=reference",
         f"+resources.engine_resources.{ENGINE_RESOURCE}=0.001", "resources.concurrency=2", f"model.source={url}",
         f"hydra.sweep.dir={d}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    seconds = time.monotonic() - started
    (tmp_path / "stdout.txt").write_text(proc.stdout)
    (tmp_path / "stderr.txt").write_text(proc.stderr)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    rec = json.loads((d / "0" / sweep.JOB_RECORD).read_text())
    assert rec["status"] == "succeeded", rec["error"]

    head_id = next(n for n, res in two_nodes["resources"].items() if ENGINE_RESOURCE not in res)
    gpu_id = next(n for n, res in two_nodes["resources"].items() if ENGINE_RESOURCE in res)
    assert rec["ray"]["cluster"] == "existing cluster (disconnected)" and rec["ray"]["node_id"] == head_id  # the driver's node
    rep = json.loads((d / "0" / "report.json").read_text())
    assert rep["config"]["resources"]["concurrency"] == 2 and rep["config"]["model"]["source"] == url
    captions = pa.concat_tables([pq.read_table(f) for f in sorted((d / "0" / "out" / "captions").glob("*.parquet"))])
    ids = captions.column("id").to_pylist()
    # every row exactly once: captioned or quarantined, no id twice
    assert rep["rows_read"] == ROWS and rep["captioned"] + rep["quarantined"] == ROWS and len(set(ids)) == len(ids) == rep["captioned"]
    # with two engines, each caption under its own image's id
    assert_captions_fit_their_images(captions, ROWS)
    # the job's write tasks ran on both nodes
    assert set(rep["write_nodes"]) == {head_id, gpu_id}, rep["write_nodes"]
    assert sum(rep["write_nodes"].values()) == ROWS
    assert json.loads((d / "0" / "eval.json").read_text())["reference"]["word_f1"] > 0.7

    # The weights went from S3 to the engines' node only, into its own cache; the driver's node
    # got the tokenizer files (for the prompt and Ray Data LLM's config check), never a weight.
    name = "models--" + url.replace("/", "--")
    gpu_hub = pathlib.Path(two_nodes["gpu_env"]["HF_HOME"]) / "hub"
    head_hub = pathlib.Path(two_nodes["head_env"]["HF_HOME"]) / "hub"
    assert list((gpu_hub / name).glob("snapshots/*/model.safetensors")), sorted(gpu_hub.glob("*"))
    assert not list((head_hub / name).glob("snapshots/*/*.safetensors"))
    assert not (pathlib.Path(two_nodes["gpu_env"]["CAPJOB_CACHE"]) / "models" / f"tiny_qwen25vl-{models.TINY_QWEN25VL_VERSION}").exists()

    md = (d / "sweep.md").read_text()
    assert "1 run: 1 succeeded, 0 failed." in md, md[:500]
    assert len(list(csv.DictReader((d / "sweep.csv").open()))) == 1
    print(f"two-node sweep: {seconds:.0f} s for 1 run")


def kill_node(node):
    """A node gone at once, as a preempted spot VM: SIGKILL to its `ray start` and every process
    it started (raylet, workers, the engine); nothing is told to stop."""
    import psutil

    for p in [psutil.Process(node.proc.pid), *ray_start_children(node.proc)]:
        try:
            p.kill()
        except psutil.Error:
            pass
    node.proc.wait()


def cluster_state(address, env):
    """{"nodes": {id: {alive, labels}}, "actors": [(class name, node id)]} from the GCS."""
    code = ("import json, ray; from ray._private import state; ray.init(address=%r, logging_level='ERROR'); "
            "print(json.dumps({'nodes': {n['NodeID']: {'alive': n['Alive'], 'labels': n.get('Labels') or {}} for n in ray.nodes()}, "
            "'actors': [(a['ActorClassName'], a['Address']['NodeID']) for a in state.actors().values()]}))") % address
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


LABEL_ROWS = 48


def ids_in(out):
    """The ids in the sink's captions and quarantine files."""
    return [i for table in ("captions", "quarantine") for f in sorted((out / table).glob("*.parquet"))
            for i in pq.read_table(f, columns=["id"]).column("id").to_pylist()]


@pytest.mark.e2e
def test_engines_on_spot_nodes_by_label_and_a_node_lost_mid_job(two_nodes, tmp_path):
    """Issue 34, parts 3 and 4, on the two-node cluster (last in this module: it replaces the
    "GPU" node). A selector no node matches stops in preflight with one line naming the labels
    the nodes have. Then the job puts its engine on the spot node by label and everything else
    (decode, write tasks) on the on-demand head; once captions are being
    written the spot node is killed and a replacement with the same labels joins (as a
    KubeRay group or an autoscaler replaces a preempted node): the job finishes there with
    every row exactly once, and the same command run again finds nothing left to do."""
    from capjob.stages.sources.sample import write_hf_parquet
    from helpers.references import shape_rows

    rows, references = shape_rows(LABEL_ROWS, seed=34)
    (tmp_path / "data").mkdir()
    write_hf_parquet(rows, tmp_path / "data" / "part-0.parquet", references)
    out = tmp_path / "out"
    env = {**os.environ, **two_nodes["head_env"], "RAY_ADDRESS": two_nodes["address"]}
    cmd = [sys.executable, "-m", "capjob", "experiment=offline", "data.format=parquet", f"data.path={tmp_path / 'data'}",
           "data.name=labels", f"sink.path={out}", "caption.max_tokens=24", "data.partitions=12",
           # one batch of 2 in the engine at a time: captions are still being written when the node goes
           "engine.batch_size=2", "engine.max_concurrent_batches=1",
           "caption.temperature=0", "+resources.engine_label_selector={ray.io/market-type: spot, capjob-pool: engines}",
           "+resources.cpu_label_selector={ray.io/market-type: on-demand}", f"hydra.run.dir={tmp_path / 'run'}"]

    nowhere = subprocess.run([*cmd[:-3], "+resources.engine_label_selector={ray.io/market-type: reserved}",
                              f"hydra.run.dir={tmp_path / 'nowhere'}"],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert nowhere.returncode == 2, nowhere.stdout[-2000:] + nowhere.stderr[-3000:]
    (line,) = [x for x in nowhere.stderr.splitlines() if x.startswith("capjob: error:")]
    assert line == ("capjob: error: resources.engine_label_selector: no alive node of the cluster carries "
                    "ray.io/market-type=reserved (labels of its 2 node(s): capjob-pool=cpu, capjob-pool=engines, "
                    "ray.io/market-type=on-demand, ray.io/market-type=spot); label the nodes (`ray start --labels=KEY=VALUE`, "
                    "KubeRay: the group's labels) or change the selector"), line
    assert not list(out.glob("captions/*"))  # stopped before any engine started

    head_id = next(n for n, res in two_nodes["resources"].items() if ENGINE_RESOURCE not in res)
    lost = two_nodes["nodes"][1]
    started = time.monotonic()
    with open(tmp_path / "stdout.txt", "w") as stdout_file, open(tmp_path / "stderr.txt", "w") as stderr_file:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=stdout_file, stderr=stderr_file, text=True)
    deadline = time.monotonic() + 600
    while not list((out / "captions").glob("*.parquet")):
        assert proc.poll() is None, (tmp_path / "stderr.txt").read_text()[-5000:]
        assert time.monotonic() < deadline, "no captions written"
        time.sleep(0.2)
    kill_node(lost)
    written_before = len(ids_in(out))
    killed_at = time.monotonic()
    two_nodes["nodes"].append(gpu_node(two_nodes["address"], two_nodes["gpu_env"]))  # the replacement
    proc.wait(timeout=600)
    seconds, after_kill = time.monotonic() - started, time.monotonic() - killed_at
    stdout, stderr = (tmp_path / "stdout.txt").read_text(), (tmp_path / "stderr.txt").read_text()
    assert proc.returncode == 0, stdout[-3000:] + stderr[-5000:]
    lost_id = next(n for n, res in two_nodes["resources"].items() if ENGINE_RESOURCE in res)
    assert re.search(rf"^capjob: warning: node \S+ \({lost_id[:8]}\) left the cluster mid-job", stderr, re.M), stderr[-3000:]

    state = cluster_state(two_nodes["address"], env)
    (new_id,) = [n for n, info in state["nodes"].items() if info["alive"] and n != head_id]
    assert state["nodes"][new_id]["labels"]["ray.io/market-type"] == "spot" and not state["nodes"][lost_id]["alive"]
    engines = {node for name, node in state["actors"] if "vLLMEngineStage" in name}
    assert engines and head_id not in engines and new_id in engines, state["actors"]  # only ever on spot nodes
    (report_dir,) = list((out / "reports").iterdir())
    report = json.loads((report_dir / "report.json").read_text())
    assert report["write_nodes"] == {head_id: LABEL_ROWS}  # every row written on the on-demand node
    assert report["rows_read"] == LABEL_ROWS and report["captioned"] + report["quarantined"] == LABEL_ROWS
    done = ids_in(out)
    assert len(done) == len(set(done)) == LABEL_ROWS  # every row exactly once
    assert written_before < LABEL_ROWS  # the node went while captions were still being written

    rerun = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0 and "nothing left to do: all 48 rows" in rerun.stdout + rerun.stderr, rerun.stderr[-3000:]
    print(f"node lost mid-job: {seconds:.0f} s in all, {after_kill:.0f} s after the kill ({written_before} rows written before it)")
