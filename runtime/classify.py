"""Encoder models: which engine, and what a KServe v1 or v2 predict answers. Pure: no I/O.

KServe's huggingfaceserver serves encoder models (sequence and token classification, fill-mask, text
embedding) with its v1 and v2 protocols. The answers here are KServe's, shape for shape and number for
number (``encoder_model.py`` postprocess and ``kserve/utils/utils.py`` get_predict_response, kserve/kserve
at aaac4e294dae; file:line at each function). Its gaps, closed here, opt-in:
- outputs were keyed by class index only; mapping through the model's ``id2label`` was proposed but
  never merged (KServe #5181, #5526). ``--use_id2label`` keys predictions and probabilities by the
  names in ``id2label``, falling back to the index where a class has no name;
- ``.numpy()`` on a CUDA tensor crashed (#4443): :func:`to_list` moves a tensor to the CPU before
  anything else touches it, so the same code runs on CUDA and CPU.

Everything here works on plain lists as well as on tensors (anything with ``.detach().cpu().tolist()``),
so the tests need neither torch nor transformers.

Output shapes (the precedence is KServe's: raw logits, then probabilities, then predicted classes):
- v1 ``{"predictions": [...]}``, one entry per input. Sequence classification: the class index (name
  with ``--use_id2label``); with ``--return_probabilities`` ``{class: probability}`` rounded to 4
  places; with ``--return_raw_logits`` ``{class: logit}``. Token classification: ``[[class per
  token]]``, or per token ``{class: probability}`` / ``{class: logit}``. Fill-mask: the predicted
  token's text, or per mask a list of ``{token_id: "0.1234"}`` (strings, as KServe's) / ``{token_id:
  logit}``. Embedding: the mean-pooled, L2-normalised vector.
- v2 ``{"id", "model_name", "model_version": null, "outputs": [output-0]}``: one tensor holding what v1
  holds, typed as numpy types it (INT64 indices, FP64 floats, BYTES strings, and BYTES ``str(dict)`` for
  each probability or logit map). ``--v2_tensors`` instead gives the predicted class plus FP32
  ``probabilities``/``logits`` tensors ``[N, C]`` (class keys in ``parameters.labels``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from localmodel.errors import InvalidInput

Engine = Literal["huggingface", "vllm"]
Backend = Literal["auto", "huggingface", "vllm"]
TASK = "sequence_classification"
TAGGING = "token_classification"
FILL_MASK = "fill_mask"
EMBEDDING = "text_embedding"
# The tasks KServe's transformers backend serves with its encoder model (task.py SUPPORTED_TASKS less
# the generative ones); the encoder server here serves them all.
ENCODER_TASKS = (TASK, TAGGING, FILL_MASK, EMBEDDING)
# KServe's architecture suffixes for them (task.py ARCHITECTURES_2_TASK); embedding has none: it is
# asked for with --task text_embedding.
_ARCH_TASKS = (
    ("ForTokenClassification", TAGGING),
    ("ForSequenceClassification", TASK),
    ("ForMaskedLM", FILL_MASK),
)
# KServe's other task names: a task given explicitly that is not ours means the model is not served here.
KSERVE_TASKS = frozenset(
    {
        "sequence_classification",
        "token_classification",
        "fill_mask",
        "text_generation",
        "text2text_generation",
        "text_embedding",
    }
)
SUFFIX = "ForSequenceClassification"
Label = str | int


@dataclass(frozen=True)
class OutputOptions:
    return_probabilities: bool = False
    return_raw_logits: bool = False
    use_id2label: bool = False
    v2_tensors: bool = False  # the richer v2 answer (class + FP32 probabilities/logits tensors)
    return_offsets_mapping: bool = False  # token classification's character offsets (KServe's)


@dataclass(frozen=True)
class EngineChoice:
    engine: Engine
    reason: str


def kserve_task(task: str | None) -> str | None:
    """KServe's task name in its canonical spelling (``sequence-classification`` reads as
    ``sequence_classification``), or None when ``task`` is absent or not one of KServe's (vLLM's own
    ``--task generate|embed|classify|...`` values are left to vLLM)."""
    if task is None:
        return None
    norm = task.strip().lower().replace("-", "_")
    return norm if norm in KSERVE_TASKS else None


def encoder_task(architectures: Sequence[str], task: str | None = None) -> str | None:
    """The encoder task to serve, or None for a model vLLM's OpenAI server serves. KServe's task name,
    when given, decides; else the first architecture with one of KServe's encoder suffixes
    (``*ForSequenceClassification``, ``*ForTokenClassification``, ``*ForMaskedLM``)."""
    norm = kserve_task(task)
    if norm is not None:
        return norm if norm in ENCODER_TASKS else None
    for arch in architectures:
        for suffix, name in _ARCH_TASKS:
            if arch.endswith(suffix):
                return name
    return None


def is_classifier(architectures: Sequence[str], task: str | None = None) -> bool:
    """A sequence classifier: KServe's ``--task sequence_classification``, or, when no KServe task is
    given, an architecture named ``*ForSequenceClassification``. Another KServe task given wins."""
    norm = kserve_task(task)
    if norm is not None:
        return norm == TASK
    return any(a.endswith(SUFFIX) for a in architectures)


def normalise_backend(backend: str | None) -> Backend:
    norm = (backend or "auto").strip().lower()
    if norm in ("hf", "transformers"):
        norm = "huggingface"
    if norm not in ("auto", "huggingface", "vllm"):
        raise InvalidInput(f"--backend {backend!r}: expected auto, huggingface or vllm")
    return norm  # type: ignore[return-value]


def choose_engine(
    architectures: Sequence[str],
    *,
    backend: str | None = None,
    vllm_archs: frozenset[str] | None = None,
    options: OutputOptions = OutputOptions(),
    task: str | None = None,
) -> EngineChoice:
    """vLLM's pooling runner where it serves the model, transformers otherwise; ``--backend`` forces one.

    ``vllm_archs`` are the architectures the installed vLLM registers (None: vLLM is not installed).
    vLLM's classify pooler answers probabilities, never raw logits, so ``--return_raw_logits`` needs
    transformers."""
    chosen = normalise_backend(backend)
    if task not in (None, TASK):
        if chosen == "vllm":
            raise InvalidInput(
                f"--backend vllm with --task {task}: served with transformers only (KServe's shapes: "
                "mean pooling, per-token and per-mask answers); use --backend huggingface or auto"
            )
        return EngineChoice("huggingface", f"transformers: {task} is served with transformers")
    if chosen == "huggingface":
        return EngineChoice("huggingface", "transformers: as --backend huggingface asks")
    if chosen == "vllm":
        if vllm_archs is None:
            raise InvalidInput("--backend vllm but vLLM is not installed here; use --backend huggingface")
        if options.return_raw_logits:
            raise InvalidInput(
                "--return_raw_logits with --backend vllm: vLLM's classify pooler returns probabilities only; "
                "use --backend huggingface for raw logits"
            )
        return EngineChoice("vllm", "vLLM pooling runner: as --backend vllm asks")
    if vllm_archs is None:
        return EngineChoice("huggingface", "transformers: vLLM is not installed here")
    if options.return_raw_logits:
        return EngineChoice("huggingface", "transformers: --return_raw_logits needs the logits vLLM keeps")
    served = [a for a in architectures if a in vllm_archs]
    if not served:
        names = ", ".join(architectures) or "no architecture in config.json"
        return EngineChoice("huggingface", f"transformers: vLLM does not serve {names}")
    return EngineChoice("vllm", f"vLLM pooling runner: it serves {served[0]}")


# ---------------------------------------------------------------------------------------------
# Post-processing: logits -> predictions


def to_list(values: Any) -> Any:
    """A tensor (CUDA or CPU) or array as nested Python lists, moved to the CPU first (KServe #4443
    called ``.numpy()`` on a CUDA tensor). Plain lists and tuples come back as lists."""
    if hasattr(values, "detach"):
        values = values.detach()
    if hasattr(values, "cpu"):
        values = values.cpu()
    if hasattr(values, "tolist"):
        return values.tolist()
    if isinstance(values, list | tuple):
        return [to_list(v) for v in values]
    return values


def _rows(logits: Any) -> list[list[float]]:
    data = to_list(logits)
    if not isinstance(data, list) or not data:
        raise ValueError("logits: expected one row of class scores per input")
    if not isinstance(data[0], list):
        data = [data]  # a single input's scores
    rows = [[float(x) for x in row] for row in data]
    width = len(rows[0])
    if width == 0 or any(len(r) != width for r in rows):
        raise ValueError("logits: every row must hold the same number (≥ 1) of class scores")
    return rows


def softmax(row: Sequence[float]) -> list[float]:
    """Numerically stable softmax (the largest score is subtracted first)."""
    top = max(row)
    exps = [math.exp(x - top) for x in row]
    total = sum(exps)
    return [e / total for e in exps]


def argmax(row: Sequence[float]) -> int:
    """The first index of the largest score (torch.argmax's tie rule)."""
    best = 0
    for i, x in enumerate(row):
        if x > row[best]:
            best = i
    return best


def class_labels(n: int, id2label: Mapping[Any, str] | None, use_id2label: bool) -> list[Label]:
    """The key of each class: its ``id2label`` name with ``--use_id2label`` (config.json keys are
    strings, a loaded config's are ints; both read), else, or where a class has no name, its index."""
    if not use_id2label or not id2label:
        return list(range(n))
    names: dict[int, str] = {}
    for k, v in id2label.items():
        try:
            names[int(k)] = str(v)
        except (TypeError, ValueError):
            continue
    return [names.get(i, i) for i in range(n)]


@dataclass(frozen=True)
class Classified:
    """One batch's results, in plain Python values."""

    labels: tuple[Label, ...]  # the key of each class
    predicted: tuple[int, ...]  # per input, the index of the class chosen
    probabilities: tuple[tuple[float, ...], ...]
    logits: tuple[tuple[float, ...], ...]

    @property
    def predicted_labels(self) -> list[Label]:
        return [self.labels[i] for i in self.predicted]


def classify_logits(
    logits: Any,
    id2label: Mapping[Any, str] | None = None,
    *,
    use_id2label: bool = False,
    probabilities: Any = None,
) -> Classified:
    """``probabilities``: the engine's own softmax of the logits (KServe's is torch's, in the model's
    dtype; rounding its float32 values, not a float64 softmax, gives KServe's 4 places)."""
    rows = _rows(logits)
    probs = _rows(probabilities) if probabilities is not None else [softmax(r) for r in rows]
    return Classified(
        labels=tuple(class_labels(len(rows[0]), id2label, use_id2label)),
        predicted=tuple(argmax(r) for r in rows),
        probabilities=tuple(tuple(p) for p in probs),
        logits=tuple(tuple(r) for r in rows),
    )


def classify_probabilities(
    probabilities: Any, id2label: Mapping[Any, str] | None = None, *, use_id2label: bool = False
) -> Classified:
    """For an engine that answers probabilities (vLLM's classify pooler): no logits to report."""
    rows = _rows(probabilities)
    return Classified(
        labels=tuple(class_labels(len(rows[0]), id2label, use_id2label)),
        predicted=tuple(argmax(r) for r in rows),
        probabilities=tuple(tuple(r) for r in rows),
        logits=(),
    )


def _keyed(labels: Sequence[Label], row: Sequence[Any]) -> dict[Label, Any]:
    return dict(zip(labels, row, strict=True))


def kserve_round(p: float) -> float:
    """KServe's rounding of a probability: ``float(f"{p:.4f}")`` (encoder_model.py:427, 555)."""
    return float(f"{p:.4f}")


def v1_predictions(result: Classified, options: OutputOptions) -> list[Any]:
    """KServe's ``_process_sequence_classification`` (encoder_model.py:402-433): per input a map
    class → logit, or class → probability rounded to 4 places, or the class index."""
    if options.return_raw_logits:
        if not result.logits:
            raise InvalidInput("raw logits were asked for, but this engine reports probabilities only")
        return [_keyed(result.labels, row) for row in result.logits]
    if options.return_probabilities:
        return [_keyed(result.labels, [kserve_round(p) for p in row]) for row in result.probabilities]
    return result.predicted_labels


def _flat(rows: Iterable[Sequence[float]]) -> list[float]:
    return [x for row in rows for x in row]


def _shape_and_leaves(value: Any) -> tuple[list[int], list[Any]]:
    """numpy's view of nested lists: the shape (every list at one depth the same length) and the
    leaves in row-major order. A dict or string is a leaf (numpy makes it an object element)."""
    shape: list[int] = []
    probe = value
    while isinstance(probe, list):
        shape.append(len(probe))
        if not probe:
            break
        probe = probe[0]
    leaves: list[Any] = []

    def walk(v: Any, depth: int) -> None:
        if depth == len(shape):
            if isinstance(v, list):
                raise ValueError("ragged output: rows of different depths")
            leaves.append(v)
            return
        if not isinstance(v, list) or len(v) != shape[depth]:
            raise ValueError("ragged output: rows of different lengths")
        for item in v:
            walk(item, depth + 1)

    walk(value, 0)
    return shape, leaves


def v2_tensor(name: str, inferences: list[Any]) -> dict[str, Any]:
    """One v2 output tensor as KServe's ``get_predict_response`` makes it for a JSON request
    (kserve/utils/utils.py:194-252 and InferOutput.set_data_from_numpy, infer_type.py:1080-1107):
    a list of strings is BYTES ``[N]``; anything else goes through ``np.array``, so ints are INT64,
    floats FP64, and dicts (probability or logit maps) BYTES holding ``str(dict)``."""
    if inferences and isinstance(inferences[0], str):
        return _tensor(name, [len(inferences)], "BYTES", list(inferences))
    shape, leaves = _shape_and_leaves(inferences)
    if any(isinstance(x, dict | str) for x in leaves):
        return _tensor(name, shape, "BYTES", [x if isinstance(x, str) else str(x) for x in leaves])
    if leaves and all(isinstance(x, bool) for x in leaves):
        return _tensor(name, shape, "BOOL", leaves)
    if all(isinstance(x, int) and not isinstance(x, bool) for x in leaves):
        return _tensor(name, shape, "INT64", leaves)
    return _tensor(name, shape, "FP64", [float(x) for x in leaves])


def _tensor(name: str, shape: list[int], datatype: str, data: list[Any]) -> dict[str, Any]:
    # KServe's REST answer carries "parameters": null on each output (its pydantic InferOutput).
    return {"name": name, "shape": shape, "datatype": datatype, "parameters": None, "data": data}


def v2_outputs(result: Classified, options: OutputOptions) -> list[dict[str, Any]]:
    if not options.v2_tensors:
        return [v2_tensor("output-0", v1_predictions(result, options))]
    n, c = len(result.predicted), len(result.labels)
    named = options.use_id2label and any(isinstance(lab, str) for lab in result.labels)
    outputs: list[dict[str, Any]] = [
        {
            "name": "output-0",
            "shape": [n],
            "datatype": "BYTES" if named else "INT64",
            "data": [str(x) for x in result.predicted_labels] if named else list(result.predicted),
        }
    ]
    labels = list(result.labels)
    if options.return_probabilities:
        outputs.append(
            {
                "name": "probabilities",
                "shape": [n, c],
                "datatype": "FP32",
                "data": _flat(result.probabilities),
                "parameters": {"labels": labels},
            }
        )
    if options.return_raw_logits:
        if not result.logits:
            raise InvalidInput("raw logits were asked for, but this engine reports probabilities only")
        outputs.append(
            {
                "name": "logits",
                "shape": [n, c],
                "datatype": "FP32",
                "data": _flat(result.logits),
                "parameters": {"labels": labels},
            }
        )
    return outputs


# ---------------------------------------------------------------------------------------------
# The other encoder tasks: token classification, fill-mask, text embedding


@dataclass(frozen=True)
class TokenResult:
    """Token classification of a padded batch: per input, per token (special and pad tokens
    included, as KServe's), the class scores. ``offsets`` per token ``[start, end]`` when asked."""

    labels: tuple[Label, ...]
    logits: tuple[tuple[tuple[float, ...], ...], ...]
    probabilities: tuple[tuple[tuple[float, ...], ...], ...]
    offsets: tuple[tuple[tuple[int, int], ...], ...] | None = None


def token_predictions(result: TokenResult, options: OutputOptions) -> list[Any]:
    """KServe's ``_process_token_classification`` (encoder_model.py:524-562): per input a list of
    per-token maps class → logit, or class → probability (4 places); by default
    ``torch.argmax(output, dim=2).tolist()`` of the input's ``[1, T, C]`` scores, i.e. ``[[class per
    token]]`` (the extra list is KServe's)."""
    labels = result.labels
    if options.return_raw_logits:
        return [[_keyed(labels, tok) for tok in row] for row in result.logits]
    if options.return_probabilities:
        return [
            [_keyed(labels, [kserve_round(p) for p in tok]) for tok in row] for row in result.probabilities
        ]
    return [[[labels[argmax(tok)] for tok in row]] for row in result.logits]


def token_extra_output(result: TokenResult, options: OutputOptions) -> dict[str, Any] | None:
    """``--return_offsets_mapping``: KServe adds an ``offset_mapping`` INT64 tensor ``[N, T, 2]``
    (encoder_model.py:343-365), to the v2 outputs and, in v1, under an ``outputs`` key."""
    if not options.return_offsets_mapping or result.offsets is None:
        return None
    rows = [[list(pair) for pair in row] for row in result.offsets]
    return v2_tensor("offset_mapping", rows)


def _v1_extra(tensor: dict[str, Any]) -> dict[str, Any]:
    # The dict KServe appends to a v1 answer (encoder_model.py:358-365): no parameters, this key order.
    return {k: tensor[k] for k in ("name", "datatype", "shape", "data")}


@dataclass(frozen=True)
class MaskResult:
    """Fill-mask, per input: the scores over the vocabulary at each mask token (``[M, V]``), their
    softmax, and the text of the best token at each mask decoded together (KServe's
    ``tokenizer.decode(argmax)``)."""

    logits: tuple[tuple[tuple[float, ...], ...], ...]
    probabilities: tuple[tuple[tuple[float, ...], ...], ...]
    predicted: tuple[str, ...]


def fill_mask_predictions(result: MaskResult, options: OutputOptions) -> list[Any]:
    """KServe's ``_process_fill_mask`` (encoder_model.py:435-522): per input the decoded text, or per
    mask a list over the vocabulary of ``{token_id: logit}`` / ``{token_id: "0.1234"}`` (a string: KServe
    formats these probabilities without converting back)."""
    if options.return_raw_logits:
        return [[[{i: x} for i, x in enumerate(mask)] for mask in row] for row in result.logits]
    if options.return_probabilities:
        return [
            [[{i: f"{p:.4f}"} for i, p in enumerate(mask)] for mask in row] for row in result.probabilities
        ]
    return list(result.predicted)


def kserve_v1(inferences: list[Any], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """KServe's v1 answer: ``{"predictions": inferences}``, plus ``outputs`` holding an extra tensor
    (token offsets) the way encoder_model.py:357-365 adds it to a dict response."""
    out: dict[str, Any] = {"predictions": inferences}
    if extra is not None:
        out["outputs"] = [_v1_extra(extra)]
    return out


def kserve_v2(
    inferences: list[Any], *, model_name: str, request_id: str, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """KServe's v2 answer to a JSON request (InferResponse.to_rest): id, model_name, model_version
    (None), and ``output-0`` (plus the extra tensor)."""
    outputs = [v2_tensor("output-0", inferences)]
    if extra is not None:
        outputs.append(extra)
    return _v2(model_name, request_id, outputs)


def _v2(model_name: str, request_id: str | None, outputs: list[dict[str, Any]]) -> dict[str, Any]:
    # KServe's REST v2 answer, key for key (its pydantic InferenceResponse).
    return {
        "model_name": model_name,
        "model_version": None,
        "id": request_id,
        "parameters": None,
        "outputs": outputs,
    }


# ---------------------------------------------------------------------------------------------
# Requests


class BadRequest(InvalidInput):
    """A predict request this server cannot read; answered with HTTP 400 and this message."""


def _text(item: Any, where: str) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item, Mapping):
        # KServe's huggingfaceserver and common clients send {"text": ...} or {"sequence": ...}.
        for key in ("text", "sequence", "input", "data"):
            if isinstance(item.get(key), str):
                return str(item[key])
    if isinstance(item, bytes):
        return item.decode()
    raise BadRequest(f"{where}: expected a string (or an object with a 'text' string), got {item!r:.80}")


def v1_inputs(body: Any) -> list[str]:
    """Texts from ``{"instances": [...]}`` (strings, or objects with a ``text``); ``inputs`` is read too."""
    if not isinstance(body, Mapping):
        raise BadRequest('expected a JSON object {"instances": [...]}')
    instances = body.get("instances", body.get("inputs"))
    if isinstance(instances, str):
        instances = [instances]
    if not isinstance(instances, list) or not instances:
        raise BadRequest('"instances": expected a non-empty list of strings')
    return [_text(x, f"instances[{i}]") for i, x in enumerate(instances)]


def _shape_size(shape: Any, where: str) -> int:
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise BadRequest(f"{where}.shape: expected a list of whole numbers")
    return math.prod(shape)


def v2_inputs(body: Any) -> list[str]:
    """Texts from a v2 infer request: the first BYTES input (``{"name", "shape", "datatype", "data"}``),
    its data flattened (a nested list is read row by row) and checked against its shape."""
    if not isinstance(body, Mapping):
        raise BadRequest('expected a JSON object {"inputs": [...]}')
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise BadRequest('"inputs": expected a non-empty list of tensors')
    for i, tensor in enumerate(inputs):
        where = f"inputs[{i}]"
        if not isinstance(tensor, Mapping):
            raise BadRequest(f"{where}: expected an object with name, shape, datatype and data")
        datatype = str(tensor.get("datatype", "")).upper()
        if datatype != "BYTES":
            continue
        data = tensor.get("data")
        if isinstance(data, str):
            data = [data]
        if not isinstance(data, list):
            raise BadRequest(f"{where}.data: expected a list of strings")
        flat: list[Any] = []
        stack = list(reversed(data))
        while stack:
            x = stack.pop()
            if isinstance(x, list):
                stack.extend(reversed(x))
            else:
                flat.append(x)
        if "shape" in tensor and _shape_size(tensor["shape"], where) != len(flat):
            raise BadRequest(f"{where}: shape {tensor['shape']} does not match {len(flat)} data elements")
        if not flat:
            raise BadRequest(f"{where}.data: no text to classify")
        return [_text(x, f"{where}.data[{j}]") for j, x in enumerate(flat)]
    raise BadRequest("no input of datatype BYTES: send the texts as a BYTES tensor")


def v1_response(result: Classified, options: OutputOptions) -> dict[str, Any]:
    return {"predictions": v1_predictions(result, options)}


def v2_response(
    result: Classified, options: OutputOptions, *, model_name: str, request_id: str | None = None
) -> dict[str, Any]:
    """KServe's v2 answer (InferResponse.to_rest, infer_type.py): id, model_name, model_version, outputs."""
    return _v2(model_name, request_id, v2_outputs(result, options))
