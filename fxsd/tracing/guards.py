"""Guards for the arguments a rewritten module was traced with as constants.

A gated block's graph is cut out of the whole-model trace, where the block was called with
particular values for its non-tensor arguments (``attn_mask=None``, ``use_cache=False``): the
graph is only right for those values. Each such argument gets one guard in the block's code,

    check_argument(attn_mask, None, 'blocks.0', 'attn_mask')

which raises :class:`~fxsd.errors.GuardError` when the block is later called with another value,
instead of silently computing something else. The other kinds: :func:`check_keywords` (the keys
of ``**kwargs``), :func:`check_count` (how many ``*args``), :func:`check_type` (the class of an
object argument, such as a cache, that the graph calls methods on) and :func:`check_condition`
(the truth of a Python condition the trace took). :func:`passes` says whether a guard holds
without raising; a gated block uses it to pick the graph traced for the call it receives
(:mod:`fxsd.runtime.variants`).
"""

from __future__ import annotations

from typing import Any

import torch.fx

from fxsd.errors import GuardError

__all__ = ["GUARDS", "check_argument", "check_condition", "check_keywords", "check_count",
           "check_type", "is_guardable", "is_literal", "passes", "type_name"]

_LITERALS = (type(None), bool, int, float, str, torch.dtype, torch.device, torch.layout,
             torch.memory_format, type(Ellipsis), slice)


def is_literal(value: Any) -> bool:
    """Whether generated code can spell ``value`` (numbers, strings, dtypes, containers of them)."""
    if isinstance(value, (tuple, list)):
        return all(is_literal(v) or isinstance(v, torch.fx.Node) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, (str, int)) and (is_literal(v) or isinstance(v, torch.fx.Node))
                   for k, v in value.items())
    return isinstance(value, _LITERALS)


def is_guardable(value: Any) -> bool:
    """Whether :func:`check_argument` can compare an argument against ``value``."""
    if isinstance(value, (tuple, list)):
        return all(is_guardable(v) for v in value)
    if type(value) is dict:  # ``**kwargs`` of flags (``use_cache=True``)
        return all(isinstance(k, str) and is_guardable(v) for k, v in value.items())
    return isinstance(value, _LITERALS) and not isinstance(value, slice)


@torch.fx.wrap
def check_argument(value: Any, expected: Any, module: str, name: str) -> None:
    """Raise unless ``value`` is the constant the module was traced with."""
    if value is expected or (type(value) is type(expected) and value == expected):
        return
    raise GuardError(
        f"'{module or '<root>'}' was rewritten by fxsd for {name}={expected!r}, the value it "
        f"received when the model was traced, but it was called with {name}={value!r}. "
        "Transform the model with example inputs that pass the values used in training "
        "(example_inputs=/example_kwargs=), or keep this module out of the rewrite "
        "(select=...)")


@torch.fx.wrap
def check_condition(value: Any, expected: bool, module: str, name: str) -> None:
    """Raise unless ``bool(value)`` is the truth value the module was traced with (a branch
    of Python control flow taken on a non-tensor value, such as ``if mask.dim() == 4``). One
    call in the generated code: re-tracing it (unpickling) never asks a proxy for its truth."""
    check_argument(bool(value), expected, module, name)


@torch.fx.wrap
def check_keywords(value: dict[str, Any], expected: tuple[str, ...], module: str,
                   name: str) -> None:
    """Raise unless the ``**kwargs`` a module received hold exactly the keys it was traced with
    (the graph reads each of them, and knows nothing of others)."""
    if set(value) != set(expected):
        raise GuardError(
            f"'{module or '<root>'}' was rewritten by fxsd for {name} with the keys "
            f"{sorted(expected)}, those it received when the model was traced, but it was called "
            f"with {sorted(value)}. Transform the model with example inputs that pass the "
            "keyword arguments used in training (example_kwargs=), or keep this module out of "
            "the rewrite (select=...)")


@torch.fx.wrap
def check_count(value: tuple[Any, ...], expected: int, module: str, name: str) -> None:
    """Raise unless the ``*args`` a module received are as many as it was traced with."""
    if len(value) != expected:
        raise GuardError(
            f"'{module or '<root>'}' was rewritten by fxsd for {name} of {expected} values, as "
            f"many as it received when the model was traced, but it was called with "
            f"{len(value)}. Transform the model with example inputs that pass the arguments "
            "used in training (example_inputs=), or keep this module out of the rewrite "
            "(select=...)")


def type_name(value: Any) -> str:
    """The qualified name of ``value``'s class (``transformers.cache_utils.DynamicCache``)."""
    cls = type(value)
    return f"{cls.__module__}.{cls.__qualname__}"


@torch.fx.wrap
def check_type(value: Any, expected: str, module: str, name: str) -> None:
    """Raise unless ``value`` is of the class (by qualified name, :func:`type_name`) of the object
    the module was traced with: the graph calls that object's methods (``cache.update``) and took
    the branches its class took (``isinstance(cache, EncoderDecoderCache)``)."""
    if type_name(value) == expected:
        return
    got = "None" if value is None else f"a {type_name(value)}"
    raise GuardError(
        f"'{module or '<root>'}' was rewritten by fxsd for {name} of class {expected}, the "
        f"object it received when the model was traced, but it was called with {got}. "
        "Transform the model with example inputs that pass the objects used in training "
        "(example_inputs=/example_kwargs=), or keep this module out of the rewrite "
        "(select=...)")


#: The guard functions, by kind.
GUARDS = (check_argument, check_condition, check_keywords, check_count, check_type)


def passes(check: Any, value: Any, expected: Any) -> bool:
    """Whether the guard ``check`` (one of :data:`GUARDS`) holds for ``value``."""
    try:
        check(value, expected, "", "")
    except GuardError:
        return False
    return True
