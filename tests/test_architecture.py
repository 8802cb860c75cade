"""The package's shape, checked like its behaviour: layers (import-linter's contracts in pyproject.toml), no import
cycles, imports inside functions only for optional extras, and no function over 8 parameters."""
import ast
from pathlib import Path

import grimp
import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "kdzoo"
OPTIONAL_EXTRAS = ("timm", "transformers", "tokenizers", "peft", "diffusers", "open_clip", "pycocotools", "torchmetrics",
                   "liger_kernel", "huggingface_hub")  # Triton kernels on CUDA; the hub client transformers brings


def _functions():
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield path, node


def test_import_linter_contracts_are_kept():
    from importlinter.cli import lint_imports  # import-linter comes with the test extra

    assert lint_imports(config_filename=str(SRC.parents[1] / "pyproject.toml"), no_cache=True, no_logo=True) == 0


def test_no_import_cycles_between_modules():
    graph = grimp.build_graph("kdzoo")
    cycles = []
    for module in sorted(graph.modules):
        for imported in graph.find_modules_directly_imported_by(module):
            path = graph.find_shortest_chain(importer=imported, imported=module)
            if path and not (module.startswith(imported + ".") or imported.startswith(module + ".")):
                cycles.append((module, *path))
    assert cycles == []


def test_imports_inside_functions_are_only_optional_extras():
    inner = []
    for path, function in _functions():
        for node in ast.walk(function):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = ["." if node.level else node.module]
            else:
                continue
            if not all(name.split(".")[0] in OPTIONAL_EXTRAS for name in names):
                inner.append(f"{path.relative_to(SRC)}:{node.lineno} {', '.join(names)}")
    assert inner == []


def test_lazy_imports_are_third_party_modules_only():
    """`lazy_import` keeps heavy libraries out of start-up; it must never hide a dependency between kdzoo's own
    modules (the layers and the cycle check would not see it)."""
    names = [node.args[0].value for path, function in [(p, ast.parse(p.read_text())) for p in SRC.rglob("*.py")]
             for node in ast.walk(function) if isinstance(node, ast.Call)
             and getattr(node.func, "id", None) == "lazy_import" and node.args and isinstance(node.args[0], ast.Constant)]
    assert names and not [name for name in names if name.startswith(("kdzoo", "."))]


def test_import_kdzoo_leaves_the_heavy_libraries_unloaded():
    import subprocess
    import sys

    code = ("import sys, kdzoo, kdzoo.cli; heavy = ('torchvision', 'sklearn', 'matplotlib.pyplot', 'kornia', "
            "'scipy.stats', 'transformers', 'torch.distributed.fsdp', 'torch.utils.flop_counter'); print([m for m in heavy if m in sys.modules])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "[]", done.stdout + done.stderr


@pytest.mark.parametrize("limit", [8])
def test_no_function_takes_more_than_eight_parameters(limit):
    wide = []
    for path, node in _functions():
        args = node.args
        count = len([a for a in args.posonlyargs + args.args + args.kwonlyargs if a.arg not in ("self", "cls")])
        if count > limit:
            wide.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name} ({count})")
    assert wide == []
