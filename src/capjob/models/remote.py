"""Models on object storage (`model.source=s3://bucket/ckpt/step-1000`, or any fsspec URL),
loaded on the node that runs the stage, never through the driver's disk.

- s3://, gs://, abfss://, azure:// are what Ray Data LLM's own loader takes
  (ray.llm's download_model_files): its vLLM engine stage downloads the model into the node's
  Hugging Face cache (HF_HOME) itself; its tokenizer stages do the same with the tokenizer
  files. The endpoint and credentials come from the node's environment (AWS_ENDPOINT_URL,
  AWS_ACCESS_KEY_ID, instance roles...), as for boto3.
- Any other fsspec URL (s3a://, hdfs://, a mounted fsspec filesystem...) is copied by `fetch`
  into the node's capjob cache (CAPJOB_CACHE, default ~/.cache/capjob) under
  ``models/remote/<name>-<revision>``, where the revision is a digest of every object's ETag
  (size and mtime where the store has no ETag): once per node and per checkpoint content,
  under a file lock, published by a rename so a half-copied model is never loaded.

`node_local_stage_udfs` makes a processor's stages resolve the URL on their own node: Ray
Data LLM's PrepareMultimodal stage hands `model` to vLLM's ModelConfig, which reads object
storage only through the optional Run:ai streamer, and its other stages only know Ray's
schemes.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import pathlib
import re
import shutil
import tempfile
from typing import Any, Callable, Optional

from capjob.cache import cache_dir

# ray.llm._internal.common.utils.cloud_utils.is_remote_path (ray 2.58): the schemes its loader downloads.
RAY_LLM_SCHEMES = ("s3://", "gs://", "abfss://", "azure://")
COMPLETE_MARKER = ".capjob-fetch-complete.json"
REMOTE_DIR = "remote"


def is_url(source: Optional[str]) -> bool:
    """A model source on storage (scheme://...), as opposed to a hub id or a local folder."""
    return bool(source) and "://" in str(source) and not str(source).startswith("file://")


def ray_llm_loads(source: str) -> bool:
    """Ray Data LLM downloads this URL itself."""
    return source.startswith(RAY_LLM_SCHEMES)


def listing(url: str, fs: Any = None, root: Optional[str] = None) -> list[dict[str, Any]]:
    """Every object under `url` (a folder): [{"name": relative path, "size": bytes, "etag": str}],
    sorted by name. Hidden names (".x", "_x") are skipped. `fs`/`root`: an fsspec filesystem
    and path for `url` (preflight's, with short timeouts); default fsspec.url_to_fs(url).
    Raises FileNotFoundError when nothing is there, the store's own errors (denied,
    unreachable) unchanged."""
    if fs is None:
        import fsspec

        fs, root = fsspec.url_to_fs(url)
    root = str(root).rstrip("/")
    entries = fs.find(root, detail=True)
    out = []
    for name, info in sorted(entries.items()):
        if info.get("type") == "directory":
            continue
        rel = name[len(root):].lstrip("/") if name.startswith(root) else name.rsplit("/", 1)[-1]
        if not rel or any(part[:1] in "._" for part in rel.split("/")):
            continue
        etag = info.get("ETag") or info.get("etag") or info.get("md5") or f"{info.get('size')}-{info.get('mtime') or info.get('LastModified') or info.get('last_modified')}"
        out.append({"name": rel, "size": int(info.get("size") or 0), "etag": str(etag).strip('"')})
    if not out:
        raise FileNotFoundError(f"no files under {url}")
    return out


WEIGHT_INDEX_SUFFIX = ".index.json"  # model.safetensors.index.json, pytorch_model.bin.index.json


def incomplete_weights(sizes: dict[str, int], read: Callable[[str, int, int], bytes]) -> list[str]:
    """What a model folder's weights lack although a weights file is there: a shard that an
    index file (`*.index.json`, transformers' sharded checkpoints: {"weight_map": {tensor:
    file}}) names but the folder does not hold, and a `.safetensors` file shorter than its own
    header says (the safetensors format: an 8-byte little-endian header length, a JSON header
    whose tensors' `data_offsets` end where the file must end). Both are a checkpoint still
    being written or uploaded, which a listing alone cannot tell from a finished one.

    sizes: {relative file name: bytes}; read(name, start, end): those bytes of the file.
    Returns readable problems ([] when none); a file it cannot parse is left to the loader."""
    problems = []
    for name in sorted(n for n in sizes if n.endswith(WEIGHT_INDEX_SUFFIX)):
        try:
            weight_map = json.loads(read(name, 0, sizes[name])).get("weight_map") or {}
            shards = sorted({str(v) for v in weight_map.values()})
        except (OSError, ValueError, AttributeError):
            continue
        base = name.rsplit("/", 1)[0] + "/" if "/" in name else ""
        absent = [s for s in shards if base + s not in sizes]
        if absent:
            problems.append(f"{len(absent)} of the {len(shards)} weight shards {name} lists ({', '.join(absent[:3])}"
                            f"{', ...' if len(absent) > 3 else ''})")
    for name in sorted(n for n in sizes if n.endswith(".safetensors")):
        size = sizes[name]
        try:
            header_len = int.from_bytes(read(name, 0, 8), "little") if size >= 8 else None
            if header_len is None or 8 + header_len > size:
                if header_len is not None and header_len > 100_000_000:
                    continue  # not a safetensors header: the loader says what it is
                problems.append(f"the rest of {name} ({size} bytes, shorter than its header)")
                continue
            header = json.loads(read(name, 8, 8 + header_len))
            end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0)
        except (OSError, ValueError, AttributeError, KeyError, TypeError, IndexError):
            continue
        if 8 + header_len + end > size:
            problems.append(f"the rest of {name} ({size} of {8 + header_len + end} bytes)")
    return problems


def revision(entries: list[dict[str, Any]]) -> str:
    """16 hex digits of a sha256 over the objects' names, sizes and ETags: a rewritten checkpoint
    (any object replaced) gets another revision, the same content the same one."""
    h = hashlib.sha256()
    for e in entries:
        h.update(f"{e['name']}\0{e['size']}\0{e['etag']}\0".encode())
    return h.hexdigest()[:16]


def _slug(url: str) -> str:
    """A readable folder name from the URL's last two parts (run/step-1000 -> run--step-1000)."""
    tail = "--".join(url.rstrip("/").split("://", 1)[-1].split("/")[-2:])
    return re.sub(r"[^A-Za-z0-9._-]+", "_", tail)[:80] or "model"


def cache_root() -> pathlib.Path:
    return cache_dir() / "models" / REMOTE_DIR


def fetch(url: str, root: Optional[os.PathLike] = None, tokenizer_only: bool = False) -> pathlib.Path:
    """The local copy of the model folder at `url` on this node, downloaded if this node does
    not hold this revision yet. `root`: default <capjob cache>/models/remote. Concurrent callers
    on one node (engine replicas, tokenizer stages) wait on one lock: one download per node.
    `tokenizer_only` is accepted for symmetry with Ray's loader; the whole folder is fetched
    (the same copy then serves the engine)."""
    del tokenizer_only
    entries = listing(url)
    base = pathlib.Path(root) if root is not None else cache_root()
    target = base / f"{_slug(url)}-{revision(entries)}"
    if (target / COMPLETE_MARKER).is_file():
        return target
    base.mkdir(parents=True, exist_ok=True)
    with open(base / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / COMPLETE_MARKER).is_file():
            return target
        import fsspec

        fs, src = fsspec.url_to_fs(url)
        staging = pathlib.Path(tempfile.mkdtemp(dir=base, prefix=f".{target.name}.fetching-"))
        try:
            for e in entries:
                dest = staging / e["name"]
                dest.parent.mkdir(parents=True, exist_ok=True)
                fs.get_file(f"{src.rstrip('/')}/{e['name']}", str(dest))
            (staging / COMPLETE_MARKER).write_text(json.dumps({"url": url, "files": entries}, indent=1) + "\n")
            if target.exists():  # an unfinished copy of an earlier crash
                shutil.rmtree(target)
            staging.rename(target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return target


def local_model(url: str, tokenizer_only: bool = False) -> str:
    """The node-local folder for a model URL: Ray Data LLM's loader for its schemes (the node's
    Hugging Face cache), `fetch` for any other fsspec URL. Anything else is returned unchanged."""
    if not is_url(url):
        return url
    if ray_llm_loads(url):
        from ray.llm._internal.common.utils.download_utils import NodeModelDownloadable, download_model_files

        mode = NodeModelDownloadable.TOKENIZER_ONLY if tokenizer_only else NodeModelDownloadable.MODEL_AND_TOKENIZER
        return str(download_model_files(model_id=url, mirror_config=None, download_model=mode, download_extra_files=False))
    return str(fetch(url))


def _on_node(udf_class: type, engine: bool) -> type:
    """A subclass of a Ray Data LLM stage UDF whose constructor first swaps the model URL in its
    kwargs (`model`, or `model_config_kwargs["model"]`) for the node-local copy."""

    class NodeLocalModel(udf_class):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any):
            if is_url(kwargs.get("model")):
                kwargs["model"] = local_model(kwargs["model"], tokenizer_only=not engine)
            mc = kwargs.get("model_config_kwargs")
            if isinstance(mc, dict) and is_url(mc.get("model")):
                kwargs["model_config_kwargs"] = {**mc, "model": local_model(mc["model"], tokenizer_only=True)}
            super().__init__(*args, **kwargs)

    NodeLocalModel.__name__ = udf_class.__name__  # Ray Data names the operator after it
    NodeLocalModel.__qualname__ = udf_class.__qualname__
    return NodeLocalModel


def node_local_stage_udfs(stages: dict[str, Any], model_source: str) -> None:
    """In place: every stage of a Ray Data LLM processor (`processor.stages`) that would be
    handed `model_source` resolves it on its own node instead. The vLLM engine stage of Ray's
    schemes is left to Ray Data LLM (it downloads the model itself)."""
    if not is_url(model_source):
        return
    for name, stage in stages.items():
        kwargs = stage.fn_constructor_kwargs
        uses = kwargs.get("model") == model_source or (kwargs.get("model_config_kwargs") or {}).get("model") == model_source
        if not uses:
            continue
        engine = "vLLMEngine" in name
        if engine and ray_llm_loads(model_source):
            continue
        # StatefulStage (pydantic) validates an assigned `fn` as an instance; it holds a class.
        object.__setattr__(stage, "fn", _on_node(stage.fn, engine))
