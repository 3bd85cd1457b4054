"""Which sites :func:`fxsd.prune` removes, in what order: its strategies (``"rates"``,
``"every_other"``, ``"greedy"``, a callable) and the loss on ``data`` they are judged by.

Each strategy orders the sites that can be removed, and the shortest prefix of the order whose
saving (:class:`~fxsd.pruning._costs.ForwardCosts`) meets the target is removed. ``"greedy"`` builds
its order one site at a time: it evaluates the loss on ``data`` with each candidate removed as
well (the gated model itself, its removed gates skipping their branches for good, as the
stripped model will) and takes the one that raises the loss least per FLOP saved.
"""

from __future__ import annotations

import contextlib
import math
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from fxsd.arguments import close_matches
from fxsd.errors import InvalidArgumentError, InvalidTypeError
from fxsd.passes.prune_branches import unremovable
from fxsd.pruning._costs import ForwardCosts
from fxsd.runtime.accessors import named_gates
from fxsd.runtime.gate import BranchGate

__all__: list[str] = []


Loss = Callable[[Any, Any], Any]
Strategy = str | Callable[[nn.Module, Mapping[str, int]], Iterable[str]]


def _call_of(batch: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """How a batch is passed to the model (see :func:`fxsd.prune`'s ``data``)."""
    if isinstance(batch, Mapping):
        return (), dict(batch)
    if isinstance(batch, (tuple, list)):
        return (batch[0],), {}
    return (batch,), {}


# -- choosing ------------------------------------------------------------------------------------
def _choose(work: nn.Module, costs: ForwardCosts, target: float, strategy: Strategy,
            batches: list[Any], loss_fn: Loss, progress: bool) -> list[str]:
    found = named_gates(work)
    candidates = [n for n, g in found.items() if not unremovable(g)]
    if strategy == "greedy":
        _check_reach(costs, candidates, target, "removing every site that can be removed")
        return _greedy(work, costs, candidates, target, batches, loss_fn, progress)
    if callable(strategy):
        order = _custom_order(strategy, work, costs, candidates)
        what = "removing every site the strategy returned"
    elif strategy == "every_other":
        order, what = _every_other(found, candidates), "removing every site"
    else:
        order, what = _by_rate(found, costs, candidates), "removing every site"
    _check_reach(costs, order, target, what)
    for n in range(len(order) + 1):
        if costs.saving(order[:n]) >= target - 1e-12:
            return order[:n]
    raise AssertionError("unreachable: the reach was checked")  # pragma: no cover


def _check_reach(costs: ForwardCosts, order: list[str], target: float, what: str) -> None:
    reach = costs.saving(order)
    if target > reach + 1e-12:
        raise InvalidArgumentError(
            f"target_saving={target:g} is out of reach: {what} saves at most {reach:.4f} "
            f"({reach:.1%}) of the forward FLOPs on the examples. Ask for at most that")


def _by_rate(found: dict[str, BranchGate], costs: ForwardCosts,
             candidates: list[str]) -> list[str]:
    position = {name: i for i, name in enumerate(found)}
    return sorted(candidates, key=lambda n: (-found[n].drop_rate, -costs.sites[n], position[n]))


def _every_other(found: dict[str, BranchGate], candidates: list[str]) -> list[str]:
    """The 2nd, 4th, … site in depth order, then every other one of those left, and so on."""
    position = {name: i for i, name in enumerate(found)}
    left = sorted(candidates, key=lambda n: (found[n].info.depth, position[n]))
    order: list[str] = []
    while left:
        order += left[1::2] if len(left) > 1 else left
        left = left[0::2] if len(left) > 1 else []
    return order


def _custom_order(strategy: Callable[..., Iterable[str]], work: nn.Module,
                  costs: ForwardCosts, candidates: list[str]) -> list[str]:
    order = list(dict.fromkeys(strategy(work, dict(costs.sites))))
    allowed = set(candidates)
    for name in order:
        if name not in allowed:
            found = named_gates(work)
            why = unremovable(found[name]) if name in found else "it is not a gate of the model"
            raise InvalidArgumentError(
                f"the strategy returned {name!r}, which cannot be removed: {why}"
                f"{close_matches(name, allowed) if name not in found else ''}")
    return order


def _greedy(work: nn.Module, costs: ForwardCosts, candidates: list[str], target: float,
            batches: list[Any], loss_fn: Loss, progress: bool) -> list[str]:
    """Remove, one at a time, the site whose removal raises the loss least per FLOP saved."""
    removed: list[str] = []
    with _bar(progress) as bar:
        current = _mean_loss(work, batches, loss_fn, removed)
        while costs.saving(removed) < target - 1e-12:
            saved = costs.saving(removed)
            best: tuple[float, str, float] | None = None
            for name in candidates:
                gain = costs.saving([*removed, name]) - saved
                if name in removed or gain <= 0:  # gone already, or inside a removed branch
                    continue
                value = _mean_loss(work, batches, loss_fn, [*removed, name])
                bar.update(1)
                score = (value - current) / gain
                if best is None or score < best[0]:
                    best = (score, name, value)
            assert best is not None  # the reach was checked
            removed.append(best[1])
            current = best[2]
    return removed


def _default_loss(output: Any, batch: Any) -> Any:
    value = getattr(output, "loss", None)
    if value is None and isinstance(output, Mapping):
        value = output.get("loss")
    if value is None:
        value = output[0] if isinstance(output, (tuple, list)) else output
        if not isinstance(value, torch.Tensor):
            raise InvalidTypeError(
                f"the model's output ({type(output).__name__}) has no loss and is not a tensor: "
                "pass loss=, a callable loss(output, batch)")
        return value.float().mean()
    return value


def _mean_loss(work: nn.Module, batches: list[Any], loss_fn: Loss,
               removed: Iterable[str]) -> float:
    """The mean of ``loss_fn`` over ``batches`` with the ``removed`` branches left out."""
    total = 0.0
    with _removing(work, removed), torch.no_grad():
        for batch in batches:
            args, kwargs = _call_of(batch)
            value = loss_fn(work(*args, **kwargs), batch)
            number = float(value.detach()) if isinstance(value, torch.Tensor) else float(value)
            if not math.isfinite(number):
                warnings.warn(f"fxsd.prune: the loss is {number} on a batch", stacklevel=4)
            total += number
    return total / len(batches)


@contextlib.contextmanager
def _removing(work: nn.Module, removed: Iterable[str]) -> Iterator[None]:
    """``work`` (gated, in eval) computes the pruned model: each removed gate returns its join
    without the branch, as the stripped model will."""
    gates = named_gates(work)
    saved = {name: (gates[name].scale, gates[name].drop_rate) for name in removed}
    try:
        for name in saved:
            gates[name].scale, gates[name].drop_rate = "eval", 1.0
        yield
    finally:
        for name, (scale, rate) in saved.items():
            gates[name].scale, gates[name].drop_rate = scale, rate


class _NoBar:
    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def update(self, n: int) -> None:
        pass


def _bar(enabled: bool) -> Any:
    if enabled and sys.stderr.isatty():
        try:
            from tqdm import tqdm
        except ImportError:
            pass
        else:
            return tqdm(desc="fxsd.prune greedy", unit="eval", file=sys.stderr)
    return _NoBar()
