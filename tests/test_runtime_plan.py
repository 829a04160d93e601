"""The parallelism plan: tables from the issue and KServe's cases, refusals naming a fix, properties."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from localmodel.errors import InvalidInput
from runtime.devices import check_hardware, compute_capability, config_dtype, plan_dtype
from runtime.plan import ModelShape, PlanRequest, make_plan

LLAMA_8B = ModelShape(32, 8, 32, ("LlamaForCausalLM",))
LLAMA_70B = ModelShape(64, 8, 80, ("LlamaForCausalLM",))
QWEN_05B = ModelShape(14, 2, 24, ("Qwen2ForCausalLM",))
TINY = ModelShape(2, 2, 2, ("LlamaForCausalLM",))
TINY4 = ModelShape(4, 4, 2, ("LlamaForCausalLM",))
H52 = ModelShape(52, 52, 60, ("LlamaForCausalLM",))  # field case 14 (vLLM #2652)
BERT = ModelShape(12, 12, 12, ("BertForSequenceClassification",))


@pytest.mark.parametrize(
    ("shape", "req", "expected"),
    [
        # One node, TP only: the common case; nothing given means every GPU of the node.
        (LLAMA_8B, PlanRequest(8), (8, 1, 1, "mp")),
        (LLAMA_8B, PlanRequest(1), (1, 1, 1, "mp")),
        (LLAMA_8B, PlanRequest(8, tensor_parallel_size=8), (8, 1, 1, "mp")),
        # PP = 1 is valid (KServe refused it once, #4228).
        (LLAMA_8B, PlanRequest(8, tensor_parallel_size=8, pipeline_parallel_size=1), (8, 1, 1, "mp")),
        # TP 16 on 8-GPU nodes: TP 8 x PP 2 over 2 nodes, 16 GPUs kept (KServe #4226).
        (LLAMA_70B, PlanRequest(8, tensor_parallel_size=16), (8, 2, 2, "ray")),
        (LLAMA_70B, PlanRequest(8, nodes=2, tensor_parallel_size=16), (8, 2, 2, "ray")),
        (
            LLAMA_70B,
            PlanRequest(8, nodes=4, tensor_parallel_size=16, pipeline_parallel_size=2),
            (8, 4, 4, "ray"),
        ),
        # Multi-node convention: TP = GPUs per node, PP = nodes.
        (LLAMA_70B, PlanRequest(8, nodes=2), (8, 2, 2, "ray")),
        (LLAMA_70B, PlanRequest(8, nodes=2, pipeline_parallel_size=2), (8, 2, 2, "ray")),
        (LLAMA_70B, PlanRequest(8, nodes=2, tensor_parallel_size=8), (8, 2, 2, "ray")),
        # KServe's predictor test: TP 1, PP 2, RAY_NODE_COUNT 2, REQUEST_GPU_COUNT 1.
        (
            LLAMA_8B,
            PlanRequest(1, True, nodes=2, tensor_parallel_size=1, pipeline_parallel_size=2),
            (1, 2, 2, "ray"),
        ),
        # KServe's defaults (TP 1, PP 1) on a one-GPU pod.
        (LLAMA_8B, PlanRequest(1, True, tensor_parallel_size=1, pipeline_parallel_size=1), (1, 1, 1, "mp")),
        # PP alone on one node: stages share the node's GPUs.
        (LLAMA_8B, PlanRequest(8, pipeline_parallel_size=2), (4, 2, 1, "mp")),
        (LLAMA_8B, PlanRequest(8, nodes=2, pipeline_parallel_size=4), (4, 4, 2, "ray")),
        # Derived TP respects the heads: 14 heads, 2 KV heads on 8 GPUs is TP 2.
        (QWEN_05B, PlanRequest(8), (2, 1, 1, "mp")),
        # Fewer GPUs than detected is fine (not requested explicitly), with a note.
        (LLAMA_8B, PlanRequest(8, tensor_parallel_size=4), (4, 1, 1, "mp")),
        # KV heads fewer than TP: replicated, valid when TP is a multiple of them.
        (ModelShape(32, 2, 32), PlanRequest(8, tensor_parallel_size=8), (8, 1, 1, "mp")),
        # A GPU count set (REQUEST_GPU_COUNT=8) and 52 heads: filled with pipeline stages, TP 4 x PP 2.
        (H52, PlanRequest(8, True), (4, 2, 1, "mp")),
        (ModelShape(40, 40, 40), PlanRequest(3, True), (1, 3, 1, "mp")),
        (H52, PlanRequest(8, True, nodes=2), (4, 4, 2, "ray")),
        # Detected (not set): partly idle with a note, as before.
        (H52, PlanRequest(8), (4, 1, 1, "mp")),
        # Unknown shape: nothing to refuse on.
        (ModelShape(), PlanRequest(4), (4, 1, 1, "mp")),
    ],
)
def test_plan_table(shape: ModelShape, req: PlanRequest, expected: tuple[int, int, int, str]) -> None:
    plan = make_plan(shape, req)
    assert (plan.tensor_parallel_size, plan.pipeline_parallel_size, plan.nodes, plan.executor) == expected
    assert plan.gpus_per_node == req.gpus_per_node


def test_split_says_so() -> None:
    plan = make_plan(LLAMA_70B, PlanRequest(8, tensor_parallel_size=16))
    assert any("split into TP 8 x PP 2 (16 GPUs kept)" in n for n in plan.notes)
    assert any("2 nodes" in n for n in plan.notes)


def test_fewer_gpus_used_says_so() -> None:
    plan = make_plan(LLAMA_8B, PlanRequest(8, tensor_parallel_size=4))
    assert plan.notes == ("uses 4 of the 8 GPUs available (1 node x 8 GPUs = 8)",)


@pytest.mark.parametrize(
    ("shape", "req", "words"),
    [
        # TP x PP more than the GPUs available: name the numbers and a plan that works.
        (
            LLAMA_8B,
            PlanRequest(8, nodes=1, tensor_parallel_size=16),
            ["16 GPUs", "--nodes=1 x 8 GPUs = 8", "--nodes=2", "TP 8 x PP 1"],
        ),
        (
            LLAMA_8B,
            PlanRequest(
                8,
                nodes=1,
                tensor_parallel_size=8,
                pipeline_parallel_size=2,
                sources={"nodes": "RAY_NODE_COUNT"},
            ),
            ["RAY_NODE_COUNT=2"],
        ),
        # An explicit GPU count must be used whole.
        (
            LLAMA_8B,
            PlanRequest(8, True, tensor_parallel_size=4, sources={"gpus_per_node": "REQUEST_GPU_COUNT"}),
            [
                "--tensor-parallel-size=4 uses 4 GPUs",
                "REQUEST_GPU_COUNT=8 asks for 1 node x 8 GPUs",
                "TP 8 x PP 1",
                "REQUEST_GPU_COUNT=4",
            ],
        ),
        # An explicit GPU count no split can use whole (4 heads, 2 layers, 3 GPUs): the message names
        # the count asked, why, and a count that works, never the plan it refused.
        (
            TINY4,
            PlanRequest(3, True),
            ["--gpus-per-node=3 asks for 1 node x 3 GPUs", "2 layers", "use --gpus-per-node=2 (TP 2 x PP 1)"],
        ),
        # TP as typed (16), not as split (TP 8 x PP 2), leads the message.
        (
            ModelShape(40, 40, 40),
            PlanRequest(8, True, nodes=1, tensor_parallel_size=16),
            ["--tensor-parallel-size=16 (run as TP 8 x PP 2) needs 16 GPUs", "--nodes=2"],
        ),
        # Heads not divisible by TP.
        (
            LLAMA_8B,
            PlanRequest(8, tensor_parallel_size=6),
            ["32 attention heads", "tensor parallel size 6", "1, 2, 4 or 8"],
        ),
        (QWEN_05B, PlanRequest(8, tensor_parallel_size=4), ["14 attention heads", "1 or 2"]),
        # KV heads: neither divides the other.
        (
            ModelShape(24, 3, 4),
            PlanRequest(8, tensor_parallel_size=2),
            ["3 KV heads", "tensor parallel size 2"],
        ),
        # More PP stages than layers.
        (
            TINY,
            PlanRequest(1, nodes=4, tensor_parallel_size=1, pipeline_parallel_size=4),
            ["pipeline parallel size 4", "2 layers", "≤ 2"],
        ),
        # TP over one node's GPUs that is not a whole number of nodes.
        (
            LLAMA_8B,
            PlanRequest(8, tensor_parallel_size=12, sources={"tensor_parallel_size": "TENSOR_PARALLEL_SIZE"}),
            ["TENSOR_PARALLEL_SIZE=12", "8 or 16"],
        ),
        # A node without work.
        (
            LLAMA_8B,
            PlanRequest(8, nodes=3, tensor_parallel_size=8, pipeline_parallel_size=1),
            ["fits on fewer than the 3 nodes", "--nodes=1"],
        ),
        (LLAMA_8B, PlanRequest(8, nodes=4, pipeline_parallel_size=2), ["leaves nodes without a stage", "4"]),
        # Mixed GPU models (vLLM #13760).
        (
            LLAMA_8B,
            PlanRequest(2, gpu_models=("NVIDIA A100-SXM4-80GB", "NVIDIA H100 80GB HBM3")),
            ["different models", "A100", "H100"],
        ),
        # Encoder-only classifiers have no pipeline stages.
        (
            BERT,
            PlanRequest(1, nodes=2, tensor_parallel_size=1, pipeline_parallel_size=2),
            ["BertForSequenceClassification", "pipeline parallel size of 1"],
        ),
        # Nonsense numbers, named by where they came from.
        (
            LLAMA_8B,
            PlanRequest(8, tensor_parallel_size=0, sources={"tensor_parallel_size": "TENSOR_PARALLEL_SIZE"}),
            ["TENSOR_PARALLEL_SIZE=0", "≥ 1"],
        ),
        (LLAMA_8B, PlanRequest(0), ["--gpus-per-node=0"]),
        (LLAMA_8B, PlanRequest(8, nodes=-1), ["--nodes=-1"]),
    ],
)
def test_refusals_name_numbers_and_a_fix(shape: ModelShape, req: PlanRequest, words: list[str]) -> None:
    with pytest.raises(InvalidInput) as e:
        make_plan(shape, req)
    message = str(e.value)
    assert "\n" not in message
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"


def test_fill_says_why_in_notes() -> None:
    plan = make_plan(H52, PlanRequest(8, True, sources={"gpus_per_node": "REQUEST_GPU_COUNT"}))
    assert plan.notes == (
        "TP 4 x PP 2: the model's heads (52 heads, 52 KV heads) do not divide by 8 GPUs per node, so the "
        "largest tensor parallel size that does (4) is filled up with 2 pipeline stages",
    )


def test_one_gpu_model_is_fine() -> None:
    plan = make_plan(LLAMA_8B, PlanRequest(2, gpu_models=("NVIDIA H100 80GB HBM3",) * 2))
    assert plan.tensor_parallel_size == 2


@pytest.mark.parametrize(
    ("config", "shape"),
    [
        (
            {
                "architectures": ["LlamaForCausalLM"],
                "num_attention_heads": 64,
                "num_key_value_heads": 8,
                "num_hidden_layers": 80,
            },
            ModelShape(64, 8, 80, ("LlamaForCausalLM",)),
        ),
        # No KV heads: multi-head attention, as many as the heads.
        ({"num_attention_heads": 12, "num_hidden_layers": 12}, ModelShape(12, 12, 12)),
        # GPT-2 names.
        (
            {"n_head": 12, "n_layer": 6, "architectures": ["GPT2LMHeadModel"]},
            ModelShape(12, 12, 6, ("GPT2LMHeadModel",)),
        ),
        # Falcon's multi-query flag.
        ({"num_attention_heads": 71, "multi_query": True, "num_hidden_layers": 32}, ModelShape(71, 1, 32)),
        # Multimodal: the language model's shape lives in text_config.
        (
            {
                "architectures": ["LlavaForConditionalGeneration"],
                "text_config": {"num_attention_heads": 32, "num_key_value_heads": 8, "num_hidden_layers": 32},
            },
            ModelShape(32, 8, 32, ("LlavaForConditionalGeneration",)),
        ),
        ({"num_attention_heads": "32", "architectures": "x"}, ModelShape()),
    ],
)
def test_shape_from_config(config: dict[str, object], shape: ModelShape) -> None:
    assert ModelShape.from_config(config) == shape


def test_hardware_checks() -> None:
    assert compute_capability("NVIDIA A100-SXM4-80GB") == 8.0
    assert compute_capability("NVIDIA H100 80GB HBM3") == 9.0
    assert compute_capability("NVIDIA A10G") == 8.6
    assert compute_capability("NVIDIA L40S") == 8.9
    assert compute_capability("Tesla V100-SXM2-32GB") == 7.0
    assert check_hardware("NVIDIA H100 80GB HBM3", "bfloat16", "fp8") == ()
    assert check_hardware(None, "bfloat16", "fp8") == ()
    # A100 runs FP8 checkpoints weight-only: allowed, said.
    (note,) = check_hardware("NVIDIA A100-SXM4-80GB", "auto", "fp8")
    assert "weight-only" in note
    with pytest.raises(InvalidInput, match="no bfloat16; use --dtype float16"):
        check_hardware("Tesla V100-SXM2-32GB", "bfloat16", None)
    with pytest.raises(InvalidInput, match="cannot run FP8"):
        check_hardware("Tesla T4", None, "fp8")
    with pytest.raises(InvalidInput, match=r"AWQ needs compute capability 7\.5"):
        check_hardware("Tesla V100-SXM2-32GB", None, "awq")
    assert "not in the launcher's table" in check_hardware("Some Future GPU", None, None)[0]


# --- properties -------------------------------------------------------------------------------------

shapes = st.builds(
    lambda heads_kv, layers: ModelShape(heads_kv[0], heads_kv[1], layers),
    st.sampled_from([(32, 8), (64, 8), (14, 2), (40, 40), (2, 2), (12, 12), (28, 4), (96, 8)]),
    st.integers(1, 96),
)
maybe = st.one_of(st.none(), st.integers(1, 32))


@given(
    shapes,
    st.sampled_from([1, 2, 4, 6, 8]),
    st.booleans(),
    st.one_of(st.none(), st.integers(1, 6)),
    maybe,
    maybe,
)
@settings(max_examples=500)
def test_every_plan_is_runnable(
    shape: ModelShape, g: int, explicit: bool, nodes: int | None, tp: int | None, pp: int | None
) -> None:
    req = PlanRequest(g, explicit, nodes, tp, pp)
    try:
        plan = make_plan(shape, req)
    except InvalidInput as e:
        assert "\n" not in str(e)
        return
    world = plan.tensor_parallel_size * plan.pipeline_parallel_size
    assert plan.tensor_parallel_size <= g  # TP never crosses a node
    assert world <= plan.nodes * g
    assert world > (plan.nodes - 1) * g  # no node without work
    assert shape.attention_heads is None or shape.attention_heads % plan.tensor_parallel_size == 0
    assert shape.layers is None or plan.pipeline_parallel_size <= shape.layers
    assert plan.executor == ("ray" if plan.nodes > 1 else "mp")
    if explicit:
        assert world == plan.nodes * g
    if nodes is not None:
        assert plan.nodes == nodes
    if tp is not None and pp is not None:
        assert world == tp * pp  # the total asked is kept, even when split
    if tp is not None and tp <= g:
        assert plan.tensor_parallel_size == tp


# -- a bfloat16 model on a GPU without bfloat16 (issue 17 §4) -----------------------------------


@pytest.mark.parametrize(
    ("gpu", "asked", "weights", "want"),
    [
        ("Tesla T4", None, "bfloat16", "float16"),
        ("Tesla V100-SXM2-32GB", "auto", "bfloat16", "float16"),
        ("Tesla T4", "float32", "bfloat16", None),  # asked for explicitly: kept
        ("Tesla T4", None, "float16", None),
        ("NVIDIA A100-SXM4-80GB", None, "bfloat16", None),  # has bfloat16
        (None, None, "bfloat16", None),  # no GPU seen (a dry run on a laptop): nothing to decide
        ("Some Future GPU", None, "bfloat16", None),  # unknown capability: left to vLLM
    ],
)
def test_plan_dtype(gpu: str | None, asked: str | None, weights: str, want: str | None) -> None:
    dtype, note = plan_dtype(gpu, asked, weights)
    assert dtype == want
    assert (note is None) == (want is None)
    if note is not None:
        assert note.startswith("--dtype float16: the weights are bfloat16") and "compute capability" in note


def test_config_dtype_reads_every_spelling() -> None:
    assert config_dtype({"torch_dtype": "bfloat16"}) == "bfloat16"
    assert config_dtype({"dtype": "float16", "torch_dtype": "bfloat16"}) == "float16"
    assert config_dtype({"text_config": {"torch_dtype": "bfloat16"}}) == "bfloat16"
    assert config_dtype({}) is None
