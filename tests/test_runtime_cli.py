"""`modelcache serve` end to end: the dry-run JSON, KServe's environment, and the real exec paths with
stand-ins for the external `vllm`, `ray` and `nvidia-smi` commands (scripts that record how they were
called)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from localmodel.layout import CacheLayout, storage_key
from modelcache.cli import main as modelcache_main
from tests.test_runtime_preflight import make_model, write_manifest

ROOT = Path(__file__).resolve().parents[1]
MODELCACHE = str(Path(sys.executable).parent / "modelcache")
DATA = Path(__file__).parent / "data" / "runtime"
KEYS = {
    "tensor_parallel_size",
    "pipeline_parallel_size",
    "nodes",
    "gpus_per_node",
    "executor",
    "command",
    "env",
    "notes",
}
KSERVE_ENV = (
    "TENSOR_PARALLEL_SIZE",
    "PIPELINE_PARALLEL_SIZE",
    "RAY_NODE_COUNT",
    "REQUEST_GPU_COUNT",
    "HEAD_SVC",
    "POD_IP",
    "MODEL_NAME",
    "MODEL_DIR",
    "MODEL_ID",
)


@pytest.fixture
def model(tmp_path: Path) -> Path:
    make_model(tmp_path / "models" / "llama")
    return tmp_path / "models" / "llama"


@pytest.fixture
def bin_dir(tmp_path: Path) -> Path:
    d = tmp_path / "bin"
    d.mkdir()
    return d


def script(bin_dir: Path, name: str, body: str) -> Path:
    path = bin_dir / name
    path.write_text(body)
    path.chmod(0o755)
    return path


def clean_env(path: str, **extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in KSERVE_ENV and not k.startswith(("VLLM_", "MODELCACHE_"))
    }
    env["PATH"] = path
    env.update(extra)
    return env


def serve(args: list[str], env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [MODELCACHE, "serve", *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


def dry_run(args: list[str], env: dict[str, str]) -> dict[str, Any]:
    done = serve([*args, "--dry-run"], env)
    assert done.returncode == 0, done.stderr
    out: dict[str, Any] = json.loads(done.stdout)
    assert set(out) >= KEYS
    return out


def no_gpu_path(bin_dir: Path) -> str:
    path = f"{bin_dir}:/usr/bin:/bin"
    if shutil.which("nvidia-smi", path=path):
        pytest.skip("this machine has nvidia-smi")
    return path


def test_dry_run_through_the_dispatcher(
    model: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in KSERVE_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("VLLM_CACHE_ROOT", raising=False)
    monkeypatch.delenv("MODELCACHE_VLLM", raising=False)
    code = modelcache_main(
        ["serve", "--model_dir", str(model), "--gpus-per-node", "8", "--dry-run", "--max_model_len", "4096"]
    )
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert (
        out["tensor_parallel_size"],
        out["pipeline_parallel_size"],
        out["nodes"],
        out["gpus_per_node"],
    ) == (8, 1, 1, 8)
    assert out["executor"] == "mp"
    assert out["command"] == [
        "vllm",
        "serve",
        str(model),
        "--port",
        "8080",
        "--served-model-name",
        "model",
        "--disable-fastapi-docs",
        "--max-model-len",
        "4096",
        "--dtype",
        "float16",
        "--tensor-parallel-size",
        "8",
        "--pipeline-parallel-size",
        "1",
        "--distributed-executor-backend",
        "mp",
    ]
    assert out["env"] == {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_CACHE_ROOT": str(model.parent / ".vllm-cache" / "llama"),
    }


def test_issue_example_tp16_on_8_gpu_nodes(model: Path, bin_dir: Path) -> None:
    out = dry_run(
        ["--model_dir", str(model), "-tp", "16"],
        clean_env(no_gpu_path(bin_dir), REQUEST_GPU_COUNT="8", RAY_NODE_COUNT="2"),
    )
    assert (out["tensor_parallel_size"], out["pipeline_parallel_size"], out["nodes"], out["executor"]) == (
        8,
        2,
        2,
        "ray",
    )
    assert any("split into TP 8 x PP 2" in n for n in out["notes"])
    assert out["role"] == "head"
    assert out["ray_start"][:3] == ["ray", "start", "--head"]
    assert "--num-gpus=8" in out["ray_start"]


def test_near_miss_of_a_planned_flag_is_named(model: Path, bin_dir: Path) -> None:
    out = dry_run(
        ["--model_dir", str(model), "--tensor-paralel-size", "2"],
        clean_env(no_gpu_path(bin_dir), REQUEST_GPU_COUNT="1"),
    )
    assert out["tensor_parallel_size"] == 1  # the misspelt flag is not read
    assert (
        "--tensor-paralel-size is not a flag the launcher reads (did you mean --tensor-parallel-size?); "
        "passed to vLLM as given"
    ) in out["notes"]
    i = out["command"].index("--tensor-paralel-size")
    assert out["command"][i + 1] == "2"


def test_folder_without_tokenizer_needs_one_named(model: Path, bin_dir: Path) -> None:
    (model / "tokenizer.json").unlink()
    env = clean_env(no_gpu_path(bin_dir), REQUEST_GPU_COUNT="1")
    done = serve(["--model_dir", str(model), "--dry-run"], env)
    assert done.returncode == 2
    assert done.stderr.startswith(f"modelcache serve: {model} has no tokenizer files")
    tokenizer = model.parent / "tok"
    tokenizer.mkdir()
    (tokenizer / "tokenizer.json").write_text("{}")
    for given in (["--tokenizer", str(tokenizer)], ["--skip-tokenizer-init"]):
        command = dry_run(["--model_dir", str(model), *given], env)["command"]
        i = command.index(given[0])
        assert command[i : i + len(given)] == given


def test_kserve_runtime_and_service_args_merge(model: Path, bin_dir: Path) -> None:
    # KServe appends the runtime's args, then the InferenceService's: --port twice, two spellings.
    runtime_args = ["--model_name=llama", "--http_port=8080", "--max-model-len=2048"]
    service_args = ["--port", "9000", "--max_model_len", "8192", "--enable-prefix-caching"]
    env = clean_env(no_gpu_path(bin_dir), TENSOR_PARALLEL_SIZE="2", POD_IP="10.1.2.3")
    out = dry_run(["--model_dir", str(model), *runtime_args, *service_args], env)
    cmd = out["command"]
    assert cmd.count("--port") == 1 and cmd[cmd.index("--port") + 1] == "9000"
    assert cmd.count("--max-model-len") == 1 and cmd[cmd.index("--max-model-len") + 1] == "8192"
    assert cmd[cmd.index("--served-model-name") + 1] == "llama"
    assert cmd[cmd.index("--tensor-parallel-size") + 1] == "2"
    assert "--enable-prefix-caching" in cmd
    assert out["env"]["VLLM_HOST_IP"] == "10.1.2.3"
    assert out["gpus_per_node"] == 2  # no GPU here: planned for the TP asked
    assert any("no GPU detected" in n for n in out["notes"])


def test_command_line_wins_over_environment(model: Path, bin_dir: Path) -> None:
    env = clean_env(no_gpu_path(bin_dir), TENSOR_PARALLEL_SIZE="8", REQUEST_GPU_COUNT="4")
    out = dry_run(["--model_dir", str(model), "--tensor_parallel_size", "4"], env)
    assert out["tensor_parallel_size"] == 4


def test_model_uri_and_cache_dir(tmp_path: Path, bin_dir: Path) -> None:
    uri = "hf://meta-llama/Llama-3.1-8B-Instruct"
    layout = CacheLayout(tmp_path / "cache")
    folder = layout.model_dir(storage_key(uri))
    make_model(folder)
    write_manifest(folder, layout.manifest_file(storage_key(uri)))
    out = dry_run(
        ["--model-uri", uri, "--cache-dir", str(layout.root), "--gpus-per-node", "1"],
        clean_env(no_gpu_path(bin_dir)),
    )
    assert out["model_dir"] == str(folder)
    assert out["command"][2] == str(folder)
    assert out["env"]["VLLM_CACHE_ROOT"] == str(layout.hidden / "compile-cache" / storage_key(uri))


def test_vllm_cache_root_from_environment_is_kept(model: Path, bin_dir: Path) -> None:
    out = dry_run(
        ["--model_dir", str(model), "--gpus-per-node", "1"],
        clean_env(no_gpu_path(bin_dir), VLLM_CACHE_ROOT="/x"),
    )
    assert "VLLM_CACHE_ROOT" not in out["env"]
    assert any("VLLM_CACHE_ROOT=/x kept" in n for n in out["notes"])


@pytest.mark.parametrize(
    ("args", "env", "words"),
    [
        (["--model_dir", "{missing}"], {}, ["does not exist"]),
        # MODELCACHE_VLLM is split only where vLLM runs: a bad one does not hide the real fault ...
        (["--model_dir", "{missing}"], {"MODELCACHE_VLLM": "python -m 'vllm"}, ["does not exist"]),
        # ... and where vLLM runs, it is named, with the fix
        (
            ["--model_dir", "{model}", "--gpus-per-node", "1"],
            {"MODELCACHE_VLLM": "python -m 'vllm"},
            ['MODELCACHE_VLLM="python -m \'vllm"', "No closing quotation", "close each quote"],
        ),
        (["--model-uri", "hf://a/b"], {}, ["--model-uri needs --cache-dir"]),
        (["--model_dir", "{model}", "--model-uri", "hf://a/b", "--cache-dir", "/c"], {}, ["both given"]),
        (["--model_dir", "{model}", "stray"], {}, ["unexpected argument 'stray'"]),
        (["--model_dir", "{model}", "--nodes", "two"], {}, ["--nodes", "'two': expected a whole number"]),
        (["--model_dir", "{model}"], {"TENSOR_PARALLEL_SIZE": "eight"}, ["TENSOR_PARALLEL_SIZE='eight'"]),
        (
            ["--model_dir", "{model}", "-tp", "6", "--gpus-per-node", "8"],
            {},
            ["32 attention heads", "tensor parallel size 6"],
        ),
        (
            ["--model_dir", "{model}", "-tp", "4"],
            {"REQUEST_GPU_COUNT": "8"},
            ["REQUEST_GPU_COUNT=8 asks for 1 node x 8 GPUs"],
        ),
        (
            [
                "--model_dir",
                "{model}",
                "--gpus-per-node",
                "8",
                "--dtype",
                "bfloat16",
                "--distributed-executor-backend",
                "mp",
                "--nodes",
                "2",
            ],
            {},
            ["across 2 nodes"],
        ),
        (
            ["--worker", "--model_dir", "{model}", "--gpus-per-node", "1", "--nodes", "2"],
            {},
            ["HEAD_SVC is not set"],
        ),
    ],
)
def test_bad_input_exits_2_with_one_line(
    model: Path, tmp_path: Path, bin_dir: Path, args: list[str], env: dict[str, str], words: list[str]
) -> None:
    args = [a.format(model=model, missing=tmp_path / "missing") for a in args]
    done = serve([*args, "--dry-run"], clean_env(no_gpu_path(bin_dir), **env))
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("modelcache serve: ")
    for word in words:
        assert word in lines[0]


def test_missing_shard_refused_before_anything_starts(model: Path, bin_dir: Path, tmp_path: Path) -> None:
    log = tmp_path / "vllm.log"
    fake = script(bin_dir, "fake-vllm", f"#!/bin/sh\necho started >> {log}\n")
    (model / "model-00002-of-00003.safetensors").unlink()
    done = serve(
        ["--model_dir", str(model), "--gpus-per-node", "1"],
        clean_env(no_gpu_path(bin_dir), MODELCACHE_VLLM=str(fake)),
    )
    assert done.returncode == 2
    assert "model-00002-of-00003.safetensors" in done.stderr
    assert not log.exists()


def test_gpus_detected_with_nvidia_smi(model: Path, bin_dir: Path) -> None:
    script(bin_dir, "nvidia-smi", "#!/bin/sh\nfor i in 1 2 3 4; do echo 'NVIDIA H100 80GB HBM3'; done\n")
    out = dry_run(["--model_dir", str(model)], clean_env(f"{bin_dir}:/usr/bin:/bin"))
    assert (out["gpus_per_node"], out["tensor_parallel_size"]) == (4, 4)
    out = dry_run(
        ["--model_dir", str(model)], clean_env(f"{bin_dir}:/usr/bin:/bin", CUDA_VISIBLE_DEVICES="0,1")
    )
    assert out["gpus_per_node"] == 2


def test_gpu_detection_refusals(model: Path, bin_dir: Path) -> None:
    script(bin_dir, "nvidia-smi", "#!/bin/sh\necho 'NVIDIA A100-SXM4-80GB'\necho 'NVIDIA H100 80GB HBM3'\n")
    done = serve(["--model_dir", str(model), "--dry-run"], clean_env(f"{bin_dir}:/usr/bin:/bin"))
    assert done.returncode == 2 and "different models" in done.stderr
    script(bin_dir, "nvidia-smi", "#!/bin/sh\necho 'NVIDIA H100 80GB HBM3'\n")
    done = serve(
        ["--model_dir", str(model), "--dry-run"], clean_env(f"{bin_dir}:/usr/bin:/bin", REQUEST_GPU_COUNT="8")
    )
    assert done.returncode == 2 and "REQUEST_GPU_COUNT=8 but nvidia-smi sees 1 GPUs" in done.stderr
    script(bin_dir, "nvidia-smi", "#!/bin/sh\necho 'Tesla V100-SXM2-32GB'\n")
    done = serve(
        ["--model_dir", str(model), "--dry-run", "--dtype", "bfloat16"], clean_env(f"{bin_dir}:/usr/bin:/bin")
    )
    assert done.returncode == 2 and "no bfloat16" in done.stderr


def test_no_gpu_without_dry_run_is_refused(model: Path, bin_dir: Path) -> None:
    done = serve(["--model_dir", str(model)], clean_env(no_gpu_path(bin_dir)))
    assert done.returncode == 2 and "pass --gpus-per-node" in done.stderr


FAKE_VLLM = """#!{python}
import json, os, sys
with open({log!r}, "a") as f:
    f.write(json.dumps({{"argv": sys.argv[1:], "pid": os.getpid(), "env": {{k: os.environ.get(k) for k in
        ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "VLLM_CACHE_ROOT", "VLLM_HOST_IP")}}}}) + "\\n")
"""


def test_single_node_execs_vllm(model: Path, bin_dir: Path, tmp_path: Path) -> None:
    log = tmp_path / "vllm.jsonl"
    fake = script(bin_dir, "fake-vllm", FAKE_VLLM.format(python=sys.executable, log=str(log)))
    proc = subprocess.Popen(
        [MODELCACHE, "serve", "--model_dir", str(model), "--gpus-per-node", "2", "--port", "9000"],
        env=clean_env(no_gpu_path(bin_dir), MODELCACHE_VLLM=str(fake), POD_IP="10.0.0.9"),
        stderr=subprocess.PIPE,
        text=True,
    )
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    (record,) = [json.loads(line) for line in log.read_text().splitlines()]
    assert record["pid"] == proc.pid  # exec'd, not a child: signals reach vLLM directly
    assert record["argv"][:2] == ["serve", str(model)]
    assert record["argv"].count("--port") == 1
    assert record["env"] == {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_CACHE_ROOT": str(model.parent / ".vllm-cache" / "llama"),
        "VLLM_HOST_IP": "10.0.0.9",
    }
    assert "exec: " in stderr and "--tensor-parallel-size 2" in stderr  # the effective command is logged


def test_missing_vllm_exits_1(model: Path, bin_dir: Path) -> None:
    done = serve(
        ["--model_dir", str(model), "--gpus-per-node", "1"],
        clean_env(no_gpu_path(bin_dir), MODELCACHE_VLLM="/nonexistent/vllm"),
    )
    assert done.returncode == 1
    assert "is not on PATH" in done.stderr.splitlines()[-1]


FAKE_RAY = """#!/bin/sh
echo "$@" >> {log}
case "$1" in
  start) exit 0 ;;
  status) cat {status}; exit 0 ;;
  health-check) exit 0 ;;
esac
exit 3
"""


def test_head_starts_ray_waits_for_gpus_then_execs_vllm(model: Path, bin_dir: Path, tmp_path: Path) -> None:
    ray_log, vllm_log = tmp_path / "ray.log", tmp_path / "vllm.jsonl"
    script(bin_dir, "ray", FAKE_RAY.format(log=ray_log, status=DATA / "ray_status_two_nodes.txt"))
    fake = script(bin_dir, "fake-vllm", FAKE_VLLM.format(python=sys.executable, log=str(vllm_log)))
    env = clean_env(
        no_gpu_path(bin_dir),
        MODELCACHE_VLLM=str(fake),
        TENSOR_PARALLEL_SIZE="16",
        REQUEST_GPU_COUNT="8",
        RAY_NODE_COUNT="2",
        POD_IP="10.0.0.1",
    )
    done = serve(["--model_dir", str(model)], env)
    assert done.returncode == 0, done.stderr
    assert ray_log.read_text().splitlines() == [
        "start --head --port=6379 --num-gpus=8 --disable-usage-stats --node-ip-address=10.0.0.1",
        "status",
    ]
    (record,) = [json.loads(line) for line in vllm_log.read_text().splitlines()]
    argv = record["argv"]
    assert argv[argv.index("--tensor-parallel-size") + 1] == "8"
    assert argv[argv.index("--pipeline-parallel-size") + 1] == "2"
    assert argv[argv.index("--distributed-executor-backend") + 1] == "ray"
    assert "Ray reports 2 nodes and 16 GPUs (H100); need 16" in done.stderr


def test_head_times_out_naming_what_it_saw(model: Path, bin_dir: Path, tmp_path: Path) -> None:
    script(
        bin_dir, "ray", FAKE_RAY.format(log=tmp_path / "ray.log", status=DATA / "ray_status_head_only.txt")
    )
    env = clean_env(
        no_gpu_path(bin_dir), MODELCACHE_VLLM="/nonexistent", REQUEST_GPU_COUNT="8", RAY_NODE_COUNT="2"
    )
    done = serve(["--model_dir", str(model), "--ray-timeout", "1"], env)
    assert done.returncode == 1
    assert "for Ray to report 16 GPUs; it saw 1 node and 8 GPUs (H100)" in done.stderr.splitlines()[-1]


def test_worker_waits_for_head_then_joins(model: Path, bin_dir: Path, tmp_path: Path) -> None:
    ray_log = tmp_path / "ray.log"
    script(bin_dir, "ray", FAKE_RAY.format(log=ray_log, status=DATA / "ray_status_two_nodes.txt"))
    env = clean_env(
        no_gpu_path(bin_dir),
        HEAD_SVC="llama-head",
        REQUEST_GPU_COUNT="8",
        RAY_NODE_COUNT="2",
        POD_IP="10.0.0.2",
    )
    out = dry_run(["--worker", "--model_dir", str(model)], env)
    assert out["role"] == "worker"
    assert out["command"] == [
        "ray",
        "start",
        "--address=llama-head:6379",
        "--num-gpus=8",
        "--block",
        "--disable-usage-stats",
        "--node-ip-address=10.0.0.2",
    ]
    done = serve(["--worker", "--model_dir", str(model)], env)
    assert done.returncode == 0, done.stderr
    assert ray_log.read_text().splitlines() == [
        "health-check --address=llama-head:6379",
        "start --address=llama-head:6379 --num-gpus=8 --block --disable-usage-stats "
        "--node-ip-address=10.0.0.2",
    ]


def test_multi_node_plan_needs_a_node_count_to_run(model: Path, bin_dir: Path) -> None:
    done = serve(
        ["--model_dir", str(model), "-tp", "16", "--gpus-per-node", "8"], clean_env(no_gpu_path(bin_dir))
    )
    assert done.returncode == 2
    assert "the plan needs 2 nodes" in done.stderr and "RAY_NODE_COUNT=2" in done.stderr


def test_help_exits_0(bin_dir: Path) -> None:
    done = serve(["--help"], clean_env(no_gpu_path(bin_dir)))
    assert done.returncode == 0 and "--model-uri" in done.stdout
