"""``fxsd demo``: does skipping train to the same accuracy in less time? Real data, a picture.

Trains the CIFAR ResNet of the stochastic-depth paper (:func:`fxsd.tools.models.cifar_resnet`) on
the handwritten digits that ship inside scikit-learn (1,797 8×8 images, 10 classes; no download),
once as it is and once with fxsd's stochastic depth, for several seeds, and writes

* ``demo.png`` — test accuracy against training wall-clock time, every run;
* ``demo_prune.png`` — test accuracy against inference FLOPs, both trained models pruned;
* ``demo.md`` — the tables: final accuracy and training time per run, means, the time ratio;
  then the pruned models' accuracy at each inference saving;
* ``demo.json`` — every measured point.

The two variants of one seed start from the same weights and see the same batches; runs
alternate (baseline, fxsd, baseline, …) so that a machine's slow spell hits both. Time counts
training steps only (evaluation is excluded).

Then every trained model (plain-trained and fxsd-trained, each seed) is deployed at several depths
with :func:`fxsd.prune`: its residual branches removed until its forward FLOPs fall by 0, 10, …,
50%, no fine-tuning, the sites chosen by the greedy rule (``strategy="greedy"``: each time the one
whose removal raises the cross-entropy least per FLOP saved) on a few batches of the training
data; each pruned model's test accuracy is measured. Greedy removes sites in one order whatever
the target (a target only says where to stop), so each model runs the greedy search once, at the
largest saving, and every smaller target takes the shortest prefix of that order that meets it:
what ``strategy="greedy"`` at that target would remove. FLOPs are per test image, counted by
``torch.utils.flop_counter``.

Needs the ``demo`` extra: ``pip install 'fxsd[demo]'`` (scikit-learn, matplotlib, tqdm).

>>> from fxsd.tools import _demo as demo
>>> result = demo.run(epochs=1, seeds=(0,), depth=8, out_dir=None, progress=False)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tabulate import tabulate
from torch import nn

from fxsd.errors import InvalidArgumentError, InvalidTypeError

__all__ = ["Run", "PrunePoint", "DemoResult", "run", "load_digits", "PRUNE_SAVINGS"]

#: The inference savings (fractions of the forward FLOPs) at which the demo prunes each model.
PRUNE_SAVINGS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)


@dataclass
class Run:
    """One training run: ``points`` are ``(training seconds, test accuracy)`` after each epoch."""

    variant: str  # "baseline" or "fxsd"
    seed: int
    points: list[tuple[float, float]] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return self.points[-1][1]

    @property
    def seconds(self) -> float:
        return self.points[-1][0]


@dataclass
class PrunePoint:
    """One trained model (``variant``, ``seed``) pruned at ``target`` (a fraction of its forward
    FLOPs): the sites ``removed``, its forward FLOPs per image before (``full_flops``) and after
    (``flops``), and its test ``accuracy``."""

    variant: str
    seed: int
    target: float
    removed: list[str]
    full_flops: int
    flops: int
    accuracy: float

    @property
    def saving(self) -> float:
        """The fraction of the forward FLOPs the pruning saved (at least ``target``)."""
        return 1.0 - self.flops / self.full_flops


@dataclass
class DemoResult:
    """All runs of one demo, with the settings that made them, and the pruned models'
    accuracies (``pruning``, empty when the demo pruned nothing)."""

    runs: list[Run]
    settings: dict[str, Any]
    pruning: list[PrunePoint] = field(default_factory=list)

    def mean(self, variant: str, what: str) -> float:
        return statistics.fmean(getattr(r, what) for r in self.runs if r.variant == variant)

    @property
    def time_ratio(self) -> float:
        """fxsd's mean training time over the baseline's."""
        return self.mean("fxsd", "seconds") / self.mean("baseline", "seconds")

    def table(self, tablefmt: str = "github") -> str:
        rows = [[r.variant, r.seed, f"{100 * r.accuracy:.2f}%", f"{r.seconds:.1f}"]
                for r in sorted(self.runs, key=lambda r: (r.variant != "baseline", r.seed))]
        for variant in ("baseline", "fxsd"):
            rows.append([f"{variant} (mean)", "", f"{100 * self.mean(variant, 'accuracy'):.2f}%",
                         f"{self.mean(variant, 'seconds'):.1f}"])
        return tabulate(rows, headers=["variant", "seed", "test accuracy", "training s"],
                        tablefmt=tablefmt, disable_numparse=True)

    def pruning_table(self, tablefmt: str = "github") -> str:
        """Per trained variant and target: the sites removed, forward FLOPs per image, the
        saving reached and the test accuracy (mean over seeds, then each seed's)."""
        rows = []
        for variant in ("baseline", "fxsd"):
            for target in sorted({p.target for p in self.pruning}):
                points = sorted((p for p in self.pruning
                                 if p.variant == variant and p.target == target),
                                key=lambda p: p.seed)
                if not points:
                    continue
                counts = sorted({len(p.removed) for p in points})
                rows.append([
                    variant, f"{100 * target:.0f}%",
                    f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}–{counts[-1]}",
                    f"{statistics.fmean(p.flops for p in points) / 1e6:.2f}",
                    f"{100 * statistics.fmean(p.saving for p in points):.1f}%",
                    f"{100 * statistics.fmean(p.accuracy for p in points):.2f}%",
                    " / ".join(f"{100 * p.accuracy:.2f}" for p in points)])
        return tabulate(rows, headers=["trained", "target saving", "sites removed",
                                       "fwd MFLOPs / image", "FLOPs saved",
                                       "test accuracy (mean)", "per seed (%)"],
                        tablefmt=tablefmt, disable_numparse=True)


def load_digits(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's digits as ``(x_train, y_train, x_test, y_test)``: 3×8×8 images scaled to
    [0, 1] (the grey channel repeated, as the CIFAR ResNet expects RGB), split 80/20 by class."""
    try:
        from sklearn.datasets import load_digits as sklearn_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:
        raise InvalidArgumentError("fxsd demo needs scikit-learn: pip install 'fxsd[demo]'") \
            from exc
    data = sklearn_digits()
    x = torch.tensor(data.images, dtype=torch.float32).div(16).unsqueeze(1).repeat(1, 3, 1, 1)
    y = torch.tensor(data.target, dtype=torch.long)
    train, test = train_test_split(range(len(y)), test_size=0.2, random_state=seed,
                                   stratify=data.target)
    return x[train], y[train], x[test], y[test]


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        correct = sum(int((model(xb).argmax(1) == yb).sum())
                      for xb, yb in zip(x.split(256), y.split(256)))
    model.train()
    return correct / len(y)


def _train(model: nn.Module, data: tuple[torch.Tensor, ...], epochs: int, batch_size: int,
           seed: int, bar: Any) -> list[tuple[float, float]]:
    x, y, x_test, y_test = data
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4,
                                nesterov=True)
    steps = epochs * -(-len(y) // batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, 0.1, total_steps=steps)
    order = torch.Generator().manual_seed(seed)
    points, elapsed = [], 0.0
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=order)
        start = time.perf_counter()
        for idx in perm.split(batch_size):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        elapsed += time.perf_counter() - start
        points.append((elapsed, _accuracy(model, x_test, y_test)))
        bar.update(1)
    return points


def run(*, epochs: int = 12, seeds: Sequence[int] = (0, 1, 2), depth: int = 56,
        drop_rate: float = 0.5, distribution: str = "linear", batch_size: int = 64,
        threads: int | None = None, out_dir: str | Path | None = "fxsd-demo",
        progress: bool = True, prune_savings: Sequence[float] = PRUNE_SAVINGS,
        prune_batches: int = 2) -> DemoResult:
    """Train baseline and fxsd ``cifar_resnet(depth)`` on the digits, prune each trained model at
    ``prune_savings``; write the pictures and tables.

    Args:
        epochs, seeds, depth, batch_size: the runs (``depth = 6n + 2``).
        drop_rate, distribution: fxsd's setting (the paper's 0.5, linear).
        threads: ``torch.set_num_threads`` for the runs (``None``: as it is).
        out_dir: where ``demo.png``, ``demo.md`` and ``demo.json`` go, created if needed
            (relative paths from the current directory; ``None``: nowhere). The repository's
            own ``docs/demo`` is written with ``out_dir="docs/demo"`` (``--out docs/demo``).
            Checked before training, as every argument: a file there is refused at once.
        progress: show progress on stderr: a tqdm bar on a terminal (when tqdm is installed),
            else one line per epoch.
        prune_savings: the inference savings (fractions of the forward FLOPs, in [0, 1]) at
            which each trained model is pruned (``()``: none); the largest is checked to be
            within reach before training.
        prune_batches: how many training batches (of ``batch_size`` images, drawn by the run's
            seed) the greedy rule chooses sites on.
    """
    from fxsd.tools.models import cifar_resnet
    from fxsd.transform import stochastic_depth

    _check(epochs, seeds, depth, drop_rate, distribution, batch_size, threads, out_dir)
    savings = _check_pruning(prune_savings, prune_batches, depth)
    if threads:
        torch.set_num_threads(threads)
    data = load_digits()
    settings = dict(epochs=epochs, seeds=list(seeds), depth=depth, drop_rate=drop_rate,
                    distribution=distribution, batch_size=batch_size,
                    threads=torch.get_num_threads(), torch=torch.__version__,
                    train_images=len(data[1]), test_images=len(data[3]),
                    prune_savings=list(savings), prune_batches=prune_batches)
    runs: list[Run] = []
    trained: list[tuple[Run, nn.Module]] = []
    with _bar(2 * len(seeds) * epochs, progress) as bar:
        for seed in seeds:
            for variant in ("baseline", "fxsd"):
                torch.manual_seed(seed)
                model = cifar_resnet(depth)  # the same initial weights for both variants
                if variant == "fxsd":
                    model = stochastic_depth(model, drop_rate, distribution=distribution,
                                                  seed=seed)
                bar.set_description(f"{variant} seed {seed}")
                runs.append(Run(variant, seed, _train(model, data, epochs, batch_size, seed,
                                                      bar)))
                trained.append((runs[-1], model))
    # after all training, so that the training times are measured apart from it
    pruning = _prune_all(trained, data, savings, (prune_batches, batch_size), progress)
    result = DemoResult(runs, settings, pruning)
    if out_dir is not None:
        write(result, Path(out_dir))
    return result


def _check(epochs: int, seeds: Sequence[int], depth: int, drop_rate: float, distribution: str,
           batch_size: int, threads: int | None, out_dir: str | Path | None) -> None:
    """Every argument of :func:`run`, checked before any training (with the API's checks)."""
    from fxsd.arguments import check_int
    from fxsd.decisions.plan import Options
    from fxsd.tools._cli_arguments import check_output_dir
    from fxsd.tools.models import check_cifar_depth

    check_int(epochs, "epochs", minimum=1)
    check_int(batch_size, "batch_size", minimum=1)
    check_int(threads, "threads", minimum=1, optional=True)
    if isinstance(seeds, (str, bytes)) or not isinstance(seeds, Sequence) or not seeds:
        raise InvalidArgumentError(f"seeds must be a non-empty list of ints, got {seeds!r}")
    for seed in seeds:
        check_int(seed, "each seed")
    check_cifar_depth(depth)
    Options.validated(drop_rate, distribution)
    if out_dir is not None:
        check_output_dir(out_dir)


def _check_pruning(savings: Sequence[float], batches: int, depth: int) -> tuple[float, ...]:
    """The sorted, distinct ``savings``; the largest checked to be within the reach of
    ``cifar_resnet(depth)`` (FLOPs do not depend on the weights): before any training."""
    from fxsd.arguments import check_int, check_rate
    from fxsd.pruning.prune import prune
    from fxsd.tools.models import cifar_resnet

    check_int(batches, "prune_batches", minimum=1)
    if isinstance(savings, (str, bytes)) or not isinstance(savings, Sequence):
        raise InvalidTypeError(
            f"prune_savings must be a list of fractions in [0, 1] (() for none), got "
            f"{savings!r}")
    checked = tuple(sorted({check_rate(v, "each of prune_savings") for v in savings}))
    if checked and checked[-1] > 0:  # raises, naming the maximum, when out of reach
        prune(cifar_resnet(depth), checked[-1], strategy="every_other",
                   example_inputs=(torch.zeros(1, 3, 8, 8),))
    return checked


def _prune_all(trained: list[tuple[Run, nn.Module]], data: tuple[torch.Tensor, ...],
               savings: Sequence[float], batches: tuple[int, int], progress: bool
               ) -> list[PrunePoint]:
    """Every trained model pruned at each of ``savings`` (none when there are none)."""
    points: list[PrunePoint] = []
    for done, model in trained if savings else ():
        if progress:
            print(f"pruning the {done.variant} model of seed {done.seed}", file=sys.stderr,
                  flush=True)
        points += _prune(model, done, data, savings, batches, progress)
    return points


def _prune(model: nn.Module, run: Run, data: tuple[torch.Tensor, ...],
           savings: Sequence[float], batches: tuple[int, int], progress: bool
           ) -> list[PrunePoint]:
    """``model`` pruned at each of ``savings`` (the greedy rule on ``batches[0]`` training
    batches of ``batches[1]`` images), each pruned model's test accuracy."""
    from fxsd.pruning.prune import prune
    from fxsd.runtime.accessors import gates
    from fxsd.transform import stochastic_depth

    x, y, x_test, y_test = data
    count, size = batches
    pick = torch.randperm(len(y), generator=torch.Generator().manual_seed(run.seed))
    pick = pick[:count * size]
    chosen_on = list(zip(x[pick].split(size), y[pick].split(size)))
    example = (x_test[:1],)  # FLOPs per image
    model.eval()
    if not gates(model):  # gated once here, not by every prune call
        model = stochastic_depth(model, example_inputs=example, verify=False)
    _, greedy = prune(model, savings[-1], strategy="greedy", data=chosen_on,
                           loss=_cross_entropy, example_inputs=example, return_report=True,
                           progress=progress)

    def greedy_order(gated: nn.Module, flops: Any) -> list[str]:
        return list(greedy.removed)

    points = []
    for target in savings:
        pruned, report = prune(model, target, strategy=greedy_order,
                                    example_inputs=example, return_report=True)
        points.append(PrunePoint(run.variant, run.seed, target, list(report.removed),
                                 report.flops_before, report.flops_after,
                                 _accuracy(pruned, x_test, y_test)))
    return points


def _cross_entropy(output: torch.Tensor, batch: tuple[torch.Tensor, torch.Tensor]
                   ) -> torch.Tensor:
    return F.cross_entropy(output, batch[1])


def write(result: DemoResult, out_dir: Path) -> None:
    """``demo.json``, ``demo.md`` and (with matplotlib) ``demo.png`` and, when the demo pruned,
    ``demo_prune.png`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "demo.json").write_text(json.dumps(
        {"settings": result.settings, "runs": [asdict(r) for r in result.runs],
         "pruning": [asdict(p) for p in result.pruning]}, indent=1))
    s = result.settings
    text = (f"# fxsd demo: ResNet-{s['depth']} on scikit-learn's digits\n\n"
            f"{s['epochs']} epochs, seeds {s['seeds']}, fxsd drop rate {s['drop_rate']} "
            f"{s['distribution']}, batch {s['batch_size']}, {s['threads']} CPU threads, torch "
            f"{s['torch']}; {s['train_images']} training and {s['test_images']} test images.\n\n"
            f"{result.table()}\n\nfxsd's training time is **{result.time_ratio:.2f}×** the "
            "baseline's (means over seeds, measured side by side in one process).\n")
    if result.pruning:
        text += (f"\n## Pruned for inference (fxsd.prune, greedy)\n\nEach trained model with "
                 f"residual branches removed until its forward FLOPs fall by the target, no "
                 f"fine-tuning; sites chosen by the greedy rule on {s['prune_batches']} training "
                 f"batches of {s['batch_size']}. FLOPs per test image (FlopCounterMode).\n\n"
                 f"{result.pruning_table()}\n")
    (out_dir / "demo.md").write_text(text)
    _plot(result, out_dir / "demo.png")
    if result.pruning:
        _plot_pruning(result, out_dir / "demo_prune.png")


def _pyplot(path: Path) -> Any:
    """``matplotlib.pyplot`` (the Agg backend), or ``None`` with a note that ``path`` is not
    drawn: the plots are optional, the tables and JSON are always written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: no {path.name} (pip install 'fxsd[demo]')",
              file=sys.stderr)
        return None
    return plt


def _plot(result: DemoResult, path: Path) -> None:
    plt = _pyplot(path)
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    colors = {"baseline": "#4c72b0", "fxsd": "#dd8452"}
    for r in result.runs:
        t, acc = zip(*r.points)
        label = f"{r.variant}" if r.seed == result.runs[0].seed else None
        ax.plot(t, [100 * a for a in acc], color=colors[r.variant], marker="o", markersize=3,
                linewidth=1.2, alpha=0.85, label=label)
    s = result.settings
    ax.set_xlabel("training wall-clock time (s)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"ResNet-{s['depth']} on digits: baseline vs fxsd "
                 f"(p={s['drop_rate']} {s['distribution']})", fontsize=10)
    low = min(100 * a for r in result.runs for _, a in r.points[len(r.points) // 3:])
    ax.set_ylim(max(0.0, low - 2), 100)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


class _Lines:
    """A progress "bar" of plain lines, for when tqdm is not installed."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.enabled, self.done, self.desc = total, enabled, 0, ""

    def __enter__(self) -> _Lines:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def set_description(self, desc: str) -> None:
        self.desc = desc

    def update(self, n: int) -> None:
        self.done += n
        if self.enabled:
            print(f"[{self.done}/{self.total} epochs] {self.desc}", file=sys.stderr, flush=True)


def _bar(total: int, enabled: bool) -> Any:
    if enabled and sys.stderr.isatty():
        try:
            from tqdm import tqdm
        except ImportError:
            pass
        else:
            return tqdm(total=total, unit="epoch", file=sys.stderr)
    return _Lines(total, enabled)


def _plot_pruning(result: DemoResult, path: Path) -> None:
    """Test accuracy against forward FLOPs per image: each trained variant's mean over seeds
    (a line through the targets), each seed's pruned model as a faint dot."""
    plt = _pyplot(path)
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    colors = {"baseline": "#4c72b0", "fxsd": "#dd8452"}
    targets = sorted({p.target for p in result.pruning})
    for variant in ("baseline", "fxsd"):
        points = [p for p in result.pruning if p.variant == variant]
        if not points:
            continue
        ax.scatter([p.flops / 1e6 for p in points], [100 * p.accuracy for p in points],
                   color=colors[variant], s=10, alpha=0.35)
        means = [[p for p in points if p.target == t] for t in targets]
        ax.plot([statistics.fmean(p.flops for p in at) / 1e6 for at in means],
                [100 * statistics.fmean(p.accuracy for p in at) for at in means],
                color=colors[variant], marker="o", markersize=4, linewidth=1.4,
                label=f"{variant}-trained (mean of {len(means[0])})")
    s = result.settings
    ax.set_xlabel("inference FLOPs per image (M, forward)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"ResNet-{s['depth']} pruned by fxsd.prune (greedy), no fine-tuning: "
                 f"{', '.join(f'{100 * t:.0f}' for t in targets)}% saved", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
