"""Gate one residual site inside a module cut out of a trace: its branch moves into a small
``GraphModule`` and a gate call takes the add's place.

The one piece of graph surgery that both the pass (:mod:`fxsd.passes.gate_residuals`, which
makes the gates) and a block tracing itself again (:mod:`fxsd.runtime.variants`, which reuses them)
do:

1. :func:`cut_site` finds the site's nodes in the cut-out graph, takes out the drop-path calls
   the plan removes, returns ``None`` where the module returned a value computed inside the
   branch, collects the branch and builds its ``GraphModule``;
2. :func:`call_gate` replaces the add by a call of the gate and erases the branch's nodes.

Sites are gated in execution order; ``rewritten`` maps each add already replaced to the node
now standing for it (the gate call, or the part of its result that is the sum), so a site nested
inside another's branch is a gate call when the outer one is cut.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn
from torch.fx import Graph, GraphModule, Node
from torch.fx.node import map_aggregate

from fxsd.analysis.branches import Branch, collect_branch
from fxsd.analysis.escapes import Escapes
from fxsd.analysis.shared_work import SharedOutput
from fxsd.analysis.sites import ResidualSite
from fxsd.errors import GraphError
from fxsd.graph_module import HostedGraphModule
from fxsd.graph_names import take_name
from fxsd.runtime.escape_path import EscapePath
from fxsd.runtime.gate_info import ShareKind
from fxsd.tracing.ops import is_module, node_order

__all__ = ["CutSite", "cut_site", "call_gate", "gate_sites"]


@dataclass
class CutSite:
    """One site's pieces in a cut-out graph.

    Attributes:
        add, fork, skip: the site's nodes in that graph; ``identity``: the skip is the fork.
        branch: its branch (nodes and the outside values they read) and ``branch_module``, the
            ``GraphModule`` a gate runs.
        released: names of values the module returned from inside the branch, now ``None``.
        escape_path: how a skipped branch produces what escapes it (``None``: nothing does);
            the branch module then returns ``(output, *escaping values)``.
    """

    add: Node
    fork: Node
    skip: Node
    branch: Branch
    branch_module: GraphModule
    released: list[str]
    escape_path: EscapePath | None = None

    @property
    def identity(self) -> bool:
        return self.skip is self.fork

    @property
    def shared(self) -> tuple[SharedOutput, ...]:
        """Second joins and concatenations the branch's work feeds
        (:mod:`fxsd.analysis.shared_work`)."""
        return self.branch.escapes.shared if self.branch.escapes else ()

    @property
    def gate_args(self) -> tuple[Node, ...]:
        """What the gate call takes: ``(x, *side)`` for an identity skip, else
        ``(skip, fork, *side)``; then the skips of the second joins its work feeds."""
        rest = (self.fork, *self.branch.inputs)
        skips = tuple(s.skip for s in self.shared if s.kind is ShareKind.JOIN)
        return (*rest, *skips) if self.identity else (self.skip, *rest, *skips)


def cut_site(cut: Any, site: ResidualSite, drops: Sequence[Node], rewritten: dict[Node, Node],
             order: dict[Node, int], name: str) -> CutSite:
    """Step 1 for ``site`` in ``cut`` (an :class:`~fxsd.passes.extract_module.ExtractedModule`);
    ``drops``: drop-path calls of the analysed graph to take out; ``name``: the gate's."""
    fork, skip, out, add = (rewritten.get(cut.env[n], cut.env[n])
                            for n in (site.fork, site.skip, site.branch_output, site.add))
    out = _remove_drop_paths(cut.graph, [cut.env[n] for n in drops], out)
    escaping = site.escapes.values if site.escapes else ()
    released = _release_unused_outputs(cut.graph, {cut.env[n] for n in site.branch
                                                   if n in cut.env and n not in escaping})
    abstract = {cut.env[n] for n in site.escapes.abstract} if site.escapes else set()
    branch = collect_branch(cut, fork, out, add, order, abstract.__contains__,
                            may_return=bool(site.escapes and site.escapes.unproduced))
    if isinstance(branch, tuple):  # the analysis accepted it: a bug if this happens
        raise GraphError(f"cannot gate '{site.add.name}' in '{site.module_path or '<root>'}' "
                         f"after cutting the module out: {branch[1]}")
    inputs = (fork, *branch.inputs)
    escapes = branch.escapes.values if branch.escapes else ()
    shared = branch.escapes.shared if branch.escapes else ()
    outputs = (out, *escapes, *(s.value for s in shared))
    module = _graph_module(cut, inputs, branch.nodes, outputs if len(outputs) > 1 else out,
                           _class_name(name, "Branch"))
    path = _escape_path(cut, inputs, branch.escapes, name) if escapes else None
    return CutSite(add, fork, skip, branch, module, released, path)


def call_gate(graph: Graph, piece: CutSite, name: str, rewritten: dict[Node, Node],
              order: dict[Node, int]) -> Node:
    """Step 2: call the gate ``name`` where the add was, and take the branch's nodes out."""
    add = piece.add
    with graph.inserting_before(add):
        call = graph.call_module(name, piece.gate_args)
    call.meta = {k: v for k, v in add.meta.items() if k in ("nn_module_stack", "stack_trace")}
    order[call] = order[add]
    result = call
    shared = piece.shared
    if piece.escape_path is not None or shared:  # the gate returns (sum, *escaping values,
        escapes = piece.branch.escapes.values  # *what it hands the second joins)
        named = (add, *escapes, *(s.consumer if s.kind is ShareKind.JOIN else s.value
                                  for s in shared))
        with graph.inserting_after(call):
            parts = [graph.call_function(operator.getitem, (call, i))
                     for i in range(len(named))]
        for part, value in zip(parts[1:], escapes):
            value.replace_all_uses_with(part)
        for part, use in zip(parts[1 + len(escapes):], shared):
            if use.kind is ShareKind.JOIN:
                use.consumer.replace_all_uses_with(part)
                graph.erase_node(use.consumer)
                rewritten[use.consumer] = part  # a later site's fork or skip
            else:
                use.consumer.replace_input_with(use.value, part)
        result = parts[0]
        for part in parts:
            order[part] = order[add]
    add.replace_all_uses_with(result)
    graph.erase_node(add)
    for n in reversed(piece.branch.nodes):
        graph.erase_node(n)
    if result is not call:  # the parts are named after the values they stand for
        for part, value in zip(parts, named):
            take_name(part, value.name)
    rewritten[add] = result
    return call


def gate_sites(cut: Any, sites: Sequence[tuple[ResidualSite, str, Sequence[Node]]],
               make_gate: Callable[[ResidualSite, str, CutSite], nn.Module]) -> None:
    """Gate each of ``sites`` (``(site, gate name, drop-path calls to take out)``, in execution
    order) inside ``cut``: its branch cut out (step 1), the module ``make_gate(site, name,
    piece)`` returns set as the gate ``name``, and called where the add was (step 2). The one
    loop over an owner's sites, for the rewrite and for a block's re-gating."""
    order = node_order(cut.graph)
    rewritten: dict[Node, Node] = {}  # rewritten add -> the node standing for it now
    for site, name, drops in sites:
        piece = cut_site(cut, site, drops, rewritten, order, name)
        cut.extra_attrs[name] = make_gate(site, name, piece)
        call_gate(cut.graph, piece, name, rewritten, order)


def _remove_drop_paths(graph: Graph, drops: list[Node], out: Node) -> Node:
    """Take drop-path calls out of the graph; the branch output (``out`` or, if that was a drop
    path, its input)."""
    for node in drops:
        source = node.all_input_nodes[0]
        if node is out:
            out = source
        node.replace_all_uses_with(source)
        graph.erase_node(node)
    return out


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


def _escape_path(gm: Any, inputs: Sequence[Node], escapes: Escapes, name: str) -> EscapePath:
    """The two small modules a skipped branch's escaping values come from: the abstract run of
    what they need holding no tensor, and the real nodes that compute them from that."""
    abstract = _graph_module(gm, inputs, escapes.shapes,
                             tuple(escapes.abstract), _class_name(name, "Shapes"))
    produced = tuple(n for n in escapes.values if n not in escapes.unproduced)
    compute = _graph_module(gm, (*escapes.abstract, *inputs), escapes.real, produced,
                            _class_name(name, "Escapes"))
    return EscapePath(abstract, compute, tuple(n.name for n in escapes.values),
                      tuple(i for i, n in enumerate(escapes.values) if n in escapes.unproduced))


def _class_name(gate: str, kind: str) -> str:
    name = "".join(part.capitalize() for part in gate.split("_")) or "Gate"
    return name.removesuffix("Gate") + kind


def _graph_module(gm: Any, inputs: Sequence[Node], nodes: Sequence[Node], out: Any,
                  class_name: str) -> GraphModule:
    """A module of ``nodes`` (copied from ``gm``'s graph, in order) taking ``inputs`` and
    returning ``out`` (a node or a tuple of them)."""
    graph = Graph()
    env: dict[Node, Node] = {}
    for n in inputs:
        env[n] = graph.placeholder(n.name)
        env[n].meta = dict(n.meta)
    for n in nodes:
        if n not in env:
            env[n] = graph.node_copy(n, env.__getitem__)
    graph.output(map_aggregate(out, env.__getitem__))
    attrs = {str(n.target): gm.get_submodule(str(n.target)) for n in graph.nodes
             if n.op == "call_module" or (n.op == "get_attr" and is_module(gm, str(n.target)))}
    if any(n.op == "get_attr" and n.target == "training" for n in graph.nodes):
        attrs["training"] = gm.training
    # it reads the block's modules and flag through the block, when it runs
    return HostedGraphModule(attrs, graph, class_name=class_name)
