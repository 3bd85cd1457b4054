"""``fxsd bench --prune S``: how much faster is the model :func:`fxsd.prune` gives, at inference?

One run builds the model and its input batch exactly as ``fxsd bench`` does (same model spec,
batch, image size, seed, device, memory format), prunes it with
``fxsd.prune(model, S, example_inputs=(x,))`` (strategy ``"rates"``: on a plain model the deepest
sites first), and times forward passes of the plain model and the pruned one side by side: in
eval under ``torch.no_grad``, one pass of each in turn after a warm-up, with ``fxsd bench``'s own
loop (:func:`fxsd.tools.bench._warm_up`, :func:`fxsd.tools.bench._time_steps`). ``compile=True``
adds both under ``torch.compile``, each compared with the compiled plain model.

Beside the times stand the forward FLOPs of both models on the same batch, measured with
``torch.utils.flop_counter.FlopCounterMode`` (not the estimate :func:`fxsd.prune` chose by), their
ratio and the sites removed. Times are reported as ``fxsd bench`` reports them (mean, median,
interquartile range); the time ratio and saving use **medians**: an inference pass has no random
drops to average over, and the median resists a busy machine's outliers.

>>> from fxsd.tools import bench_prune
>>> result = bench_prune.run("resnet50", 0.25, batch_size=8, image_size=128,
...                          steps=10)  # doctest: +SKIP
>>> print(bench_prune.format_table(result))  # doctest: +SKIP
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from fxsd.analysis.node_costs import short_count
from fxsd.arguments import check_rate
from fxsd.pruning.prune import prune
from fxsd.pruning.report import PruneReport
from fxsd.tools._bench_step import _autocast
from fxsd.tools._bench_types import BenchConfig, BenchRow, Variant, VariantKind
from fxsd.tools._progress import Progress
from fxsd.tools.bench import _checked, _machine, _model_and_input, _time_steps, _warm_up
from fxsd.tools.tables import LEAVE_OUT, _ends, fill, fit_table, terminal_width

__all__ = ["PruneBenchResult", "run", "format_table", "forward_flops"]

HEADERS = ["variant", "saving target", "mean ms", "median ms", "IQR ms", "ratio", "saving %",
           "fwd FLOPs", "FLOP ratio"]


@dataclass
class PruneBenchResult:
    """One ``fxsd bench --prune`` run: the plain and pruned rows (and their compiled twins),
    the forward FLOPs of both measured on the input, what :func:`fxsd.prune` removed."""

    config: BenchConfig
    target_saving: float
    rows: list[BenchRow]
    flops_plain: int
    flops_pruned: int
    report: PruneReport = field(repr=False)
    machine: dict[str, str]
    warnings: list[str] = field(default_factory=list)

    @property
    def flop_ratio(self) -> float:
        """The pruned model's forward FLOPs over the plain model's, on the benchmark's input."""
        return self.flops_pruned / self.flops_plain if self.flops_plain else 1.0

    def row(self, kind: VariantKind, compiled: bool = False) -> BenchRow:
        """The plain (``VariantKind.BASELINE``) or ``PRUNED`` row, eager or compiled."""
        return next(r for r in self.rows if r.kind is kind and r.spec.compiled is compiled)

    def time_ratio(self, compiled: bool = False) -> float:
        """The pruned model's median time over the plain model's."""
        return (self.row(VariantKind.PRUNED, compiled).median
                / self.row(VariantKind.BASELINE, compiled).median)

    def to_dict(self) -> dict[str, Any]:
        cfg = self.config
        config = {k: v for k, v in asdict(cfg).items()
                  if k not in ("drop_rates", "distribution", "mode", "branch_reps")}
        return {
            "config": {**config, "prune": self.target_saving, "strategy": "rates"},
            "machine": self.machine,
            "warnings": self.warnings,
            "flops_plain": self.flops_plain, "flops_pruned": self.flops_pruned,
            "flop_ratio": self.flop_ratio,
            "removed": list(self.report.removed), "sites": len(self.report.site_flops),
            "rows": [{"variant": r.variant, "group": r.group, "mean_ms": r.mean * 1e3,
                      "median_ms": r.median * 1e3, "iqr_ms": r.spread * 1e3,
                      "min_ms": min(r.times) * 1e3, "max_ms": max(r.times) * 1e3,
                      "ratio": r.median / self._base(r).median, "steps": len(r.times)}
                     for r in self.rows],
        }

    def _base(self, row: BenchRow) -> BenchRow:
        return self.row(VariantKind.BASELINE, row.spec.compiled)


class _Inference:
    """One model's forward in eval under ``torch.no_grad``: what :class:`fxsd.tools.bench._Runner`
    is
    to a training step, so that ``fxsd bench``'s warm-up and interleaved timing loop run it."""

    gates: tuple[()] = ()  # no gate: the timing loop records no dropped rows

    def __init__(self, spec: Variant, model: nn.Module, cfg: BenchConfig) -> None:
        self.row = BenchRow(spec, [])
        self.model: Any = model.eval()
        if spec.compiled:
            self.model = torch.compile(model, backend=cfg.compile_backend)
        self.cfg = cfg

    @property
    def spec(self) -> Variant:
        return self.row.spec

    def step(self, x: torch.Tensor) -> None:
        with torch.no_grad(), _autocast(self.cfg):
            self.model(x)


def forward_flops(model: nn.Module, x: torch.Tensor) -> int:
    """The FLOPs of ``model``'s forward on ``x`` in eval, as ``FlopCounterMode`` counts them.

    Autograd stays on while counting (as :func:`fxsd.prune` counts): under ``no_grad`` an
    ``nn.MultiheadAttention`` takes a fused kernel that ``FlopCounterMode`` counts as 0.
    """
    from torch.utils.flop_counter import FlopCounterMode

    model.eval()
    with FlopCounterMode(display=False) as counter:
        model(x)
    return int(counter.get_total_flops())


def run(model: str = "resnet50", saving: float = 0.25, *, batch_size: int = 16,
        image_size: int | None = None, steps: int = 20, warmup: int = 3, device: str = "cpu",
        amp: str | None = None, channels_last: bool = False, seed: int = 0,
        compile: bool = False,  # noqa: A002 - the CLI's --compile
        compile_backend: str = "inductor", progress: bool | None = None) -> PruneBenchResult:
    """Prune ``model`` by ``saving`` of its forward FLOPs and time both models' inference.

    Args:
        model: a model spec, as :func:`fxsd.tools.bench.run` takes
        (:func:`fxsd.tools.models.load_model`). saving: ``fxsd.prune``'s ``target_saving``, a
        fraction in [0, 1]. batch_size, image_size, steps, warmup, device, amp, channels_last, seed,
        compile,
            compile_backend, progress: as for :func:`fxsd.tools.bench.run`; ``steps`` are timed
            forward passes per model (interleaved), ``warmup`` untimed ones.

    Raises:
        InvalidArgumentError: a bad value, or a ``saving`` out of the model's reach (the
            message names the most it can save).
    """
    target = check_rate(saving, "saving")
    cfg = BenchConfig(model, batch_size=batch_size, image_size=image_size, steps=steps,
                      warmup=warmup, device=device, amp=amp, channels_last=channels_last,
                      seed=seed, compile=compile, compile_backend=compile_backend)
    _, dev = _checked(cfg)
    report = Progress(progress, "[fxsd bench --prune]")
    plain, x = _model_and_input(cfg, dev)
    plain.eval()
    report.say(f"pruning {cfg.model} by {target:g} of its forward FLOPs (strategy 'rates')")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the analysis's notes on adds it does not gate
        pruned, pruned_report = prune(plain, target, example_inputs=(x,), return_report=True,
                                      progress=False)
    flops = forward_flops(plain, x), forward_flops(pruned, x)
    runners = [_Inference(Variant(kind, None if kind is VariantKind.BASELINE else target,
                                  compiled=compiled),
                          plain if kind is VariantKind.BASELINE else pruned, cfg)
               for compiled in ((False, True) if cfg.compile else (False,))
               for kind in (VariantKind.BASELINE, VariantKind.PRUNED)]
    try:
        _warm_up(runners, x, cfg, report)  # type: ignore[arg-type]  # duck-typed runners
        _time_steps(runners, x, cfg, dev, report)  # type: ignore[arg-type]
    except KeyboardInterrupt:
        report.close()  # the bars go before the interrupted message
        raise
    result = PruneBenchResult(cfg, target, [r.row for r in runners], *flops, pruned_report,
                              _machine(dev))
    result.warnings = _noise(result)
    return result


def _noise(result: PruneBenchResult) -> list[str]:
    """A time saving smaller than the plain model's own spread: the machine's noise may have
    made it up (or hidden it)."""
    found = []
    for compiled in sorted({r.spec.compiled for r in result.rows}):
        base, pruned = (result.row(k, compiled) for k in (VariantKind.BASELINE,
                                                          VariantKind.PRUNED))
        effect = abs(base.median - pruned.median)
        if base.spread > effect:
            found.append(f"{pruned.variant}: its {effect * 1e3:.2f} ms difference from the plain "
                         f"model is smaller than the plain model's own spread "
                         f"({base.spread * 1e3:.2f} ms IQR): rerun on an idle machine, with more "
                         "--steps")
    return found


def format_table(result: PruneBenchResult, tablefmt: str = "simple",
                 width: int | None = None) -> str:
    """The run as ``fxsd bench``'s table: a line on the setting, one row per model (ratio and
    saving from medians, against the plain model of the row's group), the sites removed and any
    noise warning. ``width`` as for :func:`fxsd.tools.bench.format_table`."""
    cfg, m = result.config, result.machine
    size = cfg.image_size or (32 if cfg.model.startswith("cifar") else 64)
    head = (f"{cfg.model}, batch {cfg.batch_size}, {size}x{size}, forward in eval under "
            f"torch.no_grad, {len(result.rows[0].times)} timed passes per model (interleaved, "
            f"after {cfg.warmup} warm-up), {m['device']}, torch {m['torch']}, {m['threads']} "
            "threads" + (f"; compiled rows: torch.compile(backend={cfg.compile_backend!r})"
                         if cfg.compile else ""))
    body = [_cells(result, r) for r in result.rows]
    limit = terminal_width() if width is None else width
    # narrow terminals: the median, the saving and the FLOP ratio stay longest
    shrink = [("mean ms", LEAVE_OUT), ("fwd FLOPs", LEAVE_OUT), ("ratio", LEAVE_OUT),
              ("variant", _ends), ("IQR ms", LEAVE_OUT), ("saving target", LEAVE_OUT)]
    table = fit_table(body, HEADERS, tablefmt, limit, shrink)
    rep = result.report
    removed = ", ".join(name.removesuffix(".residual_gate") for name in rep.removed)
    lines = [f"fxsd.prune(strategy='rates') removed {len(rep.removed)} of "
             f"{len(rep.site_flops)} sites: {removed or 'none'}",
             f"forward FLOPs (FlopCounterMode, this batch): {short_count(result.flops_plain)} -> "
             f"{short_count(result.flops_pruned)}, ratio {result.flop_ratio:.3f}"]
    lines += [f"warning: {w}" for w in result.warnings]
    return "\n".join([fill(head, limit, indent="  "), table,
                      *(fill(line, limit, indent="  ") for line in lines)])


def _cells(result: PruneBenchResult, r: BenchRow) -> list[str]:
    base = result._base(r).median
    pruned = r.kind is VariantKind.PRUNED
    flops = result.flops_pruned if pruned else result.flops_plain
    return [r.variant, f"{r.drop_rate:g}" if pruned else "-", f"{r.mean * 1e3:.2f}",
            f"{r.median * 1e3:.2f}", f"{r.spread * 1e3:.2f}", f"{r.median / base:.3f}",
            f"{(1 - r.median / base) * 100:+.1f}", short_count(flops),
            f"{(result.flop_ratio if pruned else 1.0):.3f}"]
