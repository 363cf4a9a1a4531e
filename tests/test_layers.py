"""Imports follow the layers: nothing below the CLI imports the CLI, the benchmarks or the test
harnesses (``vblock.cli``, ``vblock.bench``, ``vblock.testing``), not even lazily inside a
function or by name through ``importlib``."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

#: source folder -> the dotted package it is imported as (drivers/ is mapped to vblock.drivers)
LOWER = {
    "vblock/hostio": "vblock.hostio",
    "vblock/block": "vblock.block",
    "drivers": "vblock.drivers",
    "vblock/virtio": "vblock.virtio",
    "vblock/vhost_user": "vblock.vhost_user",
}
TOP = ("vblock.cli", "vblock.bench", "vblock.testing")


def _module(folder: str, path: pathlib.Path) -> str:
    rel = path.relative_to(ROOT / folder).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join([LOWER[folder], *parts])


def imported_names(source: str, module: str, is_package: bool) -> set:
    """Every dotted name ``source`` (the code of ``module``) imports: ``import a.b``, ``from a
    import b`` (as ``a`` and ``a.b``), relative imports resolved, and string literals passed to
    ``importlib.import_module`` / ``__import__``."""
    names = set()
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            f = node.func
            called = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)
            if called in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                names.add(node.args[0].value)
    return names


def _upward(names: set) -> list:
    return sorted(n for n in names if any(n == t or n.startswith(t + ".") for t in TOP))


@pytest.mark.parametrize("folder", sorted(LOWER))
def test_nothing_below_the_cli_imports_the_cli_benchmarks_or_test_harnesses(folder):
    files = sorted((ROOT / folder).rglob("*.py"))
    assert files, f"no Python files under {folder}"
    found = {}
    for path in files:
        module = _module(folder, path)
        names = imported_names(path.read_text(), module, path.name == "__init__.py")
        if _upward(names):
            found[str(path.relative_to(ROOT))] = _upward(names)
    assert found == {}


@pytest.mark.parametrize(
    "source, upward",
    [
        ("import vblock.cli.main", ["vblock.cli.main"]),
        ("from vblock import testing", ["vblock.testing"]),
        (
            "def f():\n    from vblock.bench import convert",
            ["vblock.bench", "vblock.bench.convert"],
        ),
        ("from ..cli import output", ["vblock.cli", "vblock.cli.output"]),
        (
            "import importlib\nimportlib.import_module('vblock.testing.faults')",
            ["vblock.testing.faults"],
        ),
        ("from vblock.block import convert\nfrom . import image", []),
    ],
)
def test_the_import_scan_sees_each_way_of_importing_upward(source, upward):
    """The scan itself, on the forms a layer breach can take (in a module ``vblock.block.x``)."""
    assert _upward(imported_names(source, "vblock.block.x", False)) == upward
