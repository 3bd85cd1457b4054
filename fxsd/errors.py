"""The exceptions fxsd raises.

Every error derives from :class:`FxsdError`, so ``except fxsd.FxsdError`` catches all of them.
Errors about bad argument values are also ``ValueError``\\ s and errors about wrong argument
types are also ``TypeError``\\ s, so code written against the built-in exceptions keeps working.
"""

from __future__ import annotations

__all__ = ["FxsdError", "InvalidArgumentError", "InvalidTypeError", "TraceError", "GraphError",
           "GuardError", "DroppedValueError"]


class FxsdError(Exception):
    """Base class of every error raised by fxsd."""


class InvalidArgumentError(FxsdError, ValueError):
    """An argument has an unusable value (a rate outside [0, 1], an unknown distribution, ...)."""


class InvalidTypeError(FxsdError, TypeError):
    """An argument has the wrong type (for example a model that is not an ``nn.Module``)."""


class TraceError(FxsdError):
    """Symbolic tracing failed.

    Attributes:
        module_path: qualified name of the innermost module being traced when tracing failed
            (``""`` for the root module).
        module_type: that module's class name.
    """

    def __init__(self, message: str, module_path: str = "", module_type: str = "") -> None:
        super().__init__(message)
        self.module_path = module_path
        self.module_type = module_type


class GraphError(FxsdError):
    """A graph cannot be analysed or rewritten as asked (names the node at fault)."""


class GuardError(FxsdError, ValueError):
    """A rewritten module was called with another value for an argument it was traced with."""


class DroppedValueError(FxsdError, RuntimeError):
    """A value a dropped branch did not compute was used (:class:`fxsd.escapes.DroppedValue`)."""
