"""Layers point one way (docs/DESIGN.md): models -> nn -> fold -> functional -> ops -> kernels | _C.

A static check of every ``import`` in ``fastres/`` and ``kernels/`` (``fastres.kernels``),
at module level and inside functions alike (a lazy import is still a dependency): a module
may import modules of its own layer or of a lower one, never of a higher one; a kernel
imports only kernels. Every module must be placed in a layer below, so a new one is
classified when it is added.
"""
from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent

# low -> high; a module belongs to the layer of the longest prefix naming it
LAYERS = (
    ("kernels", ("fastres.kernels", "fastres._C")),
    ("base", ("fastres._reference", "fastres._validate")),
    ("ops", ("fastres.backends", "fastres.ops", "fastres.conv_ops", "fastres.conv_backend", "fastres.conv_aten",
             "fastres.conv_choice_table", "fastres.cudnn", "fastres._triton_ops")),
    ("functional", ("fastres.functional",)),
    ("fold", ("fastres.fold",)),
    ("nn", ("fastres.nn",)),
    ("models", ("fastres.models",)),
    ("top", ("fastres", "fastres.__main__", "fastres.cli", "fastres._argtypes", "fastres.check", "fastres.bench", "fastres.paper",
             "fastres.convert", "fastres.training", "fastres.inference")),
)
RANK = {name: i for i, (name, _) in enumerate(LAYERS)}


def layer_of(module: str):
    best = None
    for name, prefixes in LAYERS:
        for p in prefixes:
            if module == p or module.startswith(p + "."):
                if best is None or len(p) > len(best[1]):
                    best = (name, p)
    return None if best is None else best[0]


def _modules():
    """{module name: path} of fastres (fastres/ and kernels/ as fastres.kernels)."""
    mods = {}
    for base, pkg in ((ROOT / "fastres", "fastres"), (ROOT / "kernels", "fastres.kernels")):
        for path in sorted(base.rglob("*.py")):
            rel = path.relative_to(base).with_suffix("")
            parts = [pkg] + list(rel.parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = path
    return mods


MODULES = _modules()
EXTENSIONS = {"fastres._C"}  # compiled, no .py file


def _resolve(module: str, path: pathlib.Path, node: ast.AST):
    """The fastres modules an import node names (submodules where ``from X import name`` names one)."""
    is_pkg = path.name == "__init__.py"
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name == "fastres" or a.name.startswith("fastres.")]
    assert isinstance(node, ast.ImportFrom)
    if node.level:
        base = module.split(".") if is_pkg else module.split(".")[:-1]
        base = base[:len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if not (target == "fastres" or target.startswith("fastres.")):
        return []
    out = []
    for a in node.names:
        sub = f"{target}.{a.name}"
        out.append(sub if sub in MODULES or sub in EXTENSIONS else target)
    return out


def _imports(module: str, path: pathlib.Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            for target in _resolve(module, path, node):
                yield node.lineno, target


def test_every_module_has_a_layer():
    missing = sorted(m for m in MODULES if layer_of(m) is None)
    assert not missing, f"place these modules in tests/test_layering.py's LAYERS: {missing}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_imports_a_higher_layer(module):
    path = MODULES[module]
    mine = layer_of(module)
    bad = []
    for line, target in _imports(module, path):
        theirs = layer_of(target)
        if mine == "kernels" and not target.startswith("fastres.kernels"):
            bad.append(f"{path.relative_to(ROOT)}:{line} imports {target}: a kernel imports only kernels")
        elif theirs is not None and RANK[theirs] > RANK[mine]:
            bad.append(f"{path.relative_to(ROOT)}:{line} ({mine}) imports {target} ({theirs}), a higher layer")
    assert not bad, "\n".join(bad)


def test_the_check_sees_an_upward_import(tmp_path):
    """The check itself: a lazy import of nn inside a fold function is flagged."""
    src = tmp_path / "fold.py"
    src.write_text("def f():\n    from .nn.blocks import _FusedBlock\n    return _FusedBlock\n")
    targets = [t for _, t in _imports("fastres.fold", src)]
    assert targets == ["fastres.nn.blocks"]
    assert RANK[layer_of("fastres.nn.blocks")] > RANK[layer_of("fastres.fold")]
    assert layer_of("fastres.models.eval_plan") == "models" and layer_of("fastres.kernels._conv") == "kernels"
