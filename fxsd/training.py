"""Training-loop helpers for a transformed model: rates, warmup and the drop RNG's state.

>>> import torchvision, fxsd
>>> model = fxsd.stochastic_depth(torchvision.models.resnet50(), 0.2, seed=0)
>>> warmup = fxsd.DropWarmup(model, total_steps=1000, warmup=0.1)  # rates start at 0
>>> for step in range(3):
...     warmup.step()  # after 100 steps every site is at its full rate
>>> round(fxsd.get_drop_rate(model), 4)
0.006
"""

from __future__ import annotations

from typing import Any

from torch import nn

from fxsd.errors import InvalidArgumentError, InvalidTypeError
from fxsd.gate import BranchGate, DropSampler
from fxsd.record import get_record
from fxsd.schedules import check_rate

__all__ = ["gates", "named_gates", "set_drop_rate", "get_drop_rate", "DropWarmup", "get_rng_state",
           "set_rng_state"]


def named_gates(model: nn.Module) -> dict[str, BranchGate]:
    """The gates of a transformed model by qualified name, in module order (``named_modules``)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, BranchGate)}


def gates(model: nn.Module) -> list[BranchGate]:
    """The gates of a transformed model, in module order (``named_modules``)."""
    return list(named_gates(model).values())


def _gates_or_error(model: nn.Module) -> list[BranchGate]:
    if not isinstance(model, nn.Module):
        raise InvalidTypeError(f"expected a model returned by fxsd.stochastic_depth, got "
                               f"{type(model).__name__}")
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
    rate = check_rate(drop_rate)
    found = _gates_or_error(model)
    for gate in found:
        gate.drop_rate = min(1.0, rate * gate.rate_weight)
    for record in {id(g.record): g.record for g in found if g.record is not None}.values():
        record.drop_rate = rate


def get_drop_rate(model: nn.Module) -> float:
    """The model-wide rate last set by :func:`stochastic_depth` or :func:`set_drop_rate`."""
    _gates_or_error(model)
    return float(get_record(model).drop_rate)


class DropWarmup:
    """Ramp the drop rate from 0 to its full value over the first part of training.

    Call :meth:`step` once per optimizer step, like a learning-rate scheduler. After
    ``round(warmup * total_steps)`` steps the rate is exactly the full rate (the rate the model
    had when the warmup was created) and stays there.

    Args:
        model: a model returned by :func:`fxsd.stochastic_depth`.
        total_steps: the number of training steps.
        warmup: the fraction of ``total_steps`` to ramp over (Composer's ``drop_warmup``).
    """

    def __init__(self, model: nn.Module, total_steps: int, warmup: float = 0.1) -> None:
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise InvalidArgumentError(f"total_steps must be a positive int, got {total_steps!r}")
        self.model = model
        self.total_steps = total_steps
        self.warmup = check_rate(warmup, "warmup")
        self.target = get_drop_rate(model)
        self.step_count = 0
        self._apply()

    @property
    def warmup_steps(self) -> int:
        return round(self.warmup * self.total_steps)

    def rate(self) -> float:
        """The rate at the current step."""
        if self.step_count >= self.warmup_steps:
            return self.target
        return self.target * self.step_count / self.warmup_steps

    def _apply(self) -> None:
        set_drop_rate(self.model, self.rate())

    def step(self) -> None:
        self.step_count += 1
        self._apply()

    def state_dict(self) -> dict[str, Any]:
        return {"step_count": self.step_count, "target": self.target,
                "total_steps": self.total_steps, "warmup": self.warmup}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step_count = int(state["step_count"])
        self.target = float(state["target"])
        self.total_steps = int(state["total_steps"])
        self.warmup = float(state["warmup"])
        self._apply()


def _sampler(model: nn.Module) -> DropSampler:
    samplers = {id(g.sampler): g.sampler for g in _gates_or_error(model)}
    if len(samplers) != 1:  # pragma: no cover - the pass gives all gates one sampler
        raise InvalidArgumentError("the model's gates do not share one DropSampler")
    return next(iter(samplers.values()))


def get_rng_state(model: nn.Module) -> dict[str, Any]:
    """The state of the model's drop decisions; save it with your checkpoint.

    The state is not part of ``state_dict()`` (whose keys fxsd never changes).
    """
    return _sampler(model).get_state()


def set_rng_state(model: nn.Module, state: dict[str, Any]) -> None:
    """Restore :func:`get_rng_state`'s result: a resumed run continues the same drop sequence."""
    _sampler(model).set_state(state)
