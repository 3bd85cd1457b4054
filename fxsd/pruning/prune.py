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

import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from fxsd.arguments import check_bool, check_callable, check_examples, check_rate, close_matches
from fxsd.errors import InvalidArgumentError, InvalidTypeError
from fxsd.module_tree import TreeEditor, copy_tree
from fxsd.passes.prune_branches import remove_branches, unremovable
from fxsd.pruning._costs import forward_costs
from fxsd.pruning._strategies import Loss, Strategy, _call_of, _choose, _default_loss, _mean_loss
from fxsd.pruning.report import _report
from fxsd.runtime.accessors import gated_blocks, named_gates
from fxsd.runtime.gate import BranchGate

__all__ = ["prune", "STRATEGIES"]

STRATEGIES = ("rates", "every_other", "greedy")


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
        return_report: return ``(pruned, report)``, a :class:`~fxsd.pruning.report.PruneReport`.
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
    from fxsd.errors import NoResidualSitesWarning
    from fxsd.transform import stochastic_depth

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


# -- the result ----------------------------------------------------------------------------------
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
