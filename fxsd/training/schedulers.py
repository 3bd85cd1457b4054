"""Drop-rate schedules over training time, stepped like ``torch.optim.lr_scheduler``.

A schedule owns the gates' rates of one transformed model and moves them once per optimizer step:

* :class:`DropSchedule` — ``fn(step) -> factor`` scales every site's base rate (the rates the
  model had when the schedule was made), as ``LambdaLR`` scales learning rates;
* :class:`DropWarmup` — a linear ramp from 0 (Composer's ``drop_warmup``): a ``DropSchedule``;
* :func:`progressive_layer_drop` — Zhang & He (NeurIPS 2020): site ``l`` of ``L`` drops at
  ``(l / L) * (1 - theta(t))``, ``theta(t) = (1 - theta_bar) * exp(-gamma * t) + theta_bar``.

Each has ``step()``, ``get_last_rate()`` (the model-wide rate) and ``state_dict()`` /
``load_state_dict()`` (save it with your checkpoint; the framework callbacks in
:mod:`fxsd.training.callbacks` do). Depth distributions (``"linear"``, ``"exponential"``, …) live in
:mod:`fxsd.decisions.distributions`; a schedule scales whatever distribution the model was given.

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
import weakref
from collections.abc import Callable, Mapping
from numbers import Real
from typing import Any

from torch import nn

from fxsd.arguments import check_callable, check_int, check_number, check_rate
from fxsd.errors import FxsdError, InvalidArgumentError, InvalidTypeError
from fxsd.record import FxsdRecord, get_record
from fxsd.runtime.accessors import _gates_or_error, get_drop_rate, named_gates, set_drop_rate

__all__ = ["DropSchedule", "DropWarmup", "ProgressiveLayerDrop", "progressive_layer_drop",
           "schedule_of"]

_ROUNDING = 1e-9  # base rate x factor may land a hair above 1 when it means 1


class DropSchedule:
    """Scale a transformed model's drop rates by ``fn(step)`` at every step.

    ``fn(step)`` returns a factor ``>= 0`` (a number: a string or bool is refused); every site's
    rate becomes its base rate times that factor, keeping the depth distribution. A factor that
    would take a site's rate (or the model-wide rate) above 1 raises
    :class:`~fxsd.InvalidArgumentError` naming the step, the factor and the site, and the
    schedule stays where it was: rates are never silently capped, which would flatten the depth
    distribution. Step 0 is applied at construction; call :meth:`step` once per optimizer step.

    **One schedule per model.** A schedule is in charge of its model's rates until
    :meth:`remove` is called (or it is garbage-collected): making a second one for the same model
    raises :class:`~fxsd.InvalidArgumentError` naming the first
    (:func:`schedule_of` returns it), since two schedules would overwrite each other's rates at
    every step. A copy of the model (``copy.deepcopy``, ``torch.save``/``torch.load``) starts
    without one.

    Args:
        model: a model returned by :func:`fxsd.stochastic_depth`.
        fn: ``step -> factor``, for ``step = 0, 1, 2, …``.

    Example: a LayerSkip-style curriculum, exponential in depth, ramped in over 1000 steps::

        model = fxsd.stochastic_depth(model, 0.2, distribution="exponential")
        schedule = fxsd.DropSchedule(model, lambda step: min(1.0, step / 1000))
    """

    def __init__(self, model: nn.Module, fn: Callable[[int], float]) -> None:
        self.fn = check_callable(fn, "fn", "fn(step) -> factor", 1)
        self._start(model)

    def _start(self, model: nn.Module) -> None:
        """Take charge of ``model``'s rates at step 0 (refused while another schedule has
        them; nothing is changed then)."""
        _gates_or_error(model)
        _check_free(model, self)
        self.model = model
        self.base_rate = get_drop_rate(model)
        self.step_count = 0
        self._removed = False
        self._apply()

    def _factor(self, step: int) -> Any:
        return self.fn(step)

    def rate(self) -> float:
        """The model-wide rate at the current step."""
        step = self.step_count
        value = self._factor(step)
        if isinstance(value, bool) or not isinstance(value, Real):
            raise InvalidTypeError(f"fn({step}) returned {value!r} ({type(value).__name__}): "
                                   "factors must be numbers >= 0")
        factor = float(value)
        if not math.isfinite(factor) or factor < 0:
            raise InvalidArgumentError(f"fn({step}) returned {factor}: factors must be numbers "
                                       ">= 0 (and finite)")
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
        if self.__dict__.get("_removed"):
            raise InvalidArgumentError(
                f"this {type(self).__name__} was removed (.remove()): it no longer steps the "
                "model's rates; step the schedule in charge instead (fxsd.training.schedulers."
                "schedule_of(model))")
        record = _record(self.model)
        in_charge = _slot_of(record) is self
        if not in_charge:
            _check_free(self.model, self)
        last = self.rate()
        set_drop_rate(self.model, last)
        self._last = last
        if not in_charge:
            record.schedule = _Slot(self)

    def step(self) -> None:
        """Advance one step and set the rates for it (on an error, stay at the step before)."""
        self.step_count += 1
        try:
            self._apply()
        except FxsdError:
            self.step_count -= 1
            raise

    def remove(self) -> None:
        """Stop being in charge of the model's rates: they stay where the last step set them,
        :meth:`step` raises from now on, and another schedule may be made for the model."""
        record = _record(self.model)
        if _slot_of(record) is self:
            record.schedule = None
        if record.warmup is self:  # the one fxsd.apply_stochastic_depth made
            record.warmup = None
        self._removed = True

    def state_dict(self) -> dict[str, Any]:
        """The schedule's position (``fn`` itself is code, not state)."""
        return {"step_count": self.step_count, "base_rate": self.base_rate}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a position saved with :meth:`state_dict` and set the rates for it.

        Raises :class:`~fxsd.InvalidArgumentError` (the schedule unchanged) for a state that is
        not one this class's :meth:`state_dict` returned."""
        state = _entries(self, state, ("step_count", "base_rate"))
        self._restore(step_count=check_int(state["step_count"], "step_count", minimum=0),
                      base_rate=check_rate(state["base_rate"], "base_rate"))

    def _restore(self, **values: Any) -> None:
        """Set the schedule's attributes and the rates for them, or none of them."""
        before = {name: getattr(self, name) for name in values}
        self.__dict__.update(values)
        try:
            self._apply()
        except FxsdError:
            self.__dict__.update(before)
            raise


class _Slot:
    """The schedule in charge of a model's rates, held weakly on its record
    (``FxsdRecord.schedule``): a forgotten schedule frees the model. A copied or unpickled record
    starts empty; a schedule copied with its model takes charge again at its next step."""

    def __init__(self, schedule: DropSchedule | None = None) -> None:
        self._ref = None if schedule is None else weakref.ref(schedule)

    def get(self) -> DropSchedule | None:
        return None if self._ref is None else self._ref()

    def __reduce__(self) -> tuple[Any, ...]:
        return (_Slot, ())

    def __deepcopy__(self, memo: dict[int, Any]) -> _Slot:
        return _Slot()


def _record(model: nn.Module) -> FxsdRecord:
    return get_record(model)


def _slot_of(record: FxsdRecord) -> DropSchedule | None:
    slot = getattr(record, "schedule", None)  # a record pickled before schedules had one
    return slot.get() if isinstance(slot, _Slot) else None


def schedule_of(model: nn.Module) -> DropSchedule | None:
    """The schedule in charge of ``model``'s rates (the one :func:`fxsd.apply_stochastic_depth`
    made for ``drop_warmup`` included), or ``None``."""
    _gates_or_error(model)
    record = _record(model)
    for candidate in (_slot_of(record), record.warmup):
        if isinstance(candidate, DropSchedule) and not candidate.__dict__.get("_removed") \
                and _record(candidate.model) is record:
            return candidate
    return None


def _check_free(model: nn.Module, schedule: DropSchedule) -> None:
    current = schedule_of(model)
    if current is not None and current is not schedule:
        raise InvalidArgumentError(
            f"{type(model).__name__} already has a {type(current).__name__} in charge of its "
            f"drop rates (at step {current.step_count}); a {type(schedule).__name__} beside it "
            "would overwrite them at every step. Call .remove() on the one in charge first "
            "(fxsd.training.schedulers.schedule_of(model) returns it), or express both in one "
            "DropSchedule fn")


def _entries(schedule: DropSchedule, state: object, keys: tuple[str, ...]) -> Mapping[str, Any]:
    """``state`` if it holds exactly ``keys`` (what ``state_dict()`` returns)."""
    owner = type(schedule).__name__
    if not isinstance(state, Mapping):
        raise InvalidTypeError(f"{owner}.load_state_dict takes a dict returned by its "
                               f"state_dict(), got {type(state).__name__}")
    if set(state) != set(keys):
        raise InvalidArgumentError(
            f"not a {owner} state: {owner}.state_dict() has the keys {list(keys)}, this one "
            f"has {sorted(map(str, state))}")
    return state


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
        self.total_steps = check_int(total_steps, "total_steps", minimum=1)
        self.warmup = check_rate(warmup, "warmup")
        self._start(model)

    @property
    def fn(self) -> Callable[[int], float]:
        """The ramp, ``step -> factor`` (a method, so the schedule holds no cycle to itself)."""
        return self._factor

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
        state = _entries(self, state, ("step_count", "target", "total_steps", "warmup"))
        self._restore(step_count=check_int(state["step_count"], "step_count", minimum=0),
                      base_rate=check_rate(state["target"], "target"),
                      total_steps=check_int(state["total_steps"], "total_steps", minimum=1),
                      warmup=check_rate(state["warmup"], "warmup"))


class ProgressiveLayerDrop(DropSchedule):
    """Progressive layer dropping (Zhang & He, NeurIPS 2020); see :func:`progressive_layer_drop`."""

    def __init__(self, model: nn.Module, theta_bar: float, gamma: float) -> None:
        self.theta_bar = check_rate(theta_bar, "theta_bar")
        self.gamma = _check_gamma(gamma)
        found = _gates_or_error(model)
        _check_free(model, self)  # before the weights change
        # site l of L drops at (l / L) * (1 - theta(t)), whatever rates it had before
        for gate in found:
            gate.rate_weight = gate.info.depth / gate.info.num_levels if gate.info else 1.0
        self._start(model)

    @property
    def fn(self) -> Callable[[int], float]:
        """``theta``, the keep probability of the deepest site at a step."""
        return self.theta

    def theta(self, step: int) -> float:
        """The keep probability of the deepest site at ``step``: ``theta(t)``."""
        return (1 - self.theta_bar) * math.exp(-self.gamma * step) + self.theta_bar

    def rate(self) -> float:
        return 1.0 - self.theta(self.step_count)

    def state_dict(self) -> dict[str, Any]:
        return {"step_count": self.step_count, "theta_bar": self.theta_bar, "gamma": self.gamma}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = _entries(self, state, ("step_count", "theta_bar", "gamma"))
        self._restore(step_count=check_int(state["step_count"], "step_count", minimum=0),
                      theta_bar=check_rate(state["theta_bar"], "theta_bar"),
                      gamma=_check_gamma(state["gamma"]))


def _check_gamma(gamma: object) -> float:
    value = check_number(gamma, "gamma")
    if value < 0:
        raise InvalidArgumentError(f"gamma must be a number >= 0, got {gamma!r}")
    return value


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
        if total_steps is None:
            raise InvalidArgumentError("progressive_layer_drop needs gamma= or total_steps= (a "
                                       "positive int: gamma = 100 / total_steps)")
        gamma = 100.0 / check_int(total_steps, "total_steps", minimum=1)
    elif total_steps is not None:
        raise InvalidArgumentError(
            f"give gamma= or total_steps=, not both (got gamma={gamma!r}, total_steps="
            f"{total_steps!r}): total_steps sets gamma = 100 / total_steps")
    return ProgressiveLayerDrop(model, theta_bar, gamma)
