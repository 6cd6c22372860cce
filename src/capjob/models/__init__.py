"""Where the captioning model comes from: a hub id / local path, or a model capjob builds itself.

``tiny_qwen25vl`` is a small Qwen2.5-VL (the real ``Qwen2_5_VLForConditionalGeneration``
architecture, a few layers wide) written in the layout of a hub model directory: config,
safetensors weights, a locally trained byte-level BPE tokenizer carrying Qwen's special tokens,
Qwen2.5-VL's chat template and image processor config. vLLM and transformers load it through
exactly the code paths they use for ``Qwen/Qwen2.5-VL-3B-Instruct``, so the whole pipeline runs
offline on a CPU. It is trained (models/train.py, a few minutes on 2 idle cores) to caption the
synthetic shape scenes of models/shapes.py ("a red circle and a blue square on a white
background"), so tests can check each caption against its own image; on any other image it
still answers with a shape caption. The trained weights ship in the package
(models/shipped.py): a build writes the files and those weights in seconds.

``qwen25vl_3b_dummy`` is Qwen/Qwen2.5-VL-3B-Instruct's true architecture (its config.json
dimensions) with the same local tokenizer/processor files and no weights: vLLM loads it with
``load_format=dummy`` (random weights on the GPU), so GPU throughput is measured on the real
model's compute without the hub.
"""

from __future__ import annotations

import fcntl
import json
import os
import pathlib
import shutil
import tempfile
from typing import TYPE_CHECKING, Callable, Optional

from capjob.cache import cache_dir as default_cache_dir
from capjob.models import shipped, train
from capjob.models.corpus import SEED, TOKENIZER_CORPUS

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from transformers import Qwen2_5_VLConfig

TINY_QWEN25VL = "tiny_qwen25vl"
QWEN25VL_3B_DUMMY = "qwen25vl_3b_dummy"
# Bump when the built files change, so caches never serve a stale layout.
# v5: v4's recipe (models/train.py), its trained weights shipped (models/shipped.py).
TINY_QWEN25VL_VERSION = "v5"
BUILD_VERSIONS = {TINY_QWEN25VL: TINY_QWEN25VL_VERSION, QWEN25VL_3B_DUMMY: "v3"}
# Written last into a build: a directory without it was never finished.
COMPLETE_MARKER = ".capjob-build-complete.json"

# Qwen2.5-VL's special tokens in the order (and so with the relative ids) of the real tokenizer.
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
BPE_VOCAB_SIZE = 1024  # byte alphabet + merges, before the special tokens
# Qwen's own pre-tokenizer split (transformers' Qwen2Tokenizer rebuilds exactly this pipeline).
QWEN_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# The chat template of Qwen/Qwen2.5-VL-*-Instruct (tokenizer_config.json and chat_template.json).
QWEN25VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Pixel budget per image: 4..256 merged tokens. 448 = 16 x 28, so every image capjob's default
# resize (longest side 448) produces fits without a second downscale, and vLLM's profiling run
# and max_model_len stay small on CPU.
PATCH_SIZE, MERGE_SIZE, TEMPORAL_PATCH_SIZE = 14, 2, 2
MIN_PIXELS = 4 * (PATCH_SIZE * MERGE_SIZE) ** 2
MAX_PIXELS = 256 * (PATCH_SIZE * MERGE_SIZE) ** 2



def resolve_model_source(source: str | None, builder: str | None, cache_dir: str | None = None,
                         say: Optional[Callable[[str], None]] = None) -> str:
    """The model folder or hub id vLLM loads: `source`, else `builder`'s build in the capjob
    cache (built now if missing). say: where a line about a build or a wait goes (the console)."""
    if source:
        return source
    if builder in BUILD_VERSIONS:
        return str(build_model(builder, build_dir(builder, cache_dir), say=say))
    raise ValueError(f"no model source: model.source is unset and model.builder={builder!r} is not one of: {', '.join(BUILD_VERSIONS)}")


def build_dir(builder: str, cache_dir: str | None = None) -> pathlib.Path:
    """The folder `builder`'s model is built into (and reused from): <capjob cache>/models/<builder>-<version>."""
    root = pathlib.Path(cache_dir) if cache_dir else default_cache_dir()
    return root / "models" / f"{builder}-{BUILD_VERSIONS[builder]}"


def is_complete(model_dir: str | os.PathLike) -> bool:
    return (pathlib.Path(model_dir) / COMPLETE_MARKER).is_file()


def build_tiny_qwen25vl(target_dir: str | os.PathLike, train_steps: Optional[int] = None) -> pathlib.Path:
    """build_model of tiny_qwen25vl: the shipped weights, or `train_steps` of training."""
    return build_model(TINY_QWEN25VL, target_dir, train_steps=train_steps)


def build_model(builder: str, target_dir: str | os.PathLike, *, train_steps: Optional[int] = None,
                say: Optional[Callable[[str], None]] = None) -> pathlib.Path:
    """Build `builder`'s model into `target_dir` (once; a complete build there is reused).

    `train_steps` (tiny_qwen25vl only) trains the model for that many steps (earlier or later
    checkpoints of the same model) instead of writing the shipped weights (models/shipped.py).
    The files are written into a temporary sibling directory that is renamed into place at the
    end, so `target_dir` is either absent (or empty) or complete. Builds of one target are
    serialised by a lock file beside it; a process that waited reuses the winner's build and
    says so first through `say`. A build killed at any point leaves at most its staging
    directory (``.<name>.building-*``), which the next build removes: only the lock's holder
    writes one, so under the lock any that exist are stale.
    """
    target = pathlib.Path(target_dir)
    if is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if say:
                say(f"waiting for another process building the {builder} model in {target} ...")
            fcntl.flock(lock, fcntl.LOCK_EX)
        if is_complete(target):
            return target
        for stale in target.parent.glob(f".{target.name}.building-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if say:
            say(f"building the {builder} model in {target} ...")
        return _build_locked(builder, target, train_steps)


def _build_locked(builder: str, target: pathlib.Path, train_steps: Optional[int]) -> pathlib.Path:
    staging = pathlib.Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.building-"))
    try:
        if builder == TINY_QWEN25VL:
            _write_tiny_qwen25vl(staging, train_steps)
        elif builder == QWEN25VL_3B_DUMMY:
            _write_qwen25vl_3b_dummy(staging)
        else:
            raise ValueError(f"unknown model builder {builder!r}; one of: {', '.join(BUILD_VERSIONS)}")
        # rename(2) replaces a missing or empty target atomically and fails on a non-empty one.
        staging.rename(target)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if is_complete(target):  # another process published first
            return target
        if target.is_dir() and any(target.iterdir()):
            raise FileExistsError(f"{target} holds files but no finished {builder} build; remove it or pick another directory") from None
        raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def write_tiny_qwen25vl_files(out: pathlib.Path) -> None:
    """The untrained tiny model in `out`: tokenizer, chat template, processor and generation
    configs, config.json and the initial weights (what models.train trains)."""
    tokenizer, special_ids = _write_processor_files(out, _preprocessor_config())
    # save_pretrained writes config.json with the weights.
    _write_model(_model_config(special_ids, tokenizer.get_vocab_size()), out)
    _write_generation_config(out, special_ids)


def _write_tiny_qwen25vl(out: pathlib.Path, train_steps: Optional[int] = None) -> None:
    write_tiny_qwen25vl_files(out)
    if train_steps is None and shipped.shipped_record(TINY_QWEN25VL) is not None:
        # The package's trained weights (models/shipped.py): seconds instead of a training.
        record = {"weights": "shipped", **shipped.install_weights(TINY_QWEN25VL, out)}
    else:
        record = {"weights": "trained", **train.train(out, train.TRAIN_STEPS if train_steps is None else train_steps)}
    _write_json(out / COMPLETE_MARKER, {"builder": TINY_QWEN25VL, "version": TINY_QWEN25VL_VERSION, **record})


def _write_qwen25vl_3b_dummy(out: pathlib.Path) -> None:
    # Qwen2.5-VL-3B-Instruct's image processor keeps its own pixel budget (3136 .. 12845056).
    _, special_ids = _write_processor_files(out, {**_preprocessor_config(), "min_pixels": 3136, "max_pixels": 12845056})
    config = _qwen25vl_3b_config(special_ids)
    # A config without weights names no architecture; vLLM would then run it as a pooling model.
    config.architectures = ["Qwen2_5_VLForConditionalGeneration"]
    config.save_pretrained(out)
    _write_generation_config(out, special_ids)
    _write_json(out / COMPLETE_MARKER, {"builder": QWEN25VL_3B_DUMMY, "version": BUILD_VERSIONS[QWEN25VL_3B_DUMMY]})


def _write_processor_files(out: pathlib.Path, preprocessor: dict[str, object]) -> tuple[Tokenizer, dict[str, int]]:
    """Tokenizer, chat template and image processor files; returns the tokenizer and its special ids."""
    tokenizer = _train_tokenizer()
    special_ids = {tok: tokenizer.token_to_id(tok) for tok in SPECIAL_TOKENS}
    tokenizer.save(str(out / "tokenizer.json"))
    _write_json(out / "tokenizer_config.json", _tokenizer_config(special_ids))
    _write_json(out / "chat_template.json", {"chat_template": QWEN25VL_CHAT_TEMPLATE})
    _write_json(out / "preprocessor_config.json", preprocessor)
    return tokenizer, special_ids


def _write_generation_config(out: pathlib.Path, special_ids: dict[str, int]) -> None:
    _write_json(
        out / "generation_config.json",
        {
            "bos_token_id": special_ids["<|endoftext|>"],
            "eos_token_id": [special_ids["<|im_end|>"], special_ids["<|endoftext|>"]],
            "pad_token_id": special_ids["<|endoftext|>"],
        },
    )


def _write_json(path: pathlib.Path, obj: dict[str, object]) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _train_tokenizer() -> Tokenizer:
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    # The pipeline transformers' Qwen2Tokenizer rebuilds from vocab + merges: what we train is
    # what it loads.
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(TOKENIZER_CORPUS.splitlines(keepends=True), trainer=trainer)
    # Added after training, as in Qwen's vocabulary: the special tokens follow the BPE tokens.
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tokenizer


def _tokenizer_config(special_ids: dict[str, int]) -> dict[str, object]:
    """tokenizer_config.json as Qwen2.5-VL-Instruct ships it, with this tokenizer's ids."""
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
            for t, i in special_ids.items()
        },
        "additional_special_tokens": [t for t in SPECIAL_TOKENS if t not in ("<|endoftext|>", "<|im_end|>")],
        "bos_token": None,
        "chat_template": QWEN25VL_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 32768,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def _preprocessor_config() -> dict[str, object]:
    return {
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_processor_type": "Qwen2VLImageProcessor",
        "max_pixels": MAX_PIXELS,
        "merge_size": MERGE_SIZE,
        "min_pixels": MIN_PIXELS,
        "patch_size": PATCH_SIZE,
        "processor_class": "Qwen2_5_VLProcessor",
        "resample": 3,
        "rescale_factor": 1 / 255,
        "temporal_patch_size": TEMPORAL_PATCH_SIZE,
    }


def _model_config(special_ids: dict[str, int], tokenizer_size: int) -> Qwen2_5_VLConfig:
    hidden = 128
    text_config = {
        # Rounded up like Qwen's (151936 rows for 151665 tokens); the spare rows are never produced.
        "vocab_size": -(-tokenizer_size // 64) * 64,
        "hidden_size": hidden,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        # head_dim 64: vLLM's CPU attention rejects small head sizes such as 16.
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "max_position_embeddings": 32768,
        # M-RoPE sections (temporal, height, width) must sum to head_dim / 2.
        "rope_scaling": {"type": "mrope", "mrope_section": [8, 12, 12], "rope_theta": 1000000.0},
    }
    vision_config = {
        "depth": 2,
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_heads": 2,
        # Block 0 uses windowed attention, block 1 full attention: both code paths run.
        "fullatt_block_indexes": [1],
        "out_hidden_size": hidden,
    }
    return _qwen25vl_config(text_config, vision_config, special_ids, tie_word_embeddings=False, dtype="float32")


def _qwen25vl_3b_config(special_ids: dict[str, int]) -> Qwen2_5_VLConfig:
    """Qwen/Qwen2.5-VL-3B-Instruct's config.json dimensions; token ids are the local tokenizer's
    (its vocabulary is smaller, so every id it produces is a valid row of the 151936)."""
    text_config = {
        "vocab_size": 151936,
        "hidden_size": 2048,
        "intermediate_size": 11008,
        "num_hidden_layers": 36,
        "num_attention_heads": 16,
        "num_key_value_heads": 2,
        "max_position_embeddings": 128000,
        "sliding_window": 32768,
        "max_window_layers": 70,
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24], "rope_theta": 1000000.0},
    }
    vision_config = {
        "depth": 32,
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "num_heads": 16,
        "fullatt_block_indexes": [7, 15, 23, 31],
        "out_hidden_size": 2048,
    }
    return _qwen25vl_config(text_config, vision_config, special_ids, tie_word_embeddings=True, dtype="bfloat16")


def _qwen25vl_config(text_config: dict, vision_config: dict, special_ids: dict[str, int], *, tie_word_embeddings: bool,
                     dtype: str) -> Qwen2_5_VLConfig:
    """The shared parts of both builds: Qwen's token roles and vision settings, the local ids."""
    from transformers import Qwen2_5_VLConfig

    text_config = {
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "use_sliding_window": False,
        "bos_token_id": special_ids["<|endoftext|>"],
        "eos_token_id": special_ids["<|im_end|>"],
        "pad_token_id": special_ids["<|endoftext|>"],
        **text_config,
    }
    vision_config = {
        "hidden_act": "silu",
        "in_channels": 3,
        "patch_size": PATCH_SIZE,
        "spatial_merge_size": MERGE_SIZE,
        "temporal_patch_size": TEMPORAL_PATCH_SIZE,
        "tokens_per_second": 2,
        "window_size": 112,
        **vision_config,
    }
    return Qwen2_5_VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=special_ids["<|image_pad|>"],
        video_token_id=special_ids["<|video_pad|>"],
        vision_start_token_id=special_ids["<|vision_start|>"],
        vision_end_token_id=special_ids["<|vision_end|>"],
        vision_token_id=special_ids["<|vision_pad|>"],
        tie_word_embeddings=tie_word_embeddings,
        dtype=dtype,
    )


def _write_model(config: Qwen2_5_VLConfig, out: pathlib.Path) -> None:
    """The untrained starting point: transformers' own initialisation under a fixed seed."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = Qwen2_5_VLForConditionalGeneration(config).eval()
    model.save_pretrained(out, safe_serialization=True)
