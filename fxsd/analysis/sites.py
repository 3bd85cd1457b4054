"""The analysis' result types: what the classifier (:mod:`fxsd.analysis.residuals`) reports for a
graph.

A :class:`ResidualSite` is one residual join, with its fork, skip and branch as graph nodes; a
:class:`~fxsd.record.RejectedAdd` (recorded on the model) is any other add, kept by name with its
:class:`~fxsd.record.RejectReason`; a :class:`ResidualAnalysis` gathers both for a model (or for the
units it was traced as). The decision step, the rewrite and the tables read these; nothing here
computes them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from torch.fx import GraphModule, Node

from fxsd.analysis.escapes import Escapes
from fxsd.analysis.node_costs import NodeProfile
from fxsd.graph_names import local_name
from fxsd.record import RejectedAdd
from fxsd.runtime.folding import FoldTarget
from fxsd.runtime.gate_info import GateInfo, SharedUse
from fxsd.runtime.join import PLAIN_JOIN, Join
from fxsd.tracing.calls import CallTree
from fxsd.tracing.partial_join import partial_join_of

__all__ = ["SkipKind", "ResidualSite", "ResidualAnalysis", "describe_site"]


class SkipKind(str, Enum):
    """How the skip operand relates to the fork."""

    IDENTITY = "identity"
    PROJECTION = "projection"


@dataclass(frozen=True)
class ResidualSite:
    """One residual join: ``add = skip + branch(fork, *side_inputs)``.

    Attributes:
        add: the add node joining skip and branch.
        add_kind: how the add was written (``"operator.add"``, ``"torch.add"``, ``"Tensor.add_"``).
        fork: the value both skip and branch are computed from.
        skip: the skip operand (``fork`` itself for an identity skip).
        skip_kind: :attr:`SkipKind.IDENTITY` or :attr:`SkipKind.PROJECTION`.
        skip_path: the projection's nodes from the fork to ``skip`` (empty for identity).
        branch_output: the branch operand of the add.
        branch: the branch's nodes, in execution order (ends with ``branch_output``, may hold
            unused side results such as ``MultiheadAttention``'s attention weights).
        side_inputs: values the branch reads that do not come from the fork, other than parameters.
        param_inputs: ``get_attr`` nodes (parameters, buffers, constants) the branch reads.
        module_path: qualified name of the module whose ``forward`` performs the add (``""`` for
            the root).
        module_type: that module's class name.
        depth: 1-based position along the longest chain of residual sites through the graph.
        num_params: number of parameter elements the branch uses.
        flops: the branch's forward FLOPs, when the analysis had example inputs.
        scope: ``(path, class name)`` of every module whose ``forward`` is running at the add,
            outermost first (the last one is ``module_path``; empty for the root).
        escapes: what the branch hands to code outside it besides its output, and how a
            skipped branch still produces it (:class:`~fxsd.analysis.escapes.Escapes`; ``None``:
            nothing).
        join: the add as written (function, operand order, ``alpha``, in place), which the gate
            computes (:class:`~fxsd.runtime.join.Join`).
    """

    add: Node
    add_kind: str
    fork: Node
    skip: Node
    skip_kind: SkipKind
    skip_path: tuple[Node, ...]
    branch_output: Node
    branch: tuple[Node, ...]
    side_inputs: tuple[Node, ...]
    param_inputs: tuple[Node, ...]
    module_path: str
    module_type: str
    depth: int
    num_params: int
    flops: int | None = None
    scope: tuple[tuple[str, str], ...] = ()
    escapes: Escapes | None = None
    join: Join = PLAIN_JOIN

    @property
    def name(self) -> str:
        """The add node's name, unique within its graph."""
        return self.add.name


@dataclass
class ResidualAnalysis:
    """Everything :func:`analyze_residuals` learned about a model.

    Attributes:
        graph_module: the traced graph the nodes below belong to (fxsd's own copy).
        sites: the residual sites, in execution order.
        rejected: every other add, with its reason.
        num_levels: ``L``, the largest site depth (0 without sites).
        total_flops: forward FLOPs of the whole model, when example inputs were given.
        profiles: each node's shape and FLOPs, when example inputs were given.
        calls: the module calls the trace went through (``None`` for a ``GraphModule`` input,
            which is not traced again).
        path: the module this analysis traced (``""``: the model itself).
        units: when modules were traced one by one (by example, or a module timm marks as not
            traceable traced on its own), each one's analysis; ``sites`` and ``rejected`` then
            gather theirs, and ``graph_module`` is the root's graph if the root was traced.
        untraced: ``(path, class name, why)`` of each module that could not be traced.
        order: each node's position in ``graph_module``'s graph.
    """

    graph_module: GraphModule | None
    sites: list[ResidualSite]
    rejected: list[RejectedAdd]
    num_levels: int
    total_flops: int | None = None
    profiles: dict[Node, NodeProfile] | None = field(default=None, repr=False)
    calls: CallTree | None = field(default=None, repr=False)
    path: str = ""
    units: list[ResidualAnalysis] = field(default_factory=list, repr=False)
    untraced: list[tuple[str, str, str]] = field(default_factory=list)
    order: dict[Node, int] = field(default_factory=dict, repr=False)

    def parts(self) -> list[ResidualAnalysis]:
        """The analyses of single graphs this one is made of (itself, or its units)."""
        return self.units or [self]


def describe_site(site: ResidualSite, num_levels: int, name: str = "",
                  fold: FoldTarget | None = None) -> GateInfo:
    """``site`` as the :class:`~fxsd.runtime.gate_info.GateInfo` of the gate ``name`` (by names, so
    it outlives the graph).

    Node names are given as the gated module's code spells them: without the prefix of the
    module that owns the gate (``conv1``, not ``layer1_0_conv1``).
    """
    owner = name.rpartition(".")[0]

    def local(node: Any) -> str:
        return local_name(node.name, owner)

    return GateInfo(
        name=name, fold=fold, add=site.add.name, add_kind=site.add_kind,
        module_path=site.module_path,
        module_type=site.module_type, skip_kind=site.skip_kind.value, depth=site.depth,
        num_levels=num_levels, branch_first=local(site.branch[0]),
        branch_last=local(site.branch_output), branch_len=len(site.branch),
        num_params=site.num_params, side_inputs=tuple(local(n) for n in site.side_inputs),
        flops=site.flops, part=partial_join_of(site.add), join=site.join,
        shared=tuple(SharedUse(u.kind, local(u.consumer), u.join)
                     for u in (site.escapes.shared if site.escapes else ())),
    )
