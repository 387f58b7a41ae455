"""The daemon's module layout, read from the code: no import cycle (function-level and
TYPE_CHECKING imports included), no backend importing a peer backend, modules under 500 lines,
and which side each module runs on: every module says (`Runs in:` in its docstring), and no
child process imports, even indirectly, a module that runs only in the master."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "daemon" / "workerd"
BACKENDS = ("workerd.pool", "workerd.gpu", "workerd.cluster")
MAX_LINES = 500
# What each child process starts from (python -m, a fork's entry point, what Ray imports).
CHILD_ENTRIES = (
    "workerd.pool.zygote",
    "workerd.pool.worker",
    "workerd.gpu.worker",
    "workerd.cluster.bridge",
    "workerd.cluster.remote",
)


def module_name(path: Path) -> str:
    parts = ["workerd", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in PACKAGE.rglob("*.py")}


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Every workerd module `name` imports, wherever the import stands."""
    found: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {module for module in found if module in known and module != name}


def graph() -> dict[str, set[str]]:
    table = modules()
    return {name: imports(name, path, set(table)) for name, path in table.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)) is not None:
            return cycle
    return None


def backend_of(module: str) -> str | None:
    return next((b for b in BACKENDS if module == b or module.startswith(b + ".")), None)


def test_no_import_cycle() -> None:
    edges = graph()
    # A package's __init__ is imported with each of its modules: an edge to it is no cycle of ours.
    edges = {m: {n for n in targets if not m.startswith(n + ".")} for m, targets in edges.items()}
    assert find_cycle(edges) is None, " -> ".join(find_cycle(edges) or [])


def test_no_backend_imports_a_peer() -> None:
    crossings = [
        f"{module} imports {target}"
        for module, targets in graph().items()
        for target in targets
        if backend_of(module) and backend_of(target) and backend_of(module) != backend_of(target)
    ]
    assert crossings == []


def test_modules_stay_small() -> None:
    long = {
        name: n for name, path in modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}


def test_the_cycle_finder_finds_one() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def runs_in(path: Path) -> str | None:
    match = re.search(r"^Runs in: (.*)$", ast.get_docstring(ast.parse(path.read_text())) or "", re.M)
    return match.group(1) if match else None


def test_every_module_says_where_it_runs() -> None:
    silent = [name for name, path in modules().items() if path.name != "__init__.py" and not runs_in(path)]
    assert silent == []


def test_no_child_imports_the_master() -> None:
    """A child imports nothing that runs only in the master (its state, its sockets, its loop):
    what both sides need lives in a module that says `both`."""
    table, edges = modules(), graph()
    master_only = {name for name, path in table.items() if (runs_in(path) or "").startswith("the master.")}
    assert {"workerd.master", "workerd.core.child", "workerd.core.lifecycle"} <= master_only
    reached = {}
    for entry in CHILD_ENTRIES:
        seen: set[str] = set()
        todo = [entry]
        while todo:
            for target in edges[todo.pop()] - seen:
                seen.add(target)
                todo.append(target)
        reached[entry] = sorted(seen & master_only)
    assert reached == {entry: [] for entry in CHILD_ENTRIES}
