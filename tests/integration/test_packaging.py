"""The wheel in a project that does not use busreg's fixtures (issue 15, "packaging").

busreg's ``pytest11`` entry point is loaded by every pytest run where busreg is installed.
It used to load ``busreg.testing``, which imports pytest-asyncio, so ``pip install busreg``
(no extras) beside plain pytest made pytest fail to start in a project that never asked
for busreg's fixtures. Here: the wheel, built from this tree, goes into a clean venv with
only pytest; an unrelated test runs, a test that asks for a busreg fixture gets one line
saying what to install, and ``busreg --version`` answers.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import busreg
from busreg.pytest_plugin import HINT

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def test_the_wheel_never_breaks_a_plain_pytest_project(tmp_path: Path) -> None:
    src = tmp_path / "src"  # build from a copy: a build leaves build/ where it runs
    shutil.copytree(ROOT / "busreg", src / "busreg", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    built = _run(
        sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", tmp_path / "wh", src
    )
    assert built.returncode == 0, built.stderr
    venv = tmp_path / "venv"
    assert _run(sys.executable, "-m", "venv", venv).returncode == 0
    wheel = next((tmp_path / "wh").glob("busreg-*.whl"))
    installed = _run(venv / "bin" / "pip", "install", "-q", "pytest", wheel)
    assert installed.returncode == 0, installed.stderr
    assert _run(venv / "bin" / "python", "-c", "import pytest_asyncio").returncode != 0

    project = tmp_path / "project"
    project.mkdir()
    (project / "test_plain.py").write_text("def test_ok():\n    assert 1 + 1 == 2\n")
    (project / "test_wants.py").write_text("def test_wants(busreg_worker):\n    pass\n")
    pytest_cmd = (venv / "bin" / "python", "-m", "pytest", "-q", "-p", "no:cacheprovider")

    plain = _run(*pytest_cmd, "test_plain.py", cwd=project)
    assert plain.returncode == 0, plain.stdout + plain.stderr
    assert "1 passed" in plain.stdout

    wants = _run(*pytest_cmd, "test_wants.py", cwd=project)
    assert wants.returncode == 1, wants.stdout + wants.stderr
    assert HINT in wants.stdout

    version = _run(venv / "bin" / "busreg", "--version")
    assert version.stdout.strip() == f"busreg {busreg.__version__}"
