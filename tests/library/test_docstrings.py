"""Every public class and function of ``encoder_fusion`` and ``encoder_fusion.kernels`` has a docstring
(the harness, ``encoder_fusion.benchmarks``, is not held to it).

Public means: the names in a package's or module's ``__all__``, every class and function a module of
these packages defines under a name without a leading underscore (modules whose name starts with an
underscore are private as a whole), and the public methods and properties of those classes. A method
that overrides a documented method of a base class from these packages keeps that contract and may
go without a docstring of its own; one overriding torch's (``forward``, ``backward``) may not.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

PACKAGES = ("encoder_fusion", "encoder_fusion.kernels")
HARNESS = "encoder_fusion.benchmarks"
REPO = Path(__file__).resolve().parents[2]


def modules(package_name: str) -> list[ModuleType]:
    """The package and all its public submodules, imported."""
    package = importlib.import_module(package_name)
    found = [package]
    for info in pkgutil.walk_packages(package.__path__, prefix=f"{package_name}."):
        private = any(part.startswith("_") for part in info.name.split("."))
        if not private and not is_harness(info.name):
            found.append(importlib.import_module(info.name))
    return found


def is_harness(module_name: str) -> bool:
    return module_name == HARNESS or module_name.startswith(HARNESS + ".")


def is_ours(obj: object) -> bool:
    """Whether ``obj`` is defined in one of :data:`PACKAGES`."""
    module = getattr(obj, "__module__", None) or ""
    return module.split(".")[0] == "encoder_fusion" and not is_harness(module)


def public_objects(module: ModuleType) -> Iterator[object]:
    """The public classes and functions of ``module``: its ``__all__`` and what it defines."""
    names = set(getattr(module, "__all__", ()))
    names |= {
        name
        for name, obj in vars(module).items()
        if not name.startswith("_")
        and (inspect.isclass(obj) or inspect.isfunction(obj))
        and obj.__module__ == module.__name__
    }
    for name in sorted(names):
        obj = getattr(module, name)
        if (inspect.isclass(obj) or inspect.isfunction(obj)) and is_ours(obj):
            yield obj


def public_methods(cls: type) -> Iterator[tuple[str, object]]:
    """(name, function) of the public methods, static and class methods and properties ``cls`` defines."""
    for name, attribute in vars(cls).items():
        if name.startswith("_"):
            continue
        if isinstance(attribute, (staticmethod, classmethod)):
            yield name, attribute.__func__
        elif isinstance(attribute, property) and attribute.fget is not None:
            yield name, attribute.fget
        elif inspect.isfunction(attribute):
            yield name, attribute


def own_doc(obj: object) -> str:
    """``obj``'s own docstring, stripped; '' when it has none. A class's docstring is not inherited,
    and the signature line that dataclasses and named tuples generate does not count."""
    doc = vars(obj).get("__doc__") if inspect.isclass(obj) else getattr(obj, "__doc__", None)
    doc = (doc or "").strip()
    if inspect.isclass(obj) and doc.startswith(f"{obj.__name__}("):
        return ""
    return doc


def documented_in_a_base(cls: type, name: str) -> bool:
    """Whether a base class of ``cls`` from these packages documents the method ``name``."""
    for base in cls.__mro__[1:]:
        if is_ours(base) and name in vars(base):
            attribute = vars(base)[name]
            function = getattr(attribute, "__func__", None) or getattr(attribute, "fget", None) or attribute
            if own_doc(function):
                return True
    return False


def where(obj: object) -> str:
    """``path:line`` of ``obj``'s definition (through decorators), relative to the repository."""
    obj = inspect.unwrap(obj)
    try:
        path = Path(inspect.getsourcefile(obj) or "?")
        line = inspect.getsourcelines(obj)[1]
    except (OSError, TypeError):
        return "?"
    return f"{path.relative_to(REPO) if path.is_relative_to(REPO) else path}:{line}"


def undocumented(package_name: str) -> list[str]:
    """``qualified.name (path:line)`` of every public class, function or method without a docstring."""
    seen, missing = set(), []
    for module in modules(package_name):
        for obj in public_objects(module):
            if id(obj) in seen:
                continue
            seen.add(id(obj))
            qualified = f"{obj.__module__}.{obj.__qualname__}"
            if not own_doc(obj):
                missing.append(f"{qualified} ({where(obj)})")
            if not inspect.isclass(obj):
                continue
            for name, function in public_methods(obj):
                if not own_doc(function) and not documented_in_a_base(obj, name):
                    missing.append(f"{qualified}.{name} ({where(function)})")
    return sorted(missing)


@pytest.mark.parametrize("package_name", PACKAGES)
def test_every_public_class_and_function_has_a_docstring(package_name):
    missing = undocumented(package_name)
    if missing:
        pytest.fail(
            f"{len(missing)} public name(s) of {package_name} without a docstring:\n" + "\n".join(missing)
        )


# -- the checker itself, on a module made for it --------------------------------------------------
def test_the_checker_finds_what_is_missing_and_accepts_what_is_documented(monkeypatch):
    import dataclasses
    import sys

    module = ModuleType("encoder_fusion._docstring_probe")

    class Base:
        """Documented."""

        def step(self):
            """The contract."""

    class Child(Base):
        """Documented."""

        def step(self):  # inherits the documented contract
            return 1

        def run(self):
            return 2

        def _private(self):
            return 3

        @property
        def size(self):
            return 4

    @dataclasses.dataclass
    class Plain:
        value: int = 0

    def documented():
        """Yes."""

    def bare():
        return None

    for obj in (Base, Child, Plain, documented, bare):
        obj.__module__ = module.__name__
        setattr(module, obj.__name__, obj)
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setattr(sys.modules[__name__], "modules", lambda package_name: [module])

    missing = [entry.split(" (")[0].split("<locals>.")[-1] for entry in undocumented("encoder_fusion")]
    assert missing == ["Child.run", "Child.size", "Plain", "bare"]
