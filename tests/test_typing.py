"""The package is typed (PEP 561): ``py.typed`` ships (tests/test_packaging.py checks the wheel),
and every public function and method of vblock, vblock.block, vblock.virtio and vblock.hostio
carries annotations for its parameters and its return value."""

import importlib
import inspect
import pathlib

import pytest

import vblock

MODULES = ["vblock", "vblock.block", "vblock.virtio", "vblock.hostio"]


def _public(modname):
    module = importlib.import_module(modname)
    names = ["open_image", "create_image"] if modname == "vblock" else module.__all__
    for name in names:
        obj = getattr(module, name)
        if inspect.isclass(obj):
            if issubclass(obj, BaseException) or not obj.__module__.startswith("vblock"):
                continue
            seen = set()
            for klass in obj.__mro__:  # the class's own methods and those of its vblock bases
                if not klass.__module__.startswith("vblock"):
                    continue
                for attr, value in vars(klass).items():
                    if attr in seen or (attr.startswith("_") and attr != "__init__"):
                        continue
                    seen.add(attr)
                    if isinstance(value, property):
                        value = value.fget
                    if inspect.isfunction(value):
                        yield f"{modname}.{name}.{attr}", value
        elif inspect.isfunction(obj) and obj.__module__.startswith("vblock"):
            yield f"{modname}.{name}", obj


def _unannotated(fn):
    sig = inspect.signature(fn)
    missing = [
        p.name
        for p in sig.parameters.values()
        if p.name not in ("self", "cls")
        and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        and p.annotation is inspect.Parameter.empty
    ]
    if sig.return_annotation is inspect.Signature.empty:
        missing.append("return")
    return missing


def test_py_typed_marker_is_in_the_package():
    assert (pathlib.Path(vblock.__file__).parent / "py.typed").is_file()


@pytest.mark.parametrize("modname", MODULES)
def test_public_api_carries_annotations(modname):
    gaps = {name: missing for name, fn in _public(modname) if (missing := _unannotated(fn))}
    assert gaps == {}
