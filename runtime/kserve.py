"""KServe's Hugging Face server flags, and what `modelcache serve` does with each. Pure: no I/O.

KServe's server (``python -m huggingfaceserver``) parses with ``parse_known_args``: a flag it does not
know is ignored. ``vllm serve`` exits on one. So every flag KServe's server defines is listed here with
what the launcher does with it, and :func:`translate` applies that before anything reaches vLLM:

- ``vllm``: the same meaning under a vLLM flag (``--model_revision`` → ``--revision``, ``--max_length``
  → ``--max-model-len``), or the same flag;
- ``env``: the same meaning under a vLLM environment variable (``--timeout-keep-alive`` →
  ``VLLM_HTTP_TIMEOUT_KEEP_ALIVE``);
- ``launcher``: read by the launcher itself (the model's folder or id);
- ``encoder``: read by the encoder server (classification, fill-mask, embedding), dropped with a note
  before vLLM;
- ``drop``: KServe's server machinery (gRPC, uvicorn workers, the transformer's predictor client),
  which vLLM's server has no counterpart for: dropped with a note naming it.

Sources (kserve/kserve at aaac4e294dae): ``python/kserve/kserve/model_server.py`` lines 52-207 (the
model server's parser, a parent of the next) and ``python/huggingfaceserver/huggingfaceserver/
__main__.py`` lines 80-210. tests/data/runtime/kserve_hf_flags.json lists them with their lines.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from localmodel.errors import InvalidInput
from runtime import args as vargs

Action = Literal["vllm", "env", "launcher", "encoder", "drop"]


@dataclass(frozen=True)
class KServeFlag:
    """One flag of KServe's Hugging Face server. ``name`` as KServe spells it; ``target`` the vLLM flag
    (action ``vllm``) or environment variable (``env``) it becomes; ``note`` says why, for the docs."""

    name: str
    action: Action
    target: str | None = None
    note: str = ""

    @property
    def key(self) -> str:
        return vargs.canonical(self.name)[0]


_GRPC = "vLLM's server speaks HTTP only"
_TRANSFORMER = "KServe's transformer-to-predictor client; no transformer here"

FLAGS: tuple[KServeFlag, ...] = (
    # python/kserve/kserve/model_server.py
    KServeFlag("--http_port", "vllm", "--port"),
    KServeFlag("--grpc_port", "drop", note=_GRPC),
    KServeFlag("--workers", "drop", note="uvicorn worker processes; vLLM runs one API server per pod"),
    KServeFlag("--max_threads", "drop", note=_GRPC + " (gRPC threads)"),
    KServeFlag("--max_asyncio_workers", "drop", note="KServe's thread pool; vLLM's engine is its own"),
    KServeFlag("--enable_grpc", "drop", note=_GRPC),
    KServeFlag(
        "--enable_docs_url",
        "vllm",
        "--disable-fastapi-docs",
        note="false becomes --disable-fastapi-docs; true is vLLM's default (dropped)",
    ),
    KServeFlag("--enable_latency_logging", "drop", note="KServe's per-request latency log line"),
    KServeFlag("--configure_logging", "drop", note="vLLM configures its own logging"),
    KServeFlag("--log_config_file", "vllm", "--log-config-file", note="vLLM's takes a JSON file"),
    KServeFlag("--access_log_format", "drop", note="asgi-logger format; vLLM has no such option"),
    KServeFlag("--event-loop", "drop", note="uvicorn's loop; vLLM picks its own"),
    KServeFlag("--timeout-keep-alive", "env", "VLLM_HTTP_TIMEOUT_KEEP_ALIVE"),
    KServeFlag("--model_name", "vllm", "--served-model-name"),
    KServeFlag("--predictor_host", "drop", note=_TRANSFORMER),
    KServeFlag("--protocol", "drop", note=_TRANSFORMER),
    KServeFlag("--predictor_protocol", "drop", note=_TRANSFORMER),
    KServeFlag("--predictor_use_ssl", "drop", note=_TRANSFORMER),
    KServeFlag("--predictor_request_timeout_seconds", "drop", note=_TRANSFORMER),
    KServeFlag("--grpc_max_send_message_length", "drop", note=_GRPC),
    KServeFlag("--grpc_max_receive_message_length", "drop", note=_GRPC),
    KServeFlag("--predictor_request_retries", "drop", note=_TRANSFORMER),
    KServeFlag("--enable_predictor_health_check", "drop", note=_TRANSFORMER),
    # python/huggingfaceserver/huggingfaceserver/__main__.py
    KServeFlag("--model_dir", "launcher", note="the model folder (default /mnt/models)"),
    KServeFlag(
        "--model_id",
        "launcher",
        note="resolved to its folder in --cache-dir (hf://ID, with --model_revision hf://ID:REV)",
    ),
    KServeFlag("--model_revision", "vllm", "--revision"),
    KServeFlag("--tokenizer_revision", "vllm", "--tokenizer-revision"),
    KServeFlag("--max_length", "vllm", "--max-model-len"),
    KServeFlag("--max_model_len", "vllm", "--max-model-len"),
    KServeFlag("--disable_lower_case", "encoder", note="the encoder tokenizer's lower-casing"),
    KServeFlag("--disable_special_tokens", "encoder", note="the encoder tokenizer's special tokens"),
    KServeFlag("--trust_remote_code", "vllm", "--trust-remote-code"),
    KServeFlag(
        "--tensor_input_names", "drop", note="tensors sent to a remote predictor (predictor_host) only"
    ),
    KServeFlag(
        "--backend", "encoder", note="auto, huggingface or vllm; a generative model is served by vLLM"
    ),
    KServeFlag("--return_token_type_ids", "encoder"),
    KServeFlag("--return_offsets_mapping", "encoder", note="token classification's character offsets"),
    KServeFlag("--return_probabilities", "encoder"),
    KServeFlag("--return_raw_logits", "encoder"),
    KServeFlag(
        "--disable_log_requests",
        "vllm",
        "--enable-log-requests",
        note="its opposite, off (vLLM's default); the later of the two wins",
    ),
    KServeFlag(
        "--task",
        "launcher",
        note="KServe's task names pick the encoder server; vLLM's become --runner/--convert (vLLM #21470)",
    ),
    KServeFlag("--max_log_len", "vllm", "--max-log-len"),
    KServeFlag(
        "--dtype",
        "vllm",
        "--dtype",
        note="auto (or none) invoked the KServe way: float16 on a GPU, as KServe's server does",
    ),
)

BY_KEY: Mapping[str, KServeFlag] = {f.key: f for f in FLAGS}
# The encoder server's own switches (besides --backend, --dtype, --max-length, --trust-remote-code).
ENCODER_KEYS = frozenset(f.key for f in FLAGS if f.action == "encoder") | {"--use-id2label"}
# KServe's flags that take a strtobool value (model_server.py: `type=strtobool`).
VALUE_SWITCHES = frozenset(
    {
        "--enable-grpc",
        "--enable-docs-url",
        "--enable-latency-logging",
        "--configure-logging",
        "--predictor-use-ssl",
    }
)


@dataclass(frozen=True)
class Translated:
    """``flags`` as vLLM takes them; ``env`` to add; ``notes`` for what was dropped or renamed."""

    flags: tuple[vargs.Flag, ...]
    env: Mapping[str, str]
    notes: tuple[str, ...]


def translate(flags: Sequence[vargs.Flag]) -> Translated:
    """Apply the table to flags already parsed: KServe's names become vLLM's, its server-only flags
    are dropped (named in one note); the encoder server's flags are kept (see :func:`without_encoder`).
    Flags not in the table pass unchanged. ``--model-dir``/``--model-id`` never reach here (the
    launcher's parser takes them).

    KServe's strtobool switches (``--enable_docs_url``, ``--configure_logging``, ...) must hold a
    strtobool word, else InvalidInput naming the flag, as KServe's parser refuses them.
    ``--enable_docs_url`` and vLLM's ``--disable-fastapi-docs`` are one setting (the later wins:
    true is ``--disable-fastapi-docs`` off); ``--configure_logging false`` makes KServe ignore
    ``--log_config_file`` (model_server.py configures logging only when it is true), so the file is
    not passed then, whichever comes first."""
    out: list[vargs.Flag] = []
    env: dict[str, str] = {}
    dropped: list[str] = []
    renamed: list[str] = []
    switches: dict[str, bool] = {}
    for f in flags:
        spec = BY_KEY.get(f.key)
        if spec is not None and spec.key in VALUE_SWITCHES:
            if f.negated or not f.values:
                raise InvalidInput(f"{spec.name} takes a value (true or false), as KServe's server reads it")
            switches[spec.key] = vargs.strtobool(f.values[-1], spec.name)
        if spec is None or (spec.action == "vllm" and spec.target == f.key):
            out.append(f)
            continue
        if spec.action == "drop":
            dropped.append(spec.name)
        elif spec.action == "encoder" or spec.action == "launcher":
            out.append(f)
        elif spec.action == "env" and spec.target is not None:
            if f.values:
                env[spec.target] = f.values[-1]
                renamed.append(f"{spec.name} → {spec.target}={f.values[-1]}")
        elif spec.key == "--enable-docs-url":
            on = switches[spec.key]
            out.append(vargs.Flag("--disable-fastapi-docs", (), negated=on))
            renamed.append(f"{spec.name} {'true → /docs served' if on else 'false → --disable-fastapi-docs'}")
        elif spec.target is not None:
            out.append(vargs.Flag(spec.target, f.values, f.negated))
            renamed.append(f"{spec.name} → {spec.target}")
    return _finished(out, env, switches, renamed, dropped)


def _finished(
    out: list[vargs.Flag],
    env: dict[str, str],
    switches: Mapping[str, bool],
    renamed: list[str],
    dropped: list[str],
) -> Translated:
    """The translation with ``--log_config_file`` dropped when ``--configure_logging`` is false, and
    its notes: what was renamed first, then what was left out."""
    notes = []
    if switches.get("--configure-logging") is False and vargs.find(out, "--log-config-file") is not None:
        out = [f for f in out if f.key != "--log-config-file"]
        notes.append(
            "--log_config_file not passed: --configure_logging false tells KServe's server to leave "
            "logging as it is, and so the file unread"
        )
    if renamed:
        notes.insert(0, "KServe's flags in vLLM's terms: " + ", ".join(renamed))
    if dropped:
        notes.append(
            "KServe server flags with no vLLM counterpart, not passed to vLLM: "
            + ", ".join(dict.fromkeys(dropped))
        )
    return Translated(tuple(vargs.merge(out)), env, tuple(notes))


def without_encoder(flags: Sequence[vargs.Flag]) -> tuple[tuple[vargs.Flag, ...], str | None]:
    """The flags with the encoder server's removed (a model vLLM serves), and a note naming them."""
    gone = [f.key for f in flags if f.key in ENCODER_KEYS]
    if not gone:
        return tuple(flags), None
    kept = tuple(f for f in flags if f.key not in ENCODER_KEYS)
    return kept, (
        f"{', '.join(gone)}: KServe's encoder-model flags, not passed to vLLM (this model is served by "
        "vLLM's OpenAI server)"
    )
