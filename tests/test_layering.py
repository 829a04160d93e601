"""The layers stay apart: checked mechanically with import-linter's contracts in pyproject.toml.

agent/, controller/ and runtime/ never import each other, the shared package imports none of them,
and the pure decision modules import no I/O library (directly or through another module).
"""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_import_contracts_are_kept() -> None:
    exe = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    result = subprocess.run([exe, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def test_the_contracts_cover_the_components() -> None:
    text = (ROOT / "pyproject.toml").read_text()
    for needle in (
        'modules = ["agent", "controller", "runtime"]',
        '"localmodel.resources"',
        '"aiohttp"',
    ):
        assert needle in text
