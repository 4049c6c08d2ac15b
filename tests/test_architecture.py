"""The house rules: which layer may import which, read from the source without importing it.

Every ``import`` counts, wherever it stands (inside functions, under ``if TYPE_CHECKING:``):
a lazy or type-only import still ties two modules together, and a circle of them means
neither can be understood, tested or moved without the other.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("analysis", "viz", "app_pages")
SCRIPTS = ("app.py",)
MAX_FUNCTION_LINES = 120
MAX_PAGE_LINES = 500


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _sources() -> dict[str, Path]:
    """Every module of the app's own code, by dotted name."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            found[_module_name(path)] = path
    for script in SCRIPTS:
        if (ROOT / script).is_file():
            found[_module_name(ROOT / script)] = ROOT / script
    return found


SOURCES = _sources()
TREES = {name: ast.parse(path.read_text(encoding="utf-8")) for name, path in SOURCES.items()}


def _imported(module: str, tree: ast.Module) -> Iterator[tuple[str, int]]:
    """Every module name an import statement in ``tree`` reaches, with its line.

    ``from a.b import c`` yields ``a.b`` and, when ``c`` is itself a module, ``a.b.c``.
    """
    package = module if SOURCES[module].name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            yield base, node.lineno
            for alias in node.names:
                yield f"{base}.{alias.name}", node.lineno


def _own(name: str) -> str | None:
    """The module of ours that an imported name is (or lies in), else None."""
    while name:
        if name in SOURCES:
            return name
        name = name.rpartition(".")[0]
    return None


def _graph() -> dict[str, dict[str, int]]:
    """module -> {module of ours it imports: first line}."""
    graph: dict[str, dict[str, int]] = {}
    for module, tree in TREES.items():
        edges = graph.setdefault(module, {})
        for name, line in _imported(module, tree):
            target = _own(name)
            if target is not None and target != module:
                edges.setdefault(target, line)
    return graph


def _cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One circle per strongly connected group of modules (Tarjan), as a readable path."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, {}):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.add(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(group)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_circle(graph, group) for group in groups]


def _circle(graph: dict[str, dict[str, int]], group: set[str]) -> list[str]:
    """A shortest way round from the group's first module back to itself."""
    start = min(group)
    paths = {start: [start]}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for target in sorted(graph[node]):
            if target == start:
                return [*paths[node], start]
            if target in group and target not in paths:
                paths[target] = [*paths[node], target]
                queue.append(target)
    return sorted(group)  # pragma: no cover - a strongly connected group always closes


def _describe(graph: dict[str, dict[str, int]], circle: list[str]) -> str:
    """``a -(line 3)-> b -(line 9)-> a``: each import, with the line it stands on."""
    text = circle[0]
    for here, there in pairwise(circle):
        text += f" -(line {graph[here][there]})-> {there}"
    return text


def test_no_import_cycles() -> None:
    graph = _graph()
    circles = _cycles(graph)
    report = "\n  ".join(_describe(graph, circle) for circle in circles)
    assert not circles, f"import circles:\n  {report}"


def _imports_of(prefix: str) -> Iterator[tuple[str, str, int]]:
    for module, tree in TREES.items():
        if module == prefix or module.startswith(prefix + "."):
            for name, line in _imported(module, tree):
                yield module, name, line


def _reaches(name: str, forbidden: str) -> bool:
    return name == forbidden or name.startswith(forbidden + ".")


def test_analysis_never_imports_streamlit() -> None:
    """The core runs in the CLI and in tests, where no Streamlit session exists."""
    found = [
        f"{module}:{line} imports {name}"
        for module, name, line in _imports_of("analysis")
        if _reaches(name, "streamlit")
    ]
    assert not found, "analysis/ must not import streamlit:\n  " + "\n  ".join(found)


def test_viz_never_runs_models() -> None:
    """viz/ draws records; loading and running a model belongs to analysis/ and the pages."""
    forbidden = ("analysis.engine", "analysis.models", "analysis.backbone")
    found = sorted(
        {
            f"{module}:{line} imports {name}"
            for module, name, line in _imports_of("viz")
            if any(_reaches(name, bad) for bad in forbidden)
        }
    )
    assert not found, "viz/ must not import model running:\n  " + "\n  ".join(found)


def test_functions_are_short() -> None:
    long = [
        f"{SOURCES[module].relative_to(ROOT)}:{node.lineno} {node.name} "
        f"({node.end_lineno - node.lineno + 1} lines)"
        for module, tree in TREES.items()
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines:\n  " + "\n  ".join(long)


def test_pages_are_short() -> None:
    long = [
        f"{path.relative_to(ROOT)} ({count} lines)"
        for path in sorted((ROOT / "app_pages").rglob("*.py"))
        if (count := len(path.read_text(encoding="utf-8").splitlines())) > MAX_PAGE_LINES
    ]
    assert not long, f"app_pages/ files over {MAX_PAGE_LINES} lines:\n  " + "\n  ".join(long)


def test_the_favicon_needs_no_network() -> None:
    """A named icon as ``page_icon`` makes every browser fetch the favicon from
    fonts.gstatic.com (the load test saw it): an offline server shows none, and a private
    one tells Google who opened it. The app draws its own (``viz.icon``)."""
    calls = [
        node
        for node in ast.walk(TREES["app"])
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "set_page_config"
    ]
    assert calls, "app.py no longer calls st.set_page_config"
    for call in calls:
        for keyword in call.keywords:
            if keyword.arg == "page_icon":
                assert not isinstance(keyword.value, ast.Constant), (
                    f"page_icon={ast.unparse(keyword.value)} is fetched from the network"
                )
    from viz.icon import app_icon

    icon = app_icon(64)
    assert icon.size == (64, 64) and len(set(icon.getdata())) >= 3
