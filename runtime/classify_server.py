"""A small KServe-protocol server for sequence classifiers: ``python -m runtime.classify_server``.

``modelcache serve`` execs this instead of vLLM's OpenAI server when the model is a classifier (its
architecture ends with ``ForSequenceClassification``, or KServe's ``--task sequence_classification``).
Endpoints (KServe's v1 and v2 protocols, and the health paths the runtimes' probes read):

- ``POST /v1/models/{name}:predict``  ``{"instances": ["text", ...]}`` → ``{"predictions": [...]}``
- ``POST /v2/models/{name}/infer``    a BYTES input tensor → ``output-0`` (+ ``probabilities``, ``logits``)
- ``GET /v2/health/ready``, ``/v2/health/live``, ``/health``, ``/v1/models/{name}``,
  ``/v2/models/{name}``, ``/v2/models/{name}/ready``

The engine (transformers, or vLLM's pooling runner in-process) is imported and loaded only after the
server listens, so the probes answer while the weights load; ``ready`` turns true once it has loaded.
torch, transformers and vllm are imported inside functions only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web

from localmodel.errors import InvalidInput
from runtime.classify import (
    BadRequest,
    Classified,
    EngineChoice,
    OutputOptions,
    choose_engine,
    classify_logits,
    classify_probabilities,
    normalise_backend,
    v1_inputs,
    v1_response,
    v2_inputs,
    v2_response,
)

MAX_BATCH = 256


class ClassifierEngine(Protocol):
    name: str

    def classify(self, texts: list[str], use_id2label: bool) -> Classified: ...


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


@dataclass
class TransformersEngine:
    """transformers' AutoModelForSequenceClassification on the first CUDA device, else the CPU."""

    model_dir: Path
    id2label: Mapping[int, str] | None
    dtype: str | None = None
    max_length: int | None = None
    trust_remote_code: bool = False
    name: str = "huggingface"
    _model: Any = field(default=None, repr=False)
    _tokenizer: Any = field(default=None, repr=False)
    _device: str = "cpu"

    def load(self) -> None:
        import torch  # type: ignore[import-not-found, unused-ignore]
        from transformers import (  # type: ignore[import-not-found, unused-ignore]
            AutoModelForSequenceClassification,
            AutoTokenizer,
        )

        self._device = "cuda" if torch.cuda.is_available() else "cpu"
        kwargs: dict[str, Any] = {"local_files_only": True, "trust_remote_code": self.trust_remote_code}
        if self.dtype and self.dtype != "auto":
            name = {"half": "float16", "float": "float32"}.get(self.dtype, self.dtype)
            kwargs["torch_dtype"] = getattr(torch, name)
        self._tokenizer = AutoTokenizer.from_pretrained(
            str(self.model_dir), local_files_only=True, trust_remote_code=self.trust_remote_code
        )
        model = AutoModelForSequenceClassification.from_pretrained(str(self.model_dir), **kwargs)
        self._model = model.to(self._device).eval()

    def classify(self, texts: list[str], use_id2label: bool) -> Classified:
        import torch

        limit = self.max_length or getattr(self._tokenizer, "model_max_length", None)
        if not isinstance(limit, int) or limit > 1_000_000:
            limit = None
        with torch.inference_mode():
            enc = self._tokenizer(
                texts, padding=True, truncation=limit is not None, max_length=limit, return_tensors="pt"
            ).to(self._device)
            logits = self._model(**enc).logits.float()
        # classify_logits moves the tensor to the CPU before any conversion (KServe #4443).
        return classify_logits(logits, self.id2label, use_id2label=use_id2label)


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

    def classify(self, texts: list[str], use_id2label: bool) -> Classified:
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


@dataclass
class ServerState:
    model_name: str
    options: OutputOptions
    engine: ClassifierEngine | None = None
    failed: str | None = None
    pool: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1, "classify"))

    @property
    def ready(self) -> bool:
        return self.engine is not None


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


async def _json(request: web.Request) -> Any:
    try:
        return await request.json(loads=json.loads)
    except ValueError as e:
        raise BadRequest(f"the body is not JSON: {e}") from None


def make_app(state: ServerState) -> web.Application:
    app = web.Application(client_max_size=64 * 1024 * 1024)

    def known(request: web.Request) -> web.Response | None:
        name = request.match_info["name"]
        if name != state.model_name:
            return _error(404, f"model {name!r} is not served here (this server serves {state.model_name!r})")
        return None

    async def run(texts: list[str]) -> Classified:
        if len(texts) > MAX_BATCH:
            raise BadRequest(f"{len(texts)} inputs in one request; at most {MAX_BATCH}")
        engine = state.engine
        assert engine is not None
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(state.pool, engine.classify, texts, state.options.use_id2label)

    async def predict(
        request: web.Request,
        parse: Callable[[Any], list[str]],
        respond: Callable[[Classified, Any], dict[str, Any]],
    ) -> web.Response:
        if (missing := known(request)) is not None:
            return missing
        if not state.ready:
            return _error(503, f"model {state.model_name!r} is not loaded yet")
        try:
            body = await _json(request)
            result = await run(parse(body))
            return web.json_response(respond(result, body))
        except InvalidInput as e:
            return _error(400, str(e))
        except Exception as e:  # the engine failed: say why in the answer and the log
            _log(f"predict failed: {type(e).__name__}: {e}")
            return _error(500, f"the model failed on this request: {type(e).__name__}: {e}")

    async def v1_predict(request: web.Request) -> web.Response:
        return await predict(request, v1_inputs, lambda r, _body: v1_response(r, state.options))

    async def v2_infer(request: web.Request) -> web.Response:
        def respond(result: Classified, body: Any) -> dict[str, Any]:
            rid = body.get("id") if isinstance(body, Mapping) else None
            return v2_response(
                result, state.options, model_name=state.model_name, request_id=str(rid or uuid.uuid4())
            )

        return await predict(request, v2_inputs, respond)

    async def ready(_request: web.Request) -> web.Response:
        return web.json_response({"ready": state.ready}, status=200 if state.ready else 503)

    async def live(_request: web.Request) -> web.Response:
        return web.json_response({"live": True})

    async def v1_model(request: web.Request) -> web.Response:
        if (missing := known(request)) is not None:
            return missing
        return web.json_response({"name": state.model_name, "ready": state.ready})

    async def v2_model(request: web.Request) -> web.Response:
        if (missing := known(request)) is not None:
            return missing
        engine = state.engine.name if state.engine else None
        return web.json_response(
            {
                "name": state.model_name,
                "platform": engine or "loading",
                "inputs": [{"name": "input-0", "datatype": "BYTES", "shape": [-1]}],
                "outputs": [{"name": "output-0", "datatype": "INT64", "shape": [-1]}],
            }
        )

    async def v2_model_ready(request: web.Request) -> web.Response:
        if (missing := known(request)) is not None:
            return missing
        return await ready(request)

    async def v1_models(_request: web.Request) -> web.Response:
        return web.json_response({"models": [state.model_name]})

    app.router.add_post("/v1/models/{name}:predict", v1_predict)
    app.router.add_post("/v2/models/{name}/infer", v2_infer)
    app.router.add_get("/v2/health/ready", ready)
    app.router.add_get("/v2/health/live", live)
    app.router.add_get("/health", ready)  # what the ServingRuntime's probes read, as for vLLM
    app.router.add_get("/v1/models", v1_models)
    app.router.add_get("/v1/models/{name}", v1_model)
    app.router.add_get("/v2/models/{name}", v2_model)
    app.router.add_get("/v2/models/{name}/ready", v2_model_ready)
    return app


def _log(message: str) -> None:
    sys.stderr.write(f"modelcache classify: {message}\n")
    sys.stderr.flush()


def make_engine(
    ns: argparse.Namespace, config: Mapping[str, Any], archs: Callable[[], frozenset[str] | None] = vllm_archs
) -> tuple[TransformersEngine | VllmEngine, EngineChoice]:
    model_dir = Path(ns.model_dir)
    options = options_of(ns)
    backend = normalise_backend(ns.backend)
    architectures = [a for a in config.get("architectures") or [] if isinstance(a, str)]
    # The registry is only asked when it can change the answer (importing vLLM takes seconds).
    registry = archs() if backend != "huggingface" else None
    choice = choose_engine(architectures, backend=backend, vllm_archs=registry, options=options)
    id2label = id2label_from_config(config)
    common: dict[str, Any] = {
        "model_dir": model_dir,
        "id2label": id2label,
        "dtype": ns.dtype,
        "max_length": ns.max_length,
        "trust_remote_code": ns.trust_remote_code,
    }
    if choice.engine == "vllm":
        return VllmEngine(tensor_parallel_size=ns.tensor_parallel_size, **common), choice
    return TransformersEngine(**common), choice


def options_of(ns: argparse.Namespace) -> OutputOptions:
    return OutputOptions(
        return_probabilities=ns.return_probabilities,
        return_raw_logits=ns.return_raw_logits,
        use_id2label=ns.use_id2label,
    )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m runtime.classify_server",
        description="Serve a sequence classifier with KServe's v1 and v2 protocols.",
        allow_abbrev=False,
    )
    p.add_argument("--model_dir", "--model-dir", dest="model_dir", required=True)
    p.add_argument("--model_name", "--model-name", dest="model_name", default="model")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--backend", default="auto", help="auto, huggingface or vllm")
    p.add_argument("--dtype")
    p.add_argument("--max_length", "--max-length", dest="max_length", type=int)
    p.add_argument(
        "--tensor_parallel_size", "--tensor-parallel-size", dest="tensor_parallel_size", type=int, default=1
    )
    for flag in ("return_probabilities", "return_raw_logits", "use_id2label", "trust_remote_code"):
        p.add_argument(f"--{flag}", f"--{flag.replace('_', '-')}", dest=flag, action="store_true")
    return p


async def serve(state: ServerState, loader: Callable[[], ClassifierEngine], host: str, port: int) -> int:
    """Listen at once (the probes answer), load the engine in a thread, serve until SIGTERM/SIGINT."""
    runner = web.AppRunner(make_app(state), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    _log(f"listening on {host}:{port}; loading the model")
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        try:
            state.engine = await loop.run_in_executor(state.pool, loader)
        except Exception as e:  # a model that cannot load must restart the pod, not serve 503s forever
            state.failed = f"{type(e).__name__}: {e}"
            _log(f"the model did not load: {state.failed}")
            return 1
        _log(f"ready: {state.model_name} on {state.engine.name}")
        await stop.wait()
        return 0
    finally:
        await runner.cleanup()
        state.pool.shutdown(wait=False, cancel_futures=True)


def main(argv: Sequence[str] | None = None) -> int:
    ns = parser().parse_args(argv)
    try:
        config = read_config(Path(ns.model_dir))
        engine, choice = make_engine(ns, config)
    except InvalidInput as e:
        _log(str(e))
        return 2
    _log(f"engine: {choice.reason}")
    state = ServerState(model_name=ns.model_name, options=options_of(ns))

    def loader() -> ClassifierEngine:
        engine.load()
        return engine

    return asyncio.run(serve(state, loader, ns.host, ns.port))


if __name__ == "__main__":
    sys.exit(main())
