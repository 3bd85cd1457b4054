"""Printable tables of residual sites and gates (rendered with ``tabulate``).

>>> import torchvision, fxsd
>>> print(fxsd.table(torchvision.models.resnet18(), drop_rate=0.2))  # doctest: +SKIP
"""

from __future__ import annotations

import os
import shutil
import sys
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from tabulate import tabulate
from torch import nn

from fxsd.analysis.analyze import analyze_residuals
from fxsd.analysis.node_costs import short_count
from fxsd.analysis.sites import ResidualAnalysis, ResidualSite, describe_site
from fxsd.arguments import check_choice
from fxsd.decisions.budget import plan_saving, site_savings
from fxsd.decisions.distributions import Distribution, site_rates
from fxsd.decisions.owners import plan_owners
from fxsd.decisions.step_costs import count_pending
from fxsd.errors import InvalidTypeError, TraceError
from fxsd.record import RejectedAdd, get_record
from fxsd.runtime.accessors import gates as all_gates
from fxsd.runtime.gate_info import GateInfo, ShareKind

__all__ = ["table", "summary", "SiteRow", "fit_table", "fill", "terminal_width", "EMPTY",
           "LEAVE_OUT"]

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
    # expected share of a training step it saves (fxsd.decisions.budget)
    saving: float | None = None


@dataclass(frozen=True)
class _Report:
    rows: list[SiteRow]
    rejected: list[RejectedAdd]
    total_flops: int | None
    traced: tuple[str, ...] = ()  # modules traced one by one (empty: the model, whole)
    untraced: tuple[tuple[str, str, str], ...] = ()
    step_flops: int | None = None  # forward + backward FLOPs of a training step
    failure: str = ""  # why the model could not be traced (then there are no rows)
    # the expected saving (fxsd.decisions.budget): of a training step's FLOPs with step_flops
    # (fxsd.expected_saving), else of a forward's (plan_saving); None: no FLOPs to weigh by
    saving: float | None = None


def _report(
    source: Any, drop_rate: float | None, distribution: Distribution,
    example_inputs: Sequence[Any] | None,
) -> _Report:
    if isinstance(source, nn.Module):
        gates = all_gates(source)
        if gates:
            gates.sort(key=lambda g: g.info.depth)  # stable: model order within a depth
            count_pending(source)  # a transform without target_saving left them to count
            record = get_record(source)
            costed = record.step_flops is not None and all(
                g.info.step_flops is not None for g in gates)
            savings = site_savings(source) if costed else {}
            rows = [SiteRow(g.info, g.drop_rate,
                            g.mode if g.mode == "block" else f"{g.mode}/{g.sample_impl}",
                            g.scale, g.note, savings.get(g.info.name)) for g in gates]
            return _Report(rows, list(record.rejected), record.total_flops, record.traced,
                           record.untraced, record.step_flops if costed else None,
                           saving=sum(savings.values()) if costed else None)
        try:
            source = analyze_residuals(source, example_inputs)
        except TraceError as exc:  # nothing to tabulate: the table says why instead
            return _Report([], [], None, failure=str(exc))
    if isinstance(source, ResidualAnalysis):
        sites, levels = source.sites, source.num_levels
        rejected, total = list(source.rejected), source.total_flops
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
    rows = [SiteRow(describe_site(s, levels, names.get(id(s), "")), r)
            for s, r in zip(sites, rates)]
    saving = None
    if drop_rate is not None and total and all(s.flops is not None for s in sites):
        saving = plan_saving(sites, [r or 0.0 for r in rates], total)
    if isinstance(source, ResidualAnalysis) and (source.untraced or len(source.units) > 1):
        return _Report(rows, rejected, total, tuple(u.path for u in source.units),
                       tuple(source.untraced), saving=saving)
    return _Report(rows, rejected, total, saving=saving)


def _shared_row(line: list[Any], headers: list[str], join: str, info: GateInfo) -> list[Any]:
    """The row of a second join a gate's work feeds (:mod:`fxsd.analysis.shared_work`): the gate's
    depth and rate, dropped with the gate's own join."""
    row: list[Any] = ["-"] * len(line)
    row[:4] = [info.depth, f"{info.name} ({join})", "shared", f"the branch of {info.add}"]
    if "drop rate" in headers:
        at = headers.index("drop rate")
        row[at] = line[at]
    return row


def table(
    source: Any,
    *,
    drop_rate: float | None = None,
    distribution: Distribution = "linear",
    rejected: bool = False,
    example_inputs: Sequence[Any] | None = None,
    tablefmt: str = "simple",
    width: int | None = None,
) -> str:
    """Render residual sites as a table, one row per site.

    Args:
        source: a model (analysed on the spot, with the gate each site would get), a model
            returned by :func:`fxsd.stochastic_depth` (its gates and their rates), a
            :class:`~fxsd.analysis.residuals.ResidualAnalysis`, or a list of
            :class:`~fxsd.ResidualSite`.
        drop_rate, distribution: show the rates these would give (untransformed sources).
        rejected: also list the adds that are not residual sites, with the reasons.
        example_inputs: for a model analysed on the spot: adds a FLOPs column.
            A model transformed with example inputs shows ``step %`` (each site's own share of
            a training step's forward + backward FLOPs) and ``saving %`` (its expected saving at
            its current rate, :func:`fxsd.expected_saving` summed over the rows).
        tablefmt: any ``tabulate`` format (``"github"`` for Markdown).
        width: the longest a line may be: long cells are shortened with "…" (the branch column
            first, then side inputs, notes, gate names) until the table fits. ``None``: the
            terminal's width (``$COLUMNS``, else the terminal's; no limit when standard output
            is not a terminal); ``0``: no limit.

    Example:
        >>> import torchvision, fxsd
        >>> print(fxsd.table(torchvision.models.resnet18(), width=0).splitlines()[2])
        1      layer1.0.residual_gate  identity    conv1 → bn2  5      74k     -
    """
    check_tablefmt(tablefmt)
    report = _report(source, drop_rate, distribution, example_inputs)
    if not report.rows:
        return _no_sites(report, tablefmt, terminal_width() if width is None else width)
    headers = list(SITE_HEADERS)
    with_flops = any(r.info.flops is not None for r in report.rows)
    with_rates = any(r.drop_rate is not None for r in report.rows)
    if with_flops:
        headers.append("FLOPs")
    if with_rates:
        headers.append("drop rate")
    with_saving = report.step_flops is not None
    if with_saving:
        headers += ["step %", "saving %"]
    with_modes = any(r.mode not in (None, "block") or r.scale not in (None, "train")
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
            f"{i.branch_first} → {i.branch_last}", i.branch_len, short_count(i.num_params),
            ", ".join(i.side_inputs) or "-",
        ]
        if with_flops:
            line.append(short_count(i.flops))
        if with_rates:
            line.append("-" if row.drop_rate is None else f"{row.drop_rate:.4f}")
        if with_saving:
            line += [f"{100 * (i.step_flops or 0) / (report.step_flops or 1):.1f}",
                     f"{100 * (row.saving or 0.0):.2f}"]
        if with_modes:
            line += [row.mode or "-", row.scale or "-"]
        if with_notes:
            line.append(row.note or "-")
        body.append(line)
        body.extend(_shared_row(line, headers, use.name, i) for use in i.shared
                    if use.kind is ShareKind.JOIN)
    limit = terminal_width() if width is None else width
    # the gate says which block a row is: it is cut last, after less telling columns go
    shrink = [("branch", _branch), ("side inputs", _ends), ("note", _ends), (EMPTY, _ends),
              ("gate", _paths), ("note", LEAVE_OUT), ("side inputs", LEAVE_OUT), ("gate", _ends),
              # narrow terminals (40-60 columns): depth, gate, rate and saving stay longest
              *((name, LEAVE_OUT) for name in ("params", "nodes", "FLOPs", "branch", "scale",
                                               "skip", "step %", "mode"))]
    if with_saving:  # forward FLOPs say less than the step share beside them: they go first
        shrink[4:4] = [("FLOPs", LEAVE_OUT), ("nodes", LEAVE_OUT)]
    text = fit_table(body, headers, tablefmt, limit, shrink)
    if report.traced or report.untraced:
        text += "\n\n" + _units(report, tablefmt, limit)
    if rejected:
        text += "\n\n" + _rejected(report, tablefmt, limit)
    return text


def _rejected(report: _Report, tablefmt: str, width: int) -> str:
    rows = [[r.add, r.add_kind, r.module_path or "<root>", r.reason.value, r.detail]
            for r in report.rejected]
    return "rejected adds:\n" + (
        fit_table(rows, REJECTED_HEADERS, tablefmt, width,
                  [("detail", _ends), (EMPTY, _ends), ("module", _paths),
                   ("module", _ends)]) if rows
        else "(none)")


def _no_sites(report: _Report, tablefmt: str, width: int) -> str:
    """The table of a model without residual sites: why there are none — the reason tracing
    failed, or the rejected adds (always listed here) and the modules that were not traced."""
    if report.failure:
        return fill(f"no residual site: the model could not be traced. {report.failure}",
                    width)
    n = len(report.rejected)
    text = fill(f"no residual site: {n} add{'s' * (n != 1)} found, none a residual join"
                if n else "no residual site: no add was found in the traced code", width)
    if report.rejected:
        text += "\n\n" + _rejected(report, tablefmt, width)
    if report.traced or report.untraced:
        text += "\n\n" + _units(report, tablefmt, width)
    return text


def _units(report: _Report, tablefmt: str, width: int) -> str:
    """Which modules were traced one by one, and which could not be traced and why."""
    traced = ", ".join(path or "<root>" for path in report.traced) or "(none)"
    text = fill(f"traced one module at a time: {traced}", width, indent="  ")
    if report.untraced:
        rows = [[path, cls, why] for path, cls, why in report.untraced]
        text += ("\n\nnot traced (a join inside is not gated unless a module within it was "
                 "traced):\n" + fit_table(rows, ["module", "class", "why"], tablefmt, width,
                                          [("why", _ends), ("module", _paths),
                                           ("module", _ends)]))
    return text


def terminal_width() -> int:
    """The width tables are fitted to: ``$COLUMNS`` when set, else the terminal's width when
    standard output is one, else ``0`` (no limit: a file, a pipe, a notebook or a log keeps
    every name whole)."""
    if os.environ.get("COLUMNS", "").isdigit():
        return int(os.environ["COLUMNS"])
    try:
        if not os.isatty(sys.stdout.fileno()):
            return 0
    except (AttributeError, OSError, ValueError):  # replaced or closed streams (notebooks)
        return 0
    return shutil.get_terminal_size((80, 24)).columns


def fill(text: str, width: int, indent: str = "") -> str:
    """``text`` wrapped to lines of at most ``width`` characters (``0``: left as it is), later
    lines indented by ``indent``; hyphenated names (``--drop-rate``) are not broken."""
    if not width:
        return text
    return textwrap.fill(text, width, subsequent_indent=indent, break_on_hyphens=False)


#: In a ``shrink`` list of :func:`fit_table`: leave out the columns in which every cell is ``-``.
EMPTY = "<empty columns>"


def check_tablefmt(tablefmt: object) -> object:
    """``tablefmt`` if ``tabulate`` knows it (a name from ``tabulate.tabulate_formats`` or a
    ``tabulate.TableFormat``): ``tabulate`` itself falls back to ``"simple"`` without a word."""
    import tabulate as tabulate_module

    if isinstance(tablefmt, tabulate_module.TableFormat):
        return tablefmt
    check_choice(tablefmt, "tablefmt", sorted(tabulate_module.tabulate_formats))
    return tablefmt


def LEAVE_OUT(cells: list[str], n: int) -> list[str]:  # noqa: N802 (a marker, used by name)
    """In a ``shrink`` list of :func:`fit_table`: leave this column out (said under the table)."""
    raise AssertionError("fit_table handles LEAVE_OUT itself")


def fit_table(body: list[list[Any]], headers: list[str], tablefmt: str, width: int,
              shrink: Sequence[tuple[str, Callable[[list[str], int], list[str]]]]) -> str:
    """``tabulate(body, headers)``, fitted into ``width`` characters (``0``: no limit).

    Works through ``shrink`` in order until no line is too long: each named column is shortened
    (down to no less than 12 characters or its header) by its function, which gets the column's
    cells and the width to fit and returns the new cells; :func:`LEAVE_OUT` leaves the column out
    (a line under the table says so) and :data:`EMPTY` the columns in which every cell is ``-``.
    A table still too wide then loses its last columns (the first two stay), so that no line is
    longer than ``width`` whenever the first two columns fit.
    """

    def render() -> str:
        return compact_tabulate(body, headers, tablefmt)

    def keep_only(keep: list[int]) -> None:
        nonlocal body, headers
        body = [[row[j] for j in keep] for row in body]
        headers = [headers[j] for j in keep]

    text = render()
    left_out: list[str] = []
    for column, cut in shrink if width > 0 else ():
        excess = _widest(text) - width
        if excess <= 0:
            break
        if column == EMPTY:
            keep_only([j for j in range(len(headers))
                       if not body or any(str(row[j]) != "-" for row in body)])
        elif column in headers and cut is LEAVE_OUT:
            left_out.append(column)
            keep_only([j for j in range(len(headers)) if headers[j] != column])
        elif column in headers:
            j = headers.index(column)
            longest = max((len(str(row[j])) for row in body), default=0)
            target = max(longest - excess, len(column), 12)
            if target >= longest:
                continue
            cells = cut([str(row[j]) for row in body], target)
            body = [[*row[:j], cell, *row[j + 1:]] for row, cell in zip(body, cells)]
        text = render()
    while width > 0 and _widest(text) > width and len(headers) > 2:
        left_out.append(headers[-1])  # still too wide: the last columns go, the first two stay
        keep_only(list(range(len(headers) - 1)))
        text = render()
    if left_out:
        text += "\n" + fill(f"({', '.join(left_out)} left out to fit {width} columns; "
                            "--wide or width=0 shows every column)", width)
    return text


def compact_tabulate(body: list[list[Any]], headers: list[str], tablefmt: str) -> str:
    """``tabulate`` without the two spaces it adds to every header's width: a table of short
    numbers under longer headers (``depth``, ``drop rate``) otherwise spends a dozen characters
    of an 80-column terminal on nothing, and the gate paths get cut instead."""
    import tabulate as tabulate_module

    padding = tabulate_module.MIN_PADDING
    tabulate_module.MIN_PADDING = 0
    try:
        return tabulate(body, headers=headers, tablefmt=tablefmt, disable_numparse=True)
    finally:
        tabulate_module.MIN_PADDING = padding


def _widest(text: str) -> int:
    return max((len(line) for line in text.splitlines()), default=0)


def _branch(cells: list[str], n: int) -> list[str]:
    """``first → last`` in at most ``n`` characters: each end shortened, the arrow kept."""
    return [_one_branch(text, n) for text in cells]


def _one_branch(text: str, n: int) -> str:
    if len(text) <= n or " → " not in text:
        return _end(text, n)
    first, last = text.split(" → ", 1)
    room = n - 3
    a = min(len(first), max(room // 2, room - len(last)))
    return f"{_end(first, a)} → {_end(last, room - a)}"


def _ends(cells: list[str], n: int) -> list[str]:
    return [_end(text, n) for text in cells]


def _end(text: str, n: int) -> str:
    return text if len(text) <= n else text[:n - 1] + "…"


def _paths(cells: list[str], n: int) -> list[str]:
    """Dotted paths shortened towards ``n`` characters without losing which module they name:
    from the left, atoms before the last are cut to their initial and trailing number
    (``encoder.layers.encoder_layer_11.mlp_gate`` → ``e.l.e11.mlp_gate``), the same atoms in every
    row so that rows stay comparable; then a gate's ``_gate`` suffix goes (the column says it).
    Cells may stay longer than ``n``: cutting their end is a later, separate step."""
    split = [text.split(".") for text in cells]

    def fits() -> bool:
        return all(len(".".join(atoms)) <= n for atoms in split)

    for i in range(max((len(atoms) for atoms in split), default=1) - 1):
        if fits():
            break
        for atoms in split:
            if i < len(atoms) - 1 and not atoms[i].isdigit():
                digits = atoms[i][len(atoms[i].rstrip("0123456789")):]
                atoms[i] = atoms[i][:1] + digits
    if not fits():
        for atoms in split:
            atoms[-1] = atoms[-1].removesuffix("_gate") or atoms[-1]
    return [".".join(atoms) for atoms in split]


def summary(source: Any, *, drop_rate: float | None = None,
            distribution: Distribution = "linear",
            example_inputs: Sequence[Any] | None = None) -> str:
    """One line: sites found, adds rejected, and the expected saving of the drops.

    The saving is :mod:`fxsd.decisions.budget`'s one computation, nested sites counted once
    (a site is skipped when its own gate or one around it drops). For a gated model with step
    costs it is :func:`fxsd.expected_saving`: a share of a training step's forward + backward
    FLOPs. For a plan (an untransformed model and a ``drop_rate``) with example inputs it is
    :func:`~fxsd.decisions.budget.plan_saving`, said as such: a share of a forward's FLOPs
    (the backward is counted on a gated model only). Without FLOPs, no saving is printed.
    """
    report = _report(source, drop_rate, distribution, example_inputs)
    if report.failure:
        return f"0 residual sites: the model could not be traced ({report.failure.splitlines()[0]})"
    rows = report.rows
    n_rej = len(report.rejected)
    text = (f"{len(rows)} residual site{'s' * (len(rows) != 1)}, "
            f"{n_rej} add{'s' * (n_rej != 1)} rejected")
    if report.saving is not None and report.step_flops is not None:
        text += (f"; expected saving per training step: {report.saving:.1%} of its FLOPs "
                 f"(forward + backward, {short_count(report.step_flops)})")
    elif report.saving is not None:
        text += (f"; expected saving per forward: {report.saving:.1%} of its FLOPs (forward "
                 f"only, {short_count(report.total_flops)})")
    if _saves_nothing(rows):
        text += ("; no compute saved: every gated branch runs in sample mode with the mask "
                 "(its branch mixes batch rows, see the note column), which computes every "
                 "row; mode='block' skips whole branches")
    return text


def _saves_nothing(rows: Sequence[SiteRow]) -> bool:
    """Whether the gates of a transformed model are all sample-mode masks (which compute every
    row), none that could skip work dropping (:class:`fxsd.errors.NoSavingWarning` says the
    same)."""
    masked = [r for r in rows if r.mode == "sample/mask"]
    return bool(masked) and not any(r.mode != "sample/mask" and (r.drop_rate or 0) > 0
                                    for r in rows)
