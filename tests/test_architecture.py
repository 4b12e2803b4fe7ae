"""The house rules: the import graph in docs/architecture.md is the code's, and the import-linter
contracts hold (CI also runs ``lint-imports`` before the tests)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_documented_import_graph_is_the_codes() -> None:
    sys.path.insert(0, str(REPO / "docs"))
    try:
        import import_graph
    finally:
        sys.path.remove(str(REPO / "docs"))
    doc = (REPO / "docs" / "architecture.md").read_text()
    assert import_graph.mermaid() in doc, "run: python docs/import_graph.py --write"


def test_import_contracts_hold_and_catch_a_violation(tmp_path: Path) -> None:
    lint = Path(sys.executable).parent / "lint-imports"
    kept = subprocess.run([str(lint), "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert kept.returncode == 0, kept.stdout[-3000:]
    # The same contracts over a copy of the code with one forbidden import added.
    copy = tmp_path / "repo"
    for part in ("shared", "cloud", "edge_agent"):
        shutil.copytree(REPO / part, copy / part, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "pyproject.toml").write_text((REPO / "pyproject.toml").read_text())
    fleet = copy / "cloud" / "plane" / "fleet.py"
    fleet.write_text("import edge_agent.uplink.outbox\n" + fleet.read_text())
    broken = subprocess.run(
        [str(lint), "--no-cache"],
        cwd=copy,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(copy), "PATH": "/usr/bin:/bin"},
    )
    assert broken.returncode != 0
    assert "cloud.plane.fleet -> edge_agent.uplink.outbox" in broken.stdout, broken.stdout[-3000:]
