"""The package's layering (README, "Layout"): every import, at module level or inside a function, goes
to the same layer or a lower one; no import cycle; ``import poise.losses`` loads only the maths; no
module shares its name with a function at the package top."""

import ast
import subprocess
import sys
from pathlib import Path

import poise

PKG = Path(poise.__file__).parent

#: Lowest first. A module may import its own layer and the layers below it, never one above.
LAYERS = [
    ("bottom", ["poise.types", "poise.ops", "poise.params", "poise.errors", "poise.seq", "poise.fsutil"]),
    ("losses", ["poise.losses"]),
    ("balance", ["poise.balance"]),
    ("objective", ["poise.compose", "poise.presets", "poise.methodsdoc"]),
    ("data", ["poise.data"]),
    ("model", ["poise.model"]),
    ("diagnostics", ["poise.diagnostics"]),
    ("training", ["poise.training"]),
    ("testbed", ["poise.testbed"]),
    ("eval", ["poise.eval"]),
    ("recipes", ["poise.recipes"]),
    ("integrations", ["poise.integrations"]),
    ("faces", ["poise.api", "poise.cli", "poise.__main__", "poise"]),
]


def _modules() -> dict[str, Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = set(_modules())


def _layer(module: str) -> int:
    best, rank = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, rank = len(p), i
    assert rank is not None, f"{module} is in no layer: add it to LAYERS and to the README's Layout"
    return rank


def _target(node: ast.AST, module: str, is_pkg: bool) -> set[str]:
    """The modules one AST node imports (``import``, ``from``, ``import_module("...")``, and the lazy
    re-export table of poise/__init__.py)."""
    if isinstance(node, ast.Import):
        return {a.name for a in node.names}
    if isinstance(node, ast.ImportFrom):
        if node.level:
            base = module.split(".") if is_pkg else module.split(".")[:-1]
            base = base[:len(base) - (node.level - 1)]
            name = ".".join(base + ([node.module] if node.module else []))
        else:
            name = node.module or ""
        # `from poise import fsutil` imports the module poise.fsutil, not the package's face
        return {f"{name}.{a.name}" if f"{name}.{a.name}" in MODULES else name for a in node.names}
    if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module" and node.args:
        return {str(getattr(node.args[0], "value", ""))}
    if isinstance(node, ast.Dict):
        return {v.value for v in node.values if isinstance(v, ast.Constant) and isinstance(v.value, str)}
    return set()


def _imports(module: str, path: Path) -> set[str]:
    """Every poise module this file imports, anywhere in it (functions included), resolved."""
    is_pkg = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        found |= _target(node, module, is_pkg)
    return {m for m in found if m == "poise" or m.startswith("poise.")}


def test_every_import_goes_down_the_layers():
    mods = _modules()
    bad = []
    for name, path in sorted(mods.items()):
        for target in _imports(name, path):
            if name != "poise" and _layer(target) > _layer(name):
                bad.append(f"{name} ({LAYERS[_layer(name)][0]}) imports {target} ({LAYERS[_layer(target)][0]})")
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_no_import_cycle_between_modules():
    mods = _modules()
    graph = {}
    for name, path in mods.items():
        deps = set()
        for t in _imports(name, path):
            while t and t not in mods:  # `from poise.x import name` where name is not a module
                t = t.rpartition(".")[0]
            if t and t != name and not name.startswith(t + ".") and t != "poise":
                deps.add(t)
        graph[name] = deps
    seen, on_stack, cycles = set(), [], []

    def visit(n):
        if n in on_stack:
            cycles.append(on_stack[on_stack.index(n):] + [n])
            return
        if n in seen:
            return
        seen.add(n)
        on_stack.append(n)
        for d in sorted(graph.get(n, ())):
            visit(d)
        on_stack.pop()

    for n in sorted(graph):
        visit(n)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_maths_imports_only_the_maths():
    code = ("import sys, poise.losses; "
            "heavy = [m for m in ('transformers', 'accelerate', 'peft', 'datasets', 'yaml') if m in sys.modules]; "
            "ours = sorted(m for m in sys.modules if m.startswith('poise.') and m.split('.')[1] in "
            "('data', 'model', 'training', 'diagnostics', 'eval', 'testbed', 'recipes', 'api', 'cli')); "
            "print(heavy, ours)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[] []"


def test_no_module_shares_a_name_with_a_function_at_the_package_top():
    top_modules = {p.stem for p in PKG.glob("*.py")} | {p.name for p in PKG.iterdir() if (p / "__init__.py").is_file()}
    functions = {n for n in poise.__all__ if callable(getattr(poise, n, None)) and not isinstance(getattr(poise, n), type)}
    assert functions and not functions & top_modules, functions & top_modules
