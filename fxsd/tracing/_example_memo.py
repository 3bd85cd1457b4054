"""The memo of tracing by example: ops already evaluated on the example's values.

:class:`~fxsd.tracing.by_example.ExampleTracer` runs each recorded op on the example's values, and a
module is traced several times (each mode, each way of tracing its flags and ``None``
arguments). A pure op's result is kept in its :class:`~fxsd.tracing.example_run.RecordedCall`, keyed
by what determines it (:func:`_memo_key`: the op, each tensor by identity and version, each plain
value by value), and handed to later traces while no in-place op has changed it.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import nn

__all__: list[str] = []

# an op's value that is not known (a result the memo keeps too)
_MISSING = object()

# Ops that change their operands: evaluated again at every trace, never taken from the memo.
_IN_PLACE = frozenset({operator.setitem, operator.delitem, operator.iadd, operator.isub,
                       operator.imul, operator.itruediv, operator.ifloordiv, operator.imod,
                       operator.ipow, operator.iand, operator.ior, operator.ixor,
                       operator.ilshift, operator.irshift, operator.imatmul})
_SCALARS = (bool, int, float, complex, str, type(None), type(Ellipsis), torch.dtype,
            torch.device, torch.layout, torch.memory_format)


def _memo_key(module: nn.Module | None, kind: str, target: Any, args: tuple, kwargs: dict
              ) -> Any:
    """What determines the result of a pure op on example values, or ``None`` where that is not
    known: the op and its arguments, each tensor by identity and version (an in-place op
    bumps it), each plain value by value; a torch.nn layer with its mode. The model's own
    modules (their state), in-place ops and ops on other objects (a cache, which its methods
    change) are not keyed. ``module`` is the called module of a ``call_module``."""
    mode: Any = None
    if kind == "call_method":
        if not isinstance(target, str) or (target.endswith("_") and not target.startswith("__")):
            return None
    elif kind == "call_module":  # torch.nn's own layers, in their mode (dropout's, BN's)
        if not type(module).__module__.startswith("torch.nn.modules."):
            return None
        mode = (id(module), module.training)
    elif kind != "call_function" or target in _IN_PLACE:
        return None
    if "out" in kwargs or kwargs.get("inplace") is True:
        return None
    try:
        key = (kind, target, mode, _value_key(args), _value_key(kwargs))
        hash(key)
    except (_Unkeyed, TypeError):
        return None
    return key


class _Unkeyed(Exception):
    """A value the memo cannot key (its result may depend on more than what a key holds)."""


def _value_key(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return ("tensor", id(value), value._version)
    if isinstance(value, _SCALARS):
        return (type(value), value)
    if isinstance(value, (tuple, list)):  # torch.Size too
        return (type(value), tuple(_value_key(v) for v in value))
    if isinstance(value, dict):
        return (dict, tuple((k, _value_key(v)) for k, v in value.items()))
    if isinstance(value, slice):
        return (slice, _value_key(value.start), _value_key(value.stop), _value_key(value.step))
    if isinstance(value, nn.Module):  # a function given its module (an attention kernel)
        return (nn.Module, id(value), value.training)
    raise _Unkeyed


def _memoizable(result: Any) -> bool:
    """Whether a result can be handed to later traces as it is: tensors, plain values and
    tuples of them (not a list or dict, which the code may fill in afterwards)."""
    if isinstance(result, tuple):
        return all(_memoizable(r) for r in result)
    return isinstance(result, (torch.Tensor, *_SCALARS)) or result is _MISSING


def _versions(result: Any) -> tuple[int, ...]:
    return tuple(t._version for t in _flat_tensors(result))


def _unchanged(result: Any, versions: tuple[int, ...]) -> bool:
    """Whether no in-place op changed a memoized result since it was computed."""
    return _versions(result) == versions


def _flat_tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, tuple):
        return [t for v in value for t in _flat_tensors(v)]
    return [value] if isinstance(value, torch.Tensor) else []
