"""Lines per package, arrows from the library up into flows, and import circles.

    python scripts/import_graph.py [ROOT]

Walks every module of clip_core/, dedup/, flows/ and synthweb/ with ast: imports at module
level, inside functions, and module paths in strings (importlib). An import of a package
counts as an arrow to its __init__; a circle is a strongly connected set of modules.
"""
from __future__ import annotations

import ast
import re
import sys
from collections import defaultdict
from pathlib import Path

PACKAGES = ("clip_core", "dedup", "flows", "synthweb")
MODULE_STRING = re.compile(r"^(?:clip_core|dedup|flows|synthweb)(?:\.\w+)+$")


def modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the project's packages."""
    found = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _targets(node: ast.AST, module: str, is_package: bool) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            parent = module.split(".")[: len(module.split(".")) - node.level + is_package]
            base = ".".join(parent + ([node.module] if node.module else []))
        return [base] + [f"{base}.{alias.name}" for alias in node.names]
    if isinstance(node, ast.Constant) and isinstance(node.value, str) and MODULE_STRING.match(node.value):
        return [node.value]
    return []


def import_graph(root: Path) -> dict[str, set[str]]:
    """module -> the project modules it imports (anywhere in the file)."""
    mods = modules(root)

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph = defaultdict(set)
    for module, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            for target in _targets(node, module, path.name == "__init__.py"):
                found = resolve(target)
                if found and found != module:
                    graph[module].add(found)
    return {m: graph.get(m, set()) for m in mods}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected sets of more than one module (Tarjan, iterative)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter[0]; counter[0] += 1
        stack.append(start); on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]; counter[0] += 1
                    stack.append(child); on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop(); on_stack.discard(member); component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def main(root: Path) -> None:
    mods, graph = modules(root), import_graph(root)
    lines = defaultdict(int)
    for module, path in mods.items():
        parts = module.split(".")
        key = ".".join(parts[:2]) if len(parts) > 1 and (root / parts[0] / parts[1]).is_dir() else parts[0]
        lines[key] += len(path.read_text().splitlines())
    print("lines per package:")
    for key in sorted(lines):
        print(f"  {key:22s} {lines[key]:6d}")
    up = sorted((a, b) for a, targets in graph.items() for b in targets
                if a.split(".")[0] in ("clip_core", "dedup") and b.split(".")[0] == "flows")
    print(f"arrows from the library up into flows: {len(up)}")
    for a, b in up:
        print(f"  {a} -> {b}")
    found = circles(graph)
    print(f"import circles: {len(found)}")
    for component in found:
        print("  " + " <-> ".join(component))


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else ".").resolve())
