"""The stochastic-depth pass: gate the branch of every residual site, inside the modules that own
them.

Each residual add ``skip + branch(fork, *side)`` found by :func:`fxsd.analyze_residuals` becomes a
call of a :class:`~fxsd.gate.BranchGate`. The rewrite happens in the module whose ``forward``
owns the join (:func:`fxsd.owners.plan_owners`: a torchvision ``Bottleneck``, a ViT
``EncoderBlock``, a BERT layer): that module is cut out of the whole-model trace
(:mod:`fxsd.passes.extract_module`), its branch nodes move into a small ``GraphModule`` that the
gate runs only when the branch is kept, and the gated module takes the original's place in the
model. Every other module, the root's class included, stays as it was.

Within a module, sites are rewritten in execution order, so that a site nested inside another
site's branch is already a gate call when the outer branch is cut out.
"""

from __future__ import annotations

import operator
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from torch.fx import Graph, GraphModule, Node
from torch.fx.node import map_aggregate

from fxsd.distributed import rank
from fxsd.errors import GraphError, InvalidArgumentError, InvalidTypeError
from fxsd.folding import fold_target, warn_on_save
from fxsd.gate import MODES, SAMPLE_IMPLS, SCALES, BranchGate, DropPathAction, DropSampler, GateInfo
from fxsd.graph_module import FxsdGraphModule, TreeEditor, copy_tree, module_from_graph
from fxsd.ops import depends_on_input, is_metadata_read, is_view, mutated_operand
from fxsd.owners import Owner, plan_owners
from fxsd.passes.extract_module import extract_module
from fxsd.recompute import checkpointing
from fxsd.record import FxsdRecord, RejectedRecord
from fxsd.residuals import (
    ResidualAnalysis,
    ResidualSite,
    analyze_residuals,
    collect_branch,
    is_module,
)
from fxsd.rows import row_coupling
from fxsd.schedules import DISTRIBUTIONS, Distribution, check_rate, site_rates
from fxsd.tracing import LeafSpec, is_drop_path
from fxsd.training import gates
from fxsd.variants import allow_other_calls

__all__ = ["stochastic_depth", "gate_residuals", "GateSpec", "InlinedHooksWarning",
           "NoResidualSitesWarning"]

EXISTING = ("adopt", "replace", "keep")


class NoResidualSitesWarning(UserWarning):
    """The model has no residual site (or none selected), so the pass changed nothing."""


class InlinedHooksWarning(UserWarning):
    """A module with hooks, or one whose call is checkpointed, had to be inlined into the gated
    module that owns a join: its hooks will not run any more, its call is not checkpointed."""


@dataclass(frozen=True)
class GateSpec:
    """How to gate one site (before any existing drop path is adopted).

    ``mode``/``scale`` ``None``: an adopted drop path's own, else ``"block"``/``"train"``.
    """

    drop_rate: float
    rate_weight: float
    mode: str | None
    scale: str | None
    sample_impl: str | None  # None: subset where exact, else mask


def stochastic_depth(
    model: nn.Module,
    drop_rate: float | None = None,
    *,
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
    if mode is not None:
        _check_choice("mode", mode, MODES)
    if scale is not None:
        _check_choice("scale", scale, SCALES)
    _check_choice("existing", existing, EXISTING)
    if sample_impl is not None:
        _check_choice("sample_impl", sample_impl, SAMPLE_IMPLS)
    explicit = drop_rate is not None or distribution is not None
    distribution = "linear" if distribution is None else distribution
    if isinstance(distribution, str):
        if distribution not in DISTRIBUTIONS:
            site_rates(0.0, distribution, [], 0)  # raises the unknown-distribution error
    drop_rate = check_rate(0.1 if drop_rate is None else drop_rate)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise InvalidTypeError(f"seed must be an int or None, got {seed!r}")
    analysis = analyze_residuals(
        model, example_inputs, example_kwargs=example_kwargs, tracing=tracing,
        leaf_modules=leaf_modules, concrete_args=concrete_args,
    )
    if select is not None:
        _select(analysis, select)
    if not analysis.sites:
        warnings.warn(
            f"fxsd found no residual site to gate in {type(model).__name__} "
            f"({len(analysis.rejected)} adds rejected); the model is returned unchanged. "
            "Inspect the adds with fxsd.table(model, rejected=True).",
            NoResidualSitesWarning,
            stacklevel=2,
        )
        return model if inplace else copy_tree(model)
    depths = [s.depth for s in analysis.sites]
    rates = site_rates(drop_rate, distribution, depths, analysis.num_levels)
    if drop_rate > 0:
        weights = [r / drop_rate for r in rates]
    elif isinstance(distribution, str):
        weights = site_rates(1.0, distribution, depths, analysis.num_levels)
    else:
        weights = list(rates)
    specs = [GateSpec(r, w, mode, scale, sample_impl) for r, w in zip(rates, weights)]
    base = torch.initial_seed() if seed is None else seed
    if not sync_ranks:
        base += 1_000_003 * rank()
    return gate_residuals(analysis, specs, DropSampler(base, sync_ranks), model,
                          existing=existing, drop_rate=drop_rate, inplace=inplace,
                          explicit=explicit)


def _select(analysis: ResidualAnalysis, keep: Callable[[ResidualSite], bool]) -> None:
    """Keep only the sites ``keep`` selects, with depths ``1..L`` counted over them."""
    chosen = [site for site in analysis.sites if _selected(keep, site)]
    distinct = sorted({site.depth for site in chosen})
    rank_of = {d: i + 1 for i, d in enumerate(distinct)}
    renumbered = {id(site): replace(site, depth=rank_of[site.depth]) for site in chosen}
    for part in {id(p): p for p in (analysis, *analysis.units)}.values():
        part.sites = [renumbered[id(s)] for s in part.sites if id(s) in renumbered]
    analysis.num_levels = len(distinct)


def _selected(keep: Callable[[ResidualSite], bool], site: ResidualSite) -> bool:
    answer = keep(site)
    if not isinstance(answer, bool):
        raise InvalidTypeError(
            f"select must return True or False for each site; for '{site.name}' in "
            f"'{site.module_path or '<root>'}' it returned {answer!r} "
            f"({type(answer).__name__}). Return a bool, e.g. bool(...)")
    return answer


def _check_choice(name: str, value: object, choices: Sequence[str]) -> None:
    if value not in choices:
        raise InvalidArgumentError(f"unknown {name} {value!r}: use one of {tuple(choices)}")


def gate_residuals(
    analysis: ResidualAnalysis,
    specs: Sequence[GateSpec | float],
    sampler: DropSampler,
    model: nn.Module,
    *,
    existing: str = "adopt",
    drop_rate: float = 0.0,
    inplace: bool = False,
    explicit: bool = True,
) -> nn.Module:
    """Gate ``analysis.sites`` of ``model`` (the model ``analysis`` was made from).

    ``specs`` gives each site's gating (same order as ``analysis.sites``); a plain float is a
    block-mode rate. ``explicit``: the specs' rates were asked for (otherwise a model's own drop
    paths set the rates, see :func:`stochastic_depth`). Returns the gated model: ``model`` itself
    with ``inplace=True``, else a copy of the modules on the paths from the root to the rewritten
    ones, sharing everything else.
    """
    specs = [s if isinstance(s, GateSpec) else GateSpec(float(s), 1.0, "block", "train", None)
             for s in specs]
    parts = analysis.parts()  # one graph, or the modules traced one by one
    planned = [(part, owner) for part in parts for owner in plan_owners(part, part.sites)]
    for part in parts:
        _warn_inlined_hooks(part, [o for p, o in planned if p is part])
    if inplace and any(not o.path for _, o in planned):
        raise InvalidArgumentError(
            f"the forward of {type(model).__name__} itself performs residual joins, so its root "
            "module must be rewritten, which cannot happen in place: use the returned model "
            "(inplace=False)")
    facts = {id(part): _WholeGraphFacts(part, existing, explicit) for part in parts}
    adopting = any(f.adopting for f in facts.values())
    for f in facts.values():
        f.adopting = adopting
    if adopting:  # the model-wide rate is its largest drop-path rate
        drop_rate = max((r for f in facts.values() for r in f.adopted_rates if r is not None),
                        default=0.0)
    record = FxsdRecord(
        drop_rate=drop_rate, num_levels=analysis.num_levels,
        live_leaves=tuple(leaf for part in parts for leaf in
                          part.graph_module.meta["fxsd"].live_leaves),
        rejected=tuple(RejectedRecord(r.name, r.add_kind, r.module_path or "<root>", r.reason,
                                      r.detail) for r in analysis.rejected),
        total_flops=analysis.total_flops,
        traced=tuple(part.path for part in analysis.units),
        untraced=tuple(analysis.untraced))
    spec_of = {id(site): spec for site, spec in zip(analysis.sites, specs)}
    tree = TreeEditor(model, in_place=inplace)
    # Deepest first: a rewritten parent holds its rewritten children.
    planned.sort(key=lambda po: -po[1].path.count(".") - bool(po[1].path))
    for part, owner in planned:
        module = tree.locate(owner.path)[2]
        tree.replace(owner.path, _gate_owner(part, owner, module, facts[id(part)], spec_of,
                                             sampler, record, existing))
    owners = [o for _, o in planned]
    position = {path: i for i, (path, _) in enumerate(model.named_modules())}
    rewritten = sorted(owners, key=lambda o: position[o.path])
    record.rewritten = tuple(o.path for o in rewritten)
    record.original_classes = tuple(type(_resolve(model, o.path)).__name__ for o in rewritten)
    if any(g.scale == "eval" for g in gates(tree.root)):
        warn_on_save(tree.root)
    return tree.root


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


class _WholeGraphFacts:
    """What the rewrite needs to know about each site from the whole-model graph: where
    in-place ops follow, which branches mix batch rows, whether the model's own drop paths set
    the rates (``adopting``: ``existing="adopt"``, no explicit rate, and drop paths present)."""

    def __init__(self, analysis: ResidualAnalysis, existing: str, explicit: bool) -> None:
        self.gm = analysis.graph_module
        self.order = {n: i for i, n in enumerate(self.gm.graph.nodes)}
        self.existing = existing
        self.explicit = explicit
        self.adopted_rates = [self.adoptable(s)[0] if self.adoptable(s) else None
                              for s in analysis.sites] if existing == "adopt" else []
        self.adopting = existing == "adopt" and not explicit and any(
            _drop_paths(self.gm, s.branch) for s in analysis.sites)

    def adoptable(self, site: ResidualSite) -> tuple[float, str, str] | None:
        """The (rate, mode, scale) of the site's single drop path at its branch output."""
        drops = _drop_paths(self.gm, site.branch)
        if len(drops) != 1 or not _on_output_path(drops[0], site.branch_output):
            return None
        return _drop_path_settings(self.gm.get_submodule(str(drops[0].target)))

    def clone_on_drop(self, site: ResidualSite) -> bool:
        return _needs_clone(self.gm, site.add, site.skip, self.order)

    def row_coupling(self, site: ResidualSite) -> str | None:
        return row_coupling(self.gm, site.fork, site.branch, site.side_inputs)

    def has_drop_path(self, site: ResidualSite) -> bool:
        return bool(_drop_paths(self.gm, site.branch))


def _gate_owner(analysis: ResidualAnalysis, owner: Owner, module: nn.Module,
                whole: _WholeGraphFacts, spec_of: dict[int, GateSpec], sampler: DropSampler,
                record: FxsdRecord, existing: str) -> GraphModule:
    """Rewrite ``module`` (the owner) as a GraphModule with one gate per owned site."""
    cut = extract_module(analysis, owner, module)
    block = cut  # looks modules up like the rewritten block will (extra attributes, gates)
    graph = cut.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    rewritten: dict[Node, Node] = {}  # rewritten add -> the gate call that replaced it
    for i, site in enumerate(owner.sites):
        spec = spec_of[id(site)]
        if whole.adopting and not whole.has_drop_path(site):
            # A model that carries its own drop paths keeps its own regularisation under
            # "adopt": sites without a drop path had rate 0 in the model, and keep it.
            spec = replace(spec, drop_rate=0.0, rate_weight=0.0)
        fork, skip, out, add = (rewritten.get(cut.env[n], cut.env[n])
                                for n in (site.fork, site.skip, site.branch_output, site.add))
        spec, drops, action, note = _plan_drop_paths(whole, site, spec, record.drop_rate)
        if whole.adopting and action is DropPathAction.KEPT:
            # The model's own drop path stays and regularises this site: no second one on top.
            spec = replace(spec, drop_rate=0.0, rate_weight=0.0)
            note += "; fxsd rate 0"
        spec = replace(spec, mode=spec.mode or "block", scale=spec.scale or "train")
        for drop in drops:  # the plan keeps drop-path calls in the owner's own graph
            node = cut.env[drop]
            source = node.all_input_nodes[0]
            if node is out:
                out = source
            node.replace_all_uses_with(source)
            graph.erase_node(node)
        inside = {cut.env[n] for n in site.branch if n in cut.env}
        released = _release_unused_outputs(graph, inside)
        if released:
            note = _join(note, f"returns None for unused {', '.join(released)}")
        branch = _collect(block, fork, out, add, order, site)
        impl = spec.sample_impl or "mask"
        if spec.mode == "sample":
            coupling = whole.row_coupling(site)
            if spec.sample_impl is None:
                impl = "mask" if coupling else "subset"
                if coupling:
                    note = _join(note, f"mask: {coupling}")
            elif impl == "subset" and coupling:
                raise InvalidArgumentError(
                    f"sample_impl='subset' would change what '{site.module_path or '<root>'}' "
                    f"computes: {coupling}. Use sample_impl=None to fall back to 'mask' there.")
        name = owner.gate_names[i]
        gate = BranchGate(
            _branch_module(block, fork, branch.nodes, branch.inputs, out, name),
            spec.drop_rate,
            sampler,
            identity=skip is fork,
            clone_on_drop=whole.clone_on_drop(site),
            info=GateInfo.from_site(site, record.num_levels, owner.gate_path(i),
                                    fold_target(whole.gm, site)),
            mode=spec.mode,
            scale=spec.scale,
            sample_impl=impl,
            note=note,
            rate_weight=spec.rate_weight,
            drop_path=action,
            record=record,
        )
        cut.extra_attrs[name] = gate
        args = (fork, *branch.inputs) if skip is fork else (skip, fork, *branch.inputs)
        with graph.inserting_before(add):
            call = graph.call_module(name, args)
        call.meta = {k: v for k, v in add.meta.items() if k in ("nn_module_stack", "stack_trace")}
        order[call] = order[add]
        add.replace_all_uses_with(call)
        graph.erase_node(add)
        for n in reversed(branch.nodes):
            graph.erase_node(n)
        rewritten[add] = call
    for node in reversed(graph.nodes):  # shape reads left behind (a message built from x.shape)
        if not node.users and is_metadata_read(node):
            graph.erase_node(node)
    graph.lint()
    allow_other_calls(graph, type(module))  # calls its guards refuse: it traces itself again
    gated = module_from_graph(module, graph, cut.extra_attrs)
    gated.meta["fxsd"] = record
    return gated


def _release_unused_outputs(graph: Graph, inside: set[Node]) -> list[str]:
    """Return ``None`` from the module where it returns a value computed inside a branch.

    The analysis only accepts a branch none of whose values is used outside it, so such a value
    is unused wherever the module's result goes (the attention weights a Hugging Face attention
    layer returns next to its output, which the model drops unless asked for attentions). A
    skipped branch has no such value; the module returns ``None`` for it, also when the branch
    runs, as Hugging Face's own layer drop does.
    """
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    released: list[str] = []

    def release(value: Any) -> Any:
        if isinstance(value, Node) and value in inside:
            released.append(value.name)
            return None
        return value

    output.args = map_aggregate(output.args, release)
    return released


def _collect(block: Any, fork: Node, out: Node, add: Node, order: dict[Node, int],
             site: ResidualSite) -> Any:
    branch = collect_branch(block, fork, out, add, order)
    if isinstance(branch, tuple):  # the analysis accepted it: a bug if this happens
        raise GraphError(f"cannot gate '{site.add.name}' in '{site.module_path or '<root>'}' "
                         f"after cutting the module out: {branch[1]}")
    return branch


def _resolve(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(path) if path else model


def _join(a: str, b: str) -> str:
    return f"{a}; {b}" if a else b


def _drop_path_settings(module: nn.Module) -> tuple[float, str, str] | None:
    """(rate, mode, scale) of a drop-path module, or None when they cannot be read."""
    rate = getattr(module, "p", getattr(module, "drop_prob", getattr(module, "drop_path_prob",
                                                                       None)))
    if not isinstance(rate, (int, float)):
        return None
    mode = "block" if getattr(module, "mode", "row") == "batch" else "sample"
    scale = "train" if getattr(module, "scale_by_keep", True) else "none"
    return float(rate), mode, scale


def _plan_drop_paths(
    whole: _WholeGraphFacts, site: ResidualSite, spec: GateSpec, base_rate: float,
) -> tuple[GateSpec, list[Node], DropPathAction | None, str]:
    """What to do with the drop-path ops of one branch (read on the whole-model graph).

    Returns the site's spec (with an adopted op's own rate unless rates are explicit, and its mode
    and scaling unless those are), the drop-path nodes to remove, what is done and the note tables
    show.
    """
    drops = _drop_paths(whole.gm, site.branch)
    if not drops:
        return spec, [], None, ""
    if whole.existing == "keep":
        return spec, [], DropPathAction.KEPT, "kept existing drop path"
    settings = whole.adoptable(site) if whole.existing == "adopt" else None
    if settings is None:
        if whole.existing == "adopt" and not whole.explicit:
            return (spec, [], DropPathAction.KEPT,
                    "kept existing drop path (not a single op at the branch output)")
        return spec, drops, DropPathAction.REPLACED, "replaced existing drop path"
    rate, mode, scale = settings
    name = type(whole.gm.get_submodule(str(drops[0].target))).__name__
    if whole.explicit:
        note = f"adopted {name}(p={rate:g}), rate replaced"
        rate, weight = spec.drop_rate, spec.rate_weight
    else:
        note = f"adopted {name}(p={rate:g})"
        weight = rate / base_rate if base_rate > 0 else rate
    spec = GateSpec(rate, weight, spec.mode or mode, spec.scale or scale, spec.sample_impl)
    return spec, drops, DropPathAction.ADOPTED, note


def _drop_paths(gm: GraphModule, nodes: Sequence[Node]) -> list[Node]:
    return [n for n in nodes if n.op == "call_module"
            and is_drop_path(gm.get_submodule(str(n.target)))]


def _on_output_path(node: Node, out: Node) -> bool:
    """Whether ``node`` reaches ``out`` through per-row-neutral scalings only (layer scale)."""
    while node is not out:
        users = list(node.users)
        if len(users) != 1:
            return False
        (user,) = users
        if not (user.op == "call_function" and user.target in (operator.mul, torch.mul)
                or user.op == "call_method" and user.target in ("mul", "mul_")):
            return False
        if any(depends_on_input(a) for a in user.all_input_nodes if a is not node):
            return False  # scaled by an activation, not a parameter: the mask would not commute
        node = user
    return True


def _branch_module(gm: Any, fork: Node, nodes: Sequence[Node], inputs: Sequence[Node],
                   out: Node, name: str) -> GraphModule:
    graph = Graph()
    env: dict[Node, Node] = {}
    for n in (fork, *inputs):
        env[n] = graph.placeholder(n.name)
        env[n].meta = dict(n.meta)
    for n in nodes:
        env[n] = graph.node_copy(n, env.__getitem__)
    graph.output(env[out])
    attrs = {str(n.target): gm.get_submodule(str(n.target)) for n in graph.nodes
             if n.op == "call_module" or (n.op == "get_attr" and is_module(gm, str(n.target)))}
    if any(n.op == "get_attr" and n.target == "training" for n in graph.nodes):
        attrs["training"] = gm.training  # the block's own flag: the branch's, as .train() sets
    class_name = "".join(part.capitalize() for part in name.split("_")) or "Branch"
    return FxsdGraphModule(attrs, graph, class_name=class_name.removesuffix("Gate") + "Branch")


def _needs_clone(gm: GraphModule, add: Node, skip: Node, order: dict[Node, int]) -> bool:
    """Whether a dropped gate must copy the skip rather than return it.

    Returning the skip itself makes the result alias it. That is harmless unless something
    later writes to the result (or to the skip) in place, which would also overwrite a tensor
    autograd may have saved, or unless it would hand the caller back its own input.
    """
    if skip.op == "placeholder":
        return True
    return _mutated_after(gm, add, order[add], order) or _mutated_after(gm, skip, order[add], order)


def _mutated_after(gm: GraphModule, node: Node, after: int, order: dict[Node, int]) -> bool:
    """Whether an op after position ``after`` writes in place to ``node`` or a view of it."""
    stack, seen = [node], {node}
    while stack:
        n = stack.pop()
        for user in n.users:
            if user.op == "output" or order.get(user, after + 1) <= after:
                continue
            if mutated_operand(user, gm) is n:
                return True
            if is_view(user) and user not in seen:
                seen.add(user)
                stack.append(user)
    return False
