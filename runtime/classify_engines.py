"""The engines of the encoder server (runtime.classify_server): transformers as KServe's
huggingfaceserver runs an encoder model, or vLLM's pooling runner in this process. torch,
transformers and vllm are imported inside methods only, so importing this module costs nothing.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from localmodel.errors import InvalidInput
from runtime.classify import (
    EMBEDDING,
    FILL_MASK,
    TAGGING,
    TASK,
    Classified,
    MaskResult,
    TokenResult,
    class_labels,
    classify_logits,
    classify_probabilities,
)


class ClassifierEngine(Protocol):
    """An engine for one encoder task: ``infer`` answers a batch with the task's result type
    (Classified, TokenResult, MaskResult, or embedding rows ``list[list[float]]``)."""

    name: str
    task: str

    def infer(self, texts: list[str], use_id2label: bool) -> Any: ...


def id2label_from_config(config: Mapping[str, Any]) -> dict[int, str] | None:
    """The model's own class names, read from config.json as written. transformers invents
    ``LABEL_0``... when a config has none; those are not names, so a model without ``id2label`` (or
    with only invented names) has None and its classes are keyed by index."""
    raw = config.get("id2label")
    if not isinstance(raw, Mapping) or not raw:
        return None
    out: dict[int, str] = {}
    for k, v in raw.items():
        try:
            out[int(k)] = str(v)
        except (TypeError, ValueError):
            continue
    if all(v == f"LABEL_{k}" for k, v in out.items()):
        return None
    return out or None


def read_config(model_dir: Path) -> dict[str, Any]:
    try:
        data = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise InvalidInput(f"{model_dir / 'config.json'}: cannot be read ({e})") from None
    if not isinstance(data, dict):
        raise InvalidInput(f"{model_dir / 'config.json'}: not a JSON object")
    return data


# KServe's max length: the smallest of these config keys (huggingfaceserver utils.py:28-60).
_MAX_LEN_KEYS = (
    "max_position_embeddings",
    "n_positions",
    "max_seq_len",
    "seq_length",
    "model_max_length",
    "max_sequence_length",
    "max_seq_length",
    "seq_len",
)


def max_length_of(config: Mapping[str, Any], asked: int | None) -> int | None:
    """The tokenizer's truncation length: the one asked for, else the smallest length key of the
    config (KServe's ``_get_and_verify_max_len``), else None (the tokenizer's own)."""
    if asked:
        return asked
    found = [v for k in _MAX_LEN_KEYS if isinstance(v := config.get(k), int) and not isinstance(v, bool)]
    return min(found) if found else None


@dataclass
class TransformersEngine:
    """transformers on the first CUDA device, else the CPU, as KServe's HuggingfaceEncoderModel loads
    and runs it (encoder_model.py:151-315): the task's Auto class, dtype ``auto`` = the config's dtype,
    else float16 on a GPU and float32 on the CPU (__main__.py:189-256); the tokenizer with
    ``do_lower_case``, padding, truncation at the config's max length, special tokens."""

    model_dir: Path
    id2label: Mapping[int, str] | None
    dtype: str | None = None
    max_length: int | None = None
    trust_remote_code: bool = False
    task: str = TASK
    lower_case: bool = True
    special_tokens: bool = True
    token_type_ids: bool | None = None
    offsets: bool = False
    name: str = "huggingface"
    _model: Any = field(default=None, repr=False)
    _tokenizer: Any = field(default=None, repr=False)
    _device: str = "cpu"

    def load(self) -> None:
        import torch  # type: ignore[import-not-found, unused-ignore]
        import transformers  # type: ignore[import-not-found, unused-ignore]

        self._device = "cuda" if torch.cuda.is_available() else "cpu"
        auto = {
            TASK: transformers.AutoModelForSequenceClassification,
            TAGGING: transformers.AutoModelForTokenClassification,
            FILL_MASK: transformers.AutoModelForMaskedLM,
            EMBEDDING: transformers.AutoModel,
        }[self.task]
        config = read_config(self.model_dir)
        names = {"half": "float16", "float": "float32"}
        dtype = names.get(self.dtype or "auto", self.dtype or "auto")
        if dtype == "auto":
            declared = config.get("dtype") or config.get("torch_dtype")
            if isinstance(declared, str) and hasattr(torch, declared):
                dtype = declared
            else:
                dtype = "float16" if self._device == "cuda" else "float32"
        self.max_length = max_length_of(config, self.max_length)
        self._tokenizer = transformers.AutoTokenizer.from_pretrained(
            str(self.model_dir),
            local_files_only=True,
            trust_remote_code=self.trust_remote_code,
            do_lower_case=self.lower_case,
        )
        if self.offsets and not getattr(self._tokenizer, "is_fast", False):
            raise InvalidInput("--return_offsets_mapping needs a fast tokenizer (tokenizer.json)")
        # transformers 4.56 renamed torch_dtype to dtype; older releases ignore an unknown keyword.
        old_name = tuple(int(x) for x in transformers.__version__.split(".")[:2]) < (4, 56)
        model = auto.from_pretrained(
            str(self.model_dir),
            local_files_only=True,
            trust_remote_code=self.trust_remote_code,
            **{"torch_dtype" if old_name else "dtype": getattr(torch, dtype)},
        )
        if not self._tokenizer.pad_token:
            # KServe adds "[PAD]" and grows the embeddings (encoder_model.py:199-208).
            self._tokenizer.add_special_tokens({"pad_token": "[PAD]"})
            model.resize_token_embeddings(len(self._tokenizer))
        self._model = model.to(self._device).eval()

    def _encode(self, texts: list[str]) -> Any:
        return self._tokenizer(
            texts,
            max_length=self.max_length,
            add_special_tokens=self.special_tokens,
            return_tensors="pt",
            return_token_type_ids=self.token_type_ids,
            padding=True,
            truncation=True,
            return_offsets_mapping=self.offsets and self.task == TAGGING,
        )

    def infer(self, texts: list[str], use_id2label: bool) -> Any:
        import torch

        enc = self._encode(texts)
        offsets = enc.pop("offset_mapping", None)
        enc = enc.to(self._device)
        with torch.no_grad():
            out = self._model(**enc, return_dict=True)
        # Every tensor goes to the CPU before any conversion (KServe #4443), softmax in the model's dtype.
        if self.task == EMBEDDING:
            hidden = out.last_hidden_state
            mask = enc["attention_mask"].to(dtype=hidden.dtype).unsqueeze(-1).expand_as(hidden)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2, dim=1).cpu().tolist()
        logits = out.logits
        probs = torch.softmax(logits, dim=-1)
        if self.task == TASK:
            return classify_logits(
                logits.cpu(), self.id2label, use_id2label=use_id2label, probabilities=probs.cpu()
            )
        if self.task == TAGGING:
            labels = tuple(class_labels(logits.shape[-1], self.id2label, use_id2label))
            return TokenResult(
                labels,
                _tuples(logits.cpu().tolist()),
                _tuples(probs.cpu().tolist()),
                _tuples(offsets.tolist()) if offsets is not None else None,
            )
        mask_id = self._tokenizer.mask_token_id
        ids = enc["input_ids"].cpu()
        rows_logits, rows_probs, predicted = [], [], []
        for i in range(ids.shape[0]):
            where = [j for j in range(ids.shape[1]) if int(ids[i, j]) == mask_id]
            at = torch.tensor(where, dtype=torch.long)
            masked = logits[i, at].cpu()
            rows_logits.append(masked.tolist())
            rows_probs.append(torch.softmax(masked, dim=-1).tolist())
            predicted.append(self._tokenizer.decode(masked.argmax(dim=-1)))
        return MaskResult(_tuples(rows_logits), _tuples(rows_probs), tuple(predicted))


def _tuples(rows: Any) -> Any:
    return tuple(_tuples(r) for r in rows) if isinstance(rows, list) else rows


@dataclass
class VllmEngine:
    """vLLM's pooling runner in this process (``LLM.classify``): probabilities per class."""

    model_dir: Path
    id2label: Mapping[int, str] | None
    dtype: str | None = None
    max_length: int | None = None
    trust_remote_code: bool = False
    tensor_parallel_size: int = 1
    name: str = "vllm"
    task: str = TASK
    _llm: Any = field(default=None, repr=False)

    def load(self) -> None:
        from vllm import LLM  # type: ignore[import-not-found, unused-ignore]

        kwargs: dict[str, Any] = {
            "model": str(self.model_dir),
            "tensor_parallel_size": self.tensor_parallel_size,
            "trust_remote_code": self.trust_remote_code,
        }
        if self.dtype:
            kwargs["dtype"] = self.dtype
        if self.max_length:
            kwargs["max_model_len"] = self.max_length
        try:
            self._llm = LLM(runner="pooling", **kwargs)  # vLLM >= 0.10
        except TypeError:
            self._llm = LLM(task="classify", **kwargs)  # older releases

    def infer(self, texts: list[str], use_id2label: bool) -> Classified:
        outputs = self._llm.classify(texts, use_tqdm=False)
        probs = [list(o.outputs.probs) for o in outputs]
        return classify_probabilities(probs, self.id2label, use_id2label=use_id2label)


def vllm_archs() -> frozenset[str] | None:
    """The architectures the installed vLLM registers; None when vLLM is not installed."""
    try:
        from vllm import ModelRegistry
    except ImportError:
        return None
    return frozenset(ModelRegistry.get_supported_archs())
