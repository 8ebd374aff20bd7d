"""The package's shape: no import cycles, no command-line module imported by another module.

Static: the import graph is read from the source (``ast``), every ``import`` counted wherever it stands
(a function-level import is still a dependency;
an ``if TYPE_CHECKING:`` import, for annotations only, is not), so ``python -m pytest tests/test_structure.py`` checks it.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("harness", "search_spaces")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    tree = ast.parse(path.read_text())
    typing_only = {
        id(n)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and isinstance(block.test, ast.Name) and block.test.id == "TYPE_CHECKING"
        for stmt in block.body
        for n in ast.walk(stmt)
    }  # annotations only: no runtime edge
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        for t in targets:
            while t and t not in known:  # "pkg.mod.func" -> "pkg.mod"
                t = t.rpartition(".")[0]
            if (
                t and t != name and not name.startswith(t + ".")
            ):  # a package importing its own parent: no edge
                out.add(t)
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {n: _imports(n, p, set(modules)) for n, p in modules.items()}
    # A package's __init__ re-exporting its submodules is not a dependency of those submodules on it.
    return {n: {d for d in deps if not n.startswith(d + ".")} for n, deps in graph.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for d in sorted(graph.get(n, ())):
            if state.get(d) == 1:
                return stack[stack.index(d) :] + [d]
            if d not in state and (found := visit(d)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_no_import_cycles():
    cycle = _cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


CLIS = sorted(n for n, p in _modules().items() if 'if __name__ == "__main__"' in p.read_text())


@pytest.mark.parametrize("cli", CLIS)
def test_no_module_imports_a_command_line_module(cli):
    importers = sorted(n for n, deps in _graph().items() if cli in deps)
    assert not importers, f"{cli} is a command; {importers} import it: move what they need into the library"


def test_there_are_commands_to_check():
    assert {"harness.search", "harness.evaluate", "harness.train"} <= set(CLIS)
