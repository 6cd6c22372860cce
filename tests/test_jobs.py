"""jobs/: the runtime env, submit.sh and the CI example (fast, with a fake `ray`), the KubeRay
manifests (fields against KubeRay's v1 API, runtime env, secrets, entrypoints composed), the Slurm
script (stand-ins for srun, scontrol, ray and capjob), and real `ray job submit`s to a local Ray
head started by the test (e2e): submit.sh's, and KubeRay's submitter command for rayjob.yaml."""

import json
import os
import pathlib
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pyarrow.parquet as pq
import pytest
import yaml

from capjob.reporting.report import SECRET_KEY
from helpers.config import REPO

JOBS = REPO / "jobs"
SUBMIT = JOBS / "submit.sh"
VENV_BIN = pathlib.Path(sys.executable).parent


# --- static checks ------------------------------------------------------------------------------


def test_runtime_env_is_valid_and_has_no_secrets(monkeypatch):
    from ray.runtime_env import RuntimeEnv

    data = yaml.safe_load((JOBS / "runtime_env.yaml").read_text())
    monkeypatch.chdir(REPO)  # its paths are relative to the repository root, as submit.sh runs it
    env = RuntimeEnv(**data)
    assert env.working_dir() == "."
    assert {".venv/", "outputs/", "multirun/", ".git/"} <= set(data["excludes"])
    assert env.env_vars()["PYTHONPATH"] == "src"
    assert not [k for k in env.env_vars() if SECRET_KEY.search(k)]
    packages = env["pip"]["packages"]
    assert not [p for p in packages if p.startswith("#") or not p.strip()], "Ray passes every line on as a package"
    assert not [p for p in packages if p.split("[")[0].split("=")[0].split(">")[0].strip().lower() in ("ray", "vllm", "torch")]
    pyproject = (REPO / "pyproject.toml").read_text()
    for pin in ("hydra-core==1.3.2", "omegaconf==2.3.0"):
        assert pin in packages and pin in pyproject


def test_ci_workflow_submits_with_the_address_from_secrets():
    text = (JOBS / "github-actions" / "capjob-job.yml").read_text()
    wf = yaml.safe_load(text)
    triggers = wf.get("on", wf.get(True))  # YAML 1.1 reads a bare `on` as True
    assert "push" in triggers
    steps = wf["jobs"]["submit"]["steps"]
    submit = next(s for s in steps if "jobs/submit.sh" in s.get("run", ""))
    assert submit["env"]["RAY_ADDRESS"] == "${{ secrets.RAY_ADDRESS }}"
    assert "ray[default]==2.58.1" in text and "job.dry_run=true" in text
    assert "http://" not in text.replace("https://ray-head.internal:8265", "")


# --- KubeRay manifests (jobs/kuberay/): static checks ------------------------------------------------

KUBERAY = JOBS / "kuberay"
KUBERAY_FIELDS = json.loads((REPO / "tests" / "data" / "kuberay_v1_fields.json").read_text())
LEAVES = {"string": str, "int": int, "bool": bool, "number": (int, float), "quantity": (str, int)}
# What a credential looks like as a literal: an AWS access key id, a Hugging Face token, a 40-character
# secret key, a PEM block.
LITERAL_SECRET = re.compile(r"AKIA[0-9A-Z]{16}|hf_[A-Za-z0-9]{20,}|(?<![A-Za-z0-9/+])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+])|-----BEGIN")


def api_errors(value, type_name, path="", types=KUBERAY_FIELDS["types"]):
    """Every key path of `value` that KubeRay's v1 API (tests/data/kuberay_v1_fields.json) does not
    have, or whose value is of the wrong kind: ["spec.shutdownAfterJobFinish: unknown key", ...]."""
    if isinstance(type_name, list):
        if not isinstance(value, list):
            return [f"{path}: expected a list"]
        return [e for i, item in enumerate(value) for e in api_errors(item, type_name[0], f"{path}[{i}]", types)]
    if type_name in LEAVES:
        ok = isinstance(value, LEAVES[type_name]) and not (type_name != "bool" and isinstance(value, bool))
        return [] if ok else [f"{path}: expected {type_name}, got {value!r}"]
    if type_name in ("map", "quantities"):
        kinds = str if type_name == "map" else (str, int)
        bad = {k: v for k, v in (value or {}).items() if not isinstance(k, str) or not isinstance(v, kinds) or isinstance(v, bool)}
        return [f"{path}: {type_name} values must be {'strings' if type_name == 'map' else 'quantities'}, got {bad}"] if bad else []
    if not isinstance(value, dict):
        return [f"{path}: expected {type_name}, got {value!r}"]
    fields = types[type_name]
    errors = []
    for key, item in value.items():
        where = f"{path}.{key}" if path else key
        if key not in fields:
            errors.append(f"{where}: unknown key (not a field of {type_name})")
            continue
        errors += api_errors(item, fields[key], where, types)
        allowed = KUBERAY_FIELDS["enums"].get(f"{type_name}.{key}")
        if allowed and item not in allowed:
            errors.append(f"{where}: {item!r} is not one of {allowed}")
    return errors


def manifests():
    """{file name: parsed document} of every manifest under jobs/kuberay/ (the overlay as kubectl
    kustomize would build it, with its JSON patch applied)."""
    docs = {str(p.relative_to(KUBERAY)): yaml.safe_load(p.read_text()) for p in sorted(KUBERAY.rglob("*.yaml"))}
    overlay = docs["kueue/kustomization.yaml"]
    assert overlay["resources"] == [".."] and docs["kustomization.yaml"]["resources"] == ["rayjob.yaml"]
    built = json.loads(json.dumps(docs["rayjob.yaml"]))
    for patch in overlay["patches"]:
        assert patch["target"]["kind"] == built["kind"] and patch["target"]["name"] == built["metadata"]["name"]
        for op in yaml.safe_load(patch["patch"]):
            json_patch(built, op)
    docs["kueue (built)"] = built
    return docs


def json_patch(doc, op):
    """One RFC 6902 operation (add, replace, remove) applied in place, as kustomize does."""
    *parents, last = [part.replace("~1", "/").replace("~0", "~") for part in op["path"].lstrip("/").split("/")]
    for part in parents:
        doc = doc[int(part)] if isinstance(doc, list) else doc[part]
    key = int(last) if isinstance(doc, list) else last
    if op["op"] == "remove":
        del doc[key]
    else:
        assert op["op"] == "add" or key in doc or isinstance(doc, list), f"replace of a missing {op['path']}"
        doc[key] = op["value"]


def job_specs(docs):
    """{name: RayJob spec} of the RayJob manifests and the RayCronJob's job template."""
    specs = {name: d["spec"] for name, d in docs.items() if d.get("kind") == "RayJob"}
    specs.update({name: d["spec"]["jobTemplate"] for name, d in docs.items() if d.get("kind") == "RayCronJob"})
    return specs


def containers(spec):
    cluster = spec["rayClusterSpec"]
    groups = [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]
    pods = [g["template"] for g in groups] + ([spec["submitterPodTemplate"]] if "submitterPodTemplate" in spec else [])
    return [c for pod in pods for c in pod["spec"]["containers"]]


def test_kuberay_manifests_use_only_kuberay_v1_fields():
    docs = manifests()
    assert {d["kind"] for d in docs.values()} == {"RayJob", "RayCronJob", "Kustomization"}
    for name, doc in docs.items():
        assert doc["apiVersion"] in ("ray.io/v1", "kustomize.config.k8s.io/v1beta1"), name
        assert api_errors(doc, KUBERAY_FIELDS["roots"][doc["kind"]]) == [], name
    # the check catches a misspelt field, a wrong kind of value and an unknown submission mode
    bad = json.loads(json.dumps(docs["rayjob.yaml"]))
    bad["spec"]["shutdownAfterJobFinish"] = bad["spec"].pop("shutdownAfterJobFinishes")
    bad["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["rayStartParams"] = {"num-gpus": 1}
    bad["spec"]["submissionMode"] = "K8sMode"
    assert api_errors(bad, "RayJob") == [
        "spec.submissionMode: 'K8sMode' is not one of ['K8sJobMode', 'HTTPMode', 'InteractiveMode', 'SidecarMode']",
        "spec.rayClusterSpec.workerGroupSpecs[0].rayStartParams: map values must be strings, got {'num-gpus': 1}",
        "spec.shutdownAfterJobFinish: unknown key (not a field of RayJobSpec)"]


def test_kuberay_jobs_rerun_on_a_fresh_cluster_scale_gpus_from_zero_and_queue_with_kueue():
    docs = manifests()
    for name, spec in job_specs(docs).items():
        assert spec["submissionMode"] == "K8sJobMode" and spec["submitterConfig"]["backoffLimit"] >= 1, name
        assert spec["backoffLimit"] >= 1 and spec["activeDeadlineSeconds"] > 0 and spec["shutdownAfterJobFinishes"] is True, name
        cluster = spec["rayClusterSpec"]
        assert cluster["rayVersion"] == "2.58.1" and cluster["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0", name
        gpu = cluster["workerGroupSpecs"][0]
        assert gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1, name
        if name == "kueue (built)":  # Kueue reserves a fixed size: no autoscaler
            assert docs[name]["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "capjob-queue"
            assert cluster["enableInTreeAutoscaling"] is False and "autoscalerOptions" not in cluster
            assert gpu["replicas"] == gpu["minReplicas"] == gpu["maxReplicas"] == 10
        else:
            assert cluster["enableInTreeAutoscaling"] is True and gpu["minReplicas"] == gpu["replicas"] == 0 < gpu["maxReplicas"], name
    assert docs["raycronjob.yaml"]["spec"]["schedule"] == "0 2 * * *"


def test_kuberay_runtime_env_is_jobs_runtime_env():
    expected = yaml.safe_load((JOBS / "runtime_env.yaml").read_text())
    for name, spec in job_specs(manifests()).items():
        assert yaml.safe_load(spec["runtimeEnvYAML"]) == expected, name


def test_kuberay_credentials_come_from_a_secret_never_the_manifest():
    for name, spec in job_specs(manifests()).items():
        envs = [e for c in containers(spec) for e in c.get("env", [])]
        secret_names = {e["name"] for e in envs if SECRET_KEY.search(e["name"]) or e["name"].endswith(("_TOKEN", "_KEY_ID"))}
        assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "HF_TOKEN"} <= secret_names, name
        for env in envs:
            if env["name"] in secret_names:
                assert "value" not in env and env["valueFrom"]["secretKeyRef"]["name"] == "capjob-credentials", env
        literals = [e["value"] for e in envs if "value" in e] + [spec["entrypoint"], spec["runtimeEnvYAML"]]
        literals += [v for v in yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"].values()]
        assert not [v for v in literals if LITERAL_SECRET.search(v)], name
        assert not [k for k in yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"] if SECRET_KEY.search(k)], name
    assert LITERAL_SECRET.search("AKIA" + "IOSFODNN7EXAMPLE") and LITERAL_SECRET.search("hf_" + "x" * 34)  # what it catches
    assert LITERAL_SECRET.search("wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")


def entrypoint_argv(entrypoint):
    """The argv capjob gets from a RayJob's entrypoint: KubeRay's submitter runs `bash -c
    "... ray job submit ... -- <entrypoint> ..."` (ray-operator/controllers/ray/rayjob_controller.go),
    the ray CLI joins the words after `--` with subprocess.list2cmdline, and Ray's job
    supervisor runs that string with a shell (shell=True)."""
    submitted = subprocess.run(["bash", "-c", f"printf '%s\\0' {entrypoint}"], capture_output=True, text=True, check=True)
    command = subprocess.list2cmdline(submitted.stdout.split("\0")[:-1])
    ran = subprocess.run(["sh", "-c", f"printf '%s\\0' {command}"], capture_output=True, text=True, check=True)
    return ran.stdout.split("\0")[:-1]


def test_kuberay_entrypoints_compose_as_capjob_configs():
    import datetime as dt

    from capjob.config import to_typed
    from helpers.config import compose

    for name, spec in job_specs(manifests()).items():
        argv = entrypoint_argv(spec["entrypoint"])
        assert argv[:3] == ["python", "-m", "capjob"], name
        cfg = to_typed(compose(argv[3:]))
        assert cfg.model.source == "Qwen/Qwen2.5-VL-3B-Instruct" and cfg.resources.gpus_per_worker == 1, name
        assert cfg.resources.accelerator_type is None and cfg.resources.wait_for_gpus_s, name
        if name == "rayjob.yaml":  # the engines on the spot group, the rest on the on-demand head (the groups' labels)
            groups = spec["rayClusterSpec"]
            assert cfg.resources.engine_label_selector == {"ray.io/market-type": "spot"} == groups["workerGroupSpecs"][0]["labels"]
            assert cfg.resources.cpu_label_selector == {"ray.io/market-type": "on-demand"} == groups["headGroupSpec"]["labels"]
        assert cfg.data.path.startswith("s3://") and cfg.sink.path.startswith("s3://"), name
    nightly = to_typed(compose(entrypoint_argv(job_specs(manifests())["raycronjob.yaml"]["entrypoint"])[3:]))
    assert nightly.sink.path == f"s3://my-bucket/captions/golden/{dt.date.today():%Y-%m-%d}" and nightly.eval.mode.value == "stats"


# --- submit.sh against a fake `ray` ---------------------------------------------------------------

FAKE_RAY = r"""#!/usr/bin/env python3
import json, os, sys
args = sys.argv[1:]
with open(os.environ["FAKE_RAY_LOG"], "a") as f:
    f.write(json.dumps(args) + "\n")
job_id = args[-1]
if args[:2] == ["job", "status"]:
    status = os.environ["FAKE_RAY_STATUS"]
    print({"SUCCEEDED": f"Job '{job_id}' succeeded", "FAILED": f"Job '{job_id}' failed",
           "STOPPED": f"Job '{job_id}' was stopped"}.get(status, f"Status for job '{job_id}': {status}"))
elif args[:2] == ["job", "logs"]:
    print("capjob: error: engine.batch_size: must be > 0, got -1")
"""


def fake_submit(tmp_path, status, *overrides, env=None, timeout=60, script=None):
    fake = tmp_path / "ray"
    fake.write_text(FAKE_RAY)
    fake.chmod(0o755)
    log = tmp_path / "calls.jsonl"
    run_env = {**os.environ, "RAY": str(fake), "FAKE_RAY_LOG": str(log), "FAKE_RAY_STATUS": status,
               "RAY_ADDRESS": "http://head:8265", "CAPJOB_SUBMISSION_ID": "sid-1", "RAY_JOB_HEADERS": "", **(env or {})}
    proc = subprocess.run([str(script or SUBMIT), *overrides], cwd=tmp_path, env=run_env, capture_output=True, text=True, timeout=timeout)
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return proc, calls


def test_submit_wraps_ray_job_submit_and_succeeds(tmp_path):
    proc, calls = fake_submit(tmp_path, "SUCCEEDED", "model=qwen25vl_3b", "sink.path=s3://b/out")
    assert proc.returncode == 0, proc.stderr
    assert calls[0] == ["job", "submit", "--address", "http://head:8265", "--log-style", "record", "--log-color", "false",
                        "--no-wait", "--submission-id", "sid-1", "--runtime-env", "jobs/runtime_env.yaml",
                        "--", "python", "-m", "capjob", "model=qwen25vl_3b", "sink.path=s3://b/out"]
    assert calls[1][:2] == ["job", "logs"] and "--follow" in calls[1]
    assert calls[2][:2] == ["job", "status"]
    assert "job sid-1: SUCCEEDED" in proc.stderr


def test_submit_fails_when_the_job_fails_or_times_out(tmp_path):
    proc, calls = fake_submit(tmp_path, "FAILED", "engine.batch_size=-1")
    assert proc.returncode == 1 and "job sid-1: FAILED" in proc.stderr
    assert "capjob: error: engine.batch_size" in proc.stdout  # the job's logs are streamed
    (tmp_path / "calls.jsonl").unlink()
    proc, calls = fake_submit(tmp_path, "RUNNING", "x=1", env={"CAPJOB_TIMEOUT_S": "1"})
    assert proc.returncode == 1 and "still RUNNING after 1s" in proc.stderr
    assert ["job", "stop", "--address", "http://head:8265", "--log-style", "record", "--log-color", "false", "--no-wait", "sid-1"] in calls


def test_watch_job_submits_capjob_watch_with_the_same_runtime_env(tmp_path):
    """jobs/watch/submit.sh: the checkpoint watcher as a Ray job, its overrides a capjob config."""
    overrides = ["watch.path=s3://b/run7/checkpoints/", "dataset=parquet", "data.path=s3://b/golden/", "eval=stats",
                 "eval.reference_column=reference", "sink.path=s3://b/run7/validation"]
    proc, calls = fake_submit(tmp_path, "SUCCEEDED", *overrides, script=REPO / "jobs" / "watch" / "submit.sh")
    assert proc.returncode == 0, proc.stderr
    assert calls[0][calls[0].index("--runtime-env") + 1] == "jobs/runtime_env.yaml"
    assert calls[0][calls[0].index("--"):] == ["--", "python", "-m", "capjob.watch", *overrides]
    from capjob.config import to_typed
    from helpers.config import compose

    typed = to_typed(compose(overrides))
    assert typed.watch.path == "s3://b/run7/checkpoints/" and typed.watch.stop_file == "WATCH_STOP"


def test_submit_needs_an_address_and_overrides(tmp_path):
    proc, calls = fake_submit(tmp_path, "SUCCEEDED", "x=1", env={"RAY_ADDRESS": ""})
    assert proc.returncode == 2 and "set RAY_ADDRESS" in proc.stderr and not calls
    proc, calls = fake_submit(tmp_path, "SUCCEEDED")
    assert proc.returncode == 2 and "give capjob's overrides" in proc.stderr and not calls


# --- e2e: a real Ray head on 127.0.0.1 -------------------------------------------------------------


def free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class RayHead:
    """`ray start --head --block` on 127.0.0.1 with its own ports and temp dir, so it neither
    meets nor stops any other Ray on the machine (no `ray stop`: that would stop them all)."""

    def __init__(self, num_cpus=8):
        gcs, dash, agent, agent_grpc, env_agent, metrics, client, node_mgr, obj_mgr = free_ports(9)
        self.temp_dir = tempfile.mkdtemp(prefix="cj-ray-")  # short: Ray's socket paths must fit 107 chars
        self.address = f"http://127.0.0.1:{dash}"
        cmd = [str(VENV_BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
               "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
               f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
               f"--runtime-env-agent-port={env_agent}", f"--metrics-export-port={metrics}",
               f"--ray-client-server-port={client}", f"--node-manager-port={node_mgr}", f"--object-manager-port={obj_mgr}",
               f"--num-cpus={num_cpus}", f"--temp-dir={self.temp_dir}", "--disable-usage-stats"]
        # Job drivers inherit this environment: `python` is the venv's, the capjob cache the tests'.
        self.env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"}
        self.env.pop("RAY_ADDRESS", None)
        self.log = open(pathlib.Path(self.temp_dir) / "ray-start.log", "w")
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout=180):
        from ray.job_submission import JobSubmissionClient

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited {self.proc.returncode}: {self.log_text()[-3000:]}")
            try:
                JobSubmissionClient(self.address).list_jobs()
                return
            except Exception:  # noqa: BLE001 - not up yet
                time.sleep(2)
        raise TimeoutError(f"Ray head not ready after {timeout}s: {self.log_text()[-3000:]}")

    def log_text(self):
        return (pathlib.Path(self.temp_dir) / "ray-start.log").read_text()

    def stop(self):
        stop_ray_start(self.proc, self.log, self.temp_dir)


def ray_start_children(proc):
    """The processes a `ray start --block` started (its raylet, GCS, workers...)."""
    import psutil

    try:
        return psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def stop_ray_start(proc, log, temp_dir, started=None):
    """SIGTERM to `ray start --block` makes it stop what it started; anything of ours still alive
    5 s later (workers, job drivers) is killed by pid, then its log closed and temp dir removed.
    `started`: its children listed before it was signalled (ray_start_children), if it was.
    (A test fixture's teardown, not the thing under test: Ray's own graceful stop took 30-35 s
    on a 2-core machine, and the temp dir with the session goes anyway.)"""
    import psutil

    if started is None:
        started = ray_start_children(proc)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    _, alive = psutil.wait_procs(started, timeout=2)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    log.close()
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_head():
    head = RayHead()
    try:
        head.wait_ready()
        yield head
    finally:
        head.stop()


def no_pip_runtime_env(tmp_path):
    """jobs/runtime_env.yaml as is, minus the package install (no network here; the venv has all)."""
    data = yaml.safe_load((JOBS / "runtime_env.yaml").read_text())
    data.pop("pip", None)
    data.pop("uv", None)
    path = tmp_path / "runtime_env.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def submit(head, tmp_path, submission_id, *overrides, timeout=2400):
    env = {**head.env, "RAY_ADDRESS": head.address, "CAPJOB_SUBMISSION_ID": submission_id,
           "CAPJOB_RUNTIME_ENV": str(no_pip_runtime_env(tmp_path)), "CAPJOB_TIMEOUT_S": str(timeout - 60)}
    return subprocess.run([str(SUBMIT), *overrides], env=env, capture_output=True, text=True, timeout=timeout)


def job_logs(head, submission_id):
    proc = subprocess.run([str(VENV_BIN / "ray"), "job", "logs", "--address", head.address, submission_id],
                          env=head.env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.e2e
def test_job_submission_succeeds_and_writes_parquet(ray_head, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    out = tmp_path / "out"
    proc = submit(ray_head, tmp_path, "capjob-test-ok", "experiment=offline", "dataset=sample", "model=tiny_qwen25vl",
                  "data.sample_size=0", "data.limit=4", "caption.max_tokens=8", f"sink.path={out}", "job.run_id=submitted")
    (tmp_path / "submit.log").write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    assert JobSubmissionClient(ray_head.address).get_job_status("capjob-test-ok") == JobStatus.SUCCEEDED
    table = pq.read_table(out / "captions")
    assert table.num_rows == 4 and set(table.column("run_id").to_pylist()) == {"submitted"}
    assert all(c.strip() for c in table.column("caption").to_pylist())
    report = json.loads((out / "reports" / "submitted" / "report.json").read_text())
    assert report["captioned"] == 4
    # the driver joined the head (RAY_ADDRESS set by the job server) instead of starting a Ray
    # (Ray's own lines go to capjob.log in the run directory, whose path the console prints.)
    logs = job_logs(ray_head, "capjob-test-ok")
    match = re.search(r"log\s+(\S+capjob\.log)", logs)
    assert match, logs[-3000:]
    ray_log = pathlib.Path(match.group(1)).read_text()
    assert "Started a local Ray instance" not in logs + ray_log
    assert "Connecting to existing Ray cluster" in ray_log


@pytest.mark.e2e
def test_failing_job_comes_back_failed_with_the_error(ray_head, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    proc = submit(ray_head, tmp_path, "capjob-test-bad", "experiment=offline", "engine.batch_size=-1", timeout=300)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "job capjob-test-bad: FAILED" in proc.stderr
    assert JobSubmissionClient(ray_head.address).get_job_status("capjob-test-bad") == JobStatus.FAILED
    logs = job_logs(ray_head, "capjob-test-bad")
    assert "capjob: error: engine.batch_size: must be > 0, got -1" in logs
    assert "Traceback" not in logs


def kuberay_submitter_command(spec, address, submission_id, entrypoint, runtime_env):
    """The shell command KubeRay's submitter Job runs in K8sJobMode (ray-operator/controllers/ray/
    common/job.go, BuildJobSubmitCommand, less its wait for the dashboard): submit unless the id
    is already known, then follow the logs. runtimeEnvYAML goes in as --runtime-env-json (JSON,
    quoted as Go's strconv.Quote does), the entrypoint verbatim after `--`."""
    assert spec["submissionMode"] == "K8sJobMode"
    return (f"if ! ray job status --address {address} {submission_id} >/dev/null 2>&1 ; then "
            f"ray job submit --address {address} --no-wait --runtime-env-json {json.dumps(json.dumps(runtime_env))} "
            f"--submission-id {submission_id} -- {entrypoint} ; fi ; ray job logs --address {address} --follow {submission_id}")


def local_entrypoint(entrypoint, *overrides):
    """The manifest's entrypoint with its model, resources, data and sink swapped for the sample
    set, the tiny model and `overrides` (experiment=offline: this machine's CPU)."""
    words = shlex.split(entrypoint)
    keep = [w for w in words[3:] if w.split("=", 1)[0].split(".", 1)[0].lstrip("+") not in ("model", "resources", "dataset", "data", "sink")]
    assert words[:3] == ["python", "-m", "capjob"] and len(keep) < len(words) - 3
    return shlex.join([*words[:3], *keep, "experiment=offline", "data.sample_size=8", "data.sample_shapes=0",
                       "caption.max_tokens=8", *overrides])


@pytest.mark.e2e
def test_kuberay_submission_of_three_shards_captions_the_sample_set_once(ray_head, tmp_path):
    """rayjob.yaml's entrypoint and runtimeEnvYAML (less the pip install: no network here), as
    KubeRay's submitter runs them, against a local Ray head: one job runs the entrypoint for
    data.shard=0/3, 1/3 and 2/3 into one sink; the union is every row of the sample set once, each
    run's report counts the other shards' rows as skipped. The unsharded entrypoint then finds
    nothing left: the shards' ids are the ids of one unsharded run."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    spec = manifests()["rayjob.yaml"]["spec"]
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    runtime_env.pop("pip")
    out = tmp_path / "out"

    def submit_like_kuberay(submission_id, entrypoint):
        command = kuberay_submitter_command(spec, ray_head.address, submission_id, entrypoint, runtime_env)
        proc = subprocess.run(["bash", "-c", command], cwd=REPO, env=ray_head.env, capture_output=True, text=True, timeout=1500)
        status = JobSubmissionClient(ray_head.address).get_job_status(submission_id)
        assert status == JobStatus.SUCCEEDED, proc.stdout[-4000:] + proc.stderr[-3000:]
        return proc.stdout

    # One job, three runs: `bash -c '...'` keeps the `&&` from the submitter's own shell.
    shards = "bash -c " + shlex.quote(" && ".join(
        local_entrypoint(spec["entrypoint"], f"sink.path={out}", f"data.shard={k}/3", f"job.run_id=shard-{k}") for k in range(3)))
    def written():  # (id, run_id) of every row in captions and quarantine
        tables = [pq.read_table(out / t, columns=["id", "run_id"]) for t in ("captions", "quarantine") if list((out / t).rglob("*.parquet"))]
        return [pair for t in tables for pair in zip(t.column("id").to_pylist(), t.column("run_id").to_pylist())]

    submit_like_kuberay("kuberay-shards", shards)
    reports = [json.loads((out / "reports" / f"shard-{k}" / "report.json").read_text()) for k in range(3)]
    rows = reports[0]["source_items"]
    ids = [i for i, _ in written()]
    assert rows >= 8 and len(ids) == len(set(ids)) == rows  # every row once, in captions or quarantine
    by_shard = [{i for i, r in written() if r == f"shard-{k}"} for k in range(3)]
    assert sum(map(len, by_shard)) == rows and all(by_shard)
    for k, report in enumerate(reports):
        assert report["captioned"] + report["quarantined"] == report["rows_read"] == len(by_shard[k])
        assert report["source_items"] == rows and report["captioned"] > 0
        assert report["skipped_by_source"] == {f"other shard (data.shard={k}/3)": rows - len(by_shard[k])}

    logs = submit_like_kuberay("kuberay-unsharded", local_entrypoint(spec["entrypoint"], f"sink.path={out}"))
    assert f"nothing left to do: all {rows} rows of sample are already in" in logs, logs[-3000:]
    assert len(written()) == rows


# --- Slurm: jobs/slurm/capjob.sbatch with stand-ins for srun, scontrol, ray and capjob ----------

SBATCH = JOBS / "slurm" / "capjob.sbatch"
# srun: runs its command here (one process stands in for every node), after its --option=value
# words, and passes SIGTERM on to it as srun does to its tasks.
FAKE_SRUN = r"""#!/usr/bin/env python3
import json, os, signal, subprocess, sys
args = sys.argv[1:]
opts = args[: next((i for i, a in enumerate(args) if not a.startswith("--")), len(args))]
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps(["srun", *opts]) + "\n")
task = subprocess.Popen(args[len(opts):])
signal.signal(signal.SIGTERM, lambda *_: task.send_signal(signal.SIGTERM))
sys.exit(task.wait())
"""
FAKE_SCONTROL = r"""#!/usr/bin/env python3
import sys
assert sys.argv[1:3] == ["show", "hostnames"] and sys.argv[3] == "node[1-2]", sys.argv
print("node1\nnode2")
"""
# ray: `start --block` logs and waits for SIGTERM (as the real one stops its node then);
# `status` fails once (head not up), then shows 4 GPUs, then 8.
FAKE_SLURM_RAY = r"""#!/usr/bin/env python3
import json, os, signal, sys, time
args = sys.argv[1:]
log = lambda *words: open(os.environ["FAKE_LOG"], "a").write(json.dumps(list(words)) + "\n")
log("ray", *args)
if args[0] == "start":
    role = "head" if "--head" in args else "worker"
    signal.signal(signal.SIGTERM, lambda *_: (log("ray stopped", role), sys.exit(0)))
    while True:
        time.sleep(0.1)
calls = os.path.join(os.path.dirname(os.environ["FAKE_LOG"]), "status-calls")
n = len(open(calls).read()) if os.path.exists(calls) else 0
open(calls, "a").write("x")
if n == 0:
    sys.exit(1)
gpus = min(n, 2) * 4 if os.environ.get("FAKE_GPUS_JOIN") == "1" else 0
print(f"======== Autoscaler status ========\nResources\n------\nTotal Usage:\n 0.0/16.0 CPU\n 0.0/{gpus}.0 GPU\n 0B/10GiB memory")
"""
FAKE_CAPJOB = r"""#!/usr/bin/env python3
import json, os, sys
open(os.environ["FAKE_LOG"], "a").write(json.dumps(["capjob", *sys.argv[1:]]) + "\n")
sys.exit(int(os.environ.get("FAKE_CAPJOB_EXIT", "0")))
"""


def run_sbatch(tmp_path, *overrides, env=None):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL), ("ray", FAKE_SLURM_RAY), ("capjob", FAKE_CAPJOB)):
        (bin_dir / name).write_text(text.replace("/usr/bin/env python3", sys.executable))
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "calls.jsonl"
    run_env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FAKE_LOG": str(log),
               "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_GPUS_PER_NODE": "l4:4", "CAPJOB_CMD": str(bin_dir / "capjob"),
               "CAPJOB_RAY_POLL_S": "0.2", "CAPJOB_RAY_PORT": "6390", **(env or {})}
    # Its own process group: whatever the script leaves running (a stand-in Ray) goes with it.
    with subprocess.Popen(["bash", str(SBATCH), *overrides], cwd=REPO, env=run_env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, start_new_session=True) as proc:
        try:
            out, err = proc.communicate(timeout=120)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    result = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    return result, [json.loads(line) for line in log.read_text().splitlines()]


def test_sbatch_starts_ray_on_every_node_waits_for_the_gpus_and_exits_with_capjobs_status(tmp_path):
    # array task 6 of --array=4-8:2 (tasks 4, 6, 8): its shard is 1/3
    proc, calls = run_sbatch(tmp_path, "model=qwen25vl_3b", "sink.path=/shared/out",
                             env={"FAKE_GPUS_JOIN": "1", "FAKE_CAPJOB_EXIT": "3", "SLURM_ARRAY_TASK_ID": "6",
                                  "SLURM_ARRAY_TASK_MIN": "4", "SLURM_ARRAY_TASK_STEP": "2", "SLURM_ARRAY_TASK_COUNT": "3"})
    assert proc.returncode == 3, proc.stderr
    head_ip = next(c for c in calls if c[:3] == ["ray", "start", "--head"])[4].split("=", 1)[1]
    starts = [c for c in calls if c[:2] == ["ray", "start"]]
    assert ["ray", "start", "--head", "--block", f"--node-ip-address={head_ip}", "--port=6390", "--num-gpus=4",
            "--disable-usage-stats"] in starts
    assert ["ray", "start", "--block", f"--address={head_ip}:6390", "--num-gpus=4", "--disable-usage-stats"] in starts
    assert ["srun", "--nodes=1", "--ntasks=1", "--nodelist=node1"] in calls and ["srun", "--nodes=1", "--ntasks=1", "--exclude=node1"] in calls
    capjob = [c for c in calls if c[0] == "capjob"]
    assert capjob == [["capjob", "model=qwen25vl_3b", "sink.path=/shared/out", f"resources.address={head_ip}:6390", "data.shard=1/3"]]
    order = [c[0] if c[0] != "ray" else " ".join(c[:2]) for c in calls]
    assert order.index("capjob") > max(i for i, c in enumerate(calls) if c[:2] == ["ray", "status"])  # waited first
    assert sum(1 for c in calls if c[:2] == ["ray", "status"]) >= 3  # not up, 4 of 8 GPUs, 8
    assert sorted(c[1] for c in calls if c[0] == "ray stopped") == ["head", "worker"]
    assert order.index("ray stopped") > order.index("capjob")
    assert "capjob exited 3" in proc.stderr and "expecting 8 GPU(s)" in proc.stderr


def test_sbatch_gives_up_when_the_gpus_never_join_and_stops_ray(tmp_path):
    proc, calls = run_sbatch(tmp_path, "x=1", env={"CAPJOB_RAY_WAIT_S": "1"})
    assert proc.returncode == 1
    assert "error: 0 of 8 GPU(s) joined the Ray cluster within 1s" in proc.stderr
    assert not [c for c in calls if c[0] == "capjob"]
    assert sorted(c[1] for c in calls if c[0] == "ray stopped") == ["head", "worker"]
