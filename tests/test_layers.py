"""The package's layers (docs/architecture.md) hold: `lint-imports` checks the contracts that
pyproject.toml declares, and a deliberate wrong-way import makes it fail."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT = [str(Path(sys.executable).with_name("lint-imports")), "--no-cache"]


def _lint(cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(cwd)}  # the `offpolicy` under cwd, not the install
    return subprocess.run(LINT, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_the_layer_contracts_hold():
    out = _lint(ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "0 broken" in out.stdout


def test_a_wrong_way_import_breaks_the_layers(tmp_path):
    """A copy of the package (the role folders resolved) where the core imports the command
    line: the layers contract must name the broken import."""
    shutil.copytree(ROOT / "offpolicy", tmp_path / "offpolicy",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    errors = tmp_path / "offpolicy" / "core" / "errors.py"
    errors.write_text(errors.read_text() + "\nfrom offpolicy.tools import cli  # noqa\n")
    out = _lint(tmp_path)
    assert out.returncode != 0
    assert "layers: each imports only the layers below it BROKEN" in out.stdout
    assert "offpolicy.core.errors -> offpolicy.tools.cli" in out.stdout
