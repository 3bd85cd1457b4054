"""Drop-rate schedules over training time, stepped like ``torch.optim.lr_scheduler``.

A schedule owns the gates' rates of one transformed model and moves them once per optimizer step:

* :class:`DropSchedule` — ``fn(step) -> factor`` scales every site's base rate (the rates the
  model had when the schedule was made), as ``LambdaLR`` scales learning rates;
* :class:`DropWarmup` — a linear ramp from 0 (Composer's ``drop_warmup``): a ``DropSchedule``;
* :func:`progressive_layer_drop` — Zhang & He (NeurIPS 2020): site ``l`` of ``L`` drops at
  ``(l / L) * (1 - theta(t))``, ``theta(t) = (1 - theta_bar) * exp(-gamma * t) + theta_bar``.

Each has ``step()``, ``get_last_rate()`` (the model-wide rate) and ``state_dict()`` /
``load_state_dict()`` (save it with your checkpoint; the framework callbacks in
:mod:`fxsd.callbacks` do). Depth distributions (``"linear"``, ``"exponential"``, …) live in
:mod:`fxsd.distributions`; a schedule scales whatever distribution the model was given.

>>> import torchvision, fxsd
>>> model = fxsd.stochastic_depth(torchvision.models.resnet18(), 0.2)
>>> schedule = fxsd.DropSchedule(model, lambda step: min(1.0, step / 100))
>>> for _ in range(50):
...     schedule.step()
>>> schedule.get_last_rate()
0.1
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from torch import nn

from fxsd.distributions import check_rate
from fxsd.errors import FxsdError, InvalidArgumentError, InvalidTypeError
from fxsd.training import _gates_or_error, get_drop_rate, named_gates, set_drop_rate

__all__ = ["DropSchedule", "DropWarmup", "ProgressiveLayerDrop", "progressive_layer_drop"]

_ROUNDING = 1e-9  # base rate x factor may land a hair above 1 when it means 1


class DropSchedule:
    """Scale a transformed model's drop rates by ``fn(step)`` at every step.

    ``fn(step)`` returns a factor ``>= 0``; every site's rate becomes its base rate times that
    factor, keeping the depth distribution. A factor that would take a site's rate (or the
    model-wide rate) above 1 raises :class:`~fxsd.InvalidArgumentError` naming the step, the
    factor and the site, and the schedule stays where it was: rates are never silently capped,
    which would flatten the depth distribution. Step 0 is applied at construction; call
    :meth:`step` once per optimizer step.

    Args:
        model: a model returned by :func:`fxsd.stochastic_depth`.
        fn: ``step -> factor``, for ``step = 0, 1, 2, …``.

    Example: a LayerSkip-style curriculum, exponential in depth, ramped in over 1000 steps::

        model = fxsd.stochastic_depth(model, 0.2, distribution="exponential")
        schedule = fxsd.DropSchedule(model, lambda step: min(1.0, step / 1000))
    """

    def __init__(self, model: nn.Module, fn: Callable[[int], float]) -> None:
        if not callable(fn):
            raise InvalidTypeError(f"fn must be callable step -> factor, got {type(fn).__name__}")
        self.model = model
        self.fn = fn
        self.base_rate = get_drop_rate(model)  # raises when the model has no gates
        self.step_count = 0
        self._apply()

    def rate(self) -> float:
        """The model-wide rate at the current step."""
        factor = float(self.fn(self.step_count))
        if math.isnan(factor) or factor < 0:
            raise InvalidArgumentError(f"fn({self.step_count}) returned {factor}: factors must "
                                       "be numbers >= 0")
        self._check_factor(factor)
        return min(1.0, self.base_rate * factor)  # min: only rounding can go past 1 here

    def _check_factor(self, factor: float) -> None:
        """Refuse a factor that takes any site's rate, or the model-wide rate, above 1."""
        rate = self.base_rate * factor
        found = [(rate * gate.rate_weight, f"site {name!r} would drop at")
                 for name, gate in named_gates(self.model).items()]
        found.append((rate, "the model-wide rate would be"))
        highest, what = max(found, key=lambda item: item[0])  # the first site, on a tie
        if highest > 1.0 + _ROUNDING:
            raise InvalidArgumentError(
                f"fn({self.step_count}) returned {factor:g}: {what} {highest:.4g} (base rate "
                f"{self.base_rate:.4g} x {factor:g}), above 1; make fn's factors at most "
                f"{factor / highest:.4g} for this model")

    def get_last_rate(self) -> float:
        """The model-wide rate the last step set (as ``get_last_lr`` for learning rates)."""
        return self._last

    def _apply(self) -> None:
        self._last = self.rate()
        set_drop_rate(self.model, self._last)

    def step(self) -> None:
        """Advance one step and set the rates for it (on an error, stay at the step before)."""
        self.step_count += 1
        try:
            self._apply()
        except FxsdError:
            self.step_count -= 1
            raise

    def state_dict(self) -> dict[str, Any]:
        """The schedule's position (``fn`` itself is code, not state)."""
        return {"step_count": self.step_count, "base_rate": self.base_rate}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a position saved with :meth:`state_dict` and set the rates for it."""
        self.step_count = int(state["step_count"])
        self.base_rate = check_rate(state["base_rate"], "base_rate")
        self._apply()


class DropWarmup(DropSchedule):
    """Ramp the drop rate from 0 to its full value over the first part of training.

    A :class:`DropSchedule` with factor ``step / warmup_steps`` up to 1. After
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
        self.total_steps = total_steps
        self.warmup = check_rate(warmup, "warmup")
        super().__init__(model, self._factor)

    @property
    def warmup_steps(self) -> int:
        return round(self.warmup * self.total_steps)

    @property
    def target(self) -> float:
        """The full rate the ramp ends at."""
        return self.base_rate

    def _factor(self, step: int) -> float:
        return 1.0 if step >= self.warmup_steps else step / self.warmup_steps

    def state_dict(self) -> dict[str, Any]:
        return {"step_count": self.step_count, "target": self.base_rate,
                "total_steps": self.total_steps, "warmup": self.warmup}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.total_steps = int(state["total_steps"])
        self.warmup = check_rate(state["warmup"], "warmup")
        super().load_state_dict({"step_count": state["step_count"],
                                 "base_rate": state["target"]})


class ProgressiveLayerDrop(DropSchedule):
    """Progressive layer dropping (Zhang & He, NeurIPS 2020); see :func:`progressive_layer_drop`."""

    def __init__(self, model: nn.Module, theta_bar: float, gamma: float) -> None:
        self.theta_bar = check_rate(theta_bar, "theta_bar")
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or gamma < 0:
            raise InvalidArgumentError(f"gamma must be a number >= 0, got {gamma!r}")
        self.gamma = float(gamma)
        # site l of L drops at (l / L) * (1 - theta(t)), whatever rates it had before
        for gate in _gates_or_error(model):
            gate.rate_weight = gate.info.depth / gate.info.num_levels if gate.info else 1.0
        super().__init__(model, self.theta)

    def theta(self, step: int) -> float:
        """The keep probability of the deepest site at ``step``: ``theta(t)``."""
        return (1 - self.theta_bar) * math.exp(-self.gamma * step) + self.theta_bar

    def rate(self) -> float:
        return 1.0 - self.theta(self.step_count)

    def state_dict(self) -> dict[str, Any]:
        return {"step_count": self.step_count, "theta_bar": self.theta_bar, "gamma": self.gamma}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step_count = int(state["step_count"])
        self.theta_bar = check_rate(state["theta_bar"], "theta_bar")
        self.gamma = float(state["gamma"])
        self._apply()


def progressive_layer_drop(model: nn.Module, theta_bar: float = 0.5, gamma: float | None = None,
                           *, total_steps: int | None = None) -> ProgressiveLayerDrop:
    """Progressive layer dropping: keep probabilities that fall over time and with depth.

    At step ``t`` the keep probability is ``theta(t) = (1 - theta_bar) * exp(-gamma * t) +
    theta_bar`` (1 at the start, ``theta_bar`` in the limit) and site ``l`` of ``L`` drops at
    ``(l / L) * (1 - theta(t))``, whatever rates the model had (Zhang & He, "Accelerating
    Training of Transformer-Based Language Models with Progressive Layer Dropping", NeurIPS
    2020). Their BERT runs used ``theta_bar = 0.5`` and ``gamma ≈ 100 / T``.

    Args:
        model: a model returned by :func:`fxsd.stochastic_depth` (its own rates are replaced).
        theta_bar: the keep probability the deepest site tends to.
        gamma: the decay per step; or give ``total_steps=T`` for ``gamma = 100 / T``.

    Example:
        >>> import torchvision, fxsd
        >>> model = fxsd.stochastic_depth(torchvision.models.resnet18())
        >>> pld = fxsd.progressive_layer_drop(model, theta_bar=0.5, total_steps=1000)
        >>> pld.get_last_rate()  # theta(0) = 1: nothing drops yet
        0.0
    """
    if gamma is None:
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise InvalidArgumentError("progressive_layer_drop needs gamma= or total_steps= (a "
                                       "positive int: gamma = 100 / total_steps)")
        gamma = 100.0 / total_steps
    return ProgressiveLayerDrop(model, theta_bar, gamma)
