"""The shape of the `meter` package, read from its source with `ast` (nothing is imported).

- No import cycle between meter's modules: a newcomer can read any module
  knowing only what it imports, and start-up never depends on import order.
  Every import counts, those inside functions too (they run, later); only
  `if TYPE_CHECKING:` blocks are left out, since they never run.
- The observe layer (the pure reading of bytes) never reaches aiohttp, however
  indirectly: it is fed bytes and events, never sockets.
- The core (the proxy and the WebSocket relay) knows no addon: it calls the
  registry's hooks, and never imports metrics, traces, prices or reports.
- Settings (`meter.config`) do not load the price tables: `meter report` and
  every other reader of settings start without them.
- Addon hooks are discovered in one place, the registry (`meter.flow.Addons`):
  no other module asks an object with `hasattr` whether it implements something,
  nor looks up a hook by its name.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

from meter.flow import HOOKS

PACKAGE = Path(__file__).resolve().parent.parent / "meter"
REGISTRY = "meter.flow"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def sources() -> dict[str, tuple[Path, ast.Module]]:
    return {module_name(p): (p, ast.parse(p.read_text(), str(p))) for p in sorted(PACKAGE.rglob("*.py"))}


def _type_checking_only(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def run_time_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node of the tree except those under `if TYPE_CHECKING:` (its `else` runs, so it counts)."""
    for child in ast.iter_child_nodes(tree):
        if isinstance(child, ast.If) and _type_checking_only(child):
            for node in child.orelse:
                yield node
                yield from run_time_nodes(node)
            continue
        yield child
        yield from run_time_nodes(child)


def imported_names(name: str, path: Path, tree: ast.Module) -> Iterator[str]:
    """The dotted names a module imports at run time, relative imports resolved.

    `from X import y` yields `X.y` as well as `X`: `y` may be a submodule (then
    it is imported) or a name defined in `X` (then `X.y` is no module and is
    dropped by the caller)."""
    package = name if is_package(path) else name.rpartition(".")[0]
    for node in run_time_nodes(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            yield target
            for alias in node.names:
                yield f"{target}.{alias.name}"


def import_graph() -> dict[str, set[str]]:
    """meter module -> the meter modules importing it executes.

    Importing `a.b.c` runs the `__init__` of `a` and `a.b` first, so those are
    edges too, except a module's own enclosing packages: they are already
    being imported when it runs (that is how a package's `__init__` may import
    its own modules)."""
    modules = sources()
    graph: dict[str, set[str]] = {}
    for name, (path, tree) in modules.items():
        own = name if is_package(path) else name.rpartition(".")[0]
        enclosing = {".".join(own.split(".")[:i]) for i in range(1, own.count(".") + 2)}
        edges: set[str] = set()
        for target in imported_names(name, path, tree):
            parts = target.split(".")
            for i in range(1, len(parts) + 1):
                prefix = ".".join(parts[:i])
                if prefix in modules and prefix not in enclosing and prefix != name:
                    edges.add(prefix)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def reached_from(graph: dict[str, set[str]], start: list[str]) -> set[str]:
    """The modules importing `start` runs, `start` included."""
    reached: set[str] = set()
    todo = list(start)
    while todo:
        name = todo.pop()
        if name not in reached:
            reached.add(name)
            todo.extend(graph[name])
    return reached


def external_imports(tree: ast.Module) -> set[str]:
    """Top-level names of the non-meter packages a module imports at run time."""
    out: set[str] = set()
    for node in run_time_nodes(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            out.add(node.module.split(".")[0])
    out.discard("meter")
    return out


def test_no_import_cycle_in_meter() -> None:
    found = cycles(import_graph())
    assert not found, "modules that import each other (directly or through others): " + "; ".join(" <-> ".join(c) for c in found)


def test_cycle_finder_sees_a_cycle_through_a_package_init() -> None:
    # The finder itself: a -> b.c runs b's __init__, which imports a.
    graph = {"m.a": {"m.b", "m.b.c"}, "m.b": {"m.a"}, "m.b.c": set()}
    assert cycles(graph) == [["m.a", "m.b"]]
    assert cycles({"m.a": {"m.b"}, "m.b": set()}) == []


def test_observe_never_reaches_aiohttp() -> None:
    graph = import_graph()
    modules = sources()
    observe = [name for name in graph if name == "meter.observe" or name.startswith("meter.observe.")]
    assert observe, "the observe layer exists"
    offenders = sorted(name for name in reached_from(graph, observe) if "aiohttp" in external_imports(modules[name][1]))
    assert not offenders, f"the observe layer imports aiohttp through {offenders}"


def test_the_core_knows_no_addon() -> None:
    graph = import_graph()
    addons = {"meter.metrics", "meter.tracing", "meter.enrich", "meter.prices", "meter.server"}
    addons |= {name for name in graph if name.startswith(("meter.report", "meter.budgets", "meter.otel_metrics"))}
    for core in ("meter.proxy", "meter.websocket"):
        known = sorted(reached_from(graph, [core]) & addons)
        assert not known, f"{core} imports {known}"


def test_settings_do_not_load_the_price_tables() -> None:
    assert "meter.prices" not in reached_from(import_graph(), ["meter.config"])


def test_hooks_are_discovered_only_by_the_registry() -> None:
    offenders = []
    for name, (path, tree) in sources().items():
        if name == REGISTRY:
            continue
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
                continue
            if node.func.id == "hasattr":
                offenders.append(f"{path.name}:{node.lineno} hasattr(...)")
            elif node.func.id == "getattr" and len(node.args) >= 2:
                attr = node.args[1]
                if isinstance(attr, ast.Constant) and attr.value in HOOKS:
                    offenders.append(f"{path.name}:{node.lineno} getattr(..., {attr.value!r})")
    assert not offenders, "hook discovery outside the registry (meter.flow.Addons): " + ", ".join(offenders)
