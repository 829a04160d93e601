"""`modelcache serve --verify` in --cache-dir mode: a folder without the agent's manifest is not a
verified publish, so it is refused (exit 2) rather than served with a note."""

from __future__ import annotations

from pathlib import Path

from localmodel.layout import CacheLayout, storage_key
from tests.test_runtime_cli import clean_env, dry_run, no_gpu_path, serve
from tests.test_runtime_preflight import make_model, write_manifest

URI = "hf://org/model"


def _cached(tmp_path: Path) -> tuple[CacheLayout, Path]:
    layout = CacheLayout(tmp_path / "cache")
    folder = layout.model_dir(storage_key(URI))
    make_model(folder)
    write_manifest(folder, layout.manifest_file(storage_key(URI)))
    return layout, folder


def test_verify_without_manifest_in_cache_dir_mode_is_refused(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    env = clean_env(no_gpu_path(bin_dir))
    layout, folder = _cached(tmp_path)
    args = ["--model-uri", URI, "--cache-dir", str(layout.root), "--gpus-per-node", "1", "--verify"]
    # With its manifest: verified and planned.
    assert dry_run(args, env)["model_dir"] == str(folder)

    layout.manifest_file(storage_key(URI)).unlink()
    done = serve([*args, "--dry-run"], env)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr
    assert str(folder) in lines[0] and "not a verified publish" in lines[0]
    assert f"modelcache status --cache-dir {layout.root}" in lines[0]
    assert done.stdout == ""


def test_verify_with_model_dir_and_no_manifest_still_serves_with_a_note(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    folder = tmp_path / "plain"
    make_model(folder)
    out = dry_run(
        ["--model_dir", str(folder), "--gpus-per-node", "1", "--verify"], clean_env(no_gpu_path(bin_dir))
    )
    assert any("no manifest beside this folder" in n for n in out["notes"])
