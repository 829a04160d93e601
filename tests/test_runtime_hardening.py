"""`modelcache serve` against the attack on issue 17: each finding as a kind, through the launcher's
own entry (``build`` in-process, and the `modelcache serve` process where the exit code, the one
line on stderr or the log lines are the point)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from localmodel.errors import InvalidInput
from localmodel.layout import CacheLayout, storage_key
from runtime import args as vargs
from runtime import kserve
from runtime.launch import Launch
from runtime.plan import ModelShape, PlanRequest, kserve_worker_gpus, make_plan
from runtime.vllm_flags import check_values, vllm_task
from tests.test_runtime_cli import MODELCACHE, ROOT, clean_env, no_gpu_path, script
from tests.test_runtime_kserve import kserve_env, make, run, vllm_argv

T5 = {
    "architectures": ["T5ForConditionalGeneration"],
    "num_heads": 8,
    "num_layers": 6,
}


def flags_of(launch: Launch) -> tuple[vargs.Flag, ...]:
    return vargs.parse(vllm_argv(launch)).flags


def serve(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [MODELCACHE, "serve", *args], env=env, capture_output=True, text=True, timeout=60, cwd=ROOT
    )


def one_line_exit_2(done: subprocess.CompletedProcess[str], *words: str) -> str:
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("modelcache serve: "), lines
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


@pytest.fixture
def folder(tmp_path: Path) -> str:
    return str(make(tmp_path / "m"))


# -- 1. booleans with a value --------------------------------------------------------------------


def test_false_switches_reach_vllm_off_and_true_ones_bare(folder: str) -> None:
    off = run(
        [
            "--model_dir",
            folder,
            "--trust_remote_code=false",
            "--trust-remote-code=False",
            "--enforce-eager=false",
        ],
        gpus=("NVIDIA H100 80GB HBM3",),
    )
    argv = vllm_argv(off)
    assert not [t for t in argv if "trust-remote-code" in t or "enforce-eager" in t], argv
    on = run(["--model_dir", folder, "--trust_remote_code=true", "--enforce-eager=on"], gpus=("H100",))
    assert "--trust-remote-code" in vllm_argv(on) and "--enforce-eager" in vllm_argv(on)
    assert not [t for t in vllm_argv(on) if "=" in t and "true" in t.lower()]


def test_false_switch_of_the_encoder_server_is_off(tmp_path: Path) -> None:
    bert = {"architectures": ["BertForSequenceClassification"], "num_attention_heads": 12}
    launch = run(
        ["--model_dir", str(make(tmp_path / "b", bert)), "--return_probabilities=false", "--dry-run"]
    )
    assert "--return_probabilities" not in launch.command
    on = run(["--model_dir", str(make(tmp_path / "c", bert)), "--return_probabilities=yes", "--dry-run"])
    assert "--return_probabilities" in on.command


def test_a_word_strtobool_refuses_is_exit_2_naming_the_flag(folder: str, tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    env = clean_env(no_gpu_path(bin_dir))
    for flag in ("--trust_remote_code=maybe", "--enable_docs_url=maybe", "--configure_logging=2"):
        done = serve(["--model_dir", folder, flag, "--dry-run"], env)
        one_line_exit_2(done, flag.partition("=")[0], "expected true or false")


# -- 2. secrets ----------------------------------------------------------------------------------


def test_secret_values_stay_out_of_log_lines_and_the_dry_run_but_reach_vllm(
    folder: str, tmp_path: Path
) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "argv.json"
    fake = script(
        bin_dir,
        "fake-vllm",
        f"#!{sys.executable}\nimport json, sys\nopen({str(log)!r}, 'w').write(json.dumps(sys.argv[1:]))\n",
    )
    secrets = [
        "--api-key",
        "sk-live-0123456789",
        "--hf-token=hf_abcdefghijkl",
        "--ssl-keyfile-password=pw-42x",
    ]
    env = clean_env(no_gpu_path(bin_dir), MODELCACHE_VLLM=str(fake))
    done = serve(["--model_dir", folder, "--gpus-per-node", "1", *secrets], env)
    assert done.returncode == 0, done.stderr
    for value in ("sk-live-0123456789", "hf_abcdefghijkl", "pw-42x"):
        assert value not in done.stderr
    assert "--api-key '***'" in done.stderr or "--api-key ***" in done.stderr
    assert "--hf-token '***'" in done.stderr
    exec_argv = json.loads(log.read_text())
    assert exec_argv[exec_argv.index("--api-key") + 1] == "sk-live-0123456789"
    assert "--hf-token=hf_abcdefghijkl" in exec_argv or "hf_abcdefghijkl" in exec_argv
    # the dry run prints the plan with the same values hidden
    dry = serve(["--model_dir", folder, "--gpus-per-node", "1", *secrets, "--dry-run"], env)
    assert dry.returncode == 0, dry.stderr
    assert "sk-live-0123456789" not in dry.stdout and "hf_abcdefghijkl" not in dry.stdout
    command = json.loads(dry.stdout)["command"]
    assert command[command.index("--api-key") + 1] == "***"


# -- 3 is in tests/test_runtime_manifests.py (the multi-node example through the webhook) --------


# -- 4. vLLM's --task --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("task", "wanted"),
    [
        ("generate", ["--runner", "generate"]),
        ("embed", ["--runner", "pooling", "--convert", "embed"]),
        ("embedding", ["--runner", "pooling", "--convert", "embed"]),
        ("classify", ["--runner", "pooling", "--convert", "classify"]),
        ("score", ["--runner", "pooling"]),
        ("reward", ["--runner", "pooling"]),
        ("transcription", ["--runner", "generate"]),
        ("draft", ["--runner", "draft"]),
        ("auto", []),
    ],
)
def test_vllm_task_becomes_runner_and_convert(folder: str, task: str, wanted: list[str]) -> None:
    argv = vllm_argv(run(["--model_dir", folder, "--task", task, "--gpus-per-node", "1"]))
    assert "--task" not in argv
    got = [t for t in argv if t.startswith(("--runner", "--convert"))]
    assert got == [t for t in wanted if t.startswith("--")]
    for flag_name, val in zip(wanted[::2], wanted[1::2], strict=True):
        assert argv[argv.index(flag_name) + 1] == val


def test_runner_given_wins_over_the_task(folder: str) -> None:
    flags = flags_of(
        run(["--model_dir", folder, "--task=embed", "--runner", "generate", "--gpus-per-node", "1"])
    )
    assert vargs.value(flags, "--runner") == "generate" and vargs.value(flags, "--convert") == "embed"


def test_unknown_task_is_refused_as_kserves_verify_task_does(folder: str) -> None:
    with pytest.raises(InvalidInput, match=r"--task 'bogus': not a task KServe knows .* nor one of vLLM's"):
        run(["--model_dir", folder, "--task", "bogus"])
    assert vllm_task(vargs.parse(["--task", "text_generation"]).flags)[1] == ()  # KServe's: kept


# -- 5. --backend huggingface for a generative model --------------------------------------------


def test_t5_with_backend_huggingface_is_refused_naming_the_architecture(tmp_path: Path) -> None:
    t5 = str(make(tmp_path / "t5", T5))
    with pytest.raises(
        InvalidInput, match=r"--backend huggingface: T5ForConditionalGeneration is a generative"
    ):
        run(["--model_dir", t5, "--backend=huggingface", "--dry-run"])
    # without the backend (or with vllm) it is planned for vLLM
    assert run(["--model_dir", t5, "--backend", "vllm", "--gpus-per-node", "1"]).command[:2] == (
        "vllm",
        "serve",
    )


# -- 6. data parallelism -----------------------------------------------------------------------


def test_data_parallel_size_counts_in_the_world_size(folder: str) -> None:
    four = {"REQUEST_GPU_COUNT": "4"}
    dp = run(["--model_dir", folder, "--data-parallel-size", "2"], four, gpus=("H100",) * 4)
    p = dp.plan
    assert (p.tensor_parallel_size, p.pipeline_parallel_size, p.data_parallel_size) == (2, 1, 2)
    assert p.world_size == 4
    assert vargs.value(flags_of(dp), "--tensor-parallel-size") == "2"
    both = run(["--model_dir", folder, "-dp", "2", "-tp", "2"], four, gpus=("H100",) * 4)
    assert both.plan.world_size == 4 and both.plan.tensor_parallel_size == 2
    with pytest.raises(InvalidInput, match=r"--data-parallel-size=2 leaves 2 GPUs per replica"):
        run(["--model_dir", folder, "-dp", "2", "-tp", "4"], four, gpus=("H100",) * 4)
    with pytest.raises(InvalidInput, match=r"cannot be shared equally by 3 replicas"):
        run(["--model_dir", folder, "-dp", "3"], four, gpus=("H100",) * 4)


# -- 7. bounded counts and waits -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "env", "words"),
    [
        (["--gpus-per-node", "100000"], {}, ["--gpus-per-node", "from 1 to 1024"]),
        ([], {"REQUEST_GPU_COUNT": "100000"}, ["REQUEST_GPU_COUNT", "from 1 to 1024"]),
        (["--nodes", "0"], {}, ["--nodes", "from 1 to"]),
        (["--ray-timeout", "nan"], {}, ["--ray-timeout", "positive number of seconds"]),
        (["--ray-timeout", "-5"], {}, ["--ray-timeout", "positive number of seconds"]),
        (["--ray-timeout", "inf"], {}, ["--ray-timeout", "positive number of seconds"]),
    ],
)
def test_absurd_counts_and_timeouts_are_one_line_exit_2(
    folder: str, tmp_path: Path, args: list[str], env: dict[str, str], words: list[str]
) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    done = serve(["--model_dir", folder, *args, "--dry-run"], clean_env(no_gpu_path(bin_dir), **env))
    one_line_exit_2(done, *words)


def test_largest_count_searches_cheaply() -> None:
    # 52 heads never fill 1024 GPUs: the refusal names the nearest count that works, found by divisors.
    shape = ModelShape(attention_heads=52, kv_heads=52, layers=80)
    with pytest.raises(InvalidInput, match=r"use --gpus-per-node=1014 \(TP 26 x PP 39\)"):
        make_plan(shape, PlanRequest(1024, gpus_per_node_explicit=True))


# -- 8. KServe's head and workers --------------------------------------------------------------


def test_worker_gpus_follow_kserves_compute_ray_node_and_gpus() -> None:
    assert kserve_worker_gpus(8, 4, 4) == [2]  # head 4 set, workers of 2: ceil(8/2) = 4 nodes
    assert kserve_worker_gpus(8, 4, 5) == [1]  # only the head set: single-GPU workers, 4 + 1 nodes
    assert kserve_worker_gpus(8, 2, 2) == [6]  # workers of 6, head derived: 8 - 6 = 2
    assert kserve_worker_gpus(8, 4, 9) == []  # no such cluster


def test_uneven_tp_groups_never_span_workers(folder: str) -> None:
    four = run(["--model_dir", folder, "--dry-run"], kserve_env(4, 2, 4, 4))
    assert (four.plan.tensor_parallel_size, four.plan.pipeline_parallel_size) == (2, 4)
    assert any("4 does not divide the workers' 2 GPUs each" in n for n in four.notes)
    five = run(["--model_dir", folder, "--dry-run"], kserve_env(4, 2, 5, 4))
    assert (five.plan.tensor_parallel_size, five.plan.pipeline_parallel_size) == (1, 8)
    note = next(n for n in five.notes if "run as TP 1 x PP 8" in n)
    assert "the workers' 1 GPU each" in note and "4 does not divide 4" not in note
    with pytest.raises(InvalidInput, match=r"RAY_NODE_COUNT=9 .* KServe makes no such cluster"):
        run(["--model_dir", folder, "--dry-run"], kserve_env(4, 2, 9, 4))


# -- 9. the tokenizer check ----------------------------------------------------------------------


def test_tokenizer_check_uses_the_merged_value_and_what_offline_can_load(tmp_path: Path) -> None:
    model = make(tmp_path / "m")
    (model / "tokenizer.json").unlink()
    base = ["--model_dir", str(model), "--gpus-per-node", "1"]
    with pytest.raises(InvalidInput, match="has no tokenizer files"):
        run([*base, "--skip-tokenizer-init", "--no-skip-tokenizer-init"])
    assert run([*base, "--no-skip-tokenizer-init", "--skip-tokenizer-init"]).plan.tensor_parallel_size == 1
    with pytest.raises(InvalidInput, match="--tokenizer /nonexistent: no such folder"):
        run([*base, "--tokenizer", "/nonexistent"])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InvalidInput, match=f"--tokenizer {empty}: no tokenizer files"):
        run([*base, "--tokenizer", str(empty)])
    with pytest.raises(
        InvalidInput, match=r"--tokenizer org/tok: a Hugging Face repo id, but vLLM runs offline"
    ):
        run([*base, "--tokenizer", "org/tok"], {"HOME": str(tmp_path)})
    # in the Hugging Face cache, as vLLM finds it offline
    hub = tmp_path / "hub"
    (hub / "models--org--tok" / "snapshots" / "abc").mkdir(parents=True)
    found = run([*base, "--tokenizer", "org/tok"], {"HF_HUB_CACHE": str(hub)})
    assert vargs.value(flags_of(found), "--tokenizer") == "org/tok"
    # in the modelcache cache: served from its folder
    cache = tmp_path / "cache"
    tok = make(CacheLayout(cache).model_dir(storage_key("hf://org/tok")))
    (make(CacheLayout(cache).model_dir(storage_key("hf://org/m"))) / "tokenizer.json").unlink()
    by_uri = ["--model-uri", "hf://org/m", "--cache-dir", str(cache), "--gpus-per-node", "1"]
    cached = run([*by_uri, "--tokenizer", "org/tok"])
    assert vargs.value(flags_of(cached), "--tokenizer") == str(tok)


# -- 10. values the launcher plans with ----------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--http_port=abc"], "--port (KServe's --http_port) 'abc'"),
        (["--port="], "--port (KServe's --http_port) ''"),
        (["--http_port", "70000"], "from 1 to 65535"),
        (["--model_name="], "--served-model-name (KServe's --model_name) is empty"),
        (["--max_length", "abc"], "--max-model-len (KServe's --max_length) 'abc'"),
        (["--dtype=BFloat16"], "--dtype 'BFloat16': expected one of"),
        (["--max_log_len", "x"], "--max-log-len 'x'"),
    ],
)
def test_values_are_checked_before_vllm_starts(argv: list[str], words: str) -> None:
    with pytest.raises(InvalidInput, match=words.replace("(", r"\(").replace(")", r"\)")):
        check_values(kserve.translate(vargs.parse(argv).flags).flags)


def test_values_vllm_accepts_pass(folder: str) -> None:
    for ok in (["--max-model-len", "8k"], ["--max-model-len", "-1"], ["--dtype", "half"], ["--port", "1"]):
        check_values(vargs.parse(ok).flags)


# -- 12. messages ---------------------------------------------------------------------------------


def test_messages_say_what_is_true(folder: str, tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match=r"nvidia-smi sees no GPU here") as none:
        run(["--model_dir", folder], {"REQUEST_GPU_COUNT": "1"}, gpus=())
    assert "REQUEST_GPU_COUNT=0" not in str(none.value)
    with pytest.raises(InvalidInput, match=r"--model_id is empty"):
        run(["--model_id=", "--cache-dir", str(tmp_path)])
    with pytest.raises(InvalidInput) as cache_only:
        run(["--cache-dir", str(tmp_path)])
    assert "--model_dir" not in str(cache_only.value)
    cache = tmp_path / "cache"
    m = make(CacheLayout(cache).model_dir(storage_key("hf://org/m")))
    assert run(["--model_id=hf://org/m", "--cache-dir", str(cache), "--gpus-per-node", "1"]).model_dir == m
    one = run(["--model_dir", folder, "--dry-run", "-tp", "1"], {"REQUEST_GPU_COUNT": "1"}, gpus=("H100",))
    assert all("1 GPUs" not in n for n in one.notes)
    shape = ModelShape(attention_heads=3, kv_heads=3, layers=1)
    with pytest.raises(InvalidInput) as few:
        make_plan(shape, PlanRequest(2, gpus_per_node_explicit=True))
    assert "1 layer allows at most 1 pipeline stage" in str(few.value)


# -- 14. smaller ones ----------------------------------------------------------------------------


def test_worker_on_a_one_node_plan_is_refused(folder: str) -> None:
    with pytest.raises(InvalidInput, match=r"--worker with RAY_NODE_COUNT=1"):
        run(["--model_dir", folder, "--worker"], {"RAY_NODE_COUNT": "1", "REQUEST_GPU_COUNT": "1"})
    with pytest.raises(InvalidInput, match=r"--worker: the plan is one node"):
        run(["--model_dir", folder, "--worker", "--gpus-per-node", "1"])


def test_vision_tower_heads_are_checked_against_tp(tmp_path: Path) -> None:
    vl: dict[str, Any] = {
        "architectures": ["LlavaForConditionalGeneration"],
        "text_config": {"num_attention_heads": 32, "num_key_value_heads": 8, "num_hidden_layers": 32},
        "vision_config": {"num_attention_heads": 12, "num_hidden_layers": 24},
    }
    shape = ModelShape.from_config(vl)
    assert shape.vision_heads == 12
    with pytest.raises(
        InvalidInput, match=r"the vision tower's 12 attention heads are not divisible by .* 8"
    ):
        run(["--model_dir", str(make(tmp_path / "vl", vl)), "-tp", "8", "--gpus-per-node", "8"])
    assert run(["--model_dir", str(make(tmp_path / "v4", vl)), "-tp", "4", "--gpus-per-node", "4"]).plan
