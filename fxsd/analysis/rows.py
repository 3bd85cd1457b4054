"""Does a branch treat the rows of its batch independently?

Sample-wise stochastic depth can run a branch on the kept rows only (``subset``) when each row's
output depends on that row alone. BatchNorm in training, reductions over the batch dimension, or
reshapes that merge rows break that: on a subset they would compute something else. This module
finds such ops statically; when it finds one the site falls back to the ``mask`` implementation,
and the reason is shown in the table. Dimension 0 is taken as the batch dimension (as timm and
torchvision do).
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node

__all__ = ["row_coupling"]

_REDUCTIONS = frozenset({
    "mean", "sum", "std", "var", "amax", "amin", "max", "min", "norm", "logsumexp", "prod",
    "all", "any", "count_nonzero", "median", "std_mean", "var_mean", "argmax", "argmin",
    "cumsum", "cumprod", "softmax", "log_softmax",
})
_BATCH_NORM_FUNCTIONS = (F.batch_norm, torch.batch_norm)
_TUPLE_PRODUCERS = frozenset({"chunk", "split", "unbind", "split_with_sizes", "tensor_split",
                              "max", "min", "sort", "topk", "std_mean", "var_mean"})


def _name(n: Node) -> str:
    if n.op == "call_method":
        return str(n.target)
    return getattr(n.target, "__name__", str(n.target))


def _arg(n: Node, index: int, key: str, default: Any = None) -> Any:
    if len(n.args) > index:
        return n.args[index]
    return n.kwargs.get(key, default)


def _touches_dim0(dim: Any) -> bool:
    if dim is None:
        return True
    if isinstance(dim, int):
        return dim == 0
    if isinstance(dim, (list, tuple)):
        return any(d == 0 for d in dim if isinstance(d, int))
    return False  # a dimension computed at run time: assume a feature dimension


def _produces_tuple(n: Any, gm: GraphModule) -> bool:
    """Whether ``n`` yields a tuple (or a shape) rather than a tensor with a batch dimension."""
    if not isinstance(n, Node):
        return False
    if n.op == "call_function" and n.target is getattr or n.op == "call_method" and str(
            n.target) in ("size", "stride"):
        return True
    if n.op == "call_module":
        mod = gm.get_submodule(str(n.target))
        return isinstance(mod, (nn.MultiheadAttention, nn.LSTM, nn.GRU, nn.RNN))
    return _name(n) in _TUPLE_PRODUCERS


def _problem(n: Node, gm: GraphModule) -> str | None:
    name = _name(n)
    if n.op == "call_module":
        mod = gm.get_submodule(str(n.target))
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            return f"'{n.name}' is a {type(mod).__name__}: it mixes the rows of a batch in training"
        if isinstance(mod, nn.MultiheadAttention) and not mod.batch_first:
            return f"'{n.name}' is a MultiheadAttention with batch_first=False (rows are dim 1)"
        return None
    if n.op not in ("call_function", "call_method"):
        return None
    if n.op == "call_function" and n.target in _BATCH_NORM_FUNCTIONS:
        return f"'{n.name}' calls batch_norm: it mixes the rows of a batch in training"
    if name in _REDUCTIONS:
        dim = _arg(n, 1, "dim", None)
        if name in ("softmax", "log_softmax", "cumsum", "cumprod"):
            return f"'{n.name}' runs {name} over dim 0 (the batch)" if dim == 0 else None
        if _touches_dim0(dim):
            return f"'{n.name}' reduces over the batch dimension ({name}, dim={dim})"
        return None
    if name in ("transpose", "swapaxes", "swapdims"):
        dims = (_arg(n, 1, "dim0"), _arg(n, 2, "dim1"))
        return f"'{n.name}' moves the batch dimension" if 0 in dims else None
    if name == "permute":
        dims = n.args[1:] if n.op == "call_method" else _arg(n, 1, "dims", ())
        if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
            dims = dims[0]
        first = dims[0] if dims else 0
        return None if first == 0 else f"'{n.name}' moves the batch dimension (permute)"
    if name == "movedim":
        src, dst = _arg(n, 1, "source"), _arg(n, 2, "destination")
        return f"'{n.name}' moves the batch dimension" if 0 in (src, dst) else None
    if name == "t":
        return f"'{n.name}' transposes the batch dimension"
    if name == "flatten":
        start = _arg(n, 1, "start_dim", 0)
        return f"'{n.name}' flattens the batch dimension into others" if start == 0 else None
    if name in ("view", "reshape"):
        shape = n.args[1:]
        if len(shape) == 1 and isinstance(shape[0], (list, tuple)):
            shape = shape[0]
        if shape and isinstance(shape[0], int):
            return f"'{n.name}' reshapes the batch dimension to a constant ({shape[0]})"
        return None
    if name in ("cat", "concat", "concatenate", "stack"):
        dim = _arg(n, 1, "dim", 0)
        return f"'{n.name}' joins tensors along the batch dimension" if dim == 0 else None
    if n.op == "call_function" and n.target is operator.getitem:
        index = n.args[1]
        if _produces_tuple(n.args[0], gm):
            return None
        first = index[0] if isinstance(index, tuple) and index else index
        if first is Ellipsis or (isinstance(first, slice) and first == slice(None)):
            return None
        return f"'{n.name}' indexes the batch dimension ({index!r})"
    if name in ("index_select", "gather", "narrow", "select", "roll", "flip"):
        dim = _arg(n, 1, "dim", None)
        if name in ("roll", "flip"):
            dim = _arg(n, 2 if name == "roll" else 1, "dims", None)
        return f"'{n.name}' reads across rows ({name} on dim 0)" if _touches_dim0(dim) else None
    return None


def row_coupling(
    gm: GraphModule, fork: Node, branch: Sequence[Node], side_inputs: Sequence[Node]
) -> str | None:
    """Why running this branch on a subset of rows would change its result, or ``None``.

    Only ops on values computed from ``fork`` are checked (others have no batch dimension).
    ``side_inputs`` are the branch's non-parameter inputs from outside the fork: the subset
    implementation would have to know which of them are indexed by row, so their presence is a
    reason too.
    """
    if side_inputs:
        names = ", ".join(f"'{n.name}'" for n in side_inputs)
        return f"the branch reads {names} from outside the fork (rows unknown)"
    batched = {fork}  # values carrying the batch dimension: those computed from the fork
    for n in branch:
        if not any(a in batched for a in n.all_input_nodes):
            continue  # e.g. a relative position bias gathered from its table
        batched.add(n)
        reason = _problem(n, gm)
        if reason:
            return reason
    return None
