"""The parallelism plan: how many GPUs, nodes, tensor and pipeline stages. Pure: no I/O.

The rules, each from a failure KServe's users hit (the KServe and vLLM issues named; docs/runtime.md):
- TP and PP default to what the GPUs given allow; PP = 1 is valid (KServe once refused it, #4228).
  When a GPU count is set and the heads do not divide by it, the GPUs are filled with pipeline
  stages (52 heads on 8 GPUs: TP 4 x PP 2, vLLM #2652) rather than the pod refused.
- A TP larger than one node's GPUs is split across nodes: TP 16 on nodes of 8 GPUs is TP 8 x PP 2,
  the total kept (KServe asked one pod for 16 GPUs, #4226). TP across nodes would send every layer's
  all-reduce over the network (vLLM #29447).
- A GPU count set explicitly (REQUEST_GPU_COUNT, --gpus-per-node) wins over a derived one, and must
  then be used whole: TP x PP has to equal it.
- Heads must divide by TP (and KV heads, or TP by them), PP stages cannot outnumber layers, and every
  GPU must be the same model (vLLM #13760). A plan that breaks one is refused naming what was asked
  (as typed), the numbers, and one that works.
- KServe's head and workers may hold different GPU counts (REQUEST_GPU_COUNT per pod): TP x PP is then
  the cluster's total and is kept, TP lowered to fit a pod where it can (``_plan_uneven``).

Every adjustment is written to ``notes`` so ``--dry-run`` says what was decided and why.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from localmodel.errors import InvalidInput

Executor = Literal["mp", "ray"]

# Encoder-only families: vLLM serves them without pipeline parallelism (no SupportsPP).
_NO_PP_PREFIXES = ("Bert", "Roberta", "XLMRoberta", "DistilBert", "Electra", "DebertaV2", "ModernBert")


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs from a model's config.json; None where the config does not say."""

    attention_heads: int | None = None
    kv_heads: int | None = None
    layers: int | None = None
    architectures: tuple[str, ...] = ()
    # A multimodal model's vision tower (config.json's vision_config): vLLM shards its attention heads
    # by the same tensor parallel size as the language model's.
    vision_heads: int | None = None

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ModelShape:
        vision = config.get("vision_config")
        vision_heads = _first_int(vision, _HEAD_KEYS) if isinstance(vision, Mapping) else None
        # Multimodal configs keep the language model's shape under text_config / llm_config.
        for nested in ("text_config", "llm_config", "language_config"):
            inner = config.get(nested)
            if isinstance(inner, Mapping) and _first_int(inner, _HEAD_KEYS) is not None:
                merged = {**inner, "architectures": config.get("architectures")}
                return replace(cls.from_config(merged), vision_heads=vision_heads)
        heads = _first_int(config, _HEAD_KEYS)
        kv = _first_int(config, ("num_key_value_heads", "num_kv_heads", "multi_query_group_num"))
        if kv is None and config.get("multi_query") is True:
            kv = 1
        archs = config.get("architectures")
        return cls(
            attention_heads=heads,
            kv_heads=kv if kv is not None else heads,
            layers=_first_int(config, ("num_hidden_layers", "n_layer", "num_layers", "n_layers")),
            architectures=tuple(a for a in archs if isinstance(a, str)) if isinstance(archs, list) else (),
            vision_heads=vision_heads,
        )


_HEAD_KEYS = ("num_attention_heads", "n_head", "num_heads", "n_heads")


def _first_int(config: Mapping[str, Any], keys: Sequence[str]) -> int | None:
    for key in keys:
        v = config.get(key)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


@dataclass(frozen=True)
class PlanRequest:
    """What was asked and what was found. ``gpus_per_node_explicit`` marks a count the user set
    (flag or REQUEST_GPU_COUNT) rather than one detected on the node."""

    gpus_per_node: int
    gpus_per_node_explicit: bool = False
    nodes: int | None = None
    tensor_parallel_size: int | None = None
    pipeline_parallel_size: int | None = None
    gpu_models: tuple[str, ...] = ()
    # Where each number came from, for messages: {"tensor_parallel_size": "TENSOR_PARALLEL_SIZE"}.
    sources: Mapping[str, str] = field(default_factory=dict)
    # KServe's multi-node runtime gives the head and the workers GPU counts of their own
    # (REQUEST_GPU_COUNT per pod, computeRayNodeAndGPUs in KServe's predictor.go): gpus_per_node is
    # then this pod's count only, and TP x PP the cluster's total.
    uneven_nodes: bool = False
    # vLLM's --data-parallel-size: replicas of TP x PP, each on its share of the node's GPUs.
    data_parallel_size: int | None = None


@dataclass(frozen=True)
class Plan:
    tensor_parallel_size: int
    pipeline_parallel_size: int
    nodes: int
    gpus_per_node: int
    executor: Executor
    notes: tuple[str, ...] = ()
    data_parallel_size: int = 1

    @property
    def world_size(self) -> int:
        """The GPUs the plan uses: TP x PP x DP."""
        return self.tensor_parallel_size * self.pipeline_parallel_size * self.data_parallel_size


# Larger counts are typing mistakes (no node holds more GPUs; NVIDIA's largest NVLink domain is 576),
# and bounding them keeps every search here to milliseconds.
MAX_GPUS_PER_NODE = 1024
MAX_NODES = 4096


def _positive(name: str, value: int | None, source: str, limit: int | None = None) -> None:
    if value is not None and value < 1:
        raise InvalidInput(f"{source}={value}: {name} must be a whole number ≥ 1")
    if value is not None and limit is not None and value > limit:
        raise InvalidInput(f"{source}={value}: {name} must be at most {limit}")


def plural(n: int, word: str) -> str:
    """``1 GPU``, ``2 GPUs``."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def _valid_tps(shape: ModelShape, limit: int) -> list[int]:
    """Tensor parallel sizes ≤ ``limit`` the model allows; from the heads' divisors when the config
    gives heads (O(√heads)), else every size up to ``limit``."""
    pool = _divisors(shape.attention_heads) if shape.attention_heads is not None else range(1, limit + 1)
    return [t for t in pool if t <= limit and _tp_problem(shape, t) is None]


def _tp_problem(shape: ModelShape, tp: int) -> str | None:
    if shape.attention_heads is not None and shape.attention_heads % tp:
        return f"{shape.attention_heads} attention heads are not divisible by tensor parallel size {tp}"
    kv = shape.kv_heads
    if kv is not None and kv % tp and tp % kv:
        return (
            f"{kv} KV heads and tensor parallel size {tp}: neither divides the other "
            "(vLLM shards or replicates KV heads only then)"
        )
    if shape.vision_heads is not None and shape.vision_heads % tp:
        return (
            f"the vision tower's {shape.vision_heads} attention heads are not divisible by tensor "
            f"parallel size {tp} (vLLM shards them too)"
        )
    return None


def make_plan(shape: ModelShape, req: PlanRequest) -> Plan:
    """Decide TP, PP, nodes and executor, or raise InvalidInput naming the numbers and a fix."""
    src = _sources(req)
    if req.data_parallel_size is not None and req.data_parallel_size > 1:
        return _plan_data_parallel(shape, req, src, req.data_parallel_size)
    _one_gpu_model(req)
    g = req.gpus_per_node
    tp, pp, nodes = req.tensor_parallel_size, req.pipeline_parallel_size, req.nodes
    if req.uneven_nodes and tp is not None and pp is not None and nodes is not None and nodes > 1:
        return _plan_uneven(shape, req, src, tp, pp, nodes)
    notes: list[str] = []
    tp, pp = _split(shape, req, src, notes)
    world = tp * pp
    if nodes is None:
        nodes = max(1, math.ceil(world / g))
        if nodes > 1:
            notes.append(f"{nodes} nodes: TP {tp} x PP {pp} = {world} GPUs at {g} per node")
    _check_split(shape, req, src, tp, pp)
    _check_fit(shape, req, src, tp, pp, nodes, notes)
    executor: Executor = "ray" if nodes > 1 else "mp"
    return Plan(tp, pp, nodes, g, executor, tuple(notes))


def _sources(req: PlanRequest) -> dict[str, str]:
    """Where each number came from, for messages (flags unless ``req.sources`` names another);
    InvalidInput for a count below 1 or over its bound."""
    src = {
        "tensor_parallel_size": "--tensor-parallel-size",
        "pipeline_parallel_size": "--pipeline-parallel-size",
        "nodes": "--nodes",
        "gpus_per_node": "--gpus-per-node",
        **req.sources,
    }
    src.setdefault("data_parallel_size", "--data-parallel-size")
    _positive("the GPU count per node", req.gpus_per_node, src["gpus_per_node"], MAX_GPUS_PER_NODE)
    _positive("the node count", req.nodes, src["nodes"], MAX_NODES)
    limit = MAX_GPUS_PER_NODE * MAX_NODES
    _positive("the tensor parallel size", req.tensor_parallel_size, src["tensor_parallel_size"], limit)
    _positive("the pipeline parallel size", req.pipeline_parallel_size, src["pipeline_parallel_size"], limit)
    _positive("the data parallel size", req.data_parallel_size, src["data_parallel_size"], limit)
    return src


def _one_gpu_model(req: PlanRequest) -> None:
    models = sorted(set(req.gpu_models))
    if len(models) > 1:
        counts = ", ".join(f"{req.gpu_models.count(m)}x {m}" for m in models)
        raise InvalidInput(
            f"GPUs of different models ({counts}): vLLM needs one GPU model for every rank; "
            "schedule onto nodes of a single GPU type (a nodeSelector on the GPU product label)"
        )


def _split(shape: ModelShape, req: PlanRequest, src: Mapping[str, str], notes: list[str]) -> tuple[int, int]:
    """TP and PP: as asked, completed to what the GPUs allow (module docstring's rules)."""
    g = req.gpus_per_node
    tp, pp, nodes = req.tensor_parallel_size, req.pipeline_parallel_size, req.nodes
    explicit_fill = req.gpus_per_node_explicit and tp is None and pp is None
    if explicit_fill and (fill := _fill(shape, g, nodes or 1)) is not None:
        # A GPU count set, no split asked: every GPU is used, with pipeline stages where the heads
        # do not divide by the GPUs per node (52 heads on 8 GPUs: TP 4 x PP 2, vLLM #2652) rather
        # than a refusal. (A detected count may be left partly idle instead, with a note.)
        tp, pp = fill
        if tp == g:
            notes.append(f"tensor parallel size {tp}: the GPUs per node (--tensor-parallel-size not given)")
        else:
            notes.append(
                f"TP {tp} x PP {pp}: the model's heads ({_heads(shape)}) do not divide by {g} GPUs per "
                f"node, so the largest tensor parallel size that does ({tp}) is filled up with "
                f"{pp} pipeline stages"
            )
    if tp is None:
        tp = _derived_tp(shape, req, src, pp, notes)
    elif tp > g:
        if tp % g:
            raise InvalidInput(
                f"{src['tensor_parallel_size']}={tp} is more than the {plural(g, 'GPU')} of one node and "
                f"not a multiple of them, so it cannot be split into whole nodes; use {_multiples(g, tp)}"
            )
        factor = tp // g
        old_pp = pp or 1
        notes.append(
            f"tensor parallel size {tp} is more than the {plural(g, 'GPU')} of one node: split into "
            f"TP {g} x PP {old_pp * factor} ({tp * old_pp} GPUs kept), so tensor-parallel traffic "
            "stays inside a node"
        )
        tp, pp = g, old_pp * factor

    if pp is None:
        pp = nodes if nodes is not None and nodes > 1 else 1
        if pp > 1:
            notes.append(f"pipeline parallel size {pp}: one stage per node")
    return tp, pp


def _derived_tp(
    shape: ModelShape, req: PlanRequest, src: Mapping[str, str], pp: int | None, notes: list[str]
) -> int:
    """TP where none was asked: the largest that fits the GPUs each pipeline stage gets on a node
    and divides the model's heads (1 when none does); the reason in ``notes``."""
    g, nodes = req.gpus_per_node, req.nodes
    if pp is None:
        per_node = g
    elif nodes is not None:
        if pp < nodes:
            raise InvalidInput(
                f"{src['pipeline_parallel_size']}={pp} across {src['nodes']}={nodes} nodes leaves "
                f"nodes without a stage; set the pipeline parallel size to {nodes}"
            )
        # Several stages share a node: each gets its share of the node's GPUs.
        per_node = max(1, g // math.ceil(pp / nodes))
    else:
        # No node count given: keep the stages on this node when they fit.
        per_node = max(1, g // pp) if pp <= g else g
    valid = _valid_tps(shape, per_node)
    tp = max(valid) if valid else 1
    if tp == per_node == g:
        notes.append(f"tensor parallel size {tp}: the GPUs per node (not given)")
    elif tp == per_node:
        notes.append(f"tensor parallel size {tp}: {g} GPUs per node shared by the pipeline stages")
    else:
        notes.append(
            f"tensor parallel size {tp}: the largest that fits {plural(per_node, 'GPU')} per stage and "
            f"divides the model's heads ({_heads(shape)})"
        )
    return tp


def _check_split(shape: ModelShape, req: PlanRequest, src: Mapping[str, str], tp: int, pp: int) -> None:
    """InvalidInput when the model's heads, layers or architecture do not allow TP x PP."""
    g = req.gpus_per_node
    problem = _tp_problem(shape, tp)
    if problem is not None:
        valid = _valid_tps(shape, g)
        hint = f"use a tensor parallel size of {_or_list(valid)}" if valid else "use TP 1"
        if req.tensor_parallel_size is not None and req.tensor_parallel_size != tp:
            asked = (
                f"{src['tensor_parallel_size']}={req.tensor_parallel_size} (TP {tp} x PP {pp} across nodes)"
            )
            raise InvalidInput(f"{asked}: {problem}; {hint}")
        raise InvalidInput(f"{problem}; {hint}")
    if shape.layers is not None and pp > shape.layers:
        raise InvalidInput(
            f"pipeline parallel size {pp} is more than the model's {plural(shape.layers, 'layer')}; "
            f"use a pipeline parallel size ≤ {shape.layers}"
        )
    if pp > 1:
        arch = next((a for a in shape.architectures if a.startswith(_NO_PP_PREFIXES)), None)
        if arch is not None:
            raise InvalidInput(
                f"{arch} cannot be split into pipeline stages in vLLM (pipeline parallel size {pp}); "
                "use a pipeline parallel size of 1"
            )


def _check_fit(
    shape: ModelShape,
    req: PlanRequest,
    src: Mapping[str, str],
    tp: int,
    pp: int,
    nodes: int,
    notes: list[str],
) -> None:
    """InvalidInput when TP x PP needs more GPUs than the nodes hold, or leaves GPUs idle that were
    asked for explicitly or whole nodes unused; a note when a detected count is partly idle."""
    g = req.gpus_per_node
    world = tp * pp
    total = nodes * g
    where = f"{plural(nodes, 'node')} x {plural(g, 'GPU')} = {total}"
    if req.nodes is not None:  # the count as the user gave it (a flag or RAY_NODE_COUNT)
        where = f"{src['nodes']}={nodes} x {plural(g, 'GPU')} = {total}"
    asked = _asked(req, src, tp, pp)
    if world > total:
        need_nodes = math.ceil(world / g)
        raise InvalidInput(
            f"{asked} needs {plural(world, 'GPU')}, but {where}; use {src['nodes']}={need_nodes} "
            f"or {_fits(shape, g, nodes)}"
        )
    if world < total:
        if req.gpus_per_node_explicit:
            if req.tensor_parallel_size is None and req.pipeline_parallel_size is None:
                raise InvalidInput(
                    f"{src['gpus_per_node']}={g} asks for {where}, but no split of this model uses "
                    f"them all ({_limits(shape)}); use {_smaller(shape, g, nodes, src)}"
                )
            raise InvalidInput(
                f"{asked} uses {plural(world, 'GPU')}, but {src['gpus_per_node']}={g} asks for {where}, "
                f"which would leave GPUs idle; use {_fits(shape, g, nodes)}"
                + (f", or {src['gpus_per_node']}={world // nodes}" if world % nodes == 0 else "")
            )
        if nodes > 1 and world <= (nodes - 1) * g:
            raise InvalidInput(
                f"TP {tp} x PP {pp} = {plural(world, 'GPU')} fits on fewer than the {nodes} nodes given "
                f"({plural(g, 'GPU')} each); use {src['nodes']}={math.ceil(world / g)} or "
                f"{_fits(shape, g, nodes)}"
            )
        notes.append(f"uses {world} of the {plural(total, 'GPU')} available ({where})")


def _plan_data_parallel(shape: ModelShape, req: PlanRequest, src: Mapping[str, str], dp: int) -> Plan:
    """``dp`` replicas of one TP x PP on one node, each on ``gpus_per_node / dp`` GPUs (vLLM's
    ``--data-parallel-size``: world size TP x PP x DP). Across nodes vLLM needs a DP master address
    and per-node ranks the launcher does not set up: refused, naming the way that works."""
    g = req.gpus_per_node
    asked = f"{src['data_parallel_size']}={dp}"
    if (req.nodes or 1) > 1:
        raise InvalidInput(
            f"{asked} across {plural(req.nodes or 1, 'node')}: the launcher plans data parallelism on one "
            "node; serve one replica per node (InferenceService replicas) instead"
        )
    if g % dp:
        raise InvalidInput(
            f"{asked}: {plural(g, 'GPU')} cannot be shared equally by {dp} replicas; use a data parallel "
            f"size that divides {g} ({_or_list(_divisors(g))})"
        )
    share = g // dp
    one = replace(req, gpus_per_node=share, nodes=1, data_parallel_size=None)
    try:
        replica = make_plan(shape, one)
    except InvalidInput as e:
        raise InvalidInput(f"{asked} leaves {plural(share, 'GPU')} per replica: {e}") from None
    notes = (
        *replica.notes,
        f"data parallel size {dp}: {dp} replicas of TP {replica.tensor_parallel_size} x PP "
        f"{replica.pipeline_parallel_size} ({plural(share, 'GPU')} each, {g} in all)",
    )
    return Plan(
        replica.tensor_parallel_size, replica.pipeline_parallel_size, 1, g, "mp", notes, data_parallel_size=dp
    )


def kserve_worker_gpus(world: int, head: int, nodes: int) -> list[int]:
    """The GPU counts a worker may hold when KServe's multi-node controller made ``nodes`` pods for
    ``world`` = TP x PP GPUs with ``head`` on the head pod (computeRayNodeAndGPUs in
    pkg/controller/v1beta1/inferenceservice/components/predictor.go, kserve/kserve master):

    - workerSpec's GPUs ``W`` set: ``nodes = ceil(world / W)``, every worker holds ``W`` and the head
      ``world - W x (nodes - 1)``, or its own request when set (then ``head + W x (nodes - 1) ≥ world``);
    - only the head's set: single-GPU workers, ``nodes = world - head + 1``.

    The derived count when the head's is exactly the remainder; else every ``W`` the head's own request
    allows, smallest first; empty when KServe would make no such cluster."""
    rest = world - head
    if rest > 0 and rest % (nodes - 1) == 0:
        # The head's count derived (the remainder), or single-GPU workers: what KServe does unless the
        # head has a request of its own that differs, so this one is taken.
        return [rest // (nodes - 1)]
    found = set()
    # ceil(world / w) == nodes exactly for w in [ceil(world / nodes), (world - 1) // (nodes - 1)].
    low, high = -(-world // nodes), min((world - 1) // (nodes - 1), MAX_GPUS_PER_NODE)
    for w in range(low, high + 1):
        if head + w * (nodes - 1) >= world:
            found.add(w)  # the head's own request kept
    return sorted(found)


def _plan_uneven(
    shape: ModelShape, req: PlanRequest, src: Mapping[str, str], tp: int, pp: int, nodes: int
) -> Plan:
    """KServe's head and workers with different GPU counts: TP x PP GPUs in all over ``nodes`` pods.

    The workers' count ``W`` is what KServe's computeRayNodeAndGPUs allows (:func:`kserve_worker_gpus`;
    every one it allows when several do). vLLM's Ray executor places ranks in node order, and a
    tensor-parallel group that does not fit one node's GPUs runs over the network (vLLM #29447), so TP
    is lowered to the largest size the model allows that divides TP, this pod's GPUs and every ``W``,
    and the stages multiplied so the total stays. Refused: a cluster KServe would not make, and what
    vLLM cannot run (heads or KV heads against TP, more stages than layers, pipeline stages of a model
    without them)."""
    g = req.gpus_per_node
    world = tp * pp
    notes: list[str] = []
    workers = kserve_worker_gpus(world, g, nodes)
    if not workers:
        raise InvalidInput(
            f"{src['nodes']}={nodes} with {src['gpus_per_node']}={g} on this pod and TP {tp} x PP {pp} = "
            f"{world} GPUs: KServe makes no such cluster (the workers would hold no whole number of GPUs); "
            f"check the workerSpec's GPUs, TENSOR_PARALLEL_SIZE and PIPELINE_PARALLEL_SIZE"
        )
    bound = math.gcd(tp, g, *workers)
    fit = tp if bound == tp else max(t for t in _divisors(bound) if _tp_problem(shape, t) is None or t == 1)
    if fit < tp:
        against = [f"this pod's {g}"] if g % tp else []
        odd = [w for w in workers if w % tp]
        if odd:
            against.append(f"the workers' {' or '.join(map(str, odd))} GPU{'s' if max(odd) > 1 else ''} each")
        why = f"{tp} does not divide {' nor '.join(against)}" if against else _tp_problem(shape, tp)
        notes.append(
            f"TP {tp} x PP {pp} run as TP {fit} x PP {world // fit}: {why}, so each tensor-parallel "
            "group is kept inside a node"
        )
        tp, pp = fit, world // fit
    notes.append(
        f"{world} GPUs over {nodes} nodes whose GPU counts differ ({src['gpus_per_node']}={g} on this "
        f"pod, {' or '.join(map(str, workers))} on each worker, as KServe allots them): the head waits "
        f"until Ray reports all {world}"
    )
    problem = _tp_problem(shape, tp)
    if problem is not None:
        valid = _valid_tps(shape, tp)
        raise InvalidInput(
            f"{src['tensor_parallel_size']}={req.tensor_parallel_size}: {problem}; use a tensor parallel "
            f"size of {_or_list(valid) if valid else 1}"
        )
    if shape.layers is not None and pp > shape.layers:
        raise InvalidInput(
            f"pipeline parallel size {pp} is more than the model's {plural(shape.layers, 'layer')}; "
            f"use a pipeline parallel size ≤ {shape.layers}"
        )
    arch = next((a for a in shape.architectures if a.startswith(_NO_PP_PREFIXES)), None)
    if arch is not None and pp > 1:
        raise InvalidInput(
            f"{arch} cannot be split into pipeline stages in vLLM (pipeline parallel size {pp} over "
            f"{nodes} nodes); serve it on one node"
        )
    return Plan(tp, pp, nodes, g, "ray", tuple(notes))


def _fill(shape: ModelShape, g: int, nodes: int) -> tuple[int, int] | None:
    """The TP x PP that uses all ``nodes * g`` GPUs with the largest TP (at most ``g``, a divisor of
    it, one the heads allow), PP no more than the layers and 1 for models vLLM cannot pipeline."""
    for tp in sorted(_valid_tps(shape, g), reverse=True):
        if g % tp:
            continue
        pp = nodes * g // tp
        if shape.layers is not None and pp > shape.layers:
            continue
        if pp > 1 and any(a.startswith(_NO_PP_PREFIXES) for a in shape.architectures):
            continue
        return tp, pp
    return None


def _asked(req: PlanRequest, src: Mapping[str, str], tp: int, pp: int) -> str:
    """The parallelism as the user wrote it (``--tensor-parallel-size=16``), else as derived."""
    typed = [
        f"{src[name]}={value}"
        for name, value in (
            ("tensor_parallel_size", req.tensor_parallel_size),
            ("pipeline_parallel_size", req.pipeline_parallel_size),
        )
        if value is not None
    ]
    derived = f"TP {tp} x PP {pp}"
    if not typed:
        return derived
    same = req.tensor_parallel_size in (None, tp) and req.pipeline_parallel_size in (None, pp)
    return " ".join(typed) + ("" if same else f" (run as {derived})")


def _limits(shape: ModelShape) -> str:
    parts = []
    if shape.attention_heads is not None:
        parts.append(f"{_heads(shape)} allow TP {_or_list(_valid_tps(shape, shape.attention_heads))}")
    if shape.layers is not None:
        parts.append(
            f"{plural(shape.layers, 'layer')} allow{'s' if shape.layers == 1 else ''} at most "
            f"{plural(shape.layers, 'pipeline stage')}"
        )
    return "; ".join(parts) or "the model's shape"


def _smaller(shape: ModelShape, g: int, nodes: int, src: Mapping[str, str]) -> str:
    """The largest GPU count per node below ``g`` that a split uses whole."""
    # _fill is O(√heads) per count (divisors), and g is bounded by MAX_GPUS_PER_NODE.
    for count in range(g - 1, 0, -1):
        fill = _fill(shape, count, nodes)
        if fill is not None:
            return f"{src['gpus_per_node']}={count} (TP {fill[0]} x PP {fill[1]})"
    return f"{src['gpus_per_node']}=1"


def _heads(shape: ModelShape) -> str:
    if shape.attention_heads is None:
        return "unknown"
    return f"{shape.attention_heads} heads, {shape.kv_heads} KV heads"


def _or_list(values: Sequence[int]) -> str:
    items = [str(v) for v in values]
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " or " + items[-1]


def _multiples(g: int, tp: int) -> str:
    lower = (tp // g) * g
    return f"a tensor parallel size of {_or_list([v for v in (lower, lower + g) if v > 0])}"


def _fits(shape: ModelShape, g: int, nodes: int) -> str:
    """A TP x PP that uses ``nodes`` nodes of ``g`` GPUs exactly, when the model allows one."""
    valid = _valid_tps(shape, g)
    if g in valid:
        return f"TP {g} x PP {nodes}"
    if valid:
        return f"TP {max(valid)} x PP {nodes} (and fewer GPUs per node)"
    return f"TP 1 x PP {nodes}"


@dataclass(frozen=True)
class ExecutorChoice:
    """The plan with the executor vLLM is started with; ``pass_flag``: --distributed-executor-backend
    is set to ``plan.executor`` on the command line (False leaves a backend of the user's as given)."""

    plan: Plan
    pass_flag: bool
    notes: tuple[str, ...] = ()


def choose_executor(plan: Plan, asked: str | None) -> ExecutorChoice:
    """The executor: the plan's (mp on one node, ray across nodes) unless ``--distributed-executor-
    backend`` asks otherwise. Rules: across nodes only ray (the launcher brings the nodes up with Ray),
    another backend is InvalidInput; on one node mp or ray as asked, with a note; any other backend
    (vLLM's uni, external_launcher) is kept as given, with a note, and the plan's is not passed."""
    if asked is None or asked == plan.executor:
        return ExecutorChoice(plan, pass_flag=True)
    if plan.nodes > 1:
        raise InvalidInput(
            f"--distributed-executor-backend {asked} across {plan.nodes} nodes: the launcher "
            "brings the nodes up with Ray; drop the flag or use ray"
        )
    if asked in ("mp", "ray"):
        executor: Executor = "mp" if asked == "mp" else "ray"
        return ExecutorChoice(
            replace(plan, executor=executor),
            pass_flag=True,
            notes=(f"executor {asked}: as --distributed-executor-backend asks",),
        )
    return ExecutorChoice(
        plan, pass_flag=False, notes=(f"--distributed-executor-backend {asked} kept as given",)
    )
