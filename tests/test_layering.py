"""Data flows one way: library code never imports the command line (``sparsecircuits.cli``)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "sparsecircuits"


def test_dashboard_data_imports_nothing_from_the_cli():
    code = (
        "import sys, sparsecircuits.viz.app_data\n"
        "bad = [m for m in sys.modules if m == 'sparsecircuits.cli' or "
        "m.startswith('sparsecircuits.cli.')]\n"
        "assert not bad, bad\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr


def _imports(path: Path) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def test_no_library_module_imports_the_cli():
    """Every module outside ``sparsecircuits/cli/`` (imports inside functions included)."""
    offenders = {
        str(p.relative_to(PACKAGE)): sorted(
            m for m in _imports(p) if m.startswith("sparsecircuits.cli")
        )
        for p in PACKAGE.rglob("*.py")
        if "cli" not in p.relative_to(PACKAGE).parts[:1]
    }
    assert not {k: v for k, v in offenders.items() if v}


# Data flows one way: a package may import its own layer and those before it, never a later one.
LAYERS = [
    ["kernels"], ["model"], ["data", "train"], ["tasks", "circuits"], ["interop", "bridges"],
    ["monitor"], ["serve", "audit", "redteam"], ["viz", "cli"],
]  # fmt: skip


def test_no_package_imports_a_later_layer():
    """Imports inside functions included (a lazy import is still a dependency)."""
    rank = {name: i for i, names in enumerate(LAYERS) for name in names}
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).parts
        if len(parts) < 2 or parts[0] not in rank:
            continue
        for module in _imports(path):
            top = module.split(".")[1] if module.startswith("sparsecircuits.") else None
            if top in rank and rank[top] > rank[parts[0]]:
                offenders.append(f"{'/'.join(parts)} imports {module}")
    assert not offenders, offenders
