"""Branches whose work feeds a second join: one gate for the work, dropping every use of it.

A joint-attention block (diffusers' SD3 and Flux) computes one attention for two streams and
adds its two outputs to two residuals; timm's DPN splits one convolution's output between the
residual add and a dense concatenation. Cut at the first add, such a branch hands a tensor of
its own work to code outside it, which no skipped branch can produce:
:func:`fxsd.analysis.escapes.find_escapes` rejects it. Here the branch grows instead:

* from each value of the work used outside the branch, the uses are followed (the second
  stream's own projection, its gating product) — the *chain*, which joins the branch;
* each chain ends at a **second join** — an add after the first whose other operand is not
  computed from the work (:attr:`ShareKind.JOIN`) — or at a **concatenation** after the first
  add (:attr:`ShareKind.ZEROS`). Anything else (the model's output, an in-place op, a use
  before the first add) leaves the branch rejected.

The gate then holds the work and the chains and drops them together: kept, it computes every
join (each branch term scaled as the first) and hands each concatenation its operand; dropped,
each join returns its skip and each concatenation gets zeros — exactly the plain model with
the values the work hands to those joins and concatenations zeroed.

Pure analysis on a graph: nothing is traced or changed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

from fxsd.runtime.gate_info import ShareKind
from fxsd.runtime.join import Join, join_alpha, join_of
from fxsd.tracing.ops import add_kind, add_operands, is_inplace, is_metadata_read

__all__ = ["ShareKind", "SharedOutput", "find_shared"]

#: A chain from the work to a second use holds at most this many nodes.
MAX_CHAIN = 32

@dataclass(frozen=True)
class SharedOutput:
    """A second use of a branch's work, gated with the branch.

    Attributes:
        kind: a second join or a concatenation.
        value: the branch value it receives (the join's branch term, or the operand of the
            concatenation), computed inside the gate.
        consumer: the second join's add node, or the concatenation.
        skip: a join's other operand (``None`` for a concatenation).
        join: a join's add as the source wrote it (``None`` for a concatenation).
    """

    kind: ShareKind
    value: Node
    consumer: Node
    skip: Node | None = None
    join: Join | None = None


def find_shared(gm: GraphModule, nodes: set[Node], add: Node, order: dict[Node, int]
                ) -> tuple[set[Node], tuple[SharedOutput, ...]] | None:
    """The chains to add to the branch ``nodes`` of ``add`` and the second uses they end in,
    or ``None`` when some use of the branch's work is not such a chain (see the module
    docstring)."""
    stop = order[add]
    chain: set[Node] = set()
    shared: list[SharedOutput] = []
    work = [u for n in nodes for u in n.users if u not in nodes and u is not add]
    seen: set[Node] = set()
    while work:
        u = work.pop()
        if u in seen or u in nodes or u in chain or is_metadata_read(u):
            continue  # shape reads are find_escapes' to judge
        seen.add(u)
        found = _second_use(u, nodes | chain, (nodes, order), add) if order[u] > stop \
            else None
        if found is not None:
            shared.extend(found)
        elif u.op in ("output", "placeholder") or is_inplace(u, gm) or _is_impure(u) \
                or len(chain) >= MAX_CHAIN:
            return None
        else:  # the second use's own work (a projection of the second stream)
            chain.add(u)
            work.extend(u.users)
    if not shared:
        return None
    pulled = _pull_inputs(chain, nodes, stop, order)
    if pulled is None or any(s.skip is not None and order[s.skip] >= stop for s in shared):
        return None
    return chain | pulled, tuple(sorted(shared, key=lambda s: order[s.consumer]))


def _second_use(u: Node, inside: set[Node], work: tuple[set[Node], dict[Node, int]],
                add: Node) -> list[SharedOutput] | None:
    """``u`` as a second join or a concatenation of values in ``inside`` (the first join's
    result may be concatenated too: DPN's next input), else ``None``."""
    kind = add_kind(u)
    if kind is not None and kind != "partial add" and join_alpha(u) is not None:
        try:
            a, b = add_operands(u)
        except ValueError:
            return None
        ours = [x for x in (a, b) if isinstance(x, Node) and x in inside]
        other = b if ours == [a] else a if ours == [b] else None
        if isinstance(other, Node) and not _computed_from(other, *work):
            value = ours[0]
            return [SharedOutput(ShareKind.JOIN, value, u, other, join_of(u, kind, value))]
        return None
    if u.op == "call_function" and u.target is torch.cat and u.args \
            and isinstance(u.args[0], (list, tuple)):
        parts = u.args[0]
        ours = [x for x in parts if isinstance(x, Node) and x in inside]
        if ours and all(not isinstance(x, Node) or x in inside or x is add
                        or not _computed_from(x, *work) for x in parts):
            return [SharedOutput(ShareKind.ZEROS, x, u) for x in dict.fromkeys(ours)]
    return None


def _is_impure(node: Node) -> bool:
    return node.op == "call_function" and getattr(node.target, "__name__", "") in (
        "setitem", "_assert")


def _computed_from(node: Node, work: set[Node], order: dict[Node, int],
                   limit: int = 256) -> bool:
    """Whether ``node``'s value is computed from a node of ``work`` (nodes before all of
    ``work`` in the graph are not walked: they cannot be)."""
    first = min((order[n] for n in work), default=-1)
    seen, stack = {node}, [node]
    while stack:
        n = stack.pop()
        if n in work:
            return True
        for a in n.all_input_nodes:
            if a not in seen and order.get(a, first + 1) > first:
                if len(seen) >= limit:
                    return True  # too far to tell: assume the worst
                seen.add(a)
                stack.append(a)
    return False


def _pull_inputs(chain: set[Node], work: set[Node], stop: int, order: dict[Node, int]
                 ) -> set[Node] | None:
    """Values a chain reads that are computed after the first add (Flux's
    ``c_gate_msa.unsqueeze(1)``, written next to its use): they move into the gate with the
    chain when nothing else uses them and what they read comes before the add."""
    pulled: set[Node] = set()
    stack = [a for n in chain for a in n.all_input_nodes]
    while stack:
        a = stack.pop()
        if a in chain or a in work or a in pulled or order[a] < stop:
            continue
        if len(pulled) >= MAX_CHAIN or _computed_from(a, work, order) or \
                any(u not in chain and u not in pulled for u in a.users):
            return None
        pulled.add(a)
        stack.extend(a.all_input_nodes)
    return pulled
