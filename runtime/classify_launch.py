"""The launch of an encoder model: KServe's v1/v2 predict protocols from runtime.classify_server."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from localmodel.errors import InvalidInput
from runtime import args as vargs
from runtime.classify import TASK, OutputOptions, choose_engine, kserve_task
from runtime.env import RuntimeEnv
from runtime.launch import OFFLINE_ENV, Launch, compile_cache_dir, writable
from runtime.plan import ModelShape, Plan, plural
from runtime.preflight import PreflightReport

# The classification server's own flags, from the merged argv: (flag, its name there, takes a value).
CLASSIFY_FLAGS: tuple[tuple[str, str, bool], ...] = (
    ("--host", "--host", True),
    ("--backend", "--backend", True),
    ("--dtype", "--dtype", True),
    ("--max-length", "--max_length", True),
    ("--max-model-len", "--max_length", True),
    ("--return-probabilities", "--return_probabilities", False),
    ("--return-raw-logits", "--return_raw_logits", False),
    ("--use-id2label", "--use_id2label", False),
    ("--trust-remote-code", "--trust_remote_code", False),
    ("--v2-tensors", "--v2_tensors", False),
    ("--return-offsets-mapping", "--return_offsets_mapping", False),
    ("--disable-lower-case", "--disable_lower_case", False),
    ("--disable-special-tokens", "--disable_special_tokens", False),
    ("--return-token-type-ids", "--return_token_type_ids", False),
)
# Consumed here or meaningless to the classification server; not reported as ignored.
CLASSIFY_CONSUMED = frozenset(
    {
        "--port",
        "--served-model-name",
        "--task",
        "--tensor-parallel-size",
        "--pipeline-parallel-size",
        "--disable-fastapi-docs",  # a default of ours; the classification server serves no /docs
    }
)


def server_command(
    merged: Sequence[vargs.Flag], model_dir: Path, *, task: str, engine: str, tp: int
) -> list[str]:
    """The classification server's argv: the model, its name and port, the task, TP for vLLM, and
    each of :data:`CLASSIFY_FLAGS` given (a value flag once, under the server's name)."""
    served = vargs.find(merged, "--served-model-name")
    name = served.values[0] if served is not None and served.values else "model"
    command = [
        sys.executable,
        "-m",
        "runtime.classify_server",
        "--model_dir",
        str(model_dir),
        "--model_name",
        name,
        "--port",
        vargs.value(merged, "--port") or "8080",
    ]
    if task != TASK:
        command += ["--task", task]
    if engine == "vllm" and tp > 1:
        command += ["--tensor_parallel_size", str(tp)]
    for key, target, takes_value in CLASSIFY_FLAGS:
        if takes_value:
            if (v := vargs.value(merged, key)) is not None and target not in command:
                command += [target, v]
        elif vargs.switch(merged, key):
            command.append(target)
    return command


def _server_env(model_dir: Path, env: RuntimeEnv, engine: str) -> dict[str, str]:
    added = dict(OFFLINE_ENV)
    if not env.vllm_cache_root and engine == "vllm":
        cache = compile_cache_dir(model_dir)
        if writable(cache):
            added["VLLM_CACHE_ROOT"] = str(cache)
    return added


def classifier_launch(
    ns: argparse.Namespace,
    merged: Sequence[vargs.Flag],
    *,
    model_dir: Path,
    report: PreflightReport,
    shape: ModelShape,
    env: RuntimeEnv,
    tp: int | None,
    pp: int | None,
    nodes: int | None,
    found: tuple[str, ...] | None,
    explicit_gpus: int | None,
    vllm_here: bool,
    notes: list[str],
    task: str = TASK,
    secrets: tuple[str, ...] = (),
) -> Launch:
    """An encoder model (KServe's sequence or token classification, fill-mask, text embedding):
    KServe's v1/v2 predict protocols and answers from runtime.classify_server, one node."""
    what = "a sequence classifier" if task == TASK else f"an encoder model ({task})"
    if ns.worker or (nodes is not None and nodes > 1):
        raise InvalidInput(
            f"{what} is served on one node (nodes={nodes or 1}"
            f"{', --worker' if ns.worker else ''}); deploy the single-node runtime"
        )
    if pp is not None and pp > 1:
        raise InvalidInput(
            f"--pipeline-parallel-size {pp}: {what} is served without pipeline stages; "
            "use --pipeline-parallel-size 1"
        )
    per_node = explicit_gpus if explicit_gpus is not None else len(found or ())
    tp = tp or 1
    if tp > 1 and per_node and tp > per_node:
        raise InvalidInput(
            f"--tensor-parallel-size {tp} but {plural(per_node, 'GPU')} here; use at most {per_node}"
        )
    options = OutputOptions(
        return_probabilities=vargs.switch(merged, "--return-probabilities"),
        return_raw_logits=vargs.switch(merged, "--return-raw-logits"),
        use_id2label=vargs.switch(merged, "--use-id2label"),
    )
    # The server makes the final choice against vLLM's registry; here vLLM being installed stands in
    # for it (importing vLLM to ask would cost seconds of start-up).
    choice = choose_engine(
        shape.architectures,
        backend=vargs.value(merged, "--backend"),
        vllm_archs=frozenset(shape.architectures) if vllm_here else None,
        options=options,
        task=task,
    )
    arch = ", ".join(shape.architectures) or "no architecture in config.json"
    why = f"--task {task}" if kserve_task(vargs.value(merged, "--task")) else arch
    notes.append(
        f"{task} ({why}): served by runtime.classify_server with KServe's v1/v2 predict "
        f"protocols and answers on {choice.reason}"
    )
    if choice.engine == "huggingface" and tp > 1:
        notes.append(f"--tensor-parallel-size {tp} not used: transformers runs the classifier on one device")
    command = server_command(merged, model_dir, task=task, engine=choice.engine, tp=tp)
    known = {k for k, _, _ in CLASSIFY_FLAGS} | CLASSIFY_CONSUMED
    ignored = [f.key for f in merged if f.key not in known]
    if ignored:
        notes.append(f"not used by the classification server: {', '.join(ignored)}")
    plan = Plan(tp, 1, 1, per_node, "mp", ())
    return Launch(
        plan=plan,
        model_dir=model_dir,
        role="single",
        command=tuple(command),
        env=_server_env(model_dir, env, choice.engine),
        notes=tuple(notes),
        dry_run=ns.dry_run,
        ray_timeout=ns.ray_timeout,
        preflight=report,
        classifier=choice,
        secrets=secrets,
    )
