"""Stage: the caption requests (Ray Data LLM's preprocess): one prepared image row -> the
request(s) the engine answers, and the prompt they share.

By default (engine.chat_template_stages=false) every request is the prompt rendered once per run
(render.py) with the row's user prompt in its slot, plus the image; with
engine.chat_template_stages the request is the chat messages, which Ray Data LLM's
PrepareMultimodal and ChatTemplate stages turn into a prompt per row. A multi-prompt run first
expands each image row into one request row per prompt (expand_prompts).

Imports no Ray and no vLLM at module load: Ray Data ships CaptionRequest to its tasks.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
from PIL import Image

from capjob.config import CaptionConfig, EngineConfig
from capjob.errors import ConfigError
from capjob.prompts import format_prompt, prompt_specs
from capjob.schema import GROUP_COLUMN, IMAGE_DIGEST_COLUMN, PROMPT_COLUMN, THUMBNAIL_COLUMN
from capjob.stages.caption.engine import engine_detokenize
from capjob.stages.ids import image_uuid
from capjob.stages.samples import is_thumbnail_row, thumbnail_jpeg

# Where the user prompt goes in the prompt rendered once (engine.chat_template_stages=false).
USER_PROMPT_SLOT = "\u0000capjob-user-prompt\u0000"


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


@dataclass(frozen=True)
class PendingPrompt:
    """submit_caption_prompt's render task in flight (`ref`, its ObjectRef) and where its
    result is to be kept (prompt_cache_path; None: not kept)."""

    ref: Any
    keep_at: Optional[Any]


def check_rendered(rendered: RenderedPrompt, chat_template_stages: bool) -> RenderedPrompt:
    """`rendered` if the requests can use it: with engine.chat_template_stages=false the chat
    template must copy the user text verbatim (exactly one USER_PROMPT_SLOT in its output),
    else a ConfigError pointing at that switch."""
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


def expand_prompts(batch: dict[str, np.ndarray], *, names: list[str]) -> dict[str, np.ndarray]:
    """map_batches UDF of a multi-prompt run: each image row becomes one request row per prompt
    (same pixels, same id), tagged with the prompt's name and the image row's group token."""
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

    def __init__(self, caption: CaptionConfig, engine: EngineConfig, prompt: "RenderedPrompt | PendingPrompt | None" = None,
                 thumbnail_every: int = 0):
        c = caption
        self.chat_template_stages = engine.chat_template_stages
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
            **engine_detokenize(engine),
        }
        self.sampling_params = {name: {**base, "max_tokens": spec.max_tokens,
                                       **({"structured_outputs": {"json": spec.json_schema}} if spec.json_schema else {})}
                                for name, spec in self.specs.items()}

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        name = row.get(PROMPT_COLUMN, self.first)
        spec = self.specs[name]
        text = format_prompt(spec, row)
        pixels = np.ascontiguousarray(row["image"], dtype=np.uint8)
        image = Image.fromarray(pixels, "RGB")
        # vLLM's multimodal cache key: the pixels it gets, never the row's key; the requests of
        # one image (one per prompt) share it. The dedup stage hashed them already.
        uuid = image_uuid(pixels, row.get(IMAGE_DIGEST_COLUMN))
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
        """The chat messages of one request: the system prompt, then the image and the text (the
        text first with caption.text_before_image). `uuid`: vLLM's multimodal cache key
        (stages/ids.image_uuid: a digest of the pixels)."""
        parts = [{"type": "image_pil", "image_pil": image, "uuid": uuid}, {"type": "text", "text": text}]
        if self.text_before_image:
            parts.reverse()
        return [{"role": "system", "content": self.system_prompt}, {"role": "user", "content": parts}]
