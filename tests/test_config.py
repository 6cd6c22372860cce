import subprocess
import sys

import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException

from capjob.prompts import prompt_specs
from capjob.config import CapjobConfig, to_typed
from capjob.errors import ConfigError
from helpers.config import CONF_DIR, REPO, compose, model_files

GROUPS = {"dataset": "data", "model": "model", "engine": "engine", "resources": "resources", "sink": "sink", "eval": "eval"}


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_group_option_composes_and_validates(group, option):
    cfg = to_typed(compose([f"{group}={option}"]))
    assert isinstance(cfg, CapjobConfig)
    # The option's values landed under the group's key (dataset -> data).
    assert getattr(cfg, GROUPS[group]).name == option


def test_required_options_exist():
    assert {"blip3o", "sample"} <= set(options("dataset"))
    assert {"qwen25vl_3b", "tiny_qwen25vl"} <= set(options("model"))
    assert {"local", "l4x4", "l4x10", "h100x1"} <= set(options("resources"))
    assert "vllm" in options("engine") and "parquet" in options("sink")


def test_card_command_composes():
    cfg = to_typed(compose(["model=qwen25vl_3b", "resources=l4x10", "data.limit=1000000"]))
    assert cfg.model.source == "Qwen/Qwen2.5-VL-3B-Instruct"
    assert cfg.resources.accelerator_type == "L4" and cfg.resources.concurrency == 10
    assert cfg.data.limit == 1_000_000 and cfg.data.image_column == "jpg"


def test_offline_experiment_preset():
    cfg = to_typed(compose(["experiment=offline"]))
    assert (cfg.data.name, cfg.model.name, cfg.resources.name) == ("sample", "tiny_qwen25vl", "local")
    # The CPU preset starts Ray without its dashboard (start-up); asking brings it back; the GPU
    # presets keep Ray's default.
    assert cfg.resources.include_dashboard is False
    assert to_typed(compose(["experiment=offline", "resources.include_dashboard=true"])).resources.include_dashboard is True
    assert to_typed(compose(["resources=h100x1"])).resources.include_dashboard is None


@pytest.mark.parametrize(
    "override,key",
    [
        ("engine.batch_size=-1", "engine.batch_size"),
        ("data.limit=0", "data.limit"),
        ("engine.gpu_memory_utilization=1.5", "engine.gpu_memory_utilization"),
        ("resources.concurrency=0", "resources.concurrency"),
        ("resources.object_store_mib=1", "resources.object_store_mib"),
        ("resources.max_block_mib=0", "resources.max_block_mib"),
        ("resources.wait_for_engines_s=0", "resources.wait_for_engines_s"),
        ("engine.mm_processor_cache_gb=-1", "engine.mm_processor_cache_gb"),
        ("engine.chat_template_content_format=json", "engine.chat_template_content_format"),
        ("caption.max_tokens=0", "caption.max_tokens"),
        ("model.builder=nope", "model.builder"),
    ],
)
def test_bad_values_fail_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        to_typed(compose([override]))


def test_tp_pp_must_match_gpus_per_worker():
    with pytest.raises(ConfigError) as e:
        to_typed(compose(["resources=h100x1", "engine.tensor_parallel_size=2"]))
    assert "engine.tensor_parallel_size" in str(e.value) and "resources.gpus_per_worker" in str(e.value)
    cfg = to_typed(compose(["resources=h100x1", "engine.tensor_parallel_size=2", "resources.gpus_per_worker=2"]))
    assert cfg.engine.tensor_parallel_size == 2


def test_unknown_key_fails_at_composition():
    with pytest.raises(ConfigCompositionException) as e:
        compose(["engine.batchsize=8"])
    assert "batchsize" in str(e.value.__cause__)


def test_bad_enum_lists_allowed_values():
    with pytest.raises(ConfigCompositionException) as e:
        compose(["data.format=csv"])
    assert "image_folder" in str(e.value.__cause__)


def test_unknown_option_is_missing_config():
    with pytest.raises(MissingConfigException):
        compose(["model=nope"])


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "capjob", *args], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_cli_card_command_prints_resolved_config():
    proc = run_cli("model=qwen25vl_3b", "resources=l4x10", "data.limit=1000000", "--cfg", "job")
    assert proc.returncode == 0, proc.stderr
    assert "Qwen/Qwen2.5-VL-3B-Instruct" in proc.stdout and "limit: 1000000" in proc.stdout


def test_cli_dry_run_prints_plan_without_inference(tmp_path):
    # The dry run checks the model and the data as the real run would (no hub here): a local
    # checkpoint folder and a folder of images stand in for the hub ids.
    from PIL import Image

    model = model_files(tmp_path / "ckpt")
    (tmp_path / "images").mkdir()
    Image.new("RGB", (64, 64)).save(tmp_path / "images" / "a.png")
    args = ("model=qwen25vl_3b", f"model.source={model}", "resources=l4x10", "data.limit=1000000", "job.dry_run=true",
            "dataset=image_folder", f"data.path={tmp_path}/images", f"sink.path={tmp_path}/out")
    # On this GPU-less machine with no cluster named, the run would start a local Ray without the
    # L4s: the dry run stops as the run would.
    refused = run_cli(*args)
    assert refused.returncode == 2 and refused.stderr.startswith("capjob: error: resources.gpus_per_worker: each engine replica needs 1 GPU(s)")
    # For the cluster the job joins (as `ray job submit` runs it) the plan is the cluster's.
    proc = run_cli(*args, "resources.address=ray://ray-head:10001")
    assert proc.returncode == 0, proc.stderr
    assert "10 engine replica(s), 1 GPU(s) of type L4 each" in proc.stdout
    assert "vLLM engine" in proc.stdout and "blocks of <= 64 rows" in proc.stdout


def test_cli_errors_are_one_line():
    proc = run_cli("engine.batch_size=-3", "job.dry_run=true")
    assert proc.returncode == 2
    assert proc.stderr.strip() == "capjob: error: engine.batch_size: must be > 0, got -3"
    proc = run_cli("model=nope")
    assert proc.returncode == 2
    assert proc.stderr.strip() == "capjob: error: model=nope: no such option; options: qwen25vl_3b, qwen25vl_3b_dummy, tiny_qwen25vl"


def test_report_redacts_secret_looking_keys():
    from capjob.reporting.report import redact

    cfg = {"data": {"storage_options": {"key": "AKIA", "secret": "s3cr3t", "client_kwargs": {"endpoint_url": "http://x", "aws_session_token": "tok"}}},
           "model": {"hf_token": "hf_abc", "name": "m"}}
    out = redact(cfg)
    assert out["data"]["storage_options"]["secret"] == out["data"]["storage_options"]["key"] == "***"
    assert out["data"]["storage_options"]["client_kwargs"]["aws_session_token"] == "***"
    assert out["data"]["storage_options"]["client_kwargs"]["endpoint_url"] == "http://x"
    assert out["model"] == {"hf_token": "***", "name": "m"}


def test_more_gpus_than_the_machine_has_fails_before_ray():
    from capjob.stages.caption.engine import decide_placement

    cfg = to_typed(compose(["resources=h100x1"]))
    with pytest.raises(ConfigError, match=r"resources\.gpus_per_worker: .* needs 1 GPU\(s\) .* has 0"):
        decide_placement(cfg.resources, cfg.engine, available_gpus=0)
    local = to_typed(compose(["resources=local"]))
    assert decide_placement(local.resources, local.engine, available_gpus=0).gpus == 0  # CPU engine
    assert decide_placement(local.resources, local.engine, available_gpus=2).gpus == 1


def test_cli_gpu_layout_on_a_cpu_machine_is_one_line():
    proc = run_cli("experiment=offline", "resources=h100x1")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("capjob: error: resources.gpus_per_worker")
    assert "Traceback" not in proc.stderr


def test_redaction_keeps_token_counts():
    from capjob.reporting.report import redact

    out = redact({"caption": {"max_tokens": 32}, "engine": {"max_num_batched_tokens": 8}, "hf_token": "x"})
    assert out == {"caption": {"max_tokens": 32}, "engine": {"max_num_batched_tokens": 8}, "hf_token": "***"}


def test_processor_stages_follow_the_engine_switches():
    from capjob.stages.caption.engine import cpu_stages, EnginePlacement, processor_config
    from capjob.runtime import local_cpus_needed

    default = to_typed(compose([]))
    # The caption prompt is rendered once (engine.chat_template_stages=false): no
    # PrepareMultimodal / ChatTemplate actors; the judge's text pass keeps its ChatTemplate.
    assert cpu_stages(default.engine) == ["Tokenize"]
    assert cpu_stages(default.engine, multimodal=False) == ["ChatTemplate", "Tokenize"]
    templated = to_typed(compose(["engine.chat_template_stages=true"]))
    assert cpu_stages(templated.engine) == ["PrepareMultimodal", "ChatTemplate", "Tokenize"]
    # Each image is seen once: vLLM's processed-image cache would only hold memory.
    from capjob.stages.caption.engine import engine_kwargs
    assert engine_kwargs(default.engine, default.model, EnginePlacement(0, None), prompt_specs(default.caption))["mm_processor_cache_gb"] == 0
    offline = to_typed(compose(["experiment=offline"]))
    assert cpu_stages(offline.engine) == []
    assert offline.engine.enforce_eager and offline.engine.env_vars == {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    # One vLLM import per CPU replica: the engine core runs in the engine actor (stages/caption/inproc.py).
    assert offline.engine.in_process_engine_core and not default.engine.in_process_engine_core
    config = processor_config(offline.engine, offline.model, offline.resources, "/m", EnginePlacement(0, None))
    assert (config.tokenize_stage["enabled"], config.detokenize_stage["enabled"], config.chat_template_stage["enabled"],
            config.prepare_multimodal_stage["enabled"]) == (False, False, False, False)
    # enforce_eager on a CPU engine: vLLM's sampler is not compiled either (engine.engine_env).
    assert config.runtime_env == {"env_vars": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TORCH_COMPILE_DISABLE": "1"}}
    # The one-off prompt rendering runs the two stages' own UDFs.
    config = processor_config(offline.engine, offline.model, offline.resources, "/m", EnginePlacement(0, None), chat_template_stages=True)
    assert (config.chat_template_stage["enabled"], config.prepare_multimodal_stage["enabled"]) == (True, True)
    # The content format the rendering task resolved reaches the per-row stage too.
    resolved = processor_config(offline.engine, offline.model, offline.resources, "/m", EnginePlacement(0, None), chat_template_stages=True, content_format="openai")
    assert resolved.prepare_multimodal_stage["chat_template_content_format"] == "openai"
    every = to_typed(compose(["experiment=offline", "engine.chat_template_stages=true", "engine.tokenize_stage=true", "engine.detokenize_stage=true"]))
    assert cpu_stages(every.engine) == ["PrepareMultimodal", "ChatTemplate", "Tokenize", "Detokenize"]
    # Local Ray is sized to the actors that exist: two more stages, two more CPU requests.
    placement = EnginePlacement(0, None)
    wide = ["resources.cpu_stage_cpus=1.0", "resources.preprocess_cpus=1.0"]
    fewer, more = (to_typed(compose(["experiment=offline", *wide, *extra])) for extra in ([], ["engine.tokenize_stage=true", "engine.detokenize_stage=true"]))
    assert local_cpus_needed(more.resources, more.engine, placement) - local_cpus_needed(fewer.resources, fewer.engine, placement) == 2


def test_object_store_budget_reaches_ray_data():
    """resources.object_store_mib bounds Ray Data's executor; null leaves Ray's default."""
    from ray.data import DataContext

    from capjob.plan import configure_data_context

    try:
        DataContext._set_current(None)
        local = configure_data_context(to_typed(compose(["experiment=offline"])))
        assert local.execution_options.resource_limits.object_store_memory == 128 * 2**20
        DataContext._set_current(None)
        default = configure_data_context(to_typed(compose(["experiment=offline", "resources.object_store_mib=null"])))
        assert default.execution_options.resource_limits.object_store_memory == float("inf")
        # resources.max_block_mib caps Ray Data's blocks (the read's, above all); null keeps 128 MiB.
        DataContext._set_current(None)
        assert configure_data_context(to_typed(compose(["experiment=offline"]))).target_max_block_size == 8 * 2**20
        DataContext._set_current(None)
        assert configure_data_context(to_typed(compose(["resources=h100x1"]))).target_max_block_size == 128 * 2**20
        # resources.wait_for_engines_s holds the read until the actor pools are up; null: no wait.
        DataContext._set_current(None)
        waiting = configure_data_context(to_typed(compose(["experiment=offline", "resources.wait_for_engines_s=600"])))
        assert waiting.wait_for_min_actors_s == 600
        DataContext._set_current(None)
        assert configure_data_context(to_typed(compose(["experiment=offline"]))).wait_for_min_actors_s <= 0
    finally:
        DataContext._set_current(None)


def test_replicas_share_a_gpu():
    """resources.replicas_per_gpu=2: each engine asks Ray for half a GPU and half the memory
    share, sizes its KV cache from engine.kv_cache_gib, and all replicas start at once."""
    from ray.llm._internal.batch.stages import vLLMEngineStage

    from capjob.stages.caption.engine import processor_config
    from capjob.stages.caption.engine import decide_placement

    with pytest.raises(ConfigError, match=r"engine\.kv_cache_gib: must be set when resources\.replicas_per_gpu=2"):
        to_typed(compose(["resources=h100x1", "resources.replicas_per_gpu=2"]))
    with pytest.raises(ConfigError, match=r"resources\.replicas_per_gpu: sharing a GPU needs engine\.tensor_parallel_size"):
        to_typed(compose(["resources=h100x1", "resources.replicas_per_gpu=2", "engine.kv_cache_gib=8",
                          "engine.tensor_parallel_size=2", "resources.gpus_per_worker=2"]))
    cfg = to_typed(compose(["resources=h100x1", "resources.replicas_per_gpu=2", "resources.concurrency=2", "engine.kv_cache_gib=16"]))
    placement = decide_placement(cfg.resources, cfg.engine, available_gpus=1)
    assert placement.gpus == 0.5
    config = processor_config(cfg.engine, cfg.model, cfg.resources, "/m", placement)
    assert config.engine_kwargs["gpu_memory_utilization"] == pytest.approx(0.45)
    assert config.engine_kwargs["kv_cache_memory_bytes"] == 16 * 2**30
    assert config.concurrency == (2, 2)
    stage = vLLMEngineStage(
        fn_constructor_kwargs={"engine_kwargs": dict(config.engine_kwargs), "placement_group_config": config.placement_group_config},
        map_batches_kwargs={"accelerator_type": config.accelerator_type},
    )
    assert stage.map_batches_kwargs["num_gpus"] == 0.5  # what Ray schedules the engine actor with
    # One replica per GPU stays Ray Data LLM's default: whole GPUs, utilisation as configured.
    whole = to_typed(compose(["resources=h100x1"]))
    config = processor_config(whole.engine, whole.model, whole.resources, "/m", decide_placement(whole.resources, whole.engine, available_gpus=1))
    assert config.placement_group_config is None and config.engine_kwargs["gpu_memory_utilization"] == 0.9
    assert "kv_cache_memory_bytes" not in config.engine_kwargs


def test_h100_throughput_preset_feeds_the_engine(caplog):
    """The H100 sweep's best point: 1024 sequences, as many requests in flight, and an object
    store big enough that no stage waits; a budget below the estimate warns for a GPU engine."""
    import logging

    from ray.data import DataContext

    from capjob.plan import configure_data_context, min_object_store_mib
    from capjob.stages.caption.engine import engine_kwargs, EnginePlacement

    cfg = to_typed(compose(["experiment=h100_throughput", "model=qwen25vl_3b_dummy"]))
    e = cfg.engine
    assert cfg.resources.name == "h100x1" and e.batch_size * e.max_concurrent_batches >= e.max_num_seqs == 1024
    kwargs = engine_kwargs(cfg.engine, cfg.model, EnginePlacement(1, "H100"), prompt_specs(cfg.caption))
    assert (kwargs["max_num_seqs"], kwargs["max_num_batched_tokens"]) == (1024, 16384)
    # The per-engine knobs that won on the H200 (engine=vllm_throughput, shared by both presets):
    # one replica per H100, so no fixed KV cache.
    assert e.name == "vllm_throughput" and not e.log_engine_metrics and e.detokenize_stage and e.kv_cache_gib is None
    assert kwargs["compilation_config"]["compile_mm_encoder"] is True
    assert max(kwargs["compilation_config"]["cudagraph_capture_sizes"]) == 4096
    assert cfg.resources.object_store_mib >= min_object_store_mib(cfg.images, cfg.engine)
    starved = to_typed(compose(["experiment=h100_throughput", "images.size=225", "engine.batch_size=64", "resources.object_store_mib=1024"]))
    assert min_object_store_mib(starved.images, starved.engine) > 1024  # the setting that cost 11 % on the H100
    try:
        with caplog.at_level(logging.WARNING, logger="capjob.plan"):
            DataContext._set_current(None)
            configure_data_context(starved, EnginePlacement(0, None))
            assert not caplog.records  # a CPU engine: any budget is enough
            DataContext._set_current(None)
            configure_data_context(starved, EnginePlacement(1, "H100"))
        assert "resources.object_store_mib=1024 is below" in caplog.text
    finally:
        DataContext._set_current(None)


def test_caption_request_sends_the_rendered_prompt_and_the_image():
    """engine.chat_template_stages=false: preprocess hands the engine the prompt rendered once and
    the row's image (in the shape PrepareMultimodal would give it), named by its pixels."""
    import numpy as np

    from capjob.stages.caption.requests import CaptionRequest, RenderedPrompt
    from capjob.stages.ids import image_uuid

    cfg = to_typed(compose(["experiment=offline"]))
    row = {"image": np.zeros((4, 6, 3), dtype=np.uint8), "id": "row-1"}
    out = CaptionRequest(cfg.caption, cfg.engine, RenderedPrompt("<prompt>", image_list=True, uuid_list=True, content_format="openai"))(row)
    assert out["prompt"] == "<prompt>" and out["image"] is None and "messages" not in out
    assert out["multimodal_data"]["image"][0].size == (6, 4) and out["multimodal_uuids"] == {"image": [image_uuid(row["image"])]}
    assert out["sampling_params"]["max_tokens"] == cfg.caption.max_tokens
    single = CaptionRequest(cfg.caption, cfg.engine, RenderedPrompt("<prompt>", image_list=False, uuid_list=False, content_format="openai"))(row)
    assert single["multimodal_data"]["image"].size == (6, 4) and single["multimodal_uuids"] == {"image": image_uuid(row["image"])}
    messages = CaptionRequest(cfg.caption, cfg.engine)(row)["messages"]  # engine.chat_template_stages=true: the stages' input
    assert [m["role"] for m in messages] == ["system", "user"] and messages[1]["content"][0]["uuid"] == image_uuid(row["image"])


def test_tp_runs_vllms_multiprocessing_executor_on_one_node():
    """Issue 21: a TP replica on one node runs vLLM's own "mp" executor (what TP=2 ran under on
    2 x H200; ray.llm would pick vLLM's Ray executor); PP alone and a replica larger than any
    node keep Ray's."""
    from capjob.stages.caption.engine import engine_kwargs, EnginePlacement, executor_backend

    def backend(tp, pp, node_gpus=2, gpus=None):
        cfg = to_typed(compose(["resources=h200x2", "resources.concurrency=1", f"resources.gpus_per_worker={tp * pp}",
                                f"engine.tensor_parallel_size={tp}", f"engine.pipeline_parallel_size={pp}"]))
        placement = EnginePlacement(gpus or tp * pp, "H200", node_gpus)
        kwargs = engine_kwargs(cfg.engine, cfg.model, placement, prompt_specs(cfg.caption))
        assert kwargs.get("distributed_executor_backend") == executor_backend(cfg.engine, placement)
        return kwargs.get("distributed_executor_backend")

    assert backend(1, 1) is None  # ray.llm's single-process "uni"
    assert backend(2, 1) == "mp"
    assert backend(2, 1, node_gpus=None) == "mp"  # unknown node size: one node assumed
    assert backend(4, 1, node_gpus=2) == "ray"  # spans nodes: only Ray's executor can
    assert backend(1, 2) == "ray"
    assert backend(2, 2, node_gpus=4) == "mp"
    assert backend(2, 2, node_gpus=2) == "ray"
    # an explicit choice still wins (bench/gpu_check.sh's tp2ray layout)
    cfg = to_typed(compose(["resources=h200x2", "resources.concurrency=1", "resources.gpus_per_worker=2",
                            "engine.tensor_parallel_size=2", "+engine.extra_engine_kwargs.distributed_executor_backend=ray"]))
    assert engine_kwargs(cfg.engine, cfg.model, EnginePlacement(2, "H200", 2), prompt_specs(cfg.caption))["distributed_executor_backend"] == "ray"


def test_h200_presets():
    from capjob.stages.caption.engine import engine_kwargs, EnginePlacement
    from capjob.stages.caption.engine import decide_placement

    one = to_typed(compose(["experiment=h200_throughput", "model=qwen25vl_3b_dummy"]))
    assert (one.resources.name, one.resources.accelerator_type, one.resources.concurrency) == ("h200x1", "H200", 2)
    # Two engines share the H200 (issue 22: 167 images/s against ~128 for one): half a GPU each,
    # each with its own fixed KV cache and its half of the memory budget.
    placement = decide_placement(one.resources, one.engine, available_gpus=1, node_gpus=1)
    assert (one.resources.replicas_per_gpu, placement.gpus) == (2, 0.5)
    kwargs = engine_kwargs(one.engine, one.model, placement, prompt_specs(one.caption))
    assert (kwargs["max_num_seqs"], kwargs["max_num_batched_tokens"]) == (1024, 16384)
    assert (kwargs["kv_cache_memory_bytes"], kwargs["gpu_memory_utilization"]) == (16 * 2**30, 0.45)
    # Session 9 (267 against 227 images/s): the vision blocks compiled, CUDA graphs to 4,096 tokens,
    # no Ray metrics, captions decoded in Ray Data's Detokenize actors.
    compilation = kwargs["compilation_config"]
    assert compilation["compile_mm_encoder"] is True and max(compilation["cudagraph_capture_sizes"]) == 4096
    assert not one.engine.log_engine_metrics and one.engine.detokenize_stage
    two = to_typed(compose(["resources=h200x2"]))
    placement = decide_placement(two.resources, two.engine, available_gpus=2, node_gpus=2)
    assert (two.resources.concurrency, placement.gpus, placement.accelerator_type) == (2, 1, "H200")
    tp = to_typed(compose(["resources=h200x2", "resources.concurrency=1", "resources.gpus_per_worker=2", "engine.tensor_parallel_size=2"]))
    assert engine_kwargs(tp.engine, tp.model, decide_placement(tp.resources, tp.engine, available_gpus=2, node_gpus=2))["distributed_executor_backend"] == "mp"
    assert engine_kwargs(tp.engine, tp.model, EnginePlacement(2, "H200"), prompt_specs(tp.caption))["tensor_parallel_size"] == 2


def test_accelerator_type_no_node_has_is_one_line():
    """What Ray's cluster_resources() holds on the 2 x H200 host (label accelerator_type:H200)."""
    from capjob.stages.caption.engine import EnginePlacement
    from capjob.stages.caption.engine import check_accelerator_type

    h200 = {"CPU": 32.0, "GPU": 2.0, "accelerator_type:H200": 1.0, "memory": 1e11}
    check_accelerator_type(EnginePlacement(1, "H200"), h200)
    check_accelerator_type(EnginePlacement(1, None), h200)  # any GPU
    check_accelerator_type(EnginePlacement(0, None), {"CPU": 2.0})  # CPU engine: no label needed
    with pytest.raises(ConfigError) as e:
        check_accelerator_type(EnginePlacement(1, "H100"), h200)
    assert str(e.value).startswith("resources.accelerator_type: no node of the cluster has accelerator type 'H100'")
    assert "2 GPU(s), accelerator type(s) H200" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"has 4 GPU\(s\), accelerator type\(s\) A10G, L4\)"):
        check_accelerator_type(EnginePlacement(1, "H200"), {"GPU": 4.0, "accelerator_type:L4": 1.0, "accelerator_type:A10G": 1.0})
    with pytest.raises(ConfigError, match=r"has 1 GPU\(s\), no accelerator type label"):
        check_accelerator_type(EnginePlacement(1, "L4"), {"GPU": 1.0})


def test_accelerator_check_reads_rays_node_labels():
    """Ray 2.49+ labels each GPU node `ray.io/accelerator-type`: the check takes the type from
    ray.nodes()' labels as well as from the older `accelerator_type:<type>` resource."""
    from capjob.stages.caption.engine import EnginePlacement, check_accelerator_type

    nodes = [{"NodeID": "a" * 56, "Alive": True, "Labels": {"ray.io/accelerator-type": "L40S"}, "Resources": {"GPU": 4.0}},
             {"NodeID": "b" * 56, "Alive": False, "Labels": {"ray.io/accelerator-type": "H100"}, "Resources": {"GPU": 8.0}}]
    check_accelerator_type(EnginePlacement(1, "L40S"), {"GPU": 4.0}, nodes)  # the label alone is enough
    with pytest.raises(ConfigError, match=r"^resources\.accelerator_type: no node of the cluster has accelerator type 'H100' "
                                          r"\(it has 4 GPU\(s\), accelerator type\(s\) L40S\)"):
        check_accelerator_type(EnginePlacement(1, "H100"), {"GPU": 4.0}, nodes)  # a dead node's label does not count


@pytest.mark.parametrize("selector,error", [
    ({"ray.io/market-type": "spot", "pool": "in(a, b)", "zone": "!us-east-1a", "tier": "!in(x,y)"}, None),
    ({"pool": "sp ot"}, r"^resources\.engine_label_selector\.pool: 'sp ot' is not a label selector value; use v, !v, in\(a,b\) or !in\(a,b\)$"),
    ({"pool": "in()"}, r"^resources\.engine_label_selector\.pool: 'in\(\)' is not a label selector value"),
    ({"bad key!": "x"}, r"^resources\.engine_label_selector: 'bad key!' is not a Ray label key"),
])
def test_label_selectors_take_rays_syntax(selector, error):
    from capjob.config import ResourcesConfig, validate

    cfg = to_typed(compose(["experiment=offline"]))
    cfg.resources = ResourcesConfig(engine_label_selector=selector)
    if error is None:
        validate(cfg)
    else:
        with pytest.raises(ConfigError, match=error):
            validate(cfg)


def test_label_selectors_match_as_ray_schedules():
    """A node without the key fails v and in(), satisfies !v and !in() (Ray's autoscaler, Kubernetes' NotIn)."""
    from capjob.config import selector_matches

    spot = {"ray.io/market-type": "spot", "capjob-pool": "engines"}
    assert selector_matches({}, {}) and selector_matches({"ray.io/market-type": "spot"}, spot)
    assert selector_matches({"ray.io/market-type": "in(spot,on-demand)", "capjob-pool": "engines"}, spot)
    assert not selector_matches({"ray.io/market-type": "on-demand"}, spot)
    assert not selector_matches({"ray.io/market-type": "spot", "capjob-pool": "cpu"}, spot)  # every entry must hold
    assert not selector_matches({"zone": "a"}, spot) and not selector_matches({"zone": "in(a,b)"}, spot)
    assert selector_matches({"zone": "!a"}, spot) and selector_matches({"zone": "!in(a,b)"}, spot)
    assert not selector_matches({"ray.io/market-type": "!spot"}, spot) and not selector_matches({"capjob-pool": "!in(engines)"}, spot)
    cfg = to_typed(compose(["experiment=offline", "+resources.engine_label_selector={ray.io/market-type: spot, capjob-pool: engines}",
                            "+resources.cpu_label_selector={ray.io/market-type: on-demand}"]))
    assert cfg.resources.engine_label_selector == {"ray.io/market-type": "spot", "capjob-pool": "engines"}
    assert cfg.resources.cpu_label_selector == {"ray.io/market-type": "on-demand"}


def test_engine_front_end_switches():
    """engine.log_engine_metrics reaches Ray Data LLM (on by default: tests/test_e2e.py reads
    ray_vllm_* metrics); engine.detokenize_stage makes the requests ask vLLM for token ids only,
    since Ray Data LLM's Detokenize stage decodes them (issue 22: the front-end's detokenizer and
    Ray metrics were 19 % and 9-12 % of its thread on an H200)."""
    from capjob.stages.caption.engine import engine_kwargs, EnginePlacement, processor_config
    from capjob.stages.caption.requests import CaptionRequest

    cpu = EnginePlacement(0, None)
    default = to_typed(compose(["experiment=offline"]))
    assert processor_config(default.engine, default.model, default.resources, "/m", cpu).log_engine_metrics is True
    assert "detokenize" not in CaptionRequest(default.caption, default.engine).sampling_params[None]
    lean = to_typed(compose(["experiment=offline", "engine.log_engine_metrics=false", "engine.detokenize_stage=true"]))
    config = processor_config(lean.engine, lean.model, lean.resources, "/m", cpu)
    assert config.log_engine_metrics is False and config.detokenize_stage["enabled"] is True
    assert CaptionRequest(lean.caption, lean.engine).sampling_params[None]["detokenize"] is False
    # vLLM's stats off entirely: only with the Ray export off (vLLM would keep them for it).
    with pytest.raises(ConfigError) as e:
        to_typed(compose(["experiment=offline", "+engine.extra_engine_kwargs.disable_log_stats=true"]))
    assert str(e.value).startswith("engine.log_engine_metrics: is true but engine.extra_engine_kwargs.disable_log_stats")
    quiet = to_typed(compose(["experiment=offline", "engine.log_engine_metrics=false", "+engine.extra_engine_kwargs.disable_log_stats=true"]))
    assert engine_kwargs(quiet.engine, quiet.model, cpu, prompt_specs(quiet.caption))["disable_log_stats"] is True


def test_an_eager_cpu_engine_runs_without_torch_compile_and_nothing_else_changes():
    """engine.enforce_eager on a CPU engine also keeps vLLM's sampler out of torch.compile
    (TORCH_COMPILE_DISABLE=1 in the actors' environment: Inductor's ISA probe cost every CPU
    engine start ~13 s); a compiling engine, a GPU engine and a value the user set keep theirs."""
    from capjob.stages.caption.engine import EnginePlacement, engine_env, processor_config

    cpu, gpu = EnginePlacement(0, None), EnginePlacement(1, "H100")
    offline = to_typed(compose(["experiment=offline"]))
    assert engine_env(offline.engine, cpu) == {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TORCH_COMPILE_DISABLE": "1"}
    assert engine_env(offline.engine, gpu) == {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    compiled = to_typed(compose(["experiment=offline", "engine.enforce_eager=false"]))
    assert "TORCH_COMPILE_DISABLE" not in engine_env(compiled.engine, cpu)
    mine = to_typed(compose(["experiment=offline", "+engine.env_vars.TORCH_COMPILE_DISABLE=0"]))
    assert engine_env(mine.engine, cpu)["TORCH_COMPILE_DISABLE"] == "0"
    default = to_typed(compose([]))
    assert engine_env(default.engine, cpu) == {}
    assert processor_config(default.engine, default.model, default.resources, "/m", cpu).runtime_env is None
