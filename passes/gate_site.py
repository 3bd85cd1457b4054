"""Gate one residual site inside a module cut out of a trace: its branch moves into a small
``GraphModule`` and a gate call takes the add's place.

The one piece of graph surgery that both the pass (:mod:`fxsd.passes.stochastic_depth`, which
makes the gates) and a block tracing itself again (:mod:`fxsd.variants`, which reuses them) do:

1. :func:`cut_site` finds the site's nodes in the cut-out graph, takes out the drop-path calls
   the plan removes, returns ``None`` where the module returned a value computed inside the
   branch, collects the branch and builds its ``GraphModule``;
2. :func:`call_gate` replaces the add by a call of the gate and erases the branch's nodes.

Sites are gated in execution order; ``rewritten`` maps each add already replaced to its gate
call, so a site nested inside another's branch is a gate call when the outer one is cut.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch.fx import Graph, GraphModule, Node
from torch.fx.node import map_aggregate

from fxsd.errors import GraphError
from fxsd.graph_module import FxsdGraphModule
from fxsd.residuals import Branch, ResidualSite, collect_branch, is_module

__all__ = ["CutSite", "cut_site", "call_gate"]


@dataclass
class CutSite:
    """One site's pieces in a cut-out graph.

    Attributes:
        add, fork, skip: the site's nodes in that graph; ``identity``: the skip is the fork.
        branch: its branch (nodes and the outside values they read) and ``branch_module``, the
            ``GraphModule`` a gate runs.
        released: names of values the module returned from inside the branch, now ``None``.
    """

    add: Node
    fork: Node
    skip: Node
    branch: Branch
    branch_module: GraphModule
    released: list[str]

    @property
    def identity(self) -> bool:
        return self.skip is self.fork

    @property
    def gate_args(self) -> tuple[Node, ...]:
        """What the gate call takes: ``(x, *side)`` for an identity skip, else
        ``(skip, fork, *side)``."""
        rest = (self.fork, *self.branch.inputs)
        return rest if self.identity else (self.skip, *rest)


def cut_site(cut: Any, site: ResidualSite, drops: Sequence[Node], rewritten: dict[Node, Node],
             order: dict[Node, int], name: str) -> CutSite:
    """Step 1 for ``site`` in ``cut`` (an :class:`~fxsd.passes.extract_module.ExtractedModule`);
    ``drops``: drop-path calls of the analysed graph to take out; ``name``: the gate's."""
    fork, skip, out, add = (rewritten.get(cut.env[n], cut.env[n])
                            for n in (site.fork, site.skip, site.branch_output, site.add))
    out = _remove_drop_paths(cut.graph, [cut.env[n] for n in drops], out)
    released = _release_unused_outputs(cut.graph, {cut.env[n] for n in site.branch
                                                   if n in cut.env})
    branch = collect_branch(cut, fork, out, add, order)
    if isinstance(branch, tuple):  # the analysis accepted it: a bug if this happens
        raise GraphError(f"cannot gate '{site.add.name}' in '{site.module_path or '<root>'}' "
                         f"after cutting the module out: {branch[1]}")
    module = _branch_module(cut, fork, branch.nodes, branch.inputs, out, name)
    return CutSite(add, fork, skip, branch, module, released)


def call_gate(graph: Graph, piece: CutSite, name: str, rewritten: dict[Node, Node],
              order: dict[Node, int]) -> Node:
    """Step 2: call the gate ``name`` where the add was, and take the branch's nodes out."""
    add = piece.add
    with graph.inserting_before(add):
        call = graph.call_module(name, piece.gate_args)
    call.meta = {k: v for k, v in add.meta.items() if k in ("nn_module_stack", "stack_trace")}
    order[call] = order[add]
    add.replace_all_uses_with(call)
    graph.erase_node(add)
    for n in reversed(piece.branch.nodes):
        graph.erase_node(n)
    rewritten[add] = call
    return call


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
