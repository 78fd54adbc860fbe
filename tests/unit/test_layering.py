"""The package structure ARCHITECTURE.md describes, checked on the source: imports go down the layers,
imports across packages go through the package faces, and private names never cross a module."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "layerfs"
#: lower layers first; a package may import only packages of a lower rank (same rank: not each other)
LAYERS = [("errors", "libc", "face"), ("image",), ("store",), ("registry", "index"), ("fs",), ("fuse",), ("transfer",),
          ("changes", "lazy"), ("mount",), ("cli",)]
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}
NATIVE = {"_fuse": "fuse", "_zran": "index"}      # the one package that may import each native module


def _modules():
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG)
        if len(rel.parts) == 1 and rel.name in ("__init__.py", "__main__.py"):
            continue
        owner = rel.parts[0] if len(rel.parts) > 1 else rel.stem
        yield path, owner, ast.parse(path.read_text(), str(path))


def _imports(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "layerfs":
            yield node, node.module.split("."), [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "layerfs":
                    yield node, a.name.split("."), []


MODULES = list(_modules())


def test_every_package_has_a_rank():
    owners = {owner for _, owner, _ in MODULES}
    assert owners <= set(RANK), sorted(owners - set(RANK))


@pytest.mark.parametrize("path,owner,tree", MODULES, ids=[str(p.relative_to(PKG)) for p, _, _ in MODULES])
def test_imports_follow_the_layers(path, owner, tree):
    problems = []
    for node, parts, names in _imports(tree):
        if len(parts) == 1:         # from layerfs import X
            targets = [(n, n) for n in names if n != "__version__"]
        else:
            targets = [(parts[1], ".".join(parts))]
        for target, shown in targets:
            if target == owner:
                continue
            if target in NATIVE:
                if NATIVE[target] != owner:
                    problems.append(f"line {node.lineno}: {shown}: only {NATIVE[target]}/ uses the native module")
                continue
            if RANK.get(target, -1) >= RANK[owner]:
                problems.append(f"line {node.lineno}: {owner} imports {shown}, which is not below it")
            if len(parts) > 2 and target != owner:
                problems.append(f"line {node.lineno}: {shown}: import from the package face layerfs.{target}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("path,owner,tree", MODULES, ids=[str(p.relative_to(PKG)) for p, _, _ in MODULES])
def test_no_private_name_crosses_a_module(path, owner, tree):
    bad = [f"line {node.lineno}: {'.'.join(parts)}.{n}" for node, parts, names in _imports(tree)
           for n in names if n.startswith("_") and n != "__version__" and n not in NATIVE]
    assert not bad, "\n".join(bad)


def test_faces_name_real_modules():
    """Each package's _EXPORTS maps names to its own modules, and no public name shadows a module."""
    for init in sorted(PKG.glob("*/__init__.py")):
        tree = ast.parse(init.read_text())
        exports = next((ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign)
                        and any(getattr(t, "id", "") == "_EXPORTS" for t in n.targets)), None)
        assert exports is not None, f"{init}: no _EXPORTS"
        modules = {p.stem for p in init.parent.glob("*.py")}
        assert set(exports.values()) <= modules, (init, set(exports.values()) - modules)
        assert not set(exports) & modules, (init, set(exports) & modules)
