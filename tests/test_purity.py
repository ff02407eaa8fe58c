"""Imports point down (DESIGN.md): flows -> (clip_core, dedup); synthweb -> clip_core.

The library (clip_core/, dedup/) never imports flows, prefect, ray or mlflow, nor the synthetic
web: not at module level, not inside a function, not by an importlib string.
"""
import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ORCHESTRATION = {"prefect", "ray", "mlflow", "flows"}
FORBIDDEN = {"clip_core": ORCHESTRATION | {"synthweb"}, "dedup": ORCHESTRATION | {"synthweb"},
             "synthweb": ORCHESTRATION | {"dedup"}}
MODULE_STRING = re.compile(r"^(?:prefect|ray|mlflow|flows|synthweb|dedup|clip_core)(?:\.\w+)+$")  # dotted: a module path


def imported_roots(path: Path) -> set[str]:
    """Top-level packages a file imports anywhere in it, or names in a string shaped as a module path."""
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and MODULE_STRING.match(node.value):
            roots.add(node.value.split(".")[0])  # importlib.import_module("flows.x") and the like
    return roots


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_point_down(package):
    offenders = {
        str(path.relative_to(ROOT)): sorted(imported_roots(path) & FORBIDDEN[package])
        for path in (ROOT / package).rglob("*.py")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_importing_the_library_loads_no_orchestration():
    modules = sorted(".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
                     for package in ("clip_core", "dedup") for p in (ROOT / package).rglob("*.py"))
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        f"print(sorted(r for r in {sorted(ORCHESTRATION | {'synthweb'})!r} if r in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_checker_sees_every_kind_of_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import os\nfrom ray import train\nimport mlflow.pytorch\n"
                   "def f():\n    from flows.train import train\n"
                   "def g():\n    import importlib\n    return importlib.import_module('synthweb.server')\n"
                   "HELP = 'see flows/cli.py'\n")
    assert imported_roots(bad) & FORBIDDEN["clip_core"] == {"ray", "mlflow", "flows", "synthweb"}


def _import_graph_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("import_graph", ROOT / "scripts" / "import_graph.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_no_import_circles_and_no_arrow_up_into_flows():
    graph_tool = _import_graph_module()
    graph = graph_tool.import_graph(ROOT)
    assert graph_tool.circles(graph) == []
    up = {(a, b) for a, targets in graph.items() for b in targets
          if a.split(".")[0] in ("clip_core", "dedup") and b.startswith("flows")}
    assert up == set()


def test_the_circle_finder_finds_a_planted_circle(tmp_path):
    graph_tool = _import_graph_module()
    (tmp_path / "clip_core" / "train").mkdir(parents=True)
    (tmp_path / "flows").mkdir()
    (tmp_path / "clip_core" / "__init__.py").write_text("")
    (tmp_path / "clip_core" / "train" / "__init__.py").write_text("from clip_core.train.config import X\n")
    (tmp_path / "clip_core" / "train" / "config.py").write_text("def f():\n    from flows.train import train\n")
    (tmp_path / "flows" / "__init__.py").write_text("")
    (tmp_path / "flows" / "train.py").write_text("import clip_core.train\nimport clip_core\n")
    graph = graph_tool.import_graph(tmp_path)
    assert graph_tool.circles(graph) == [["clip_core.train", "clip_core.train.config", "flows.train"]]
