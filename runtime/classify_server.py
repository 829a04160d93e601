"""A small KServe-protocol server for encoder models: ``python -m runtime.classify_server``.

``modelcache serve`` execs this instead of vLLM's OpenAI server for the tasks KServe's transformers
backend serves with its encoder model: sequence classification, token classification, fill-mask and
text embedding (an architecture ending ``ForSequenceClassification``, ``ForTokenClassification`` or
``ForMaskedLM``, or KServe's ``--task``). Answers are KServe's, shape for shape (runtime.classify).
Endpoints (KServe's v1 and v2 protocols, and the health paths the runtimes' probes read):

- ``POST /v1/models/{name}:predict``  ``{"instances": ["text", ...]}`` → ``{"predictions": [...]}``
- ``POST /v2/models/{name}/infer``    a BYTES input tensor → ``output-0``
- ``GET /v2``: KServe's server metadata (name, version, extensions);
- ``GET /``, ``/v2/health/live``: alive; ``/health``, ``/v2/health/ready``, ``/v1/models/{name}``,
  ``/v2/models/{name}/ready``: 200 once the model is loaded, 503 until then (KServe's
  ModelNotReady; probes read status codes); ``/v2/models/{name}``; ``/metrics`` (KServe's
  ``request_{preprocess,predict,postprocess}_seconds`` histograms by ``model_name``)

The engine (transformers, or vLLM's pooling runner in-process) is imported and loaded only after the
server listens, so the probes answer while the weights load; ``ready`` turns true once it has loaded.
torch, transformers and vllm are imported inside functions only.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import signal
import sys
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest

from localmodel.errors import InvalidInput
from runtime.classify import (
    ENCODER_TASKS,
    FILL_MASK,
    TAGGING,
    TASK,
    BadRequest,
    EngineChoice,
    OutputOptions,
    choose_engine,
    encoder_task,
    fill_mask_predictions,
    kserve_v1,
    kserve_v2,
    normalise_backend,
    token_extra_output,
    token_predictions,
    v1_inputs,
    v1_response,
    v2_inputs,
    v2_response,
)
from runtime.classify_engines import (
    ClassifierEngine,
    TransformersEngine,
    VllmEngine,
    id2label_from_config,
    read_config,
    vllm_archs,
)

MAX_BATCH = 256


# KServe's model server histograms (kserve/metrics.py:18-27), by model_name.
_STAGES = ("preprocess", "predict", "postprocess")


@dataclass
class ServerState:
    model_name: str
    options: OutputOptions
    engine: ClassifierEngine | None = None
    failed: str | None = None
    pool: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1, "classify"))
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    histograms: dict[str, Histogram] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for stage in _STAGES:
            self.histograms[stage] = Histogram(
                f"request_{stage}_seconds", f"{stage} request latency", ["model_name"], registry=self.registry
            )

    def timer(self, stage: str) -> Any:
        return self.histograms[stage].labels(model_name=self.model_name).time()

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


def make_app(state: ServerState) -> web.Application:  # noqa: C901 - the sum of its short handlers (closures)
    """The aiohttp application of the endpoints above, over ``state``. Over 80 lines because each
    handler is a short closure over ``state``, and the routes read best beside their handlers."""
    app = web.Application(client_max_size=64 * 1024 * 1024)

    def known(request: web.Request) -> web.Response | None:
        name = request.match_info["name"]
        if name != state.model_name:
            return _error(404, f"model {name!r} is not served here (this server serves {state.model_name!r})")
        return None

    async def run(texts: list[str]) -> Any:
        if len(texts) > MAX_BATCH:
            raise BadRequest(f"{len(texts)} inputs in one request; at most {MAX_BATCH}")
        engine = state.engine
        assert engine is not None
        loop = asyncio.get_running_loop()
        with state.timer("predict"):
            return await loop.run_in_executor(state.pool, engine.infer, texts, state.options.use_id2label)

    def answer(result: Any, v2: bool, request_id: str) -> dict[str, Any]:
        """The task's answer in KServe's v1 or v2 shape (runtime.classify)."""
        opts = state.options
        task = state.engine.task if state.engine is not None else TASK
        if task == TASK:
            if v2:
                return v2_response(result, opts, model_name=state.model_name, request_id=request_id)
            return v1_response(result, opts)
        extra = None
        if task == TAGGING:
            inferences = token_predictions(result, opts)
            extra = token_extra_output(result, opts)
        elif task == FILL_MASK:
            inferences = fill_mask_predictions(result, opts)
        else:
            inferences = result
        if v2:
            return kserve_v2(inferences, model_name=state.model_name, request_id=request_id, extra=extra)
        return kserve_v1(inferences, extra)

    async def predict(request: web.Request, v2: bool) -> web.Response:
        if (missing := known(request)) is not None:
            return missing
        if not state.ready:
            return _error(503, f"Model with name {state.model_name} is not ready.")
        try:
            with state.timer("preprocess"):
                body = await _json(request)
                texts = v2_inputs(body) if v2 else v1_inputs(body)
            result = await run(texts)
            with state.timer("postprocess"):
                rid = body.get("id") if v2 and isinstance(body, Mapping) else None
                return web.json_response(answer(result, v2, str(rid or uuid.uuid4())))
        except InvalidInput as e:
            return _error(400, str(e))
        except Exception as e:  # the engine failed: say why in the answer and the log
            _log(f"predict failed: {type(e).__name__}: {e}")
            return _error(500, f"the model failed on this request: {type(e).__name__}: {e}")

    async def v1_predict(request: web.Request) -> web.Response:
        return await predict(request, v2=False)

    async def v2_infer(request: web.Request) -> web.Response:
        return await predict(request, v2=True)

    def not_ready() -> web.Response:
        # KServe's ModelNotReady: 503 {"error": "Model with name NAME is not ready."} (errors.py:80-159)
        return _error(503, f"Model with name {state.model_name} is not ready.")

    async def ready(_request: web.Request) -> web.Response:
        return web.json_response({"ready": state.ready}, status=200 if state.ready else 503)

    async def live(_request: web.Request) -> web.Response:
        return web.json_response({"live": True})

    async def alive(_request: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def server_metadata(_request: web.Request) -> web.Response:
        # KServe's v2 server metadata (kserve/protocol/dataplane.py `metadata`: name, version,
        # extensions). The name and version are this server's; no extension is claimed, as the
        # model repository extension KServe lists is not served here.
        return web.json_response({"name": "modelcache-classify", "version": _version(), "extensions": []})

    async def v1_model(request: web.Request) -> web.Response:
        if (missing := known(request)) is not None:
            return missing
        if not state.ready:
            return not_ready()
        return web.json_response({"name": state.model_name, "ready": True})

    async def metrics(_request: web.Request) -> web.Response:
        body = generate_latest(state.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

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
        if not state.ready:
            return not_ready()
        return web.json_response({"name": state.model_name, "ready": True})

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
    app.router.add_get("/", alive)
    app.router.add_get("/v2", server_metadata)
    app.router.add_get("/metrics", metrics)
    return app


def _version() -> str:
    try:
        return importlib.metadata.version("modelcache")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


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
    task = encoder_task(architectures, ns.task) or TASK
    if ns.task is not None and encoder_task([], ns.task) is None:
        raise InvalidInput(f"--task {ns.task}: this server serves {', '.join(ENCODER_TASKS)}")
    registry = archs() if backend != "huggingface" and task == TASK else None
    choice = choose_engine(architectures, backend=backend, vllm_archs=registry, options=options, task=task)
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
    engine = TransformersEngine(
        **common,
        task=task,
        lower_case=not ns.disable_lower_case,
        special_tokens=not ns.disable_special_tokens,
        token_type_ids=True if ns.return_token_type_ids else None,
        offsets=ns.return_offsets_mapping,
    )
    return engine, choice


def options_of(ns: argparse.Namespace) -> OutputOptions:
    return OutputOptions(
        return_probabilities=ns.return_probabilities,
        return_raw_logits=ns.return_raw_logits,
        use_id2label=ns.use_id2label,
        v2_tensors=ns.v2_tensors,
        return_offsets_mapping=ns.return_offsets_mapping,
    )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m runtime.classify_server",
        description="Serve an encoder model (classification, fill-mask, embedding) with KServe's v1 and v2 "
        "protocols and answers.",
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
    p.add_argument(
        "--task", help=f"KServe's task: {', '.join(ENCODER_TASKS)} (default: from the architecture)"
    )
    for flag in (
        "return_probabilities",
        "return_raw_logits",
        "use_id2label",
        "trust_remote_code",
        "v2_tensors",
        "return_offsets_mapping",
        "disable_lower_case",
        "disable_special_tokens",
        "return_token_type_ids",
    ):
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
