"""``fxsd bench``'s table, and the warnings that say when a busy machine may have made a row up.

:func:`format_table` renders a :class:`~fxsd.tools._bench_types.BenchResult` fitted to the terminal
as :func:`fxsd.table` does (:func:`fxsd.tools.tables.fit_table`): all-``-`` columns, then the
redundant ones are left out and variant names shortened. :func:`noise_warnings` flags an fxsd
saving smaller than the baseline's own spread, or an efficiency outside [0, 1.1].
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from fxsd.tools._bench_types import BenchResult, BenchRow, VariantKind
from fxsd.tools.tables import EMPTY, LEAVE_OUT, _ends, fill, fit_table, terminal_width

__all__ = ["HEADERS", "format_table", "noise_warnings"]



HEADERS = ["variant", "drop rate", "mean ms", "median ms", "IQR ms", "ratio", "saving %",
           "FLOP saving %", "limit %", "efficiency", "act. MiB", "peak MiB"]



def noise_warnings(result: BenchResult) -> list[str]:
    """What in ``result`` the machine's noise may have made up: an fxsd saving smaller than the
    baseline's own spread, or an efficiency outside [0, 1.1]."""
    found = []
    for r in result.rows:
        if r.kind in (VariantKind.BASELINE, VariantKind.LIMIT):
            continue
        base = result.base(r.group)
        effect = abs(base.mean - r.mean)
        if base.spread > effect and r.kind is VariantKind.FXSD:
            found.append(f"{r.variant} at {r.drop_rate:g}: its {effect * 1e3:.1f} ms difference "
                         f"from the baseline is smaller than the baseline's own spread "
                         f"({base.spread * 1e3:.1f} ms IQR)")
        if r.limit and r.kind is VariantKind.FXSD:
            efficiency = (1.0 - r.mean / base.mean) / r.limit
            if not 0.0 <= efficiency <= 1.1:
                found.append(f"{r.variant} at {r.drop_rate:g}: efficiency {efficiency:.2f} is "
                             "outside [0, 1.1]")
    if found:
        found.append("the machine was likely busy: rerun on an idle machine, with more --steps")
    return found



def format_table(result: BenchResult, tablefmt: str = "simple", width: int | None = None) -> str:
    """The benchmark as a table; ratio and saving use means (the random saving settles on them).

    ``width``: the longest a line may be, as for :func:`fxsd.table`: columns that are all ``-``
    (``peak MiB`` on a CPU), then ``median ms`` and ``ratio`` (the same as ``saving %``) are left
    out, variant names shortened and ``peak MiB``, ``act. MiB`` and ``FLOP saving %`` left out
    until the table fits, and the text
    around it is wrapped. ``None``: the terminal's width (no limit when standard output is not a
    terminal); ``0``: no limit.
    """
    body = [_cells(r, result.base(r.group).mean) for r in result.rows]
    cfg = result.config
    head = (f"{cfg.model}, batch {cfg.batch_size}, {cfg.mode} mode, {cfg.distribution} rates, "
            f"{len(result.rows[0].times)} timed steps per variant (interleaved, after "
            f"{cfg.warmup} warm-up), {result.machine['device']}, torch {result.machine['torch']}, "
            f"{result.machine['threads']} threads"
            + (f"; compiled rows: torch.compile(backend={cfg.compile_backend!r}) vs compiled "
               "baseline" if cfg.compile else ""))
    limit = terminal_width() if width is None else width
    shrink = [(EMPTY, _ends), ("median ms", LEAVE_OUT), ("ratio", LEAVE_OUT),
              ("variant", _short_variants(result.rows)), ("peak MiB", LEAVE_OUT),
              ("act. MiB", LEAVE_OUT), ("FLOP saving %", LEAVE_OUT), ("variant", _ends),
              # narrow terminals (40-60 columns): what ran, its rate, its saving stay longest
              ("IQR ms", LEAVE_OUT), ("limit %", LEAVE_OUT), ("mean ms", LEAVE_OUT),
              ("efficiency", LEAVE_OUT)]
    table = fit_table(body, HEADERS, tablefmt, limit, shrink)
    lines = [fill(f"sync check: {result.sync_check}", limit, indent="  ")]
    lines += [fill(f"warning: {w}", limit, indent="  ") for w in result.warnings]
    return "\n".join([fill(head, limit, indent="  "), table, *lines])



def _cells(r: BenchRow, base: float) -> list[str]:
    """``r``'s line of the table, against its group's baseline step time ``base``."""
    saving = 1.0 - r.mean / base
    if r.kind is VariantKind.LIMIT:
        eff = "1.000"
    elif not r.limit or r.kind is VariantKind.BASELINE:
        eff = "-"
    else:
        eff = f"{saving / r.limit:.3f}"
    return [
        r.variant, "-" if r.drop_rate is None else f"{r.drop_rate:g}",
        f"{r.mean * 1e3:.1f}", f"{r.median * 1e3:.1f}",
        "-" if r.kind is VariantKind.LIMIT else f"{r.spread * 1e3:.1f}", f"{r.mean / base:.3f}",
        f"{saving * 100:+.1f}",
        "-" if r.flop_saving is None else f"{r.flop_saving * 100:.1f}",
        "-" if r.limit is None else f"{r.limit * 100:.1f}", eff,
        "-" if r.activation_bytes is None else f"{r.activation_bytes / 2**20:.1f}",
        "-" if r.peak_bytes is None else f"{r.peak_bytes / 2**20:.0f}",
    ]



def _short_variants(rows: Sequence[BenchRow]) -> Callable[[list[str], int], list[str]]:
    """The ``variant`` column's shortening for :func:`fit_table`: ``rows``' names in fewer
    characters, each still telling what ran (:meth:`Variant.short_label`), ``compiled`` cut to
    ``comp.`` only when that is still too long; ``_ends`` then cuts what is still too long."""

    def shorten(cells: list[str], n: int) -> list[str]:
        # the cells are the rows' labels, in order: fit_table has not cut this column yet
        short = [r.spec.short_label(short_compiled=False) for r in rows]
        if any(len(cell) > n for cell in short):
            short = [r.spec.short_label(short_compiled=True) for r in rows]
        return short

    return shorten
