"""``fxsd bench``: time training steps of fxsd against the baseline, drop path and the limit.

One run builds these variants of one model, all on the same machine and inputs:

* ``baseline`` — the untransformed model;
* ``fxsd p=0`` — the gated model that never drops (the gates' own overhead);
* ``fxsd`` — the gated model at each requested rate (and, in sample mode, ``fxsd (mask)``: the
  same with ``sample_impl="mask"``);
* ``mask drop path`` — the model with torchvision's ``StochasticDepth(p, "row")`` on every branch
  output at the same per-site rates (what users run today: the branch is computed anyway);
* ``every site dropped`` — the gated model with every rate at 1;
* ``limit`` — the step time perfect skipping would give at each rate.

``compile=True`` adds ``compiled`` baseline, ``fxsd p=0``, ``fxsd`` and ``every site dropped``
rows, compared with the compiled baseline. Each row is a :class:`Variant`, a
:class:`VariantKind` with its rate and whether it is compiled: code tells rows apart by kind, and
:attr:`Variant.label` is only the name that tables and JSON show.

The limit comes from measured times, not FLOPs: the branches' total time is the baseline step
minus the every-site-dropped step, and it is shared out between sites in proportion to each
branch's own forward + backward time, measured in isolation on the inputs it sees in the model.
For the fxsd rows the limit is *realised*: it counts the work the run actually skipped, step by
step, so ``efficiency = saving / limit`` is free of the sampling noise of the drop decisions. In
sample mode a branch that ran on ``k`` of ``n`` rows saved ``t(n) - t(k)``, with ``t(k)`` measured
at every row count that occurred (a branch's time is far from linear in its rows on small
batches), not assumed to be ``t(n)·(n - k)/n``.

Beside the measured time saving, ``FLOP saving %`` is the saving the FLOPs predict
(:func:`fxsd.expected_saving`: late low-resolution blocks and long-sequence attention cost more
or less time than their FLOPs say), and ``act. MiB`` (JSON: ``activation_bytes``) the mean bytes
autograd saved for backward per step — each storage once, parameters left out — counted with
``torch.autograd.graph.saved_tensors_hooks`` in as many untimed steps after the timed ones (exact
on any device; the CUDA peak stays in ``peak MiB``).

Variants run interleaved (one step of each in turn) after a warm-up; drop decisions come from a
fixed seed, so reruns skip the same branches. Every row reports the spread of its step times
(interquartile range); :attr:`BenchResult.warnings` says when the baseline's spread is larger than
an effect the table reports, or an efficiency lies outside [0, 1.1] — signs of a busy machine.

This module is the runner; the rest of the bench lives beside it: the rows and result in
:mod:`fxsd.tools._bench_types`, one variant's step in :mod:`fxsd.tools._bench_step`, the limit in
:mod:`fxsd.tools._bench_limit`, activation counting in :mod:`fxsd.tools._bench_memory`, the table in
:mod:`fxsd.tools._bench_report` and ``fxsd bench --transform`` in :mod:`fxsd.tools.bench_transform`.
"""

from __future__ import annotations

import copy
import platform
import time
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from fxsd.analysis.analyze import analyze_residuals
from fxsd.arguments import check_rate
from fxsd.decisions.budget import expected_saving
from fxsd.decisions.distributions import site_rates
from fxsd.decisions.step_costs import record_step_costs
from fxsd.errors import InvalidArgumentError, NoSavingWarning
from fxsd.passes.mask_drop_path import add_mask_drop_paths

# docs/api.md documents fxsd.tools.bench.format_table and fxsd.tools.bench.transform_times under
# this path, the benchmark's public one: they are re-exported (marked F401).
from fxsd.tools._bench_limit import (
    _measure_branches,
    _rows_with_limits,
    exclusive_times,
    gate_ancestors,
    limit_saving,
    site_times,
)
from fxsd.tools._bench_memory import _count_activations
from fxsd.tools._bench_report import format_table, noise_warnings  # noqa: F401
from fxsd.tools._bench_step import _find, _gated, _rows_needed, _Runner, _sync
from fxsd.tools._bench_types import BenchConfig, BenchResult, BenchRow, Variant, VariantKind
from fxsd.tools._progress import Progress
from fxsd.tools.bench_transform import transform_times  # noqa: F401
from fxsd.tools.models import load_model
from fxsd.transform import stochastic_depth

if TYPE_CHECKING:
    from fxsd.analysis.sites import ResidualAnalysis

__all__ = ["BenchConfig", "Variant", "VariantKind", "BenchRow", "BenchResult", "run",
           "format_table", "site_times", "exclusive_times", "gate_ancestors", "limit_saving",
           "transform_times", "Interrupted", "Progress", "check_device", "available_devices"]



class Interrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`run`: ``result`` holds the steps timed so far, every variant cut to
    the same number of steps, with no limits (``None`` when no step had been timed), and
    ``message`` says how far the run got. A ``KeyboardInterrupt``, so that code that does not
    know it stops as usual."""

    def __init__(self, result: BenchResult | None, message: str) -> None:
        super().__init__(message)
        self.result = result
        self.message = message



def available_devices() -> list[str]:
    """The device types :func:`run` can use here: ``cpu``, ``cuda`` and ``mps`` when torch has
    them."""
    found = ["cpu"]
    if torch.cuda.is_available():
        found.append("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        found.append("mps")
    return found



def check_device(device: object) -> torch.device:
    """``device`` as a ``torch.device`` this machine has (``"cpu"``, ``"cuda"``, ``"cuda:1"``,
    ``"mps"``), else an :class:`~fxsd.InvalidArgumentError` naming the ones it has."""
    available = available_devices()
    accepted = f"use one of {', '.join(available)}"
    try:
        found = torch.device(device)  # type: ignore[arg-type]
    except (RuntimeError, TypeError, ValueError) as exc:
        raise InvalidArgumentError(f"unknown device {device!r}: {accepted}") from exc
    if found.type not in available:
        raise InvalidArgumentError(f"device {device!r} is not available here: {accepted}")
    if found.type == "cuda" and found.index is not None \
            and found.index >= torch.cuda.device_count():
        raise InvalidArgumentError(
            f"device {device!r}: torch sees {torch.cuda.device_count()} CUDA devices")
    return found



def run(
    model: str = "resnet50",
    *,
    drop_rates: Sequence[float] = (0.5,),
    distribution: str = "linear",
    mode: str = "block",
    batch_size: int = 16,
    image_size: int | None = None,
    steps: int = 20,
    warmup: int = 3,
    device: str = "cpu",
    amp: str | None = None,
    channels_last: bool = False,
    seed: int = 0,
    branch_reps: int = 5,
    compile: bool = False,  # noqa: A002 - the CLI's --compile
    compile_backend: str = "inductor",
    progress: bool | None = None,
) -> BenchResult:
    """Run the benchmark and return its measurements (see the module docstring).

    Args:
        model: a model spec (:func:`fxsd.tools.models.load_model`): ``cifar_resnet<depth>``, a
            torchvision name or ``package.module:callable``.
        drop_rates, distribution, mode: the fxsd rows' rates and mode.
        batch_size, image_size: the input (``image_size=None``: 32 for CIFAR models, else 64).
        steps, warmup: timed and untimed steps per variant (variants interleaved).
        device, amp, channels_last: where and how (``amp``: ``"bf16"`` or ``"fp16"``).
        seed: seeds the model, the input and every gated variant's decisions.
        branch_reps: repetitions when timing each branch alone (for the limit).
        compile, compile_backend: add ``torch.compile`` rows (compiled baseline, ``fxsd.compile``).
        progress: report progress on stderr (``None``: when stderr is a terminal).

    Example:
        >>> from fxsd.tools import bench
        >>> result = bench.run("cifar_resnet20", steps=5, batch_size=8)  # doctest: +SKIP
        >>> print(bench.format_table(result))  # doctest: +SKIP
    """
    cfg = BenchConfig(model, tuple(drop_rates), distribution, mode, batch_size, image_size,
                      steps, warmup, device, amp, channels_last, seed, branch_reps, compile,
                      compile_backend)
    return _run(cfg, Progress(progress))



def _run(cfg: BenchConfig, report: Progress) -> BenchResult:
    """Build the variants, warm them up, time them interleaved, then work out the limits.
    Ctrl-C raises :class:`Interrupted` with what was timed so far."""
    rates, device = _checked(cfg)
    runners: list[_Runner] = []
    try:
        base, x = _model_and_input(cfg, device)
        analysis = analyze_residuals(base)
        if not analysis.sites:
            raise InvalidArgumentError(f"{cfg.model} has no residual site to benchmark")
        report.say(f"building the variants of {cfg.model} ({len(analysis.sites)} sites)")
        runners += _variants(cfg, base, rates, analysis)
        _expected_flop_savings(runners, x)
        _warm_up(runners, x, cfg, report)
        sync_check = "not run (CPU)"
        if device.type == "cuda":
            sync_check = _sync_check(_find(runners, VariantKind.FXSD), x)
        _time_steps(runners, x, cfg, device, report)
        _count_activations(runners, x, cfg, report)
        report.say("timing each branch alone, for the limit")
        branches = _measure_branches(runners, x, cfg, analysis)
        rows, shares = _rows_with_limits(runners, branches, cfg, rates)
    except KeyboardInterrupt:
        report.close()
        raise _interrupted(cfg, runners, device) from None
    result = BenchResult(cfg, rows, shares, _machine(device), sync_check)
    result.warnings = noise_warnings(result)
    return result



def _interrupted(cfg: BenchConfig, runners: Sequence[_Runner], device: torch.device
                 ) -> Interrupted:
    """What Ctrl-C leaves: every variant's first ``k`` timed steps (``k``: the fewest any
    variant completed), without limits, which are measured after the timed steps."""
    done = min((len(v.row.times) for v in runners), default=0)
    if not done:
        return Interrupted(None, "before any step was timed")
    rows = []
    for v in runners:
        v.row.times = v.row.times[:done]
        v.row.limit = None
        rows.append(v.row)
    message = (f"after {done} of {cfg.steps} timed steps per variant; the limit and efficiency "
               "columns are measured after them and are missing")
    result = BenchResult(cfg, rows, {}, _machine(device),
                         "not run (interrupted)" if device.type == "cuda" else "not run (CPU)")
    result.warnings = [f"interrupted (Ctrl-C) {message}", *noise_warnings(result)]
    return Interrupted(result, message)



def _checked(cfg: BenchConfig) -> tuple[tuple[float, ...], torch.device]:
    """The checked drop rates and device; ``cfg.amp`` becomes a torch dtype name."""
    rates = tuple(check_rate(r) for r in cfg.drop_rates)
    if cfg.steps < 1 or cfg.warmup < 0 or cfg.batch_size < 1:
        raise InvalidArgumentError("steps and batch_size must be positive, warmup non-negative")
    if cfg.mode not in ("block", "sample"):
        raise InvalidArgumentError(f"unknown mode {cfg.mode!r}: use 'block' or 'sample'")
    device = check_device(cfg.device)
    if cfg.compile and cfg.compile_backend not in torch._dynamo.list_backends(exclude_tags=()):
        raise InvalidArgumentError(
            f"unknown compile_backend {cfg.compile_backend!r}: use one of "
            f"{', '.join(torch._dynamo.list_backends(exclude_tags=()))}")
    if cfg.amp not in (None, "bf16", "bfloat16", "fp16", "float16"):
        raise InvalidArgumentError(f"unknown --amp {cfg.amp!r}: use bf16 or fp16")
    if cfg.amp:
        cfg.amp = {"bf16": "bfloat16", "fp16": "float16"}.get(cfg.amp, cfg.amp)
    return rates, device



def _model_and_input(cfg: BenchConfig, device: torch.device) -> tuple[nn.Module, torch.Tensor]:
    """The model and a random input batch, seeded by ``cfg.seed``, on ``device``."""
    torch.manual_seed(cfg.seed)
    size = cfg.image_size or (32 if cfg.model.startswith("cifar") else 64)
    base = load_model(cfg.model, size)
    x = torch.randn(cfg.batch_size, 3, size, size)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    return base.to(device, memory_format=memory_format), x.to(device, memory_format=memory_format)



def _variant_specs(cfg: BenchConfig, rates: Sequence[float]) -> list[Variant]:
    """The variants one run times, in the table's order (the limit rows come after timing)."""
    kind = VariantKind
    eager = [Variant(kind.BASELINE), Variant(kind.OVERHEAD, 0.0)]
    for r in rates:
        eager.append(Variant(kind.FXSD, r))
        if cfg.mode == "sample":
            eager.append(Variant(kind.FXSD, r, mask_impl=True))
    eager += [Variant(kind.MASK_DROP_PATH, r) for r in rates]
    eager.append(Variant(kind.ALL_DROPPED, 1.0))
    if not cfg.compile:
        return eager
    compiled = [Variant(kind.BASELINE, compiled=True), Variant(kind.OVERHEAD, 0.0, compiled=True),
                *(Variant(kind.FXSD, r, compiled=True) for r in rates),
                Variant(kind.ALL_DROPPED, 1.0, compiled=True)]
    return eager + compiled



def _variants(cfg: BenchConfig, base: nn.Module, rates: Sequence[float],
              analysis: ResidualAnalysis) -> list[_Runner]:
    """The variants one run times, each on its own copy of ``base``."""
    depths = [s.depth for s in analysis.sites]

    def gated(rate: float, distribution: str = cfg.distribution, **kw: Any) -> nn.Module:
        return stochastic_depth(copy.deepcopy(base), rate, distribution=distribution,
                                mode=cfg.mode, seed=cfg.seed, **kw)

    def build(spec: Variant) -> nn.Module:
        if spec.kind is VariantKind.BASELINE:
            return copy.deepcopy(base)
        if spec.kind is VariantKind.MASK_DROP_PATH:
            per_site = site_rates(spec.rate, cfg.distribution, depths, analysis.num_levels)
            return add_mask_drop_paths(analyze_residuals(copy.deepcopy(base)), per_site)
        if spec.kind is VariantKind.ALL_DROPPED:
            return gated(1.0, "uniform")
        # OVERHEAD and FXSD: the gated model at the variant's rate
        if spec.mask_impl:  # the row computes every branch on purpose: no warning about it
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", NoSavingWarning)
                return gated(spec.rate, sample_impl="mask")
        return gated(spec.rate)

    return [_Runner(spec, build(spec), cfg) for spec in _variant_specs(cfg, rates)]



def _warm_up(runners: Sequence[_Runner], x: torch.Tensor, cfg: BenchConfig,
             report: Progress) -> None:
    """``cfg.warmup`` untimed steps of each variant in turn."""
    for i in report.steps("warm-up" + (" (compiling)" if cfg.compile else ""), len(runners)):
        v = runners[i]
        if v.spec.compiled and v.gates:
            # Compile every branch before timing: one step with every branch kept.
            rates_now = [g.drop_rate for g in v.gates]
            for g in v.gates:
                g.drop_rate = 0.0
            v.step(x)
            for g, r in zip(v.gates, rates_now):
                g.drop_rate = r
        for _ in range(cfg.warmup):
            v.step(x)



def _time_steps(runners: Sequence[_Runner], x: torch.Tensor, cfg: BenchConfig,
                device: torch.device, report: Progress) -> None:
    """``cfg.steps`` timed steps of every variant, interleaved (one step of each in turn), into
    each row's times, with the peak memory on CUDA and the rows each gate's branch computed."""
    for _ in report.steps(f"timing {len(runners)} variants, interleaved", cfg.steps):
        for v in runners:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            _sync(device)
            t0 = time.perf_counter()
            v.step(x)
            _sync(device)
            v.row.times.append(time.perf_counter() - t0)
            if device.type == "cuda":
                peak = torch.cuda.max_memory_allocated(device)
                v.row.peak_bytes = max(v.row.peak_bytes or 0, peak)
            if v.gates:
                v.rows_run.append(_rows_needed(v.gates, cfg.batch_size))



def _expected_flop_savings(runners: Sequence[_Runner], x: torch.Tensor) -> None:
    """Each row's expected share of a step's FLOPs saved (:func:`fxsd.expected_saving`), for
    the table to show beside the measured time saving: gated rows from their counted branch
    costs; the mask drop path computes every branch (0)."""
    for v in runners:
        if v.spec.kind is VariantKind.MASK_DROP_PATH:
            v.row.flop_saving = 0.0
        elif v.gates and record_step_costs(_gated(v.model), (x,)):
            v.row.flop_saving = expected_saving(_gated(v.model))



def _sync_check(variant: _Runner, x: torch.Tensor) -> str:
    """Three steps of ``variant`` with CUDA's sync debug mode raising on any host-device sync."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            variant.step(x)
    except RuntimeError as exc:
        return f"FAILED: {exc}"
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return "passed (no host-device sync in 3 gated steps)"



def _machine(device: torch.device) -> dict[str, str]:
    info = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "threads": str(torch.get_num_threads()),
        "device": str(device),
        "date": time.strftime("%Y-%m-%d"),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info
