"""The checks every public entry point runs on its arguments, before any work.

Each check takes a value and the name the user gave it, and returns the value as fxsd uses it or
raises: :class:`~fxsd.InvalidTypeError` for a value of the wrong type,
:class:`~fxsd.InvalidArgumentError` for a value of the right type that is not accepted. The
message names the argument, what it accepts and, for a misspelt name, the close matches. One
function per kind of argument, called from every entry point that takes it
(:func:`fxsd.stochastic_depth` through :meth:`fxsd.decisions.plan.Options.validated`,
:func:`fxsd.analyze_residuals`, :func:`fxsd.apply_stochastic_depth`, the schedules), so an
argument means the same everywhere.

>>> check_choice("sampel", "mode", ("block", "sample"))  # doctest: +ELLIPSIS
Traceback (most recent call last):
    ...
fxsd.errors.InvalidArgumentError: unknown mode 'sampel': use one of ... (did you mean 'sample'?)
"""

from __future__ import annotations

import difflib
import inspect
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from numbers import Integral, Real
from typing import TYPE_CHECKING, Any, NamedTuple, Union

from fxsd.errors import InvalidArgumentError, InvalidTypeError

if TYPE_CHECKING:
    from torch import nn

__all__ = ["LeafSpec", "TRACINGS", "TraceArguments", "check_bool", "check_choice", "check_int",
           "check_number", "check_callable", "close_matches", "check_examples",
           "check_leaf_modules", "check_concrete_args", "check_trace_arguments", "check_rate",
           "check_not_wrapped"]

# torch is imported by the checks that need it: `fxsd --help` checks rates without it
LeafSpec = Union[type, str, "nn.Module"]  # noqa: UP007 - a string: torch is not imported here
TRACINGS = ("auto", "symbolic", "example")
_WRAPPERS = ("FSDPModule", "FullyShardedDataParallel", "DistributedDataParallel",
             "DataParallel", "OptimizedModule")


def close_matches(word: object, candidates: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the candidates close to ``word``, or ``""``."""
    found = difflib.get_close_matches(str(word), list(candidates), n=3, cutoff=0.6)
    return f" (did you mean {' or '.join(repr(f) for f in found)}?)" if found else ""


def check_bool(value: object, name: str) -> bool:
    """``value`` if it is ``True`` or ``False``; any other object (a string, ``1``, ``None``) is
    refused rather than read as true or false (``"no"`` is truthy)."""
    if not isinstance(value, bool):
        raise InvalidTypeError(f"{name} must be True or False, got {value!r} "
                               f"({type(value).__name__})")
    return value


def check_choice(value: object, name: str, choices: Sequence[str], *,
                 optional: bool = False) -> str | None:
    """``value`` if it is one of ``choices`` (or ``None`` when ``optional``)."""
    if value is None and optional:
        return None
    accepts = f"one of {tuple(choices)}" + (" or None" if optional else "")
    if not isinstance(value, str):
        raise InvalidTypeError(f"{name} must be {accepts}, got {value!r} "
                               f"({type(value).__name__})")
    if value not in choices:
        raise InvalidArgumentError(
            f"unknown {name} {value!r}: use {accepts}{close_matches(value, choices)}")
    return value


def check_int(value: object, name: str, *, minimum: int | None = None,
              optional: bool = False) -> int | None:
    """``value`` as an ``int`` (any integral number but a bool), at least ``minimum``."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise InvalidTypeError(f"{name} must be an int{' or None' if optional else ''}, "
                               f"got {value!r} ({type(value).__name__})")
    if minimum is not None and value < minimum:
        raise InvalidArgumentError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def check_number(value: object, name: str) -> float:
    """``value`` as a finite ``float`` (any real number but a bool; not a string)."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise InvalidTypeError(f"{name} must be a number, got {value!r} "
                               f"({type(value).__name__})")
    number = float(value)
    if not math.isfinite(number):
        raise InvalidArgumentError(f"{name} must be a finite number, got {value!r}")
    return number


def check_rate(rate: object, what: str = "drop_rate") -> float:
    """Return ``rate`` as a float in [0, 1], or raise a clear error."""
    if isinstance(rate, bool) or not isinstance(rate, Real):
        raise InvalidTypeError(f"{what} must be a number in [0, 1], got {rate!r}")
    value = float(rate)
    if math.isnan(value) or not 0.0 <= value <= 1.0:
        raise InvalidArgumentError(f"{what} must lie in [0, 1], got {rate!r}")
    return value


def check_callable(fn: object, name: str, call: str, nargs: int) -> Callable[..., Any]:
    """``fn`` if it is callable with ``nargs`` positional arguments, as ``call`` spells the
    call (``"select(site)"``). A callable whose signature cannot be read is taken as it is."""
    if not callable(fn):
        raise InvalidTypeError(f"{name} must be a callable, called as {call}; got {fn!r} "
                               f"({type(fn).__name__})")
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin or C extension without one
        return fn
    try:
        signature.bind(*range(nargs))
    except TypeError as exc:
        raise InvalidTypeError(
            f"{name} is called as {call}, but its signature {signature} does not take "
            f"{nargs} positional argument{'s' if nargs != 1 else ''}: {exc}") from None
    return fn


def _forward_signature(model: nn.Module) -> inspect.Signature | None:
    """The signature of ``type(model).forward`` (what the tracer reads), or ``None``."""
    try:
        return inspect.signature(inspect.unwrap(type(model).forward))
    except (TypeError, ValueError):  # no signature to check against (a builtin, a C extension)
        return None


def check_examples(model: nn.Module | None, example_inputs: object, example_kwargs: object
                   ) -> tuple[tuple[Any, ...] | None, dict[str, Any] | None]:
    """The example call as ``(args, kwargs)``: ``example_inputs`` a tuple or list of positional
    inputs (a tensor alone is one input), ``example_kwargs`` a mapping with string keys; with
    ``model``, they must bind to its ``forward`` (a misspelt keyword is otherwise ignored when
    the model traces whole)."""
    args: tuple[Any, ...] | None = None
    import torch

    if isinstance(example_inputs, torch.Tensor):
        args = (example_inputs,)
    elif isinstance(example_inputs, (tuple, list)):
        args = tuple(example_inputs)
    elif example_inputs is not None:
        hint = " (keyword inputs go in example_kwargs=)" if isinstance(example_inputs, Mapping) \
            else ""
        raise InvalidTypeError(
            f"example_inputs must be a tuple or list of one forward call's positional inputs, or "
            f"a tensor, got {type(example_inputs).__name__}{hint}")
    kwargs: dict[str, Any] | None = None
    if example_kwargs is not None:
        if not isinstance(example_kwargs, Mapping) or not all(
                isinstance(k, str) for k in example_kwargs):
            raise InvalidTypeError(
                "example_kwargs must be a dict of keyword inputs with str keys "
                f"(input_ids=..., attention_mask=...), got {example_kwargs!r:.80}")
        kwargs = dict(example_kwargs)
    if model is not None and (args is not None or kwargs is not None) \
            and not isinstance(model, torch.fx.GraphModule):
        signature = _forward_signature(model)
        try:
            if signature is not None:
                signature.bind(model, *(args or ()), **(kwargs or {}))
        except TypeError as exc:
            raise InvalidArgumentError(
                f"the example inputs do not fit {type(model).__name__}.forward{signature}: "
                f"{exc}. Pass example_inputs= / example_kwargs= as one call of the model "
                "would.") from None
    return args, kwargs


def _is_leaf_spec(leaf: object) -> bool:
    from torch import nn

    return isinstance(leaf, (str, nn.Module)) or (isinstance(leaf, type)
                                                  and issubclass(leaf, nn.Module))


def check_leaf_modules(leaf_modules: object, model: nn.Module | None = None) -> list[LeafSpec]:
    """``leaf_modules`` as a list: module classes, qualified module names and module objects.

    One class, name or module alone is a list of one (``leaf_modules=nn.MultiheadAttention``).
    With ``model``, every name must be a module of it and every module object must be in it (a
    misspelt path would otherwise be ignored); classes are not checked against the model, so one
    list of classes can serve several models.
    """
    if leaf_modules is None:
        return []
    if _is_leaf_spec(leaf_modules):
        leaves = [leaf_modules]
    elif isinstance(leaf_modules, Iterable) and not isinstance(leaf_modules, Mapping):
        leaves = list(leaf_modules)
    else:
        raise InvalidTypeError(
            "leaf_modules must be a list of nn.Module subclasses, qualified module names or "
            f"modules (or one of them), got {type(leaf_modules).__name__}")
    for leaf in leaves:
        if not _is_leaf_spec(leaf):
            raise InvalidTypeError(
                f"leaf_modules entries must be nn.Module subclasses, qualified module names or "
                f"modules, got {leaf!r}")
    if model is not None:
        _check_leaves_in(model, leaves)
    return leaves


def _check_leaves_in(model: nn.Module, leaves: list[Any]) -> None:
    from torch import nn

    paths = {name: m for name, m in model.named_modules(remove_duplicate=False) if name}
    ids = {id(m) for m in paths.values()} | {id(model)}
    for leaf in leaves:
        if isinstance(leaf, str) and leaf not in paths:
            raise InvalidArgumentError(
                f"leaf_modules names {leaf!r}, which is not a module of {type(model).__name__}"
                f"{close_matches(leaf, paths)}: give qualified names as model.named_modules() "
                "lists them")
        if isinstance(leaf, nn.Module) and id(leaf) not in ids:
            raise InvalidArgumentError(
                f"leaf_modules holds a {type(leaf).__name__} that is not a module of "
                f"{type(model).__name__}: give the model's own module objects (or their "
                "qualified names, or a class)")


def check_concrete_args(concrete_args: object, model: nn.Module | None = None
                        ) -> dict[str, Any] | None:
    """``concrete_args`` as a dict: names of ``model.forward``'s parameters to their fixed
    values (the tracer ignores any other name, so a misspelt one is refused)."""
    if concrete_args is None:
        return None
    if not isinstance(concrete_args, Mapping) or not all(
            isinstance(k, str) for k in concrete_args):
        raise InvalidTypeError(
            "concrete_args must be a dict from forward parameter names to values, got "
            f"{concrete_args!r:.80}")
    signature = None if model is None else _forward_signature(model)
    if signature is not None:
        named = [n for n, p in signature.parameters.items()
                 if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)][1:]  # not self
        for name in concrete_args:
            if name not in named:
                raise InvalidArgumentError(
                    f"concrete_args names {name!r}, which is not a parameter of "
                    f"{type(model).__name__}.forward{signature}{close_matches(name, named)}")
    return dict(concrete_args)


class TraceArguments(NamedTuple):
    """The arguments that decide how a model is traced, checked (:func:`check_trace_arguments`)."""

    example_inputs: tuple[Any, ...] | None
    example_kwargs: dict[str, Any] | None
    tracing: str
    leaf_modules: list[Any]
    concrete_args: dict[str, Any] | None


def check_trace_arguments(model: nn.Module | None, example_inputs: object = None,
                          example_kwargs: object = None, tracing: object = "auto",
                          leaf_modules: object = None, concrete_args: object = None
                          ) -> TraceArguments:
    """The checks of the analysis' arguments (:func:`fxsd.find_residuals`,
    :func:`fxsd.analyze_residuals`, :func:`fxsd.stochastic_depth`), in one place. With
    ``model``, names and examples are checked against it too."""
    args, kwargs = check_examples(model, example_inputs, example_kwargs)
    return TraceArguments(args, kwargs, check_choice(tracing, "tracing", TRACINGS),
                          check_leaf_modules(leaf_modules, model),
                          check_concrete_args(concrete_args, model))


def wrapper_kind(module: nn.Module) -> str | None:
    for cls in type(module).__mro__:
        if cls.__name__ in _WRAPPERS:
            return cls.__name__
    return None


def check_not_wrapped(model: nn.Module) -> None:
    """Raise when ``model`` or one of its modules is already sharded, wrapped for data parallel
    or compiled (``torch.compile``'s ``OptimizedModule``).

    Raises:
        InvalidArgumentError: names the first wrapped module and says to transform first.
    """
    for path, module in model.named_modules():
        kind = wrapper_kind(module)
        where = f"module '{path}'" if path else "the model"
        if kind == "OptimizedModule":
            raise InvalidArgumentError(
                f"{where} is compiled by torch.compile (OptimizedModule): apply "
                "fxsd.stochastic_depth to the module it compiles (its ._orig_mod) and compile the "
                "result with fxsd.compile(model), which keeps the gates' decisions live")
        if kind is not None:
            raise InvalidArgumentError(
                f"{where} ({type(module).__name__}) is already wrapped by {kind}: apply "
                "fxsd.stochastic_depth to the plain model first, then shard or wrap the result "
                "(fully_shard / DistributedDataParallel); the gated blocks keep their module "
                "boundaries, so per-block sharding works on them")
