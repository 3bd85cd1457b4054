"""The limit of ``fxsd bench``: the step time perfect skipping would give, from measured times.

Each gate's branch is timed alone (forward + backward) on the inputs it sees in the model
(:func:`site_times`, exclusive of the branches nested in it; in sample mode also on every row
count that occurred, :func:`row_times`). The branches' total time, the baseline step minus the
every-site-dropped step, is shared out between sites in proportion to those times. The limit of
an fxsd row is *realised* (the work its steps actually skipped); a rate's limit row is the
expected saving (:func:`limit_saving`: a branch is skipped when its own gate or one enclosing
it drops).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from fxsd.decisions.budget import saving_at
from fxsd.decisions.distributions import site_rates
from fxsd.runtime.accessors import named_gates
from fxsd.runtime.gate import BranchGate
from fxsd.tools._bench_step import _autocast, _find, _gated, _Runner, _sync
from fxsd.tools._bench_types import BenchConfig, BenchRow, Variant, VariantKind

if TYPE_CHECKING:
    from fxsd.analysis.sites import ResidualAnalysis

__all__ = ["site_times", "exclusive_times", "row_times", "gate_ancestors", "limit_saving"]



def _probe(model: nn.Module, x: torch.Tensor, cfg: BenchConfig
           ) -> tuple[dict[str, tuple], dict[str, str | None]]:
    """One training forward of a gated model that never drops: each gate's inputs, and the gate
    whose branch was running when it ran (``None`` for a gate on the trunk)."""
    by_name = named_gates(model)
    captured: dict[str, tuple] = {}
    parent: dict[str, str | None] = {}
    running: list[str] = []

    def before(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple) -> None:
            captured[name] = args
            parent[name] = running[-1] if running else None
            running.append(name)
        return hook

    def after(module: nn.Module, args: tuple, out: Any) -> None:
        running.pop()

    hooks = [h for n, g in by_name.items()
             for h in (g.register_forward_pre_hook(before(n)), g.register_forward_hook(after))]
    try:
        with _autocast(cfg):
            model.train()(x)
    finally:
        for h in hooks:
            h.remove()
    return captured, parent



def _branch_time(gate: BranchGate, args: tuple, cfg: BenchConfig, device: torch.device,
                 rows: int | None = None) -> float:
    """Median forward + backward time of ``gate``'s branch alone on ``args`` (first ``rows``
    rows of the fork, when given)."""
    args = args if gate.identity else args[1:]
    leaves = [a.detach().requires_grad_(a.is_floating_point()) if isinstance(a, torch.Tensor)
              else a for a in args]
    if rows is not None:
        leaves[0] = leaves[0][:rows].detach().requires_grad_(leaves[0].is_floating_point())
    samples = []
    for _ in range(cfg.branch_reps + 1):
        _sync(device)
        t0 = time.perf_counter()
        with _autocast(cfg):
            out = gate.branch.forward(*leaves)
        out.backward(torch.ones_like(out))
        _sync(device)
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples[1:])



def site_times(model: nn.Module, x: torch.Tensor, cfg: BenchConfig) -> dict[str, float]:
    """Each gate's *exclusive* branch time (forward + backward, seconds), measured in isolation.

    ``model`` is a gated model that never drops. A branch that contains other gates is charged only
    for what it computes beyond them.
    """
    captured, parent = _probe(model, x, cfg)
    inclusive = {name: _branch_time(gate, captured[name], cfg, x.device)
                 for name, gate in named_gates(model).items()}
    model.zero_grad(set_to_none=True)
    return exclusive_times(inclusive, parent)



def exclusive_times(inclusive: dict[str, float], parent: dict[str, str | None]
                    ) -> dict[str, float]:
    """Each branch's time minus the time of the branches nested directly in it (never below 0:
    timing noise can make a thin outer branch look cheaper than the branches it holds)."""
    exclusive = dict(inclusive)
    for name, up in parent.items():
        if up is not None:
            exclusive[up] -= inclusive[name]
    return {n: max(t, 0.0) for n, t in exclusive.items()}



def row_times(model: nn.Module, x: torch.Tensor, cfg: BenchConfig,
              counts: dict[str, set[int]]) -> dict[str, dict[int, float]]:
    """Each gate's branch time on ``k`` of its batch's rows, for every ``k`` in ``counts``
    (``k = 0`` costs 0; the full batch is always measured)."""
    captured, _ = _probe(model, x, cfg)
    curves: dict[str, dict[int, float]] = {}
    for name, gate in named_gates(model).items():
        n = len(captured[name][0 if gate.identity else 1])
        curve = {0: 0.0}
        for k in sorted(counts.get(name, set()) | {n}):
            if k > 0:
                curve[k] = _branch_time(gate, captured[name], cfg, x.device, rows=k)
        curves[name] = curve
    model.zero_grad(set_to_none=True)
    return curves



def _interpolate(curve: dict[int, float], k: float) -> float:
    """``curve`` (row count -> time) at ``k``, linear between the measured points."""
    points = sorted(curve.items())
    for (k0, t0), (k1, t1) in zip(points, points[1:]):
        if k0 <= k <= k1:
            return t0 if k1 == k0 else t0 + (t1 - t0) * (k - k0) / (k1 - k0)
    return points[-1][1]



def gate_ancestors(model: nn.Module, x: torch.Tensor, cfg: BenchConfig) -> dict[str, list[str]]:
    """For each gate, the gates whose branches contain it (nearest first)."""
    _, parent = _probe(model, x, cfg)
    chains: dict[str, list[str]] = {}
    for name in parent:
        chain, cur = [], parent[name]
        while cur is not None:
            chain.append(cur)
            cur = parent[cur]
        chains[name] = chain
    return chains



def limit_saving(times: dict[str, float], rates: dict[str, float],
                 ancestors: dict[str, list[str]]) -> float:
    """Expected seconds saved per step by perfect skipping: Σ t_l · P(branch l skipped), the
    budget's :func:`~fxsd.decisions.budget.saving_at` with times as the costs.

    A branch is skipped when its own gate or any gate enclosing it drops.
    """
    return saving_at(rates, times, ancestors, 1)


@dataclass
class _Branches:
    """The branches as the limit needs them, measured alone on the variant that never drops."""

    names: list[str]  # the gates, in the model's order
    isolated: dict[str, float]  # exclusive time of each branch alone (site_times)
    chains: dict[str, list[str]]  # the gates whose branches hold each gate (gate_ancestors)
    curves: dict[str, dict[int, float]]  # sample mode: time on k rows (row_times); else empty
    depths: list[int]  # the sites' depths and levels, for their rates
    levels: int



def _measure_branches(runners: Sequence[_Runner], x: torch.Tensor, cfg: BenchConfig,
                      analysis: ResidualAnalysis) -> _Branches:
    """Time each branch alone; in sample mode, also on every row count the timed steps ran."""
    probe = _find(runners, VariantKind.OVERHEAD).model
    isolated = site_times(probe, x, cfg)
    chains = gate_ancestors(probe, x, cfg)
    names = list(named_gates(probe))
    counts: dict[str, set[int]] = {name: set() for name in names}
    if cfg.mode == "sample":
        for v in runners:
            for step in v.rows_run:
                for name, k in zip(names, step):
                    counts[name].add(k)
    curves = row_times(probe, x, cfg, counts) if cfg.mode == "sample" else {}
    return _Branches(names, isolated, chains, curves, [s.depth for s in analysis.sites],
                     analysis.num_levels)



@dataclass
class _Limits:
    """One group's (eager or compiled) limits. Its branch times are the isolated ones scaled to
    add up to ``branch_total``, the measured baseline step minus the every-site-dropped step."""

    cfg: BenchConfig
    branches: _Branches
    base_time: float
    branch_total: float
    times: dict[str, float] = field(init=False)

    def __post_init__(self) -> None:
        isolated = self.branches.isolated
        scale = self.branch_total / sum(isolated.values()) if sum(isolated.values()) else 0.0
        self.times = {name: t * scale for name, t in isolated.items()}

    @classmethod
    def measured(cls, members: Sequence[_Runner], branches: _Branches,
                 cfg: BenchConfig) -> _Limits:
        """The limits of the group ``members``, from its baseline and every-site-dropped times."""
        base_time = _find(members, VariantKind.BASELINE).row.mean
        every = _find(members, VariantKind.ALL_DROPPED).row.mean
        return cls(cfg, branches, base_time, max(base_time - every, 0.0))

    def of(self, runner: _Runner) -> float | None:
        """``runner``'s limit as a fraction of the baseline step (``None``: it has none)."""
        kind = runner.spec.kind
        if kind is VariantKind.FXSD:
            return self.realised(runner) / self.base_time
        if kind is VariantKind.MASK_DROP_PATH:
            return self.expected(runner.spec.rate) / self.base_time
        if kind is VariantKind.ALL_DROPPED:
            return self.branch_total / self.base_time
        return None

    def limit_row(self, rate: float, compiled: bool) -> BenchRow:
        """The ``limit`` row at ``rate``: the baseline step less the expected saving."""
        saved = self.expected(rate)
        return BenchRow(Variant(VariantKind.LIMIT, rate, compiled), [self.base_time - saved],
                        limit=saved / self.base_time)

    def cost(self, name: str, k: float) -> float:
        """The (calibrated) time of ``name``'s branch on ``k`` rows."""
        curves, n = self.branches.curves, self.cfg.batch_size
        # proportional without a curve, or when the branch's rows are not the batch's
        if name not in curves or curves[name].get(n, 0.0) <= 0:
            return self.times[name] * k / n
        return self.times[name] * _interpolate(curves[name], k) / curves[name][n]

    def realised(self, runner: _Runner) -> float:
        """Seconds per step that skipping exactly the work ``runner``'s steps dropped saves."""
        order = list(named_gates(_gated(runner.model)))
        saved = [sum(self.times[g] - self.cost(g, k) for g, k in zip(order, step))
                 for step in runner.rows_run]
        return statistics.fmean(saved)

    def expected(self, rate: float) -> float:
        """Expected seconds per step that perfect skipping at ``rate`` saves."""
        b = self.branches
        per_site = dict(zip(b.names, site_rates(rate, self.cfg.distribution, b.depths, b.levels)))
        if self.cfg.mode == "sample":
            # Each row is kept with probability 1 - p: the branch runs on Binomial(n, 1 - p) rows.
            n = self.cfg.batch_size
            return sum(
                sum(math.comb(n, k) * (1 - p) ** k * p ** (n - k)
                    * (self.times[g] - self.cost(g, k)) for k in range(n + 1))
                for g, p in per_site.items())
        return limit_saving(self.times, per_site, b.chains)



def _rows_with_limits(runners: Sequence[_Runner], branches: _Branches, cfg: BenchConfig,
                      rates: Sequence[float]) -> tuple[list[BenchRow], dict[str, float]]:
    """Every row with its limit, each group's limit rows after its variants, and the eager
    group's calibrated branch times (:attr:`BenchResult.site_times`)."""
    rows: list[BenchRow] = []
    shares: dict[str, float] = {}
    for compiled in (False, True):
        members = [v for v in runners if v.spec.compiled is compiled]
        if not members:
            continue
        limits = _Limits.measured(members, branches, cfg)
        if not compiled:
            shares = limits.times
        for v in members:
            v.row.limit = limits.of(v)
            rows.append(v.row)
        rows += [limits.limit_row(r, compiled) for r in rates]
    return rows, shares
