"""The join a gate stands for: the add the source wrote, computed as the source wrote it.

``x + f(x)``, ``f(x) + x`` and ``x.add_(f(x))`` hold the same sums, but not always as the same
tensor: PyTorch gives a sum the dtype promoted from both operands (an in-place add keeps its
target's, and its storage), and the strides of the first operand whose strides decide them. Where
the branch ends in a non-contiguous view (an attention output ``transpose(-1, -2).reshape(b, c,
h, w)``), ``branch + skip`` is laid out like the branch and ``skip + branch`` like the skip; a
GroupNorm or convolution after the join then reduces in another order and its output differs in
the last bits. (``torch.add(x, f(x), alpha=k)`` rounds once, ``x + k * f(x)`` twice.) So a gate
computes the join the code wrote:

* :class:`Join` records, from the analysed add node (:func:`join_of`), which function it called,
  which operand is the branch, ``alpha`` and whether it adds in place;
* :meth:`Join.__call__` is the one implementation of ``join(skip, branch, scale)``, used by the
  gate (:class:`fxsd.runtime.gate.BranchGate`), by :func:`fxsd.strip` (which calls it on
  ``torch.fx`` proxies, so the stripped graph holds exactly the ops the gate runs) and, through
  :func:`branch_scale`, by the folding of eval scales (:mod:`fxsd.runtime.folding`);
* :func:`branch_scale` and :func:`row_factor` are the one place the factor a kept branch is
  multiplied by is computed: ``1 / (1 - p)`` in training for ``scale="train"``, ``1 - p`` at
  inference for ``scale="eval"``, else 1.

With ``scale=1`` (inference with the default ``scale="train"``) a join is exactly the source's
add, so a gated model in eval is bit-identical to the plain model.

>>> import torch
>>> x, f = torch.randn(2, 3), torch.randn(3, 2).t()
>>> torch.equal(Join(JoinOp.PLUS, branch_first=True)(x, f), f + x)
True
>>> torch.equal(Join(JoinOp.TORCH_ADD, alpha=0.5)(x, f, 2.0), torch.add(x, f, alpha=1.0))
True
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch
from torch.fx import Node

from fxsd.errors import GraphError
from fxsd.tracing.ops import add_operands
from fxsd.tracing.partial_join import PartialJoin, partial_add, partial_join_of

__all__ = ["Join", "JoinOp", "PLAIN_JOIN", "join_of", "join_alpha", "branch_scale",
           "row_factor"]


class JoinOp(str, Enum):
    """How the source spelled the add (the values are :func:`fxsd.tracing.ops.add_kind`'s
    names)."""

    PLUS = "operator.add"  #: ``a + b`` (also ``a += b``, which ``torch.fx`` records as ``+``)
    TORCH_ADD = "torch.add"  #: ``torch.add(a, b)``
    METHOD_ADD = "Tensor.add"  #: ``a.add(b)``
    INPLACE = "Tensor.add_"  #: ``a.add_(b)``; also ``operator.iadd``
    #: ``fxsd.tracing.partial_join.partial_add``: an add into part of a tensor
    PARTIAL = "partial add"


_KINDS = {op.value: op for op in JoinOp} | {"operator.iadd": JoinOp.INPLACE}
_PLUS, _TORCH_ADD, _METHOD_ADD, _INPLACE, _PARTIAL = JoinOp  # plain names: cheap to read per call
# what each spelling calls, and what it calls with an ``alpha`` (``+`` takes none). Called on
# ``torch.fx`` proxies they record ``+``, ``torch.add``, ``.add`` and ``.add_`` nodes.
def _method_add(a: Any, b: Any, **alpha: float) -> Any:
    return a.add(b, **alpha)


def _method_add_(a: Any, b: Any, **alpha: float) -> Any:
    return a.add_(b, **alpha)  # (the unbound torch.Tensor.add_ refuses a proxy)


_FUNCTIONS = {_PLUS: operator.add, _TORCH_ADD: torch.add, _METHOD_ADD: _method_add,
              _INPLACE: _method_add_}
_ALPHA_FUNCTIONS = {**_FUNCTIONS, _PLUS: torch.add}


@dataclass(frozen=True)
class Join:
    """The add a residual site performs, as written: ``op(a, b, alpha=alpha)``.

    Attributes:
        op: the function or method the source called.
        branch_first: the branch is the first operand ``a`` (``f(x) + x``), else the second.
        alpha: the source's ``alpha`` (it scales the second operand; 1 when not given).
        part: where a :attr:`JoinOp.PARTIAL` join adds its second operand (``(dim, start,
            stop)``, see :mod:`fxsd.tracing.partial_join`).
        plain: ``plain(skip, branch)`` is the source's add itself (``join(skip, branch)``
            without the call's Python work: for a branch written second, the torch function
            itself).
        needs_branch_shape: the join without its branch needs the branch's shape: a partial
            join into the branch output (the skip goes into part of it, the rest is the
            branch's).
    """

    op: JoinOp = JoinOp.PLUS
    branch_first: bool = False
    alpha: float = 1.0
    part: PartialJoin | None = None
    plain: Callable[[Any, Any], Any] = field(init=False, repr=False, compare=False)
    needs_branch_shape: bool = field(init=False, repr=False, compare=False)
    # derived once, so that a call does no more than read them
    _with_alpha: Callable[..., Any] = field(init=False, repr=False, compare=False)
    _alpha_scales_branch: bool = field(init=False, repr=False, compare=False)
    _commutes: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        op, set_ = self.op, functools.partial(object.__setattr__, self)
        if op is _PARTIAL:
            add = functools.partial(_add_into_part, self.part)
        elif self.alpha == 1:
            add = _FUNCTIONS[op]
        else:
            add = functools.partial(_ALPHA_FUNCTIONS[op], alpha=self.alpha)
        set_("plain", (lambda skip, branch: add(branch, skip)) if self.branch_first else add)
        set_("needs_branch_shape", op is _PARTIAL and self.branch_first)
        set_("_with_alpha", None if op is _PARTIAL else _ALPHA_FUNCTIONS[op])
        set_("_alpha_scales_branch", not self.branch_first and op is not _PARTIAL)
        set_("_commutes", self.alpha == 1 and op is not _INPLACE and op is not _PARTIAL)

    def __reduce__(self) -> tuple[Any, ...]:
        return Join, (self.op, self.branch_first, self.alpha, self.part)  # the rest is derived

    def __call__(self, skip: Any, branch: Any, scale: float = 1.0, *,
                 training: bool = False) -> Any:
        """``skip`` and ``branch`` joined as the source wrote it, the branch's term scaled by
        ``scale`` (a number; a per-row factor is multiplied into ``branch`` by the caller).

        At ``scale == 1`` (inference with ``scale="train"``) this is the source's add, bit for
        bit. Where the branch is the second operand the factor goes into the add's ``alpha``
        (one kernel). Where it is the first, ``alpha`` scales the skip, so the factor cannot go
        there without swapping the operands, which changes the sum's layout (PyTorch lays a sum
        out like its first operand) and so the bits of what follows. At inference (``scale=
        "eval"``) the branch is therefore multiplied first: the written add of the scaled
        branch, bit-identical to the plain model with that branch scaled. In ``training``, where
        no plain computation is to be matched, an add with no ``alpha`` that is not in place
        takes the factor as its ``alpha`` with the operands swapped (one kernel, not two).
        """
        if scale == 1.0:
            return self.plain(skip, branch)
        if self._alpha_scales_branch:
            return self._with_alpha(skip, branch, alpha=self.alpha * scale)
        if training and self._commutes:
            return self._with_alpha(skip, branch, alpha=scale)
        return self.plain(skip, branch * scale)

    @property
    def commutes(self) -> bool:
        """Whether the add's operands can be swapped without changing its values (an add with
        no ``alpha``, not in place and not into part of a tensor)."""
        return self._commutes

    def without_branch(self, skip: Any) -> Any:
        """What the join computes when the branch contributes nothing: the skip itself, or
        ``alpha * skip`` where ``alpha`` scales the skip (``torch.add(f(x), x, alpha=k)``). Not
        for :attr:`needs_branch_shape` joins."""
        if self.branch_first and self.alpha != 1:
            return skip * self.alpha  # what torch.add(zeros, skip, alpha=k) computes
        return skip

    def at_rows(self, skip: torch.Tensor, index: torch.Tensor, out: torch.Tensor,
                scale: float) -> torch.Tensor:
        """In training, the join with the branch at the rows ``index`` of ``skip`` only
        (``out``: the branch's output on those rows), each row computed as
        :meth:`__call__` computes it in training.

        Where that add takes the skip first, ``index_add`` (``index_add_`` in place) adds
        ``alpha * out`` into those rows exactly as the add would: one kernel, dropped rows cost
        nothing. Otherwise the rows are joined on their own and copied into the join without
        the branch.
        """
        if self._alpha_scales_branch or self._commutes:
            alpha = self.alpha * scale
            if self.op is _INPLACE:
                return skip.index_add_(0, index, out, alpha=alpha)
            return torch.index_add(skip, 0, index, out, alpha=alpha)
        rows = self(skip.index_select(0, index), out, scale, training=True)
        return torch.index_copy(self.without_branch(skip), 0, index, rows)


#: The join of ``skip + branch`` (a site recorded before joins were, or made by hand).
PLAIN_JOIN = Join()


def _add_into_part(part: PartialJoin, whole: Any, piece: Any) -> Any:
    return partial_add(whole, piece, *part)


def join_alpha(node: Node) -> float | None:
    """The ``alpha`` an add node passes (1 when it passes none); ``None`` when it passes one
    that is not a plain number (a value computed in the graph), or passes ``out=``."""
    kwargs = node.kwargs
    if kwargs.get("out") is not None:
        return None
    alpha = kwargs.get("alpha", 1)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        return None
    return alpha


def join_of(node: Node, kind: str, branch: Node) -> Join:
    """The :class:`Join` of the add ``node`` (of :func:`fxsd.tracing.ops.add_kind` ``kind``) whose
    branch operand is ``branch``; its arguments have passed :func:`join_alpha`."""
    op = _KINDS[kind]
    alpha = join_alpha(node)
    if alpha is None:  # the analysis rejects such adds first
        raise GraphError(f"add node '{node.name}' passes arguments a gated join cannot take: "
                         f"{dict(node.kwargs)}")
    return Join(op, branch_first=add_operands(node)[0] is branch,
                alpha=1.0 if alpha == 1 else alpha,
                part=partial_join_of(node) if op is JoinOp.PARTIAL else None)


def branch_scale(drop_rate: float, scale: str, training: bool) -> float:
    """The factor a gate multiplies a kept branch by: ``1 / (1 - p)`` in training with
    ``scale="train"`` (timm, torchvision), ``1 - p`` at inference with ``scale="eval"`` (the
    paper, Composer), else 1 (``scale="none"``, and ``p = 0``). In training at ``p = 1`` no
    branch is kept, and the factor is 1."""
    keep = 1.0 - drop_rate
    if training:
        return 1.0 / keep if scale == "train" and 0.0 < keep < 1.0 else 1.0
    return keep if scale == "eval" else 1.0


def row_factor(kept: torch.Tensor, drop_rate: float, scale: str,
               like: torch.Tensor) -> torch.Tensor:
    """Sample mode's per-row factor in training, as ``like``'s dtype and device: the row mask
    ``kept``, divided by ``1 - p`` for ``scale="train"`` exactly as
    ``torchvision.ops.stochastic_depth`` builds its noise (a division, not a product with
    :func:`branch_scale`: the two can differ in the last bit)."""
    factor = kept.to(device=like.device, dtype=like.dtype, non_blocking=True)
    keep = 1.0 - drop_rate
    if scale == "train" and 0.0 < keep < 1.0:
        factor = factor.div_(keep)
    return factor

