"""The launcher's pure decisions beside the plan: the environment read once, the GPU count, the
executor and the dtype (runtime/env.py, runtime/devices.py, runtime/plan.py)."""

from __future__ import annotations

import pytest

from localmodel.errors import InvalidInput
from runtime.devices import GpuCount, gpus_per_node, served_dtype
from runtime.env import RuntimeEnv, env_count
from runtime.plan import Plan, choose_executor

H100 = "NVIDIA H100 80GB HBM3"
V100 = "Tesla V100-SXM2-32GB"


def test_the_environment_is_read_stripped_with_blank_as_unset() -> None:
    env = RuntimeEnv.of(
        {
            "MODEL_DIR": " /mnt/models ",
            "MODEL_ID": "  ",
            "TENSOR_PARALLEL_SIZE": "4",
            "RAY_NODE_COUNT": " 2 ",
            "POD_IP": "10.0.0.7",
            "MODELCACHE_VLLM": "python3 -m vllm.entrypoints.cli.main",
            "HF_HOME": "/data/hf",
        }
    )
    assert env.model_dir == "/mnt/models" and env.model_id is None
    assert env.tensor_parallel_size == "4" and env.pipeline_parallel_size is None
    assert env.ray_node_count == "2" and env.request_gpu_count is None
    assert env.pod_ip == "10.0.0.7" and env.head_svc is None
    assert env.vllm == ("python3", "-m", "vllm.entrypoints.cli.main")
    assert env.hf_hub_cache == "/data/hf/hub"
    assert RuntimeEnv.of({"HF_HUB_CACHE": "/hub", "HF_HOME": "/data/hf"}).hf_hub_cache == "/hub"
    assert RuntimeEnv.of({"HOME": "/home/u"}).hf_hub_cache == "/home/u/.cache/huggingface/hub"
    assert RuntimeEnv.of({}).vllm == ("vllm",)


def test_modelcache_vllm_is_judged_only_when_vllm_is_run() -> None:
    env = RuntimeEnv.of({"MODELCACHE_VLLM": "python -m 'vllm", "MODEL_DIR": "/m"})
    assert env.model_dir == "/m"  # the rest of the environment reads fine
    with pytest.raises(InvalidInput, match=r"^MODELCACHE_VLLM=\"python -m 'vllm\": No closing quotation"):
        _ = env.vllm


def test_a_count_from_the_environment_is_judged_when_read() -> None:
    assert env_count(None, "RAY_NODE_COUNT") is None
    assert env_count("3", "RAY_NODE_COUNT", 10) == 3
    with pytest.raises(InvalidInput, match=r"RAY_NODE_COUNT='two': expected a whole number"):
        env_count("two", "RAY_NODE_COUNT")
    with pytest.raises(InvalidInput, match=r"REQUEST_GPU_COUNT='9': expected a whole number from 1 to 8"):
        env_count("9", "REQUEST_GPU_COUNT", 8)


def test_an_explicit_gpu_count_wins_within_what_nvidia_smi_sees() -> None:
    src = "REQUEST_GPU_COUNT"
    assert gpus_per_node(2, src, (H100,) * 2, dry_run=False, tp=None, dp=None) == GpuCount(2)
    assert gpus_per_node(2, src, None, dry_run=False, tp=None, dp=None) == GpuCount(2)  # no nvidia-smi
    (note,) = gpus_per_node(2, src, (H100,) * 8, dry_run=False, tp=None, dp=None).notes
    assert note == "REQUEST_GPU_COUNT=2: using 2 of the 8 GPUs nvidia-smi sees"
    with pytest.raises(InvalidInput, match="REQUEST_GPU_COUNT=4 but nvidia-smi sees 2 GPUs here"):
        gpus_per_node(4, src, (H100,) * 2, dry_run=False, tp=None, dp=None)
    with pytest.raises(InvalidInput, match="--gpus-per-node=1 but nvidia-smi sees no GPU here"):
        gpus_per_node(1, "--gpus-per-node", (), dry_run=True, tp=None, dp=None)


def test_without_a_count_the_gpus_seen_else_a_dry_run_plans_for_what_was_asked() -> None:
    assert gpus_per_node(None, "--gpus-per-node", (H100,) * 4, dry_run=False, tp=2, dp=None).per_node == 4
    dry = gpus_per_node(None, "--gpus-per-node", None, dry_run=True, tp=2, dp=3)
    assert dry.per_node == 6 and "planned for 6 GPUs per node" in dry.notes[0]
    with pytest.raises(InvalidInput, match="pass --gpus-per-node G or set REQUEST_GPU_COUNT"):
        gpus_per_node(None, "--gpus-per-node", (), dry_run=False, tp=2, dp=None)


def test_the_executor_asked_for_is_taken_on_one_node_and_keeps_the_plan() -> None:
    plan = Plan(2, 1, 1, 4, "mp", ("planned",), data_parallel_size=2)
    assert choose_executor(plan, None) == choose_executor(plan, "mp")
    assert choose_executor(plan, None).plan == plan and choose_executor(plan, None).pass_flag
    ray = choose_executor(plan, "ray")
    assert ray.plan == Plan(2, 1, 1, 4, "ray", ("planned",), data_parallel_size=2)  # DP kept
    assert ray.pass_flag and ray.notes == ("executor ray: as --distributed-executor-backend asks",)
    uni = choose_executor(plan, "uni")
    assert uni.plan == plan and not uni.pass_flag
    assert uni.notes == ("--distributed-executor-backend uni kept as given",)


def test_across_nodes_only_ray_brings_the_nodes_up() -> None:
    plan = Plan(8, 2, 2, 8, "ray")
    assert choose_executor(plan, "ray").plan == plan
    with pytest.raises(InvalidInput, match="--distributed-executor-backend mp across 2 nodes"):
        choose_executor(plan, "mp")


def test_kserve_s_way_reads_auto_as_float16_else_bfloat16_is_lowered_only_where_unsupported() -> None:
    bf16 = {"torch_dtype": "bfloat16"}
    dtype, note = served_dtype(H100, None, bf16, kserve_way=True)
    assert dtype == "float16" and note is not None and "no --dtype read as KServe's server" in note
    assert ", bfloat16)" in note
    assert served_dtype(H100, "bfloat16", bf16, kserve_way=True) == (None, None)
    assert served_dtype(H100, None, bf16, kserve_way=False) == (None, None)
    dtype, note = served_dtype(V100, "auto", bf16, kserve_way=False)
    assert dtype == "float16" and note is not None and "has no bfloat16" in note
