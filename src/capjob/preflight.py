"""Checks that run in seconds, before Ray starts: overrides, config keys, model, data, sink.

Every fault found here is a CapjobError whose message is one line naming the key to change; the
CLI prints it as `capjob: error: ...` and exits 2. `check_all` is the one sequence of checks a
run makes before Ray starts, and what a dry run (`job.dry_run=true`) makes: the same checks in
the same order, for every source format, so a dry run stops where the run would, with the same
line. (The checks that need the cluster, run once Ray is up, are pipeline.start's.)

The model is checked first, before Ray Data, pyarrow and fsspec are imported (`check_all`
imports the stages after it): a missing model is the commonest first mistake.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import pathlib
from typing import Any, Optional

from omegaconf import DictConfig

from capjob import console, models
from capjob.config import (CapjobConfig, CaptionConfig, DataConfig, EngineConfig, EvalMode, ModelConfig, ResourcesConfig,
                           SourceFormat)
from capjob.errors import CapjobError, ConfigError, SourceError, describe, first_line
from capjob.models import remote
from capjob.plan import dry_run_plan, new_run_id
from capjob.prompts import prompt_columns, prompt_specs
from capjob.stages.caption.engine import EnginePlacement, decide_placement, local_gpu_count
from capjob.stages.storage import describe_remote_error, probe_filesystem

# vLLM needs these from a model folder (transformers' file names). A trainer checkpoint often
# has config + weights + tokenizer only: the processor and the chat template are what it lacks.
MODEL_FILES: dict[str, tuple[str, ...]] = {
    "config": ("config.json",),
    "tokenizer": ("tokenizer.json", "tokenizer.model", "vocab.json"),
    "processor": ("preprocessor_config.json", "processor_config.json"),
}
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")
# Configs that hold a chat template inline (older checkpoints).
CHAT_TEMPLATE_CONFIGS = ("tokenizer_config.json", "processor_config.json")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
# What transformers.Trainer saves beside the model in a checkpoint (optimizer.pt, scheduler.pt,
# rng_state.pth, training_args.bin; trainer_utils / trainer.py's file names): a .pt/.bin file that
# is no model weights, so a checkpoint holding these but not yet its model is not loadable.
TRAINER_STATE_PREFIXES = ("optimizer", "scheduler", "rng_state", "training_args", "trainer_state", "scaler")
HUB_TIMEOUT_S = 5.0


def is_weights(name: str) -> bool:
    """A file name that holds model weights (not the trainer's optimizer or RNG state)."""
    return name.endswith(WEIGHT_SUFFIXES) and not name.startswith(TRAINER_STATE_PREFIXES)


# --- Config keys -----------------------------------------------------------------------------


def close_keys(key: str, candidates: list[str]) -> str:
    """' (did you mean a.b?)' for the closest candidates (difflib ratio >= 0.6), else ''."""
    matches = difflib.get_close_matches(key, candidates, n=2, cutoff=0.6)
    return f"; did you mean {' or '.join(matches)}?" if matches else ""


def schema_keys(schema: type, prefix: str = "") -> list[str]:
    """Every dotted key of a dataclass schema, nested dataclasses included."""
    out = []
    for name, kind in _field_types(schema).items():
        out.append(f"{prefix}{name}")
        if dataclasses.is_dataclass(kind):
            out += schema_keys(kind, f"{prefix}{name}.")
    return out


def _field_types(schema: type) -> dict[str, Any]:
    import typing

    names = {f.name for f in dataclasses.fields(schema)}
    return {k: v for k, v in typing.get_type_hints(schema).items() if k in names}


def unknown_keys(cfg: Any, schema: type, prefix: str = "") -> list[str]:
    """Dotted keys of `cfg` that `schema` (a dataclass) does not define. Keys under dict-typed
    fields (storage_options, env_vars, extra_engine_kwargs) are free-form and never reported.
    Hydra refuses `engine.batchsize=4` itself but adds `+engine.batchsize=4`: this catches both."""
    types = _field_types(schema)
    out = []
    for key in cfg.keys() if isinstance(cfg, DictConfig) else []:
        key = str(key)
        if key not in types:
            out.append(f"{prefix}{key}")
            continue
        child_type = types[key]
        if dataclasses.is_dataclass(child_type):
            child = cfg._get_node(key)
            if isinstance(child, DictConfig) and not child._is_none():
                out += unknown_keys(child, child_type, f"{prefix}{key}.")
    return out


def check_keys(cfg: DictConfig) -> None:
    """Raise ConfigError for the first key the schema lacks, with the closest known keys."""
    unknown = unknown_keys(cfg, CapjobConfig)
    if unknown:
        key = unknown[0]
        more = f" (and {len(unknown) - 1} more unknown key(s): {', '.join(unknown[1:4])})" if len(unknown) > 1 else ""
        raise ConfigError(f"{key}: unknown key{close_keys(key, schema_keys(CapjobConfig))}{more}")


# --- Hydra's own errors as one line ------------------------------------------------------------


def hydra_error_line(error: BaseException) -> str:
    """One line for an error Hydra raised while composing the config (unknown group option,
    unknown key, wrong type, unparsable override); Hydra's own text is several lines."""
    from hydra.errors import MissingConfigException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

    if isinstance(error, MissingConfigException):
        missing = (error.missing_cfg_file or "").strip("/")
        group, _, option = missing.rpartition("/")
        if group and error.options:
            return (f"{group}={option}: no such option; options: {', '.join(error.options)}"
                    + close_keys(option, list(error.options)).replace("did you mean ", f"did you mean {group}="))
        return first_line(error)
    from hydra.errors import OverrideParseException

    if isinstance(error, OverrideParseException):
        return f"cannot parse the override {error.override!r}: {first_line(error.message)}"
    cause = error.__cause__ if isinstance(error.__cause__, OmegaConfBaseException) else error
    if isinstance(cause, OmegaConfBaseException):
        key = getattr(cause, "full_key", None) or ""
        if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and key:
            return f"{key}: unknown key{close_keys(key, schema_keys(CapjobConfig))}"
        message = first_line(getattr(cause, "msg", None) or str(cause))
        return f"{key}: {message}" if key and not message.startswith(key) else message
    return first_line(error)


# --- Model ---------------------------------------------------------------------------------------


def _has_chat_template(folder: pathlib.Path) -> bool:
    import json

    if any((folder / name).is_file() for name in CHAT_TEMPLATE_FILES):
        return True
    for name in CHAT_TEMPLATE_CONFIGS:
        try:
            if json.loads((folder / name).read_text()).get("chat_template"):
                return True
        except (OSError, ValueError, AttributeError):
            continue
    return False


def missing_model_files(folder: pathlib.Path, load_format: str = "auto") -> list[str]:
    """What a model folder lacks for captioning, as file names a user can look for."""
    missing = [" or ".join(names) for kind, names in MODEL_FILES.items() if not any((folder / n).is_file() for n in names)]
    if not _has_chat_template(folder):
        missing.append(" or ".join(CHAT_TEMPLATE_FILES) + " (or a chat_template in tokenizer_config.json)")
    if load_format != "dummy":
        sizes = {p.name: p.stat().st_size for p in folder.iterdir() if p.is_file()}
        if not any(is_weights(n) for n in sizes):
            missing.append("weights (*.safetensors)")
        else:
            missing += remote.incomplete_weights(sizes, lambda name, start, end: _read_range(folder / name, start, end))
    return missing


def _read_range(path: pathlib.Path, start: int, end: int) -> bytes:
    with path.open("rb") as f:
        f.seek(start)
        return f.read(end - start)


def _looks_like_path(source: str) -> bool:
    return source.startswith(("/", "./", "../", "~")) or os.path.isabs(source) or source.count("/") > 1


def check_model(source: Optional[str], builder: Optional[str], load_format: str = "auto", key: str = "model.source") -> str:
    """Where the model comes from, checked without loading its weights. Returns a short
    description for the plan; raises ConfigError (one line, starting with `key`) when vLLM could
    not load it: a folder that is missing or lacks config/tokenizer/processor/chat template/
    weights, a hub id that is neither in the local Hugging Face cache nor reachable (no network,
    HF_HUB_OFFLINE, unknown or gated repo). A local folder's (or cached hub model's) processor
    and chat template are then tried as the render will use them (check_model_renders)."""
    if not source:
        return f"built locally ({builder})"
    if remote.is_url(source):
        return check_model_url(source, load_format, key)
    folder = pathlib.Path(source).expanduser()
    if folder.exists() or _looks_like_path(source):
        if not folder.is_dir():
            raise ConfigError(f"{key}: {source} is not a folder (a local model is a folder with config.json, tokenizer and weights)")
        missing = missing_model_files(folder, load_format)
        if missing:
            raise ConfigError(f"{key}: {source} lacks {'; '.join(missing)}{_saved_elsewhere(folder, missing)}")
        return f"local folder {source}"
    return _check_hub_model(source, load_format, key)


def _saved_elsewhere(folder: pathlib.Path, missing: list[str]) -> str:
    """A hint for a trainer's checkpoint folder (weights + config, the processor saved once per
    run): the parent folder holding the files the checkpoint lacks."""
    parent = folder.resolve().parent
    wanted = [names for names in (*MODEL_FILES.values(), CHAT_TEMPLATE_FILES)
              if any(m.startswith(" or ".join(names)) for m in missing)]
    if wanted and parent != folder.resolve() and all(any((parent / n).is_file() for n in names) for names in wanted):
        return f" (they are in {parent}: trainers save the processor once per run; copy them into the checkpoint)"
    return ""


def check_model_renders(folder: pathlib.Path, model: ModelConfig, system_prompt: Optional[str], key: str = "model.source",
                        image: bool = True) -> None:
    """What Ray Data LLM's ChatTemplate stage does with a model folder (ray.llm's
    chat_template_stage.py: transformers' AutoProcessor.from_pretrained, then
    apply_chat_template(tokenize=False)), tried here on a one-image message (image=False: a
    text message, the judge's) with the image processor run on a small image: a missing or
    broken processor, tokenizer or chat template is one ConfigError line naming the folder,
    in seconds, instead of a failed render task minutes into the run."""
    # What it was tried on, by file size and time: a sweep's preflight and its jobs' try each
    # folder once per process.
    tried = (str(folder.resolve()), model.trust_remote_code, system_prompt, image,
             tuple(sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in folder.iterdir()
                          if f.is_file() and not f.name.endswith(WEIGHT_SUFFIXES))))
    if tried in _RENDERED:
        return
    from PIL import Image
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=model.trust_remote_code)
    except Exception as e:  # noqa: BLE001 - transformers raises many types for a broken file
        raise ConfigError(f"{key}: {folder}: the processor/tokenizer does not load: {describe(e, 300)}") from None
    content: list[dict[str, Any]] = [{"type": "text", "text": "Describe this image."}]
    if image:
        content.insert(0, {"type": "image"})
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [{"role": "user", "content": content}]
    try:
        text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # noqa: BLE001 - jinja2 and transformers raise many types
        raise ConfigError(f"{key}: {folder}: the chat template does not render a {'one-image ' if image else ''}message: "
                          f"{describe(e, 300)} (transformers reads it from chat_template.jinja, "
                          "chat_template.json or processor_config.json, not from tokenizer_config.json, for a multimodal processor)") from None
    if "Describe this image." not in text:
        raise ConfigError(f"{key}: {folder}: the chat template drops the user prompt (rendered: {text[:200]!r})")
    if image:
        image_processor = getattr(processor, "image_processor", None)
        if image_processor is None:
            raise ConfigError(f"{key}: {folder}: the processor has no image processor (preprocessor_config.json); "
                              f"transformers loaded a {type(processor).__name__}")
        try:
            image_processor(images=[Image.new("RGB", (64, 64))], return_tensors="np")
        except Exception as e:  # noqa: BLE001
            raise ConfigError(f"{key}: {folder}: the image processor fails on a 64x64 image: "
                              f"{describe(e, 300)} (preprocessor_config.json)") from None
    _RENDERED.add(tried)


_RENDERED: set[tuple[Any, ...]] = set()


def local_model_folder(source: Optional[str]) -> Optional[pathlib.Path]:
    """The folder a model source loads from on this machine: a local folder, or a hub id's
    snapshot in the local Hugging Face cache; None for a URL, a build or a hub id not cached."""
    if not source or remote.is_url(source):
        return None
    folder = pathlib.Path(source).expanduser()
    if folder.is_dir():
        return folder
    try:
        import huggingface_hub

        return pathlib.Path(huggingface_hub.snapshot_download(source, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached, or not a hub id
        return None


def check_models(cfg: CapjobConfig) -> str:
    """Every model the job loads, checked before anything starts: the caption model and, with
    eval=judge, the judge's (check_model, then check_model_renders where the folder is on this
    machine). Returns the caption model's description for the plan; raises ConfigError."""
    described = check_model(cfg.model.source, cfg.model.builder, cfg.model.load_format)
    folder = local_model_folder(cfg.model.source)
    if folder is not None and cfg.model.load_format != "dummy":
        check_model_renders(folder, cfg.model, cfg.caption.system_prompt)
    if cfg.eval.mode == EvalMode.judge:
        judge = cfg.eval.judge.model
        check_model(judge.source, judge.builder, judge.load_format, key="eval.judge.model.source")
        folder = local_model_folder(judge.source)
        if folder is not None:
            check_model_renders(folder, judge, cfg.eval.judge.system_prompt, key="eval.judge.model.source", image=False)
    return described


def check_model_url(url: str, load_format: str = "auto", key: str = "model.source") -> str:
    """A model folder on object storage (s3://... or any fsspec URL), checked by one listing
    with short timeouts: reachable, and holding what missing_model_files asks of a local folder.
    Returns the plan's description; raises ConfigError (one line)."""
    try:
        fs, root = probe_filesystem(url, {})
        entries = remote.listing(url, fs=fs, root=root)
    except FileNotFoundError:
        raise ConfigError(f"{key}: no files under {url} (a model folder holds config.json, tokenizer, processor and weights)") from None
    except CapjobError as e:
        raise ConfigError(f"{key}: {e}") from None
    except Exception as e:  # noqa: BLE001 - s3fs/botocore/aiohttp raise many types
        raise ConfigError(f"{key}: {describe_remote_error(url, e)}") from None
    names = {e["name"] for e in entries if "/" not in e["name"]}
    missing = [" or ".join(n) for n in MODEL_FILES.values() if not names.intersection(n)]
    if not names.intersection(CHAT_TEMPLATE_FILES):
        inline = False
        for name in CHAT_TEMPLATE_CONFIGS:
            if name in names:
                try:
                    import json

                    inline = bool(json.loads(fs.cat_file(f"{root.rstrip('/')}/{name}")).get("chat_template"))
                except Exception:  # noqa: BLE001 - unreadable: reported as missing
                    inline = False
            if inline:
                break
        if not inline:
            missing.append(" or ".join(CHAT_TEMPLATE_FILES) + " (or a chat_template in tokenizer_config.json)")
    if load_format != "dummy":
        if not any(is_weights(n) for n in names):
            missing.append("weights (*.safetensors)")
        else:
            base = root.rstrip("/")
            try:
                missing += remote.incomplete_weights({e["name"]: e["size"] for e in entries},
                                                     lambda name, start, end: fs.cat_file(f"{base}/{name}", start=start, end=end))
            except Exception as e:  # noqa: BLE001 - s3fs/botocore/aiohttp raise many types
                raise ConfigError(f"{key}: {describe_remote_error(url, e)}") from None
    if missing:
        raise ConfigError(f"{key}: {url} lacks {'; '.join(missing)}")
    loader = "Ray Data LLM's loader" if remote.ray_llm_loads(url) else "capjob's fetch"
    return f"{url} ({len(entries)} files, revision {remote.revision(entries)}; {loader} copies it to each node that runs a stage)"


def check_hub_repo(repo_id: str, repo_type: str, key: str) -> None:
    """A hub repository is reachable (one HEAD/GET, HUB_TIMEOUT_S) or raise ConfigError naming why."""
    import huggingface_hub
    from huggingface_hub import constants as hf_constants
    from huggingface_hub.utils import GatedRepoError, RepositoryNotFoundError

    what = "model" if repo_type == "model" else "dataset"
    if hf_constants.HF_HUB_OFFLINE:
        raise ConfigError(f"{key}: {what} {repo_id} is not in the local Hugging Face cache "
                          f"({hf_constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE is set")
    try:
        api = huggingface_hub.HfApi()
        if repo_type == "model":
            api.model_info(repo_id, timeout=HUB_TIMEOUT_S)
        else:
            api.dataset_info(repo_id, timeout=HUB_TIMEOUT_S)
    except GatedRepoError:
        raise ConfigError(f"{key}: {what} {repo_id} is gated: accept its licence on the hub and set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise ConfigError(f"{key}: no {what} {repo_id} on the Hugging Face hub (private? set HF_TOKEN)") from None
    except Exception as e:  # noqa: BLE001 - requests/httpx raise many connection error types
        raise ConfigError(
            f"{key}: the Hugging Face hub is not reachable ({type(e).__name__}) and {what} {repo_id} is not in the "
            f"local cache ({hf_constants.HF_HUB_CACHE}); download it there or set {key} to a local folder"
        ) from None


def _check_hub_model(repo_id: str, load_format: str, key: str = "model.source") -> str:
    import huggingface_hub
    from huggingface_hub.utils import HFValidationError

    try:
        cached = pathlib.Path(huggingface_hub.snapshot_download(repo_id, local_files_only=True))
        if not missing_model_files(cached, load_format):
            return f"hub {repo_id} (in the local cache)"
    except HFValidationError as e:
        raise ConfigError(f"{key}: {repo_id!r} is neither a folder nor a hub id ({first_line(e)})") from None
    except Exception:  # noqa: BLE001 - not cached (LocalEntryNotFoundError and friends)
        pass
    check_hub_repo(repo_id, "model", key)
    return f"hub {repo_id} (reachable)"


def check_hub_dataset(data: Any) -> None:
    """data.format=hf with a hub id: in the local cache (a `datasets--org--name` folder in the hub
    cache, or the datasets cache), or reachable. Local folders are sources.preflight's."""
    if data.format != SourceFormat.hf or not data.path or os.path.exists(data.path) or "://" in data.path or _looks_like_path(data.path):
        return
    from huggingface_hub import constants as hf_constants

    cached_name = "datasets--" + data.path.replace("/", "--")
    datasets_cache = os.environ.get("HF_DATASETS_CACHE") or os.path.join(hf_constants.HF_HOME, "datasets")
    if (pathlib.Path(hf_constants.HF_HUB_CACHE) / cached_name).is_dir() or any(
        pathlib.Path(datasets_cache).glob(data.path.replace("/", "___") + "*")
    ):
        return
    check_hub_repo(data.path, "dataset", "data.path")


# --- Data and sink ---------------------------------------------------------------------------------


def source_rows(data: Any) -> Optional[int]:
    """The number of rows the source holds, where the files say it without reading images
    (sample set, parquet footers, image files); None where only a full read could tell."""
    rows: Optional[int] = None
    try:
        if data.format == SourceFormat.sample:
            from capjob.stages.sources.sample import sample_rows  # the sources package imports Ray Data

            rows = sample_rows(data.sample_size, data.sample_shapes)
        elif data.format == SourceFormat.parquet:
            import pyarrow.dataset as pads
            import fsspec

            fs, root = fsspec.url_to_fs(data.path, **data.storage_options)
            rows = pads.dataset(root, filesystem=fs, format="parquet").count_rows()
    except Exception:  # noqa: BLE001 - a count is a hint; the real read reports real errors
        rows = None
    if data.limit is not None:
        rows = min(rows, data.limit) if rows is not None else None
    return rows


# --- Caption prompts -------------------------------------------------------------------------------


def data_with_prompt_columns(data: DataConfig, caption: CaptionConfig) -> DataConfig:
    """`data` with the other input columns the job reads added to the pass-through ones: those
    the caption prompts name, and data.verify_hash_column (each image is checked against it in
    the image stage; the digest stays in the output, as img2dataset keeps its hash column)."""
    wanted = [*prompt_columns(caption), *([data.verify_hash_column] if data.verify_hash_column else [])]
    extra = [c for c in dict.fromkeys(wanted) if c not in data.passthrough_columns]
    return dataclasses.replace(data, passthrough_columns=[*data.passthrough_columns, *extra]) if extra else data


def check_prompt_columns(data: DataConfig, caption: CaptionConfig) -> None:
    """The columns a caption prompt names ({label}) exist in the dataset: checked like the
    pass-through columns (after those, so that an error here is the prompt's), reported as the
    prompt's key. Raises ConfigError."""
    from capjob.stages import sources  # Ray Data: imported after the model check (module docstring)

    with_prompts = data_with_prompt_columns(data, caption)
    if with_prompts is data:
        return
    try:
        sources.preflight(with_prompts)
    except SourceError as e:
        hashes = data.verify_hash_column
        if hashes and hashes not in data.passthrough_columns and repr(hashes) in str(e):
            raise SourceError(f"data.verify_hash_column: {str(e).split(': ', 1)[-1]}") from None
        for spec in prompt_specs(caption):
            missing = next((f for f in spec.fields if repr(f) in str(e) and f not in data.passthrough_columns), None)
            if missing:
                raise ConfigError(f"{spec.key}: names column {{{missing}}}, which the dataset does not have ({e})") from None
        raise


# --- The sequence ----------------------------------------------------------------------------------


def local_placement(resources: ResourcesConfig, engine: EngineConfig) -> Optional[EnginePlacement]:
    """Where each engine replica runs on a local Ray (this machine's GPUs, or CPU), checked:
    ConfigError when the layout needs GPUs this machine lacks. None when the job joins a
    cluster (resources.address or RAY_ADDRESS): its GPUs decide once Ray is up."""
    if resources.address or os.environ.get("RAY_ADDRESS"):
        return None
    gpus = local_gpu_count()
    return decide_placement(resources, engine, gpus, node_gpus=gpus)


def fingerprint_model_source(model: ModelConfig) -> tuple[str, bool]:
    """(the model folder the resume fingerprint reads, whether it exists yet): model.source, or
    the folder a model.builder model is (or will be) built into."""
    if model.source:
        return model.source, True
    folder = models.build_dir(model.builder)
    return str(folder), models.is_complete(folder)


@dataclasses.dataclass
class Checked:
    """What check_all found. placement: None when the job joins a cluster. done: the ids the
    sink holds that the run skips (None: not read, the run reads them itself). rows: the
    source's rows where its files tell without reading images, after data.limit."""

    model: str
    placement: Optional[EnginePlacement]
    done: Optional[int]
    rows: Optional[int]

    def render(self, resume: Any) -> str:
        rows = "unknown until read" if self.rows is None else str(self.rows)
        done = self.done or 0
        if resume is False:
            return f"  sink        {done} id(s) already there; job.resume=false: all {rows} rows are captioned again"
        if self.rows is None:
            left = "unknown until read"
        elif not done:
            left = str(self.rows)
        else:
            # Which of the source's rows the sink holds is known only once their ids (a digest of
            # the image bytes) are read: the sink may hold ids of other inputs.
            left = f"{max(0, self.rows - done)} to {self.rows} (which rows the sink holds is known once they are read)"
        return f"  resume      {done} id(s) already in the sink; source rows: {rows}; left to caption: {left}"


def check_all(cfg: CapjobConfig, *, read_done: bool = True) -> Checked:
    """Every check that can stop a run before Ray starts, in the run's order: model, placement,
    sink, data, prompt columns, hub dataset, resume. Reads and writes nothing but probes (the
    sink's write probe is deleted again). read_done: count the ids the sink holds (the run
    reads them itself, once its model is built). Raises CapjobError (one line)."""
    model = check_models(cfg)
    # Ray Data, pyarrow and fsspec: imported after the model check (module docstring).
    from capjob.stages import resume, sources
    from capjob.stages.tables import TableWriter

    placement = local_placement(cfg.resources, cfg.engine)
    writer = TableWriter(cfg.sink)  # the one the sink's checks share
    writer.check_writable()
    sources.preflight(cfg.data)  # path, bucket, credentials, columns: seconds, without Ray
    check_prompt_columns(cfg.data, cfg.caption)
    check_hub_dataset(cfg.data)
    source, built = fingerprint_model_source(cfg.model)
    # A model not built yet has no revision to compare; its build version is in the settings.
    resume.check_resume(writer, cfg.job.resume, resume.caption_settings(cfg, source),
                        ignore=() if built else ("model.revision",))
    done = None
    if read_done:
        done = len(resume.read_done_ids(writer, list(cfg.job.retry_quarantined))) if cfg.job.resume is not False else 0
    return Checked(model=model, placement=placement, done=done, rows=source_rows(cfg.data))


def dry_run(cfg: CapjobConfig) -> Checked:
    """job.dry_run=true: check_all, then print the plan and what the sink holds; no Ray, no
    engine, nothing written. Raises what check_all raises: the line the run would stop with."""
    checked = check_all(cfg)
    plan = dry_run_plan(cfg, cfg.job.run_id or new_run_id(), checked.placement, checked.rows)
    left = checked.render(cfg.job.resume)
    console.brief(plan.render(cfg) + "\n" + left, f"dry run: {plan.headline(cfg)} · {left.strip().splitlines()[-1].strip()}")
    return checked
