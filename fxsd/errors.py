"""The exceptions fxsd raises.

Every error derives from :class:`FxsdError`, so ``except fxsd.FxsdError`` catches all of them.
Errors about bad argument values are also ``ValueError``\\ s and errors about wrong argument
types are also ``TypeError``\\ s, so code written against the built-in exceptions keeps working.

Two errors live beside the step that raises them, and derive from the classes here:
:class:`fxsd.training.folding.FoldError` (a :class:`GraphError`: an eval scale that cannot be folded
into weights) and :class:`fxsd.verify.VerificationError` (the transformed model broke one of its
promises, :func:`fxsd.check`; imported from :mod:`fxsd.verify`).
"""

from __future__ import annotations

import enum

__all__ = ["FxsdError", "InvalidArgumentError", "InvalidTypeError", "TraceError", "RandomDrawError",
           "GraphError", "GuardError", "DroppedValueError", "Run", "ModelRunError",
           "TransformError"]


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


class RandomDrawError(TraceError):
    """Code fxsd traced through drew a random number on the host (``torch.rand(1).item()``,
    ``random.random()``, ``numpy.random.rand()``): a trace runs that draw once and fixes its
    outcome into the graph (a layer the draw skipped would then never run, or always).

    fxsd keeps a module whose own ``forward`` draws whole, so its code keeps running as written,
    and gates the joins inside its children; this error reaches the user only where that cannot
    apply (the root's own ``forward`` draws).

    Attributes:
        module_path, module_type: as for :class:`TraceError`: the module whose code drew.
        location: ``"file.py:LINE"`` of the draw in the model's code (``""`` where fxsd saw the
            generator's state move but not the call: ``from random import random``).
        source: what drew (``"torch.rand"``, ``"random.random"``, ``"numpy.random.rand"``).
    """

    def __init__(self, message: str, module_path: str = "", module_type: str = "",
                 location: str = "", source: str = "") -> None:
        super().__init__(message, module_path, module_type)
        self.location = location
        self.source = source


class GraphError(FxsdError):
    """A graph cannot be analysed or rewritten as asked (names the node at fault)."""


class GuardError(FxsdError, ValueError):
    """A rewritten module was called with another value for an argument it was traced with."""


class DroppedValueError(FxsdError, RuntimeError):
    """A value a dropped branch did not compute was used
    (:class:`fxsd.analysis.escapes.DroppedValue`)."""


class Run(enum.Enum):
    """The runs fxsd makes of a model (:class:`ModelRunError` says which one failed)."""

    EXAMPLE = "example run"  #: one real forward on the example inputs (tracing by example)
    ABSTRACT = "abstract run on shapes"  #: a forward on fake tensors (shapes, FLOPs, escapes)
    FLOP_COUNT = "FLOP count"  #: a training step (forward + backward) counted per gate
    CHECK = "check"  #: a run of :func:`fxsd.check` comparing the gated and the plain model


class ModelRunError(FxsdError, RuntimeError):
    """The model raised during one of fxsd's own runs of it; the model's exception is chained
    (``__cause__``).

    Attributes:
        run: which run (:class:`Run`).
        module_path: qualified name of the innermost module whose ``forward`` raised (``""``:
            the root).
        module_type: that module's class name.
    """

    def __init__(self, message: str, run: Run, module_path: str = "",
                 module_type: str = "") -> None:
        super().__init__(message)
        self.run = run
        self.module_path = module_path
        self.module_type = module_type


class TransformError(FxsdError, RuntimeError):
    """An error fxsd did not foresee stopped a transform or an analysis (the original exception
    is chained). The model is as it was before the call."""
