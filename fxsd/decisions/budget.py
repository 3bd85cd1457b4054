"""What the drops buy: each site's share of a training step's compute, and the rates for a target.

The cost model. A training step's compute is the forward and backward FLOPs of the whole model,
counted by ``torch.utils.flop_counter`` on the example inputs. A site's cost is what its
branch's forward and backward do beyond the branches nested in it; the skip, the gate and the
rest of the model are never saved. Costs are counted on the gated model itself, once, on fake
tensors, each FLOP charged to the innermost gate whose branch issued it
(:mod:`fxsd.decisions.step_costs`): nothing is computed, and the model, its buffers and the
random generators are left as they were.

A site is skipped when its own gate or a gate around it drops, so at rates ``p`` the expected
saving is ``Σ_s cost_s · (1 − Π_{h ∋ s} (1 − p_h)) / step``. Block mode and sample mode's
``subset`` skip what they drop (subset: the dropped rows' share, and a branch's FLOPs are linear
in its rows); sample mode's ``mask`` computes every row and saves nothing.

:func:`solve_scale` scales a distribution's rates by one factor until the expected saving meets
a target (:func:`fxsd.stochastic_depth`'s ``target_saving``); :func:`expected_saving` reads a
gated model's current rates, so it follows :func:`fxsd.set_drop_rate` and every schedule.

>>> import torch, torchvision, fxsd
>>> model = fxsd.stochastic_depth(torchvision.models.resnet50(), target_saving=0.25,
...                               example_inputs=(torch.zeros(1, 3, 224, 224),))
>>> round(fxsd.expected_saving(model), 3)
0.25
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

from torch import nn

from fxsd.decisions.step_costs import count_pending
from fxsd.errors import FxsdError, InvalidArgumentError
from fxsd.preserve import guarded
from fxsd.record import get_record
from fxsd.runtime.accessors import _gates_or_error, named_gates
from fxsd.runtime.gate import BranchGate

if TYPE_CHECKING:
    from fxsd.analysis.sites import ResidualSite

__all__ = ["expected_saving", "site_savings", "saving_at", "plan_saving", "solve_scale",
           "scale_to_target", "effective_rate"]


def effective_rate(gate: BranchGate) -> float:
    """The share of its branch's work ``gate`` skips on average: its rate, except in sample
    mode's ``mask`` implementation, which computes every row (0)."""
    if gate.mode == "sample" and gate.sample_impl == "mask":
        return 0.0
    return gate.drop_rate


def saving_at(rates: Mapping[str, float], sites: Mapping[str, float],
              enclosing: Mapping[str, Sequence[str]], total: float) -> float:
    """The expected saving, as a fraction of ``total``, at per-gate ``rates`` (see the module
    docstring); ``sites``: each gate's own cost (FLOPs; the bench's limit: seconds).

    >>> saving_at({"a": 0.5, "b": 0.5}, {"a": 30, "b": 10}, {"a": (), "b": ("a",)}, 100)
    0.225
    """
    saved = 0.0
    for name, flops in sites.items():
        keep = 1.0 - rates[name]
        for up in enclosing.get(name, ()):
            keep *= 1.0 - rates[up]
        saved += flops * (1.0 - keep)
    return saved / total if total else 0.0


def plan_saving(sites: Sequence[ResidualSite], rates: Sequence[float], total: int) -> float:
    """The expected saving of a plan at per-site ``rates`` on the untransformed model, as a
    fraction of ``total``, its forward FLOPs: :func:`saving_at` with each site's forward FLOPs
    beyond the sites nested in it as its cost (a site is nested in another when its add is one of
    the other's branch nodes). A forward's counterpart of a gated model's step costs, for a model
    not transformed yet; every site's ``flops`` must be known (example inputs)."""
    branches = [set(s.branch) for s in sites]
    enclosing = {str(i): tuple(str(j) for j in sorted(
        (j for j, branch in enumerate(branches) if j != i and site.add in branch),
        key=lambda j: len(branches[j])))  # nearest (smallest) first
        for i, site in enumerate(sites)}
    own = {str(i): site.flops or 0 for i, site in enumerate(sites)}
    for i, site in enumerate(sites):
        if enclosing[str(i)]:  # the nearest encloser's branch holds this one's
            own[enclosing[str(i)][0]] -= site.flops or 0
    costs = {name: max(0, flops) for name, flops in own.items()}
    return saving_at({str(i): r for i, r in enumerate(rates)}, costs, enclosing, total)


def _costs_or_error(model: nn.Module, what: str) -> tuple[dict[str, BranchGate], int]:
    found = named_gates(model)
    _gates_or_error(model)
    count_pending(model)
    record = get_record(model)
    if record.step_flops is None or any(g.info.step_flops is None for g in found.values()):
        if record.step_flops_error:  # examples were given: the count itself failed
            raise FxsdError(
                f"{what} needs the FLOPs of a training step, and counting them on the example "
                f"inputs failed when the model was transformed: {record.step_flops_error}")
        raise InvalidArgumentError(
            f"{what} needs the FLOPs of a training step, counted when the model is transformed: "
            "pass example_inputs= (and example_kwargs=), one forward call's inputs, to "
            "fxsd.stochastic_depth")
    return found, record.step_flops


def site_savings(model: nn.Module) -> dict[str, float]:
    """Each gate's expected saving at its current rate, as a fraction of a training step."""
    found, total = _costs_or_error(model, "site_savings")
    rates = {name: effective_rate(g) for name, g in found.items()}
    return {name: saving_at(rates, {name: g.info.step_flops}, {name: g.info.enclosing}, total)
            for name, g in found.items()}


@guarded("expected_saving")
def expected_saving(model: nn.Module) -> float:
    """The expected fraction of a training step's compute (forward + backward FLOPs of the whole
    model, on the example inputs it was transformed with) that the drops save at the model's
    current rates: it follows :func:`fxsd.set_drop_rate` and every schedule.

    Raises:
        InvalidArgumentError: the model was transformed without example inputs (no FLOPs).
        FxsdError: counting the FLOPs on its example inputs failed (says why).

    Example:
        >>> import torch, torchvision, fxsd
        >>> model = fxsd.stochastic_depth(torchvision.models.resnet18(), 0.2,
        ...                               example_inputs=(torch.zeros(1, 3, 64, 64),))
        >>> fxsd.set_drop_rate(model, 0.0)
        >>> fxsd.expected_saving(model)
        0.0
    """
    return sum(site_savings(model).values())


def solve_scale(shape: Mapping[str, float], saving: Callable[[dict[str, float]], float],
                target: float, describe: str = "the distribution") -> float:
    """The factor ``a`` for which ``saving({s: a * shape[s]})`` is ``target`` (to 1e-9), with
    every rate at most 1.

    Raises:
        FxsdError: the target is beyond what ``shape`` reaches with its largest rate at 1; the
            message names the largest reachable saving.
    """
    largest = max(shape.values(), default=0.0)
    top = 1.0 / largest if largest > 0 else 0.0
    reach = saving({s: min(1.0, top * w) for s, w in shape.items()})
    if target > reach + 1e-12:
        raise FxsdError(
            f"target_saving={target:g} is out of reach: with {describe}, the drops save at most "
            f"{reach:.4f} ({reach:.1%}) of a training step (its largest rate at 1). Ask for at "
            "most that, or use a distribution that drops more of the model (e.g. 'uniform')")
    low, high = 0.0, top
    for _ in range(100):
        mid = (low + high) / 2
        if saving({s: min(1.0, mid * w) for s, w in shape.items()}) < target:
            low = mid
        else:
            high = mid
    return high


def scale_to_target(model: nn.Module, target: float, describe: str = "the distribution"
                    ) -> float:
    """Scale the gated ``model``'s rates (their distribution as planned) by one factor so that
    :func:`expected_saving` is ``target``; set the model-wide rate to the largest site rate (so
    :func:`fxsd.set_drop_rate` rescales the same shape). Returns that model-wide rate."""
    found, total = _costs_or_error(model, "target_saving")
    shape = {n: g.drop_rate for n, g in found.items()}
    skips = {n: 0.0 if g.mode == "sample" and g.sample_impl == "mask" else 1.0
             for n, g in found.items()}
    sites = {n: g.info.step_flops for n, g in found.items()}
    enclosing = {n: g.info.enclosing for n, g in found.items()}

    def saving(rates: dict[str, float]) -> float:
        return saving_at({n: r * skips[n] for n, r in rates.items()}, sites, enclosing, total)

    factor = solve_scale(shape, saving, target, describe)
    rates = {n: min(1.0, factor * w) for n, w in shape.items()}
    model_rate = max(rates.values(), default=0.0)
    largest = max(shape.values(), default=0.0)
    for name, gate in found.items():
        gate.drop_rate = rates[name]
        gate.rate_weight = (rates[name] / model_rate if model_rate > 0
                            else (shape[name] / largest if largest > 0 else 0.0))
    get_record(model).drop_rate = model_rate
    return model_rate
