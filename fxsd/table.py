"""Printable tables of residual sites and gates (rendered with ``tabulate``).

>>> import torchvision, fxsd
>>> print(fxsd.table(torchvision.models.resnet18(), drop_rate=0.2))  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tabulate import tabulate
from torch import nn

from fxsd.errors import InvalidTypeError
from fxsd.gate import GateInfo
from fxsd.owners import plan_owners
from fxsd.record import RejectedRecord, get_record
from fxsd.residuals import RejectedAdd, ResidualAnalysis, ResidualSite, analyze_residuals
from fxsd.schedules import Distribution, site_rates
from fxsd.training import gates as all_gates

__all__ = ["table", "summary", "SiteRow"]

SITE_HEADERS = ["depth", "gate", "skip", "branch", "nodes", "params", "side inputs"]
REJECTED_HEADERS = ["add", "kind", "module", "reason", "detail"]


@dataclass(frozen=True)
class SiteRow:
    """One site as tables and summaries see it: names and numbers only."""

    info: GateInfo
    drop_rate: float | None
    mode: str | None = None  # "block", "sample/subset", "sample/mask" (transformed models)
    scale: str | None = None
    note: str = ""


@dataclass(frozen=True)
class _Report:
    rows: list[SiteRow]
    rejected: list[RejectedRecord]
    total_flops: int | None


def _rejected_records(rejected: Sequence[RejectedAdd]) -> list[RejectedRecord]:
    return [RejectedRecord(r.name, r.add_kind, r.module_path or "<root>", r.reason, r.detail)
            for r in rejected]


def _report(
    source: Any, drop_rate: float | None, distribution: Distribution,
    example_inputs: Sequence[Any] | None,
) -> _Report:
    if isinstance(source, nn.Module):
        gates = all_gates(source)
        if gates:
            gates.sort(key=lambda g: g.info.depth)  # stable: model order within a depth
            record = get_record(source)
            rows = [SiteRow(g.info, g.drop_rate,
                            g.mode if g.mode == "block" else f"{g.mode}/{g.sample_impl}",
                            g.scale, g.note) for g in gates]
            return _Report(rows, list(record.rejected), record.total_flops)
        source = analyze_residuals(source, example_inputs)
    if isinstance(source, ResidualAnalysis):
        sites, levels = source.sites, source.num_levels
        rejected, total = _rejected_records(source.rejected), source.total_flops
        names = {id(site): owner.gate_path(i) for owner in plan_owners(source)
                 for i, site in enumerate(owner.sites)}
    elif isinstance(source, Sequence) and all(isinstance(s, ResidualSite) for s in source):
        sites, levels = list(source), max((s.depth for s in source), default=0)
        rejected, total, names = [], None, {}
    else:
        raise InvalidTypeError(
            "table() takes a model, a model returned by fxsd.stochastic_depth, a "
            f"ResidualAnalysis or a list of ResidualSite, got {type(source).__name__}"
        )
    rates: list[float | None] = [None] * len(sites)
    if drop_rate is not None:
        rates = list(site_rates(drop_rate, distribution, [s.depth for s in sites], levels))
    rows = [SiteRow(GateInfo.from_site(s, levels, names.get(id(s), "")), r)
            for s, r in zip(sites, rates)]
    return _Report(rows, rejected, total)


def _fmt_int(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


def table(
    source: Any,
    *,
    drop_rate: float | None = None,
    distribution: Distribution = "linear",
    rejected: bool = False,
    example_inputs: Sequence[Any] | None = None,
    tablefmt: str = "simple",
) -> str:
    """Render residual sites as a table, one row per site.

    Args:
        source: a model (analysed on the spot, with the gate each site would get), a model
            returned by :func:`fxsd.stochastic_depth` (its gates and their rates), a
            :class:`~fxsd.ResidualAnalysis`, or a list of :class:`~fxsd.ResidualSite`.
        drop_rate, distribution: show the rates these would give (untransformed sources).
        rejected: also list the adds that are not residual sites, with the reasons.
        example_inputs: for a model analysed on the spot: adds a FLOPs column.
        tablefmt: any ``tabulate`` format (``"github"`` for Markdown).

    Example:
        >>> import torchvision, fxsd
        >>> print(fxsd.table(torchvision.models.resnet18()).splitlines()[2])  # doctest: +SKIP
              1  add      layer1.0  identity  layer1_0_conv1 → layer1_0_bn2        5  73.9k ...
    """
    report = _report(source, drop_rate, distribution, example_inputs)
    headers = list(SITE_HEADERS)
    with_flops = any(r.info.flops is not None for r in report.rows)
    with_rates = any(r.drop_rate is not None for r in report.rows)
    if with_flops:
        headers.append("FLOPs")
    if with_rates:
        headers.append("drop rate")
    with_modes = any(r.mode not in (None, "block") or r.scale not in (None, "eval")
                     for r in report.rows)
    with_notes = any(r.note for r in report.rows)
    if with_modes:
        headers += ["mode", "scale"]
    if with_notes:
        headers.append("note")
    body = []
    for row in report.rows:
        i = row.info
        line: list[Any] = [
            i.depth, i.name or f"{i.module_path or '<root>'} ({i.add})", i.skip_kind,
            f"{i.branch_first} → {i.branch_last}", i.branch_len, _fmt_int(i.num_params),
            ", ".join(i.side_inputs) or "-",
        ]
        if with_flops:
            line.append(_fmt_int(i.flops))
        if with_rates:
            line.append("-" if row.drop_rate is None else f"{row.drop_rate:.4f}")
        if with_modes:
            line += [row.mode or "-", row.scale or "-"]
        if with_notes:
            line.append(row.note or "-")
        body.append(line)
    text = tabulate(body, headers=headers, tablefmt=tablefmt, disable_numparse=True)
    if rejected:
        rows = [(r.add, r.add_kind, r.module_path, r.reason.value, r.detail)
                for r in report.rejected]
        text += "\n\nrejected adds:\n" + (
            tabulate(rows, headers=REJECTED_HEADERS, tablefmt=tablefmt, disable_numparse=True)
            if rows else "(none)"
        )
    return text


def summary(source: Any, *, drop_rate: float | None = None,
            distribution: Distribution = "linear",
            example_inputs: Sequence[Any] | None = None) -> str:
    """One line: sites found, adds rejected, and the expected share of work dropped per step.

    The share weighs each site's drop rate by its branch's forward FLOPs when they are known
    (example inputs given) and by its parameter count otherwise.
    """
    report = _report(source, drop_rate, distribution, example_inputs)
    rows = report.rows
    n_rej = len(report.rejected)
    text = (f"{len(rows)} residual site{'s' * (len(rows) != 1)}, "
            f"{n_rej} add{'s' * (n_rej != 1)} rejected")
    if not rows or all(r.drop_rate is None for r in rows):
        return text
    by_flops = all(r.info.flops is not None for r in rows)
    weight = [(r.info.flops if by_flops else r.info.num_params) or 0 for r in rows]
    dropped = sum(w * (r.drop_rate or 0.0) for w, r in zip(weight, rows))
    share = dropped / sum(weight) if sum(weight) else 0.0
    unit = "FLOPs" if by_flops else "parameters (by count)"
    text += f"; expected branch work dropped per training step: {share:.1%} of branch {unit}"
    if by_flops and report.total_flops:
        text += f", {dropped / report.total_flops:.1%} of the model's forward FLOPs"
    return text
