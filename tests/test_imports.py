"""The package's modules import one another without a cycle: every import statement, at
module level or inside a function (a cycle hidden in a function still ties the modules into
one floor), is read from the source (AST) and followed to the module that defines the name."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: source folder -> the module name it has once installed (pyproject's package-dir)
PACKAGES = {"ranktuner_kernels": "ranktuner_kernels", "reference": "ranktuner_kernels.reference",
            "csrc_triton": "ranktuner_kernels.kernels"}


def _modules():
    """``{module name: (path, is_package)}`` of every ``.py`` file of the three folders."""
    out = {}
    for folder, name in PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            is_pkg = parts[-1] == "__init__"
            if is_pkg:
                parts = parts[:-1]
            out[".".join([name, *parts])] = (path, is_pkg)
    return out


def _resolve(target: str, modules) -> str | None:
    """The longest prefix of ``target`` that is one of the modules, or None (outside)."""
    parts = target.split(".")
    for i in range(len(parts), 0, -1):
        name = ".".join(parts[:i])
        if name in modules:
            return name
    return None


def _edges(name, modules):
    """``[(imported module, imported name or None)]`` of every import in module ``name``."""
    path, is_pkg = modules[name]
    package = name if is_pkg else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            base = (f"{base}.{node.module}" if node.module else base) if node.level else node.module
            out += [(base, alias.name) for alias in node.names]
    return out


def import_graph():
    """``{module: {modules it imports}}`` within the package. ``from pkg import x`` counts as an
    import of the submodule ``pkg.x`` where there is one, else of the module ``pkg`` takes ``x``
    from (a package re-exporting a name points to where the name is defined)."""
    modules = _modules()

    def source_of(pkg, attr, seen=()):
        if f"{pkg}.{attr}" in modules:
            return f"{pkg}.{attr}"
        if modules[pkg][1] and pkg not in seen:  # a package's re-export: follow it
            for base, alias in _edges(pkg, modules):
                if alias == attr and _resolve(base, modules):
                    return source_of(_resolve(base, modules), attr, (*seen, pkg))
        return pkg

    graph = {}
    for name in modules:
        deps = set()
        for base, attr in _edges(name, modules):
            mod = _resolve(base, modules) if base else None
            if mod is None:
                continue
            dep = source_of(mod, attr) if attr is not None and mod == base else mod
            if dep != name:
                deps.add(dep)
        graph[name] = deps
    return graph


def find_cycle(graph):
    """One import cycle as a list of modules (first == last), or None."""
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == "open":
                return stack[stack.index(d):] + [d]
            if d not in state:
                found = visit(d)
                if found:
                    return found
        stack.pop()
        state[m] = "done"
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_no_import_cycle():
    graph = import_graph()
    assert "ranktuner_kernels._call" in graph and "ranktuner_kernels.kernels.row_stats" in graph
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_walker_sees_function_level_imports_and_cycles():
    """The check can fail: a function-level import back up is an edge, and a cycle is found."""
    graph = import_graph()
    assert "ranktuner_kernels.kernels" in graph["ranktuner_kernels._dispatch"]  # imported inside a method
    assert "ranktuner_kernels.token_loss" in graph["ranktuner_kernels.modules"]
    looped = {**graph, "ranktuner_kernels._dispatch": graph["ranktuner_kernels._dispatch"] | {"ranktuner_kernels.linear_loss"}}
    cycle = find_cycle(looped)
    assert cycle is not None and "ranktuner_kernels._dispatch" in cycle


def test_the_core_layers():
    """The losses stand on the core, not on each other; the core does not import a loss."""
    graph = import_graph()
    losses = {f"ranktuner_kernels.{m}" for m in ("token_loss", "linear_loss", "token_logprobs")}
    for loss in losses:
        assert not graph[loss] & losses, (loss, graph[loss] & losses)
    for core in ("_call", "_chunks", "_dispatch", "_distributed", "_inputs", "_params", "_terms", "_registry",
                 "weightings"):
        assert not graph[f"ranktuner_kernels.{core}"] & losses, core
