"""The example run: a model run once on example inputs, each module's first call recorded.

Tracing by example (:mod:`fxsd.tracing.by_example`) traces a module along the call it received here.
:func:`record_calls` runs the model as it is, without gradients, with forward pre-hooks that keep
each module's first :class:`RecordedCall` (its arguments as they were at the call: a cache that
fills up later is copied); a model whose own code skipped layers at random runs once more in
eval mode, so that every layer is recorded.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fxsd.errors import FxsdError, Run
from fxsd.preserve import model_run
from fxsd.tracing.guards import is_guardable

__all__ = ["RecordedCall", "record_calls"]


@dataclass(eq=False)
class RecordedCall:
    """The first call of one module during the example run.

    Attributes:
        module: the module.
        path: its qualified name in the model.
        args, kwargs: what it received (the objects themselves, not copies).
        order: position of the call's start among all recorded calls.
    """

    module: nn.Module
    path: str
    args: tuple[Any, ...] = field(repr=False)
    kwargs: dict[str, Any] = field(repr=False)
    order: int = 0
    # the ops its traces evaluated on the example's values, shared by every trace of the
    # module (each mode, each way of tracing its flags and Nones): see ExampleTracer._evaluate
    evaluated: dict[Any, tuple[Any, ...]] = field(default_factory=dict, repr=False,
                                                   compare=False)


def record_calls(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
                 ) -> dict[int, RecordedCall]:
    """Run ``model(*args, **kwargs)`` once without gradients; return each module's first call,
    by ``id(module)``. The model is run as it is (its train/eval mode) and is not changed; what
    it raises arrives as a :class:`~fxsd.errors.ModelRunError` (``Run.EXAMPLE``).

    A model in training mode whose run left out modules that have a ``forward`` (its own code
    skipped layers at random: a layer drop) runs once more in eval mode: the modules it left
    out are recorded from that run, and every module that ran there takes its place in that
    run's order (every layer in turn), so that each layer is traced and ordered by depth
    whatever the example's draw skipped.
    """
    recorded = _record(model, args, kwargs)
    missing = {id(m) for m in model.modules() if id(m) not in recorded and _has_forward(m)}
    if not (model.training and missing):
        return recorded
    modes = [(m, m.training) for m in model.modules()]
    try:
        for m, _ in modes:
            m.training = False
        again = _record(model, args, kwargs)
    except FxsdError:  # the model cannot run in eval mode: keep the training run's record
        return recorded
    finally:
        for m, mode in modes:
            m.training = mode
    for key, call in again.items():
        if key in recorded:
            recorded[key].order = call.order
        elif key in missing:
            recorded[key] = call
    return recorded


def _has_forward(module: nn.Module) -> bool:
    """Whether ``module`` can be called (a ``ModuleList`` or ``ModuleDict`` cannot)."""
    return type(module).forward is not nn.Module.forward


def _record(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
            ) -> dict[int, RecordedCall]:
    paths = {id(m): p for p, m in model.named_modules()}
    recorded: dict[int, RecordedCall] = {}

    def pre_hook(module: nn.Module, call_args: tuple, call_kwargs: dict) -> None:
        if id(module) not in recorded:  # objects as they were at the call (a cache fills up)
            recorded[id(module)] = RecordedCall(
                module, paths.get(id(module), ""), tuple(_copied(a) for a in call_args),
                {k: _copied(v) for k, v in call_kwargs.items()}, len(recorded))

    handles = [m.register_forward_pre_hook(pre_hook, with_kwargs=True) for m in model.modules()]
    try:
        with torch.no_grad(), model_run(model, Run.EXAMPLE):
            model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return recorded


def _copied(value: Any) -> Any:
    """A copy of an example value that propagating ops through may change (a cache)."""
    if isinstance(value, torch.Tensor) or is_guardable(value):
        return value
    try:
        return copy.deepcopy(value)
    except Exception:
        return value
