"""Public names of a package imported on first use (PEP 562), so that importing the package stays light."""

import sys
from collections.abc import Callable, Mapping
from importlib import import_module

__all__ = ["lazy_exports"]


def lazy_exports(package: str, names: Mapping[str, str]) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """The ``__getattr__`` and ``__dir__`` of ``package`` for ``names``: public name -> defining module (a full
    dotted name, or one relative to ``package``). A name is imported on first access and then set on the package,
    so later lookups skip ``__getattr__``. Use: ``__getattr__, __dir__ = lazy_exports(__name__, {...})``."""
    root = package.split(".")[0]

    def __getattr__(name: str) -> object:
        if name not in names:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        target = names[name]
        module = target if target.startswith(root + ".") else f"{package}.{target}"
        value = getattr(import_module(module), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(names))

    return __getattr__, __dir__
