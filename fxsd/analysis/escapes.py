"""Values a residual branch lets escape, and how a skipped branch still produces them.

A branch may hand values to code outside it besides its output: T5's first attention computes
the relative position bias from ``key_states.shape[-2]`` and every later block reuses it; an
MViTv2 attention returns the size its pooling produced; an attention layer returns its weights
(``None`` under SDPA). Such a branch can still be skipped when **everything that escapes it
depends on the branch's own work only through values that hold no tensor** (shapes, sizes,
dtypes, devices, ``None``):

* the values holding no tensor come from one *abstract* run of the part of the branch they need,
  on fake tensors (nothing is computed, drawn or updated; remembered per input signature, so it
  runs once per shape);
* what escapes is then computed *for real* from them and from the branch's inputs, with the
  branch's own nodes (the bias from its embedding table), so it is exactly what the branch
  would have produced.

Code before the join that reads such a value (the bias computed from ``key_states.shape``)
moves into the gate with the branch. A tensor computed from the branch's values that escapes
(DenseNet-style reuse) still makes the add a rejected one.

:func:`find_escapes` is the analysis (pure: it only reads the graph); the rewrite builds from it
the :class:`~fxsd.runtime.escape_path.EscapePath` that runs a skipped branch's escaping values.
"""

from __future__ import annotations

import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import Node

from fxsd.analysis.shared_work import SharedOutput

if typing.TYPE_CHECKING:
    pass
from fxsd.tracing.ops import data_inputs, is_metadata_read

__all__ = ["Escapes", "find_escapes", "declared_no_tensor"]


@dataclass(frozen=True)
class Escapes:
    """What escapes one branch, and how to produce it when the branch is skipped (nodes of the
    analysed graph, each tuple in graph order).

    Attributes:
        values: the values code outside the gate reads (the gate returns them after the sum).
        moved: nodes outside the branch, before the join, computed from branch values' metadata;
            they move into the gate (the position bias computed from ``key_states.shape``).
        abstract: values holding no tensor that a skipped branch takes from the abstract run.
        shapes: the nodes that run (on fake tensors) to produce ``abstract``, these included.
        real: the nodes that compute ``values`` for real from ``abstract`` and the inputs.
        unproduced: values a skipped branch cannot produce (tensors computed from its values)
            that only go back to a caller fxsd did not trace (the attention weights a layer
            returns): a skipped branch hands on a :class:`DroppedValue` for each.
        shared: second joins and concatenations the branch's work feeds, gated with it
            (:mod:`fxsd.analysis.shared_work`); the gate returns their results after ``values``.
    """

    values: tuple[Node, ...]
    moved: tuple[Node, ...]
    abstract: tuple[Node, ...]
    shapes: tuple[Node, ...]
    real: tuple[Node, ...]
    unproduced: tuple[Node, ...] = ()
    shared: tuple[SharedOutput, ...] = ()


def find_escapes(nodes: set[Node], fork: Node, out: Node, add: Node, order: dict[Node, int],
                 holds_no_tensor: Callable[[Node], bool], may_return: bool = False,
                 shared: tuple[SharedOutput, ...] = ()) -> Escapes | str:
    """The escapes of the branch ``nodes`` (which compute ``out`` from ``fork`` for ``add``), or
    a sentence saying why a skipped branch could not produce them.

    ``holds_no_tensor(node)``: whether a node's value holds no tensor (from the analysis's
    shapes where it ran the graph, else :func:`declared_no_tensor`). ``may_return``: the graph
    is a module fxsd traced on its own, whose caller it did not see; a value it returns may be
    ``unproduced``. ``shared``: second uses of the branch's work that the gate computes
    (:func:`fxsd.analysis.shared_work.find_shared`); their values are no escapes.
    """
    joins = {(out, add), *((s.value, s.consumer) for s in shared)}
    moved = _moved_into_gate(nodes, {add, *(s.consumer for s in shared)}, order, order[add])
    inside = nodes | moved
    if any(a in moved for a in add.all_input_nodes):
        skip = next(a for a in add.all_input_nodes if a in moved)
        return f"the skip '{skip.name}' is computed from the branch's values"
    values = sorted({n for n in inside for u in n.users
                     if u not in inside and (n, u) not in joins}, key=order.__getitem__)
    # nodes computed from the fork's values (the branch's own work)
    heavy: set[Node] = set()
    for n in sorted(inside, key=order.__getitem__):
        if any(a is fork or a in heavy for a in data_inputs(n)):
            heavy.add(n)
    real: set[Node] = set()
    abstract: set[Node] = set()
    shapes: set[Node] = set()

    def need_shape(n: Node) -> None:
        work = [n]
        while work:
            m = work.pop()
            if m in inside and m not in shapes:
                shapes.add(m)
                work.extend(m.all_input_nodes)

    # a tensor of the branch's own that only goes back to a caller fxsd did not trace: a skipped
    # branch hands on a DroppedValue, which raises when used
    unproduced = {n for n in values if may_return and n in heavy and not holds_no_tensor(n)
                  and all(u.op == "output" for u in n.users if u not in inside)}
    work = [n for n in values if n not in unproduced]
    while work:
        n = work.pop()
        if n not in inside or n in real or n in abstract:
            continue
        if holds_no_tensor(n):
            abstract.add(n)
            need_shape(n)
            continue
        if n in heavy:
            user = next(u for u in n.users if u not in inside and (n, u) not in joins) \
                if n in values else None
            where = f" by {describe(user)} outside it" if user is not None else ""
            return (f"{describe(n)}, a tensor computed from the branch's values, is also used"
                    f"{where} (a value the branch shares, as DenseNet reuses features): the "
                    "branch cannot be skipped as a unit")
        real.add(n)
        work.extend(n.all_input_nodes)

    def ordered(found: Iterable[Node]) -> tuple[Node, ...]:
        return tuple(sorted(found, key=order.__getitem__))

    if unproduced & real:
        n = min(unproduced & real, key=order.__getitem__)
        return (f"{describe(n)}, a tensor computed from the branch's values, is used by what "
                "escapes it: the branch cannot be skipped as a unit")
    return Escapes(tuple(values), ordered(moved), ordered(abstract), ordered(shapes),
                   ordered(real), ordered(unproduced), shared)


def _moved_into_gate(nodes: set[Node], consumers: set[Node], order: dict[Node, int],
                     stop: int) -> set[Node]:
    """The nodes before the join (index ``stop``) that use the branch ``nodes``' values and so
    move into the gate with it (the consumers, the joins, are not among them)."""
    moved: set[Node] = set()
    stack = [u for n in nodes for u in n.users if u not in nodes and u not in consumers]
    while stack:
        u = stack.pop()
        if u in moved or u in nodes or u in consumers or u.op == "output":
            continue
        if order[u] > stop:
            # a dtype, shape or device read of the branch's own values placed after the join
            # (tracing by example creates a read where its value is first used): it holds no
            # tensor, so it moves into the gate like a read before the join
            if is_metadata_read(u) and all(a in nodes or a in moved for a in u.all_input_nodes):
                moved.add(u)
            continue
        moved.add(u)
        stack.extend(u.users)
    return moved


def describe(node: Node) -> str:
    """A node in the user's terms: the module or function whose result it is (``the output of
    'layers.0.mlp'``, ``'x.dtype'``), not the graph's flattened name."""
    if node.op == "call_module":
        return f"the output of '{node.target}'"
    if node.op == "call_method":
        return f"'{_operand(node.args[0])}.{node.target}(…)'" if node.args else repr(node.name)
    if node.op == "call_function" and node.target is getattr and len(node.args) == 2:
        return f"'{_operand(node.args[0])}.{node.args[1]}'"
    if node.op == "call_function":
        name = getattr(node.target, "__name__", str(node.target))
        return f"the result of {name}() ('{node.name}')"
    return f"'{node.name}'"


def _operand(value: Any) -> str:
    if isinstance(value, Node) and value.op == "call_module":
        return str(value.target)
    return value.name if isinstance(value, Node) else repr(value)


def declared_no_tensor(node: Node) -> bool:
    """Whether ``node``'s value holds no tensor, from the graph alone: a metadata read
    (``x.shape``, ``x.size(0)``, ``x.dtype``), Python arithmetic and indexing on such values,
    ``len``/``int``/``float``, or an element of a called function's result whose declared type
    holds no tensor (timm's ``reshape_post_pool -> Tuple[Tensor, List[int]]``, Hugging Face's
    ``sdpa_attention_forward -> tuple[Tensor, None]``)."""
    return _no_tensor(node, {})


def _no_tensor(node: Node, memo: dict[Node, bool]) -> bool:
    if node in memo:
        return memo[node]
    memo[node] = False  # cycles cannot happen in a graph; this only bounds the recursion
    if is_metadata_read(node):
        found = True
    elif node.op == "call_function" and node.target in (len, int, float, bool):
        found = True
    elif node.op == "call_function" and getattr(node.target, "__module__", None) == "_operator":
        if node.target.__name__ == "getitem" and isinstance(node.args[0], Node) \
                and node.args[0].op == "call_function" and isinstance(node.args[1], int):
            source = node.args[0]
            if getattr(source.target, "__module__", None) != "_operator":
                memo[node] = found = _declared_element(source.target, node.args[1])
                return found
        found = bool(node.all_input_nodes) and all(_no_tensor(a, memo)
                                                   for a in node.all_input_nodes)
    else:
        found = False
    memo[node] = found
    return found


def _declared_element(function: Any, index: int) -> bool:
    """Whether element ``index`` of ``function``'s declared tuple result holds no tensor."""
    try:
        hint = typing.get_type_hints(function).get("return")
    except Exception:  # an annotation that does not resolve says nothing
        return False
    if typing.get_origin(hint) is not tuple:
        return False
    args = typing.get_args(hint)
    if not args or index >= len(args) or args[-1] is Ellipsis:
        return False
    return _holds_no_tensor(args[index])


def _holds_no_tensor(hint: Any) -> bool:
    if hint is None or hint is type(None) or hint in (int, float, bool, str, torch.Size,
                                                      torch.dtype, torch.device):
        return True
    origin = typing.get_origin(hint)
    if origin in (list, tuple, typing.Union) or str(origin) == "<class 'types.UnionType'>":
        return all(_holds_no_tensor(a) for a in typing.get_args(hint) if a is not Ellipsis)
    return False
