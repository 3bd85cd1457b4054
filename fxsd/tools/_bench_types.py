"""What ``fxsd bench`` measures and returns: its configuration, its rows and its result.

A run is configured by a :class:`BenchConfig`. Each row is a :class:`Variant` — a
:class:`VariantKind` with its rate and whether it is compiled: code tells rows apart by kind,
and :attr:`Variant.label` is only the name tables and JSON show. A :class:`BenchRow` holds one
variant's measured step times, a :class:`BenchResult` every row with the machine it ran on
(:meth:`BenchResult.to_dict` is the bench's JSON).
"""

from __future__ import annotations

import enum
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["BenchConfig", "VariantKind", "Variant", "BenchRow", "BenchResult"]



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
    PRUNED = "pruned"  # bench --prune: fxsd.prune's model, in eval (fxsd.tools.bench_prune)



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
    # expected share of a step's FLOPs saved (fxsd.decisions.budget)
    flop_saving: float | None = None

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
