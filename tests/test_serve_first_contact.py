"""``modelcache serve`` on first contact: a cache folder that is not there, near misses of the
launcher's own flags (never passed to vLLM: a misspelt --dry-run must not start it), vLLM's short
names written with two dashes, and a node count named as typed."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_runtime_cli import bin_dir, clean_env, dry_run, model, no_gpu_path, script, serve

__all__ = ["bin_dir", "model"]  # fixtures, used by name


def vllm_that_records(bin_dir: Path) -> Path:
    started = bin_dir.parent / "vllm-started"
    script(bin_dir, "vllm", f'#!/bin/sh\necho "$@" > {started}\n')
    return started


def test_model_uri_with_a_missing_cache_dir_names_the_folder(bin_dir: Path) -> None:
    env = clean_env(no_gpu_path(bin_dir))
    r = serve(["--model-uri", "http://h/x.tar.gz", "--cache-dir", "/nonexist", "--dry-run"], env)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("modelcache serve: --cache-dir: /nonexist does not exist or is not a folder;")
    assert "pass --model_dir or --model-uri" not in r.stderr


def test_model_uri_not_cached_points_at_status(bin_dir: Path, tmp_path: Path) -> None:
    env = clean_env(no_gpu_path(bin_dir))
    cache = tmp_path / "cache"
    cache.mkdir()
    r = serve(["--model-uri", "http://h/x.tar.gz?sig=secret", "--cache-dir", str(cache), "--dry-run"], env)
    assert r.returncode == 2, r.stderr
    assert f"is not cached in {cache}" in r.stderr
    assert f"`modelcache status --cache-dir {cache}`" in r.stderr
    assert "secret" not in r.stderr


@pytest.mark.parametrize(
    ("typed", "meant"),
    [
        ("--dry", "--dry-run"),
        ("--dry-ru", "--dry-run"),
        ("--dry_rn", "--dry-run"),
        ("--gpus-per", "--gpus-per-node"),
        ("--model_d", "--model-dir"),
        ("--model-ur", "--model-uri"),
        ("--cache-dri", "--cache-dir"),
    ],
)
def test_a_near_miss_of_a_launcher_flag_is_exit_2_and_starts_nothing(
    typed: str, meant: str, model: Path, bin_dir: Path
) -> None:
    started = vllm_that_records(bin_dir)
    env = clean_env(f"{bin_dir}:/usr/bin:/bin")
    r = serve(["--model_dir", str(model), "--gpus-per-node", "1", typed, "1"], env)
    assert r.returncode == 2, r.stderr
    key = "--" + typed[2:].replace("_", "-")
    assert (
        r.stderr
        == f"modelcache serve: {key} is not a flag; did you mean {meant}? (the launcher's own flag)\n"
    )
    assert not started.exists()


def test_vllm_flags_near_the_launchers_still_pass(model: Path, bin_dir: Path) -> None:
    env = clean_env(no_gpu_path(bin_dir))
    plan = dry_run(["--model_dir", str(model), "--gpus-per-node", "1", "--max-model-len", "64"], env)
    assert "--max-model-len" in plan["command"]


@pytest.mark.parametrize(
    ("typed", "canonical"), [("--tp", "--tensor-parallel-size"), ("--pp", "--pipeline-parallel-size")]
)
def test_double_dash_short_names_are_read_as_vllms_short_names(
    typed: str, canonical: str, model: Path, bin_dir: Path
) -> None:
    env = clean_env(no_gpu_path(bin_dir))
    plan = dry_run(["--model_dir", str(model), "--gpus-per-node", "2", typed, "2"], env)
    command = plan["command"]
    assert command[command.index(canonical) + 1] == "2"
    assert typed not in command


def test_a_node_count_too_small_is_named_as_typed(model: Path, bin_dir: Path) -> None:
    env = clean_env(no_gpu_path(bin_dir))
    r = serve(
        ["--model_dir", str(model), "-tp", "16", "--nodes", "1", "--gpus-per-node", "8", "--dry-run"], env
    )
    assert r.returncode == 2, r.stderr
    assert "but --nodes=1 x 8 GPUs = 8" in r.stderr, r.stderr
