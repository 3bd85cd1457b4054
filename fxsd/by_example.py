"""Tracing by example: a module's recorded call steers its trace.

Plain ``torch.fx`` fails at the root of most Hugging Face transformers 5.x models: their
``forward`` is wrapped by ``*args, **kwargs`` decorators, builds masks and caches with Python
control flow on tensors, and iterates or indexes proxies. Their layers are plain code, though.
So fxsd can run the model once on example inputs, record how each module is called
(:func:`record_calls`), and trace modules on their own with :class:`ExampleTracer`, which

* traces the module's undecorated ``forward`` (``inspect.unwrap``);
* builds its inputs from the recorded call: a tensor becomes a placeholder; a tuple or dict of
  tensors (Llama's ``position_embeddings``) a container of reads from one placeholder; a cache
  or any other object an opaque placeholder (its methods become graph calls, so cache updates
  stay live), its class guarded by :func:`fxsd.guards.check_type`; a bool an input; a ``None``,
  int, float or string a constant, guarded by :func:`fxsd.guards.check_argument` in the
  generated code (a ``None`` that the module only passes on stays an input: see
  :func:`fxsd.units.trace_unit`);
* runs each recorded op on the example's values as it goes. Sizes stay symbolic (the graph
  must serve other sequence lengths, a decode step), but a shape can be unpacked
  (``(*input_shape, -1, d)``: its length, the rank, is the example's), and where Python control
  flow reads a dtype (T5 branches on ``hidden_states.dtype``) or a bool argument, the trace is
  repeated with those fixed to the example's, each checked by a guard;
* qualifies module and attribute targets in the whole model (``model.layers.0.mlp``).

Which modules to trace this way is decided by :func:`fxsd.analysis.analyze_residuals`.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import operator
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.fx.node import map_aggregate

from fxsd.calls import any_leaf
from fxsd.errors import FxsdError, Run
from fxsd.graph_module import wrapped_call
from fxsd.guards import (
    check_argument,
    check_condition,
    check_count,
    check_keywords,
    check_type,
    is_guardable,
    type_name,
)
from fxsd.ops import resolve_attr
from fxsd.preserve import model_run
from fxsd.tracing import (
    FxsdTracer,
    HostStates,
    JoinProxy,
    LeafSpec,
    TracerFactory,
    draws_unwatched,
)

__all__ = ["RecordedCall", "record_calls", "ExampleTracer", "example_tracer"]

_MISSING = object()


def set_item(container: Any, key: Any, value: Any) -> None:
    """``container[key] = value`` on a non-tensor object (a cache's bookkeeping dict), as one
    call in the generated code: plain torch.fx, re-tracing the code when a gated model is
    unpickled, cannot assign into a proxy. (Not decorated with ``torch.fx.wrap``: that would
    patch this module's global during every trace, and the graph would call the patch.)"""
    container[key] = value


@dataclass(eq=False)
class RecordedCall:
    """The first call of one module during the example run.

    Attributes:
        module: the module.
        path: its qualified name in the model.
        args, kwargs: what it received (the objects themselves, not copies).
        order: position of the call's start among all recorded calls.
    """

    module: nn.Module
    path: str
    args: tuple[Any, ...] = field(repr=False)
    kwargs: dict[str, Any] = field(repr=False)
    order: int = 0
    # the ops its traces evaluated on the example's values, shared by every trace of the
    # module (each mode, each way of tracing its flags and Nones): see ExampleTracer._evaluate
    evaluated: dict[Any, tuple[Any, ...]] = field(default_factory=dict, repr=False,
                                                   compare=False)


def record_calls(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
                 ) -> dict[int, RecordedCall]:
    """Run ``model(*args, **kwargs)`` once without gradients; return each module's first call,
    by ``id(module)``. The model is run as it is (its train/eval mode) and is not changed; what
    it raises arrives as a :class:`~fxsd.errors.ModelRunError` (``Run.EXAMPLE``).

    A model in training mode whose run left out modules that have a ``forward`` (its own code
    skipped layers at random: a layer drop) runs once more in eval mode: the modules it left
    out are recorded from that run, and every module that ran there takes its place in that
    run's order (every layer in turn), so that each layer is traced and ordered by depth
    whatever the example's draw skipped.
    """
    recorded = _record(model, args, kwargs)
    missing = {id(m) for m in model.modules() if id(m) not in recorded and _has_forward(m)}
    if not (model.training and missing):
        return recorded
    modes = [(m, m.training) for m in model.modules()]
    try:
        for m, _ in modes:
            m.training = False
        again = _record(model, args, kwargs)
    except FxsdError:  # the model cannot run in eval mode: keep the training run's record
        return recorded
    finally:
        for m, mode in modes:
            m.training = mode
    for key, call in again.items():
        if key in recorded:
            recorded[key].order = call.order
        elif key in missing:
            recorded[key] = call
    return recorded


def _has_forward(module: nn.Module) -> bool:
    """Whether ``module`` can be called (a ``ModuleList`` or ``ModuleDict`` cannot)."""
    return type(module).forward is not nn.Module.forward


def _record(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
            ) -> dict[int, RecordedCall]:
    paths = {id(m): p for p, m in model.named_modules()}
    recorded: dict[int, RecordedCall] = {}

    def pre_hook(module: nn.Module, call_args: tuple, call_kwargs: dict) -> None:
        if id(module) not in recorded:  # objects as they were at the call (a cache fills up)
            recorded[id(module)] = RecordedCall(
                module, paths.get(id(module), ""), tuple(_copied(a) for a in call_args),
                {k: _copied(v) for k, v in call_kwargs.items()}, len(recorded))

    handles = [m.register_forward_pre_hook(pre_hook, with_kwargs=True) for m in model.modules()]
    try:
        with torch.no_grad(), model_run(model, Run.EXAMPLE):
            model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return recorded


class _ExampleProxy(JoinProxy):
    """A proxy that knows the example's value of its node: a shape's length is the rank, an
    object's plain attributes (``cache.is_updated``) are graph values that can be indexed and
    assigned to (cache bookkeeping stays live)."""

    def _value(self) -> Any:
        return getattr(self.tracer, "values", {}).get(self.node, _MISSING)

    def __getattr__(self, name: str) -> Any:
        value = self._value()
        if _is_object(value) or isinstance(value, dict):
            attr = getattr(value, name, _MISSING)
            if attr is not _MISSING and not callable(attr):
                return self.tracer.create_proxy("call_function", getattr, (self, name), {})
        return super().__getattr__(name)

    def __setitem__(self, key: Any, item: Any) -> None:
        value = self._value()
        if value is _MISSING or isinstance(value, torch.Tensor):  # tensors: as FxsdTracer
            return super().__setitem__(key, item)
        wrapped_call(self.tracer, set_item, (self, key, item))

    def __len__(self) -> int:
        value = self._value()
        if isinstance(value, (tuple, list)):  # a shape: its length is the rank
            return len(value)
        return super().__len__()


class _ObjectProxy(_ExampleProxy):
    """A proxy for an object that is neither a tensor nor a constant (a cache): it passes
    ``isinstance`` checks as the example's class, so that ``isinstance(cache,
    EncoderDecoderCache)`` takes the branch the example took, not silently the other one."""

    def __init__(self, node: fx.Node, tracer: fx.Tracer, cls: type) -> None:
        super().__init__(node, tracer)
        self._cls = cls

    @property  # type: ignore[misc]
    def __class__(self) -> type:
        return self._cls

    @property
    def keys(self) -> Any:  # type: ignore[override]
        # ``fx.Proxy.keys`` (for ``**proxy``) would shadow an object's own ``keys`` attribute:
        # a cache layer's key tensor (``cache.layers[i].keys``) must be read, not called
        attr = getattr(self._value(), "keys", _MISSING)
        if attr is not _MISSING and not callable(attr):
            return self.tracer.create_proxy("call_function", getattr, (self, "keys"), {})
        return super().keys


def _is_object(value: Any) -> bool:
    return value is not _MISSING and not isinstance(
        value, (torch.Tensor, tuple, list, dict, set, torch.Size)) and not is_guardable(value) \
        and type(value).__module__ != "builtins"


def _describe(node: Any, depth: int = 3) -> str:
    """``node``'s value as an expression (for a guard's message)."""
    if not isinstance(node, fx.Node):
        return repr(node)
    if node.op in ("placeholder", "get_attr"):
        return str(node.target).lstrip("*")
    if depth == 0:
        return node.name
    args = [_describe(a, depth - 1) for a in node.args]
    if node.op == "call_function" and node.target is getattr:
        return f"{args[0]}.{node.args[1]}"
    if node.op == "call_function" and node.target is operator.getitem:
        return f"{args[0]}[{args[1]}]"
    symbol = _OPERATORS.get(node.target) if node.op == "call_function" else None
    if symbol and len(args) == 2:
        return f"{args[0]} {symbol} {args[1]}"
    if node.op == "call_method" and args:
        return f"{args[0]}.{node.target}({', '.join(args[1:])})"
    return node.name


_OPERATORS = {operator.eq: "==", operator.ne: "!=", operator.lt: "<", operator.le: "<=",
              operator.gt: ">", operator.ge: ">=", operator.and_: "&", operator.or_: "|",
              operator.contains: "in"}


class ExampleTracer(FxsdTracer):
    """An :class:`~fxsd.tracing.FxsdTracer` that traces one module along its recorded call.

    Args:
        call: the module's recorded call.
        model: the whole model (to run module calls on example values).
        leaf_modules, prefix, autowrap: as for :class:`~fxsd.tracing.FxsdTracer`.
        fix_flags: fix bool arguments to the example's, and let Python control flow read the
            example's value of a condition that is not a tensor (``if x.dtype ==
            torch.float16``, ``if cache.is_updated[i]``); each fixed value is checked by a
            guard in the generated code. Without it, flags stay inputs (serving every value)
            and such control flow fails to trace.
        free_nones: names of the module's ``None`` arguments to keep as inputs instead of
            constants. Only right when the module merely passes them on: ``x is None`` on an
            input is silently false (see :func:`fxsd.units.trace_unit`, which checks).
    """

    def __init__(self, call: RecordedCall, model: nn.Module,
                 leaf_modules: Iterable[LeafSpec] = (), *, prefix: str = "",
                 autowrap: Iterable[Any] = (), fix_flags: bool = False,
                 free_nones: Iterable[str] = ()) -> None:
        super().__init__(leaf_modules, prefix=prefix, autowrap=autowrap)
        self.call = call
        self.model = model
        self.fix_flags = fix_flags
        self.free_nones = frozenset(free_nones)
        self.values: dict[fx.Node, Any] = {}
        self._guarded: set[str] = set()
        self._next: Any = _MISSING  # the value of the proxy being made
        self._evaluating = 0

    @contextlib.contextmanager
    def _evaluation(self) -> Iterator[None]:
        # While an example value is computed, module calls and attribute reads (which the
        # tracer intercepts) run as they would outside tracing.
        self._evaluating += 1
        try:
            with draws_unwatched(self):
                yield
        finally:
            self._evaluating -= 1

    def call_module(self, m: nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        if self._evaluating:
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def watches_draws(self) -> bool:
        # a draw while evaluating a recorded op on the example's values (dropout, a leaf) is
        # that op's, which the graph runs again at every call
        return not self._evaluating

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        if self._evaluating:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def to_bool(self, obj: fx.Proxy) -> bool:
        value = self.values.get(obj.node, _MISSING)
        if not self.fix_flags or value is _MISSING or isinstance(value, torch.Tensor):
            return super().to_bool(obj)  # data-dependent control flow stays an error
        self.guard(obj, bool(value), _describe(obj.node), check=check_condition)
        return bool(value)

    def iter(self, obj: fx.Proxy) -> Iterator[Any]:
        # ``(*x.shape[:-1], -1, d)``: a shape's length (the rank) is the example's; the sizes
        # stay symbolic
        value = self.values.get(obj.node, _MISSING)
        if isinstance(value, (tuple, list)):
            return iter([obj[i] for i in range(len(value))])
        return super().iter(obj)

    def guard(self, proxy: fx.Proxy, expected: Any, name: str,
              check: Callable[..., None] = check_argument) -> None:
        """Check at run time, once per ``name``, that ``proxy`` is ``expected``
        (:mod:`fxsd.guards`: ``check_condition`` for a truth value, ``check_count`` and
        ``check_keywords`` for what ``*args`` and ``**kwargs`` hold)."""
        if name in self._guarded:
            return
        self._guarded.add(name)
        wrapped_call(self, check, (proxy, expected, self.prefix.rstrip("."), name))

    def proxy(self, node: fx.Node) -> fx.Proxy:
        value, self._next = self._next, _MISSING
        if _is_object(value):
            return _ObjectProxy(node, self, type(value))
        return _ExampleProxy(node, self)

    def create_proxy(self, kind: str, target: Any, args: tuple, kwargs: dict,
                     name: str | None = None, type_expr: Any = None,
                     proxy_factory_fn: Callable[[fx.Node], fx.Proxy] | None = None
                     ) -> fx.Proxy:
        value = self._evaluate(kind, target, args, kwargs)
        self._next = value
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr,
                                     proxy_factory_fn)
        if value is not _MISSING:
            self.values[proxy.node] = value
        return proxy

    def _evaluate(self, kind: str, target: Any, args: tuple, kwargs: dict) -> Any:
        """The op's result on the example's values (``_MISSING`` when unknown)."""
        if kind not in ("call_function", "call_method", "call_module", "get_attr"):
            return _MISSING
        missing = False

        def value(x: Any) -> Any:
            nonlocal missing
            if isinstance(x, fx.Proxy):
                found = self.values.get(x.node, _MISSING)
                missing = missing or found is _MISSING
                return found
            return x

        real_args = map_aggregate(args, value)
        real_kwargs = map_aggregate(kwargs, value)
        if missing:
            return _MISSING
        # a leaf module (or a function of the model's) runs for real and may draw on Python's or
        # NumPy's generator as it will at run time: not a draw tracing fixes, but one no patch
        # sees, so the states are compared around it (see fxsd.tracing.watching_draws)
        host = self.host_states if _model_code(self.model, kind, target) else None
        if host is not None:
            host.check(self)
        # not run again, a function of the model's draws nothing: the draws it would make are
        # its own anyway (the states are synced after it), not the traced code's
        key = _memo_key(self.model, kind, target, real_args, real_kwargs)
        found = self.call.evaluated.get(key) if key is not None else None
        if found is not None and _unchanged(found[0], found[1]):
            return found[0]
        result = self._run(kind, target, real_args, real_kwargs, host)
        if key is not None and _memoizable(result):
            # the inputs stay referenced, so that no other object takes their ids
            self.call.evaluated[key] = (result, _versions(result), real_args, real_kwargs)
        return result

    def _run(self, kind: str, target: Any, real_args: tuple, real_kwargs: dict,
             host: HostStates | None) -> Any:
        """One recorded op on the example's values (``_MISSING`` when it raises)."""
        try:
            with torch.no_grad(), self._evaluation():
                if kind == "call_function":
                    return target(*real_args, **real_kwargs)
                if kind == "call_method":
                    return getattr(real_args[0], target)(*real_args[1:], **real_kwargs)
                if kind == "call_module":
                    return self.model.get_submodule(target)(*real_args, **real_kwargs)
                return resolve_attr(self.root, str(target))
        except Exception:
            return _MISSING
        finally:
            if host is not None:
                host.sync()

    def create_args_for_root(self, root_fn: Any, is_module: bool,
                             concrete_args: Any = None) -> tuple[Any, list[Any]]:
        forward = inspect.unwrap(root_fn)
        sig = inspect.signature(forward)
        params = list(sig.parameters.values())[1:]  # without self
        bound = inspect.Signature(params).bind(*self.call.args, **self.call.kwargs)
        call_args: list[Any] = []
        call_kwargs: dict[str, Any] = {}
        for param in params:
            if param.kind is inspect.Parameter.VAR_POSITIONAL:
                rest = tuple(bound.arguments.get(param.name, ()))
                holder = self._placeholder(f"*{param.name}", inspect.Parameter.empty, rest)
                self.guard(holder, len(rest), f"*{param.name}", check=check_count)
                call_args.extend(self._inputs(holder[i], v, f"{param.name}[{i}]")
                                 for i, v in enumerate(rest))
            elif param.kind is inspect.Parameter.VAR_KEYWORD:
                extra = dict(bound.arguments.get(param.name, {}))
                holder = self._placeholder(f"**{param.name}", inspect.Parameter.empty, extra)
                self.guard(holder, tuple(extra), f"**{param.name}", check=check_keywords)
                call_kwargs.update({k: self._inputs(holder[k], v, k) for k, v in extra.items()})
            else:
                given = bound.arguments.get(param.name, param.default)
                holder = self._placeholder(param.name, param.default, given)
                value = self._inputs(holder, given, param.name)
                if param.kind is inspect.Parameter.KEYWORD_ONLY:
                    call_kwargs[param.name] = value
                else:
                    call_args.append(value)
        root = self.root

        def run() -> Any:
            return forward(root, *call_args, **call_kwargs)

        return run, []

    def _placeholder(self, name: str, default: Any, example: Any) -> fx.Proxy:
        self._next = example
        proxy = super().create_proxy("placeholder", name, (), {})
        if default is not inspect.Parameter.empty:
            proxy.node.args = (default,)  # the generated signature keeps the default
        # a tuple of tensors cannot change: every trace reads the same tensors, whose ops the
        # memo then knows (a copy would be new tensors at each trace)
        shared = isinstance(example, tuple) and all(
            isinstance(v, torch.Tensor) or is_guardable(v) for v in example)
        self.values[proxy.node] = example if shared else _copied(example)
        return proxy

    def _inputs(self, holder: fx.Proxy, example: Any, name: str | None) -> Any:
        """What the traced forward receives for one argument (see the module docstring)."""
        if isinstance(example, torch.Tensor):
            return holder
        if isinstance(example, (tuple, list, dict)) and any_leaf(example, torch.Tensor):
            items = example.items() if isinstance(example, dict) else enumerate(example)
            parts = {k: self._inputs(holder[k], v, None) for k, v in items}
            if isinstance(example, dict):
                return parts
            return type(example)(parts[i] for i in range(len(example)))
        if isinstance(example, bool) and not self.fix_flags:
            return holder
        if example is None and name in self.free_nones:
            return holder
        if is_guardable(example):
            if name is not None:
                self.guard(holder, example, name)
            return example
        # a cache or other object: opaque, its method calls become graph calls; the graph took
        # the branches of its class (and of it being there at all: not None)
        if name is not None:
            self.guard(holder, type_name(example), name, check=check_type)
        return holder


def example_tracer(call: RecordedCall, model: nn.Module, *, autowrap: Iterable[Any] = (),
                   fix_flags: bool = False, free_nones: Iterable[str] = ()) -> TracerFactory:
    """The tracer factory :func:`fxsd.tracing.trace_calls` takes, for tracing the module of
    ``call`` by example (arguments as for :class:`ExampleTracer`)."""
    return functools.partial(ExampleTracer, call, model, autowrap=tuple(autowrap),
                             fix_flags=fix_flags, free_nones=tuple(free_nones))


# Ops that change their operands: evaluated again at every trace, never taken from the memo.
_IN_PLACE = frozenset({operator.setitem, operator.delitem, operator.iadd, operator.isub,
                       operator.imul, operator.itruediv, operator.ifloordiv, operator.imod,
                       operator.ipow, operator.iand, operator.ior, operator.ixor,
                       operator.ilshift, operator.irshift, operator.imatmul})
_SCALARS = (bool, int, float, complex, str, type(None), type(Ellipsis), torch.dtype,
            torch.device, torch.layout, torch.memory_format)


def _memo_key(model: nn.Module, kind: str, target: Any, args: tuple, kwargs: dict) -> Any:
    """What determines the result of a pure op on example values, or ``None`` where that is not
    known: the op and its arguments, each tensor by identity and version (an in-place op
    bumps it), each plain value by value; a torch.nn layer with its mode. The model's own
    modules (their state), in-place ops and ops on other objects (a cache, which its methods
    change) are not keyed."""
    mode: Any = None
    if kind == "call_method":
        if not isinstance(target, str) or (target.endswith("_") and not target.startswith("__")):
            return None
    elif kind == "call_module":  # torch.nn's own layers, in their mode (dropout's, BN's)
        module = model.get_submodule(target)
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


def _model_code(model: nn.Module, kind: str, target: Any) -> bool:
    """Whether a recorded call runs the model's own code: a leaf module or a function (timm's
    not-traceable functions) that is neither torch's nor an operator."""
    if kind == "call_module":
        target = type(model.get_submodule(target))
    elif kind != "call_function":
        return False
    module = getattr(target, "__module__", None) or ""
    return not module.startswith(("torch", "_operator", "operator", "builtins", "math", "fxsd"))


def _copied(value: Any) -> Any:
    """A copy of an example value that propagating ops through may change (a cache)."""
    if isinstance(value, torch.Tensor) or is_guardable(value):
        return value
    try:
        return copy.deepcopy(value)
    except Exception:
        return value
