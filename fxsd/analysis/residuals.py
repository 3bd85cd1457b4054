"""The per-graph classifier: which adds of one traced graph are residual joins, and why the others
are not (:func:`analyze_graph`; the entry points that trace a model and call it are in
:mod:`fxsd.analysis.analyze`).

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

The classifier only reads the graph it is given. Its result types are in :mod:`fxsd.analysis.sites`;
it cuts each branch with :func:`fxsd.analysis.branches.collect_branch`.
"""


from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence
from dataclasses import replace

from torch import nn
from torch.fx import GraphModule, Node

from fxsd.analysis.branches import Branch, collect_branch
from fxsd.analysis.escapes import declared_no_tensor
from fxsd.analysis.node_costs import NodeProfile
from fxsd.analysis.sites import ResidualAnalysis, ResidualSite, SkipKind
from fxsd.record import RejectedAdd, RejectReason
from fxsd.runtime.gate_info import ShareKind
from fxsd.runtime.join import join_alpha, join_of
from fxsd.tracing.calls import CallTree, stack_scope
from fxsd.tracing.ops import (
    add_kind,
    add_operands,
    data_inputs,
    input_dependent_nodes,
    is_free,
    is_linear,
    is_metadata_read,
    is_nonlinear,
    is_weighted,
    node_order,
    resolve_attr,
)
from fxsd.tracing.partial_join import partial_join_of

# The analysis' types live in fxsd.analysis.sites; the four below are re-exported because
# docs/api.md documents them under this module's path (and pickled records name
# fxsd.analysis.residuals.RejectedAdd).
__all__ = ["analyze_graph", "RejectReason", "RejectedAdd", "ResidualAnalysis", "SkipKind"]

#: A projection skip may hold at most this many ops (views and ``getitem`` not counted).
MAX_PROJECTION_OPS = 4


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
                sum(1 for n in nodes if not is_free(n)))

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
        if join_alpha(node) is None:  # a number ``alpha`` is part of the join (fxsd.runtime.join)
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
        n_ops = sum(1 for n in paths[skip] if not is_free(n))
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
        if is_linear(skip_path, self.gm, fork) and is_linear(branch.nodes, self.gm, fork):
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
        """A second join a site's work feeds (:mod:`fxsd.analysis.shared_work`) is gated with it: it
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
    """The adds of the second joins ``site``'s branch feeds (:mod:`fxsd.analysis.shared_work`)."""
    shared = site.escapes.shared if site.escapes is not None else ()
    return tuple(u.consumer for u in shared if u.kind is ShareKind.JOIN)


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
