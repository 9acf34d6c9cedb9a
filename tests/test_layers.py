"""The layer rules of docs/architecture.md, checked on every import of the product code.

An AST walk over every module (imports at module level and inside functions alike); a broken
rule fails naming the file and line of the offending import.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The installed package is assembled from four folders (setup.cfg's package_dir).
FOLDERS = {
    "pathways_mm": ROOT / "pathways_mm",
    "pathways_mm.encoders": ROOT / "encoders",
    "pathways_mm.routing": ROOT / "routing",
    "pathways_mm.tasks": ROOT / "tasks",
}

LEAVES = {
    "pathways_mm",
    "pathways_mm.errors",
    "pathways_mm.config",
    "pathways_mm.io",
    "pathways_mm.dist",
    "pathways_mm.metrics",
    "pathways_mm.routes_file",
}
TOOLS = ("continual", "inference", "viz", "bench", "plan")  # never import each other
# What the lower layers may import from pathways_mm (besides the standard library and third parties).
ALLOWED = {
    "leaves": ("LEAVES", "pathways_mm.tasks.base"),
    "pathways_mm.encoders": (
        "LEAVES",
        "pathways_mm.encoders",
        "pathways_mm.tasks.corpus",
    ),  # the tokenizer trains on the corpus
    "pathways_mm.tasks": ("LEAVES", "pathways_mm.encoders", "pathways_mm.tasks"),
    "pathways_mm.routing": ("LEAVES", "pathways_mm.tasks.base", "pathways_mm.routing", "pathways_mm.runtime.compat"),
}


class Import(NamedTuple):
    module: str  # the importing module
    target: str  # the imported module (a pathways_mm module, or a third-party name)
    names: tuple[str, ...]  # names taken from it (`from x import a, b`)
    where: str  # file:line


def _modules() -> dict[str, Path]:
    out = {}
    for pkg, folder in FOLDERS.items():
        for f in sorted(folder.rglob("*.py")):
            parts = list(f.relative_to(folder).with_suffix("").parts)
            if pkg == "pathways_mm" and parts[0] in ("encoders", "routing", "tasks"):
                continue
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([pkg, *parts])] = f
    return out


MODULES = _modules()


def _resolve(target: str, name: str) -> str:
    """`from target import name`: the submodule if `name` is one, else `target` itself."""
    return f"{target}.{name}" if f"{target}.{name}" in MODULES else target


def _imports() -> list[Import]:
    out = []
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Import):
                out += [Import(module, a.name, (), where) for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = tuple(a.name for a in node.names)
                if node.module.startswith("pathways_mm"):
                    out += [Import(module, _resolve(node.module, n), (n,), where) for n in names]
                else:
                    out.append(Import(module, node.module, names, where))
    return out


IMPORTS = _imports()


def _pkg(module: str) -> str:
    """pathways_mm.training.loop -> pathways_mm.training (a top-level module is its own package)."""
    for pkg in FOLDERS:
        if pkg != "pathways_mm" and (module == pkg or module.startswith(pkg + ".")):
            return pkg
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 or (len(parts) == 2 and f"{module}.__init__" in MODULES) else module


def _fail(bad: list[Import], rule: str) -> None:
    if bad:
        pytest.fail(f"{rule}:\n" + "\n".join(f"  {i.where}: {i.module} imports {i.target}" for i in bad))


def test_the_walk_sees_every_package():
    assert {"pathways_mm.cli", "pathways_mm.training.loop", "pathways_mm.routing.moe", "pathways_mm.tasks.base"} <= set(
        MODULES
    )
    assert len(IMPORTS) > 200


def test_nothing_imports_the_cli():
    _fail([i for i in IMPORTS if i.target == "pathways_mm.cli"], "only the entry point knows the CLI")


def test_tools_never_import_each_other():
    bad = []
    for i in IMPORTS:
        a, b = _tool(i.module), _tool(i.target)
        if a and b and a != b:
            bad.append(i)
    _fail(bad, f"{', '.join(TOOLS)} are independent")


def _tool(module: str) -> str | None:
    for t in TOOLS:
        if module.startswith(f"pathways_mm.{t}.") or module == f"pathways_mm.{t}":
            return t
    return None


def test_model_and_data_never_import_deepspeed():
    bad = [
        i
        for i in IMPORTS
        if i.module.startswith(("pathways_mm.model", "pathways_mm.data")) and i.target.split(".")[0] == "deepspeed"
    ]
    _fail(bad, "model/ and data/ know nothing about DeepSpeed")


def test_only_runtime_calls_deepspeed_initialize():
    bad = []
    for module, path in MODULES.items():
        if module.startswith("pathways_mm.runtime."):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            f = node.func if isinstance(node, ast.Call) else None
            if (
                isinstance(f, ast.Attribute)
                and f.attr == "initialize"
                and isinstance(f.value, ast.Name)
                and f.value.id == "deepspeed"
            ):
                bad.append(Import(module, "deepspeed.initialize", (), f"{path.relative_to(ROOT)}:{node.lineno}"))
    _fail(bad, "only runtime/ builds DeepSpeed engines")


def _allowed(module: str, target: str, rules: tuple[str, ...]) -> bool:
    if not target.startswith("pathways_mm"):
        return True
    for r in rules:
        if (r == "LEAVES" and target in LEAVES) or target == r or target.startswith(r + "."):
            return True
    return False


@pytest.mark.parametrize("layer", list(ALLOWED))
def test_lower_layers_import_only_what_is_below_them(layer):
    if layer == "leaves":
        mine = [i for i in IMPORTS if i.module in LEAVES]
    else:
        mine = [i for i in IMPORTS if i.module == layer or i.module.startswith(layer + ".")]
    _fail(
        [i for i in mine if not _allowed(i.module, i.target, ALLOWED[layer])],
        f"{layer} may import only {', '.join(ALLOWED[layer])} (tasks/ and routing/ never import training code)",
    )


def test_private_deepspeed_and_c10d_apis_only_in_the_compat_module():
    bad = []
    for module, path in MODULES.items():
        if module == "pathways_mm.runtime.compat":
            continue
        tree = ast.parse(path.read_text())
        private_mods = {}
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.ImportFrom)
                and node.module
                and node.module.startswith(("deepspeed", "torch.distributed"))
            ):
                for a in node.names:
                    if a.name.startswith("_") or a.name == "distributed_c10d":
                        bad.append(
                            Import(module, f"{node.module}.{a.name}", (), f"{path.relative_to(ROOT)}:{node.lineno}")
                        )
                    private_mods[a.asname or a.name] = node.module
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith(("deepspeed", "torch.distributed")):
                        private_mods[(a.asname or a.name).split(".")[0]] = a.name
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and isinstance(node.value, ast.Name)
                and node.value.id in private_mods
            ):
                bad.append(
                    Import(module, f"{node.value.id}.{node.attr}", (), f"{path.relative_to(ROOT)}:{node.lineno}")
                )
    _fail(bad, "private DeepSpeed / torch.distributed APIs belong in pathways_mm/runtime/compat.py")


def test_no_import_cycle():
    graph: dict[str, dict[str, str]] = {m: {} for m in MODULES}
    for i in IMPORTS:
        if i.target in MODULES and i.target != i.module:
            graph[i.module].setdefault(i.target, i.where)
    seen: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        seen[m] = 1
        path.append(m)
        for t in graph[m]:
            if seen.get(t) == 1:
                return path[path.index(t) :] + [t]
            if t not in seen and (cycle := visit(t)):
                return cycle
        seen[m] = 2
        path.pop()
        return None

    for m in sorted(graph):
        if m not in seen and (cycle := visit(m)):
            links = [f"  {graph[a][b]}: {a} imports {b}" for a, b in zip(cycle, cycle[1:])]
            pytest.fail("import cycle:\n" + "\n".join(links))


def test_training_the_builtin_tasks_needs_no_reader_of_declared_sources():
    """An offline GPU machine has PyTorch's packages, not webdataset, datasets or soundfile: the
    training, evaluation and benchmark modules must import without them (`make gpu-check` there)."""
    code = (
        "import sys\n"
        "for m in ('webdataset', 'datasets', 'soundfile', 'pyarrow'):\n"
        "    sys.modules[m] = None  # importing it now raises ImportError\n"
        "import pathways_mm.training.loop, pathways_mm.training.evaluate, pathways_mm.bench.gpu_check\n"
        "import pathways_mm.bench.moe, pathways_mm.bench.train, pathways_mm.inference.api, pathways_mm.cli\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
