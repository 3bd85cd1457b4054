"""The stochastic-depth pass: gate the branch of every residual site, inside the modules that own
them.

Each residual add ``skip + branch(fork, *side)`` found by :func:`fxsd.analyze_residuals` becomes a
call of a :class:`~fxsd.runtime.gate.BranchGate`. The rewrite happens in the module whose
``forward`` owns the join (:func:`fxsd.decisions.owners.plan_owners`: a torchvision ``Bottleneck``,
a ViT ``EncoderBlock``, a BERT layer): that module is cut out of the whole-model trace
(:mod:`fxsd.passes.extract_module`), its branch nodes move into a small ``GraphModule`` that the
gate runs only when the branch is kept, and the gated module takes the original's place in the
model. Every other module, the root's class included, stays as it was.

Within a module, sites are rewritten in execution order, so that a site nested inside another
site's branch is already a gate call when the outer branch is cut out.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule, Node

from fxsd.analysis.analyze import analyze_residuals
from fxsd.analysis.ops import is_metadata_read, node_order
from fxsd.analysis.shared_work import ShareKind
from fxsd.analysis.sites import ResidualAnalysis, ResidualSite
from fxsd.checks import plain_run, verify_transform
from fxsd.decisions.budget import defer_step_costs, record_step_costs, scale_to_target
from fxsd.decisions.distributions import Distribution
from fxsd.decisions.layer_drop import find_layer_drops, settle_layer_drops
from fxsd.decisions.owners import Owner, plan_owners, warn_root_joins
from fxsd.decisions.plan import GatePlan, Options, join_notes, plan_gates, select_sites
from fxsd.errors import InvalidArgumentError, InvalidTypeError
from fxsd.graph_module import module_from_graph
from fxsd.module_tree import TreeEditor, copy_tree, deepest_first
from fxsd.passes.extract_module import extract_module
from fxsd.passes.gate_site import CutSite, call_gate, cut_site
from fxsd.preserve import guarded
from fxsd.record import FxsdRecord, get_record
from fxsd.runtime.accessors import gates
from fxsd.runtime.distributed import rank
from fxsd.runtime.gate import BranchGate
from fxsd.runtime.gate_info import GateInfo
from fxsd.runtime.recompute import checkpointing
from fxsd.runtime.sampler import DropSampler
from fxsd.runtime.variants import allow_other_calls
from fxsd.tracing.tracer import LeafSpec
from fxsd.training.folding import warn_on_save

__all__ = ["stochastic_depth", "gate_residuals", "InlinedHooksWarning",
           "NoResidualSitesWarning", "NoSavingWarning", "BlockModeWarning"]

class NoResidualSitesWarning(UserWarning):
    """The model has no residual site (or none selected), so the pass changed nothing."""


class NoSavingWarning(UserWarning):
    """No gate of the transformed model can save compute: every gated branch runs in sample mode
    with the mask implementation (its branch mixes batch rows), which computes every row and
    multiplies the dropped ones by 0. ``mode="block"`` skips whole branches."""


class BlockModeWarning(UserWarning):
    """Adopted per-row drop paths (torchvision ``"row"``, timm ``DropPath``) run in block mode:
    their branches mix batch rows (BatchNorm), so per-row drops would need the mask and save
    nothing. ``mode="sample"`` keeps per-row drops (and saves nothing)."""


class InlinedHooksWarning(UserWarning):
    """A module with hooks, or one whose call is checkpointed, had to be inlined into the gated
    module that owns a join: its hooks will not run any more, its call is not checkpointed."""


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
            of the plain and of the gated model, :func:`fxsd.verify.verify_transform`): its
            output must be bit-identical to the plain model's and every gate must be called as
            often as its join runs, else :class:`fxsd.verify.VerificationError` names the
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
    settle_layer_drops(gated, layer_drops, analysis.sites, get_record(gated).rewritten,
                       existing)
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


def gate_residuals(analysis: ResidualAnalysis, plan: GatePlan, sampler: DropSampler,
                   model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Gate ``analysis.sites`` of ``model`` (the model ``analysis`` was made from) as ``plan``
    says (:func:`fxsd.decisions.plan.plan_gates`). Returns ``model`` itself with ``inplace=True``,
    else a
    new module tree over the same tensors."""
    parts = analysis.parts()  # one graph, or the modules traced one by one
    planned = [(part, owner) for part in parts for owner in plan_owners(part, part.sites)]
    for part in parts:
        _warn_inlined_hooks(part, [o for p, o in planned if p is part])
    if inplace and any(not o.path for _, o in planned):
        raise InvalidArgumentError(
            f"the forward of {type(model).__name__} itself performs residual joins, so its root "
            "module must be rewritten, which cannot happen in place: use the returned model "
            "(inplace=False)")
    warn_root_joins(model, [o for _, o in planned], stacklevel=3)
    record = FxsdRecord(
        drop_rate=plan.drop_rate, num_levels=analysis.num_levels,
        live_leaves=tuple(leaf for part in parts for leaf in
                          part.graph_module.meta["fxsd"].live_leaves),
        rejected=tuple(analysis.rejected),
        total_flops=analysis.total_flops,
        traced=tuple(part.path for part in analysis.units),
        untraced=tuple(analysis.untraced))
    tree = TreeEditor(model, in_place=inplace)
    for part, owner in deepest_first(planned, lambda po: po[1].path):
        module = tree.locate(owner.path)[2]
        tree.replace(owner.path, _gate_owner(part, owner, module, plan, sampler, record))
    owners = [o for _, o in planned]
    position = {path: i for i, (path, _) in enumerate(model.named_modules())}
    rewritten = sorted(owners, key=lambda o: position[o.path])
    record.rewritten = tuple(o.path for o in rewritten)
    record.original_classes = tuple(type(_resolve(model, o.path)).__name__ for o in rewritten)
    if any(g.scale == "eval" for g in gates(tree.root)):
        warn_on_save(tree.root)
    _warn_savings(plan, type(model).__name__)
    return tree.root


def _warn_savings(plan: GatePlan, name: str) -> None:
    """Say when the plan saves no compute, or runs adopted per-row drop paths in block mode."""
    specs = list(plan.specs.values())
    blocked = sum(spec.row_drops_blocked for spec in specs)
    if blocked:
        warnings.warn(
            f"{blocked} adopted per-row drop path{'s' * (blocked != 1)} of {name} run in block "
            "mode (one draw per site for the whole batch): their branches mix batch rows "
            "(BatchNorm), so per-row drops would need the mask, which computes every row and "
            "saves nothing. Pass mode='sample' to keep per-row drops.",
            BlockModeWarning, stacklevel=5)
    masked = [s for s in specs if s.mode == "sample" and s.sample_impl == "mask"]
    # a site at rate 0 whose rate never moves (weight 0: adopted, no drop path) saves nothing
    saving = [s for s in specs if not (s.mode == "sample" and s.sample_impl == "mask")
              and (s.drop_rate > 0 or s.rate_weight > 0)]
    if masked and not saving:
        why = next((s.sample_note for s in masked if s.sample_note), "")
        warnings.warn(
            f"fxsd's gates in {name} save no compute: every gated branch runs in sample mode "
            "with the mask implementation, which computes every row and zeroes the dropped "
            f"ones{f' ({why})' if why else ''}. Pass mode='block' to skip whole branches.",
            NoSavingWarning, stacklevel=5)


def _warn_inlined_hooks(analysis: ResidualAnalysis, owners: Sequence[Owner]) -> None:
    for owner in owners:
        for index in sorted(owner.inline):
            call = analysis.calls.calls[index]
            module = call.module
            if module._forward_hooks or module._forward_pre_hooks or module._backward_hooks \
                    or getattr(module, "_backward_pre_hooks", None):
                warnings.warn(
                    f"'{call.path}' ({call.type_name}) has hooks, but its forward performs part "
                    f"of a residual join that '{owner.path or '<root>'}' gates, so its code is "
                    "copied into that module's graph and its hooks will not run. Register them "
                    f"on '{owner.path or '<root>'}' or on the modules it calls instead.",
                    InlinedHooksWarning, stacklevel=4)
            how = checkpointing(module)
            if how is not None:
                warnings.warn(
                    f"'{call.path}' ({call.type_name}) is {how}, but its forward performs part "
                    f"of a residual join that '{owner.path or '<root>'}' gates, so its code is "
                    "copied into that module's graph and its call will not be checkpointed. "
                    f"Checkpoint '{owner.path or '<root>'}' (or a module above it) instead.",
                    InlinedHooksWarning, stacklevel=4)


def _gate_owner(analysis: ResidualAnalysis, owner: Owner, module: nn.Module, plan: GatePlan,
                sampler: DropSampler, record: FxsdRecord) -> GraphModule:
    """Rewrite ``module`` (the owner) as a GraphModule with one gate per owned site."""
    cut = extract_module(analysis, owner, module)
    graph = cut.graph
    order = node_order(graph)
    rewritten: dict[Node, Node] = {}  # rewritten add -> the node standing for it now
    for i, site in enumerate(owner.sites):
        spec, name = plan.spec(site), owner.gate_names[i]
        piece = cut_site(cut, site, spec.drops, rewritten, order, name)
        note = join_notes(spec.note, f"returns None for unused {', '.join(piece.released)}"
                          if piece.released else "", _escape_note(piece), _shared_note(piece))
        cut.extra_attrs[name] = BranchGate(
            piece.branch_module, spec.drop_rate, sampler, identity=piece.identity,
            clone_on_drop=spec.clone_on_drop,
            info=GateInfo.from_site(site, record.num_levels, owner.gate_path(i), spec.fold),
            mode=spec.mode, scale=spec.scale, sample_impl=spec.sample_impl,
            note=join_notes(note, spec.sample_note), rate_weight=spec.rate_weight,
            drop_path=spec.drop_path, record=record, escape_path=piece.escape_path)
        # a new module starts in training mode: a model gated in eval mode must stay in it
        cut.extra_attrs[name].training = module.training
        call_gate(graph, piece, name, rewritten, order)
    for node in reversed(graph.nodes):  # shape reads left behind (a message built from x.shape)
        if not node.users and is_metadata_read(node):
            graph.erase_node(node)
    graph.lint()
    allow_other_calls(graph, type(module))  # calls its guards refuse: it traces itself again
    gated = module_from_graph(module, graph, cut.extra_attrs)
    gated.meta["fxsd"] = record
    return gated


def _shared_note(piece: CutSite) -> str:
    """What else the branch's work feeds, dropped with it (:mod:`fxsd.analysis.shared_work`)."""
    joins = [u.consumer.name for u in piece.shared if u.kind is ShareKind.JOIN]
    cats = [u.consumer.name for u in piece.shared if u.kind is ShareKind.ZEROS]
    return join_notes(f"one gate for {', '.join([piece.add.name, *joins])}" if joins else "",
                      f"gives {', '.join(cats)} zeros when dropped" if cats else "")


def _escape_note(piece: CutSite) -> str:
    path = piece.escape_path
    if path is None:
        return ""
    escapes = piece.branch.escapes
    produced = [n.name for n in escapes.values if n not in escapes.unproduced]
    return join_notes(
        f"hands on {', '.join(path.names)}",
        f"when dropped, {', '.join(produced)} from shapes "
        f"({', '.join(n.name for n in escapes.abstract)})" if produced else "",
        f"when dropped, {', '.join(n.name for n in escapes.unproduced)} raises on use "
        "(DroppedValue)" if escapes.unproduced else "")


def _resolve(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(path) if path else model

