"""Training-loop helpers for a transformed model: its gates, their rates and the drop RNG's state.

Schedules that move the rates over training live in :mod:`fxsd.training.schedulers`.

>>> import torchvision, fxsd
>>> model = fxsd.stochastic_depth(torchvision.models.resnet50(), 0.2, seed=0)
>>> fxsd.set_drop_rate(model, 0.1)
>>> fxsd.get_drop_rate(model), len(fxsd.gates(model))
(0.1, 16)
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.fx import GraphModule

from fxsd.arguments import check_rate
from fxsd.errors import InvalidArgumentError, InvalidTypeError
from fxsd.record import get_record
from fxsd.runtime.gate import BranchGate
from fxsd.runtime.sampler import DropSampler

__all__ = ["gates", "named_gates", "gated_blocks", "set_drop_rate", "get_drop_rate",
           "get_rng_state", "set_rng_state"]


def _check_model(model: object) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise InvalidTypeError(f"expected a model returned by fxsd.stochastic_depth, got "
                               f"{type(model).__name__}")
    return model


def named_gates(model: nn.Module) -> dict[str, BranchGate]:
    """The gates of a transformed model by qualified name, in module order (``named_modules``)."""
    return {name: m for name, m in _check_model(model).named_modules()
            if isinstance(m, BranchGate)}


def gated_blocks(model: nn.Module) -> dict[str, GraphModule]:
    """The modules fxsd rewrote around gates (those holding a gate), by qualified name."""
    return {name: m for name, m in _check_model(model).named_modules()
            if isinstance(m, GraphModule) and any(isinstance(c, BranchGate)
                                                  for c in m.children())}


def gates(model: nn.Module) -> list[BranchGate]:
    """The gates of a transformed model, in module order (``named_modules``)."""
    return list(named_gates(model).values())


def _gates_or_error(model: nn.Module) -> list[BranchGate]:
    found = gates(model)
    if not found:
        raise InvalidArgumentError(
            f"{type(model).__name__} has no fxsd gates: transform it with "
            "fxsd.stochastic_depth first"
        )
    return found


def set_drop_rate(model: nn.Module, drop_rate: float) -> None:
    """Rescale every site so that the model-wide rate is ``drop_rate``, keeping the distribution.

    Each gate keeps its share of the model-wide rate (``gate.rate_weight``: ``l / L`` for the
    linear rule, 1 for uniform, an adopted drop path's own rate relative to the rate given at
    transform time), so ``set_drop_rate(model, r)`` gives each site ``min(1, r * rate_weight)``.
    Changing rates never changes the graph and is cheap enough to do every step.
    """
    found = _gates_or_error(model)
    rate = check_rate(drop_rate)
    for gate in found:
        gate.drop_rate = min(1.0, rate * gate.rate_weight)
    for record in {id(g.record): g.record for g in found if g.record is not None}.values():
        record.drop_rate = rate


def get_drop_rate(model: nn.Module) -> float:
    """The model-wide rate last set by :func:`stochastic_depth` or :func:`set_drop_rate`."""
    _gates_or_error(model)
    return float(get_record(model).drop_rate)


def _sampler(found: list[BranchGate]) -> DropSampler:
    samplers = {id(g.sampler): g.sampler for g in found}
    if len(samplers) != 1:  # pragma: no cover - the pass gives all gates one sampler
        raise InvalidArgumentError("the model's gates do not share one DropSampler")
    return next(iter(samplers.values()))


def get_rng_state(model: nn.Module) -> dict[str, Any]:
    """The state of the model's drop decisions; save it with your checkpoint.

    The state is not part of ``state_dict()`` (whose keys fxsd never changes). It records the
    model's number of gates (``"num_gates"``), which :func:`set_rng_state` checks.
    """
    found = _gates_or_error(model)
    return {**_sampler(found).get_state(), "num_gates": len(found)}


def set_rng_state(model: nn.Module, state: dict[str, Any]) -> None:
    """Restore :func:`get_rng_state`'s result: a resumed run continues the same drop sequence.

    Raises:
        InvalidArgumentError: ``state`` is not one :func:`get_rng_state` returned, or comes from
            a model with another number of gates (its decisions would fall on other sites).
    """
    found = _gates_or_error(model)
    if not isinstance(state, dict):
        raise InvalidTypeError(f"state must be the dict fxsd.get_rng_state returned, got "
                               f"{type(state).__name__}")
    if "num_gates" in state:  # states saved before it: not checked
        if state["num_gates"] != len(found):
            raise InvalidArgumentError(
                f"the RNG state comes from a model with {state['num_gates']} gates, but this "
                f"model has {len(found)}: restore it into a model transformed the same way "
                "(the same architecture and select=)")
    _sampler(found).set_state(state)
