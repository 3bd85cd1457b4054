"""The analysis' result types: what the classifier (:mod:`fxsd.analysis.residuals`) reports for a
graph.

A :class:`ResidualSite` is one residual join, with its fork, skip and branch as graph nodes; a
:class:`RejectedAdd` is any other add, kept by name with its :class:`RejectReason`; a
:class:`ResidualAnalysis` gathers both for a model (or for the units it was traced as). The
decision step, the rewrite and the tables read these; nothing here computes them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from torch.fx import GraphModule, Node

from fxsd.analysis.escapes import Escapes
from fxsd.analysis.node_costs import NodeProfile
from fxsd.runtime.join import PLAIN_JOIN, Join
from fxsd.tracing.calls import CallTree

__all__ = ["SkipKind", "RejectReason", "ResidualSite", "RejectedAdd", "ResidualAnalysis"]


class SkipKind(str, Enum):
    """How the skip operand relates to the fork."""

    IDENTITY = "identity"
    PROJECTION = "projection"


class RejectReason(str, Enum):
    """Why an add is not a residual site."""

    SCALAR_OPERAND = "scalar operand"
    NON_TENSOR_OPERAND = "non-tensor operand"
    CONSTANT_OPERAND = "constant operand"
    SAME_OPERAND = "same operand twice"
    UNSUPPORTED_ARGUMENTS = "unsupported arguments"
    BROADCAST = "broadcasting add"
    NO_COMMON_FORK = "no common fork"
    NO_CHEAP_SKIP = "no skip path"
    ESCAPING_VALUE = "branch value escapes"
    MUTATION = "in-place mutation"
    NO_WEIGHTS = "branch holds no weights"
    PARALLEL_PATHS = "parallel paths"


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


@dataclass(frozen=True)
class RejectedAdd:
    """An add that is not a residual site, with the reason (kept by name, so that a transformed
    model's :class:`~fxsd.record.FxsdRecord` can hold it without the analysed graph).

    Attributes:
        add: the add node's name; ``add_kind``: how the add was written.
        reason, detail: which rule rejected it, and a sentence saying why.
        module_path: the module whose ``forward`` performs the add (``""``: the root).
    """

    add: str
    add_kind: str
    reason: RejectReason
    detail: str
    module_path: str

    @property
    def name(self) -> str:
        return self.add


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
