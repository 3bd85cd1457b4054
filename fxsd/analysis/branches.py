"""Cutting a branch out of a graph: :func:`collect_branch` finds every node that computes a
residual branch's output from its fork, what it reads from outside, what it hands on, and whether
it can be gated as one unit (:class:`Branch`).

The classifier (:mod:`fxsd.analysis.residuals`) cuts each candidate's branch this way, and the
rewrite (:mod:`fxsd.passes.gate_site`) cuts it again on a graph whose inner branches are already
gated. Besides the nodes on a path from the fork to the output, a branch absorbs what only it needs
(unused side results, shape reads and checks, modules whose flag it reads).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch.fx import GraphModule, Node

from fxsd.analysis.escapes import Escapes, declared_no_tensor, find_escapes
from fxsd.analysis.shared_work import find_shared
from fxsd.record import RejectReason
from fxsd.tracing.ops import (
    depends_on_input,
    is_assertion,
    is_impure,
    is_inplace,
    is_metadata_read,
    is_module,
    mutated_operand,
    node_order,
)

__all__ = ["Branch", "collect_branch"]


@dataclass(frozen=True)
class Branch:
    """A branch cut out of a graph by :func:`collect_branch`."""

    nodes: tuple[Node, ...]
    inputs: tuple[Node, ...]
    escapes: Escapes | None = None  # values it hands to code outside it (fxsd.analysis.escapes)



def collect_branch(
    gm: GraphModule, fork: Node, out: Node, add: Node, order: dict[Node, int] | None = None,
    holds_no_tensor: Callable[[Node], bool] = declared_no_tensor, may_return: bool = False,
) -> Branch | tuple[RejectReason, str]:
    """Cut out the branch that computes ``out`` from ``fork`` for the residual ``add``.

    Returns the branch's nodes (in graph order), the outside values it reads and what escapes
    it (:func:`fxsd.analysis.escapes.find_escapes`, which ``holds_no_tensor`` and ``may_return``
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
    * modules only the branch reads as values (:func:`fxsd.tracing.tracer.if_training` reads their
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
                or (is_impure(n) and not is_assertion(n)) or len(seen) >= limit:
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
                or (is_impure(n) and not is_assertion(n)) or len(found) > limit:
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
