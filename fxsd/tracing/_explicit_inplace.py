"""Make the effect of in-place ops visible in a graph's data flow.

``out.add_(identity); return relu(out)`` traces to an ``add_`` node nobody uses and a ``relu`` that
reads ``out``: the graph hides that ``relu`` sees the sum. Since an in-place op returns the tensor
it mutated, every later reader of ``out`` can read the in-place node instead, with the same tensor
at run time. After this pass the graph's edges say which value each node sees, which is what the
residual analysis and the rewrite rely on.
"""

from __future__ import annotations

import operator

from torch.fx import GraphModule

from fxsd.tracing.ops import mutated_operand, node_order

__all__ = ["make_inplace_explicit"]


def make_inplace_explicit(gm: GraphModule) -> int:
    """Point the later readers of each in-place-mutated tensor at the in-place node.

    Returns the number of uses redirected. Edits ``gm.graph`` in place and recompiles ``gm``.
    """
    order = node_order(gm.graph)
    redirected = 0
    for node in gm.graph.nodes:
        target = mutated_operand(node, gm)
        if target is None or node.op == "call_module" or node.target is operator.setitem:
            # In-place modules (ReLU(inplace=True)) are called for their result in practice;
            # ``x[key] = v`` returns None.
            continue
        for user in list(target.users):
            if user is not node and order[user] > order[node]:
                user.replace_input_with(target, node)
                redirected += 1
    if redirected:
        gm.recompile()
    return redirected
