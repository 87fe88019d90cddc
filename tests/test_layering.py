"""The package's layering, read from the source with ``ast`` (nothing is imported).

The helpers take the package root (a folder such as ``.../cloakonnx``) as a parameter, so the same
checks run on the real package and on small synthetic packages that prove they can fail.
"""
from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE_ROOT = Path(__file__).resolve().parents[1] / "cloakonnx"


# --------------------------------------------------------------------------- helpers: the graph


@dataclass(frozen=True)
class Import:
    source: str  # the importing module, e.g. "cloakonnx.harden"
    target: str  # the imported module, resolved to an absolute name, e.g. "cloakonnx.sweep" or "torch.nn"
    path: Path  # the importing file
    lineno: int

    def where(self, root: Path) -> str:
        return f"{self.path.relative_to(root.parent).as_posix()}:{self.lineno}"


def is_within(name: str, package: str) -> bool:
    """``name`` is ``package`` itself or one of its descendants."""
    return name == package or name.startswith(package + ".")


def module_files(root: Path) -> list[tuple[str, Path]]:
    """(module name, file) for every ``.py`` file under ``root``; ``__init__.py`` names its package."""
    root = Path(root)
    out = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out.append((".".join(parts), path))
    return out


def known_modules(root: Path) -> set[str]:
    """Every module name, plus every folder holding Python files (a package, with or without ``__init__``)."""
    names = {name for name, _ in module_files(root)}
    for name in list(names):
        parts = name.split(".")
        names.update(".".join(parts[:i]) for i in range(1, len(parts)))
    return names


def _resolve(node: ast.AST, module: str, path: Path, known: set[str]) -> list[str]:
    """The absolute module names an import statement depends on."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    assert isinstance(node, ast.ImportFrom)
    if node.level:
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        parts = package.split(".")
        if node.level - 1 >= len(parts):
            return []  # beyond the top-level package: not ours to judge
        base = ".".join(parts[: len(parts) - (node.level - 1)] + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    out: list[str] = []
    for alias in node.names:
        candidate = f"{base}.{alias.name}"
        target = candidate if alias.name != "*" and candidate in known else base
        if target and target not in out:
            out.append(target)
    return out


def imports_of(root: Path) -> list[Import]:
    """Every import statement in the package (module level, in functions, anywhere), resolved."""
    root = Path(root)
    known = known_modules(root)
    found = []
    for module, path in module_files(root):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                found += [Import(module, t, path, node.lineno) for t in _resolve(node, module, path, known)]
    return sorted(found, key=lambda i: (str(i.path), i.lineno, i.target))


def import_graph(root: Path) -> dict[str, set[str]]:
    """module -> the package's modules it imports. Edges between a package and its own descendants,
    and edges to the root package (whose ``__init__`` only re-exports lazily), are left out."""
    root = Path(root)
    top = root.name
    graph: dict[str, set[str]] = {name: set() for name, _ in module_files(root)}
    for imp in imports_of(root):
        s, t = imp.source, imp.target
        if not is_within(t, top) or t == top or is_within(t, s) or is_within(s, t):
            continue
        graph[s].add(t)
    return graph


def _strongly_connected(graph: dict[str, set[str]]) -> dict[str, int]:
    """node -> the id of its strongly connected component (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    comp: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp[w] = index[v]
                if w == v:
                    break

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return comp


def _preorder(graph: dict[str, set[str]]) -> list[str]:
    """Nodes in the order a depth-first walk in name order reaches them."""
    seen: list[str] = []
    seen_set: set[str] = set()

    def visit(v: str) -> None:
        seen.append(v)
        seen_set.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in seen_set and w in graph:
                visit(w)

    for v in sorted(graph):
        if v not in seen_set:
            visit(v)
    return seen


def find_cycles(graph: dict[str, set[str]], limit: int = 200) -> list[list[str]]:
    """Every elementary cycle (up to ``limit``), each once, as ``[a, b, ..., a]``: it starts at the
    module of the cycle that a depth-first walk of the graph in name order reaches first."""
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph) + 100))
    comp = _strongly_connected(graph)
    rank = {v: i for i, v in enumerate(_preorder(graph))}
    cycles: list[list[str]] = []
    for start in sorted(graph, key=rank.__getitem__):
        allowed = {v for v in graph if comp[v] == comp[start] and rank[v] >= rank[start]}
        path, on_path = [start], {start}
        stack = [iter(sorted(graph[start] & allowed, key=rank.__getitem__))]
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                stack.pop()
                on_path.discard(path.pop())
            elif nxt == start:
                cycles.append(path + [start])
                if len(cycles) >= limit:
                    return cycles
            elif nxt not in on_path:
                path.append(nxt)
                on_path.add(nxt)
                stack.append(iter(sorted(graph[nxt] & allowed, key=rank.__getitem__)))
    return cycles


# --------------------------------------------------------------------------- helpers: the rules

GRAPH_FORBIDDEN = ("torch", "torchvision", "{top}.torch_exec", "{top}.attacks")


def graph_layer_violations(root: Path) -> list[str]:
    """``<top>/graph/`` (the ONNX side) importing torch, torchvision, torch_exec or attacks, directly."""
    root = Path(root)
    top = root.name
    forbidden = [f.format(top=top) for f in GRAPH_FORBIDDEN]
    return [f"{imp.where(root)}: {imp.source} imports {imp.target}"
            for imp in imports_of(root)
            if is_within(imp.source, f"{top}.graph") and any(is_within(imp.target, f) for f in forbidden)]


def cli_importers(root: Path) -> list[str]:
    """Modules other than the CLI itself (and ``__main__``) that import the CLI."""
    root = Path(root)
    top = root.name
    cli = f"{top}.cli"
    return [f"{imp.where(root)}: {imp.source} imports {imp.target}"
            for imp in imports_of(root)
            if is_within(imp.target, cli) and not is_within(imp.source, cli) and imp.source != f"{top}.__main__"]


def torch_exec_violations(root: Path) -> list[str]:
    """Imports from the package made by ``<top>.torch_exec`` other than ``<top>.errors`` and its own parts."""
    root = Path(root)
    top = root.name
    own, allowed = f"{top}.torch_exec", f"{top}.errors"
    return [f"{imp.where(root)}: {imp.source} imports {imp.target}"
            for imp in imports_of(root)
            if is_within(imp.source, own) and is_within(imp.target, top)
            and not (is_within(imp.target, own) or is_within(imp.target, allowed))]


def format_cycles(cycles: list[list[str]]) -> list[str]:
    return [" -> ".join(c) for c in cycles]


def write_package(root: Path, files: dict[str, str]) -> Path:
    """A synthetic package under ``root``: {relative path: source}. Returns the package folder."""
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return root / next(iter(files)).split("/")[0]


# --------------------------------------------------------------------------- the real package


def test_the_package_is_found_and_parsed():
    names = {name for name, _ in module_files(PACKAGE_ROOT)}
    assert {"cloakonnx", "cloakonnx.cli", "cloakonnx.errors", "cloakonnx.report", "cloakonnx.runtime"} <= names
    # the graph is not empty: the checks below are about real edges
    assert any(import_graph(PACKAGE_ROOT).values()), "no import between cloakonnx modules was found"


def test_no_import_cycles():
    cycles = format_cycles(find_cycles(import_graph(PACKAGE_ROOT)))
    assert not cycles, "import cycles between cloakonnx modules:\n  " + "\n  ".join(cycles)


def test_graph_package_imports_no_torch_nor_attacks():
    if not (PACKAGE_ROOT / "graph").is_dir():
        pytest.fail("cloakonnx/graph/ is missing")
    assert list((PACKAGE_ROOT / "graph").rglob("*.py")), "cloakonnx/graph/ holds no Python module"
    bad = graph_layer_violations(PACKAGE_ROOT)
    assert not bad, ("cloakonnx/graph/ (the ONNX side) must not import torch, torchvision, cloakonnx.torch_exec "
                     "or cloakonnx.attacks:\n  " + "\n  ".join(bad))


def test_nothing_imports_the_cli():
    bad = cli_importers(PACKAGE_ROOT)
    assert not bad, "only cloakonnx.cli (and __main__) may import cloakonnx.cli:\n  " + "\n  ".join(bad)


def test_torch_exec_depends_only_on_errors():
    names = {name for name, _ in module_files(PACKAGE_ROOT)}
    assert any(is_within(n, "cloakonnx.torch_exec") for n in names), "cloakonnx.torch_exec is missing"
    bad = torch_exec_violations(PACKAGE_ROOT)
    assert not bad, ("cloakonnx.torch_exec may import only cloakonnx.errors and its own submodules:\n  "
                     + "\n  ".join(bad))


# --------------------------------------------------------------------------- the checkers can fail


def test_cycle_finder_finds_a_known_circle(tmp_path):
    root = write_package(tmp_path, {
        "pkg/__init__.py": "from .a import f\n",  # the root re-exports: edges to and from it do not count
        "pkg/a.py": "import os\n\n\ndef f():\n    from . import b  # inside a function: still an edge\n",
        "pkg/b.py": "from pkg.a import f\nfrom pkg import f as g\n",
        "pkg/c.py": "from . import b\n",  # reaches the circle, is not on it
    })
    graph = import_graph(root)
    assert graph["pkg.a"] == {"pkg.b"} and graph["pkg.b"] == {"pkg.a"} and graph["pkg.c"] == {"pkg.b"}
    assert graph["pkg"] == set()
    assert format_cycles(find_cycles(graph)) == ["pkg.a -> pkg.b -> pkg.a"]


def test_cycle_finder_finds_every_circle_once():
    graph = {"a": {"b"}, "b": {"c", "a"}, "c": {"a"}, "d": {"d2"}, "d2": {"d"}, "e": {"a"}}
    assert sorted(format_cycles(find_cycles(graph))) == ["a -> b -> a", "a -> b -> c -> a", "d -> d2 -> d"]


def test_package_and_its_children_do_not_form_circles(tmp_path):
    root = write_package(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/sub/__init__.py": "from .leaf import x\nfrom . import leaf\n",
        "pkg/sub/leaf.py": "from pkg.sub import y\nfrom .. import sub\n\nx = y = 1\n",
        "pkg/sub/deep/__init__.py": "from ..leaf import x\n",
        "pkg/other.py": "from .sub import leaf\n",
    })
    graph = import_graph(root)
    assert graph["pkg.other"] == {"pkg.sub.leaf"}  # `from .sub import leaf` names the module
    assert graph["pkg.sub.deep"] == {"pkg.sub.leaf"}
    assert graph["pkg.sub"] == set() and graph["pkg.sub.leaf"] == set()
    assert find_cycles(graph) == []


def test_rules_report_offenders_with_line_numbers(tmp_path):
    root = write_package(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/errors.py": "",
        "pkg/cli.py": "from . import errors\n",
        "pkg/attacks/__init__.py": "",
        "pkg/torch_exec/__init__.py": "from ..errors import E\nfrom .ops import conv\n",
        "pkg/torch_exec/ops/conv.py": "import torch\n\nfrom ... import cli\n",
        "pkg/graph/__init__.py": "",
        "pkg/graph/io.py": "import onnx\n\nimport torch.nn.functional as F\n\n\ndef f():\n    from ..attacks import x\n",
        "pkg/graph/ok.py": "import numpy\nfrom .io import f\nfrom ..errors import E\n",
    })
    assert graph_layer_violations(root) == ["pkg/graph/io.py:3: pkg.graph.io imports torch.nn.functional",
                                            "pkg/graph/io.py:7: pkg.graph.io imports pkg.attacks"]
    assert cli_importers(root) == ["pkg/torch_exec/ops/conv.py:3: pkg.torch_exec.ops.conv imports pkg.cli"]
    assert torch_exec_violations(root) == ["pkg/torch_exec/ops/conv.py:3: pkg.torch_exec.ops.conv imports pkg.cli"]
