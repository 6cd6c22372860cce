"""The caption job's config groups (data, model, engine, resources, sink, caption, images, job):
one dataclass a Hydra group, and the range checks shared by more than one group (``require``,
``validate_engine``, ``parse_shard``). capjob/config/__init__.py composes them into ``CapjobConfig``.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from capjob.errors import ConfigError


class SourceFormat(str, enum.Enum):
    sample = "sample"  # capjob's own offline sample set (written on first use)
    hf = "hf"  # Hugging Face datasets: hub id, local dataset dir or save_to_disk dir
    parquet = "parquet"  # parquet files or folders, local or fsspec URL
    image_folder = "image_folder"  # jpg/png/webp... files, recursive
    webdataset = "webdataset"  # tar shards
    # JSON array or JSON Lines files of records (LLaVA, ShareGPT, LLaMA-Factory instruction
    # sets) whose image paths are relative to data.image_root
    json = "json"


class SinkFormat(str, enum.Enum):
    parquet = "parquet"
    jsonl = "jsonl"
    txt = "txt"  # one <image stem>.txt per image (sinks.py), plus a parquet manifest for resume


class ResizeMode(str, enum.Enum):
    fit = "fit"  # longest side to `size`, aspect kept (never upscales)
    square = "square"  # exactly size x size, as the seed notebook does


@dataclass
class FetchConfig:
    """`data.fetch`: how the image stage fetches cells that point elsewhere (URLs, object-store
    paths, HF `{bytes: null, path}` structs), consumed by stages/sources/cells.py."""

    # Fetches in flight per task: a URL list is latency-bound, and one slow host holds one thread.
    concurrency: int = 16
    connect_timeout_s: float = 5.0
    # Most seconds to wait for data, and to receive a whole body.
    read_timeout_s: float = 30.0
    # Extra attempts for transient failures only (429, 5xx, timeouts, resets); 403/404 are final.
    retries: int = 3
    # First wait before a retry; doubles each attempt (with jitter), at most 8 s.
    backoff_s: float = 0.5
    max_redirects: int = 5
    # A body larger than this is not an image to caption (an HTML error page is small).
    max_bytes: int = 64 * 2**20
    user_agent: str = "capjob/0.1 (batch image captioning; python-requests)"
    # A server's X-Robots-Tag header naming one of robots_directives (for every robot, or for
    # the user agent's product token, "capjob") skips the row, counted as `robots: <directive>`.
    # img2dataset's rule and default directives (its disallowed_header_directives).
    respect_robots: bool = True
    robots_directives: list[str] = field(default_factory=lambda: ["noai", "noimageai", "noindex", "noimageindex"])


@dataclass
class DataConfig:
    """`dataset` group (values under `data`): where images come from, consumed by stages/sources/."""

    name: str = "sample"
    format: SourceFormat = SourceFormat.sample
    path: Optional[str] = None
    split: str = "train"
    streaming: bool = False
    image_column: str = "image"
    # None: the id is a content hash of the image bytes (or the path where there is one).
    key_column: Optional[str] = None
    passthrough_columns: list[str] = field(default_factory=list)
    limit: Optional[int] = None
    # None: automatic, `partitions_per_worker` x the number of inference workers.
    partitions: Optional[int] = None
    partitions_per_worker: int = 4
    shuffle_seed: Optional[int] = None
    # "k/n": only this run's part of the source (one of n runs into one sink), stages/ids.py; null: all.
    shard: Optional[str] = None
    # fsspec options for remote paths (e.g. {client_kwargs: {endpoint_url: ...}}); never secrets.
    storage_options: dict[str, Any] = field(default_factory=dict)
    # Only for format=sample: how many images to generate besides the bundled photos.
    sample_size: int = 24
    # dataset=sample: shape scenes with their true caption in `reference` (models/shapes.py).
    sample_shapes: int = 24

    # A column holding a list of images: caption the N-th (0-based; a row with fewer is
    # quarantined) ...
    image_index: Optional[int] = None
    # ... or each one, one row per image, keyed `<key>#<i>`.
    explode_images: bool = False
    # format=json: the folder (local or fsspec URL) relative image paths are joined to; null: the
    # folder of the JSON file that holds the record.
    image_root: Optional[str] = None
    # A column of SHA-256 hex digests (img2dataset's `sha256`/`sha256hash`): each image's bytes
    # are checked against it, a mismatch is quarantined `hash_mismatch`; a null cell is not checked.
    verify_hash_column: Optional[str] = None
    fetch: FetchConfig = field(default_factory=FetchConfig)


@dataclass
class ModelConfig:
    """`model` group: which VLM captions, consumed by models/ and stages/caption/engine.py."""

    name: str = "tiny_qwen25vl"
    # Hub id or local path. None with `builder` set: capjob builds the model into its cache.
    source: Optional[str] = None
    builder: Optional[str] = None
    trust_remote_code: bool = False
    dtype: str = "auto"
    # "dummy" benchmarks a real architecture without downloading its weights.
    load_format: str = "auto"


# vLLM's ChatTemplateContentFormatOption (vllm/renderers/hf.py); Ray Data LLM's
# PrepareMultimodal stage takes the last two.
CHAT_TEMPLATE_CONTENT_FORMATS = ("auto", "string", "openai")


@dataclass
class EngineConfig:
    """`engine` group: the vLLM engine and the Ray Data LLM processor, consumed by
    stages/caption/ (engine.py: engine args and the processor config)."""

    name: str = "vllm"
    batch_size: int = 16
    max_concurrent_batches: int = 8
    max_model_len: int = 8192
    max_num_seqs: Optional[int] = None
    max_num_batched_tokens: Optional[int] = None
    gpu_memory_utilization: float = 0.9
    # On CPU vLLM reads gpu_memory_utilization as a share of host RAM; a fixed KV cache is
    # what a CPU engine (tests, laptops) wants instead.
    cpu_kv_cache_gib: float = 1.0
    # KV cache per GPU replica; null = what vLLM's start-up memory profile leaves under
    # gpu_memory_utilization. Engines sharing a GPU (resources.replicas_per_gpu > 1) need it:
    # each would count the other's allocations as its own while profiling.
    kv_cache_gib: Optional[float] = None
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    quantization: Optional[str] = None
    # False compiles the model (torch.compile, CUDA graphs) at start-up: faster steady state,
    # tens of seconds more start-up. The offline preset turns it on for short CPU runs; a CPU
    # engine then also runs vLLM's sampler eagerly (TORCH_COMPILE_DISABLE=1: engine.engine_env).
    enforce_eager: bool = False
    # Ray Data LLM's PrepareMultimodal and ChatTemplate actors, which parse every row's chat
    # messages and apply the chat template. A caption request is the same system + user prompt
    # with a different image, so by default (false) capjob renders the prompt once, through the
    # same two stages in a one-off task, and sends prompt + image straight to the engine: two
    # actors (each importing vLLM / transformers: docs/benchmarks.md) and two operators fewer.
    chat_template_stages: bool = False
    # How a chat message's parts (image, text) reach the chat template, as vLLM's
    # --chat-template-content-format: "string" flattens them into one string (Ray Data LLM's
    # default: the image placeholder, a newline, the text), "openai" hands the template the list
    # of parts. "auto" = what vLLM's LLM.chat and OpenAI server pick for the model (they read the
    # template: one that loops over the parts gets "openai"). Qwen2.5-VL's template does, and
    # was trained without that newline: the tiny model wrote 8 of 100 captions wrong with it,
    # 1 of 100 without (docs/benchmarks.md, "Tiny trained model").
    chat_template_content_format: str = "auto"
    # Tokenize in a Ray Data actor before the engine (false: vLLM tokenizes inside the engine).
    tokenize_stage: bool = True
    # Detokenize in a Ray Data actor after the engine instead of in the engine's front-end.
    # false: vLLM's front-end decodes every generated token as it comes (its incremental
    # detokenizer: a share of that thread measured in docs/benchmarks.md, issue 22). true:
    # the requests ask vLLM for token ids only (SamplingParams.detokenize=false) and Ray Data
    # LLM's Detokenize stage decodes each caption once, in its own actors.
    detokenize_stage: bool = False
    # Ray Data LLM's log_engine_metrics: export vLLM's engine metrics (running requests, KV cache
    # use, prefix-cache hits, token histograms) to Ray's Prometheus endpoint. Every engine step
    # records them through Ray's metrics API in the engine's front-end thread: 9-12 % of that
    # thread on an H200 (docs/benchmarks.md, issue 22). false keeps vLLM's own stat
    # lines in the log and its in-process Prometheus registry, not Ray's endpoint.
    log_engine_metrics: bool = True
    # Images per prompt the engine reserves memory for; captioning sends one.
    limit_images_per_prompt: int = 1
    # vLLM caches processed images by content hash (4 GiB by default, in the engine process);
    # a captioning job sees each image once, so the cache only grows memory (measured: the
    # engine core's memory grew with the images seen: docs/benchmarks.md). 0 turns it off.
    mm_processor_cache_gb: float = 0.0
    # A row in flight at this many engine deaths (the vLLM engine process died, e.g. a crash in
    # a kernel on one input) makes its batch's next attempt run alone in the engine and row by
    # row: the next death names the row, which is then quarantined (stage engine_crash) while
    # the rest is captioned. A poison row costs K + 1 engine restarts (stages/caption/engine_guard.py).
    max_engine_deaths_per_batch: int = 2
    # Run each replica's vLLM engine core inside its Ray actor's process (vLLM's LLMEngine, as
    # vllm.LLM does) instead of the second process AsyncLLM spawns, which imports vLLM again:
    # one import per replica, seconds less start-up on a CPU (stages/caption/inproc.py). For CPU
    # engines and short runs; a GPU engine keeps the separate process, whose scheduling overlaps
    # the GPU's work. The judge's engine (eval=judge) is not affected.
    in_process_engine_core: bool = False
    # Anything else vLLM's EngineArgs accepts, passed through untouched.
    extra_engine_kwargs: dict[str, Any] = field(default_factory=dict)
    # Environment of the processor's actors (engine included), e.g. VLLM_* switches.
    env_vars: dict[str, str] = field(default_factory=dict)


@dataclass
class ResourcesConfig:
    """`resources` group: cluster layout, consumed by runtime.py and stages/caption/engine.py."""

    name: str = "local"
    # Ray cluster to join; None starts a local one (or uses RAY_ADDRESS when set).
    address: Optional[str] = None
    # Ray's accelerator_type label (e.g. "L4", "H100"); None schedules on any GPU.
    accelerator_type: Optional[str] = None
    # GPUs each engine replica uses: null = TP x PP when the cluster has GPUs, else 0;
    # 0 runs vLLM on CPU; any other value must equal TP x PP.
    gpus_per_worker: Optional[int] = None
    # Number of engine replicas (vLLM instances).
    concurrency: int = 1
    # Engine replicas sharing one GPU (TP = PP = 1): each gets 1/N of the GPU and of
    # engine.gpu_memory_utilization. A small model leaves the GPU idle between one engine's
    # steps (scheduling, input processing); a second engine fills those gaps.
    replicas_per_gpu: int = 1
    # Logical CPUs for a local Ray; None = the machine's count, raised to fit the stages.
    num_cpus: Optional[int] = None
    # CPUs reserved by each preprocessing (decode/resize) task and each CPU stage actor.
    preprocess_cpus: float = 1.0
    cpu_stage_cpus: float = 1.0
    # Actors per CPU stage of the processor (chat template, tokenize, detokenize).
    cpu_stage_concurrency: int = 1
    # Object-store budget (MiB) for the job's blocks in flight; null = Ray Data's default, a
    # share of the node's object store. Reading runs far ahead of the engine otherwise, so
    # memory would grow with the dataset up to that share; a bound keeps it flat.
    object_store_mib: Optional[int] = None
    # Largest block (MiB) Ray Data's operators emit; null = Ray Data's default (128 MiB). A
    # parquet file of 1,000 encoded images is read as one block of ~56 MB that waits before the
    # repartition; smaller read blocks keep the object store flat (docs/benchmarks.md, issue 9).
    max_block_mib: Optional[int] = None
    # Read nothing until every engine replica (and CPU-stage actor) is up, waiting at most this
    # many seconds before the job fails; null: read at once. Started early, the read and decode
    # fill the object-store budget (and overshoot it) while no engine consumes: the job's peak
    # (a lower peak, fewer rows/s: docs/benchmarks.md, "Memory as the dataset grows").
    wait_for_engines_s: Optional[int] = None
    # A joined cluster's GPU workers may be scaled to zero: ask Ray's autoscaler for the engines'
    # GPUs, wait this long at most for one replica's (runtime.wait_for_gpus); null: check at once.
    wait_for_gpus_s: Optional[int] = None
    # Ray's dashboard for a local cluster (its URL is printed with the plan); null: on when Ray's
    # dashboard dependencies (ray[default]) are installed, as ray.init decides.
    include_dashboard: Optional[bool] = None
    # Custom Ray resources each engine replica asks for, on top of its CPU/GPU: pins the engines
    # to the nodes started with them (`ray start --resources='{"vlm_node": 1}'`), the way
    # accelerator_type pins them by Ray's GPU label. E.g. {vlm_node: 0.001}; {}: any node.
    engine_resources: dict[str, float] = field(default_factory=dict)
    # Ray node labels the engine replicas' nodes must carry (Ray's label_selector: values v, !v,
    # in(a,b), !in(a,b); config/labels.py), e.g. {ray.io/market-type: spot} for spot GPU nodes
    # or a custom `ray start --labels` pool. {}: any node. Checked against the alive nodes
    # before any engine starts.
    engine_label_selector: dict[str, str] = field(default_factory=dict)
    # The same for the CPU side: capjob's tasks (ids, decode, caption requests, records, write)
    # and the processor's CPU-stage actors, e.g. {ray.io/market-type: on-demand}. {}: any node.
    cpu_label_selector: dict[str, str] = field(default_factory=dict)
    # A node lost mid-job (spot preemption, a drain) that leaves no alive node able to run an
    # engine replica (or the CPU side): wait this many seconds for one to join (an autoscaler
    # replacing it), then stop with one line naming the lost node (runtime.NodeWatch).
    node_lost_wait_s: float = 120.0


@dataclass
class SinkConfig:
    """`sink` group: where captions go, consumed by stages/sinks.py and stages/tables.py."""

    name: str = "parquet"
    format: SinkFormat = SinkFormat.parquet
    # Local path or fsspec URL. Captions land in <path>/captions, rejected rows in <path>/quarantine.
    path: str = "outputs/${data.name}/${model.name}"
    compression: str = "snappy"
    rows_per_file: Optional[int] = None
    storage_options: dict[str, Any] = field(default_factory=dict)
    # format=txt: the folder of the .txt files (local path or fsspec URL); null: <path>/txt.
    txt_dir: Optional[str] = None
    # format=txt: the output column written into each .txt; null: `caption`, or with
    # caption.prompts the first prompt's `caption_<name>`.
    txt_column: Optional[str] = None


@dataclass
class CaptionConfig:
    """The request(s) sent for each image, consumed by stages/caption/requests.py (and
    stages/sinks.py for the
    prefix/suffix of sink=txt)."""

    system_prompt: str = "You are a helpful assistant that generates accurate and descriptive captions for images."
    # May name input columns as str.format fields ("Rewrite this alt text: {txt}"); they must
    # exist in the dataset (checked before Ray starts) and are passed through to the output.
    user_prompt: str = "Describe this image in detail. Focus on the main subjects, actions, and setting."
    temperature: float = 0.3
    top_p: float = 1.0
    max_tokens: int = 256
    # Benchmarks set this so that every contender generates exactly max_tokens.
    ignore_eos: bool = False
    seed: Optional[int] = None
    # Order of the user turn: false puts the image before the user prompt (Qwen's own examples);
    # true puts the prompt first, so every request starts with the same system + user tokens and
    # vLLM's prefix cache serves them instead of prefilling them again (issue 22: the H200 preset).
    text_before_image: bool = False
    # Several captions per image: {name: {prompt, max_tokens, json_schema}} (or {name: prompt})
    # gives one column `caption_<name>` per entry (in this order) instead of `caption`; empty:
    # user_prompt alone. prompt: as user_prompt; max_tokens: null = caption.max_tokens;
    # json_schema: as below. Entries are checked by prompts.prompt_specs (values are untyped
    # here: Hydra cannot add keys to a dict of dataclasses from the command line).
    prompts: dict[str, Any] = field(default_factory=dict)
    # A JSON schema (mapping, or its JSON text): vLLM's structured outputs constrain the caption
    # to it and the column holds the parsed object as compact JSON text. null: free text.
    json_schema: Optional[Any] = None
    # sink=txt only: written verbatim before / after the caption in each .txt (trigger words).
    prefix: str = ""
    suffix: str = ""


@dataclass
class ImagesConfig:
    """Decode/validate/resize policy, consumed by stages/images.py."""

    size: int = 448
    resize: ResizeMode = ResizeMode.fit
    # Decompression-bomb cap on declared pixels (PIL's own default warning threshold).
    max_pixels: int = 89_478_485
    min_side: int = 28


@dataclass
class JobConfig:
    name: str = "capjob"
    # None: a fresh id per run (timestamp + random suffix).
    run_id: Optional[str] = None
    # Print the plan (stages, partitions, workers, GPUs) and exit without inference.
    dry_run: bool = False
    # true: skip ids already in the sink's captions/quarantine, refusing a sink whose captions
    # were made with other caption settings; force: skip them whatever the settings; false:
    # start over (the sink's captions and quarantine rows are deleted first). stages/resume.py.
    resume: Any = True
    # Quarantined rows whose stage or reason kind (the text before ':' of the reason, e.g.
    # fetch, engine, decode) is listed are tried again by this run instead of being skipped as
    # done (stages/resume.py).
    retry_quarantined: list[str] = field(default_factory=list)
    # Ray's own fault tolerance, passed through rather than re-implemented: retries of a
    # capjob task whose worker died or raised (read, ids, decode, write), and how many blocks
    # may fail for good before the run aborts (0: any lost block fails the run; a value > 0
    # still fails the final accounting, loudly, since those rows are neither captioned nor
    # quarantined). Engine and CPU-stage actors are restarted by Ray Data without limit.
    task_retries: int = 3
    # Port of Ray's Prometheus endpoint for a local cluster (capjob + vLLM metrics); a
    # cluster you join keeps its own (`ray start --metrics-export-port`).
    metrics_export_port: Optional[int] = None
    max_errored_blocks: int = 0
    # Console: at "warning" it shows capjob's plan, one progress line, warnings and the summary;
    # Ray's and vLLM's logs go to <run dir>/capjob.log. "info" or "debug" shows them all here.
    log_level: str = "warning"
    # Price of one GPU-hour (any currency): the report, the console summary and sweep.md then
    # give the cost per 1,000 images beside images per GPU-hour (reporting/report.price).
    gpu_hour_price: Optional[float] = None


def require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def validate_engine(e: EngineConfig, key: str = "engine") -> EngineConfig:
    """Range checks of an engine group (the caption pass's `engine`, or the judge's
    `eval.judge.engine`: `key`). Raises ConfigError naming the key."""
    require(e.batch_size > 0, f"{key}.batch_size", f"must be > 0, got {e.batch_size}")
    require(e.max_concurrent_batches > 0, f"{key}.max_concurrent_batches", f"must be > 0, got {e.max_concurrent_batches}")
    require(e.max_engine_deaths_per_batch >= 1, f"{key}.max_engine_deaths_per_batch",
             f"must be >= 1, got {e.max_engine_deaths_per_batch}")
    require(e.max_model_len > 0, f"{key}.max_model_len", f"must be > 0, got {e.max_model_len}")
    require(e.chat_template_content_format in CHAT_TEMPLATE_CONTENT_FORMATS, f"{key}.chat_template_content_format",
             f"must be one of {', '.join(CHAT_TEMPLATE_CONTENT_FORMATS)}, got {e.chat_template_content_format!r}")
    disable_log_stats = e.extra_engine_kwargs.get("disable_log_stats", False)
    require(not (e.log_engine_metrics and disable_log_stats), f"{key}.log_engine_metrics",
             f"is true but {key}.extra_engine_kwargs.disable_log_stats turns vLLM's stats off; "
             f"set {key}.log_engine_metrics=false with it (vLLM would keep the stats for Ray's metrics anyway)")
    require(e.mm_processor_cache_gb >= 0, f"{key}.mm_processor_cache_gb", f"must be >= 0, got {e.mm_processor_cache_gb}")
    require(e.max_num_seqs is None or e.max_num_seqs > 0, f"{key}.max_num_seqs", f"must be > 0 or null, got {e.max_num_seqs}")
    require(0.0 < e.gpu_memory_utilization <= 1.0, f"{key}.gpu_memory_utilization", f"must be in (0, 1], got {e.gpu_memory_utilization}")
    require(e.cpu_kv_cache_gib > 0, f"{key}.cpu_kv_cache_gib", f"must be > 0, got {e.cpu_kv_cache_gib}")
    require(e.tensor_parallel_size >= 1, f"{key}.tensor_parallel_size", f"must be >= 1, got {e.tensor_parallel_size}")
    require(e.pipeline_parallel_size >= 1, f"{key}.pipeline_parallel_size", f"must be >= 1, got {e.pipeline_parallel_size}")
    require(e.kv_cache_gib is None or e.kv_cache_gib > 0, f"{key}.kv_cache_gib", f"must be > 0 or null, got {e.kv_cache_gib}")
    return e


def parse_shard(shard: Optional[str]) -> Optional[tuple[int, int]]:
    """data.shard "k/n" as (k, n), 0 <= k < n; None for null. Raises ConfigError naming the key."""
    if shard is None:
        return None
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(shard))
    require(match is not None, "data.shard", f"must be k/n (this run's part k of n, 0 <= k < n, e.g. 0/4), got {shard!r}")
    k, n = int(match.group(1)), int(match.group(2))  # type: ignore[union-attr]
    require(k < n, "data.shard", f"must be k/n with 0 <= k < n, got {shard!r}")
    return k, n


