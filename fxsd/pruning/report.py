""":class:`PruneReport`: what :func:`fxsd.prune` removed and what it saved, as a table.

One row per site in depth order (its depth, trained or default rate and share of the forward
FLOPs; the removed ones numbered in removal order, the others with why they could not go), then
the totals: forward FLOPs before and after, and the loss on ``data`` before and after.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tabulate import tabulate

from fxsd.analysis.node_costs import short_count
from fxsd.passes.prune_branches import unremovable
from fxsd.pruning._costs import ForwardCosts
from fxsd.runtime.gate import BranchGate

__all__ = ["PruneReport"]


@dataclass
class PruneReport:
    """What :func:`fxsd.prune` removed and what it saved; ``print(report)`` shows it as a table.

    Attributes:
        removed: the removed sites' gate names, in the order the strategy removed them.
        strategy: the strategy's name (``"sites"`` when ``sites=`` named them).
        target_saving: the target asked for (``None`` with ``sites=``).
        flops_before, flops_after: forward FLOPs of the model on the examples, every branch
            kept (what :func:`fxsd.strip` gives) and with the removed ones gone.
        loss_before, loss_after: the mean loss on ``data`` before and after (``None`` without
            ``data``).
        site_flops: each site's own forward FLOPs; ``rates``: its trained (or default) rate;
        depths: its depth; ``notes``: why a site could not be removed, where it could not.
    """

    removed: tuple[str, ...]
    strategy: str
    target_saving: float | None
    flops_before: int
    flops_after: int
    loss_before: float | None = None
    loss_after: float | None = None
    site_flops: dict[str, int] = field(default_factory=dict)
    rates: dict[str, float] = field(default_factory=dict)
    depths: dict[str, int] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)

    @property
    def saving(self) -> float:
        """The fraction of the forward FLOPs saved."""
        return 1.0 - self.flops_after / self.flops_before if self.flops_before else 0.0

    def table(self, tablefmt: str = "simple") -> str:
        """The sites in depth order (removed ones numbered in removal order), then the totals."""
        order = {name: i + 1 for i, name in enumerate(self.removed)}
        total = self.flops_before or 1
        rows = [[order.get(name, ""), name, self.depths.get(name, ""),
                 f"{self.rates.get(name, 0.0):.3g}", f"{100 * flops / total:.1f}",
                 "removed" if name in order else self.notes.get(name, "")]
                for name, flops in sorted(self.site_flops.items(),
                                          key=lambda kv: self.depths.get(kv[0], 0))]
        text = tabulate(rows, headers=["#", "site", "depth", "rate", "fwd %", ""],
                        tablefmt=tablefmt)
        how = (f"target {self.target_saving:.1%}, strategy {self.strategy!r}"
               if self.target_saving is not None else "sites named")
        text += (f"\n{len(self.removed)} of {len(self.site_flops)} sites removed ({how}): "
                 f"forward FLOPs {short_count(self.flops_before)} -> "
                 f"{short_count(self.flops_after)}, "
                 f"{self.saving:.1%} saved")
        if self.loss_before is not None:
            text += f"; loss {self.loss_before:.4g} -> {self.loss_after:.4g}"
        return text

    def __str__(self) -> str:
        return self.table()


# -- the result ----------------------------------------------------------------------------------
def _report(found: dict[str, BranchGate], costs: ForwardCosts, removed: list[str],
            strategy: str, target: float | None) -> PruneReport:
    return PruneReport(
        removed=tuple(removed), strategy=strategy, target_saving=target,
        flops_before=costs.total,
        flops_after=costs.total - round(costs.saving(removed) * costs.total),
        site_flops=dict(costs.sites), rates={n: g.drop_rate for n, g in found.items()},
        depths={n: g.info.depth for n, g in found.items()},
        notes={n: "cannot be removed" for n, g in found.items() if unremovable(g)})
