"""KServe's Hugging Face server flags and environment, as `modelcache serve` takes them (issue 17 §2):
the table in runtime/kserve.py against a fixture of every flag KServe's server defines, the table in
docs/runtime.md against both, each flag's translation, MODEL_NAME/MODEL_DIR/MODEL_ID with KServe's
precedence, --model_id resolved in a cache, and a head and workers with different GPU counts."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from localmodel.errors import InvalidInput
from localmodel.layout import CacheLayout, storage_key
from runtime import args as vargs
from runtime import kserve
from runtime.cli import build
from runtime.launch import Launch
from tests.test_runtime_preflight import write_safetensors

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = Path(__file__).parent / "data" / "runtime" / "kserve_hf_flags.json"
LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "num_hidden_layers": 32,
}


def make(folder: Path, config: dict[str, Any] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config or LLAMA))
    (folder / "tokenizer.json").write_text('{"version": "1.0"}')
    write_safetensors(folder / "model.safetensors", {"w": 64})
    return folder


def run(argv: list[str], env: dict[str, str] | None = None, gpus: tuple[str, ...] | None = None) -> Launch:
    return build(argv, {"PATH": "/nonexistent", **(env or {})}, gpus=lambda _e: gpus, vllm_here=lambda: False)


def vllm_argv(launch: Launch) -> list[str]:
    assert launch.command[:2] == ("vllm", "serve"), launch.command
    return list(launch.command[3:])


def fixture() -> list[dict[str, Any]]:
    flags: list[dict[str, Any]] = json.loads(FIXTURE.read_text())["flags"]
    return flags


# -- the table ----------------------------------------------------------------------------------


def test_every_flag_kserve_defines_is_in_the_table_and_nothing_else() -> None:
    assert [f["flag"] for f in fixture()] == [f.name for f in kserve.FLAGS]
    assert len(fixture()) == 42
    # what the fixture was written from: the two parsers, their files and lines
    files = {f["file"] for f in fixture()}
    assert files == {
        "python/kserve/kserve/model_server.py",
        "python/huggingfaceserver/huggingfaceserver/__main__.py",
    }


def test_kserve_switches_take_no_value_and_valued_flags_do() -> None:
    # `--return_probabilities /mnt/models` must not eat a value; `--enable_docs_url true` must keep one.
    for f in fixture():
        key = vargs.canonical(f["flag"])[0]
        assert (key in vargs.BOOLEAN_FLAGS) == (not f["takes_value"]), f["flag"]
    parsed = vargs.parse(["--enable_docs_url", "true", "--disable_lower_case", "--dtype", "half"])
    assert [(p.key, p.values) for p in parsed.flags] == [
        ("--enable-docs-url", ("true",)),
        ("--disable-lower-case", ()),
        ("--dtype", ("half",)),
    ]


def _docs_table() -> dict[str, tuple[str, str]]:
    text = (ROOT / "docs" / "runtime.md").read_text()
    section = text.split("### KServe's Hugging Face server flags", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        m = re.fullmatch(r"\| `(--[\w-]+)` \| (\w+) \| (.*) \|", line.strip())
        if m:
            rows[m[1]] = (m[2], m[3])
    return rows


def test_docs_table_lists_every_kserve_flag_with_what_the_launcher_does() -> None:
    rows = _docs_table()
    assert list(rows) == [f.name for f in kserve.FLAGS]
    for f in kserve.FLAGS:
        action, what = rows[f.name]
        assert action == f.action, f.name
        if f.target is not None:
            assert f"`{f.target}`" in what, (f.name, what)


# -- each flag's translation --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "wanted", "absent"),
    [
        (["--model_revision", "abc123"], ["--revision", "abc123"], []),
        (["--tokenizer_revision=v2"], ["--tokenizer-revision", "v2"], []),
        (["--max_length", "2048"], ["--max-model-len", "2048"], []),
        (["--max_length", "2048", "--max_model_len", "4096"], ["--max-model-len", "4096"], ["2048"]),
        (["--trust_remote_code"], ["--trust-remote-code"], []),
        (["--dtype", "float16"], ["--dtype", "float16"], []),
        (["--max_log_len", "100"], ["--max-log-len", "100"], []),
        (["--log_config_file", "/etc/log.json"], ["--log-config-file", "/etc/log.json"], []),
        # KServe serves no /docs by default: --disable-fastapi-docs unless --enable_docs_url true.
        ([], ["--disable-fastapi-docs"], []),
        (["--enable_docs_url", "false"], ["--disable-fastapi-docs"], []),
        (["--enable_docs_url", "True"], [], ["--disable-fastapi-docs"]),
        # One setting under two names: the later wins.
        (["--enable_docs_url=true", "--disable-fastapi-docs"], ["--disable-fastapi-docs"], []),
        (["--disable-fastapi-docs", "--enable_docs_url=yes"], [], ["--disable-fastapi-docs"]),
        (["--enable-log-requests", "--disable_log_requests"], [], ["--enable-log-requests"]),
        (["--disable_log_requests", "--enable-log-requests"], ["--enable-log-requests"], []),
        # --configure_logging false: KServe leaves logging alone and never reads the file.
        (["--log_config_file=/x.json", "--configure_logging=false"], [], ["--log-config-file", "/x.json"]),
        (["--configure_logging=false", "--log_config_file=/x.json"], [], ["--log-config-file", "/x.json"]),
        (["--configure_logging=true", "--log_config_file=/x.json"], ["--log-config-file", "/x.json"], []),
    ],
)
def test_kserve_flags_with_a_vllm_meaning_are_translated(
    tmp_path: Path, given: list[str], wanted: list[str], absent: list[str]
) -> None:
    launch = run(["--model_dir", str(make(tmp_path / "m")), "--gpus-per-node", "1", *given])
    argv = vllm_argv(launch)
    assert argv[:4] == ["--port", "8080", "--served-model-name", "model"]
    at = next((i for i in range(len(argv)) if argv[i : i + len(wanted)] == wanted), None)
    assert at is not None, (wanted, argv)
    for token in absent:
        assert token not in argv
    # each flag once
    keys = [f.key for f in vargs.parse(argv).flags]
    assert len(keys) == len(set(keys))


def test_server_only_flags_are_dropped_and_named(tmp_path: Path) -> None:
    server_only = [
        "--workers=2",
        "--grpc_port",
        "8081",
        "--enable_grpc",
        "false",
        "--max_threads",
        "8",
        "--disable_log_requests",
        "--predictor_host",
        "x:80",
        "--event-loop",
        "uvloop",
        "--backend",
        "vllm",
        "--return_probabilities",
        "--disable_lower_case",
    ]
    launch = run(["--model_dir", str(make(tmp_path / "m")), "--gpus-per-node", "1", *server_only])
    argv = vllm_argv(launch)
    assert argv == [
        "--port",
        "8080",
        "--served-model-name",
        "model",
        "--disable-fastapi-docs",
        "--dtype",
        "float16",
        "--tensor-parallel-size",
        "1",
        "--pipeline-parallel-size",
        "1",
        "--distributed-executor-backend",
        "mp",
    ]
    notes = "\n".join(launch.notes)
    for name in ("--workers", "--grpc_port", "--enable_grpc", "--max_threads"):
        assert name in notes, name
    assert "--backend, --return-probabilities, --disable-lower-case: KServe's encoder-model flags" in notes


def test_timeout_keep_alive_becomes_vllms_variable(tmp_path: Path) -> None:
    launch = run(
        ["--model_dir", str(make(tmp_path / "m")), "--gpus-per-node", "1", "--timeout-keep-alive", "90"]
    )
    assert launch.env["VLLM_HTTP_TIMEOUT_KEEP_ALIVE"] == "90"
    assert "--timeout-keep-alive" not in launch.command


# -- MODEL_NAME, MODEL_DIR, MODEL_ID ------------------------------------------------------------


def test_model_name_env_is_below_the_model_name_flag(tmp_path: Path) -> None:
    folder = str(make(tmp_path / "m"))
    by_env = run(["--model_dir", folder, "--gpus-per-node", "1"], {"MODEL_NAME": "llama"})
    assert vllm_argv(by_env)[2:4] == ["--served-model-name", "llama"]
    by_flag = run(
        ["--model_dir", folder, "--gpus-per-node", "1", "--model_name=svc"], {"MODEL_NAME": "llama"}
    )
    assert vllm_argv(by_flag)[2:4] == ["--served-model-name", "svc"]


def test_model_dir_env_over_model_id_env_and_the_flag_over_both(tmp_path: Path) -> None:
    a, b = str(make(tmp_path / "a")), str(make(tmp_path / "b"))
    env = {"MODEL_DIR": a, "MODEL_ID": "org/other"}
    assert run(["--gpus-per-node", "1"], env).model_dir == Path(a)
    assert run(["--gpus-per-node", "1", "--model_dir", b], env).model_dir == Path(b)


def cache_with(tmp_path: Path, uri: str, config: dict[str, Any] | None = None) -> tuple[Path, Path]:
    cache = tmp_path / "cache"
    folder = make(CacheLayout(cache).model_dir(storage_key(uri)), config)
    return cache, folder


def test_model_id_resolves_to_its_cached_folder(tmp_path: Path) -> None:
    cache, folder = cache_with(tmp_path, "hf://org/llama")
    # the runtime's own --model_dir=/mnt/models is there too: KServe's --model_id wins over it
    launch = run(
        [
            "--model_dir=/mnt/models",
            "--model_id",
            "org/llama",
            "--cache-dir",
            str(cache),
            "--gpus-per-node",
            "1",
        ]
    )
    assert launch.model_dir == folder
    assert launch.command[2] == str(folder)
    assert any("the cached folder of hf://org/llama" in n for n in launch.notes)


def test_model_id_found_in_the_cache_beside_the_model_dir(tmp_path: Path) -> None:
    cache, folder = cache_with(tmp_path, "hf://org/llama")
    other = make(CacheLayout(cache).model_dir(storage_key("hf://org/other")))
    launch = run(["--model_dir", str(other), "--model_id", "org/llama", "--gpus-per-node", "1"])
    assert launch.model_dir == folder
    with pytest.raises(InvalidInput, match=f"hf://org/absent is not cached in {cache}"):
        run(["--model_dir", str(other), "--model_id", "org/absent"])


def test_model_id_env_and_revision_name_the_uri(tmp_path: Path) -> None:
    cache, folder = cache_with(tmp_path, "hf://org/llama:v2")
    launch = run(
        ["--cache-dir", str(cache), "--model_revision", "v2", "--gpus-per-node", "1"],
        {"MODEL_ID": "org/llama"},
    )
    assert launch.model_dir == folder
    assert vargs.value(vargs.parse(list(launch.command[3:])).flags, "--revision") == "v2"


def test_model_id_not_cached_says_so_and_where_to_look(tmp_path: Path) -> None:
    cache, _ = cache_with(tmp_path, "hf://org/llama")
    with pytest.raises(InvalidInput) as e:
        run(["--model_id", "org/mistral", "--cache-dir", str(cache)])
    text = str(e.value)
    assert f"hf://org/mistral is not cached in {cache} (no models/{storage_key('hf://org/mistral')})" in text
    assert f"modelcache status --cache-dir {cache}" in text


def test_model_id_without_a_cache_serves_the_mounted_folder_or_says_how(tmp_path: Path) -> None:
    folder = make(tmp_path / "mnt")
    launch = run(["--model_dir", str(folder), "--model_id", "org/llama", "--gpus-per-node", "1"])
    assert launch.model_dir == folder
    assert any("does not download" in n for n in launch.notes)
    with pytest.raises(InvalidInput, match=r"--model_id org/llama: this runtime serves cached models"):
        run(["--model_dir", str(tmp_path / "absent"), "--model_id", "org/llama"])


# -- a head and workers with different GPU counts (KServe's computeRayNodeAndGPUs) ------------------


def kserve_env(tp: int, pp: int, nodes: int, gpus: int) -> dict[str, str]:
    return {
        "TENSOR_PARALLEL_SIZE": str(tp),
        "PIPELINE_PARALLEL_SIZE": str(pp),
        "RAY_NODE_COUNT": str(nodes),
        "REQUEST_GPU_COUNT": str(gpus),
        "HEAD_SVC": "head.ns",
    }


def test_head_with_fewer_gpus_than_the_workers_plans_the_total(tmp_path: Path) -> None:
    # TP 2 x PP 5 = 10 GPUs, workers of 4: KServe makes 3 nodes and gives the head 10 - 2*4 = 2.
    folder = str(make(tmp_path / "m"))
    head = run(["--model_dir", folder, "--dry-run"], kserve_env(2, 5, 3, 2))
    assert (head.plan.tensor_parallel_size, head.plan.pipeline_parallel_size, head.plan.nodes) == (2, 5, 3)
    assert head.role == "head" and head.plan.executor == "ray"
    assert any("10 GPUs over 3 nodes whose GPU counts differ" in n for n in head.notes)
    worker = run(["--model_dir", folder, "--worker"], kserve_env(2, 5, 3, 4))
    assert worker.role == "worker" and "--num-gpus=4" in worker.command


def test_uneven_tp_is_kept_inside_a_node(tmp_path: Path) -> None:
    # TP 4 x PP 2 = 8, workers of 6: 2 nodes, head 8 - 6 = 2; TP 4 would straddle the two.
    head = run(["--model_dir", str(make(tmp_path / "m")), "--dry-run"], kserve_env(4, 2, 2, 2))
    assert (head.plan.tensor_parallel_size, head.plan.pipeline_parallel_size) == (2, 4)
    assert any("TP 4 x PP 2 run as TP 2 x PP 4" in n for n in head.notes)
    # workers of 3 (3 nodes, head 2): no TP above 1 fits both
    odd = run(["--model_dir", str(make(tmp_path / "m")), "--dry-run"], kserve_env(4, 2, 3, 2))
    assert (odd.plan.tensor_parallel_size, odd.plan.pipeline_parallel_size) == (1, 8)


def test_uneven_refuses_only_what_vllm_cannot_run(tmp_path: Path) -> None:
    few_layers = {**LLAMA, "num_hidden_layers": 3}
    with pytest.raises(InvalidInput, match=r"pipeline parallel size 5 is more than the model's 3 layers"):
        run(["--model_dir", str(make(tmp_path / "m", few_layers)), "--dry-run"], kserve_env(2, 5, 3, 2))
    odd_heads = {**LLAMA, "num_attention_heads": 6, "num_key_value_heads": 6}
    # TP 4 x PP 3 = 12, workers of 8: 2 nodes, head 12 - 8 = 4; TP 4 fits both, the heads do not divide
    with pytest.raises(InvalidInput, match=r"TENSOR_PARALLEL_SIZE=4: 6 attention heads are not divisible"):
        run(["--model_dir", str(make(tmp_path / "o", odd_heads)), "--dry-run"], kserve_env(4, 3, 2, 4))


# -- a bfloat16 model on a GPU without bfloat16 --------------------------------------------------


def test_bf16_model_on_a_t4_is_planned_in_float16(tmp_path: Path) -> None:
    # The launcher's own way (--model-uri): vLLM's auto, lowered to float16 only where bf16 cannot run.
    cache, _ = cache_with(tmp_path, "hf://org/llama", {**LLAMA, "torch_dtype": "bfloat16"})
    ours = ["--model-uri", "hf://org/llama", "--cache-dir", str(cache)]
    t4 = ("Tesla T4",)
    launch = run(ours, gpus=t4)
    assert vargs.value(vargs.parse(vllm_argv(launch)).flags, "--dtype") == "float16"
    assert any(n.startswith("--dtype float16: the weights are bfloat16 and Tesla T4") for n in launch.notes)
    auto = run([*ours, "--dtype", "auto"], gpus=t4)
    assert vargs.value(vargs.parse(vllm_argv(auto)).flags, "--dtype") == "float16"
    kept = run([*ours, "--dtype", "float32"], gpus=t4)
    assert vargs.value(vargs.parse(vllm_argv(kept)).flags, "--dtype") == "float32"
    with pytest.raises(InvalidInput, match="--dtype bfloat16: Tesla T4"):
        run([*ours, "--dtype", "bfloat16"], gpus=t4)
    # Case matters to vLLM's choices: BFloat16 is refused before the GPU is even considered.
    with pytest.raises(
        InvalidInput, match=r"--dtype 'BFloat16': expected one of .* \(lower case: bfloat16\)"
    ):
        run([*ours, "--dtype=BFloat16"], gpus=t4)
    h100 = run(ours, gpus=("NVIDIA H100 80GB HBM3",))
    assert "--dtype" not in vllm_argv(h100)


def test_dtype_auto_the_kserve_way_is_float16_as_kserve_reads_it(tmp_path: Path) -> None:
    # KServe's huggingfaceserver/__main__.py: `if args.dtype == "auto": args.dtype = default_dtype`
    # (float16 on a GPU), before vLLM's engine args are built: a bf16 model runs in float16 there.
    folder = str(make(tmp_path / "m", {**LLAMA, "torch_dtype": "bfloat16"}))
    h100 = ("NVIDIA H100 80GB HBM3",)
    for given in ([], ["--dtype", "auto"]):
        launch = run(["--model_dir", folder, *given], gpus=h100)
        assert vargs.value(vargs.parse(vllm_argv(launch)).flags, "--dtype") == "float16"
        assert any("read as KServe's server reads it on a GPU" in n and "bfloat16" in n for n in launch.notes)
    chosen = run(["--model_dir", folder, "--dtype", "bfloat16"], gpus=h100)
    assert vargs.value(vargs.parse(vllm_argv(chosen)).flags, "--dtype") == "bfloat16"


# -- the model cache mounted read-only ----------------------------------------------------------


def test_read_only_cache_is_served_and_nothing_written_beside_it(tmp_path: Path) -> None:
    import subprocess

    cache, folder = cache_with(tmp_path, "hf://org/llama")
    before = sorted(p.relative_to(cache) for p in cache.rglob("*"))
    done = subprocess.run(["mount", "--bind", str(cache), str(cache)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"bind mounts are not allowed here: {done.stderr.decode().strip()}")
    try:
        ro = subprocess.run(["mount", "-o", "remount,bind,ro", str(cache)], capture_output=True)
        assert ro.returncode == 0, ro.stderr
        launch = run(["--model-uri", "hf://org/llama", "--cache-dir", str(cache), "--gpus-per-node", "1"])
        assert launch.model_dir == folder
        # vLLM keeps its compile cache under $HOME instead (VLLM_CACHE_ROOT left unset)
        assert "VLLM_CACHE_ROOT" not in launch.env
        assert any(
            "compile cache not kept beside the weights" in n and "not writable" in n for n in launch.notes
        )
    finally:
        subprocess.run(["umount", str(cache)], check=True)
    assert sorted(p.relative_to(cache) for p in cache.rglob("*")) == before
