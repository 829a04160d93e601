"""The README's first command, run as a user would (the install step is skipped: .venv exists)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(not (ROOT / ".venv/bin/modelcache").exists(), reason="needs the repository's .venv")
def test_quickstart_runs_the_whole_chain_with_the_old_port_taken(tmp_path: Path) -> None:
    # The port the quickstart used to hard-code, taken: it must pick a free one.
    with socket.socket() as taken:
        with contextlib.suppress(OSError):  # taken by something else already: the same situation
            taken.bind(("127.0.0.1", 18765))
        taken.listen()
        r = subprocess.run(
            [str(ROOT / "scripts/quickstart")],
            env={**os.environ, "TMPDIR": str(tmp_path)},
            capture_output=True,
            text=True,
            timeout=240,
        )
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    for step in ("== a tiny sample model", "== serving it at", "== the node agent", "== modelcache status"):
        assert step in out
    assert "tiny-model" in out and "ModelDownloaded" in out
    plan = json.loads(out[out.index("{") : out.rindex("}") + 1])
    (run_dir,) = tmp_path.glob("modelcache-quickstart.*")
    assert plan["command"][:3] == ["vllm", "serve", plan["model_dir"]]
    assert Path(plan["model_dir"]).parent == run_dir / "cache" / "models"
    assert (Path(plan["model_dir"]) / "model.safetensors").is_file()


@pytest.mark.skipif(not (ROOT / ".venv/bin/modelcache").exists(), reason="needs the repository's .venv")
def test_quickstart_with_a_relative_tmpdir_holding_yaml_and_sed_characters(tmp_path: Path) -> None:
    # '&' and '#' broke the sed substitution; ': ' and ' #' would change the YAML; a relative TMPDIR
    # is the user's folder, not the repository's.
    odd = tmp_path / "a&b#c: d #e"
    odd.mkdir()
    r = subprocess.run(
        [str(ROOT / "scripts/quickstart")],
        env={**os.environ, "TMPDIR": odd.name},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    (run_dir,) = odd.glob("modelcache-quickstart.*")
    assert not list(ROOT.glob("a&b*"))
    plan = json.loads(r.stdout[r.stdout.index("{") : r.stdout.rindex("}") + 1])
    assert Path(plan["model_dir"]).parent == run_dir / "cache" / "models"
    assert (Path(plan["model_dir"]) / "model.safetensors").is_file()
