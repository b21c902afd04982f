"""The package's import graph (every import statement, also those inside functions), read with `ast`: no cycles
between lora_ext modules, and only `lora_ext/webui/` imports the WebUI's `modules.*`."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "lora_ext"


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        # an edge to the package __init__ of a module is not a dependency on its siblings
        graph[name] = {m for m in _imports(path) if m in files and m != name and not name.startswith(m + ".")}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycles():
    graph = _graph()
    assert "lora_ext.webui.glue" in graph and graph["lora_ext.webui.glue"]  # the walk sees the package
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_cycle_finder_finds_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_only_the_webui_folder_imports_the_webui():
    offenders = []
    for path in PKG.rglob("*.py"):
        if "webui" in path.relative_to(PKG).parts[:1]:
            continue
        if any(m == "modules" or m.startswith("modules.") for m in _imports(path)):
            offenders.append(str(path.relative_to(PKG)))
    assert offenders == []


def test_webui_imports_point_away_from_the_glue():
    graph = _graph()
    webui = [m for m in graph if m.startswith("lora_ext.webui.") and m != "lora_ext.webui.glue"]
    assert webui and not [m for m in webui if "lora_ext.webui.glue" in graph[m]]


def test_no_function_is_longer_than_120_lines():
    """The design's limit: a function that long does several jobs (split it where its steps are)."""
    root = Path(__file__).resolve().parents[1] / "lora_ext"
    long = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > 120:
                    long.append(f"{path.relative_to(root.parent)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long
