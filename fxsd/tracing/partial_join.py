"""Joins into part of a tensor: ``torch.cat([x[:, :C] + shortcut, x[:, C:]], dim=1)``, or in
place, ``x[:, :C] += shortcut``.

timm's ReXNet adds its shortcut to the first ``C`` channels of a wider block output and passes the
other channels on. Traced, that is slices of the output, an add and a ``cat`` (in place: a slice,
an add and an item assignment, which :class:`fxsd.tracing.tracer.JoinProxy` records); the pass
:func:`fxsd.tracing._explicit_partial_joins.make_partial_joins_explicit` rewrites each such pattern
into one call of :func:`partial_add` (the block output, the shortcut, and where the shortcut goes),
so the classifier sees an ordinary join of a branch output and a skip, and a gate can drop the whole
branch: a dropped branch contributes zeros to every channel, as timm's ``DropPath`` in front of
the slices does.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch.fx import Node

__all__ = ["partial_add", "PartialJoin", "partial_join_of", "match_partial_join",
           "match_assigned_join", "is_assigned_join"]

#: ``(dim, start, stop)``: ``part`` is added to ``whole``'s ``[start:stop]`` along ``dim``
#: (``stop`` ``None``: to the end).
PartialJoin = tuple[int, int, "int | None"]

_CATS = (torch.cat, torch.concat, torch.concatenate)
_PLAIN_ADDS = (operator.add, torch.add)


@torch.fx.wrap
def partial_add(whole: torch.Tensor, part: torch.Tensor, dim: int, start: int,
                stop: int | None) -> torch.Tensor:
    """``torch.cat([whole[.., :start], whole[.., start:stop] + part, whole[.., stop:]], dim)``
    (the slices along ``dim``; empty pieces left out), computed as that expression does.
    Called on ``torch.fx`` proxies (as :func:`fxsd.strip` calls a gate's join), it records
    itself as one call."""
    if isinstance(whole, torch.fx.Proxy):
        return whole.tracer.create_proxy("call_function", partial_add,
                                         (whole, part, dim, start, stop), {})
    size = whole.size(dim)
    start = min(start, size)
    stop = size if stop is None else min(max(stop, start), size)
    pieces = [whole.narrow(dim, 0, start)] if start else []
    pieces.append(whole.narrow(dim, start, stop - start) + part)
    if stop < size:
        pieces.append(whole.narrow(dim, stop, size - stop))
    return torch.cat(pieces, dim) if len(pieces) > 1 else pieces[0]


def partial_join_of(node: Node) -> PartialJoin | None:
    """Where a :func:`partial_add` node adds its ``part`` (``None``: not such a node)."""
    if node.op != "call_function" or node.target is not partial_add:
        return None
    dim, start, stop = node.args[2:5]
    return dim, start, stop


def _slice_along(index: Any) -> tuple[int, int, int | None] | None:
    """``(dim, start, stop)`` of an index that slices one dimension and takes the others whole
    (``x[:, 0:16]``); ``None`` for any other index."""
    items = index if isinstance(index, tuple) else (index,)
    if not all(isinstance(i, slice) for i in items):
        return None
    partial = [d for d, s in enumerate(items) if s != slice(None)]
    if len(partial) != 1:
        return None
    d = partial[0]
    s = items[d]
    start, stop = s.start or 0, s.stop
    if s.step not in (None, 1) or not isinstance(start, int) or start < 0 \
            or not (stop is None or isinstance(stop, int) and stop >= 0):
        return None
    return d, start, stop


def match_partial_join(cat: Node) -> tuple[Node, Node, Node, PartialJoin] | None:
    """``(whole, part, add, where)`` when ``cat`` is ``torch.cat`` of consecutive slices of one
    tensor ``whole`` along its dimension, one of them with ``part`` added
    (``torch.cat([x[:, 0:C] + s, x[:, C:]], dim=1)``), and nothing else uses those slices, the
    add or ``whole``; else ``None``."""
    if cat.op != "call_function" or cat.target not in _CATS or not cat.args:
        return None
    pieces, dim = cat.args[0], cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
    if not isinstance(pieces, (list, tuple)) or not isinstance(dim, int) or dim < 0 \
            or not all(isinstance(p, Node) for p in pieces):
        return None
    whole, added, bounds = None, None, []
    for piece in pieces:
        view = piece
        if piece.op == "call_function" and piece.target in _PLAIN_ADDS and not piece.kwargs \
                and len(piece.args) == 2 and added is None:
            view = next((a for a in piece.args if _is_slice(a)), None)
            other = next((a for a in piece.args if a is not view), None)
            if view is None or not isinstance(other, Node) or len(piece.users) != 1:
                return None
            added = (piece, other, len(bounds))
        if not _is_slice(view) or len(view.users) != 1:
            return None
        where = _slice_along(view.args[1])
        if where is None or where[0] != dim or whole not in (None, view.args[0]):
            return None
        whole = view.args[0]
        bounds.append(where[1:])
    if added is None or len(whole.users) != len(pieces) or not _tiles(bounds):
        return None
    add, part, i = added
    return whole, part, add, (dim, *bounds[i])


def _is_slice(node: Any) -> bool:
    return isinstance(node, Node) and node.op == "call_function" \
        and node.target is operator.getitem and isinstance(node.args[0], Node)


def _tiles(bounds: list[tuple[int, int | None]]) -> bool:
    """Whether the slices follow each other from 0 to the end without gaps or overlaps."""
    at = 0
    for start, stop in bounds:
        if at is None or start != at:
            return False
        at = stop
    return at is None


def is_assigned_join(whole: Node, key: Any, item: Node | None) -> bool:
    """Whether ``whole[key] = item`` assigns ``whole[key] + part`` back into a slice along one
    dimension (what ``whole[:, :C] += part`` traces to)."""
    if item is None or _slice_along(key) is None:
        return False
    if item.op != "call_function" or item.target not in _PLAIN_ADDS or item.kwargs \
            or len(item.args) != 2:
        return False
    return any(_is_slice(a) and a.args[0] is whole and a.args[1] == key for a in item.args)


def match_assigned_join(node: Node) -> tuple[Node, Node, Node, PartialJoin] | None:
    """``(whole, part, add, where)`` when ``node`` is ``operator.setitem(whole, key,
    whole[key] + part)`` with ``key`` a slice along one dimension, the slice and the add used
    only there, and ``whole`` used before it by that slice alone (nothing else sees the value
    before the assignment); else ``None``. (Whether ``whole`` is a view of another tensor, which
    the assignment would change too, is the caller's to check.)"""
    if node.op != "call_function" or node.target is not operator.setitem or len(node.args) != 3:
        return None
    whole, key, add = node.args
    if not isinstance(whole, Node) or not isinstance(add, Node) \
            or not is_assigned_join(whole, key, add) or len(add.users) != 1:
        return None
    view = next(a for a in add.args if _is_slice(a) and a.args[0] is whole and a.args[1] == key)
    part = next((a for a in add.args if a is not view), None)
    if not isinstance(part, Node) or len(view.users) != 1:
        return None
    before = [u for u in whole.users if u is not node and _precedes(u, node)]
    if before != [view]:
        return None
    where = _slice_along(key)
    return whole, part, add, where


def _precedes(a: Node, b: Node) -> bool:
    n = a
    while n.op != "root":
        if n is b:
            return True
        n = n.next
    return False
