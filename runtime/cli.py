"""`modelcache serve`: check the cached model, plan the parallelism, then exec vLLM (or join Ray).

Made to be a ServingRuntime's ``command``, with user arguments in ``args``: KServe's flags and
environment are understood, every other flag passes through to ``vllm serve`` after one merge (each
flag once, the last occurrence winning). ``--dry-run`` prints the decision as one JSON object and
starts nothing.

Precedence, lowest first: the launcher's defaults, the environment (TENSOR_PARALLEL_SIZE, ...), the
command line in order; then the plan sets TP, PP and the executor it decided (and says why in notes).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shlex
import shutil
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from localmodel.cliargs import UsageParser
from localmodel.errors import InvalidInput, ModelcacheError
from localmodel.layout import CacheLayout
from runtime import args as vargs
from runtime import kserve
from runtime.classify import encoder_task, kserve_task, normalise_backend
from runtime.classify_launch import classifier_launch
from runtime.devices import check_hardware, gpus_per_node, served_dtype, uneven_nodes
from runtime.env import RuntimeEnv, env_count
from runtime.launch import OFFLINE_ENV, Launch, compile_cache_dir, writable
from runtime.model_dir import DEFAULT_MODEL_DIR, resolve_model
from runtime.plan import (
    MAX_GPUS_PER_NODE,
    MAX_NODES,
    ModelShape,
    Plan,
    PlanRequest,
    choose_executor,
    make_plan,
    plural,
)
from runtime.preflight import PreflightReport, check_tokenizer, manifest_path, preflight
from runtime.ray import (
    Runner,
    head_address,
    head_start_command,
    run_command,
    wait_for_gpus,
    wait_for_head,
    worker_start_command,
)
from runtime.vllm_flags import check_values, vllm_task

# KServe's model server conventions: the container port is 8080, an unnamed model is "model".
# KServe's server serves no /docs unless --enable_docs_url true (model_server.py: default False).
DEFAULTS: tuple[vargs.Flag, ...] = (
    vargs.flag("--port", 8080),
    vargs.flag("--served-model-name", "model"),
    vargs.flag("--disable-fastapi-docs"),
)
ENV_FLAGS = {
    "TENSOR_PARALLEL_SIZE": "--tensor-parallel-size",
    "PIPELINE_PARALLEL_SIZE": "--pipeline-parallel-size",
}


def _count(limit: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{raw!r}: expected a whole number from 1 to {limit}") from None
        if not 1 <= value <= limit:
            raise argparse.ArgumentTypeError(f"{raw!r}: expected a whole number from 1 to {limit}")
        return value

    return parse


def _seconds(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{raw!r}: expected a positive number of seconds")
    return value


class _Parser(UsageParser):
    def error(self, message: str) -> NoReturn:
        raise InvalidInput(f"{message}; see `modelcache serve --help`")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="modelcache serve",
        allow_abbrev=False,  # a vLLM flag must never be taken for an abbreviation of ours
        description="Serve a cached model with vLLM. Flags not listed here pass through to `vllm serve`.",
        epilog=(
            "An encoder model (architecture *ForSequenceClassification, *ForTokenClassification, "
            "*ForMaskedLM, or KServe's --task sequence_classification|token_classification|fill_mask|"
            "text_embedding) is served with KServe's v1/v2 predict protocols and answers instead; it reads "
            "--return_probabilities, --return_raw_logits, --return_offsets_mapping, --use_id2label, "
            "--v2_tensors, --backend huggingface|vllm, --dtype, --max_length, --disable_lower_case, "
            "--disable_special_tokens, --return_token_type_ids and --trust-remote-code. KServe's other "
            "server flags are translated to vLLM's or dropped with a note (docs/runtime.md)."
        ),
    )
    p.add_argument(
        "--model_dir", "--model-dir", dest="model_dir", help=f"model folder (default {DEFAULT_MODEL_DIR})"
    )
    p.add_argument(
        "--model_id",
        "--model-id",
        dest="model_id",
        help="KServe's Hugging Face model id: served from its folder in --cache-dir (hf://ID[:REV])",
    )
    p.add_argument(
        "--model-uri", "--model_uri", dest="model_uri", help="the model's source URI, found in --cache-dir"
    )
    p.add_argument(
        "--cache-dir", "--cache_dir", dest="cache_dir", help="the node's cache folder (with --model-uri)"
    )
    p.add_argument(
        "--manifest", help="the agent's manifest for this model, when it is not beside a cache layout"
    )
    p.add_argument(
        "--nodes", type=_count(MAX_NODES), help="node count (default RAY_NODE_COUNT, else derived)"
    )
    p.add_argument(
        "--gpus-per-node",
        "--gpus_per_node",
        dest="gpus_per_node",
        type=_count(MAX_GPUS_PER_NODE),
        help="GPUs per node (default REQUEST_GPU_COUNT, else detected with nvidia-smi)",
    )
    p.add_argument("--worker", action="store_true", help="join the Ray head at HEAD_SVC as a worker")
    p.add_argument(
        "--ray-timeout",
        "--ray_timeout",
        dest="ray_timeout",
        type=_seconds,
        default=900.0,
        help="seconds the head waits for every GPU, and a worker for the head (default 900)",
    )
    p.add_argument(
        "--dry-run",
        "--dry_run",
        dest="dry_run",
        action="store_true",
        help="print the plan as one JSON object and start nothing",
    )
    p.add_argument("--verify", action="store_true", help="also check every file's hash against the manifest")
    return p


GpuDetector = Callable[[Mapping[str, str]], tuple[str, ...] | None]


def detect_gpus(env: Mapping[str, str], runner: Runner = run_command) -> tuple[str, ...] | None:
    """The GPU models this process may use, one per GPU; None when nvidia-smi is not there."""
    if shutil.which("nvidia-smi", path=env.get("PATH")) is None:
        return None
    result = runner(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], 20.0)
    if result.returncode != 0:
        return None
    names = tuple(line.strip() for line in result.stdout.splitlines() if line.strip())
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and all(p.strip().isdigit() for p in visible.split(",") if p.strip()):
        indices = [int(p) for p in visible.split(",") if p.strip()]
        names = tuple(names[i] for i in indices if i < len(names))
    return names


def _int_flag(flags: Sequence[vargs.Flag], key: str, source: str) -> int | None:
    raw = vargs.value(flags, key)
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        raise InvalidInput(f"{source}={raw!r}: expected a whole number ≥ 1") from None


def vllm_installed() -> bool:
    """Whether vLLM can be imported here, without importing it (that takes seconds)."""
    return importlib.util.find_spec("vllm") is not None


def _parse(argv: Sequence[str]) -> tuple[argparse.Namespace, vargs.Parsed]:
    """The launcher's own flags, and the rest parsed for vLLM; InvalidInput for a near miss of one of
    ours or a positional argument."""
    parser = _parser()
    ns, rest = parser.parse_known_args(list(argv))
    parsed = vargs.parse(rest)
    own = [o for action in parser._actions for o in action.option_strings if o.startswith("--")]
    # KServe's server flags (--workers, --model_name) are read by the translation, not near misses.
    theirs = [f for f in parsed.flags if f.key not in kserve.BY_KEY]
    for typed, meant in vargs.launcher_near_misses(theirs, own):
        raise InvalidInput(f"{typed} is not a flag; did you mean {meant}? (the launcher's own flag)")
    if parsed.positionals:
        raise InvalidInput(
            f"unexpected argument {parsed.positionals[0]!r}: the model comes from --model_dir or "
            "--model-uri, and every other argument must be a flag"
        )
    return ns, parsed


def _env_flags(env: RuntimeEnv) -> list[vargs.Flag]:
    given = {
        "TENSOR_PARALLEL_SIZE": env.tensor_parallel_size,
        "PIPELINE_PARALLEL_SIZE": env.pipeline_parallel_size,
    }
    flags = [vargs.flag(ENV_FLAGS[name], v) for name, v in given.items() if v]
    if env.model_name:
        # KServe's multi-node controller sets MODEL_NAME; its runtime's --model_name arg wins over it.
        flags.append(vargs.flag("--served-model-name", env.model_name))
    return flags


def _merged(
    parsed: vargs.Parsed, env: RuntimeEnv, notes: list[str]
) -> tuple[list[vargs.Flag], kserve.Translated, tuple[vargs.Flag, ...]]:
    """The flags for vLLM, lowest first: the launcher's defaults, the environment, the command line
    (KServe's names translated); checked, and ``--task`` as the image's vLLM reads it. Returns the
    environment's flags, the translation and the merge."""
    for typed, meant in vargs.near_misses(parsed.flags):
        notes.append(
            f"{typed} is not a flag the launcher reads (did you mean {meant}?); passed to vLLM as given"
        )
    env_flags = _env_flags(env)
    translated = kserve.translate(parsed.flags)
    notes.extend(translated.notes)
    merged = vargs.merge(DEFAULTS, env_flags, translated.flags)
    check_values(merged)
    merged, task_notes = vllm_task(merged)
    notes.extend(task_notes)
    return env_flags, translated, merged


def _with_dtype(
    merged: tuple[vargs.Flag, ...],
    gpu_model: str | None,
    config: Mapping[str, Any],
    kserve_way: bool,
    notes: list[str],
) -> tuple[vargs.Flag, ...]:
    """The flags with the dtype this GPU serves (:func:`served_dtype`), after refusing a dtype or
    quantization it cannot run (:func:`check_hardware`)."""
    asked = vargs.value(merged, "--dtype")
    notes.extend(check_hardware(gpu_model, asked, vargs.value(merged, "--quantization")))
    dtype, note = served_dtype(gpu_model, asked, config, kserve_way=kserve_way)
    if dtype is None or note is None:
        return merged
    notes.append(note)
    return vargs.merge(merged, [vargs.flag("--dtype", dtype)])


def _checked_tokenizer(
    ns: argparse.Namespace, merged: tuple[vargs.Flag, ...], model_dir: Path, env: RuntimeEnv, notes: list[str]
) -> tuple[vargs.Flag, ...]:
    """``--tokenizer`` as vLLM will find it offline (see :func:`check_tokenizer`)."""
    tokenizer = None if vargs.switch(merged, "--skip-tokenizer-init") else vargs.value(merged, "--tokenizer")
    if tokenizer is None:
        return merged
    cache_root = Path(ns.cache_dir) if ns.cache_dir else None
    if cache_root is None and (beside := CacheLayout.of_model_dir(model_dir)) is not None:
        cache_root = beside[0].root
    folder, tokenizer_note = check_tokenizer(tokenizer, cache_dir=cache_root, hub_cache=env.hf_hub_cache)
    if tokenizer_note:
        notes.append(tokenizer_note)
    return vargs.merge(merged, [vargs.flag("--tokenizer", folder)]) if folder != tokenizer else merged


def _checked_model(
    ns: argparse.Namespace, merged: tuple[vargs.Flag, ...], model_dir: Path
) -> PreflightReport:
    if ns.verify and ns.model_uri and not ns.manifest and manifest_path(model_dir) is None:
        # In --cache-dir mode a folder without the agent's manifest was not published by it (or its
        # manifest was removed): nothing to verify against, so it is not served as verified.
        raise InvalidInput(
            f"--verify: {model_dir} has no manifest in {ns.cache_dir}/.modelcache/manifests, so it is "
            f"not a verified publish; see `modelcache status --cache-dir {ns.cache_dir}`"
        )
    # The merged, last-wins value: `--skip-tokenizer-init --no-skip-tokenizer-init` is not skipped.
    skip_tokenizer = vargs.switch(merged, "--skip-tokenizer-init")
    return preflight(
        model_dir,
        verify=ns.verify,
        manifest=Path(ns.manifest) if ns.manifest else None,
        tokenizer_given=skip_tokenizer or vargs.value(merged, "--tokenizer") is not None,
    )


@dataclass(frozen=True)
class _Asked:
    """The parallelism asked for, with where each number came from (for messages)."""

    tp: int | None
    pp: int | None
    dp: int | None
    nodes: int | None
    gpus: int | None  # --gpus-per-node or REQUEST_GPU_COUNT
    sources: Mapping[str, str]


def _asked(
    ns: argparse.Namespace,
    parsed: vargs.Parsed,
    env_flags: Sequence[vargs.Flag],
    merged: Sequence[vargs.Flag],
    env: RuntimeEnv,
) -> _Asked:
    sources = {}
    for name, key in ENV_FLAGS.items():
        field_name = key[2:].replace("-", "_")
        in_cli = vargs.find(parsed.flags, key) is not None
        sources[field_name] = key if in_cli or vargs.find(env_flags, key) is None else name
    tp = _int_flag(merged, "--tensor-parallel-size", sources["tensor_parallel_size"])
    pp = _int_flag(merged, "--pipeline-parallel-size", sources["pipeline_parallel_size"])
    dp = _int_flag(merged, "--data-parallel-size", "--data-parallel-size")
    nodes = ns.nodes
    if (
        nodes is None
        and (ray_nodes := env_count(env.ray_node_count, "RAY_NODE_COUNT", MAX_NODES)) is not None
    ):
        nodes = ray_nodes
        sources["nodes"] = "RAY_NODE_COUNT"
    if ns.worker and nodes is not None and nodes <= 1:
        raise InvalidInput(
            f"--worker with {sources.get('nodes', '--nodes')}={nodes}: a one-node plan has no Ray head to "
            "join; drop --worker, or deploy the multi-node runtime (RAY_NODE_COUNT ≥ 2)"
        )
    gpus = ns.gpus_per_node
    if gpus is None:
        gpus = env_count(env.request_gpu_count, "REQUEST_GPU_COUNT", MAX_GPUS_PER_NODE)
        if gpus is not None:
            sources["gpus_per_node"] = "REQUEST_GPU_COUNT"
    return _Asked(tp, pp, dp, nodes, gpus, sources)


def _generative_flags(
    merged: tuple[vargs.Flag, ...], shape: ModelShape, task: str | None, notes: list[str]
) -> tuple[vargs.Flag, ...]:
    """The flags of a model vLLM generates with: no transformers backend, no KServe task name, no
    encoder server's flags."""
    backend = vargs.value(merged, "--backend")
    if backend is not None and normalise_backend(backend) == "huggingface":
        arch = ", ".join(shape.architectures) or "a model without architectures in config.json"
        raise InvalidInput(
            f"--backend {backend}: {arch} is a generative model, which this runtime serves with vLLM only "
            "(it has no transformers backend for generation); drop --backend, or serve it with KServe's "
            "own huggingfaceserver image (the kserve-huggingfaceserver runtime)"
        )
    if task is not None and kserve_task(task) is not None:
        # KServe's task names mean nothing to vLLM, which would refuse them.
        notes.append(f"--task {task}: KServe's task name, not passed to vLLM")
        merged = vargs.without(merged, "--task")
    merged, dropped = kserve.without_encoder(merged)
    if dropped is not None:
        notes.append(dropped)
    return merged


def _launch_env(
    model_dir: Path, env: RuntimeEnv, translated: Mapping[str, str], notes: list[str]
) -> dict[str, str]:
    """What is added to vLLM's environment: offline, the translation's, the compile cache beside the
    weights (when writable and not set), and the pod's address."""
    added: dict[str, str] = {**OFFLINE_ENV, **translated}
    if env.vllm_cache_root:
        notes.append(f"VLLM_CACHE_ROOT={env.vllm_cache_root} kept from the environment")
    else:
        cache = compile_cache_dir(model_dir)
        if writable(cache):
            added["VLLM_CACHE_ROOT"] = str(cache)
        else:
            notes.append(f"compile cache not kept beside the weights: {cache} is not writable")
    if env.pod_ip:
        # On hosts with several addresses vLLM may pick one the other ranks cannot reach (#7815).
        added["VLLM_HOST_IP"] = env.pod_ip
    return added


def build(
    argv: Sequence[str],
    env: Mapping[str, str],
    *,
    gpus: GpuDetector = detect_gpus,
    vllm_here: Callable[[], bool] = vllm_installed,
) -> Launch:
    """Parse, preflight and plan; pure apart from reading the model folder and asking for GPUs.
    ``env`` is parsed once (:class:`RuntimeEnv`); only the GPU probe gets it whole (nvidia-smi's PATH
    and CUDA_VISIBLE_DEVICES)."""
    renv = RuntimeEnv.of(env)
    ns, parsed = _parse(argv)
    model_dir, notes = resolve_model(ns, parsed.flags, renv)
    secrets = vargs.secret_values(parsed.flags)
    env_flags, translated, merged = _merged(parsed, renv, notes)
    report = _checked_model(ns, merged, model_dir)
    notes.extend(report.notes)
    merged = _checked_tokenizer(ns, merged, model_dir, renv, notes)
    shape = ModelShape.from_config(report.config)
    asked = _asked(ns, parsed, env_flags, merged, renv)
    sources, tp, pp, nodes, explicit = asked.sources, asked.tp, asked.pp, asked.nodes, asked.gpus
    found = gpus(env)
    task = vargs.value(merged, "--task")
    if (encoder := encoder_task(shape.architectures, task)) is not None:
        return classifier_launch(
            ns,
            merged,
            model_dir=model_dir,
            report=report,
            shape=shape,
            env=renv,
            tp=tp,
            pp=pp,
            nodes=nodes,
            found=found,
            explicit_gpus=explicit,
            vllm_here=vllm_here(),
            notes=notes,
            task=encoder,
            secrets=secrets,
        )
    merged = _generative_flags(merged, shape, task, notes)
    source = sources.get("gpus_per_node", "--gpus-per-node")
    count = gpus_per_node(explicit, source, found, dry_run=ns.dry_run, tp=tp, dp=asked.dp)
    notes.extend(count.notes)
    plan = make_plan(
        shape,
        PlanRequest(
            gpus_per_node=count.per_node,
            gpus_per_node_explicit=explicit is not None,
            nodes=nodes,
            tensor_parallel_size=tp,
            pipeline_parallel_size=pp,
            gpu_models=found or (),
            sources=sources,
            uneven_nodes=uneven_nodes(nodes, explicit, tp, pp, sources),
            data_parallel_size=asked.dp,
        ),
    )
    if ns.worker and plan.nodes == 1:
        raise InvalidInput(
            f"--worker: the plan is one node (TP {plan.tensor_parallel_size} x PP "
            f"{plan.pipeline_parallel_size}), so there is no Ray head to join; drop --worker"
        )
    notes.extend(plan.notes)
    kserve_way = bool(ns.model_dir or ns.model_id or renv.model_dir or renv.model_id)
    merged = _with_dtype(merged, found[0] if found else None, report.config, kserve_way, notes)
    executor = choose_executor(plan, vargs.value(merged, "--distributed-executor-backend"))
    plan = executor.plan
    notes.extend(executor.notes)
    decided = [
        vargs.flag("--tensor-parallel-size", plan.tensor_parallel_size),
        vargs.flag("--pipeline-parallel-size", plan.pipeline_parallel_size),
    ]
    if executor.pass_flag:
        decided.append(vargs.flag("--distributed-executor-backend", plan.executor))
    added = _launch_env(model_dir, renv, translated.env, notes)
    final = vargs.merge(merged, decided)
    return _launch(ns, plan, nodes, model_dir, renv, final, added, notes, report, secrets)


def _launch(
    ns: argparse.Namespace,
    plan: Plan,
    nodes: int | None,
    model_dir: Path,
    env: RuntimeEnv,
    final: Sequence[vargs.Flag],
    added: Mapping[str, str],
    notes: Sequence[str],
    report: PreflightReport,
    secrets: tuple[str, ...],
) -> Launch:
    """This pod's role in the plan (one node, Ray head or worker) and the command it runs."""
    role = "worker" if ns.worker else ("head" if plan.nodes > 1 else "single")
    ray_start: list[str] = []
    address = None
    if role == "worker":
        address = head_address(env.head_svc)
        command = worker_start_command(address, env.pod_ip, plan.gpus_per_node)
    else:
        command = [*env.vllm, "serve", str(model_dir), *vargs.to_argv(final)]
        if role == "head":
            if nodes is None and not ns.dry_run:
                raise InvalidInput(
                    f"the plan needs {plan.nodes} nodes (TP {plan.tensor_parallel_size} x PP "
                    f"{plan.pipeline_parallel_size}) but no node count was given: deploy the multi-node "
                    f"runtime (RAY_NODE_COUNT={plan.nodes}) or pass --nodes {plan.nodes} on the head"
                )
            ray_start = head_start_command(env.pod_ip, plan.gpus_per_node)
    return Launch(
        plan=plan,
        model_dir=model_dir,
        role=role,
        command=tuple(command),
        env=added,
        notes=tuple(notes),
        dry_run=ns.dry_run,
        ray_start=tuple(ray_start),
        ray_address=address,
        ray_timeout=ns.ray_timeout,
        preflight=report,
        secrets=secrets,
    )


def _log(message: str) -> None:
    sys.stderr.write(f"modelcache serve: {message}\n")
    sys.stderr.flush()


def _exec(command: Sequence[str], env: Mapping[str, str]) -> NoReturn:
    full_env = {**os.environ, **env}
    try:
        os.execvpe(command[0], list(command), full_env)  # noqa: S606 - argv, never a shell line
    except FileNotFoundError:
        raise ModelcacheError(
            f"{command[0]} is not on PATH: install the runtime's extra (pip install 'modelcache[runtime]') "
            "or set MODELCACHE_VLLM to the command that runs vLLM"
        ) from None


def execute(launch: Launch, *, runner: Runner = run_command) -> NoReturn:
    """Start what was planned. Signals reach vLLM (or the raylet) directly: this process becomes it."""
    p = launch.plan
    report = launch.preflight
    if report is not None:
        _log(
            f"preflight: {report.files_checked} files, {report.bytes_checked / 1e9:.1f} GB, "
            f"{'manifest ' + str(report.manifest) if report.manifest else 'no manifest'}"
            f"{f', {report.hashed} hashed' if report.hashed else ''}"
        )
    _log(
        f"TP {p.tensor_parallel_size} x PP {p.pipeline_parallel_size}"
        + (f" x DP {p.data_parallel_size}" if p.data_parallel_size > 1 else "")
        + f" on {plural(p.nodes, 'node')} x {plural(p.gpus_per_node, 'GPU')}, executor {p.executor}, "
        f"role {launch.role}"
    )
    for note in launch.notes:
        _log(launch.redact(f"note: {note}"))
    if launch.role == "worker":
        assert launch.ray_address is not None
        tries = wait_for_head(launch.ray_address, timeout=launch.ray_timeout, runner=runner)
        _log(f"Ray head at {launch.ray_address} answered after {tries} tries")
    elif launch.role == "head":
        _log(f"starting the Ray head: {shlex.join(launch.ray_start)}")
        started = runner(launch.ray_start, 120.0)
        if started.returncode != 0:
            detail = (started.stderr or started.stdout).strip().splitlines()
            raise ModelcacheError(
                f"`ray start --head` failed (exit {started.returncode}{'; ' + detail[-1] if detail else ''})"
            )
        seen = wait_for_gpus(p.world_size, timeout=launch.ray_timeout, runner=runner)
        _log(f"Ray reports {seen.describe()}; need {p.world_size}")
    # The log line names secrets by flag only; the argv exec'd keeps them.
    env_text = " ".join(f"{k}={shlex.quote(v)}" for k, v in vargs.redact_env(launch.env).items())
    _log(launch.redact(f"exec: {env_text} {shlex.join(vargs.redact_argv(launch.command))}"))
    _exec(launch.command, launch.env)


def main(argv: Sequence[str]) -> int:
    launch = build(argv, os.environ)
    if launch.dry_run:
        sys.stdout.write(json.dumps(launch.to_json(), indent=2) + "\n")
        return 0
    execute(launch)
