"""The stochastic-depth pass: gate the branch of every residual site of a model.

Each residual add ``skip + branch(fork, *side)`` found by :func:`fxsd.analyze_residuals` becomes a
call of a :class:`~fxsd.gate.BranchGate` registered on the root and named after the block it gates
(``layer1_0_gate``). The branch's nodes move out of the main graph into a small ``GraphModule``
that the gate runs only when the branch is kept, so a dropped branch costs nothing.

Sites are rewritten in execution order, so that a site nested inside another site's branch is
already a gate call when the outer branch is cut out.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.fx import Graph, GraphModule, Node

from fxsd.errors import GraphError, InvalidArgumentError, InvalidTypeError
from fxsd.gate import BranchGate, DropSampler, GateInfo
from fxsd.ops import is_view, mutated_operand
from fxsd.residuals import ResidualAnalysis, ResidualSite, analyze_residuals, collect_branch
from fxsd.schedules import DISTRIBUTIONS, Distribution, check_rate, site_rates
from fxsd.tracing import LeafSpec

__all__ = ["stochastic_depth", "gate_residuals", "MODES", "NoResidualSitesWarning"]

MODES = ("block",)


class NoResidualSitesWarning(UserWarning):
    """The model has no residual site, so the pass changed nothing."""


def stochastic_depth(
    model: nn.Module,
    drop_rate: float = 0.1,
    *,
    distribution: Distribution = "linear",
    mode: str = "block",
    seed: int | None = None,
    example_inputs: Sequence[Any] | None = None,
    leaf_modules: Iterable[LeafSpec] | None = None,
    concrete_args: dict[str, Any] | None = None,
) -> GraphModule:
    """Return ``model`` as a ``GraphModule`` whose residual branches drop at random in training.

    In training, each residual site draws once per forward: with probability ``p_l`` its branch is
    skipped (neither its forward nor its backward runs; its parameters get no gradient) and the
    site returns the skip; otherwise it returns ``skip + branch``. In eval every branch runs,
    scaled by ``1 - p_l``. ``.train()`` and ``.eval()`` switch between the two at any time.

    The result shares submodules and parameters with ``model`` (as ``torch.fx.symbolic_trace``
    does), has exactly its ``state_dict`` keys, and ``model`` itself is not modified.

    Args:
        model: an ``nn.Module`` or an already traced ``GraphModule``.
        drop_rate: the largest drop rate (``linear``) or every site's rate (``uniform``).
        distribution: ``"linear"`` (depth ``l`` of ``L`` drops at ``drop_rate * l / L``),
            ``"uniform"``, a sequence of per-site rates in execution order, or a callable
            ``(depth, L) -> rate``.
        mode: ``"block"``: one decision per site per forward, for the whole batch.
        seed: seed of the gates' host-side generator. ``None`` takes ``torch.initial_seed()``, so
            ``torch.manual_seed`` makes runs reproducible; no global generator is ever drawn from.
        example_inputs: optional inputs of one forward call; lets the analysis check shapes
            (broadcasting adds are never gated) and count FLOPs for :func:`fxsd.table`.
        leaf_modules: module classes or qualified names not to trace through.
        concrete_args: passed to the tracer.

    Raises:
        InvalidTypeError, InvalidArgumentError: bad arguments.
        TraceError: the model cannot be traced (names the module at fault).

    Example:
        >>> import torch, torchvision, fxsd
        >>> gm = fxsd.stochastic_depth(torchvision.models.resnet50(), 0.2, seed=0)
        >>> gm.layer4_2_gate
        BranchGate('layer4.2', depth=16/16, drop_rate=0.2, skip=identity)
        >>> loss = gm(torch.randn(2, 3, 224, 224)).sum()  # some blocks skipped
    """
    if not isinstance(model, nn.Module):
        raise InvalidTypeError(
            f"stochastic_depth expects an nn.Module, got {type(model).__name__}"
        )
    if mode not in MODES:
        raise InvalidArgumentError(
            f"unknown mode {mode!r}: fxsd supports {MODES} (one draw per site per forward)"
        )
    if isinstance(distribution, str):
        if distribution not in DISTRIBUTIONS:
            site_rates(0.0, distribution, [], 0)  # raises the unknown-distribution error
        check_rate(drop_rate)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise InvalidTypeError(f"seed must be an int or None, got {seed!r}")
    analysis = analyze_residuals(
        model, example_inputs, leaf_modules=leaf_modules, concrete_args=concrete_args
    )
    from fxsd.table import _rejected_rows

    analysis.graph_module.meta["fxsd"] = {
        "rejected": _rejected_rows(analysis.rejected),
        "total_flops": analysis.total_flops,
    }
    if not analysis.sites:
        warnings.warn(
            f"fxsd found no residual site in {type(model).__name__} "
            f"({len(analysis.rejected)} adds, none a residual join); returning the traced model "
            "unchanged. Inspect the adds with fxsd.table(model, rejected=True).",
            NoResidualSitesWarning,
            stacklevel=2,
        )
        return analysis.graph_module
    rates = site_rates(drop_rate, distribution, [s.depth for s in analysis.sites],
                       analysis.num_levels)
    return gate_residuals(analysis, rates, DropSampler(torch.initial_seed() if seed is None
                                                       else seed))


def gate_residuals(
    analysis: ResidualAnalysis, rates: Sequence[float], sampler: DropSampler
) -> GraphModule:
    """Rewrite ``analysis.graph_module`` in place: one :class:`BranchGate` per site.

    ``rates`` gives each site's drop rate (same order as ``analysis.sites``). Returns the module.
    """
    gm = analysis.graph_module
    graph = gm.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    gates: dict[Node, Node] = {}  # rewritten add -> the gate call that replaced it
    for site, rate in zip(analysis.sites, rates):
        fork, skip, out = (gates.get(n, n) for n in (site.fork, site.skip, site.branch_output))
        branch = collect_branch(gm, fork, out, site.add, order)
        if isinstance(branch, tuple):  # the analysis accepted it: a bug if this happens
            raise GraphError(f"cannot gate '{site.add.name}' ({site.module_path}): {branch[1]}")
        name = _gate_name(gm, site)
        gate = BranchGate(
            _branch_module(gm, fork, branch.nodes, branch.inputs, out, name),
            rate,
            sampler,
            identity=skip is fork,
            clone_on_drop=_needs_clone(gm, site.add, skip, order),
            info=_info(site, analysis.num_levels),
        )
        gm.add_submodule(name, gate)
        args = (fork, *branch.inputs) if skip is fork else (skip, fork, *branch.inputs)
        with graph.inserting_before(site.add):
            call = graph.call_module(name, args)
        call.meta = {k: v for k, v in site.add.meta.items() if k in ("nn_module_stack",
                                                                        "stack_trace")}
        call.meta["fxsd_site"] = site.add.name
        order[call] = order[site.add]
        site.add.replace_all_uses_with(call)
        graph.erase_node(site.add)
        for n in reversed(branch.nodes):
            graph.erase_node(n)
        gates[site.add] = call
    graph.lint()
    gm.recompile()
    return gm


def _branch_module(gm: GraphModule, fork: Node, nodes: Sequence[Node], inputs: Sequence[Node],
                   out: Node, name: str) -> GraphModule:
    graph = Graph()
    env: dict[Node, Node] = {}
    for n in (fork, *inputs):
        env[n] = graph.placeholder(n.name)
        env[n].meta = dict(n.meta)
    for n in nodes:
        env[n] = graph.node_copy(n, env.__getitem__)
    graph.output(env[out])
    attrs = {str(n.target): gm.get_submodule(str(n.target))
             for n in graph.nodes if n.op == "call_module"}
    class_name = "".join(part.capitalize() for part in name.split("_")) or "Branch"
    return GraphModule(attrs, graph, class_name=class_name.replace("Gate", "Branch"))


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


def _gate_name(gm: GraphModule, site: ResidualSite) -> str:
    base = f"{site.module_path.replace('.', '_')}_gate" if site.module_path else "gate"
    name, i = base, 1
    while hasattr(gm, name):
        name, i = f"{base}_{i}", i + 1
    return name


def _info(site: ResidualSite, num_levels: int) -> GateInfo:
    return GateInfo(
        add=site.add.name,
        add_kind=site.add_kind,
        module_path=site.module_path,
        module_type=site.module_type,
        skip_kind=site.skip_kind.value,
        depth=site.depth,
        num_levels=num_levels,
        branch_first=site.branch[0].name,
        branch_last=site.branch_output.name,
        branch_len=len(site.branch),
        num_params=site.num_params,
        side_inputs=tuple(n.name for n in site.side_inputs),
        flops=site.flops,
    )

