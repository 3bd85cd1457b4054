"""``fxsd.prune``: deploy a model trained with fxsd at the depth an inference budget allows.

Stochastic depth trains a network whose blocks may be missing; LayerDrop (Fan et al., 2020)
showed that such a network loses little when blocks are removed for good at inference, with no
fine-tuning. :func:`prune` makes that one call on any architecture fxsd gates: it removes
residual branches until the model's forward FLOPs fall by ``target_saving``, and returns the
plain model (:func:`fxsd.strip`'s eval computation) without them, their modules and parameters
gone from the module tree and the ``state_dict``.

The cost model. A site's cost is the forward FLOPs its branch performs beyond the branches nested
in it, counted by ``torch.utils.flop_counter`` on the examples in eval mode (one run on fake
tensors: nothing is computed and nothing the model holds changes), like
:func:`fxsd.expected_saving` counts a training step per site. Removing a site saves its cost and
that of every site nested in its branch; the skip, the join and the rest of the model stay.

Which sites go (``strategy``), in order, until the saving meets the target (the shortest such
prefix of the order):

* ``"rates"``: the sites training dropped most first (the gate's rate; on a plain model, the rate
  :func:`fxsd.stochastic_depth`'s default distribution gives: the deepest first); ties: the
  costlier first;
* ``"every_other"``: LayerDrop's rule: the 2nd, 4th, … site in depth order; past half of the
  sites, every other one of those left, and so on;
* ``"greedy"``: with ``data``, one site at a time, each time the one whose removal raises the
  loss on ``data`` least per FLOP saved (LayerDrop's choice on validation data);
* a callable ``strategy(gated, flops)``: given the gated model and each gate's cost (by
  qualified gate name), the gate names in the order to remove them.

>>> import torch, torchvision, fxsd
>>> model = torchvision.models.resnet18().eval()
>>> pruned, report = fxsd.prune(model, 0.2, example_inputs=(torch.randn(1, 3, 64, 64),),
...                             return_report=True)  # doctest: +SKIP
>>> print(report)  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import math
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from tabulate import tabulate
from torch import nn

from fxsd.arguments import check_bool, check_callable, check_examples, close_matches
from fxsd.distributions import check_rate
from fxsd.errors import FxsdError, InvalidArgumentError, InvalidTypeError, Run
from fxsd.gate import BranchGate
from fxsd.graph_module import TreeEditor, copy_tree
from fxsd.passes.prune_branches import remove_branches, unremovable
from fxsd.tables import _fmt_int
from fxsd.training import gated_blocks, named_gates

__all__ = ["prune", "PruneReport", "STRATEGIES", "forward_costs"]

STRATEGIES = ("rates", "every_other", "greedy")
Loss = Callable[[Any, Any], Any]
Strategy = str | Callable[[nn.Module, Mapping[str, int]], Iterable[str]]


@dataclass(frozen=True)
class ForwardCosts:
    """Forward FLOPs on the examples: the whole model's (``total``), each gate's own branch's
    (``sites``, nested gates' branches not included) and each gate's ``enclosing`` gates."""

    total: int
    sites: dict[str, int]
    enclosing: dict[str, tuple[str, ...]]

    def saving(self, removed: Iterable[str]) -> float:
        """The fraction of ``total`` that removing the ``removed`` sites saves."""
        gone = set(removed)
        saved = sum(flops for name, flops in self.sites.items()
                    if name in gone or gone.intersection(self.enclosing[name]))
        return saved / self.total if self.total else 0.0


@dataclass
class PruneReport:
    """What :func:`prune` removed and what it saved; ``print(report)`` shows it as a table.

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
                 f"forward FLOPs {_fmt_int(self.flops_before)} -> {_fmt_int(self.flops_after)}, "
                 f"{self.saving:.1%} saved")
        if self.loss_before is not None:
            text += f"; loss {self.loss_before:.4g} -> {self.loss_after:.4g}"
        return text

    def __str__(self) -> str:
        return self.table()


def prune(
    model: nn.Module,
    target_saving: float | None = None,
    *,
    sites: Iterable[str] | None = None,
    strategy: Strategy = "rates",
    data: Iterable[Any] | None = None,
    loss: Loss | None = None,
    example_inputs: Sequence[Any] | None = None,
    example_kwargs: dict[str, Any] | None = None,
    inplace: bool = False,
    return_report: bool = False,
    progress: bool = True,
) -> Any:
    """Return ``model`` for inference with residual branches removed until its forward FLOPs
    fall by ``target_saving``.

    The result is the plain model :func:`fxsd.strip` gives (gates gone, eval semantics: with
    ``scale="eval"`` kept branches carry their ``1 - p``; the model's class kept) in which each
    removed site's join returns what it computes without its branch (the skip, or its
    projection), and the modules and parameters only removed branches used are gone from the
    module tree and the ``state_dict``; every kept key and tensor is unchanged (shared with
    ``model``, like ``strip``'s result: copy it to fine-tune it on its own). It runs in eval,
    under ``torch.compile`` and through ``torch.export``.

    Args:
        model: a model gated by :func:`fxsd.stochastic_depth` (its trained rates are known), or
            a plain model, which is gated first at the default distribution's rates (no
            verification run). To gate with other options, gate it yourself first.
        target_saving: the fraction of the forward FLOPs on the examples to save, in [0, 1].
            Sites are removed in the strategy's order until the saving meets it (the shortest
            such prefix). More than the order can reach raises, naming the maximum.
        sites: instead of a target: the gate names to remove (``fxsd.table(gated)`` lists them).
        strategy: ``"rates"``, ``"every_other"``, ``"greedy"`` or a callable
            ``strategy(gated, flops) -> gate names in removal order`` (module docstring).
        data: example batches (an iterable, read into memory once): ``"greedy"`` chooses on
            them, and the report gives the loss on them before and after. A batch that is a
            dict is passed as keyword inputs (a Hugging Face batch, ``labels`` included), a
            tuple or list passes its first element (``(inputs, targets)``), a tensor itself.
            Its first batch is the example when none is given.
        loss: ``loss(output, batch) -> number``; default: the output's ``loss`` attribute,
            else its mean.
        example_inputs, example_kwargs: one forward call's inputs, on which FLOPs are counted.
        inplace: replace the pruned blocks in ``model`` itself (also returned).
        return_report: return ``(pruned, report)``, a :class:`PruneReport`.
        progress: show a progress bar of ``"greedy"``'s evaluations (tqdm, on a terminal).

    Raises:
        InvalidTypeError, InvalidArgumentError: bad arguments; no examples; a target above
            what removing every site the strategy orders can save (the message names it).
        FxsdError: the model could not be gated or its FLOPs counted (says why).
    """
    if not isinstance(model, nn.Module):
        raise InvalidTypeError(f"prune expects an nn.Module, got {type(model).__name__}")
    for flag, name in ((inplace, "inplace"), (return_report, "return_report"),
                       (progress, "progress")):
        check_bool(flag, name)
    target = _check_target(target_saving, sites)
    batches = _batches(data)
    loss_fn = _check_loss(loss)
    if sites is None:
        _check_strategy(strategy, batches)
    args, kwargs = _examples(model, example_inputs, example_kwargs, batches)
    gated = _gated(model, args, kwargs)
    blocks = gated_blocks(gated)
    if inplace and "" in blocks:
        raise InvalidArgumentError(
            f"the forward of {type(model).__name__} itself performs residual joins, so its root "
            "is rewritten, which cannot happen in place: use the returned model (inplace=False)")
    work = copy_tree(gated).eval()
    costs = forward_costs(work, args, kwargs)
    found = named_gates(work)
    if sites is not None:
        removed, name = _named_sites(sites, found), "sites"
    else:
        removed = _choose(work, costs, target, strategy, batches, loss_fn, progress)
        name = strategy if isinstance(strategy, str) else getattr(strategy, "__name__", "custom")
    report = _report(found, costs, removed, name, target)
    if batches:
        report.loss_before = _mean_loss(work, batches, loss_fn, ())
        report.loss_after = _mean_loss(work, batches, loss_fn, removed)
    pruned = remove_branches(gated, removed)
    if inplace:
        pruned = _transplant(model, pruned, blocks).eval()
    return (pruned, report) if return_report else pruned


# -- arguments ---------------------------------------------------------------------------------
def _check_target(target_saving: object, sites: object) -> float | None:
    if (target_saving is None) == (sites is None):
        raise InvalidArgumentError(
            "give prune a target_saving= (a fraction of the forward FLOPs) or sites= (the gate "
            f"names to remove), exactly one of them (got target_saving={target_saving!r}, "
            f"sites={sites!r})")
    if target_saving is None:
        if isinstance(sites, (str, bytes)) or not isinstance(sites, Iterable):
            raise InvalidTypeError(f"sites must be a list of gate names, got {sites!r}")
        return None
    return check_rate(target_saving, "target_saving")


def _batches(data: object) -> list[Any]:
    if data is None:
        return []
    if isinstance(data, (torch.Tensor, str, bytes, Mapping)) or not isinstance(data, Iterable):
        raise InvalidTypeError(
            f"data must be an iterable of batches (a list, a DataLoader), got "
            f"{type(data).__name__}: wrap a single batch in a list")
    batches = list(data)
    if not batches:
        raise InvalidArgumentError("data holds no batch: give at least one")
    return batches


def _check_loss(loss: object) -> Loss:
    if loss is None:
        return _default_loss
    return check_callable(loss, "loss", "loss(output, batch)", 2)


def _check_strategy(strategy: object, batches: list[Any]) -> None:
    if callable(strategy):
        check_callable(strategy, "strategy", "strategy(gated, flops)", 2)
        return
    if not isinstance(strategy, str):
        raise InvalidTypeError(f"strategy must be one of {STRATEGIES} or a callable "
                               f"strategy(gated, flops), got {type(strategy).__name__}")
    if strategy not in STRATEGIES:
        raise InvalidArgumentError(f"unknown strategy {strategy!r}: use one of {STRATEGIES} or "
                                   f"a callable{close_matches(strategy, STRATEGIES)}")
    if strategy == "greedy" and not batches:
        raise InvalidArgumentError(
            "strategy='greedy' chooses sites by their loss on data: pass data= (a few batches "
            "of held-out or training data) and, unless the output has a .loss, loss=")


def _call_of(batch: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """How a batch is passed to the model (see :func:`prune`'s ``data``)."""
    if isinstance(batch, Mapping):
        return (), dict(batch)
    if isinstance(batch, (tuple, list)):
        return (batch[0],), {}
    return (batch,), {}


def _examples(model: nn.Module, example_inputs: object, example_kwargs: object,
              batches: list[Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    args, kwargs = check_examples(model, example_inputs, example_kwargs)
    if args is None and kwargs is None:
        if not batches:
            raise InvalidArgumentError(
                "prune counts forward FLOPs on an example: pass example_inputs= (and "
                "example_kwargs=), one forward call's inputs, or data=")
        return _call_of(batches[0])
    return args or (), kwargs or {}


def _gated(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> nn.Module:
    """``model`` if fxsd gated it, else ``model`` gated at the default rates (a new tree)."""
    from fxsd.passes.stochastic_depth import NoResidualSitesWarning, stochastic_depth

    if named_gates(model):
        return model
    with warnings.catch_warnings():
        warnings.simplefilter("error", NoResidualSitesWarning)
        try:
            return stochastic_depth(model, example_inputs=args, example_kwargs=kwargs or None,
                                    verify=False)
        except NoResidualSitesWarning:
            raise InvalidArgumentError(
                f"fxsd found no residual site in {type(model).__name__}, so there is nothing to "
                "prune; fxsd.table(model, rejected=True) says why each add was rejected"
            ) from None


def _named_sites(sites: Iterable[str], found: dict[str, BranchGate]) -> list[str]:
    names = list(dict.fromkeys(sites))
    for name in names:
        if name not in found:
            raise InvalidArgumentError(
                f"sites names {name!r}, which is not a gate of the model"
                f"{close_matches(name, found)}; fxsd.table(fxsd.stochastic_depth(model)) lists "
                "the gate names")
        why = unremovable(found[name])
        if why:
            raise InvalidArgumentError(f"sites names {name!r}, which cannot be removed: {why}")
    return names


# -- costs ---------------------------------------------------------------------------------------
def forward_costs(model: nn.Module, example_inputs: Sequence[Any] = (),
                  example_kwargs: Mapping[str, Any] | None = None) -> ForwardCosts:
    """Count the gated ``model``'s forward in eval on the examples, each FLOP charged to the
    innermost gate whose branch issued it (:class:`fxsd.budget._Attribution`'s forward half).

    Runs on fake tensors; a model that cannot is run for real (its buffers and the random
    generators restored).

    Raises:
        ModelRunError: the model raised on the examples (names the module).
    """
    args, kwargs = tuple(example_inputs), dict(example_kwargs or {})
    try:
        return _count(model, args, kwargs, fake=True)
    except Exception as fake_error:  # noqa: BLE001 - data-dependent code: count a real run
        try:
            return _count(model, args, kwargs, fake=False)
        except FxsdError:
            raise
        except Exception as exc:
            raise FxsdError(
                f"could not count the forward FLOPs of {type(model).__name__} on the example "
                f"inputs: {type(exc).__name__}: {exc} (on fake tensors: "
                f"{type(fake_error).__name__}: {fake_error})") from exc


def _count(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
           fake: bool) -> ForwardCosts:
    from torch.nn.utils.stateless import _reparametrize_module
    from torch.utils.flop_counter import FlopCounterMode

    from fxsd.budget import _Attribution, _faked
    from fxsd.preserve import fake_tensors, model_run, preserved

    gates = named_gates(model)
    # with autograd on, as a training step's forward: under no_grad an nn.MultiheadAttention takes
    # its fused path, whose FLOPs torch.utils.flop_counter does not count
    with preserved(model), warnings.catch_warnings(), \
            (fake_tensors() if fake else nullcontext()) as mode:
        warnings.simplefilter("ignore")
        state: dict[str, torch.Tensor] = {}
        if mode is not None:
            named = {**dict(model.named_parameters(remove_duplicate=False)),
                     **dict(model.named_buffers(remove_duplicate=False))}
            state = {k: mode.from_tensor(v) for k, v in named.items()}
            args, kwargs = _faked((args, kwargs), mode)
        reparam = _reparametrize_module(model, state, tie_weights=True) if fake else None
        with reparam or nullcontext(), FlopCounterMode(display=False) as counter, \
                model_run(model, Run.ABSTRACT if fake else Run.EXAMPLE):
            seen = _Attribution(counter)
            handles = [h for name, gate in gates.items() for h in (
                gate.register_forward_pre_hook(lambda m, a, name=name: seen.enter(name, a)),
                gate.register_forward_hook(lambda m, a, out: seen.leave(out)))]
            try:
                model.eval()
                model(*args, **kwargs)
            finally:
                for h in handles:
                    h.remove()
            seen.switch(None)
    enclosing = {}
    for name in gates:
        chain, up = [], seen.parent.get(name)
        while up is not None:
            chain.append(up)
            up = seen.parent.get(up)
        enclosing[name] = tuple(chain)
    return ForwardCosts(int(counter.get_total_flops()),
                        {name: int(seen.flops.get(name, 0)) for name in gates}, enclosing)


# -- choosing ------------------------------------------------------------------------------------
def _choose(work: nn.Module, costs: ForwardCosts, target: float, strategy: Strategy,
            batches: list[Any], loss_fn: Loss, progress: bool) -> list[str]:
    found = named_gates(work)
    candidates = [n for n, g in found.items() if not unremovable(g)]
    if strategy == "greedy":
        _check_reach(costs, candidates, target, "removing every site that can be removed")
        return _greedy(work, costs, candidates, target, batches, loss_fn, progress)
    if callable(strategy):
        order = _custom_order(strategy, work, costs, candidates)
        what = "removing every site the strategy returned"
    elif strategy == "every_other":
        order, what = _every_other(found, candidates), "removing every site"
    else:
        order, what = _by_rate(found, costs, candidates), "removing every site"
    _check_reach(costs, order, target, what)
    for n in range(len(order) + 1):
        if costs.saving(order[:n]) >= target - 1e-12:
            return order[:n]
    raise AssertionError("unreachable: the reach was checked")  # pragma: no cover


def _check_reach(costs: ForwardCosts, order: list[str], target: float, what: str) -> None:
    reach = costs.saving(order)
    if target > reach + 1e-12:
        raise InvalidArgumentError(
            f"target_saving={target:g} is out of reach: {what} saves at most {reach:.4f} "
            f"({reach:.1%}) of the forward FLOPs on the examples. Ask for at most that")


def _by_rate(found: dict[str, BranchGate], costs: ForwardCosts,
             candidates: list[str]) -> list[str]:
    position = {name: i for i, name in enumerate(found)}
    return sorted(candidates, key=lambda n: (-found[n].drop_rate, -costs.sites[n], position[n]))


def _every_other(found: dict[str, BranchGate], candidates: list[str]) -> list[str]:
    """The 2nd, 4th, … site in depth order, then every other one of those left, and so on."""
    position = {name: i for i, name in enumerate(found)}
    left = sorted(candidates, key=lambda n: (found[n].info.depth, position[n]))
    order: list[str] = []
    while left:
        order += left[1::2] if len(left) > 1 else left
        left = left[0::2] if len(left) > 1 else []
    return order


def _custom_order(strategy: Callable[..., Iterable[str]], work: nn.Module,
                  costs: ForwardCosts, candidates: list[str]) -> list[str]:
    order = list(dict.fromkeys(strategy(work, dict(costs.sites))))
    allowed = set(candidates)
    for name in order:
        if name not in allowed:
            found = named_gates(work)
            why = unremovable(found[name]) if name in found else "it is not a gate of the model"
            raise InvalidArgumentError(
                f"the strategy returned {name!r}, which cannot be removed: {why}"
                f"{close_matches(name, allowed) if name not in found else ''}")
    return order


def _greedy(work: nn.Module, costs: ForwardCosts, candidates: list[str], target: float,
            batches: list[Any], loss_fn: Loss, progress: bool) -> list[str]:
    """Remove, one at a time, the site whose removal raises the loss least per FLOP saved."""
    removed: list[str] = []
    with _bar(progress) as bar:
        current = _mean_loss(work, batches, loss_fn, removed)
        while costs.saving(removed) < target - 1e-12:
            saved = costs.saving(removed)
            best: tuple[float, str, float] | None = None
            for name in candidates:
                gain = costs.saving([*removed, name]) - saved
                if name in removed or gain <= 0:  # gone already, or inside a removed branch
                    continue
                value = _mean_loss(work, batches, loss_fn, [*removed, name])
                bar.update(1)
                score = (value - current) / gain
                if best is None or score < best[0]:
                    best = (score, name, value)
            assert best is not None  # the reach was checked
            removed.append(best[1])
            current = best[2]
    return removed


def _default_loss(output: Any, batch: Any) -> Any:
    value = getattr(output, "loss", None)
    if value is None and isinstance(output, Mapping):
        value = output.get("loss")
    if value is None:
        value = output[0] if isinstance(output, (tuple, list)) else output
        if not isinstance(value, torch.Tensor):
            raise InvalidTypeError(
                f"the model's output ({type(output).__name__}) has no loss and is not a tensor: "
                "pass loss=, a callable loss(output, batch)")
        return value.float().mean()
    return value


def _mean_loss(work: nn.Module, batches: list[Any], loss_fn: Loss,
               removed: Iterable[str]) -> float:
    """The mean of ``loss_fn`` over ``batches`` with the ``removed`` branches left out."""
    total = 0.0
    with _removing(work, removed), torch.no_grad():
        for batch in batches:
            args, kwargs = _call_of(batch)
            value = loss_fn(work(*args, **kwargs), batch)
            number = float(value.detach()) if isinstance(value, torch.Tensor) else float(value)
            if not math.isfinite(number):
                warnings.warn(f"fxsd.prune: the loss is {number} on a batch", stacklevel=4)
            total += number
    return total / len(batches)


@contextlib.contextmanager
def _removing(work: nn.Module, removed: Iterable[str]) -> Iterator[None]:
    """``work`` (gated, in eval) computes the pruned model: each removed gate returns its join
    without the branch, as the stripped model will."""
    gates = named_gates(work)
    saved = {name: (gates[name].scale, gates[name].drop_rate) for name in removed}
    try:
        for name in saved:
            gates[name].scale, gates[name].drop_rate = "eval", 1.0
        yield
    finally:
        for name, (scale, rate) in saved.items():
            gates[name].scale, gates[name].drop_rate = scale, rate


class _NoBar:
    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def update(self, n: int) -> None:
        pass


def _bar(enabled: bool) -> Any:
    if enabled and sys.stderr.isatty():
        try:
            from tqdm import tqdm
        except ImportError:
            pass
        else:
            return tqdm(desc="fxsd.prune greedy", unit="eval", file=sys.stderr)
    return _NoBar()


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


def _transplant(model: nn.Module, pruned: nn.Module, blocks: Iterable[str]) -> nn.Module:
    """Put ``pruned``'s blocks into ``model`` (the outermost rewritten ones carry the rest)."""
    tree = TreeEditor(model, in_place=True)
    done: list[str] = []
    for path in sorted(blocks, key=lambda p: p.count(".")):
        if any(path.startswith(d + ".") for d in done):
            continue
        tree.replace(path, pruned.get_submodule(path))
        done.append(path)
    return model
