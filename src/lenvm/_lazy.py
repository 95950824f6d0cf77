"""Names that load their module on first use, so that importing a package or module stays quick:
a package's exports (:func:`lazy_exports`) and the modules type hints name (:class:`LazyModule`)."""

from __future__ import annotations

import importlib
import sys
import types
from collections.abc import Callable
from typing import Any


def lazy_exports(
    package: str, exports: dict[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The module-level ``__getattr__`` and ``__dir__`` of ``package`` for ``exports`` (a name ->
    the module that defines it); a name once loaded is kept in the package's namespace.
    ``__dir__`` lists ``__all__`` beside what the package holds already (its submodules imported,
    ``__file__``), as a module without lazy names would."""

    def __getattr__(name: str) -> Any:
        if name in exports:
            value = getattr(importlib.import_module(exports[name]), name)
            setattr(sys.modules[package], name, value)
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        module = sys.modules[package]
        return sorted(set(vars(module)) | set(module.__all__))

    return __getattr__, __dir__


class LazyModule(types.ModuleType):
    """A stand-in for the module ``name`` that imports it on first attribute access. A module
    whose hints name a heavy module's types (``torch.device``), or one that imports it back,
    binds the module's name to this instead of importing it: ``typing.get_type_hints`` evaluates
    the hints in the module's namespace, so a name bound only for type checkers is unknown
    there. Never put in ``sys.modules``: ``import name`` anywhere still gets the real module."""

    def __getattr__(self, attribute: str) -> Any:
        return getattr(importlib.import_module(self.__name__), attribute)
