"""The environment ``modelcache serve`` reads, parsed once at the entry point (:func:`RuntimeEnv.of`).

KServe's runtimes set MODEL_DIR / MODEL_ID / MODEL_NAME, TENSOR_PARALLEL_SIZE /
PIPELINE_PARALLEL_SIZE, RAY_NODE_COUNT, REQUEST_GPU_COUNT, POD_IP and HEAD_SVC (its multi-node
runtime, predictor.go); vLLM reads VLLM_CACHE_ROOT; the Hugging Face libraries HF_HUB_CACHE /
HF_HOME; MODELCACHE_VLLM is ours (how to run vLLM). Pure: the mapping is given, nothing is read here.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from localmodel.errors import InvalidInput


@dataclass(frozen=True)
class RuntimeEnv:
    """Each variable as the launcher uses it: stripped, None when unset or blank. The two counts stay
    text until a decision reads them (:func:`env_count`): a count a flag overrides is never judged."""

    model_dir: str | None = None  # MODEL_DIR
    model_id: str | None = None  # MODEL_ID
    model_name: str | None = None  # MODEL_NAME: the served name when no --model_name is given
    tensor_parallel_size: str | None = None  # TENSOR_PARALLEL_SIZE, passed on as the flag
    pipeline_parallel_size: str | None = None  # PIPELINE_PARALLEL_SIZE, passed on as the flag
    ray_node_count: str | None = None  # RAY_NODE_COUNT
    request_gpu_count: str | None = None  # REQUEST_GPU_COUNT: this pod's GPUs
    vllm_cache_root: str | None = None  # VLLM_CACHE_ROOT: kept when set
    pod_ip: str | None = None  # POD_IP: vLLM's and Ray's address on hosts with several
    head_svc: str | None = None  # HEAD_SVC: the Ray head a worker joins
    # MODELCACHE_VLLM as given: split (:attr:`vllm`) only where vLLM is run, so a bad value never
    # stops a launch that does not run it.
    vllm_command: str | None = None
    hf_hub_cache: str = "~/.cache/huggingface/hub"  # HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/..

    @classmethod
    def of(cls, env: Mapping[str, str]) -> RuntimeEnv:
        def get(name: str) -> str | None:
            return env.get(name, "").strip() or None

        home = env.get("HF_HOME") or str(Path(env.get("HOME", "~")) / ".cache" / "huggingface")
        return cls(
            model_dir=get("MODEL_DIR"),
            model_id=get("MODEL_ID"),
            model_name=get("MODEL_NAME"),
            tensor_parallel_size=get("TENSOR_PARALLEL_SIZE"),
            pipeline_parallel_size=get("PIPELINE_PARALLEL_SIZE"),
            ray_node_count=get("RAY_NODE_COUNT"),
            request_gpu_count=get("REQUEST_GPU_COUNT"),
            vllm_cache_root=env.get("VLLM_CACHE_ROOT") or None,
            pod_ip=get("POD_IP"),
            head_svc=get("HEAD_SVC"),
            vllm_command=get("MODELCACHE_VLLM"),
            hf_hub_cache=env.get("HF_HUB_CACHE") or str(Path(home) / "hub"),
        )

    @property
    def vllm(self) -> tuple[str, ...]:
        """The argv that runs vLLM: MODELCACHE_VLLM split as a shell would, else ``("vllm",)``;
        InvalidInput naming MODELCACHE_VLLM when it does not split (an unclosed quote)."""
        if self.vllm_command is None:
            return ("vllm",)
        try:
            return tuple(shlex.split(self.vllm_command))
        except ValueError as e:
            raise InvalidInput(
                f"MODELCACHE_VLLM={self.vllm_command!r}: {e}; write the command as a shell would "
                "(close each quote)"
            ) from None


def env_count(raw: str | None, name: str, limit: int | None = None) -> int | None:
    """A count from the environment variable ``name``; None when unset; InvalidInput naming it when
    not a whole number or over ``limit``."""
    if raw is None:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise InvalidInput(f"{name}={raw!r}: expected a whole number ≥ 1") from None
    if limit is not None and value > limit:
        raise InvalidInput(f"{name}={raw!r}: expected a whole number from 1 to {limit}")
    return value
