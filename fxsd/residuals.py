"""The per-graph classifier: which adds of one traced graph are residual joins, and why the others
are not (:func:`analyze_graph`; the entry points that trace a model and call it are in
:mod:`fxsd.analysis`).

A *residual site* is an add whose one operand is a **skip** and whose other is a **branch**:

* the **fork** is the last value both operands were computed from (their latest common ancestor
  in the graph's data flow, found with ancestor bitsets, never from class names or argument order);
* the **skip** is the fork itself (``identity``) or a short, cheaper path from it (``projection``:
  a downsample conv + BN, an average pool, ...);
* the **branch** is every node on a path from the fork to the other operand. It may also read
  *side inputs* that do not come from the fork (an attention mask, a relative position bias): they
  become extra inputs of the gated branch. No value computed inside the branch may be used outside
  it, so the branch can be skipped as a whole.

Every other add is *rejected* with a :class:`RejectReason` and a sentence saying why.

The classifier only reads the graph it is given.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule, Node

from fxsd.calls import CallTree, stack_scope
from fxsd.escapes import Escapes, declared_no_tensor, find_escapes
from fxsd.join import PLAIN_JOIN, Join, join_alpha, join_of
from fxsd.ops import (
    add_kind,
    add_operands,
    data_inputs,
    depends_on_input,
    input_dependent_nodes,
    is_inplace,
    is_metadata_read,
    is_nonlinear,
    is_view,
    is_weighted,
    mutated_operand,
    node_order,
    resolve_attr,
)
from fxsd.partial_join import partial_join_of
from fxsd.profile import NodeProfile
from fxsd.shared_work import ShareKind, find_shared

__all__ = [
    "SkipKind",
    "RejectReason",
    "ResidualSite",
    "RejectedAdd",
    "ResidualAnalysis",
    "Branch",
    "collect_branch",
]

#: A projection skip may hold at most this many ops (views and ``getitem`` not counted).
MAX_PROJECTION_OPS = 4


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
            skipped branch still produces it (:class:`~fxsd.escapes.Escapes`; ``None``: nothing).
        join: the add as written (function, operand order, ``alpha``, in place), which the gate
            computes (:class:`~fxsd.join.Join`).
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


@dataclass(frozen=True)
class Branch:
    """A branch cut out of a graph by :func:`collect_branch`."""

    nodes: tuple[Node, ...]
    inputs: tuple[Node, ...]
    escapes: Escapes | None = None  # values it hands to code outside it (fxsd.escapes)


def analyze_graph(gm: GraphModule, calls: CallTree | None,
                  profiles: dict[Node, NodeProfile] | None = None, path: str = "",
                  weights: dict[Node, int] | None = None
                  ) -> tuple[ResidualAnalysis, dict[Node, int]]:
    """The analysis of one traced graph (of the module at ``path``).

    ``weights``: nodes that stand for a number of residual levels of their own (calls of modules
    analysed separately); returns the analysis and, for each of those nodes, the depth before it.
    """
    analyzer = _Analyzer(gm, profiles, calls, path)
    return analyzer.run(weights or {}), analyzer.offsets


class _Rejected(Exception):
    """Raised by a check of :class:`_Analyzer` to reject an add, with the rule's reason."""

    def __init__(self, reason: RejectReason, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


class _Analyzer:
    def __init__(self, gm: GraphModule, profiles: dict[Node, NodeProfile] | None,
                 calls: CallTree | None, path: str = "") -> None:
        self.gm = gm
        self.profiles = profiles
        self.calls = calls
        self.root_path = path
        self.offsets: dict[Node, int] = {}
        self.root_scope = ((path, type(gm.get_submodule(path)).__name__),) if path else ()
        self.nodes = list(gm.graph.nodes)
        # the CallTree indexed this very graph when it was traced
        self.order = calls.order if calls is not None and calls.graph is gm.graph \
            else node_order(gm.graph)
        # ancestors-or-self of each node, as a bitset over node positions
        self.anc: dict[Node, int] = {}
        for i, n in enumerate(self.nodes):
            bits = 1 << i
            for a in data_inputs(n):  # values only: x.shape[0] does not make x an ancestor
                bits |= self.anc[a]
            self.anc[n] = bits
        # nodes computed from a model input (a fork must be one: not a parameter read)
        self.dependent = input_dependent_nodes(gm.graph)
        self.dependent_mask = sum(1 << i for i, n in enumerate(self.nodes) if n in self.dependent)
        self.non_tensor = _non_tensor_nodes(self.nodes, profiles)
        self.has_stacks = any(n.meta.get("nn_module_stack") for n in self.nodes)

    def scope(self, node: Node, branch: Sequence[Node] = ()) -> tuple[tuple[str, str], ...]:
        """(path, class name) of the modules whose forwards are running at ``node``."""
        if self.calls is not None:
            return self.root_scope + self.calls.scope(node)
        return stack_scope(node, branch, self.has_stacks)

    # -- helpers ---------------------------------------------------------------------------
    def holds_no_tensor(self, n: Node) -> bool:
        """Whether ``n``'s value holds no tensor (what a skipped branch's abstract run may
        produce): from the shapes when the graph ran, else from the graph."""
        if self.profiles is not None and n in self.profiles:
            return not self.profiles[n].holds_tensor
        return declared_no_tensor(n)

    def descends(self, n: Node, ancestor: Node) -> bool:
        return bool((self.anc[n] >> self.order[ancestor]) & 1)

    def input_dependent(self, n: Node) -> bool:
        return n in self.dependent

    def path(self, fork: Node, end: Node) -> list[Node]:
        """Nodes strictly after ``fork`` on a path from it to ``end`` (inclusive), in order."""
        seen, stack = {end}, [end]
        while stack:
            n = stack.pop()
            for a in data_inputs(n):
                if a is not fork and a not in seen and self.descends(a, fork):
                    seen.add(a)
                    stack.append(a)
        return sorted(seen, key=self.order.__getitem__)

    def cost(self, nodes: Iterable[Node]) -> tuple[int, int, int]:
        nodes = list(nodes)
        flops = sum(self.profiles[n].flops for n in nodes if n in self.profiles) \
            if self.profiles else 0
        # parameters the path reads through get_attr count too (a traced-through Conv3d subclass)
        reads = [a for n in nodes for a in n.all_input_nodes if a.op == "get_attr"]
        return (flops, _param_count(self.gm, [*nodes, *reads]),
                sum(1 for n in nodes if not _is_free(n)))

    # -- classification --------------------------------------------------------------------
    def run(self, weights: dict[Node, int]) -> ResidualAnalysis:
        accepted: list[ResidualSite] = []
        rejected: list[RejectedAdd] = []
        for node in self.nodes:
            kind = add_kind(node)
            if kind is None:
                continue
            verdict = self.classify(node, kind)
            (rejected if isinstance(verdict, RejectedAdd) else accepted).append(verdict)
        accepted, rejected = self.settle_shared(accepted, rejected)
        depths = self.depths({site.add: _second_joins(site) for site in accepted}, weights)
        sites = [replace(site, depth=depths[site.add]) for site in accepted]
        total = sum(p.flops for p in self.profiles.values()) if self.profiles else None
        levels = max([*depths.values(), *(self.offsets[n] + w for n, w in weights.items()
                                          if n in self.offsets)], default=0)
        return ResidualAnalysis(self.gm, sites, rejected, levels, total, self.profiles,
                                self.calls, self.root_path, order=self.order)

    def reject(self, node: Node, kind: str, reason: RejectReason, detail: str) -> RejectedAdd:
        scope = self.scope(node)
        return RejectedAdd(node.name, kind, reason, detail, scope[-1][0] if scope else "")

    def classify(self, node: Node, kind: str) -> ResidualSite | RejectedAdd:
        """The site ``node`` joins, or why it is not one: each check below rejects with the
        :class:`RejectReason` of the rule it enforces (docs/design.md, "Detecting residual
        sites", in this order)."""
        try:
            a, b = self.tensor_operands(node)
            self.check_shapes(node, a, b)
            fork = self.fork_of(a, b)
            skip, out, skip_path = self.skip_of(fork, a, b)
            # a module traced on its own returns its values to a caller fxsd did not see
            branch = collect_branch(self.gm, fork, out, node, self.order, self.holds_no_tensor,
                                    may_return=bool(self.root_path))
            if isinstance(branch, tuple):
                raise _Rejected(*branch)
            self.check_weights(fork, skip, out, skip_path, branch)
        except _Rejected as no:
            return self.reject(node, kind, no.reason, no.detail)
        scope = self.scope(node, branch.nodes)
        path, mtype = scope[-1] if scope else ("", "")
        params = tuple(n for n in branch.inputs if n.op == "get_attr")
        return ResidualSite(
            add=node, add_kind=kind, fork=fork, skip=skip,
            skip_kind=SkipKind.PROJECTION if skip_path else SkipKind.IDENTITY,
            skip_path=skip_path, branch_output=out, branch=branch.nodes,
            side_inputs=tuple(n for n in branch.inputs if n.op != "get_attr"),
            param_inputs=params, module_path=path, module_type=mtype, depth=0,
            num_params=_param_count(self.gm, (*branch.nodes, *params)),
            flops=(sum(self.profiles[n].flops for n in branch.nodes if n in self.profiles)
                   if self.profiles else None),
            scope=scope, escapes=branch.escapes, join=join_of(node, kind, out))

    def tensor_operands(self, node: Node) -> tuple[Node, Node]:
        """Checks 1-3: plain add arguments, two different tensors computed from an input."""
        try:
            a, b = add_operands(node)
        except ValueError as exc:
            raise _Rejected(RejectReason.UNSUPPORTED_ARGUMENTS, str(exc)) from None
        if join_alpha(node) is None:  # a number ``alpha`` is part of the join (fxsd.join)
            given = ", ".join(f"{k}={v}" for k, v in node.kwargs.items() if k in ("alpha", "out"))
            raise _Rejected(RejectReason.UNSUPPORTED_ARGUMENTS,
                            f"add with {given} is not gated: a gate computes the add with a "
                            "number as alpha (or none) and no out=")
        for x in (a, b):
            if not isinstance(x, Node):
                raise _Rejected(RejectReason.SCALAR_OPERAND,
                                f"operand {x!r} is a Python value, not a tensor")
        if a is b:
            raise _Rejected(RejectReason.SAME_OPERAND,
                            f"both operands are '{a.name}' (x + x has no skip)")
        for x in (a, b):
            if x in self.non_tensor:
                raise _Rejected(RejectReason.NON_TENSOR_OPERAND,
                                f"operand '{x.name}' is not a tensor")
            if not self.input_dependent(x):
                raise _Rejected(RejectReason.CONSTANT_OPERAND,
                                f"operand '{x.name}' depends on no model input's values (a "
                                "parameter, buffer or constant such as a position embedding "
                                "or bias, possibly expanded to the input's shape)")
        return a, b

    def check_shapes(self, node: Node, a: Node, b: Node) -> None:
        """Check 4: with shapes known, neither operand is broadcast (a skip added into part of
        the branch output matches the slice it is added to)."""
        if self.profiles is None:
            return
        sa, sb, so = (self.profiles[x].shape if x in self.profiles else None
                      for x in (a, b, node))
        part = partial_join_of(node)
        if part is not None and None not in (sa, sb) and len(sa) == len(sb) > part[0]:
            # a join into part of ``a``: ``b`` is as large as the slice it is added to
            d, start, stop = part
            size = sa[d]
            if sb[d] == min(size if stop is None else stop, size) - min(start, size):
                sb = sb[:d] + sa[d:d + 1] + sb[d + 1:]
        if None not in (sa, sb) and (sa != sb or so != sa):
            raise _Rejected(RejectReason.BROADCAST,
                            f"shapes {list(sa)} and {list(sb)} differ: one operand is "
                            "broadcast, so neither can stand in for the sum")

    def fork_of(self, a: Node, b: Node) -> Node:
        """Check 5: the latest common ancestor of the operands' values."""
        common = self.anc[a] & self.anc[b] & self.dependent_mask
        if not common:
            raise _Rejected(RejectReason.NO_COMMON_FORK,
                            f"'{a.name}' and '{b.name}' share no ancestor "
                            "(e.g. two separate model inputs)")
        return self.nodes[common.bit_length() - 1]

    def skip_of(self, fork: Node, a: Node, b: Node) -> tuple[Node, Node, tuple[Node, ...]]:
        """Check 6: ``(skip, branch output, projection path)``; the path is empty for an
        identity skip."""
        if fork is a or fork is b:
            return (a, b, ()) if fork is a else (b, a, ())
        paths = {x: self.path(fork, x) for x in (a, b)}
        costs = {x: self.cost(paths[x]) for x in (a, b)}
        skip, out = (a, b) if costs[a] < costs[b] else (b, a)
        n_ops = sum(1 for n in paths[skip] if not _is_free(n))
        if costs[skip] >= costs[out] or n_ops > MAX_PROJECTION_OPS or any(
            add_kind(n) for n in paths[skip]
        ):
            raise _Rejected(
                RejectReason.NO_CHEAP_SKIP,
                f"neither operand is the fork '{fork.name}' or a cheap projection of it "
                f"('{a.name}': {len(paths[a])} nodes, '{b.name}': {len(paths[b])} nodes)")
        return skip, out, tuple(paths[skip])

    def check_weights(self, fork: Node, skip: Node, out: Node, skip_path: tuple[Node, ...],
                      branch: Branch) -> None:
        """Check 8: a real residual block — the branch applies learned weights, and a
        projection skip is shallower than the branch."""
        weighted = sum(is_weighted(n, self.gm) for n in branch.nodes)
        if not weighted:
            raise _Rejected(
                RejectReason.NO_WEIGHTS,
                f"the branch '{branch.nodes[0].name}' … '{out.name}' applies no learned weights "
                "(no convolution, linear layer, matmul with a parameter or module with "
                "parameters): a parameter-free x + f(x), such as a rotary embedding, a "
                "polynomial activation or a normalisation, is not a residual block")
        if not skip_path:
            return
        if _is_linear(skip_path, self.gm, fork) and _is_linear(branch.nodes, self.gm, fork):
            raise _Rejected(
                RejectReason.PARALLEL_PATHS,
                f"'{skip.name}' and '{out.name}' are both linear in the fork (convolutions, "
                "linear layers, batch norms, sums, products with values not computed from it): "
                "the add is one linear layer written as parallel paths (MobileOne, RepVGG: "
                "merged into one conv at deployment; a lambda layer's content and position "
                "terms), not a skip and a branch")
        skip_weighted = sum(is_weighted(n, self.gm) for n in skip_path)
        nonlinear = any(is_nonlinear(n, self.gm) for n in branch.nodes)
        if not (skip_weighted < weighted or (
                nonlinear and not any(is_nonlinear(n, self.gm) for n in skip_path))):
            raise _Rejected(
                RejectReason.PARALLEL_PATHS,
                f"'{skip.name}' is not a shortcut: it applies as many learned weights as "
                f"'{out.name}' ({skip_weighted} and {weighted}) and no less nonlinearity, "
                "so the add joins parallel paths (RepVGG-style), not a skip and a branch")

    def settle_shared(self, accepted: list[ResidualSite], rejected: list[RejectedAdd]
                      ) -> tuple[list[ResidualSite], list[RejectedAdd]]:
        """A second join a site's work feeds (:mod:`fxsd.shared_work`) is gated with it: it
        is no rejected add. Where that join is a site of its own, the sharing site is
        rejected instead (one gate per join)."""
        own = {site.add for site in accepted}
        keep: list[ResidualSite] = []
        for site in accepted:
            taken = [j for j in _second_joins(site) if j in own]
            if taken:
                rejected.append(self.reject(
                    site.add, site.add_kind, RejectReason.ESCAPING_VALUE,
                    f"its branch's work also feeds '{taken[0].name}', which has a branch of "
                    "its own: the two joins cannot share one gate"))
            else:
                keep.append(site)
        shared = {j.name for site in keep for j in _second_joins(site)}
        return keep, [r for r in rejected if r.add not in shared]

    def depths(self, site_adds: dict[Node, tuple[Node, ...]], weights: dict[Node, int]
               ) -> dict[Node, int]:
        """Depth of each site: 1 + the most sites on any path from the inputs to its add (a node
        in ``weights`` counts as that many levels; the depth before it goes to ``offsets``).
        ``site_adds`` maps each site's add to the second joins it gates, which share its
        depth."""
        best: dict[Node, int] = {}
        depths: dict[Node, int] = {}
        second = {j: add for add, joins in site_adds.items() for j in joins}
        for n in self.nodes:
            d = max((best[a] for a in n.all_input_nodes), default=0)
            if n in weights:
                self.offsets[n] = d
                d += weights[n]
            if n in site_adds:
                d += 1
                depths[n] = d
            elif n in second:
                d = max(d, depths[second[n]])
            best[n] = d
        return depths


def _second_joins(site: ResidualSite) -> tuple[Node, ...]:
    """The adds of the second joins ``site``'s branch feeds (:mod:`fxsd.shared_work`)."""
    shared = site.escapes.shared if site.escapes is not None else ()
    return tuple(u.consumer for u in shared if u.kind is ShareKind.JOIN)


def collect_branch(
    gm: GraphModule, fork: Node, out: Node, add: Node, order: dict[Node, int] | None = None,
    holds_no_tensor: Callable[[Node], bool] = declared_no_tensor, may_return: bool = False,
) -> Branch | tuple[RejectReason, str]:
    """Cut out the branch that computes ``out`` from ``fork`` for the residual ``add``.

    Returns the branch's nodes (in graph order), the outside values it reads and what escapes
    it (:func:`fxsd.escapes.find_escapes`, which ``holds_no_tensor`` and ``may_return``
    serve), or a
    ``(reason, detail)`` pair when the branch cannot be gated as a unit. Used by the analysis and
    again by the rewrite (on a graph whose inner branches are already gated).
    """
    if order is None:
        order = node_order(gm.graph)
    stop = order[add]
    # Everything computed from the fork before the add.
    region: set[Node] = set()
    stack = [fork]
    while stack:
        for u in stack.pop().users:
            if u not in region and order[u] < stop and not is_metadata_read(u):
                region.add(u)
                stack.append(u)
    if out not in region:
        return RejectReason.NO_COMMON_FORK, f"'{out.name}' is not computed from '{fork.name}'"
    nodes: set[Node] = set()
    stack = [out]
    while stack:
        n = stack.pop()
        if n in nodes:
            continue
        nodes.add(n)
        stack.extend(a for a in n.all_input_nodes if a in region and a not in nodes)
    _absorb(gm, nodes, fork, add)
    escapes = None
    if any(u not in nodes and not (n is out and u is add) for n in nodes for u in n.users):
        escapes = find_escapes(nodes, fork, out, add, order, holds_no_tensor, may_return)
        grown = find_shared(gm, nodes, add, order) if isinstance(escapes, str) else None
        if grown is not None:  # the work feeds a second join too: one gate for both
            nodes.update(grown[0])
            escapes = find_escapes(nodes, fork, out, add, order, holds_no_tensor, may_return,
                                   grown[1])
        if isinstance(escapes, str):
            return RejectReason.ESCAPING_VALUE, escapes
        nodes.update(escapes.moved)
    ordered = sorted(nodes, key=order.__getitem__)
    inputs: dict[Node, None] = {}
    for n in ordered:
        for a in n.all_input_nodes:
            if a not in nodes and a is not fork:
                inputs.setdefault(a)
    problem = _mutation_problem(gm, ordered, fork, inputs, add, order)
    if problem:
        return RejectReason.MUTATION, problem
    return Branch(tuple(ordered), tuple(inputs), escapes)


def _absorb(gm: GraphModule, nodes: set[Node], fork: Node, add: Node) -> None:
    """Grow ``nodes`` by what belongs to the branch though it is not on a fork-to-output path.

    * unused side results of branch nodes (the attention weights a ``MultiheadAttention`` returns
      next to its output), which would otherwise hold on to a value inside the branch;
    * shape reads of branch values that feed only the branch and checks
      (``torch._assert(H % window == 0)`` in timm's window attention);
    * modules only the branch reads as values (:func:`fxsd.tracing.if_training` reads their
      ``training`` flag);
    * outside values that only the branch reads and that are computed from parameters and the
      metadata of the fork or of branch values (a relative position bias gathered from its
      table, ``x.shape[0]`` for a reshape): computing them inside the gate means a dropped
      branch skips them too, and a branch run on a subset of rows reads its own batch size.
      The shape of any other tensor stays outside, a value the branch is handed.
    """
    unused: dict[Node, bool] = {}
    changed = True
    while changed:
        changed = False
        for n in list(nodes):
            for u in n.users:
                if u in nodes or u is add:
                    continue
                if _is_dead(u, gm, unused):
                    nodes.update(_subtree(u))
                    changed = True
                elif is_metadata_read(u):
                    checks = _feeds_only(u, nodes, add, gm)
                    if checks is not None:
                        nodes.update(checks)
                        changed = True
            for a in n.all_input_nodes:
                if a.op == "get_attr" and a not in nodes and all(u in nodes for u in a.users) \
                        and is_module(gm, str(a.target)):
                    nodes.add(a)  # a module whose flag the branch reads (``if_training``)
                    changed = True
                    continue
                if a in nodes or a is fork or a.op in ("placeholder", "get_attr"):
                    continue
                if is_inplace(a, gm) or depends_on_input(a):
                    continue
                if not _rooted_in(a, nodes, fork):
                    continue  # from another tensor's shape: a value the branch is handed
                dead = [u for u in a.users if not u.users and not is_inplace(u, gm)
                        and u.op != "output"]  # ``B, N, C = x.shape`` with N unused
                if all(u in nodes or u in dead for u in a.users):
                    nodes.add(a)
                    nodes.update(dead)
                    changed = True


# Dead metadata chains and side computations are a few nodes (``h.size()[-1]``, an assert);
# walks stop after this many, so a large live subgraph is never walked as if dead.
MAX_SIDE_NODES = 64


def _rooted_in(node: Node, nodes: set[Node], fork: Node, limit: int = MAX_SIDE_NODES) -> bool:
    """Whether ``node`` is computed from parameters, constants and ``nodes`` or the ``fork``
    alone (through their metadata: nothing else it reads is input-dependent)."""
    seen, stack = {node}, [node]
    while stack:
        n = stack.pop()
        for a in n.all_input_nodes:
            if a in nodes or a is fork or a.op == "get_attr" or a in seen:
                continue
            if a.op == "placeholder" or len(seen) >= limit:
                return False
            seen.add(a)
            stack.append(a)
    return True


def _is_dead(node: Node, gm: Any, memo: dict[Node, bool], limit: int = MAX_SIDE_NODES) -> bool:
    """Whether ``node``'s value is never used: no users, or only users whose values are never
    used (``x.size()`` followed by an unused ``[0]``, or only by a ``torch._assert``), and no
    in-place effect on the way.

    Dead subgraphs are small; one of more than ``limit`` nodes is taken as live."""
    if node in memo:
        return memo[node]
    seen: list[Node] = []
    stack = [node]
    while stack:
        n = stack.pop()
        if n in memo:
            if not memo[n]:
                break
            continue
        if n.op in ("output", "placeholder") or is_inplace(n, gm) \
                or (_is_impure(n) and not _is_assertion(n)) or len(seen) >= limit:
            memo[n] = False
            break
        seen.append(n)
        stack.extend(u for u in n.users if u not in seen)
    else:
        for n in seen:
            memo[n] = True
        return True
    memo[node] = False
    return False


def _feeds_only(node: Node, nodes: set[Node], add: Node, gm: Any, limit: int = MAX_SIDE_NODES
                ) -> set[Node] | None:
    """The nodes outside ``nodes`` that ``node`` feeds, if all of them only feed ``nodes`` or
    end in checks (``torch._assert``) or nothing; else ``None``."""
    found, stack = {node}, [node]
    while stack:
        n = stack.pop()
        if n is add or n.op in ("output", "placeholder") or is_inplace(n, gm) \
                or (_is_impure(n) and not _is_assertion(n)) or len(found) > limit:
            return None
        for u in n.users:
            if u not in nodes and u not in found:
                found.add(u)
                stack.append(u)
    return found


def _subtree(node: Node) -> set[Node]:
    found, stack = {node}, [node]
    while stack:
        for u in stack.pop().users:
            if u not in found:
                found.add(u)
                stack.append(u)
    return found


def _mutation_problem(
    gm: GraphModule, branch: list[Node], fork: Node, inputs: dict[Node, None], add: Node,
    order: dict[Node, int],
) -> str | None:
    members = set(branch)
    read = {fork, *inputs}
    for n in branch:
        target = mutated_operand(n, gm)
        if target is not None and target not in members and n.op != "call_module":
            return (f"'{n.name}' in the branch mutates '{target.name}' in place, which lives "
                    "outside the branch: skipping the branch would skip that mutation")
    n = branch[0]
    while n.next is not add and n.next.op != "root":  # walk the nodes between branch and add
        n = n.next
        if n in members:
            continue
        target = mutated_operand(n, gm)
        if target in read and n.op != "call_module":
            return (f"'{n.name}' mutates '{target.name}' in place between the branch and the add; "
                    "gating would move the branch after that mutation")
    return None


def _non_tensor_nodes(nodes: list[Node], profiles: dict[Node, NodeProfile] | None) -> set[Node]:
    """Nodes that hold Python numbers or shapes rather than tensors."""
    if profiles is not None:
        return {n for n in nodes if n in profiles and not profiles[n].is_tensor
                and n.op != "placeholder"}
    out: set[Node] = set()
    for n in nodes:
        if is_metadata_read(n) or n.op == "call_method" and n.target in ("item", "tolist"):
            out.add(n)
        elif n.op == "call_function" and getattr(n.target, "__module__", None) == "_operator" \
                and n.all_input_nodes and all(a in out for a in n.all_input_nodes):
            out.add(n)
        elif n.op == "call_function" and n.target in (len, int, float, operator.index):
            out.add(n)
    return out


def _is_free(n: Node) -> bool:
    """Nodes that cost (almost) nothing: views, ``getitem``, attribute reads."""
    if n.op in ("placeholder", "get_attr", "output"):
        return True
    if n.op == "call_function" and n.target is getattr:
        return True
    return is_view(n)


# Ops that are linear in their input (batch norm: at inference); a path of these only is one
# linear map of the fork. A subclass counts only if it keeps its base class's ``forward``.
_LINEAR_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d,
                   nn.BatchNorm3d, nn.SyncBatchNorm, nn.Identity)
_LINEAR_FUNCTIONS = frozenset({
    torch.nn.functional.conv1d, torch.nn.functional.conv2d, torch.nn.functional.conv3d,
    torch.nn.functional.linear, torch.nn.functional.batch_norm, torch.conv1d, torch.conv2d,
    torch.conv3d, torch.batch_norm, operator.neg, torch.neg})


# Products: linear in one operand when the other is not computed from it (``q @ k``, ``x * g``).
_PRODUCT_FUNCTIONS = frozenset({operator.matmul, operator.mul, torch.matmul, torch.mul, torch.bmm,
                                torch.mm})
_PRODUCT_METHODS = frozenset({"matmul", "mul", "bmm", "mm"})


def _is_linear(nodes: Iterable[Node], gm: GraphModule, fork: Node) -> bool:
    """Whether every op in ``nodes`` (a path from ``fork``) is linear in the fork: views,
    reads, adds, linear layers, and products of one path value with a value computed
    elsewhere."""
    nodes = list(nodes)
    on_path = {*nodes, fork}
    for n in nodes:
        if _is_free(n) or add_kind(n) is not None:
            continue
        if (n.op == "call_function" and n.target in _PRODUCT_FUNCTIONS) or (
                n.op == "call_method" and n.target in _PRODUCT_METHODS):
            if sum(a in on_path for a in n.all_input_nodes) == 1 and len(n.args) == 2:
                continue
            return False
        if n.op == "call_module":
            try:
                module = gm.get_submodule(str(n.target))
            except AttributeError:
                return False
            if not _is_linear_module(module):
                return False
        elif not (n.op == "call_function" and n.target in _LINEAR_FUNCTIONS):
            return False
    return True


def _is_linear_module(module: nn.Module) -> bool:
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        # a batch norm, also one with an activation slot left empty (timm's BatchNormAct2d)
        return all(isinstance(c, nn.Identity) for c in module.children())
    return any(isinstance(module, c) and type(module).forward is c.forward
               for c in _LINEAR_MODULES)


def _param_count(gm: GraphModule, nodes: Iterable[Node]) -> int:
    seen: dict[int, int] = {}
    for n in nodes:
        if n.op == "call_module":
            try:
                mod = gm.get_submodule(str(n.target))
            except AttributeError:
                continue
            for p in mod.parameters():
                seen[id(p)] = p.numel()
        elif n.op == "get_attr":
            try:
                value = resolve_attr(gm, str(n.target))
            except AttributeError:
                continue
            if isinstance(value, nn.Parameter):
                seen[id(value)] = value.numel()
    return sum(seen.values())


def _is_assertion(node: Node) -> bool:
    """``torch._assert(cond, msg)`` and friends: checks with no effect on values (a check on a
    branch value need not run when the branch is skipped)."""
    return node.op == "call_function" and node.target in _ASSERTIONS


_ASSERTIONS = tuple(f for f in (getattr(torch, "_assert", None), getattr(torch, "_check", None),
                                getattr(torch, "_assert_async", None)) if f is not None)


def _is_impure(node: Node) -> bool:
    try:
        return node.is_impure()
    except AssertionError:  # a graph without its module (a block being cut out): be careful
        return node.op == "call_module"


def is_module(gm: Any, target: str) -> bool:
    try:
        return isinstance(gm.get_submodule(target), nn.Module)
    except AttributeError:
        return False

