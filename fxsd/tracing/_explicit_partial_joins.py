"""Make joins into part of a tensor one node: ``torch.cat([x[:, :C] + s, x[:, C:]], dim=1)``
becomes ``partial_add(x, s, 1, 0, C)`` (:mod:`fxsd.tracing.partial_join`), which computes the same
expression. The residual analysis then sees ``x`` (the branch output) and ``s`` (the skip) as the
two operands of one join, and the rewrite can gate the whole of ``x``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch.fx import GraphModule, Node
from torch.fx.node import map_aggregate

from fxsd.tracing.ops import is_view, node_order
from fxsd.tracing.partial_join import match_assigned_join, match_partial_join, partial_add

__all__ = ["make_partial_joins_explicit"]


def make_partial_joins_explicit(gm: GraphModule, calls: Sequence[Any] | None = None) -> int:
    """Replace each ``cat`` of slices with an add in one of them by a :func:`partial_add` call.

    ``calls``: the module calls the trace recorded (:class:`~fxsd.tracing.calls.ModuleCall`); a call
    that returned a rewritten ``cat`` returns its ``partial_add`` instead. Returns the number of
    joins rewritten. Edits ``gm.graph`` and ``calls`` in place and recompiles ``gm``.
    """
    found = 0
    replaced: dict[Node, Node] = {}
    for node in list(gm.graph.nodes):
        if _assigned_join(gm, node, calls):
            found += 1
            continue
        match = match_partial_join(node)
        if match is None:
            continue
        whole, part, add, (dim, start, stop) = match
        with gm.graph.inserting_before(node):
            joined = gm.graph.call_function(partial_add, (whole, part, dim, start, stop))
        joined.meta = dict(add.meta)  # the add's module calls and stack: where the join is
        node.replace_all_uses_with(joined)
        replaced[node] = joined
        pieces = node.args[0]
        gm.graph.erase_node(node)
        for piece in pieces:
            inputs = piece.all_input_nodes
            gm.graph.erase_node(piece)
            for view in inputs if piece is add else ():  # the slice the add read
                if view is not whole and view is not part and not view.users:
                    gm.graph.erase_node(view)
        found += 1
    if found:
        gm.recompile()
        for call in calls or ():
            call.args, call.kwargs, call.output = map_aggregate(
                (call.args, call.kwargs, call.output),
                lambda v: replaced.get(v, v) if isinstance(v, Node) else v)
    return found


def _assigned_join(gm: GraphModule, node: Node, calls: Sequence[Any] | None) -> bool:
    """Rewrite ``x[key] = x[key] + s`` (``x[:, :C] += s``) as ``y = partial_add(x, s, ...)``,
    every later use of ``x`` reading ``y`` (and the module calls running at the assignment
    returning ``y`` where they returned ``x``). Returns whether ``node`` was such an
    assignment."""
    match = match_assigned_join(node)
    if match is None or is_view(match[0]):  # assigning into a view changes its base too
        return False
    whole, part, add, (dim, start, stop) = match
    order = node_order(gm.graph)
    with gm.graph.inserting_before(node):
        joined = gm.graph.call_function(partial_add, (whole, part, dim, start, stop))
    joined.meta = dict(add.meta)
    for user in list(whole.users):  # later readers read the join, as in make_inplace_explicit
        if order.get(user, -1) > order[node]:
            user.replace_input_with(whole, joined)
    for index in getattr(node.meta.get("fxsd"), "calls", ()) if calls else ():
        call = calls[index]
        call.output = map_aggregate(call.output, lambda v: joined if v is whole else v)
    view = next(a for a in add.args if a is not part)
    for n in (node, add, view):
        gm.graph.erase_node(n)
    return True
