"""``fxsd bench``: time training steps of fxsd against the baseline, drop path and the limit.

One run builds these variants of one model, all on the same machine and inputs:

* ``baseline`` — the untransformed model;
* ``fxsd p=0`` — the gated model that never drops (the gates' own overhead);
* ``fxsd`` — the gated model at each requested rate (block mode);
* ``mask drop path`` — the model with torchvision's ``StochasticDepth(p, "row")`` on every branch
  output at the same per-site rates (what users run today: the branch is computed anyway);
* ``every site dropped`` — the gated model with every rate at 1;
* ``limit`` — the step time perfect skipping would give at each rate.

The limit comes from measured times, not FLOPs: the branches' total time is the baseline step
minus the every-site-dropped step, and it is shared out between sites in proportion to each
branch's own forward + backward time, measured in isolation on the inputs it sees in the model.
For the fxsd rows the limit is *realised*: it counts the work the run actually skipped, step by
step, so ``efficiency = saving / limit`` is free of the sampling noise of the drop decisions. In
sample mode a branch that ran on ``k`` of ``n`` rows saved ``t(n) - t(k)``, with ``t(k)`` measured
at every row count that occurred (a branch's time is far from linear in its rows on small
batches), not assumed to be ``t(n)·(n - k)/n``.

Variants run interleaved (one step of each in turn) after a warm-up; drop decisions come from a
fixed seed, so reruns skip the same branches. Every row reports the spread of its step times
(interquartile range); :attr:`BenchResult.warnings` says when the baseline's spread is larger than
an effect the table reports, or an efficiency lies outside [0, 1.1] — signs of a busy machine.
"""

from __future__ import annotations

import copy
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fxsd.compiling import compile as compile_gated
from fxsd.errors import InvalidArgumentError
from fxsd.gate import BranchGate
from fxsd.models import load_model
from fxsd.passes.mask_drop_path import add_mask_drop_paths
from fxsd.passes.stochastic_depth import stochastic_depth
from fxsd.record import get_record
from fxsd.residuals import analyze_residuals
from fxsd.schedules import check_rate, site_rates
from fxsd.tables import EMPTY, LEAVE_OUT, _ends, fill, fit_table, terminal_width
from fxsd.training import gates, named_gates

__all__ = ["BenchConfig", "BenchRow", "BenchResult", "run", "format_table", "site_times",
           "exclusive_times", "gate_ancestors", "limit_saving", "transform_rows",
           "transform_times"]

HEADERS = ["variant", "drop rate", "mean ms", "median ms", "IQR ms", "ratio", "saving %",
           "limit %", "efficiency", "peak MiB"]


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


@dataclass
class BenchRow:
    variant: str
    drop_rate: float | None
    times: list[float] = field(repr=False)
    peak_bytes: int | None = None
    limit: float | None = None  # fraction of the baseline step perfect skipping would save
    group: str = "eager"  # rows compare with the baseline of their group ("eager"/"compiled")

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
        for r in self.rows:
            if r.variant == variant and (drop_rate is None or r.drop_rate == drop_rate):
                return r
        raise KeyError((variant, drop_rate))

    def base(self, group: str) -> BenchRow:
        return next(r for r in self.rows if r.group == group and r.variant.endswith("baseline"))

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
                 "peak_bytes": r.peak_bytes, "steps": len(r.times)}
                for r in self.rows
            ],
        }


def _loss(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor) and out.dim() == 2:
        target = torch.arange(out.shape[0], device=out.device) % out.shape[1]
        return F.cross_entropy(out.float(), target)
    leaves = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
    return sum(t.float().mean() for t in leaves)


class _Variant:
    def __init__(self, name: str, rate: float | None, model: nn.Module, cfg: BenchConfig,
                 group: str = "eager"):
        self.row = BenchRow(name, rate, [], group=group)
        self.gates = gates(model)
        self.model = model.train()
        self.opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
        if group == "compiled":
            self.model = (compile_gated(model, backend=cfg.compile_backend) if self.gates
                          else torch.compile(model, backend=cfg.compile_backend))
        self.rows_run: list[list[int]] = []  # per step, per gate: rows perfect skipping computes
        self.cfg = cfg

    def step(self, x: torch.Tensor) -> None:
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


class _Progress:
    """Progress on stderr while the benchmark runs: a tqdm bar when tqdm is installed (the
    ``progress`` extra), plain lines otherwise, nothing when ``enabled`` is false."""

    def __init__(self, enabled: bool | None) -> None:
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        try:
            from tqdm import tqdm
        except ImportError:
            tqdm = None
        self.tqdm = tqdm

    def say(self, message: str) -> None:
        if self.enabled:
            print(f"[fxsd bench] {message}", file=sys.stderr, flush=True)

    def steps(self, label: str, total: int) -> Iterator[int]:
        """``range(total)``, reported as it goes."""
        if not self.enabled:
            yield from range(total)
            return
        if self.tqdm is not None:
            yield from self.tqdm(range(total), desc=f"[fxsd bench] {label}", file=sys.stderr,
                                 leave=False)
            return
        self.say(f"{label}: 0/{total}")
        every = max(1, total // 10)
        for i in range(total):
            yield i
            if (i + 1) % every == 0 or i + 1 == total:
                self.say(f"{label}: {i + 1}/{total}")


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
    return _run(cfg, _Progress(progress))


def _run(cfg: BenchConfig, report: _Progress) -> BenchResult:
    rates = tuple(check_rate(r) for r in cfg.drop_rates)
    if cfg.steps < 1 or cfg.warmup < 0 or cfg.batch_size < 1:
        raise InvalidArgumentError("steps and batch_size must be positive, warmup non-negative")
    if cfg.mode not in ("block", "sample"):
        raise InvalidArgumentError(f"unknown mode {cfg.mode!r}: use 'block' or 'sample'")
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidArgumentError("--device cuda asked for, but torch sees no CUDA device")
    if cfg.amp not in (None, "bf16", "bfloat16", "fp16", "float16"):
        raise InvalidArgumentError(f"unknown --amp {cfg.amp!r}: use bf16 or fp16")
    if cfg.amp:
        cfg.amp = {"bf16": "bfloat16", "fp16": "float16"}.get(cfg.amp, cfg.amp)
    torch.manual_seed(cfg.seed)
    size = cfg.image_size or (32 if cfg.model.startswith("cifar") else 64)
    base = load_model(cfg.model, size)
    x = torch.randn(cfg.batch_size, 3, size, size)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    base = base.to(device, memory_format=memory_format)
    x = x.to(device, memory_format=memory_format)

    analysis = analyze_residuals(base)
    if not analysis.sites:
        raise InvalidArgumentError(f"{cfg.model} has no residual site to benchmark")
    depths = [s.depth for s in analysis.sites]
    report.say(f"building the variants of {cfg.model} ({len(analysis.sites)} sites)")
    variants = _variants(cfg, base, rates, analysis)

    for i in report.steps("warm-up" + (" (compiling)" if cfg.compile else ""), len(variants)):
        v = variants[i]
        if v.row.group == "compiled" and v.gates:
            # Compile every branch before timing: one step with every branch kept.
            rates_now = [g.drop_rate for g in v.gates]
            for g in v.gates:
                g.drop_rate = 0.0
            v.step(x)
            for g, r in zip(v.gates, rates_now):
                g.drop_rate = r
        for _ in range(cfg.warmup):
            v.step(x)
    sync_check = "not run (CPU)"
    if device.type == "cuda":
        sync_check = _sync_check(variants[2], x)

    for _ in report.steps(f"timing {len(variants)} variants, interleaved", cfg.steps):
        for v in variants:
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

    report.say("timing each branch alone, for the limit")
    probe = variants[1].model
    raw = site_times(probe, x, cfg)
    chains = gate_ancestors(probe, x, cfg)
    names = list(named_gates(probe))
    n = cfg.batch_size
    counts: dict[str, set[int]] = {name: set() for name in names}
    if cfg.mode == "sample":
        for v in variants:
            for step in v.rows_run:
                for name, k in zip(names, step):
                    counts[name].add(k)
    curves = row_times(probe, x, cfg, counts) if cfg.mode == "sample" else {}
    rows: list[BenchRow] = []
    shares: dict[str, float] = {}
    for group in ("eager", "compiled"):
        members = [v for v in variants if v.row.group == group]
        if not members:
            continue
        base_time = members[0].row.mean
        every = next(v for v in members if v.row.variant.endswith("every site dropped"))
        branch_total = max(base_time - every.row.mean, 0.0)
        # The branches' measured total, shared out in proportion to their isolated times.
        scale = branch_total / sum(raw.values()) if sum(raw.values()) else 0.0
        times = {name: t * scale for name, t in raw.items()}
        if group == "eager":
            shares = times

        def cost(name: str, k: float, times: dict[str, float] = times) -> float:
            """The (calibrated) time of ``name``'s branch on ``k`` rows."""
            # proportional without a curve, or when the branch's rows are not the batch's
            if name not in curves or curves[name].get(n, 0.0) <= 0:
                return times[name] * k / n
            return times[name] * _interpolate(curves[name], k) / curves[name][n]

        prefix = "compiled " if group == "compiled" else ""
        for v in members:
            kind = v.row.variant.removeprefix(prefix)
            if kind.startswith("fxsd") and kind != "fxsd p=0":
                # Realised limit: what skipping exactly this run's dropped work would save.
                order = list(named_gates(_gated(v.model)))
                saved = [sum(times[g] - cost(g, k) for g, k in zip(order, step))
                         for step in v.rows_run]
                v.row.limit = statistics.fmean(saved) / base_time
            elif kind == "mask drop path":
                v.row.limit = _expected_limit(v.row.drop_rate, cfg, depths, analysis.num_levels,
                                              names, times, chains, cost) / base_time
            elif kind == "every site dropped":
                v.row.limit = branch_total / base_time
            rows.append(v.row)
        for r in rates:
            saved = _expected_limit(r, cfg, depths, analysis.num_levels, names, times, chains,
                                    cost)
            rows.append(BenchRow(f"{prefix}limit", r, [base_time - saved],
                                 limit=saved / base_time, group=group))
    result = BenchResult(cfg, rows, shares, _machine(device), sync_check)
    result.warnings = noise_warnings(result)
    return result


def _variants(cfg: BenchConfig, base: nn.Module, rates: Sequence[float],
              analysis: Any) -> list[_Variant]:
    """The variants one run times, each on its own copy of ``base``."""
    depths = [s.depth for s in analysis.sites]

    def fresh() -> nn.Module:
        return copy.deepcopy(base)

    def gated(rate: float, distribution: str = cfg.distribution, **kw: Any) -> nn.Module:
        return stochastic_depth(fresh(), rate, distribution=distribution, mode=cfg.mode,
                                seed=cfg.seed, **kw)

    variants = [_Variant("baseline", None, fresh(), cfg),
                _Variant("fxsd p=0", 0.0, gated(0.0), cfg)]
    for r in rates:
        variants.append(_Variant("fxsd", r, gated(r), cfg))
        if cfg.mode == "sample":
            variants.append(_Variant("fxsd (mask)", r, gated(r, sample_impl="mask"), cfg))
    for r in rates:
        masked = add_mask_drop_paths(analyze_residuals(fresh()),
                                     site_rates(r, cfg.distribution, depths, analysis.num_levels))
        variants.append(_Variant("mask drop path", r, masked, cfg))
    variants.append(_Variant("every site dropped", 1.0, gated(1.0, "uniform"), cfg))
    if cfg.compile:
        variants.append(_Variant("compiled baseline", None, fresh(), cfg, "compiled"))
        variants.append(_Variant("compiled fxsd p=0", 0.0, gated(0.0), cfg, "compiled"))
        for r in rates:
            variants.append(_Variant("compiled fxsd", r, gated(r), cfg, "compiled"))
        variants.append(_Variant("compiled every site dropped", 1.0, gated(1.0, "uniform"), cfg,
                                 "compiled"))
    return variants


def noise_warnings(result: BenchResult) -> list[str]:
    """What in ``result`` the machine's noise may have made up: an fxsd saving smaller than the
    baseline's own spread, or an efficiency outside [0, 1.1]."""
    found = []
    for r in result.rows:
        kind = r.variant.removeprefix("compiled ")
        if kind in ("baseline", "limit"):
            continue
        base = result.base(r.group)
        effect = abs(base.mean - r.mean)
        if base.spread > effect and kind.startswith("fxsd") and kind != "fxsd p=0":
            found.append(f"{r.variant} at {r.drop_rate:g}: its {effect * 1e3:.1f} ms difference "
                         f"from the baseline is smaller than the baseline's own spread "
                         f"({base.spread * 1e3:.1f} ms IQR)")
        if r.limit and kind != "every site dropped":
            efficiency = (1.0 - r.mean / base.mean) / r.limit
            if not 0.0 <= efficiency <= 1.1 and kind.startswith("fxsd"):
                found.append(f"{r.variant} at {r.drop_rate:g}: efficiency {efficiency:.2f} is "
                             "outside [0, 1.1]")
    if found:
        found.append("the machine was likely busy: rerun on an idle machine, with more --steps")
    return found


def _gated(model: nn.Module) -> nn.Module:
    return getattr(model, "_orig_mod", model)  # the module under torch.compile's wrapper


def _expected_limit(rate: float, cfg: BenchConfig, depths: list[int], levels: int,
                    names: list[str], times: dict[str, float], chains: dict[str, list[str]],
                    cost: Callable[[str, float], float]) -> float:
    per_site = dict(zip(names, site_rates(rate, cfg.distribution, depths, levels)))
    if cfg.mode == "sample":
        # Each row is kept with probability 1 - p: the branch runs on Binomial(n, 1 - p) rows.
        from math import comb

        n = cfg.batch_size
        return sum(
            sum(comb(n, k) * (1 - p) ** k * p ** (n - k) * (times[g] - cost(g, k))
                for k in range(n + 1))
            for g, p in per_site.items())
    return limit_saving(times, per_site, chains)


def _sync_check(variant: _Variant, x: torch.Tensor) -> str:
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
    out, variant names shortened and ``peak MiB`` left out until the table fits, and the text
    around it is wrapped. ``None``: the terminal's width (no limit when standard output is not a
    terminal); ``0``: no limit.
    """
    body = []
    for r in result.rows:
        base = result.base(r.group).mean
        saving = 1.0 - r.mean / base
        limit = r.limit
        kind = r.variant.removeprefix("compiled ")
        eff = "-" if not limit or kind in ("baseline", "limit") else f"{saving / limit:.3f}"
        if kind == "limit":
            eff = "1.000"
        body.append([
            r.variant, "-" if r.drop_rate is None else f"{r.drop_rate:g}",
            f"{r.mean * 1e3:.1f}", f"{r.median * 1e3:.1f}",
            "-" if kind == "limit" else f"{r.spread * 1e3:.1f}", f"{r.mean / base:.3f}",
            f"{saving * 100:+.1f}", "-" if limit is None else f"{limit * 100:.1f}", eff,
            "-" if r.peak_bytes is None else f"{r.peak_bytes / 2**20:.0f}",
        ])
    cfg = result.config
    head = (f"{cfg.model}, batch {cfg.batch_size}, {cfg.mode} mode, {cfg.distribution} rates, "
            f"{len(result.rows[0].times)} timed steps per variant (interleaved, after "
            f"{cfg.warmup} warm-up), {result.machine['device']}, torch {result.machine['torch']}, "
            f"{result.machine['threads']} threads"
            + (f"; compiled rows: torch.compile(backend={cfg.compile_backend!r}) vs compiled "
               "baseline" if cfg.compile else ""))
    limit = terminal_width() if width is None else width
    shrink = [(EMPTY, _ends), ("median ms", LEAVE_OUT), ("ratio", LEAVE_OUT),
              ("variant", _short_variants), ("peak MiB", LEAVE_OUT), ("variant", _ends)]
    table = fit_table(body, HEADERS, tablefmt, limit, shrink)
    lines = [fill(f"sync check: {result.sync_check}", limit, indent="  ")]
    lines += [fill(f"warning: {w}", limit, indent="  ") for w in result.warnings]
    return "\n".join([fill(head, limit, indent="  "), table, *lines])


def _short_variants(cells: list[str], n: int) -> list[str]:
    """Variant names in fewer characters, each still telling what ran: ``every site dropped`` ->
    ``all dropped``, ``compiled`` -> ``comp.``; :func:`_ends` then cuts what is still too long."""
    short = [cell.replace("every site dropped", "all dropped") for cell in cells]
    if any(len(cell) > n for cell in short):
        short = [cell.replace("compiled ", "comp. ") for cell in short]
    return short


def transform_rows(block_counts: Sequence[int] = (250, 500, 1000),
                   torchvision_models: Sequence[str] = ("resnet152", "vit_l_16"),
                   repeats: int = 3) -> Iterator[dict[str, Any]]:
    """Time ``fxsd.stochastic_depth`` itself (trace + analysis + rewrite) on one CPU thread,
    yielding one row per model as soon as it is measured."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cases: list[tuple[str, Callable[[], nn.Module]]] = [
            (name, lambda name=name: load_model(name)) for name in torchvision_models
        ]
        cases += [(f"residual MLP x{n}", lambda n=n: residual_mlp(n)) for n in block_counts]
        for label, make in cases:
            model = make()
            samples = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                gated = stochastic_depth(model, 0.1)
                samples.append(time.perf_counter() - t0)
            nodes = len(analyze_residuals(model).graph_module.graph.nodes)
            best = min(samples)
            yield {"model": label, "nodes": nodes, "sites": len(gates(gated)),
                   "blocks": len(get_record(gated).rewritten), "seconds": best,
                   "us_per_node": best / nodes * 1e6}
    finally:
        torch.set_num_threads(threads)


def transform_times(block_counts: Sequence[int] = (250, 500, 1000),
                    torchvision_models: Sequence[str] = ("resnet152", "vit_l_16"),
                    repeats: int = 3) -> list[dict[str, Any]]:
    """:func:`transform_rows` as a list."""
    return list(transform_rows(block_counts, torchvision_models, repeats))


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
