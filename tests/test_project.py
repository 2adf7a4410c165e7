"""Repository hygiene a new user relies on: CI runs what the README says, lint is enforced, and every
declared dependency is one the code actually imports."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]

# Distribution name -> import name, where they differ.
IMPORT_NAME = {"pyyaml": "yaml"}


def _readme_test_command() -> str:
    text = (ROOT / "README.md").read_text()
    _, _, tail = text.partition("Run the tests")
    assert tail, "README.md has no 'Run the tests' section"
    block = re.search(r"```bash\n(.*?)\n```", tail, re.S)
    assert block, "no bash block after 'Run the tests'"
    return block.group(1).strip()


def test_ci_runs_the_readme_test_command_and_ruff():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert _readme_test_command() in ci, "the README's test command must be a line of .ci/run"
    assert any(re.fullmatch(r"\s*ruff check \.\s*(#.*)?", line) for line in ci), (
        ".ci/run must run `ruff check .`"
    )
    subprocess.run(["bash", "-n", str(ROOT / ".ci" / "run")], check=True)


def test_ruff_check_passes():
    ruff = shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (pip install -e '.[test]')")
    res = subprocess.run([ruff, "check", "."], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout[-3000:]


def test_every_dependency_is_imported():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    sources = [
        p.read_text()
        for p in ROOT.rglob("*.py")
        if "tests" not in p.relative_to(ROOT).parts and not p.relative_to(ROOT).parts[0].startswith(".")
    ]
    unused = []
    for dep in deps:
        dist = re.match(r"[A-Za-z0-9_.-]+", dep).group(0).lower()
        name = IMPORT_NAME.get(dist, dist.replace("-", "_"))
        pattern = re.compile(rf"^\s*(import|from) {re.escape(name)}\b", re.M)
        if not any(pattern.search(s) for s in sources):
            unused.append(dist)
    assert not unused, f"declared in pyproject but imported by no module: {unused}"
