"""The exceptions fxsd raises.

Every error derives from :class:`FxsdError`, so ``except fxsd.FxsdError`` catches all of them.
Errors about bad argument values are also ``ValueError``\\ s and errors about wrong argument
types are also ``TypeError``\\ s, so code written against the built-in exceptions keeps working.

Two errors live beside the step that raises them, and derive from the classes here:
:class:`fxsd.runtime.folding.FoldError` (a :class:`GraphError`: an eval scale that cannot be folded
into weights) and :class:`fxsd.checks.VerificationError` (the transformed model broke one of
its promises; :func:`fxsd.check` reports them).
"""

from __future__ import annotations

import enum

__all__ = ["FxsdError", "InvalidArgumentError", "InvalidTypeError", "TraceError",
           "RandomDrawError", "GraphError", "GuardError", "DroppedValueError", "Run",
           "ModelRunError", "TransformError", "EvalScaledWeightsWarning",
           "ResumeWarning", "FrozenDropoutWarning", "LayerDropWarning",
           "RootJoinsWarning", "NoResidualSitesWarning", "NoSavingWarning",
           "BlockModeWarning", "InlinedHooksWarning"]


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
    (:class:`fxsd.runtime.escape_path.DroppedValue`)."""


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


# -- warnings (filter them by class: warnings.filterwarnings('ignore', category=...)) ----------


class EvalScaledWeightsWarning(UserWarning):
    """A ``state_dict`` was taken of a model whose gates scale branches at inference
    (``scale="eval"``): a plain model loading it as it is computes other outputs."""


class ResumeWarning(UserWarning):
    """A run resumed from a checkpoint that holds no fxsd state (saved without the callback, or
    by a process that died before adding it): the schedule is stepped to the restored step, so
    the rates are right, but the drop decisions from there on are not the uninterrupted run's."""


class FrozenDropoutWarning(UserWarning):
    """A ``GraphModule`` given to fxsd calls dropout with a constant training flag or rate."""


class LayerDropWarning(UserWarning):
    """A model's own layer drop is no longer active and fxsd did not adopt its rate."""


class RootJoinsWarning(UserWarning):
    """The root module owns residual joins, and its class has other methods that call its
    children (``encode_text``, ``encode_image``): those methods run the class's own code, so
    the joins gated in the root's rewritten ``forward`` never drop through them."""


class NoResidualSitesWarning(UserWarning):
    """The model has no residual site (or none selected), so the pass changed nothing."""


class NoSavingWarning(UserWarning):
    """No gate of the transformed model can save compute: every gated branch runs in sample mode
    with the mask implementation (its branch mixes batch rows), which computes every row and
    multiplies the dropped ones by 0. ``mode="block"`` skips whole branches."""


class BlockModeWarning(UserWarning):
    """Adopted per-row drop paths (torchvision ``"row"``, timm ``DropPath``) run in block mode:
    their branches mix batch rows (BatchNorm), so per-row drops would need the mask and save
    nothing. ``mode="sample"`` keeps per-row drops (and saves nothing)."""


class InlinedHooksWarning(UserWarning):
    """A module with hooks, or one whose call is checkpointed, had to be inlined into the gated
    module that owns a join: its hooks will not run any more, its call is not checkpointed."""
