"""The merged flags checked and adapted for the vLLM the image carries. Pure: no I/O."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from localmodel.errors import InvalidInput
from runtime import args as vargs
from runtime.classify import KSERVE_TASKS, kserve_task

# vLLM's --task values (to 0.12) and the flags that replaced them (--runner/--convert, vLLM PR #21470;
# docs.vllm.ai models/pooling_models: "--runner pooling", "--convert embed|classify"; without --convert
# the pooling runner converts by architecture, which is what score and reward asked for).
VLLM_TASKS: Mapping[str, tuple[tuple[str, str], ...]] = {
    "auto": (),
    "generate": (("--runner", "generate"),),
    "transcription": (("--runner", "generate"),),
    "draft": (("--runner", "draft"),),
    "embed": (("--runner", "pooling"), ("--convert", "embed")),
    "embedding": (("--runner", "pooling"), ("--convert", "embed")),
    "classify": (("--runner", "pooling"), ("--convert", "classify")),
    "score": (("--runner", "pooling"),),
    "reward": (("--runner", "pooling"),),
}


def vllm_task(flags: Sequence[vargs.Flag]) -> tuple[tuple[vargs.Flag, ...], tuple[str, ...]]:
    """``--task`` as the vLLM the image carries reads it: KServe's task names are kept (the launcher
    reads them), vLLM's become ``--runner``/``--convert`` (a ``--runner``/``--convert`` given wins);
    any other value is InvalidInput, as KServe's ``verify_task`` and vLLM refuse it."""
    task = vargs.value(flags, "--task")
    if task is None or kserve_task(task) is not None:
        return tuple(flags), ()
    norm = task.strip().lower()
    if norm not in VLLM_TASKS:
        raise InvalidInput(
            f"--task {task!r}: not a task KServe knows ({', '.join(sorted(KSERVE_TASKS))}) nor one of "
            f"vLLM's ({', '.join(VLLM_TASKS)})"
        )
    new = tuple(vargs.flag(k, v) for k, v in VLLM_TASKS[norm])
    kept = vargs.without(flags, "--task")
    given = tuple(f for f in new if vargs.find(kept, f.key) is None)
    written = " ".join(vargs.to_argv(new)) or "nothing (vLLM's default)"
    return vargs.merge(kept, given), (
        f"--task {task}: vLLM ≥ 0.13 replaced --task with --runner/--convert (vLLM #21470); passed as "
        f"{written}",
    )


_DTYPES = ("auto", "half", "float16", "bfloat16", "float", "float32")
_LENGTH = re.compile(r"\d+(\.\d+)?[kKmMgG]?")


def check_values(flags: Sequence[vargs.Flag]) -> None:
    """Refuse a value the launcher plans with, or passes under another name, that vLLM would refuse
    only after its start-up: the port (1-65535), the served name (not empty), the context length (a
    whole number, vLLM's 8k form, or -1/auto), ``--max-log-len`` (a whole number) and the dtype (vLLM's
    and KServe's choices, which are lower-case). One InvalidInput naming the flag."""
    port = vargs.value(flags, "--port")
    if port is not None and not (port.isdigit() and 1 <= int(port) <= 65535):
        raise InvalidInput(f"--port (KServe's --http_port) {port!r}: expected a port number from 1 to 65535")
    served = vargs.find(flags, "--served-model-name")
    empty = served is not None and (served.negated or not all(v.strip() for v in served.values or ("",)))
    if empty:
        raise InvalidInput("--served-model-name (KServe's --model_name) is empty: give the model's name")
    length = vargs.value(flags, "--max-model-len")
    if length is not None and not (_LENGTH.fullmatch(length) or length in ("-1", "auto")):
        raise InvalidInput(
            f"--max-model-len (KServe's --max_length) {length!r}: expected a number of tokens (8192, 8k)"
        )
    log_len = vargs.value(flags, "--max-log-len")
    if log_len is not None and not log_len.isdigit():
        raise InvalidInput(f"--max-log-len {log_len!r}: expected a whole number of characters")
    dtype = vargs.value(flags, "--dtype")
    if dtype is not None and dtype not in _DTYPES:
        hint = f" (lower case: {dtype.lower()})" if dtype.lower() in _DTYPES else ""
        raise InvalidInput(f"--dtype {dtype!r}: expected one of {', '.join(_DTYPES)}{hint}")
