"""The layering the README draws, checked on the code's own imports.

Every `import` of a project module (at module level, inside functions and under TYPE_CHECKING
alike) is read from the source with `ast`; a module may import its own package and packages of
a lower layer only, and no circle of imports may exist between modules. A new module needs no
entry here: it belongs to its package's layer.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOP_LEVEL = ("cem", "resource_managers", "sitekit")

# layer of each package, bottom (0) to top; the longest matching prefix wins
LAYERS: dict[str, int] = {
    "sitekit": 0,       # what the CEM and the RMs share: the clock, price sources
    "cem": 0,           # the package root (version)
    "cem.data": 0,      # bundled real data
    "cem.ports": 1,     # the declared seams between the layers
    "cem.planner": 1,   # pure optimisation: arrays in, plan out
    "cem.site": 1,      # site configuration, data readers, forecasts
    "cem.store": 1,     # SQLite
    "cem.flex": 2,      # flexibility models (S2 objects -> planner assets and back), site problem
    # control-type plug-ins (session rules, state, flex binding): above the flex models they
    # bind, below the S2 session that dispatches to them
    "cem.control_types": 3,
    "cem.s2": 4,        # S2 sessions and the websocket server
    "cem.signals": 3,   # grid-signal sources: prices, congestion limits
    # S2 Connect pairing and session initiation (server side): above the S2 server it admits to
    "cem.s2connect": 5,
    "cem.control": 4,   # the MPC loop, dispatch, the guard
    "resource_managers": 5,  # beside the CEM: may import sitekit only (ONLY_FROM below)
    "cem.simulation": 6,  # the digital twin: drives the control loop and RM mappings in process
    "cem.app": 7,       # the edge: CLI, service, demo, benches, HTTP
    "cem.__main__": 8,  # `python -m cem`: above the edge it runs
}
# packages that may import nothing of the project but these (and themselves)
ONLY_FROM: dict[str, tuple[str, ...]] = {
    "resource_managers": ("sitekit",),
    "sitekit": (),
    "cem.planner": (),
    "cem.ports": (),
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    out = {}
    for top in TOP_LEVEL:
        for path in (ROOT / top).rglob("*.py"):
            out[module_name(path)] = path
    return out


def imported(name: str, path: Path, modules: dict[str, Path]) -> Iterator[tuple[str, int]]:
    """Project modules `name` imports, with the line of each import."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join([*base, *([node.module] if node.module else [])])
            else:
                source = node.module or ""
            targets = [f"{source}.{alias.name}" for alias in node.names]
            targets = [t if t in modules else source for t in targets]
        else:
            continue
        for target in targets:
            if target.split(".")[0] not in TOP_LEVEL:
                continue
            while target not in modules and "." in target:
                target = target.rpartition(".")[0]
            if target in modules and target != name:
                yield target, node.lineno


def package_of(module: str) -> str:
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len,
               default=None)
    assert best is not None, f"{module} is in no layer: add its package to LAYERS"
    return best


def import_graph() -> dict[str, dict[str, int]]:
    modules = project_modules()
    return {name: dict(imported(name, path, modules)) for name, path in modules.items()}


def test_every_import_goes_down_the_layers() -> None:
    wrong = []
    for module, targets in import_graph().items():
        own = package_of(module)
        for target, line in targets.items():
            theirs = package_of(target)
            if theirs == own or target == "cem":
                continue
            allowed = ONLY_FROM.get(own)
            if allowed is not None and theirs not in allowed:
                wrong.append(f"{module}:{line} imports {target} ({own} may import only "
                             f"{', '.join(allowed) or 'itself'})")
            elif LAYERS[theirs] >= LAYERS[own]:
                wrong.append(f"{module}:{line} imports {target}: {theirs} (layer "
                             f"{LAYERS[theirs]}) is not below {own} (layer {LAYERS[own]})")
    assert not wrong, "imports against the layering:\n" + "\n".join(sorted(wrong))


def test_no_import_circles() -> None:
    graph = {m: set(t) for m, t in import_graph().items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []
    counter = 0

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        nonlocal counter
        index[node] = low[node] = counter
        counter += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    assert not circles, "import circles:\n" + "\n".join(" <-> ".join(c) for c in circles)


def test_the_check_sees_a_wrong_import(tmp_path: Path) -> None:
    """The checker itself: an upward import in a lower layer is found with its line."""
    source = tmp_path / "probe.py"
    source.write_text("import os\n\nfrom cem.app import cli\n")
    modules = {**project_modules(), "cem.planner.probe": source}
    found = dict(imported("cem.planner.probe", source, modules))
    assert found == {"cem.app.cli": 3}
    assert LAYERS[package_of("cem.app.cli")] > LAYERS[package_of("cem.planner.probe")]
