"""The import boundary: pipeline -> cache_store <- side_train. Stage two never imports stage one or
transformers (it trains without the backbone; `--online` and `predict-side` reach a live backbone through
cache_store.source.open_live); the cache layer imports neither stage."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FORBIDDEN = {"side_train": {"pipeline", "transformers", "peft"},
             "cache_store": {"pipeline", "side_train", "transformers", "peft"}}


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
    crossing = {f"{path.relative_to(REPO)} imports {name}" for path in (REPO / package).glob("*.py")
                for name in imported_packages(path) & FORBIDDEN[package]}
    assert not crossing, sorted(crossing)


def loaded_after_import(modules: list[str], roots: tuple[str, ...]) -> str:
    code = (f"import sys; import {', '.join(modules)}; "
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {roots!r}))")
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_loading_every_stage_two_module_loads_no_backbone_code():
    modules = sorted(f"side_train.{p.stem}" for p in (REPO / "side_train").glob("*.py") if p.stem != "__init__")
    assert loaded_after_import(modules, ("pipeline", "transformers", "peft")) == "[]"
