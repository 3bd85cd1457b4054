"""Lazy submodules (PEP 562): ``import fxsd`` loads no step, and ``fxsd.<step>.<module>`` loads
on first use. Internal: fxsd's ``__init__`` and each step folder's ``__init__`` use it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def submodules(package: str) -> Callable[[str], Any]:
    """A PEP 562 ``__getattr__`` for ``package``: ``package.<module>`` loads on first use (fxsd
    itself and each step's folder use it, so ``import fxsd`` loads no step)."""
    def __getattr__(name: str) -> Any:
        try:
            return importlib.import_module(f"{package}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{package}.{name}":
                raise  # the module exists; something it imports does not
            raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
    return __getattr__
