"""Step 3, decide: the user's options checked, the rate of each site, the module that owns each
join, the budget.

Modules are imported by their full path (``fxsd.decisions.<module>``); docs/design.md has the map.
"""

from __future__ import annotations

import importlib
from typing import Any


def __getattr__(name: str) -> Any:
    """``fxsd.<step>.<module>`` loads on first use, as fxsd's own names do (PEP 562)."""
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"{__name__}.{name}":
            raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
