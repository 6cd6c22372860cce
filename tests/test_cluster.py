"""Beyond one machine: model checkpoints on object storage, engines pinned to another node, and
the preflight that refuses a local path some node does not see.

Fast: the refusal (its decision and one-line message, with the nodes' views given), engine
resources, a model URL's preflight and capjob's per-node fetch against moto's S3 server.
e2e: a two-node Ray cluster on this machine (two `ray start` processes, each with its own temp
dir, Hugging Face cache and capjob cache); the engine is pinned by a custom resource to the node
that is not the driver's, the checkpoint comes from S3 (moto), and a sweep of it with two engine
replicas runs there."""

import csv
import json
import os
import pathlib
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

    def __init__(self, name, env, head_address=None, num_cpus=2, resources=None, object_store_mib=200):
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


@pytest.fixture(scope="module")
def two_nodes(s3_env, tmp_path_factory):
    """Head (the driver's node: the capjob process joins it) and a second node holding the
    engine resource; each with its own HF_HOME and CAPJOB_CACHE (the head's capjob cache is the
    tests' own, where the tiny model is built: the driver's disk)."""
    root = tmp_path_factory.mktemp("nodes")
    head_env = {"HF_HOME": str(root / "head-hf")}
    gpu_env = {"HF_HOME": str(root / "gpu-hf"), "CAPJOB_CACHE": str(root / "gpu-capjob-cache")}
    head = RayNode("head", head_env, num_cpus=3)
    nodes = [head]
    try:
        nodes.append(RayNode("gpu", gpu_env, head_address=head.address, num_cpus=3, resources={ENGINE_RESOURCE: 1}))
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
