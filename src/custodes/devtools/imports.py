"""The package's import graph, read from its source with ast, and the cycles in it:
`python -m custodes.devtools.imports [PACKAGE_DIR]` prints the graph, then each cycle,
and exits 1 if there is one.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

# Callables that load a module named by a string: importlib's, and the builtin.
_DYNAMIC_IMPORTERS = frozenset({"import_module", "__import__"})


@dataclass(frozen=True)
class Import:
    """One import of a module of the package by another, where the source says so."""

    source: str  # the importing module
    target: str  # the module imported, by its absolute name (perhaps of no module there)
    line: int
    type_only: bool  # under `if TYPE_CHECKING:`: never runs, so no part of a cycle
    name: str | None = None  # `from target import name`, when name is not a module


@dataclass(frozen=True)
class ImportGraph:
    package: str
    modules: dict[str, Path]  # module name -> its source file
    imports: tuple[Import, ...]

    def edges(self, *, type_only: bool = False) -> dict[str, set[str]]:
        """Each module's imported modules: those that run, or only the type-checking ones
        (minus any also imported at run time)."""
        run: dict[str, set[str]] = {module: set() for module in self.modules}
        checking: dict[str, set[str]] = {module: set() for module in self.modules}
        for found in self.imports:
            if found.target in self.modules:
                (checking if found.type_only else run)[found.source].add(found.target)
        if not type_only:
            return run
        return {module: checking[module] - run[module] for module in self.modules}


def module_files(root: Path) -> dict[str, Path]:
    """Every module under a package directory, by dotted name (the directory's own name
    first). A package's __init__.py wins over a module file of the same name, as it does
    when Python imports."""
    found: dict[str, Path] = {}
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root.parent).with_suffix("")
        parts = relative.parts
        if "__pycache__" in parts:
            continue
        if parts[-1] == "__init__":
            found[".".join(parts[:-1])] = path
        else:
            found.setdefault(".".join(parts), path)
    return found


def import_graph(root: Path) -> ImportGraph:
    """Parse every module of the package at root (a directory such as src/custodes)."""
    modules = module_files(root)
    imports: list[Import] = []
    for module, path in modules.items():
        tree = ast.parse(path.read_bytes(), filename=str(path))
        reader = _ModuleImports(root.name, module, path.name == "__init__.py", modules)
        imports.extend(reader.read(tree))
    return ImportGraph(root.name, modules, tuple(imports))


def find_cycles(graph: ImportGraph) -> list[list[str]]:
    """The strongly connected components of more than one module among the imports that
    run, each sorted, in order of their first module."""
    components = _strongly_connected(graph.edges())
    return sorted(sorted(c) for c in components if len(c) > 1)


def describe_cycle(graph: ImportGraph, cycle: Sequence[str]) -> list[str]:
    """The imports that close a cycle, one line each, with where each is written."""
    members = set(cycle)
    lines = []
    seen: set[tuple[str, str]] = set()
    for found in sorted(graph.imports, key=lambda i: (i.source, i.line, i.target)):
        pair = (found.source, found.target)
        if found.type_only or pair in seen:
            continue
        if found.source in members and found.target in members:
            seen.add(pair)
            lines.append(f"{found.source} -> {found.target}  (line {found.line})")
    return lines


def report(graph: ImportGraph) -> tuple[str, int]:
    """The printed graph and cycles, and the exit status: 1 if any cycle, else 0."""
    run = graph.edges()
    checking = graph.edges(type_only=True)
    out = [f"import graph of {graph.package} ({len(graph.modules)} modules)", ""]
    for module in sorted(graph.modules):
        out.append(f"{module} -> {', '.join(sorted(run[module])) or '(none)'}")
        if checking[module]:
            out.append(f"    if TYPE_CHECKING: {', '.join(sorted(checking[module]))}")
    cycles = find_cycles(graph)
    out.append("")
    if not cycles:
        out.append("no import cycle")
        return "\n".join(out), 0
    out.append(f"{len(cycles)} import cycle{'s' if len(cycles) > 1 else ''}:")
    for cycle in cycles:
        out.append("")
        out.append("  " + ", ".join(cycle))
        out.extend("    " + line for line in describe_cycle(graph, cycle))
    return "\n".join(out), 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m custodes.devtools.imports",
        description="Print the package's import graph and its cycles; exit 1 on a cycle.",
    )
    parser.add_argument(
        "package_dir",
        nargs="?",
        type=Path,
        default=Path(__file__).resolve().parent.parent,
        help="the package's source directory (default: this custodes)",
    )
    args = parser.parse_args(argv)
    text, status = report(import_graph(args.package_dir))
    print(text)
    return status


class _ModuleImports:
    """Reads one module's imports of the package, wherever they are written (functions
    included), keeping apart those only a type checker sees."""

    def __init__(
        self, package: str, module: str, is_package: bool, modules: dict[str, Path]
    ) -> None:
        self._package = package
        self._module = module
        self._here = package_of(module, is_package=is_package)
        self._modules = modules

    def read(self, tree: ast.Module) -> Iterator[Import]:
        yield from self._visit(tree, type_only=False)

    def _visit(self, node: ast.AST, *, type_only: bool) -> Iterator[Import]:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for statement in node.body:
                yield from self._visit(statement, type_only=True)
            for statement in node.orelse:
                yield from self._visit(statement, type_only=type_only)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield from self._found(alias.name, node.lineno, type_only)
        elif isinstance(node, ast.ImportFrom):
            yield from self._from(node, type_only)
        elif isinstance(node, ast.Call):
            name = _dynamic_import(node)
            if name is not None:
                yield from self._dynamic(node, name, type_only)
        for child in ast.iter_child_nodes(node):
            yield from self._visit(child, type_only=type_only)

    def _from(self, node: ast.ImportFrom, type_only: bool) -> Iterator[Import]:
        base = absolute_name(node.module or "", node.level, self._here)
        if base is None:
            return
        for alias in node.names:
            submodule = f"{base}.{alias.name}"
            if submodule in self._modules:
                yield from self._found(submodule, node.lineno, type_only)
            elif alias.name != "*":
                yield from self._found(base, node.lineno, type_only, name=alias.name)
            else:
                yield from self._found(base, node.lineno, type_only)

    def _dynamic(self, call: ast.Call, name: str, type_only: bool) -> Iterator[Import]:
        level = len(name) - len(name.lstrip("."))
        if level == 0:
            yield from self._found(name, call.lineno, type_only)
            return
        anchor = _literal_argument(call, 1, "package")
        target = None if anchor is None else absolute_name(name[level:], level, anchor)
        if target is not None:
            yield from self._found(target, call.lineno, type_only)

    def _found(
        self, dotted: str, line: int, type_only: bool, name: str | None = None
    ) -> Iterator[Import]:
        inside = dotted == self._package or dotted.startswith(self._package + ".")
        if inside and dotted != self._module:
            yield Import(self._module, dotted, line, type_only, name)


def package_of(module: str, *, is_package: bool) -> str:
    """The package a module's relative imports start from."""
    return module if is_package else module.rpartition(".")[0]


def absolute_name(name: str, level: int, anchor: str) -> str | None:
    """A name written after `level` dots inside the package `anchor`, made absolute; None
    if the dots climb above the top package."""
    if level == 0:
        return name
    parts = anchor.split(".")
    if level - 1 >= len(parts):
        return None
    base = ".".join(parts[: len(parts) - (level - 1)])
    return f"{base}.{name}" if name else base


def _is_type_checking(test: ast.expr) -> bool:
    if isinstance(test, ast.Name):
        return test.id == "TYPE_CHECKING"
    return isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"


def _dynamic_import(call: ast.Call) -> str | None:
    """The literal module name of `importlib.import_module("...")` (or of the bare
    import_module / __import__), else None."""
    func = call.func
    if isinstance(func, ast.Attribute):
        if not (isinstance(func.value, ast.Name) and func.value.id == "importlib"):
            return None
        callee = func.attr
    elif isinstance(func, ast.Name):
        callee = func.id
    else:
        return None
    if callee not in _DYNAMIC_IMPORTERS:
        return None
    return _literal_argument(call, 0, "name")


def _literal_argument(call: ast.Call, position: int, keyword: str) -> str | None:
    if len(call.args) > position:
        value: ast.expr | None = call.args[position]
    else:
        value = next((k.value for k in call.keywords if k.arg == keyword), None)
    if isinstance(value, ast.Constant) and isinstance(value.value, str):
        return value.value
    return None


def _strongly_connected(edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative so that a long chain of imports cannot exhaust the
    interpreter's recursion limit."""
    index: dict[str, int] = {}
    lowlink: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0
    for start in sorted(edges):
        if start in index:
            continue
        work: list[tuple[str, Iterator[str]]] = [(start, iter(sorted(edges[start])))]
        index[start] = lowlink[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, successors = work[-1]
            advanced = False
            for successor in successors:
                if successor not in index:
                    index[successor] = lowlink[successor] = counter
                    counter += 1
                    stack.append(successor)
                    on_stack.add(successor)
                    work.append((successor, iter(sorted(edges.get(successor, ())))))
                    advanced = True
                    break
                if successor in on_stack:
                    lowlink[node] = min(lowlink[node], index[successor])
            if advanced:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                lowlink[parent] = min(lowlink[parent], lowlink[node])
            if lowlink[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                components.append(component)
    return components


if __name__ == "__main__":
    sys.exit(main())
