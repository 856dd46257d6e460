"""The boundaries around the data: only the vault, storage and the composition root may
name a storage backend or open a sealed record with the codec. Read from the source with
ast, so a test can hold every module of the package to them.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

from custodes.devtools.imports import absolute_name, import_graph, module_files, package_of

BACKEND_MODULES = ("storage.sqlite", "storage.memory", "storage.postgres", "storage.log_apart")
BACKEND_NAMES = frozenset({"SQLiteStorage", "MemoryStorage", "PostgresStorage"})
# A backup adapter copies one backend's tables as stored (ciphertext, tokens, the log) and
# checks a restored copy: it may reach that backend, and no other, and never the codec.
BACKUP_ADAPTERS = {"backup.sqlite": "storage.sqlite", "backup.postgres": "storage.postgres"}
# Receivers that hold the codec by convention, whatever object reaches them.
CODEC_ATTRIBUTES = frozenset({"codec", "_codec"})


@dataclass(frozen=True, order=True)
class Violation:
    module: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.module}:{self.line}: {self.reason}"


def may_cross(relative: Path) -> bool:
    """Whether a source file (relative to the package directory) lies inside the boundary:
    vault*.py or a vault/ package, storage/, or bootstrap.py, the composition root."""
    parts = relative.parts
    if len(parts) > 1:
        return parts[0] in ("vault", "storage")
    return relative.match("vault*.py") or parts == ("bootstrap.py",)


def check_boundaries(root: Path) -> list[Violation]:
    """Every import of a storage backend and every call of the codec's open outside the
    vault, storage and bootstrap, in the package whose source directory is root."""
    package = root.name
    backends = tuple(f"{package}.{name}" for name in BACKEND_MODULES)
    files = module_files(root)
    inside = {module for module, path in files.items() if may_cross(path.relative_to(root))}
    adapters = {f"{package}.{a}": f"{package}.{b}" for a, b in BACKUP_ADAPTERS.items()}
    found: set[Violation] = set()
    for imported in import_graph(root).imports:
        if imported.source in inside:
            continue
        # `from custodes.storage import memory` names the module as an attribute.
        named = f"{imported.target}.{imported.name}" if imported.name else imported.target
        own = adapters.get(imported.source)
        if own is not None and (named == own or named.startswith(own + ".")):
            continue
        if any(named == b or named.startswith(b + ".") for b in backends):
            found.add(Violation(imported.source, imported.line, f"imports {named}"))
        elif imported.target == f"{package}.storage" and imported.name in BACKEND_NAMES:
            what = f"imports {imported.name} from {imported.target}"
            found.add(Violation(imported.source, imported.line, what))
    for module, path in files.items():
        if module not in inside:
            tree = ast.parse(path.read_bytes(), filename=str(path))
            is_package = path.name == "__init__.py"
            found.update(_Crossings(package, module, is_package).read(tree))
    return sorted(found)


class _Crossings:
    """What a module does with the storage package's backend names and with the codec."""

    def __init__(self, package: str, module: str, is_package: bool) -> None:
        self._storage = f"{package}.storage"
        self._module = module
        self._here = package_of(module, is_package=is_package)

    def read(self, tree: ast.Module) -> list[Violation]:
        bound = self._module_bindings(tree)
        classes = _codec_class_names(tree)
        codecs = _codec_bindings(tree, classes)
        found = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in BACKEND_NAMES:
                owner = _dotted(node.value)
                if owner is not None and _resolve(owner, bound) == self._storage:
                    what = f"uses {node.attr} from {self._storage}"
                    found.append(Violation(self._module, node.lineno, what))
            elif isinstance(node, ast.Call) and _opens_with_codec(node, classes, codecs):
                found.append(Violation(self._module, node.lineno, "opens a record with the codec"))
        return found

    def _module_bindings(self, tree: ast.Module) -> dict[str, str]:
        """Local names bound to modules or their attributes by import statements."""
        bound: dict[str, str] = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.asname is not None:
                        bound[alias.asname] = alias.name
                    else:
                        head = alias.name.partition(".")[0]
                        bound[head] = head
            elif isinstance(node, ast.ImportFrom):
                base = absolute_name(node.module or "", node.level, self._here)
                if base is not None:
                    for alias in node.names:
                        bound[alias.asname or alias.name] = f"{base}.{alias.name}"
        return bound


def _codec_class_names(tree: ast.Module) -> set[str]:
    """RecordCodec and whatever it is imported as."""
    names = {"RecordCodec"}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            names.update(a.asname for a in node.names if a.name == "RecordCodec" and a.asname)
    return names


def _is_codec_construction(value: ast.expr | None, classes: set[str]) -> bool:
    if not isinstance(value, ast.Call):
        return False
    func = value.func
    if isinstance(func, ast.Name):
        return func.id in classes
    return isinstance(func, ast.Attribute) and func.attr == "RecordCodec"


def _codec_bindings(tree: ast.Module, classes: set[str]) -> set[str]:
    """Names and attributes (dotted) assigned a RecordCodec(...) anywhere in the module."""
    bound: set[str] = set()
    for node in ast.walk(tree):
        value: ast.expr | None
        if isinstance(node, ast.Assign):
            value, targets = node.value, list(node.targets)
        elif isinstance(node, ast.AnnAssign | ast.NamedExpr):
            value, targets = node.value, [node.target]
        else:
            continue
        if _is_codec_construction(value, classes):
            bound.update(name for name in map(_dotted, targets) if name is not None)
    return bound


def _opens_with_codec(call: ast.Call, classes: set[str], codecs: set[str]) -> bool:
    func = call.func
    if not (isinstance(func, ast.Attribute) and func.attr == "open"):
        return False
    receiver = func.value
    if isinstance(receiver, ast.Attribute) and receiver.attr in CODEC_ATTRIBUTES:
        return True
    if isinstance(receiver, ast.Name) and receiver.id == "codec":
        return True
    if _is_codec_construction(receiver, classes):
        return True
    dotted = _dotted(receiver)
    return dotted is not None and dotted in codecs


def _dotted(node: ast.expr) -> str | None:
    """`a.b.c` for a chain of attributes on a name, else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(node.id)
    return ".".join(reversed(parts))


def _resolve(dotted: str, bound: dict[str, str]) -> str | None:
    head, _, rest = dotted.partition(".")
    if head not in bound:
        return None
    return f"{bound[head]}.{rest}" if rest else bound[head]
