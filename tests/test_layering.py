"""The package's import graph, read from the source with ``ast`` (nothing is
imported): layers point one way (DESIGN §6b, the README's "Layout" drawing),
kernels know formats and their own launch code only, ``distributed`` sits
below ``nn``, and no module imports itself back through others.

Every import statement counts, at module level or inside a function (a lazy
import is still a dependency, and a cycle through it is still a cycle).
``from a.b import c`` depends on the module ``a.b.c`` when that is a module,
else on ``a.b``; importing ``a.b`` also runs ``a/__init__``, so it depends on
every enclosing package that is not also one of the importer's own.
"""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path
from typing import Dict, List, Optional, Set, Tuple

import torch_moe_quant

ROOT = "torch_moe_quant"
PACKAGE_DIR = Path(torch_moe_quant.__file__).parent

#: The drawing of the README's "Layout" section, bottom row first. A module
#: belongs to the entry of its first name under ``torch_moe_quant`` (``ROOT``
#: is ``torch_moe_quant/__init__.py``); it may import its own entry and the
#: rows below its own, never its own row's other entries or a row above.
LAYERS: Tuple[Tuple[str, ...], ...] = (
    ("formats",),
    ("activations", "fake_impls", "routing", "schemes"),
    ("experts",),
    ("kernels", "reference"),
    ("ops",),
    ("moe",),
    ("distributed", "lowerings"),
    ("nn",),
    (ROOT, "tools"),
    ("demo",),
)

#: Imports the rules below forbid that are still in the tree, as
#: ``(importer, imported module): what it is``, each with a comment saying
#: what removes it and which work will. They are in files other work is
#: changing now; that work deletes the entry with the change that removes
#: the import. The test fails when an entry no longer occurs, so the list
#: cannot go stale.
ALLOWED: Dict[Tuple[str, str], str] = {
}

#: What kernel modules must never import (besides private helpers of other packages).
KERNELS_MUST_NOT_IMPORT = ("ops", "reference", "nn", "lowerings")


@dataclasses.dataclass(frozen=True)
class Import:
    importer: str
    module: str  # the module depended on (a package means its __init__)
    name: Optional[str]  # the name taken from it (``from module import name``), else None
    line: int

    def where(self) -> str:
        what = self.module + (f".{self.name}" if self.name else "")
        return f"{self.importer}:{self.line} imports {what}"


def _modules() -> Dict[str, Tuple[Path, bool]]:
    """Every module of the package: dotted name -> (file, is a package)."""
    out = {}
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return out


MODULES = _modules()


def _absolute(importer: str, is_pkg: bool, level: int, module: Optional[str]) -> str:
    if level == 0:
        return module or ""
    base = importer.split(".")
    base = base if is_pkg else base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def _imports(importer: str) -> List[Import]:
    path, is_pkg = MODULES[importer]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [Import(importer, a.name, None, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(importer, is_pkg, node.level, node.module)
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.append(Import(importer, sub, None, node.lineno) if sub in MODULES
                           else Import(importer, base, a.name, node.lineno))
    return [i for i in out if i.module == ROOT or i.module.startswith(ROOT + ".")]


IMPORTS: Dict[str, List[Import]] = {m: _imports(m) for m in MODULES}


def _depends_on(imp: Import) -> List[str]:
    """The module an import names and the enclosing packages it runs first
    (those that are not the importer's own enclosing packages)."""
    own = imp.importer.split(".")
    own = {".".join(own[:i]) for i in range(1, len(own) + 1)}
    parts = imp.module.split(".")
    chain = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return [m for m in chain if m in MODULES and m not in own]


def _edges(allowed=True) -> Dict[str, Dict[str, Import]]:
    """importer -> {module depended on: first import making it so}."""
    out: Dict[str, Dict[str, Import]] = {m: {} for m in MODULES}
    for importer, imports in IMPORTS.items():
        for imp in imports:
            for dep in _depends_on(imp):
                if dep == importer or (not allowed and (importer, dep) in ALLOWED):
                    continue
                out[importer].setdefault(dep, imp)
    return out


def _unit(module: str) -> str:
    parts = module.split(".")
    return ROOT if len(parts) == 1 else parts[1]


def _row(unit: str) -> Optional[int]:
    return next((i for i, row in enumerate(LAYERS) if unit in row), None)


def _allowed_or(violations: List[Tuple[Tuple[str, str], str]]) -> List[str]:
    """The violations not in ``ALLOWED``."""
    return [msg for key, msg in violations if key not in ALLOWED]


def _violations_kernels() -> List[Tuple[Tuple[str, str], str]]:
    out = []
    for importer, imports in IMPORTS.items():
        if _unit(importer) != "kernels":
            continue
        for imp in imports:
            unit = _unit(imp.module)
            if unit in KERNELS_MUST_NOT_IMPORT:
                out.append(((importer, imp.module), f"{imp.where()}: kernels never import {unit}"))
            elif unit != "kernels" and _private_helper(imp):
                out.append(((importer, imp.module), f"{imp.where()}: a private helper of another package"))
    return out


def _private_helper(imp: Import) -> bool:
    """A private (underscore) module or name: ``a._b``, ``from a import _c``."""
    inner = imp.module.split(".")[1:] + ([imp.name] if imp.name else [])
    return any(p.startswith("_") and not p.startswith("__") for p in inner)


def _private_attributes() -> List[str]:
    """``mod._helper`` where ``mod`` is another package's module a kernel
    module imported (``from .. import formats`` then ``formats._x``)."""
    out = []
    for importer, imports in IMPORTS.items():
        if _unit(importer) != "kernels":
            continue
        bound = {}
        tree = ast.parse(MODULES[importer][0].read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                base = _absolute(importer, MODULES[importer][1], node.level, node.module)
                for a in node.names:
                    if f"{base}.{a.name}" in MODULES:
                        bound[a.asname or a.name] = f"{base}.{a.name}"
            elif isinstance(node, ast.Import):
                bound.update({a.asname: a.name for a in node.names if a.asname})
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id in bound and _unit(bound[node.value.id]) != "kernels"
                and bound[node.value.id].startswith(ROOT)
                and node.attr.startswith("_") and not node.attr.startswith("__")
            ):
                out.append(f"{importer}:{node.lineno} uses {bound[node.value.id]}.{node.attr}")
    return out


def _violations_distributed() -> List[Tuple[Tuple[str, str], str]]:
    return [
        ((importer, imp.module), f"{imp.where()}: distributed never imports nn (nn sits above it)")
        for importer, imports in IMPORTS.items() if _unit(importer) == "distributed"
        for imp in imports if _unit(imp.module) == "nn"
    ]


def _violations_layers() -> List[Tuple[Tuple[str, str], str]]:
    out = []
    for importer, deps in _edges().items():
        src = _unit(importer)
        for dep, imp in deps.items():
            dst = _unit(dep)
            if dst != src and not _row(dst) < _row(src):
                out.append(((importer, dep), f"{imp.where()}: {src} (row {_row(src)}) may not import "
                                             f"{dst} (row {_row(dst)}) (LAYERS)"))
    return out


def _cycles(edges: Dict[str, Dict[str, Import]]) -> List[List[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on: Set[str] = set()
    out: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def _describe(cycle: List[str], edges) -> str:
    members = set(cycle)
    links = [edges[a][b].where() for a in cycle for b in edges[a] if b in members]
    return " <-> ".join(cycle) + ": " + "; ".join(links)


# ---------------------------------------------------------------- the rules


def test_kernels_import_no_ops_reference_nn_lowerings_or_private_helpers():
    assert _allowed_or(_violations_kernels()) == []
    assert _private_attributes() == []


def test_distributed_does_not_import_nn():
    assert _allowed_or(_violations_distributed()) == []


def test_no_import_cycles():
    edges = _edges(allowed=False)
    assert [_describe(c, edges) for c in _cycles(edges)] == []


def test_every_module_is_on_the_drawing():
    assert sorted({_unit(m) for m in MODULES if _row(_unit(m)) is None}) == []


def test_readme_drawing_is_layers():
    """The README's "Layout" drawing has the rows of ``LAYERS`` (top row first)."""
    text = (PACKAGE_DIR.parent / "README.md").read_text()
    block = text[text.index("- Layout:"):]
    block = block[block.index("```") + 3:]
    block = block[: block.index("```")]
    rows = []
    for line in block.splitlines():
        if not line.strip() or line.strip().startswith("↓"):
            continue
        names = []
        for token in line.split():
            if not re.fullmatch(r"\w+(\.py|/)", token):
                break
            name = token[:-3] if token.endswith(".py") else token[:-1]
            names.append(ROOT if name == "__init__" else name)
        rows.append(tuple(sorted(names)))
    assert rows[::-1] == [tuple(sorted(row)) for row in LAYERS]


def test_layers_point_down():
    assert _allowed_or(_violations_layers()) == []


def test_allowed_entries_still_occur():
    """An allowlisted import that is gone must leave ``ALLOWED`` too."""
    found = {key for key, _ in _violations_kernels() + _violations_distributed() + _violations_layers()}
    edges = _edges()
    for cycle in map(set, _cycles(edges)):  # an edge inside a cycle's component lies on a cycle
        found |= {(a, b) for a in cycle for b in edges[a] if b in cycle}
    assert sorted(set(ALLOWED) - found) == []


# ---------------------------------------------------------------- the checker itself


def test_the_walk_sees_lazy_imports_and_parent_packages():
    """Function-level imports count; ``from ..ops.routing import x`` also
    depends on ``ops/__init__``; ``from . import config`` on the module."""
    kernels_align = IMPORTS[f"{ROOT}.kernels.align"]
    assert any(i.module == f"{ROOT}.kernels._align_kernel" for i in kernels_align)  # imported in a function
    fake = Import(f"{ROOT}.kernels.align", f"{ROOT}.ops.routing", "x", 1)
    assert _depends_on(fake) == [f"{ROOT}.ops", f"{ROOT}.ops.routing"]
    assert _depends_on(Import(f"{ROOT}.kernels.align", f"{ROOT}.kernels.config", None, 1)) == [
        f"{ROOT}.kernels.config"
    ]


def test_the_checker_finds_what_it_must():
    edges = {"a": {"b": None}, "b": {"c": None}, "c": {"a": None}, "d": {"a": None}}
    assert _cycles(edges) == [["a", "b", "c"]]
    assert _private_helper(Import(f"{ROOT}.kernels.route", f"{ROOT}.routing", "_as_method", 1))
    assert _private_helper(Import(f"{ROOT}.kernels.x", f"{ROOT}.formats._e8m0", None, 1))
    assert not _private_helper(Import(f"{ROOT}.kernels.x", f"{ROOT}.formats.core", "check_tensor", 1))
    assert _row("kernels") == _row("reference") and _row("distributed") < _row("nn")
