"""Sequence classification: which engine, and what a KServe v1 or v2 predict answers. Pure: no I/O.

KServe's huggingfaceserver serves classifiers with its v1 and v2 protocols; its gaps, closed here:
- outputs were keyed by class index only; mapping through the model's ``id2label`` was proposed but
  never merged (KServe #5181, #5526). ``--use_id2label`` keys predictions and probabilities by the
  names in ``id2label``, falling back to the index where a class has no name;
- ``.numpy()`` on a CUDA tensor crashed (#4443): :func:`to_list` moves a tensor to the CPU before
  anything else touches it, so the same code runs on CUDA and CPU.

Everything here works on plain lists as well as on tensors (anything with ``.detach().cpu().tolist()``),
so the tests need neither torch nor transformers.

Output shapes (the precedence is KServe's: raw logits, then probabilities, then predicted classes):
- v1 ``{"predictions": [...]}``, one entry per input: the class (index, or name with
  ``--use_id2label``); with ``--return_probabilities`` a map class → probability; with
  ``--return_raw_logits`` the logits (a list, or a map class → logit with ``--use_id2label``).
- v2 ``{"model_name", "id", "outputs": [...]}``: ``output-0`` always holds the predicted class (INT64
  indices or BYTES names, shape ``[N]``); ``probabilities`` and ``logits`` (FP32, shape ``[N, C]``,
  row-major, class keys in ``parameters.labels``) are added when asked for.
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
) -> EngineChoice:
    """vLLM's pooling runner where it serves the model, transformers otherwise; ``--backend`` forces one.

    ``vllm_archs`` are the architectures the installed vLLM registers (None: vLLM is not installed).
    vLLM's classify pooler answers probabilities, never raw logits, so ``--return_raw_logits`` needs
    transformers."""
    chosen = normalise_backend(backend)
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
    logits: Any, id2label: Mapping[Any, str] | None = None, *, use_id2label: bool = False
) -> Classified:
    rows = _rows(logits)
    probs = [softmax(r) for r in rows]
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


def _keyed(labels: Sequence[Label], row: Sequence[float]) -> dict[Label, float]:
    return dict(zip(labels, row, strict=True))


def v1_predictions(result: Classified, options: OutputOptions) -> list[Any]:
    if options.return_raw_logits:
        if not result.logits:
            raise InvalidInput("raw logits were asked for, but this engine reports probabilities only")
        if options.use_id2label:
            return [_keyed(result.labels, row) for row in result.logits]
        return [list(row) for row in result.logits]
    if options.return_probabilities:
        return [_keyed(result.labels, row) for row in result.probabilities]
    return result.predicted_labels


def _flat(rows: Iterable[Sequence[float]]) -> list[float]:
    return [x for row in rows for x in row]


def v2_outputs(result: Classified, options: OutputOptions) -> list[dict[str, Any]]:
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
    out: dict[str, Any] = {"model_name": model_name, "outputs": v2_outputs(result, options)}
    if request_id is not None:
        out["id"] = request_id
    return out
