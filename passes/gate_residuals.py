"""The rewrite: gate the branch of every residual site, inside the modules that own them.

Each residual add ``skip + branch(fork, *side)`` found by :func:`fxsd.analyze_residuals` becomes a
call of a :class:`~fxsd.runtime.gate.BranchGate`. The rewrite happens in the module whose
``forward`` owns the join (:func:`fxsd.decisions.owners.plan_owners`: a torchvision ``Bottleneck``,
a ViT ``EncoderBlock``, a BERT layer): that module is cut out of the whole-model trace
(:mod:`fxsd.passes.extract_module`), its branch nodes move into a small ``GraphModule`` that the
gate runs only when the branch is kept (:mod:`fxsd.passes.gate_site`), and the gated module takes
the original's place in the model. Every other module, the root's class included, stays as it
was. Last, the model's own layer drops are settled as the plan says
(:class:`~fxsd.decisions.plan.LayerDropPlan`): a loop whose layers fxsd now gates is switched off,
as an adopted drop path's op is taken out of its branch, so that the rewrite applies every
decision the plan made about the model's own drops. :func:`fxsd.stochastic_depth`
(:mod:`fxsd.transform`) runs the steps before and after it.

Within a module, sites are rewritten in execution order, so that a site nested inside another
site's branch is already a gate call when the outer branch is cut out.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

from torch import nn
from torch.fx import GraphModule

from fxsd.analysis.sites import ResidualAnalysis, ResidualSite, describe_site
from fxsd.decisions.owners import Owner, plan_owners, warn_root_joins
from fxsd.decisions.plan import GatePlan, join_notes
from fxsd.errors import (
    BlockModeWarning,
    InlinedHooksWarning,
    InvalidArgumentError,
    LayerDropWarning,
    NoSavingWarning,
)
from fxsd.graph_module import module_from_graph
from fxsd.module_tree import TreeEditor, deepest_first
from fxsd.passes.extract_module import extract_module
from fxsd.passes.gate_site import CutSite, gate_sites
from fxsd.passes.regate import trace_again
from fxsd.record import FxsdRecord
from fxsd.runtime.accessors import gates
from fxsd.runtime.folding import warn_on_save
from fxsd.runtime.gate import BranchGate
from fxsd.runtime.gate_info import ShareKind
from fxsd.runtime.recompute import checkpointing
from fxsd.runtime.sampler import DropSampler
from fxsd.runtime.variants import allow_other_calls
from fxsd.tracing.layer_drop import switch_off_layer_drops
from fxsd.tracing.ops import is_metadata_read

__all__ = ["gate_residuals"]

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
        untraced=tuple(analysis.untraced), regate=trace_again)
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
    _settle_layer_drops(tree.root, plan, record.rewritten)
    return tree.root


def _settle_layer_drops(root: nn.Module, plan: GatePlan, rewritten: Sequence[str]) -> None:
    """Switch off each layer drop of the model whose layers fxsd now gates, as the plan says
    (a config is copied first: :func:`~fxsd.tracing.layer_drop.switch_off_layer_drops`); warn
    about one that the rewrite removed (its module rewritten) without fxsd taking it over."""
    for settled in plan.layer_drops:
        drop = settled.drop
        if settled.switch_off:
            switch_off_layer_drops(root, [drop])
        elif drop.path in rewritten:
            warnings.warn(
                f"'{drop.path or '<root>'}' drops its layers in training (rate {drop.rate:g}), "
                "but fxsd rewrote its forward, which removes that code, and "
                + ("existing='keep' leaves its layers' joins at fxsd's rates." if settled.gated
                   else "gates none of its layers' joins.")
                + " Use existing='adopt' to give those joins its rate.",
                LayerDropWarning, stacklevel=5)


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
    paths = {name: owner.gate_path(i) for i, name in enumerate(owner.gate_names)}

    def make_gate(site: ResidualSite, name: str, piece: CutSite) -> BranchGate:
        spec = plan.spec(site)
        note = join_notes(spec.note, f"returns None for unused {', '.join(piece.released)}"
                          if piece.released else "", _escape_note(piece), _shared_note(piece))
        gate = BranchGate(
            piece.branch_module, spec.drop_rate, sampler, identity=piece.identity,
            clone_on_drop=spec.clone_on_drop,
            info=describe_site(site, record.num_levels, paths[name], spec.fold),
            mode=spec.mode, scale=spec.scale, sample_impl=spec.sample_impl,
            note=join_notes(note, spec.sample_note), rate_weight=spec.rate_weight,
            drop_path=spec.drop_path, record=record, escape_path=piece.escape_path)
        # a new module starts in training mode: a model gated in eval mode must stay in it
        gate.training = module.training
        return gate

    gate_sites(cut, [(site, name, plan.spec(site).drops)
                     for site, name in zip(owner.sites, owner.gate_names)], make_gate)
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

