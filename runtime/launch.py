"""What ``modelcache serve`` decided (:class:`Launch`), and where vLLM's compile cache is kept."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from localmodel.layout import CacheLayout
from runtime import args as vargs
from runtime.classify import EngineChoice
from runtime.plan import Plan
from runtime.preflight import PreflightReport

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@dataclass(frozen=True)
class Launch:
    """Everything decided; ``command`` is exec'd with ``env`` added to the environment."""

    plan: Plan
    model_dir: Path
    role: str  # "single", "head" or "worker"
    command: tuple[str, ...]
    env: Mapping[str, str]
    notes: tuple[str, ...]
    dry_run: bool
    ray_start: tuple[str, ...] = ()
    ray_address: str | None = None
    ray_timeout: float = 900.0
    preflight: PreflightReport | None = field(default=None, compare=False)
    classifier: EngineChoice | None = None
    # Values of secret flags (--api-key, --hf-token): kept in ``command`` for the exec, out of every
    # line printed (:meth:`redact`).
    secrets: tuple[str, ...] = field(default=(), compare=False, repr=False)

    def redact(self, text: str) -> str:
        return vargs.redact(text, self.secrets)

    def to_json(self) -> dict[str, Any]:
        """The plan as ``--dry-run`` prints it; secret values are ``***`` (docs/runtime.md: the dry run
        shows the decision, not credentials)."""
        out: dict[str, Any] = {
            "tensor_parallel_size": self.plan.tensor_parallel_size,
            "pipeline_parallel_size": self.plan.pipeline_parallel_size,
            "nodes": self.plan.nodes,
            "gpus_per_node": self.plan.gpus_per_node,
            "executor": self.plan.executor,
            "command": [self.redact(t) for t in vargs.redact_argv(self.command)],
            "env": {k: self.redact(v) for k, v in vargs.redact_env(self.env).items()},
            "notes": [self.redact(n) for n in self.notes],
            "role": self.role,
            "model_dir": str(self.model_dir),
        }
        if self.ray_start:
            out["ray_start"] = list(self.ray_start)
        if self.classifier is not None:
            out["server"] = "classify"
            out["engine"] = self.classifier.engine
        return out


def compile_cache_dir(model_dir: Path) -> Path:
    """vLLM's compile and CUDA-graph caches, kept on the cache's disk so the second start is faster."""
    found = CacheLayout.of_model_dir(model_dir)
    if found is not None:
        layout, key = found
        return layout.compile_cache_dir(key)
    return model_dir.parent / ".vllm-cache" / model_dir.name


def writable(path: Path) -> bool:
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            return False
        probe = probe.parent
    return os.access(probe, os.W_OK)
