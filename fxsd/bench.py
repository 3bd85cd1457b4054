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
"""

from __future__ import annotations

import copy
import enum
import math
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from fxsd.analysis import analyze_residuals
from fxsd.budget import expected_saving, record_step_costs
from fxsd.compiling import compile as compile_gated
from fxsd.distributions import check_rate, site_rates
from fxsd.errors import InvalidArgumentError
from fxsd.gate import BranchGate
from fxsd.models import load_model
from fxsd.passes.mask_drop_path import add_mask_drop_paths
from fxsd.passes.stochastic_depth import NoSavingWarning, stochastic_depth
from fxsd.record import get_record
from fxsd.tables import EMPTY, LEAVE_OUT, _ends, fill, fit_table, terminal_width
from fxsd.training import gates, named_gates

if TYPE_CHECKING:
    from fxsd.residuals import ResidualAnalysis

__all__ = ["BenchConfig", "Variant", "VariantKind", "BenchRow", "BenchResult", "run",
           "format_table", "site_times", "exclusive_times", "gate_ancestors", "limit_saving",
           "transform_rows", "transform_times", "EXAMPLE_MODELS", "training_step_time",
           "Interrupted", "Progress", "check_device", "available_devices"]

HEADERS = ["variant", "drop rate", "mean ms", "median ms", "IQR ms", "ratio", "saving %",
           "FLOP saving %", "limit %", "efficiency", "act. MiB", "peak MiB"]


@dataclass
class BenchConfig:
    """What to benchmark. ``image_size=None`` picks 32 for CIFAR models and 64 otherwise."""

    model: str = "resnet50"
    drop_rates: tuple[float, ...] = (0.5,)
    distribution: str = "linear"
    mode: str = "block"
    batch_size: int = 16
    image_size: int | None = None
    steps: int = 20
    warmup: int = 3
    device: str = "cpu"
    amp: str | None = None
    channels_last: bool = False
    seed: int = 0
    branch_reps: int = 5
    compile: bool = False
    compile_backend: str = "inductor"


class VariantKind(enum.Enum):
    """What a row of the benchmark measures. The value is the row's name in tables and JSON."""

    BASELINE = "baseline"  # the untransformed model
    OVERHEAD = "fxsd p=0"  # the gated model that never drops: what the gates themselves cost
    FXSD = "fxsd"  # the gated model at a requested rate
    MASK_DROP_PATH = "mask drop path"  # torchvision's StochasticDepth on every branch output
    ALL_DROPPED = "every site dropped"  # the gated model at rate 1: the branches' total time
    LIMIT = "limit"  # not run: the step time perfect skipping would give
    PRUNED = "pruned"  # bench --prune: fxsd.prune's model, in eval (fxsd.bench_prune)


@dataclass(frozen=True)
class Variant:
    """One row of the benchmark: its ``kind``, its drop ``rate`` (``None`` for the baseline),
    whether it runs under ``torch.compile`` and, for an fxsd row in sample mode, whether it uses
    ``sample_impl="mask"``.

    >>> Variant(VariantKind.ALL_DROPPED, 1.0, compiled=True).label
    'compiled every site dropped'
    """

    kind: VariantKind
    rate: float | None = None
    compiled: bool = False
    mask_impl: bool = False

    @property
    def label(self) -> str:
        """The row's name in tables and JSON: ``fxsd``, ``fxsd (mask)``, ``compiled limit``..."""
        return self._label(self.kind.value, "compiled")

    def short_label(self, short_compiled: bool) -> str:
        """:attr:`label` for a narrow table, still saying what ran: ``all dropped`` for ``every
        site dropped`` and, when ``short_compiled``, ``comp.`` for ``compiled``."""
        name = "all dropped" if self.kind is VariantKind.ALL_DROPPED else self.kind.value
        return self._label(name, "comp." if short_compiled else "compiled")

    def _label(self, name: str, compiled: str) -> str:
        name += " (mask)" if self.mask_impl else ""
        return f"{compiled} {name}" if self.compiled else name

    @property
    def group(self) -> str:
        """``"compiled"`` or ``"eager"``: a row compares with the baseline of its group."""
        return "compiled" if self.compiled else "eager"


@dataclass
class BenchRow:
    """The measured step times (seconds) of one :class:`Variant`; a ``LIMIT`` row holds the one
    step time that the limit gives."""

    spec: Variant
    times: list[float] = field(repr=False)
    peak_bytes: int | None = None
    limit: float | None = None  # fraction of the baseline step perfect skipping would save
    # mean bytes saved for backward per step (saved_tensors_hooks; eager rows only)
    activation_bytes: float | None = None
    flop_saving: float | None = None  # expected share of a step's FLOPs saved (fxsd.budget)

    @property
    def variant(self) -> str:
        """The row's name in tables and JSON (:attr:`Variant.label`)."""
        return self.spec.label

    @property
    def kind(self) -> VariantKind:
        return self.spec.kind

    @property
    def drop_rate(self) -> float | None:
        return self.spec.rate

    @property
    def group(self) -> str:
        return self.spec.group

    @property
    def mean(self) -> float:
        return statistics.fmean(self.times)

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def spread(self) -> float:
        """Interquartile range of the step times (0 with fewer than two steps)."""
        if len(self.times) < 2:
            return 0.0
        q1, _, q3 = statistics.quantiles(self.times, n=4, method="inclusive")
        return q3 - q1


@dataclass
class BenchResult:
    config: BenchConfig
    rows: list[BenchRow]
    site_times: dict[str, float]
    machine: dict[str, str]
    sync_check: str = "not run"
    warnings: list[str] = field(default_factory=list)

    def row(self, variant: str, drop_rate: float | None = None) -> BenchRow:
        """The row named ``variant`` (its label, as tables show it), at ``drop_rate`` if given."""
        for r in self.rows:
            if r.variant == variant and (drop_rate is None or r.drop_rate == drop_rate):
                return r
        raise KeyError((variant, drop_rate))

    def base(self, group: str) -> BenchRow:
        """The baseline row that the rows of ``group`` compare with."""
        return next(r for r in self.rows if r.group == group and r.kind is VariantKind.BASELINE)

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": asdict(self.config),
            "machine": self.machine,
            "sync_check": self.sync_check,
            "warnings": self.warnings,
            "site_times_ms": {k: v * 1e3 for k, v in self.site_times.items()},
            "rows": [
                {"variant": r.variant, "drop_rate": r.drop_rate, "mean_ms": r.mean * 1e3,
                 "median_ms": r.median * 1e3, "iqr_ms": r.spread * 1e3,
                 "ratio": r.mean / self.base(r.group).mean,
                 "limit": r.limit, "group": r.group,
                 "peak_bytes": r.peak_bytes, "activation_bytes": r.activation_bytes,
                 "flop_saving": r.flop_saving, "steps": len(r.times)}
                for r in self.rows
            ],
        }


def _loss(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor) and out.dim() == 2:
        target = torch.arange(out.shape[0], device=out.device) % out.shape[1]
        return F.cross_entropy(out.float(), target)
    leaves = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
    return sum(t.float().mean() for t in leaves)


class _Runner:
    """One variant's model in training, with its optimiser; :attr:`row` collects its times."""

    def __init__(self, spec: Variant, model: nn.Module, cfg: BenchConfig):
        self.row = BenchRow(spec, [])
        self.gates = gates(model)
        self.model = model.train()
        self.opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
        if spec.compiled:
            self.model = (compile_gated(model, backend=cfg.compile_backend) if self.gates
                          else torch.compile(model, backend=cfg.compile_backend))
        self.rows_run: list[list[int]] = []  # per step, per gate: rows perfect skipping computes
        self.cfg = cfg

    @property
    def spec(self) -> Variant:
        return self.row.spec

    def step(self, x: torch.Tensor) -> None:
        """One training step (forward, backward, optimiser), the gates' last decisions cleared."""
        for g in self.gates:
            g.dropped = None
            g.kept_rows = None
        self.opt.zero_grad(set_to_none=True)
        with _autocast(self.cfg):
            loss = _loss(self.model(x))
        loss.backward()
        self.opt.step()


def _autocast(cfg: BenchConfig) -> Any:
    if cfg.amp is None:
        return nullcontext()
    return torch.autocast(torch.device(cfg.device).type, dtype=getattr(torch, cfg.amp))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rows_needed(gates: Sequence[BranchGate], n: int) -> list[int]:
    """How many rows each gate's branch had to compute in the last step: ``n`` kept, 0 dropped
    (or not run: inside a dropped branch), the kept rows in sample mode (whatever ran)."""
    rows = []
    for g in gates:
        if g.kept_rows is not None:
            rows.append(int(g.kept_rows.sum()))
        else:
            rows.append(n if g.dropped is False else 0)
    return rows


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
    """Expected seconds saved per step by perfect skipping: Σ t_l · P(branch l skipped).

    A branch is skipped when its own gate or any gate enclosing it drops.
    """
    total = 0.0
    for name, t in times.items():
        keep = 1.0 - rates[name]
        for a in ancestors.get(name, []):
            keep *= 1.0 - rates[a]
        total += t * (1.0 - keep)
    return total


class Progress:
    """Progress on stderr while long work runs: a tqdm bar when tqdm is installed (the
    ``progress`` extra), plain lines otherwise, nothing when ``enabled`` is false (``None``:
    when stderr is a terminal). ``fxsd bench`` reports its steps with it, ``fxsd inspect`` the
    modules it traces one by one."""

    def __init__(self, enabled: bool | None, prefix: str = "[fxsd bench]") -> None:
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.prefix = prefix
        self.bars: list[Any] = []  # open tqdm bars, closed by close() when work stops early
        try:
            from tqdm import tqdm
        except ImportError:
            tqdm = None
        self.tqdm = tqdm

    def say(self, message: str) -> None:
        if self.enabled:
            print(f"{self.prefix} {message}", file=sys.stderr, flush=True)

    def steps(self, label: str, total: int) -> Iterator[int]:
        """``range(total)``, reported as it goes."""
        if not self.enabled:
            yield from range(total)
            return
        if self.tqdm is not None:
            bar = self.tqdm(total=total, desc=f"{self.prefix} {label}", file=sys.stderr,
                            leave=False)
            self.bars.append(bar)
            for i in range(total):
                yield i
                bar.update(1)
            self._close(bar)
            return
        self.say(f"{label}: 0/{total}")
        every = max(1, total // 10)
        for i in range(total):
            yield i
            if (i + 1) % every == 0 or i + 1 == total:
                self.say(f"{label}: {i + 1}/{total}")

    @contextmanager
    def counter(self, label: str, unit: str) -> Iterator[Callable[[str], None]]:
        """A function to call as each of an unknown number of items starts (its name shown):
        a bar of the count so far, or a line every 10 items."""
        count = 0
        bar = None
        if self.enabled and self.tqdm is not None:
            bar = self.tqdm(desc=f"{self.prefix} {label}", unit=f" {unit}", file=sys.stderr,
                            leave=False)
            self.bars.append(bar)

        def tick(name: str) -> None:
            nonlocal count
            count += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(name or "<root>", refresh=False)
            elif count % 10 == 1:
                self.say(f"{label}: {unit} {count} ({name or '<root>'})")

        try:
            yield tick
        finally:
            if bar is not None:
                self._close(bar)

    def _close(self, bar: Any) -> None:
        bar.close()
        if bar in self.bars:
            self.bars.remove(bar)

    def close(self) -> None:
        """Close the bars still open (work stopped early): the table prints below them."""
        for bar in list(self.bars):
            self._close(bar)


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
        model: a model spec (:func:`fxsd.models.load_model`): ``cifar_resnet<depth>``, a
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
        >>> from fxsd import bench
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


def _find(runners: Sequence[_Runner], kind: VariantKind) -> _Runner:
    """The first of ``runners`` of ``kind``."""
    return next(v for v in runners if v.spec.kind is kind)


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


class _SavedBytes:
    """Bytes autograd saves for backward, each storage once, the model's parameters left out
    (they are held anyway): what a step's activations cost in memory."""

    def __init__(self, model: nn.Module) -> None:
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.storages: dict[int, int] = {}

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in self.params:
            self.storages[storage.data_ptr()] = storage.nbytes()
        return t

    @property
    def total(self) -> int:
        return sum(self.storages.values())


def _count_activations(runners: Sequence[_Runner], x: torch.Tensor, cfg: BenchConfig,
                       report: Progress) -> None:
    """``cfg.steps`` more steps of each eager variant, untimed, counting the bytes saved for
    backward (``saved_tensors_hooks`` cost a call per saved tensor: not in the timed steps).
    Compiled rows keep ``None``: their saved tensors live inside compiled code."""
    eager = [v for v in runners if not v.spec.compiled]
    totals: dict[int, list[int]] = {id(v): [] for v in eager}
    for _ in report.steps("counting activation memory", cfg.steps):
        for v in eager:
            seen = _SavedBytes(v.model)
            with torch.autograd.graph.saved_tensors_hooks(seen.pack, lambda t: t):
                v.step(x)
            totals[id(v)].append(seen.total)
    for v in eager:
        v.row.activation_bytes = statistics.fmean(totals[id(v)])


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


def _gated(model: nn.Module) -> nn.Module:
    return getattr(model, "_orig_mod", model)  # the module under torch.compile's wrapper


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


def transform_rows(block_counts: Sequence[int] = (250, 500, 1000),
                   torchvision_models: Sequence[str] = ("resnet152", "vit_l_16"),
                   repeats: int = 3, by_example: Sequence[str] = ()
                   ) -> Iterator[dict[str, Any]]:
    """Time ``fxsd.stochastic_depth`` itself (trace + analysis + rewrite) on one CPU thread,
    yielding one row per model as soon as it is measured.

    ``by_example`` names models traced by example (:data:`EXAMPLE_MODELS`: ``"llama"``,
    ``"t5"``, ``"unet"``; those whose library is not installed are left out), transformed
    with one training batch as ``example_kwargs``. Their rows also hold ``step_seconds``, the
    median time of one training step of the plain model on that batch (forward, backward,
    SGD), and ``steps``, the transform's time in such steps; other rows hold ``None`` there.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cases: list[tuple[str, Callable[[], tuple[nn.Module, dict[str, Any] | None]]]] = [
            (name, lambda name=name: (load_model(name), None)) for name in torchvision_models
        ]
        cases += [(f"residual MLP x{n}", lambda n=n: (residual_mlp(n), None))
                  for n in block_counts]
        cases += [(EXAMPLE_MODELS[name][0], EXAMPLE_MODELS[name][1]) for name in by_example
                  if _installed(EXAMPLE_MODELS[name][2])]
        for label, make in cases:
            model, batch = make()
            yield _transform_row(label, model, batch, repeats)
    finally:
        torch.set_num_threads(threads)


def _transform_row(label: str, model: nn.Module, batch: dict[str, Any] | None,
                   repeats: int) -> dict[str, Any]:
    """One row of :func:`transform_rows`: the best of ``repeats`` transforms (by example on
    ``batch`` when given), then the plain model's training step on ``batch``."""
    samples = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a tiny model's notes on what it does not gate
        for _ in range(repeats):
            t0 = time.perf_counter()
            gated = stochastic_depth(model, 0.1, example_kwargs=batch)
            samples.append(time.perf_counter() - t0)
        analysis = analyze_residuals(model, example_kwargs=batch)
    # by example: the nodes of every module traced on its own
    graphs = [u.graph_module for u in analysis.units] if batch is not None else []
    nodes = sum(len(gm.graph.nodes) for gm in graphs or [analysis.graph_module])
    best = min(samples)
    step = None if batch is None else training_step_time(model, batch)
    return {"model": label, "nodes": nodes, "sites": len(gates(gated)),
            "blocks": len(get_record(gated).rewritten), "seconds": best,
            "us_per_node": best / nodes * 1e6, "step_seconds": step,
            "steps": None if step is None else best / step}


def training_step_time(model: nn.Module, batch: dict[str, Any], steps: int = 5,
                       warmup: int = 2) -> float:
    """The median time of one training step of ``model`` on ``batch`` (forward, the loss the
    model returns or the mean square of its first output, backward, an SGD step). Trains a
    copy: ``model`` is left as it is."""
    model = copy.deepcopy(model).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        out = model(**batch)
        loss = getattr(out, "loss", None)
        if loss is None:
            first = next(t for t in torch.utils._pytree.tree_leaves(out)
                         if isinstance(t, torch.Tensor))
            loss = first.float().square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _ids(batch: int, length: int, vocab: int = 128) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(0))


def tiny_llama(batch: int = 8, length: int = 128) -> tuple[nn.Module, dict[str, Any]]:
    """A 4-layer Llama (width 32, random weights) and a training batch of token ids."""
    import transformers as tf

    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                            num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                            max_position_embeddings=2 * length)
    ids = _ids(batch, length)
    return tf.LlamaForCausalLM(config), {"input_ids": ids, "labels": ids}


def tiny_t5(batch: int = 8, length: int = 128) -> tuple[nn.Module, dict[str, Any]]:
    """A T5 of 6 encoder and 6 decoder layers (width 32, random weights) and a training batch
    (inputs of ``length`` tokens, targets of a quarter of that)."""
    import transformers as tf

    torch.manual_seed(0)
    config = tf.T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=6,
                         num_decoder_layers=6, num_heads=4, decoder_start_token_id=0)
    return tf.T5ForConditionalGeneration(config), {
        "input_ids": _ids(batch, length), "labels": _ids(batch, max(1, length // 4))}


def tiny_unet(batch: int = 4, size: int = 32) -> tuple[nn.Module, dict[str, Any]]:
    """A diffusers ``UNet2DConditionModel`` with two levels (32 and 64 channels, one layer
    each, cross-attention at the outer level; random weights) and a batch of latents."""
    import diffusers

    torch.manual_seed(0)
    model = diffusers.UNet2DConditionModel(
        sample_size=size, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        attention_head_dim=8, norm_num_groups=8)
    gen = torch.Generator().manual_seed(0)
    return model, {"sample": torch.randn(batch, 4, size, size, generator=gen),
                   "timestep": torch.arange(batch) * 10,
                   "encoder_hidden_states": torch.randn(batch, 8, 32, generator=gen)}


EXAMPLE_MODELS: dict[str, tuple[str, Callable[[], tuple[nn.Module, dict[str, Any]]], str]] = {
    "llama": ("tiny Llama x4", tiny_llama, "transformers"),
    "t5": ("tiny T5 6+6", tiny_t5, "transformers"),
    "unet": ("tiny UNet2DCondition", tiny_unet, "diffusers"),
}
"""The models :func:`transform_rows` traces by example: name -> (row label, builder, the
library it needs)."""


def transform_times(block_counts: Sequence[int] = (250, 500, 1000),
                    torchvision_models: Sequence[str] = ("resnet152", "vit_l_16"),
                    repeats: int = 3, by_example: Sequence[str] = ()) -> list[dict[str, Any]]:
    """:func:`transform_rows` as a list."""
    return list(transform_rows(block_counts, torchvision_models, repeats, by_example))


def residual_mlp(blocks: int, width: int = 64) -> nn.Module:
    """A plain chain of pre-norm residual MLP blocks, for timing the pass at scale."""

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = nn.LayerNorm(width)
            self.fc1 = nn.Linear(width, width)
            self.fc2 = nn.Linear(width, width)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.fc2(F.gelu(self.fc1(self.norm(x))))

    return nn.Sequential(*[Block() for _ in range(blocks)])
