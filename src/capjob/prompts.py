"""The caption.prompts language: which requests each image gets, and the columns they name.

`caption.user_prompt` (one request, column `caption`) or `caption.prompts` ({name: prompt or
{prompt, max_tokens, json_schema}}: one request per entry, column `caption_<name>`). A prompt
is a str.format template whose fields name input columns ("Alt text: {txt}"); a json_schema
is a JSON Schema mapping (or its JSON text) checked against the metaschema (jsonschema). Below
config (which validates with it) and above schema and errors only: no Ray, no vLLM.
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass
from typing import Any, Optional

import jsonschema
from omegaconf import DictConfig, ListConfig, OmegaConf

from capjob.errors import ConfigError
from capjob.schema import CAPTION_COLUMN


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
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{key}: not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: must be a JSON schema object, got {type(value).__name__}")
    try:
        jsonschema.validators.validator_for(value).check_schema(value)
    except jsonschema.SchemaError as e:
        raise ConfigError(f"{key}: not a valid JSON schema: {e.message}") from None
    return value


PROMPT_KEYS = ("prompt", "max_tokens", "json_schema")


def prompt_specs(c: Any) -> list[PromptSpec]:
    """The requests each image gets (caption.prompts in order, else caption.user_prompt alone).
    c: CaptionConfig (OmegaConf containers are accepted). Raises ConfigError naming the key."""
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
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value


def validate_prompts(c: Any) -> None:
    """Raise ConfigError (naming the key) for the first prompt entry that is not valid."""
    prompt_specs(c)


def prompt_columns(c: Any) -> list[str]:
    """Input columns named by any prompt, in order of first use."""
    out: list[str] = []
    for spec in prompt_specs(c):
        out += [f for f in spec.fields if f not in out]
    return out


def caption_columns(c: Any) -> list[str]:
    """The output's caption columns: `caption`, or `caption_<name>` per entry of caption.prompts."""
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
