#!/usr/bin/env python3
"""Carry capjob's GPU stack to a GPU host that has no network, as wheels.

The host (see docs/gpu-host.md) already has Python 3.12, torch 2.11.0+cu130, torchvision,
transformers, numpy and ~190 other packages. This script ships the rest of the closure of
``vllm==0.26.0`` (CUDA build), ``ray[data,default,llm]==2.58.1`` and capjob's runtime
requirements, in parts small enough for one device call each (the device tool carries at
most 64 MiB per command). Standard library only; runs with any Python >= 3.9.

Subcommands (here = this machine, host = the GPU machine):

  lock     here  re-resolve the closure with pip (>= 22.2) and rewrite bench/gpu_wheels.lock
  pack     here  download the locked wheels into .whl/dl (sha256-checked against the lock),
                 check the closure, split wheels bigger than a part, and lay the files out as
                 .whl/part01 .. .whl/partNN (each <= --budget-mib, with manifest.json)
  plan     here  print the device `run` calls (carry + command) that upload and install them
  receive  host  copy one carried part into /tmp/capjob-wheels (sha256-checked)
  unpack   host  rejoin split wheels, verify every sha256, pip-install into /tmp/site, write
                 /tmp/site/env.sh (PYTHONPATH, PATH)
  smoke    host  import ray, vllm, ray.data.llm (and with --deep the GPU code paths)

Wheels come in two groups. "core" is what image captioning needs on the host; "extra" is
the rest of the dependency closure (video decoding, NIXL KV transfer, DeepSeek MLA and
TileLang kernels, the CUDA 12 CuTe DSL libraries, the pip CUDA compiler); vLLM and Ray
import all of them lazily. Parts hold one group only, core first, so ``plan`` (profile
core) uploads the core parts and ``plan --profile full`` all of them.
"""
from __future__ import annotations

import argparse
import email.parser
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import NoReturn

MiB = 1 << 20
HERE = Path(__file__).resolve().parent
REPO = HERE.parent
LOCK = HERE / "gpu_wheels.lock"
OUT = REPO / ".whl"
DEST = "/tmp/capjob-wheels"
SITE = "/tmp/site"
MANIFEST = "manifest.json"
MARKER = ".capjob-wheels.json"  # written into the install target by unpack

# What capjob needs on the GPU host: pyproject.toml's [project] dependencies with the `gpu`
# extra (ray[llm] pins vllm==0.26.0 with its audio extra), minus datasets and s3fs, which
# the benchmark does not use (add them with `lock --req`), and imagecodecs, added to capjob
# after the lock's last GPU run: without it capjob decodes PNG/WebP with Pillow (slower, same
# pixels); the benchmark's images are JPEGs. Add it with `lock --req imagecodecs`.
TOP_LEVEL = [
    "vllm==0.26.0",
    "ray[data,default,llm]==2.58.1",
    "hydra-core==1.3.2",
    "omegaconf==2.3.0",
    "pillow>=11",
    "pyarrow>=17",
    "transformers>=5.5.3,<5.18",
    "tokenizers>=0.21.1",
    "scikit-image>=0.25",
    "matplotlib>=3.9",
    "jsonref>=1.1.0",
    "typer",
    "hf_transfer",
]

# Versions the host is known to have (docs/gpu-host.md). The ones that are pins in the
# resolution are HOST_PINS; numpy is not, because vllm's numba==0.65.0 needs numpy<2.5
# (host: 2.5.2) and pip would find no solution. The host keeps its numpy and numba.
HOST_VERSIONS = {
    "torch": "2.11.0", "torchvision": "0.26.0", "transformers": "5.17.0",
    "tokenizers": "0.23.2", "numpy": "2.5.2", "huggingface-hub": "1.33.0",
}
HOST_PINS = [f"{n}=={v}" for n, v in HOST_VERSIONS.items() if n != "numpy"]

# Everything installed on the host image (KINDS.md, read 2026-11-17). Never shipped: the
# wheels go on PYTHONPATH in front of the host's site-packages, and a second copy of
# numpy or torch there would shadow the host's.
HOST_PACKAGES = frozenset("""
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch
build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage
cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn
einops equinox etils execnet filelock flatbuffers flax fonttools formulaic frozenlist fsspec
gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna imageio
iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib
kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown
markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict
multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro
nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13
nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir
onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix
orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker
prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing
pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout
pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors
scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers
setuptools shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard
tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch
torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope
triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt
xarray xxhash yarl zipp
""".split())

# PyPI has only an sdist of these (pure Python): `pack` builds them with `pip wheel`.
SDIST_ONLY = {"antlr4-python3-runtime": "4.9.3"}  # hydra-core 1.3.2 pins antlr4 4.9.*

# Part of the closure but not of image captioning on a CUDA 13 Hopper host: group "extra",
# uploaded only with `plan --profile full`. vLLM and Ray import each of them lazily, on the
# code path named here (checked in vllm 0.26.0 / ray 2.58.1 sources).
NOT_IN_CORE = {
    "nixl": "ray[llm]: NIXL KV-cache transfer (disaggregated prefill/decode, KV offload)",
    "nixl-cu12": "nixl: CUDA 12 build",
    "nixl-cu13": "ray[llm], nixl: CUDA 13 build",
    "tokenspeed-mla": "vllm: TokenSpeed MLA attention backend (DeepSeek-style MLA models)",
    "tokenspeed-triton": "tokenspeed-mla: its own Triton fork",
    "tilelang": "vllm: TileLang mHC kernels",
    "z3-solver": "tilelang",
    "pynvvideocodec": "vllm: NVDEC video decoding",
    "torchcodec": "vllm: video decoding (also needs FFmpeg libraries on the host)",
    "av": "vllm[audio] (from ray[llm]): PyAV video/audio decoding",
    "nvidia-cutlass-dsl-libs-cu12": "nvidia-cutlass-dsl: CUDA 12 libraries (host is CUDA 13; libs-cu13 is core)",
    "nvidia-cuda-nvcc": "humming-kernels[cu13] (nvfp4/mxfp4 kernels): pip CUDA 13.5 compiler; the host image has CUDA 13.0's nvcc",
    "nvidia-cuda-crt": "nvidia-cuda-nvcc",
    "nvidia-nvvm": "nvidia-cuda-nvcc",
    "nvidia-cuda-cccl": "humming-kernels[cu13]: CUDA C++ core libraries headers (the host's CUDA toolkit has them)",
    "nvidia-cuda-nvdisasm": "nvidia-cuda-nvcc",
}

# Requirements of shipped wheels that the host's versions do not (or may not) meet, keyed by
# (requirer, requirement), with why that is accepted. Any other unmet one is a problem.
ACCEPTED = {
    ("vllm", "numba"): "vllm pins numba==0.65.0, which needs numpy<2.5; the host has numpy "
        "2.5.2 and the numba that goes with it. vllm imports numba only for n-gram speculative "
        "decoding and one model's processor (inkling): not on the captioning path.",
    ("mistral-common", "numpy"): "mistral-common 1.13.1 (the newest; vllm needs >=1.11.5) "
        "caps numpy<2.4 on Python <= 3.12; the host has numpy 2.5.2. vllm imports "
        "mistral_common only for Mistral-format tokenizers and Pixtral/Voxtral models.",
    ("vllm", "setuptools"): "vllm pins setuptools<81,>=77.0.3 but never imports setuptools or "
        "pkg_resources (checked in 0.26.0); extension builds (torch.utils.cpp_extension) use "
        "the host's own setuptools.",
    **{("cuda-python", dep): "cuda-python is a metadata-only meta-package (no code), shipped "
        "to satisfy `cuda-python>=12.8` of nvidia-cutlass-dsl and flashinfer; what they import "
        "is the host's cuda-bindings / cuda-core / cuda-pathfinder."
       for dep in ("cuda-bindings", "cuda-core", "cuda-pathfinder")},
}

# Target: Linux x86-64, CPython 3.12 (the host's 3.12.3).
PLATFORM_ARGS = ["--python-version", "3.12", "--implementation", "cp",
                 "--abi", "cp312", "--abi", "abi3", "--abi", "none",
                 "--platform", "linux_x86_64", "--platform", "manylinux1_x86_64",
                 "--platform", "manylinux2010_x86_64", "--platform", "manylinux2014_x86_64"]
for _n in range(5, 40):
    PLATFORM_ARGS += ["--platform", f"manylinux_2_{_n}_x86_64"]
MARKER_ENV = {
    "implementation_name": "cpython", "implementation_version": "3.12.3", "os_name": "posix",
    "platform_machine": "x86_64", "platform_python_implementation": "CPython",
    "platform_release": "", "platform_system": "Linux", "platform_version": "",
    "python_full_version": "3.12.3", "python_version": "3.12", "sys_platform": "linux",
}

# Imported by `smoke`; --deep adds the modules on the GPU captioning path.
SMOKE = ["ray", "vllm", "ray.data.llm"]
SMOKE_DEEP = ["vllm:LLM", "ray.data.llm:build_processor", "xgrammar", "flashinfer",
              "flashinfer.sampling", "cutlass", "vllm.vllm_flash_attn",
              "vllm.v1.attention.backends.flash_attn", "vllm.v1.attention.backends.flashinfer",
              "vllm.v1.sample.ops.topk_topp_sampler", "vllm.multimodal", "capjob.pipeline",
              "capjob.stages.caption.processor", "hydra", "omegaconf"]


# ---------------------------------------------------------------------------- helpers

def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


_SHA_CACHE: dict = {}


def sha256(path: Path) -> str:
    st = os.stat(path)
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key in _SHA_CACHE:
        return _SHA_CACHE[key]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(4 * MiB), b""):
            h.update(block)
    _SHA_CACHE[key] = h.hexdigest()
    return _SHA_CACHE[key]


def mib(n: int) -> str:
    return f"{n / MiB:.1f} MiB"


def die(msg: str) -> NoReturn:
    print(f"gpu_wheels: error: {msg}", file=sys.stderr)
    sys.exit(1)


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    print("+ " + " ".join(shlex.quote(c) for c in cmd[:12]) + (" ..." if len(cmd) > 12 else ""),
          flush=True)
    return subprocess.run(cmd, **kw)


def pip(args: argparse.Namespace) -> list[str]:
    return shlex.split(args.pip) if args.pip else [sys.executable, "-m", "pip"]


def packaging_modules():
    """(Requirement, SpecifierSet, Version, InvalidVersion) from packaging, or None."""
    for mod in ("packaging", "pip._vendor.packaging"):
        try:
            req = __import__(f"{mod}.requirements", fromlist=["Requirement"])
            spec = __import__(f"{mod}.specifiers", fromlist=["SpecifierSet"])
            ver = __import__(f"{mod}.version", fromlist=["Version"])
            return req.Requirement, spec.SpecifierSet, ver.Version, ver.InvalidVersion
        except ImportError:
            continue
    return None


# ------------------------------------------------------------------------------- lock

LOCK_HEADER = """\
# capjob GPU-host wheel lock: generated by `python bench/gpu_wheels.py lock`; edit TOP_LEVEL,
# HOST_* or NOT_IN_CORE in bench/gpu_wheels.py and regenerate rather than editing by hand.
# Closure of vllm==0.26.0 (CUDA) + ray[data,default,llm]==2.58.1 + capjob's requirements for
# Linux x86-64 CPython 3.12, minus the packages the GPU host already has.
# columns: name version extras(- for none) group(core|extra) wheel-file sha256(- = built here)
"""


def read_lock(path: Path = LOCK) -> list[dict]:
    entries = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, version, extras, group, file, digest = line.split()
        entries.append({"name": name, "version": version,
                        "extras": [] if extras == "-" else extras.split(","),
                        "group": group, "file": file, "sha256": None if digest == "-" else digest})
    if not entries:
        die(f"{path} lists no wheels")
    return entries


def build_sdists(args, dest: Path) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    built = []
    for name, version in SDIST_ONLY.items():
        have = [p for p in dest.glob("*.whl") if norm(p.name.split("-")[0]) == norm(name)
                and p.name.split("-")[1] == version]
        if not have:
            r = run(pip(args) + ["wheel", "--no-deps", "--no-binary", name, "-w", str(dest),
                                 f"{name}=={version}"])
            if r.returncode:
                die(f"could not build a wheel of {name}=={version}")
            have = [p for p in dest.glob("*.whl") if norm(p.name.split("-")[0]) == norm(name)]
        built += have
    return built


def closure_extras(top: list[str], items: list[dict]) -> dict[str, set]:
    """The extras each resolved package is asked for, anywhere in the closure.

    (pip's report lists only the extras of the top-level requests.)"""
    pk = packaging_modules()
    if pk is None:
        die("`lock` needs the 'packaging' module (or pip's vendored copy)")
    Requirement = pk[0]
    meta = {norm(i["metadata"]["name"]): i["metadata"].get("requires_dist") or [] for i in items}
    extras: dict[str, set] = {n: set() for n in meta}
    todo = []
    for text in top:
        r = Requirement(text)
        extras[norm(r.name)] |= set(r.extras)
        todo.append(norm(r.name))
    seen: dict[str, frozenset] = {}
    while todo:
        name = todo.pop()
        if name not in meta or seen.get(name) == frozenset(extras[name]):
            continue
        seen[name] = frozenset(extras[name])
        for text in meta[name]:
            r = Requirement(text)
            envs = [dict(MARKER_ENV, extra=x) for x in [""] + sorted(extras[name])]
            if r.marker is not None and not any(r.marker.evaluate(e) for e in envs):
                continue
            dep = norm(r.name)
            if dep in extras:
                extras[dep] |= set(r.extras)
                todo.append(dep)
    return extras


def cmd_lock(args) -> None:
    reqs = TOP_LEVEL + list(args.req or [])
    with tempfile.TemporaryDirectory(prefix="gpu_wheels_lock_") as tmp:
        tmp = Path(tmp)
        built = build_sdists(args, Path(args.out) / "sdist")
        (tmp / "reqs.txt").write_text("\n".join(reqs) + "\n")
        (tmp / "constraints.txt").write_text("\n".join(HOST_PINS) + "\n")
        report = tmp / "report.json"
        r = run(pip(args) + ["install", "--dry-run", "--ignore-installed", "--quiet",
                             "--only-binary=:all:", *PLATFORM_ARGS, "--target", str(tmp / "t"),
                             "--find-links", str(Path(args.out) / "sdist"),
                             "-r", str(tmp / "reqs.txt"), "-c", str(tmp / "constraints.txt"),
                             "--report", str(report)])
        if r.returncode:
            die("pip could not resolve the closure (see above)")
        items = json.loads(report.read_text())["install"]
    sdist_files = {norm(p.name.split("-")[0]) for p in built}
    extras_of = closure_extras(reqs, items)
    lines, host_lines = [], []
    for it in sorted(items, key=lambda i: norm(i["metadata"]["name"])):
        meta, info = it["metadata"], it["download_info"]
        name = norm(meta["name"])
        if name in HOST_PACKAGES:
            host_lines.append(f"#   {name}=={meta['version']}")
            continue
        file = info["url"].rsplit("/", 1)[-1]
        digest = "-" if name in sdist_files else \
            (info.get("archive_info", {}).get("hashes", {}).get("sha256")
             or info.get("archive_info", {}).get("hash", "=-").split("=", 1)[1])
        extras = ",".join(sorted(extras_of.get(name, ()))) or "-"
        group = "extra" if name in NOT_IN_CORE else "core"
        lines.append(f"{name} {meta['version']} {extras} {group} {file} {digest}")
    stamp = time.strftime("%Y-%m-%d")
    text = (LOCK_HEADER + f"# resolved {stamp} from: {' '.join(reqs)}\n"
            + f"# host pins: {' '.join(HOST_PINS)}\n" + "\n".join(lines) + "\n"
            + "# Left to the host (pip's pick shown; the host keeps its own version):\n"
            + "\n".join(host_lines) + "\n")
    LOCK.write_text(text)
    print(f"wrote {LOCK.relative_to(REPO)}: {len(lines)} wheels to ship, "
          f"{len(host_lines)} packages left to the host")


# ------------------------------------------------------------------------------- pack

def wheel_requirements(path: Path) -> list[str]:
    with zipfile.ZipFile(path) as z:
        metas = [n for n in z.namelist()
                 if n.count("/") == 1 and n.endswith(".dist-info/METADATA")]
        if len(metas) != 1:
            die(f"{path.name}: expected one top-level METADATA, found {metas}")
        msg = email.parser.Parser().parsestr(z.read(metas[0]).decode("utf-8", "replace"))
    return msg.get_all("Requires-Dist") or []


def active_requirements(entries: list[dict], folder: Path) -> list[tuple[str, str]]:
    """(requirer, 'name specifier') for every requirement that applies on the host."""
    pk = packaging_modules()
    if pk is None:
        print("note: no 'packaging' module; skipping the closure check")
        return []
    Requirement = pk[0]
    out = []
    for e in entries:
        for text in wheel_requirements(folder / e["file"]):
            req = Requirement(text)
            if req.marker is not None:
                envs = [dict(MARKER_ENV, extra=x) for x in [""] + e["extras"]]
                if not any(req.marker.evaluate(env) for env in envs):
                    continue
            out.append((f"{e['name']}=={e['version']}",
                        f"{norm(req.name)}{req.specifier}".strip()))
    return out


def check_requirements(reqs, version_of, shipped_names=frozenset(),
                       left_out=frozenset()) -> tuple[list, list, list]:
    """Split requirements into (problems, accepted, unknown) given version_of(name) -> str|None.

    version_of returns None for 'not installed', '?' for 'installed, version unknown'.
    A package in left_out (left out of the profile on purpose) may be missing."""
    pk = packaging_modules()
    if pk is None:
        return [], [], []
    Requirement, _, Version, InvalidVersion = pk
    problems, accepted, unknown = [], [], []
    for requirer, text in reqs:
        req = Requirement(text)
        name = norm(req.name)
        have = version_of(name)
        if have == "?":
            if str(req.specifier):
                unknown.append(f"{name}{req.specifier} (for {requirer})")
            continue
        if have is None:
            if name in left_out:
                continue
            msg = f"{requirer} needs {text}: not installed"
        else:
            try:
                ok = req.specifier.contains(Version(have), prereleases=True)
            except InvalidVersion:
                ok = True
            if ok:
                continue
            msg = f"{requirer} needs {text}: have {name} {have}"
        key = (norm(requirer.split("==")[0]), name)
        (accepted if key in ACCEPTED and name not in shipped_names else problems).append(msg)
    return problems, accepted, sorted(set(unknown))


def layout(wheels: list[dict], paths: dict, capacity: int, splitdir: Path,
           min_chunk: int = MiB) -> list[list[dict]]:
    """Fill parts of `capacity` bytes in turn, biggest wheels first. A wheel that does not fit
    in what is left of the current part is cut there (if at least min_chunk is left) and goes
    on in the next part, so a group takes ceil(size / capacity) parts. Sets w['chunks']."""
    parts: list[list[dict]] = [[]]
    room = capacity
    for w in sorted(wheels, key=lambda x: (-x["size"], x["file"])):
        if w["size"] <= room:
            parts[-1].append({"file": w["file"], "size": w["size"], "src": paths[w["file"]]})
            room -= w["size"]
            continue
        if room < min_chunk and w["size"] <= capacity:
            parts.append([{"file": w["file"], "size": w["size"], "src": paths[w["file"]]}])
            room = capacity - w["size"]
            continue
        with open(paths[w["file"]], "rb") as f:
            while True:
                if room < min_chunk:
                    parts.append([])
                    room = capacity
                data = f.read(room)
                if not data:
                    break
                c = {"file": f"{w['file']}.split{len(w['chunks']):03d}", "size": len(data),
                     "sha256": hashlib.sha256(data).hexdigest()}
                (splitdir / c["file"]).write_bytes(data)
                w["chunks"].append(c)
                parts[-1].append(dict(c, src=splitdir / c["file"]))
                room -= len(data)
    return [p for p in parts if p]


def link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def cmd_pack(args) -> None:
    entries = read_lock(Path(args.lock))
    out = Path(args.out)
    dl, splitdir = out / "dl", out / "split"
    dl.mkdir(parents=True, exist_ok=True)
    budget = int(args.budget_mib * MiB)
    reserve = 256 * 1024  # room for manifest.json in every part
    capacity = budget - reserve

    # 1. download (what is not already there with the right sha256)
    def good(e) -> bool:
        p = dl / e["file"]
        return p.exists() and (e["sha256"] is None or sha256(p) == e["sha256"])

    missing = [e for e in entries if not good(e)]
    binary = [e for e in missing if e["name"] not in SDIST_ONLY]
    if binary:
        r = run(pip(args) + ["download", "--no-deps", "--only-binary=:all:", *PLATFORM_ARGS,
                             "--progress-bar", "off",
                             "-d", str(dl)] + [f"{e['name']}=={e['version']}" for e in binary])
        if r.returncode:
            die("pip download failed")
    if any(e["name"] in SDIST_ONLY for e in missing):
        for p in build_sdists(args, out / "sdist"):
            if not (dl / p.name).exists():
                link_or_copy(p, dl / p.name)
    bad = []
    for e in entries:
        p = dl / e["file"]
        if not p.exists():
            bad.append(f"{e['file']}: not downloaded (pip chose another file?)")
        elif e["sha256"] and sha256(p) != e["sha256"]:
            bad.append(f"{e['file']}: sha256 differs from the lock")
    if bad:
        die("downloads do not match the lock:\n  " + "\n  ".join(bad))

    # 2. closure check: every requirement of a shipped wheel is shipped or on the host
    shipped = {e["name"]: e for e in entries}
    reqs = active_requirements(entries, dl)
    if reqs:
        core_names = {n for n, e in shipped.items() if e["group"] == "core"}

        def version_of(name, names):
            if name in names:
                return shipped[name]["version"]
            if name in HOST_PACKAGES:
                return HOST_VERSIONS.get(name, "?")
            return None

        for label, names in (("full", set(shipped)), ("core", core_names)):
            scope = [r for r in reqs if norm(r[0].split("==")[0]) in names]
            problems, accepted, unknown = check_requirements(
                scope, lambda n: version_of(n, names), frozenset(names),
                left_out=frozenset(NOT_IN_CORE) if label == "core" else frozenset())
            print(f"closure check ({label}): {len(problems)} problem(s), "
                  f"{len(accepted)} accepted deviation(s)")
            print_findings(problems, accepted, "PROBLEM ")
        print(f"  host packages the shipped wheels constrain (host versions not known here; "
              f"`receive` checks them on the host): {len(unknown)}")
        for u in unknown:
            print(f"    {u}")

    # 3. split and lay out the parts
    for old in [*out.glob("part[0-9]*"), splitdir]:
        if old.exists():
            shutil.rmtree(old)
    splitdir.mkdir()
    wheels = [{"name": e["name"], "version": e["version"], "extras": e["extras"],
               "group": e["group"], "file": e["file"], "size": (dl / e["file"]).stat().st_size,
               "sha256": sha256(dl / e["file"]), "chunks": []} for e in entries]
    paths = {e["file"]: dl / e["file"] for e in entries}
    parts = []
    for group in ("core", "extra"):
        for b in layout([w for w in wheels if w["group"] == group], paths, capacity, splitdir):
            parts.append({"name": f"part{len(parts) + 1:02d}", "group": group,
                          "files": sorted(x["file"] for x in b),
                          "size": sum(x["size"] for x in b), "_src": b})
    reqs_out = [[a, b] for a, b in reqs]
    manifest = {"format": 1, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "budget_mib": args.budget_mib, "dest": DEST, "site": SITE,
                "wheels": wheels,
                "parts": [{k: v for k, v in p.items() if k != "_src"} for p in parts],
                "requirements": reqs_out,
                "accepted": [[a, b, why] for (a, b), why in ACCEPTED.items()],
                "host_versions": HOST_VERSIONS}
    text = json.dumps(manifest, indent=1, sort_keys=True) + "\n"
    if len(text) > reserve:
        die(f"manifest.json is {len(text)} bytes, more than the {reserve} reserved")
    (out / MANIFEST).write_text(text)
    for p in parts:
        d = out / p["name"]
        d.mkdir()
        for x in p["_src"]:
            link_or_copy(x["src"], d / x["file"])
        (d / MANIFEST).write_text(text)
        total = sum(f.stat().st_size for f in d.iterdir())
        if total > budget:
            die(f"{p['name']} is {mib(total)}, over the {args.budget_mib} MiB budget")
    # 4. summary
    for group in ("core", "extra"):
        ws = [w for w in wheels if w["group"] == group]
        ps = [p for p in parts if p["group"] == group]
        print(f"{group}: {len(ws)} wheels, {mib(sum(w['size'] for w in ws))}, "
              f"parts {ps[0]['name'] if ps else '-'}..{ps[-1]['name'] if ps else '-'} ({len(ps)})")
    for p in parts:
        print(f"  {p['name']} [{p['group']}] {mib(p['size'] + len(text)):>10}  "
              f"{len(p['files'])} file(s)")
    print(f"wrote {out}/{MANIFEST} and {len(parts)} parts; budget {args.budget_mib} MiB each. "
          f"Next: python3 bench/gpu_wheels.py plan")


# ------------------------------------------------------------------------------- plan

def cmd_plan(args) -> None:
    out = Path(args.out)
    manifest = json.loads((out / MANIFEST).read_text())
    parts = [p for p in manifest["parts"] if args.profile == "full" or p["group"] == "core"]
    rel = os.path.relpath(out, REPO)
    last_tail = (f" && python3 bench/gpu_wheels.py unpack --from {DEST} --target {SITE}"
                 f" --profile {args.profile}"
                 f" && . {SITE}/env.sh && python3 -c \"import ray, vllm, ray.data.llm; "
                 f"print(ray.__version__, vllm.__version__)\"")
    if args.deep:
        last_tail += f" && python3 bench/gpu_wheels.py smoke --target {SITE} --deep"
    if args.then:
        last_tail += f" && {args.then}"
    calls = []
    for i, p in enumerate(parts):
        cmd = f"python3 bench/gpu_wheels.py receive {rel}/{p['name']}"
        if i == len(parts) - 1:
            cmd += last_tail
        calls.append({"carry": [f"{rel}/{p['name']}"], "command": cmd,
                      "timeout_s": 600 if i == len(parts) - 1 else 120,
                      "mib": round((p["size"]) / MiB, 1)})
    for c in calls:
        if len(c["command"]) > 2000:
            die(f"command for {c['carry'][0]} is {len(c['command'])} characters (> 2000)")
    if args.json:
        print(json.dumps(calls, indent=1))
        return
    total = sum(p["size"] for p in parts)
    print(f"# profile {args.profile}: {len(calls)} device calls, {mib(total)} of wheels. "
          f"Make them back to back: the host keeps /tmp only while it is warm (~30 s after a "
          f"call) and for at most 30 minutes in all. Same kind for every call.")
    for i, c in enumerate(calls, 1):
        print(f"\n# {i}/{len(calls)}  ({c['mib']} MiB)")
        print(f"run carry={json.dumps(c['carry'])} timeout_s={c['timeout_s']}")
        print(f"    command={json.dumps(c['command'])}")
    print(f"\n# afterwards, in the same warm session: . {SITE}/env.sh && <benchmark command>")


# ---------------------------------------------------------------------------- receive

def load_manifest(folder: Path) -> dict:
    p = folder / MANIFEST
    if not p.exists():
        die(f"{p} not found")
    return json.loads(p.read_text())


def piece_index(manifest: dict) -> dict[str, tuple[int, str]]:
    idx = {}
    for w in manifest["wheels"]:
        if w["chunks"]:
            for c in w["chunks"]:
                idx[c["file"]] = (c["size"], c["sha256"])
        else:
            idx[w["file"]] = (w["size"], w["sha256"])
    return idx


def installed_version(name: str):
    from importlib import metadata
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def host_check(manifest: dict, extra_paths: list[str] = ()) -> int:
    """Check the shipped wheels' requirements on host packages against the host."""
    shipped = {w["name"] for w in manifest["wheels"]}
    reqs = [(a, b) for a, b in manifest["requirements"]
            if norm(re.split(r"[<>=!~ ;\[]", b, 1)[0]) not in shipped]
    problems, accepted, _ = check_requirements(reqs, installed_version)
    print(f"host check: {len(reqs)} requirements on host packages, {len(problems)} not met, "
          f"{len(accepted)} accepted")
    print_findings(problems, accepted, "NOT MET ")
    return len(problems)


def print_findings(problems: list, accepted: list, problem_label: str) -> None:
    for p in problems:
        print(f"  {problem_label} {p}")
    for a in accepted:
        print(f"  accepted {a}")


def cmd_receive(args) -> None:
    src, dest = Path(args.part), Path(args.to)
    manifest = load_manifest(src)
    dest.mkdir(parents=True, exist_ok=True)
    first = not (dest / MANIFEST).exists()
    if not first and load_manifest(dest)["created"] != manifest["created"]:
        print(f"note: {dest} holds pieces of another pack ({load_manifest(dest)['created']}); "
              f"clearing it")
        shutil.rmtree(dest)
        dest.mkdir(parents=True)
        first = True
    idx = piece_index(manifest)
    n = size = 0
    for f in sorted(src.iterdir()):
        if f.name == MANIFEST:
            continue
        if f.name not in idx:
            die(f"{f.name} is not in the manifest")
        if sha256(f) != idx[f.name][1]:
            die(f"{f.name}: sha256 mismatch after transfer")
        shutil.copyfile(f, dest / f.name)
        n += 1
        size += f.stat().st_size
    shutil.copyfile(src / MANIFEST, dest / MANIFEST)
    have = {p.name for p in dest.iterdir()}
    for group in ("core", "extra"):
        want = [p for p in manifest["parts"] if p["group"] == group]
        done = [p["name"] for p in want if set(p["files"]) <= have]
        print(f"  {group}: {len(done)}/{len(want)} parts present")
    print(f"received {src.name}: {n} file(s), {mib(size)} -> {dest}")
    if first:
        import platform
        print(f"host: Python {platform.python_version()} at {sys.executable}; "
              + ", ".join(f"{k} {installed_version(k)}" for k in
                          ("torch", "numpy", "numba", "setuptools", "protobuf", "transformers")))
        host_check(manifest)


# ----------------------------------------------------------------------------- unpack

def cmd_unpack(args) -> None:
    src, target = Path(args.src), Path(args.target)
    manifest = load_manifest(src)
    have = {p.name for p in src.iterdir()}
    groups = {"core"} | ({"extra"} if args.profile == "full" else set())
    absent = [p["name"] for p in manifest["parts"] if p["group"] in groups
              and not set(p["files"]) <= have
              and not all(f.split(".whl")[0] + ".whl" in have for f in p["files"])]
    if absent:
        die(f"parts not (fully) received in {src}: {' '.join(absent)}")
    wanted = []
    for w in manifest["wheels"]:
        files = [c["file"] for c in w["chunks"]] or [w["file"]]
        complete = w["file"] in have or set(files) <= have
        if w["group"] == "core" or args.profile == "full" or (args.profile == "auto" and complete):
            if not complete:
                die(f"{w['file']} ({w['group']}) is missing: upload every part of the profile "
                    f"first (`plan --profile {args.profile}`)")
            wanted.append(w)
    # rejoin and verify
    for w in wanted:
        p = src / w["file"]
        if w["chunks"] and not (p.exists() and p.stat().st_size == w["size"]):
            with open(p, "wb") as out:
                for c in w["chunks"]:
                    with open(src / c["file"], "rb") as f:
                        shutil.copyfileobj(f, out, 16 * MiB)
        if sha256(p) != w["sha256"]:
            die(f"{w['file']}: sha256 mismatch")
        if w["chunks"] and not args.keep_chunks:
            for c in w["chunks"]:
                (src / c["file"]).unlink(missing_ok=True)
    print(f"verified {len(wanted)} wheels ({mib(sum(w['size'] for w in wanted))}), "
          f"sha256 as in the manifest")
    # install into a fresh target
    if target.exists() and any(target.iterdir()):
        if not (target / MARKER).exists() and not args.force:
            die(f"{target} exists and was not made by this script (use --force to replace it)")
        shutil.rmtree(target)
    target.mkdir(parents=True, exist_ok=True)
    (target / MARKER).write_text("{}")  # marks the folder as ours, even if pip fails below
    t0 = time.time()
    r = run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
             "--no-index", "--no-deps", "--no-compile", "--no-cache-dir", "--target",
             str(target)] + [str(src / w["file"]) for w in wanted])
    if r.returncode:
        die("pip install failed")
    print(f"installed into {target} in {time.time() - t0:.0f} s")
    # .pth files are not read from PYTHONPATH entries: find the paths they would add
    probe = ("import json, site, sys; before = list(sys.path); site.addsitedir(sys.argv[1]); "
             "print(json.dumps([p for p in sys.path if p not in before]))")
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    added = json.loads(subprocess.run([sys.executable, "-c", probe, str(target)], env=env,
                                      check=True, capture_output=True, text=True).stdout)
    paths = [str(target)] + [p for p in added if Path(p) != target]
    (target / MARKER).write_text(json.dumps({"paths": paths, "created": manifest["created"],
                                             "wheels": [w["file"] for w in wanted]}, indent=1))
    lines = ["# written by bench/gpu_wheels.py unpack; source it from the repository root",
             f'export PYTHONPATH="{":".join(paths)}${{PYTHONPATH:+:$PYTHONPATH}}"',
             f'export PATH="{target}/bin${{PATH:+:$PATH}}"',
             'if [ -d "$PWD/src/capjob" ]; then export PYTHONPATH="$PWD/src:$PYTHONPATH"; fi',
             ""]
    (target / "env.sh").write_text("\n".join(lines))
    print(f"wrote {target}/env.sh (PYTHONPATH: {':'.join(paths)})")
    # requirements of what was installed, against the host + target
    sys.path[:0] = paths
    installed = {w["name"] for w in wanted}
    reqs = [(a, b) for a, b in manifest["requirements"] if norm(a.split("==")[0]) in installed]
    problems, accepted, _ = check_requirements(reqs, installed_version, frozenset(installed),
                                               left_out=frozenset(NOT_IN_CORE))
    print(f"dependency check: {len(problems)} problem(s), {len(accepted)} accepted deviation(s)")
    for p in problems:
        print(f"  PROBLEM  {p}")
    for a in accepted:
        print(f"  accepted {a}")


# ------------------------------------------------------------------------------ smoke

def cmd_smoke(args) -> None:
    target = Path(args.target)
    marker = target / MARKER
    paths = (json.loads(marker.read_text()).get("paths") if marker.exists() else None) \
        or [str(target)]
    src = REPO / "src"
    env = dict(os.environ)
    env["PYTHONPATH"] = ":".join(paths + [str(src)] + ([env["PYTHONPATH"]]
                                                      if env.get("PYTHONPATH") else []))
    mods = SMOKE + (SMOKE_DEEP if args.deep else []) + list(args.module or [])
    code = r"""
import importlib, sys, time, traceback
failed = 0
for spec in sys.argv[1:]:
    mod, _, attr = spec.partition(":")
    t = time.time()
    try:
        m = importlib.import_module(mod)
        if attr:
            getattr(m, attr)
        v = str(getattr(m, "__version__", ""))
        print(f"  ok    {spec:45s} {v:12s} {time.time() - t:5.1f} s", flush=True)
    except BaseException as e:
        failed += 1
        print(f"  FAIL  {spec:45s} {type(e).__name__}: {e}", flush=True)
        traceback.print_exc(limit=-3)
try:
    import torch
    print(f"torch {torch.__version__}, cuda available: {torch.cuda.is_available()}, "
          f"devices: {torch.cuda.device_count()}")
except Exception as e:
    print("torch:", e)
sys.exit(1 if failed else 0)
"""
    r = subprocess.run([sys.executable, "-c", code, *mods], env=env)
    sys.exit(r.returncode)


# ------------------------------------------------------------------------------- main

def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    def here(p):
        p.add_argument("--out", default=str(OUT), help="working folder (default: .whl)")
        p.add_argument("--pip", help="pip command line (default: this python -m pip)")

    p = sub.add_parser("lock", help="re-resolve the closure and rewrite bench/gpu_wheels.lock")
    here(p)
    p.add_argument("--req", action="append", help="extra top-level requirement (repeatable)")
    p.set_defaults(fn=cmd_lock)

    p = sub.add_parser("pack", help="download, check, split and lay out .whl/partNN")
    here(p)
    p.add_argument("--lock", default=str(LOCK))
    p.add_argument("--budget-mib", type=float, default=56.0, help="largest part (default 56)")
    p.set_defaults(fn=cmd_pack)

    p = sub.add_parser("plan", help="print the device calls that upload and install the parts")
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--profile", choices=["core", "full"], default="core")
    p.add_argument("--deep", action="store_true", help="also run `smoke --deep` at the end")
    p.add_argument("--then", help="shell command to append to the last call")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_plan)

    p = sub.add_parser("receive", help="(host) copy one carried part into the wheel folder")
    p.add_argument("part")
    p.add_argument("--to", default=DEST)
    p.set_defaults(fn=cmd_receive)

    p = sub.add_parser("unpack", help="(host) rejoin, verify and install the wheels")
    p.add_argument("--from", dest="src", default=DEST)
    p.add_argument("--target", default=SITE)
    p.add_argument("--profile", choices=["core", "full", "auto"], default="auto",
                   help="auto (default): core plus every extra wheel that was uploaded")
    p.add_argument("--keep-chunks", action="store_true")
    p.add_argument("--force", action="store_true", help="replace a target not made by unpack")
    p.set_defaults(fn=cmd_unpack)

    p = sub.add_parser("smoke", help="(host) import the stack from the install target")
    p.add_argument("--target", default=SITE)
    p.add_argument("--deep", action="store_true", help="also the GPU captioning code paths")
    p.add_argument("module", nargs="*", help="more modules (module or module:attribute)")
    p.set_defaults(fn=cmd_smoke)

    args = ap.parse_args(argv)
    args.fn(args)


if __name__ == "__main__":
    main()
