"""native_kernels.jit: a kernel compiled without its CPython wrapper (INTERNAL) is never
named by Python code outside native_kernels, since calling one from Python would jump to a
null pointer. Cheap: reads sources and imports modules; no kernel is compiled.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

from numba.core.registry import CPUDispatcher

ROOT = Path(__file__).resolve().parent.parent
PYTHON_SIDE = ("xenheap", "tests", "bench")


def kernels() -> dict[tuple[str, str], CPUDispatcher]:
    """Every njit kernel of native_kernels by (module, name)."""
    found = {}
    for path in sorted((ROOT / "native_kernels").glob("*.py")):
        module = importlib.import_module(f"native_kernels.{path.stem}")
        for name, value in vars(module).items():
            if isinstance(value, CPUDispatcher) and value.__module__ == module.__name__:
                found[(path.stem, name)] = value
    return found


def is_internal(kernel: CPUDispatcher) -> bool:
    return bool(kernel.targetoptions.get("no_cpython_wrapper"))


def named_from_python() -> set[tuple[str, str]]:
    """(module, name) of every native_kernels name a Python-side file imports or reads as
    an attribute of an imported native_kernels module."""
    named = set()
    for folder in PYTHON_SIDE:
        for path in (ROOT / folder).rglob("*.py"):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            modules = {}  # local alias -> native_kernels module name
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                        "native_kernels"):
                    for alias in node.names:
                        if node.module == "native_kernels":
                            modules[alias.asname or alias.name] = alias.name
                        else:
                            named.add((node.module.rpartition(".")[2], alias.name))
                elif isinstance(node, ast.Import):
                    for alias in node.names:
                        if alias.name.startswith("native_kernels."):
                            modules[alias.asname or alias.name] = alias.name.rpartition(".")[2]
            for node in ast.walk(tree):
                if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                        and node.value.id in modules:
                    named.add((modules[node.value.id], node.attr))
    return named


def test_no_internal_kernel_is_named_from_python() -> None:
    all_kernels = kernels()
    offenders = sorted(f"{module}.{name}" for module, name in named_from_python()
                       if (module, name) in all_kernels
                       and is_internal(all_kernels[(module, name)]))
    assert offenders == []


def test_most_kernels_are_internal_and_the_api_is_not() -> None:
    all_kernels = kernels()
    internal = {key for key, kernel in all_kernels.items() if is_internal(kernel)}
    assert len(internal) > len(all_kernels) // 2
    entry_points = {key for key in all_kernels if key[0] == "api" and key[1].startswith("heap_")}
    assert entry_points and not entry_points & internal
