"""The entry point: :func:`stochastic_depth` runs fxsd's pipeline on a model.

trace and analyse (:func:`fxsd.analyze_residuals`) → decide (:func:`fxsd.decisions.plan.plan_gates`,
the model's own drops included) → rewrite (:func:`fxsd.passes.gate_residuals.gate_residuals`,
which applies the plan) → scale the rates to a ``target_saving`` (:mod:`fxsd.decisions.budget`)
→ check the promises on the examples (``verify=True``: :mod:`fxsd.checks`). Arguments are
checked once, up front (:meth:`fxsd.decisions.plan.Options.validated`).

>>> import torchvision, fxsd
>>> model = fxsd.stochastic_depth(torchvision.models.resnet18(), 0.1)
>>> type(model).__name__, len(fxsd.gates(model))
('ResNet', 8)
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from fxsd.analysis.analyze import analyze_residuals
from fxsd.analysis.sites import ResidualAnalysis, ResidualSite
from fxsd.arguments import LeafSpec
from fxsd.checks import plain_run, verify_transform
from fxsd.decisions.budget import scale_to_target
from fxsd.decisions.distributions import Distribution
from fxsd.decisions.plan import Options, plan_gates, select_sites
from fxsd.decisions.step_costs import defer_step_costs, record_step_costs
from fxsd.errors import InvalidArgumentError, InvalidTypeError, NoResidualSitesWarning
from fxsd.module_tree import copy_tree
from fxsd.passes.gate_residuals import gate_residuals
from fxsd.preserve import guarded
from fxsd.runtime.accessors import gates
from fxsd.runtime.distributed import rank
from fxsd.runtime.sampler import DropSampler
from fxsd.tracing.layer_drop import find_layer_drops

__all__ = ["stochastic_depth"]


@guarded("stochastic_depth")
def stochastic_depth(
    model: nn.Module,
    drop_rate: float | None = None,
    *,
    target_saving: float | None = None,
    distribution: Distribution | None = None,
    mode: str | None = None,
    scale: str | None = None,
    sample_impl: str | None = None,
    existing: str = "adopt",
    seed: int | None = None,
    sync_ranks: bool = True,
    select: Callable[[ResidualSite], bool] | None = None,
    inplace: bool = False,
    example_inputs: Sequence[Any] | None = None,
    example_kwargs: dict[str, Any] | None = None,
    tracing: str = "auto",
    leaf_modules: Iterable[LeafSpec] | None = None,
    concrete_args: dict[str, Any] | None = None,
    verify: bool = True,
) -> nn.Module:
    """Return ``model`` with its residual branches dropping at random in training.

    In block mode each residual site draws once per training forward: with probability ``p_l`` its
    branch is skipped (neither its forward nor its backward runs; its parameters get no gradient)
    and the site returns the skip; otherwise it returns ``skip + branch / (1 - p_l)``
    (``scale="train"``, timm's and torchvision's convention), so in eval every branch runs
    unscaled and the eval model *is* the plain model: its ``state_dict`` can be loaded into the
    untransformed model as it is. ``.train()`` and ``.eval()`` switch between the two at any time.

    The result is ``model`` itself, structurally: the same class, attributes, methods and module
    tree, in which each module whose ``forward`` performs residual joins (a ``Bottleneck``, an
    ``EncoderBlock``) is replaced by a gated ``GraphModule`` that is still an instance of that
    module's class. ``print(result.layer1[0].code)`` shows the block with its gate. Every module of
    the result is a new object (so ``result.train()``, a hook or an attribute set on it never
    reaches ``model``) over the same parameter and buffer tensors (no memory is copied; training
    one trains the other), and ``state_dict`` keys are identical. When the
    root's own ``forward`` performs joins, the root is rewritten too (an instance of a subclass of
    ``type(model)``).

    **Explicit beats adopted.** A model that carries its own drop paths (timm ``DropPath``,
    torchvision ``StochasticDepth``) keeps its own schedule when neither ``drop_rate`` nor
    ``distribution`` is given: each drop path becomes a gate with the op's rate, and sites
    without one keep rate 0. Given a ``drop_rate`` or a ``distribution``, fxsd's schedule sets
    every site's rate; the drop paths still become gates (nothing drops twice), their rates
    replaced. ``mode``/``scale`` work the same way: given, they apply everywhere; not given, an
    adopted drop path keeps its own, and other sites use ``"block"``/``"train"``.

    Args:
        model: an ``nn.Module`` or an already traced ``GraphModule``.
        drop_rate: the largest drop rate (``linear``, ``linspace``) or every site's rate
            (``uniform``). Default: the model's own drop-path rates if it has drop paths, else 0.1.
        target_saving: instead of ``drop_rate``: the expected fraction of a training step's
            compute (forward + backward FLOPs of the whole model on ``example_inputs``, which it
            needs) that the drops should save. fxsd scales ``distribution``'s rates (any of
            them, a per-site list or callable included) by one factor until
            :func:`fxsd.expected_saving` is the target; like an explicit rate, it also sets the
            rates of adopted drop paths. A site saves ``p_l`` times its branch's forward and
            backward FLOPs (:mod:`fxsd.decisions.budget`). The model-wide rate becomes the largest
            site rate. A target beyond the distribution's reach (largest rate 1) raises
            :class:`~fxsd.FxsdError` naming the largest reachable saving.
        distribution: ``"linear"`` (depth ``l`` of ``L`` drops at ``drop_rate * l / L``),
            ``"linspace"`` (``drop_rate * (l - 1) / (L - 1)``, timm's and torchvision's rule),
            ``"exponential"`` (LayerSkip's ``drop_rate * (2 ** ((l - 1) / (L - 1)) - 1)``),
            ``"uniform"``, a sequence of per-site rates in execution order (a list, tuple, 1-D
            tensor or NumPy array, such as timm's ``torch.linspace(0, 0.2, depth)``), or a
            callable ``(depth, L) -> rate``. Default ``"linear"``.
        mode: ``"block"`` (one decision per site per forward, for the whole batch) or
            ``"sample"`` (one per example). Default ``"block"`` (or an adopted drop path's).
        scale: ``"train"`` (kept branches ÷ (1 − p) in training, identity at inference: timm,
            torchvision, DINOv2; the default, or an adopted drop path's own), ``"eval"`` (branch
            × (1 − p) at inference: the paper, Composer; its weights need
            :func:`fxsd.plain_state_dict` before a plain model can use them) or ``"none"``.
        sample_impl: for ``mode="sample"``: ``"subset"`` (run the branch on the kept rows only;
            exact for branches that treat rows independently), ``"mask"`` (run it on every row and
            multiply by the row mask) or ``None``: subset where exact, else mask.
        existing: what to do with drop-path ops already in a branch (timm ``DropPath``,
            torchvision ``StochasticDepth``): ``"adopt"`` removes each and gives its site the op's
            own rate, mode and scaling (where not given explicitly), so the same regularisation
            now saves compute; ``"replace"`` removes them and applies fxsd's settings;
            ``"keep"`` leaves them in the branches.
        seed: seed of the gates' host-side generators. ``None`` takes ``torch.initial_seed()``,
            so ``torch.manual_seed`` makes runs reproducible; no global generator is drawn from.
        sync_ranks: under ``torch.distributed``, every rank draws the same decisions (``True``,
            Composer's ``use_same_gpu_seed``) or each rank its own stream (``False``: the seed is
            offset by the rank, read from the default process group or ``$RANK``).
        select: gate only the sites for which ``select(site)`` is true (a
            :class:`~fxsd.ResidualSite`); depths ``1..L`` are then counted over those sites.
        inplace: gate ``model`` itself and return it (the owning modules are replaced in their
            parents) instead of a new module tree over the same tensors.
        example_inputs: optional positional inputs of one forward call; lets the analysis check
            shapes (broadcasting adds are never gated) and count FLOPs for :func:`fxsd.table`,
            and is what a model that cannot be traced whole is traced by example with.
        example_kwargs: keyword inputs of that call (``input_ids=..., attention_mask=...``).
        tracing: ``"auto"`` (the whole model; by example when that fails and examples are
            given), ``"symbolic"`` or ``"example"`` (see :func:`fxsd.analyze_residuals`). By
            example, fxsd runs the model once and traces its largest traceable modules along
            their recorded calls: Hugging Face transformers 5.x decoder and encoder layers.
        leaf_modules: module classes, qualified names or module objects not to trace through
            (added to timm's not-traceable registry when timm is installed).
        concrete_args: passed to the tracer.
        verify: with example inputs, check the result before returning it (one eval forward
            of the plain and of the gated model, :func:`fxsd.checks.verify_transform`): its
            output must be bit-identical to the plain model's and every gate must be called as
            often as its join runs, else :class:`fxsd.checks.VerificationError` names the
            first block or gate at fault. :func:`fxsd.check` verifies every promise.

    Raises:
        InvalidTypeError, InvalidArgumentError: bad arguments (also: ``inplace=True`` when the
            root's own ``forward`` performs joins, which cannot be rewritten in place).
        TraceError: the model cannot be traced (names the module at fault).

    Example:
        >>> import torch, torchvision, fxsd
        >>> model = fxsd.stochastic_depth(torchvision.models.resnet50(), 0.2, seed=0)
        >>> type(model).__name__, model.layer4[2].residual_gate
        ('ResNet', BranchGate('layer4.2.residual_gate', depth=16/16, drop_rate=0.2, skip=identity))
        >>> loss = model(torch.randn(2, 3, 224, 224)).sum()  # some blocks skipped
    """
    if not isinstance(model, nn.Module):
        raise InvalidTypeError(
            f"stochastic_depth expects an nn.Module, got {type(model).__name__}"
        )
    if gates(model):
        raise InvalidArgumentError(
            f"{type(model).__name__} is already gated by fxsd: change its rates with "
            "fxsd.set_drop_rate(model, rate), or transform the original model again"
        )
    options = Options.validated(
        drop_rate, distribution, target_saving, mode=mode, scale=scale, sample_impl=sample_impl,
        existing=existing, seed=seed, sync_ranks=sync_ranks, select=select, inplace=inplace,
        example_inputs=example_inputs, example_kwargs=example_kwargs, tracing=tracing,
        leaf_modules=leaf_modules, concrete_args=concrete_args, verify=verify, model=model)
    analysis = analyze_residuals(
        model, example_inputs, example_kwargs=example_kwargs, tracing=tracing,
        leaf_modules=leaf_modules, concrete_args=concrete_args,
    )
    if select is not None:
        select_sites(analysis, select)
    if not analysis.sites:
        warnings.warn(
            f"fxsd found no residual site to gate in {type(model).__name__} "
            f"({len(analysis.rejected)} adds rejected); the model is returned unchanged. "
            "Inspect the adds with fxsd.table(model, rejected=True).",
            NoResidualSitesWarning,
            stacklevel=2,
        )
        return model if inplace else copy_tree(model)
    base = torch.initial_seed() if seed is None else seed
    if not sync_ranks:
        base += 1_000_003 * rank()
    layer_drops = find_layer_drops(model)
    examples = (options.example_inputs, options.example_kwargs)
    verifying = options.verify and examples != (None, None)
    # gated in place, the plain model is gone afterwards: its reference run comes first
    reference = plain_run(model, _site_owners(analysis), *examples) \
        if verifying and inplace else model
    gated = gate_residuals(analysis, plan_gates(analysis, options, layer_drops),
                           DropSampler(base, sync_ranks), model, inplace=inplace)
    _budget(gated, options)
    if verifying:
        verify_transform(reference, gated, *examples)
    return gated


def _site_owners(analysis: ResidualAnalysis) -> list[str]:
    """Every module that may own a site's join: the module performing it and those above."""
    paths = {""}
    for site in analysis.sites:
        atoms = site.module_path.split(".") if site.module_path else []
        paths.update(".".join(atoms[:i]) for i in range(1, len(atoms) + 1))
    return sorted(paths)


def _budget(gated: nn.Module, options: Options) -> None:
    """Given a ``target_saving``, count the step costs on the examples and scale the planned
    rates to it; otherwise leave the count to whatever asks for the costs later (a table, the
    bench), so that a transform pays no FLOP count it does not use. The costs are counted on
    the gated model: only there is each branch its own module, so every FLOP of the step,
    backward included, can be charged to one site."""
    args, kwargs = options.example_inputs, options.example_kwargs
    if args is None and kwargs is None:
        return
    args = (args,) if isinstance(args, torch.Tensor) else tuple(args or ())
    if options.target_saving is None:
        defer_step_costs(gated, args, kwargs)
        return
    record_step_costs(gated, args, kwargs, real_run=True)
    dist = options.distribution
    describe = (f"the {dist!r} distribution" if isinstance(dist, str) else
                "the given per-site rates" if not callable(dist) else
                "the given rate function")
    scale_to_target(gated, options.target_saving, describe)
