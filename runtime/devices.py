"""What the node's GPUs allow: how many the plan uses, the dtype to pass, and the dtypes and
quantizations a GPU model cannot run. Pure: GPU models are names nvidia-smi gave, read elsewhere.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from localmodel.errors import InvalidInput
from runtime.plan import plural


@dataclass(frozen=True)
class GpuCount:
    """GPUs per node for the plan, with what the launcher says about the choice."""

    per_node: int
    notes: tuple[str, ...] = ()


def gpus_per_node(
    explicit: int | None,
    source: str,
    found: tuple[str, ...] | None,
    *,
    dry_run: bool,
    tp: int | None,
    dp: int | None,
) -> GpuCount:
    """The GPUs per node to plan for. ``explicit`` is a count the user set (``source`` names where:
    --gpus-per-node or REQUEST_GPU_COUNT); ``found`` the GPU models nvidia-smi lists, None when it is
    absent, () when it lists none.

    Rules: an explicit count wins, is refused (InvalidInput) when nvidia-smi sees no GPU or fewer,
    and is noted when it sees more; without one, every GPU nvidia-smi sees; without any, a dry run
    plans for TP x DP as asked (a laptop shows what a GPU node would do) and anything else is
    refused, saying how to give a count."""
    if explicit is not None:
        if found is not None and not found:
            raise InvalidInput(
                f"{source}={explicit} but nvidia-smi sees no GPU here; schedule the pod onto a GPU node "
                "(a nvidia.com/gpu limit) with the NVIDIA runtime"
            )
        if found is not None and explicit > len(found):
            raise InvalidInput(
                f"{source}={explicit} but nvidia-smi sees {len(found)} GPUs here; "
                f"use {source}={len(found)} or schedule onto a node with {explicit}"
            )
        if found is not None and explicit < len(found):
            return GpuCount(
                explicit, (f"{source}={explicit}: using {explicit} of the {len(found)} GPUs nvidia-smi sees",)
            )
        return GpuCount(explicit)
    if found:
        return GpuCount(len(found))
    if dry_run:
        per_node = (tp or 1) * (dp or 1)
        planned = f"planned for {plural(per_node, 'GPU')} per node"
        return GpuCount(per_node, (f"no GPU detected (nvidia-smi absent or silent): {planned}",))
    raise InvalidInput(
        "no GPU detected (nvidia-smi absent or silent); pass --gpus-per-node G or set REQUEST_GPU_COUNT"
    )


def uneven_nodes(
    nodes: int | None, gpus: int | None, tp: int | None, pp: int | None, sources: Mapping[str, str]
) -> bool:
    """Whether KServe gave this pod a GPU count that differs from the other pods': several nodes,
    REQUEST_GPU_COUNT, TP and PP set, and TP x PP not this pod's count times the nodes (KServe's
    computeRayNodeAndGPUs gives the head the remainder, or its own request)."""
    return (
        nodes is not None
        and nodes > 1
        and gpus is not None
        and sources.get("gpus_per_node") == "REQUEST_GPU_COUNT"
        and tp is not None
        and pp is not None
        and tp * pp != gpus * nodes
    )


def served_dtype(
    gpu_model: str | None, asked: str | None, config: Mapping[str, Any], *, kserve_way: bool
) -> tuple[str | None, str | None]:
    """The ``--dtype`` to pass and a note saying why, or (None, None) to pass what was asked.

    Rules: a model named KServe's way (--model_dir, --model_id, MODEL_DIR, MODEL_ID) under
    ``--dtype auto`` or none gets float16, as KServe's server reads auto on a GPU, for vLLM too
    (huggingfaceserver/__main__.py: ``if args.dtype == "auto": args.dtype = default_dtype``);
    otherwise :func:`plan_dtype`'s rule for bfloat16 weights on a GPU without bfloat16."""
    weights = config_dtype(config)
    if kserve_way and asked in (None, "auto"):
        return "float16", (
            f"--dtype float16: {'--dtype auto' if asked else 'no --dtype'} read as KServe's server "
            "reads it on a GPU (vLLM's auto would take the config's dtype"
            + (f", {weights}" if weights else "")
            + "); pass --dtype bfloat16 or another to choose"
        )
    return plan_dtype(gpu_model, asked, weights)


# Compute capability of the GPU models people serve on (from NVIDIA's tables).
_CAPABILITY: tuple[tuple[str, float], ...] = (
    ("B200", 10.0),
    ("B100", 10.0),
    ("GB200", 10.0),
    ("H200", 9.0),
    ("H100", 9.0),
    ("H800", 9.0),
    ("GH200", 9.0),
    ("L40S", 8.9),
    ("L40", 8.9),
    ("L4", 8.9),
    ("RTX 4090", 8.9),
    ("RTX 6000 ADA", 8.9),
    ("A100", 8.0),
    ("A800", 8.0),
    ("A30", 8.0),
    ("A10G", 8.6),
    ("A10", 8.6),
    ("A40", 8.6),
    ("RTX A6000", 8.6),
    ("T4", 7.5),
    ("V100", 7.0),
)


def compute_capability(gpu_model: str) -> float | None:
    name = gpu_model.upper()
    return next((cc for key, cc in _CAPABILITY if key in name), None)


_BF16 = ("bfloat16", "bf16")


def config_dtype(config: Mapping[str, Any]) -> str | None:
    """The weights' dtype a config.json declares (``dtype``, transformers' older ``torch_dtype``,
    or the language model's under ``text_config``), or None."""
    for scope in (config, config.get("text_config"), config.get("llm_config")):
        if isinstance(scope, Mapping):
            for key in ("dtype", "torch_dtype"):
                if isinstance(v := scope.get(key), str):
                    return v
    return None


def plan_dtype(
    gpu_model: str | None, asked: str | None, weights: str | None
) -> tuple[str | None, str | None]:
    """The ``--dtype`` to pass, and a note, for a bfloat16 model on a GPU without bfloat16.

    Under ``--dtype auto`` (or none) vLLM takes the config's dtype; on compute capability < 8.0
    (V100, T4) some vLLM releases cast bfloat16 to float16 with a warning and others refuse to start
    ("Bfloat16 is only supported on GPUs with compute capability of at least 8.0"). Asking for
    float16 explicitly starts on every release pyproject allows (vllm>=0.8). An explicit bfloat16 is
    left to check_hardware, which refuses it. Returns (None, None) when nothing changes."""
    if asked not in (None, "auto") or weights not in _BF16 or not gpu_model:
        return None, None
    cc = compute_capability(gpu_model)
    if cc is None or cc >= 8.0:
        return None, None
    return "float16", (
        f"--dtype float16: the weights are {weights} and {gpu_model} (compute capability {cc}) has no "
        "bfloat16; --dtype auto would cast or refuse depending on the vLLM release"
    )


def check_hardware(gpu_model: str | None, dtype: str | None, quantization: str | None) -> tuple[str, ...]:
    """Refuse a dtype or quantization the GPU cannot run, before vLLM spends a minute finding out;
    return notes for choices that run in a slower mode."""
    if not gpu_model:
        return ()
    cc = compute_capability(gpu_model)
    if cc is None:
        return (f"GPU model {gpu_model!r} not in the launcher's table: dtype and quantization not checked",)
    notes: list[str] = []
    if dtype in ("bfloat16", "bf16") and cc < 8.0:
        raise InvalidInput(
            f"--dtype {dtype}: {gpu_model} (compute capability {cc}) has no bfloat16; use --dtype float16"
        )
    q = (quantization or "").lower()
    if q in ("fp8", "fbgemm_fp8", "ptpc_fp8"):
        if cc < 8.0:
            raise InvalidInput(
                f"--quantization {quantization}: {gpu_model} (compute capability {cc}) cannot run FP8 "
                "weights (needs 8.0, A100 or newer); use an FP16/BF16 or AWQ/GPTQ checkpoint"
            )
        if cc < 8.9:
            notes.append(
                f"--quantization {quantization} on {gpu_model}: no FP8 tensor cores (compute capability "
                f"{cc} < 8.9), vLLM runs it weight-only (FP8 weights, 16-bit compute)"
            )
    if q in ("awq", "awq_marlin") and cc < 7.5:
        raise InvalidInput(
            f"--quantization {quantization}: AWQ needs compute capability 7.5, {gpu_model} has {cc}; "
            "use a GPTQ or 16-bit checkpoint"
        )
    return tuple(notes)
