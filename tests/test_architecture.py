"""The import boundary: pipeline -> cache_store <- side_train. Stage two never imports transformers (it
trains without the backbone), and imports stage one only in its command line, side_train/cli.py, the one
place the stages meet (`--online`, `predict-side`); the cache layer imports neither stage."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FORBIDDEN = {"side_train": {"pipeline", "transformers", "peft"},
             "cache_store": {"pipeline", "side_train", "transformers", "peft"}}
COMPOSITION = {"side_train/cli.py": {"pipeline"}}  # allowed there, and nowhere else


def imported_packages(path: Path) -> set[str]:
    """Top-level packages a module imports anywhere (in functions too); relative imports stay inside."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_module_imports_across_the_boundary(package):
    crossing = set()
    for path in (REPO / package).glob("*.py"):
        name = str(path.relative_to(REPO))
        allowed = COMPOSITION.get(name, set())
        crossing |= {f"{name} imports {pkg}" for pkg in imported_packages(path) & (FORBIDDEN[package] - allowed)}
    assert not crossing, sorted(crossing)


def test_only_the_command_line_imports_stage_one():
    assert imported_packages(REPO / "side_train/cli.py") & {"pipeline"}, "update COMPOSITION"


def loaded_after_import(modules: list[str], roots: tuple[str, ...]) -> str:
    code = (f"import sys; import {', '.join(modules)}; "
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {roots!r}))")
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_loading_every_stage_two_module_loads_no_backbone_code():
    training = sorted(f"side_train.{p.stem}" for p in (REPO / "side_train").glob("*.py")
                      if p.stem not in ("__init__", "cli"))
    assert loaded_after_import(training, ("pipeline", "transformers", "peft")) == "[]"
    # the command line reads stage one's configuration, and nothing that runs a backbone until --online
    assert loaded_after_import(["side_train.cli"], ("transformers", "peft")) == "[]"
    assert "pipeline.live" not in loaded_after_import(["side_train.cli"], ("pipeline",))
