"""Tracing by example: a module's recorded call steers its trace.

Plain ``torch.fx`` fails at the root of most Hugging Face transformers 5.x models: their
``forward`` is wrapped by ``*args, **kwargs`` decorators, builds masks and caches with Python
control flow on tensors, and iterates or indexes proxies. Their layers are plain code, though.
So fxsd can run the model once on example inputs, record how each module is called
(:func:`~fxsd.tracing.example_run.record_calls`), and trace modules on their own with
:class:`ExampleTracer`, which

* traces the module's undecorated ``forward`` (``inspect.unwrap``);
* builds its inputs from the recorded call: a tensor becomes a placeholder; a tuple or dict of
  tensors (Llama's ``position_embeddings``) a container of reads from one placeholder; a cache
  or any other object an opaque placeholder (its methods become graph calls, so cache updates
  stay live), its class guarded by :func:`fxsd.tracing.guards.check_type`; a bool an input; a
  ``None``, int, float or string a constant, guarded by :func:`fxsd.tracing.guards.check_argument`
  in the generated code (a ``None`` that the module only passes on stays an input: see
  :func:`fxsd.analysis.units.trace_unit`);
* runs each recorded op on the example's values as it goes, once for all of a module's traces
  (:mod:`fxsd.tracing._example_memo`). Sizes stay symbolic (the graph must serve other sequence
  lengths, a decode step), but a shape can be unpacked
  (``(*input_shape, -1, d)``: its length, the rank, is the example's), and where Python control
  flow reads a dtype (T5 branches on ``hidden_states.dtype``) or a bool argument, the trace is
  repeated with those fixed to the example's, each checked by a guard;
* qualifies module and attribute targets in the whole model (``model.layers.0.mlp``).

Which modules to trace this way is decided by :func:`fxsd.analysis.analyze.analyze_residuals`.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import operator
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import fx, nn
from torch.fx.node import map_aggregate

from fxsd.arguments import LeafSpec
from fxsd.graph_module import wrapped_call
from fxsd.tracing._example_memo import (
    _MISSING,
    _memo_key,
    _memoizable,
    _unchanged,
    _versions,
)
from fxsd.tracing._random_draws import HostStates, draws_unwatched
from fxsd.tracing.calls import any_leaf
from fxsd.tracing.example_run import RecordedCall, _copied
from fxsd.tracing.guards import (
    check_argument,
    check_condition,
    check_count,
    check_keywords,
    check_type,
    is_guardable,
    type_name,
)
from fxsd.tracing.ops import resolve_attr
from fxsd.tracing.tracer import FxsdTracer, JoinProxy, TracerFactory

__all__ = ["ExampleTracer", "example_tracer"]


def set_item(container: Any, key: Any, value: Any) -> None:
    """``container[key] = value`` on a non-tensor object (a cache's bookkeeping dict), as one
    call in the generated code: plain torch.fx, re-tracing the code when a gated model is
    unpickled, cannot assign into a proxy. (Not decorated with ``torch.fx.wrap``: that would
    patch this module's global during every trace, and the graph would call the patch.)"""
    container[key] = value


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
    """An :class:`~fxsd.tracing.tracer.FxsdTracer` that traces one module along its recorded call.

    Args:
        call: the module's recorded call.
        model: the whole model (to run module calls on example values).
        leaf_modules, prefix, autowrap: as for :class:`~fxsd.tracing.tracer.FxsdTracer`.
        fix_flags: fix bool arguments to the example's, and let Python control flow read the
            example's value of a condition that is not a tensor (``if x.dtype ==
            torch.float16``, ``if cache.is_updated[i]``); each fixed value is checked by a
            guard in the generated code. Without it, flags stay inputs (serving every value)
            and such control flow fails to trace.
        free_nones: names of the module's ``None`` arguments to keep as inputs instead of
            constants. Only right when the module merely passes them on: ``x is None`` on an
            input is silently false (see :func:`fxsd.analysis.units.trace_unit`, which checks).
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
        self._submodules: dict[str, nn.Module] | None = None

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
        (:mod:`fxsd.tracing.guards`: ``check_condition`` for a truth value, ``check_count`` and
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
        # sees, so the states are compared around it (see fxsd.tracing._random_draws.watching_draws)
        # a call_module's module, looked up once: its path is what the node records
        called = self.submodule(target) if kind == "call_module" else target
        host = self.host_states if _model_code(called, kind) else None
        if host is not None:
            host.check(self)
        # not run again, a function of the model's draws nothing: the draws it would make are
        # its own anyway (the states are synced after it), not the traced code's
        key = _memo_key(called if kind == "call_module" else None, kind, target, real_args,
                        real_kwargs)
        found = self.call.evaluated.get(key) if key is not None else None
        if found is not None and _unchanged(found[0], found[1]):
            return found[0]
        result = self._run(kind, called, real_args, real_kwargs, host)
        if key is not None and _memoizable(result):
            # the inputs stay referenced, so that no other object takes their ids
            self.call.evaluated[key] = (result, _versions(result), real_args, real_kwargs)
        return result

    def submodule(self, path: str) -> nn.Module:
        """The model's module at ``path``, from a table built once per trace: while tracing,
        ``get_submodule`` goes through torch.fx's patched ``__getattr__`` at every level."""
        if self._submodules is None:
            self._submodules = dict(self.model.named_modules(remove_duplicate=False))
        found = self._submodules.get(path)
        return found if found is not None else self.model.get_submodule(path)

    def _run(self, kind: str, target: Any, real_args: tuple, real_kwargs: dict,
             host: HostStates | None) -> Any:
        """One recorded op on the example's values (``_MISSING`` when it raises); a
        ``call_module``'s ``target`` is the module."""
        try:
            with torch.no_grad(), self._evaluation():
                if kind == "call_function":
                    return target(*real_args, **real_kwargs)
                if kind == "call_method":
                    return getattr(real_args[0], target)(*real_args[1:], **real_kwargs)
                if kind == "call_module":  # ``target``: the module itself
                    return target(*real_args, **real_kwargs)
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
    """The tracer factory :func:`fxsd.tracing.tracer.trace_calls` takes, for tracing the module of
    ``call`` by example (arguments as for :class:`ExampleTracer`)."""
    return functools.partial(ExampleTracer, call, model, autowrap=tuple(autowrap),
                             fix_flags=fix_flags, free_nones=tuple(free_nones))


def _model_code(target: Any, kind: str) -> bool:
    """Whether a recorded call runs the model's own code: a leaf module (``target``: the module)
    or a function (timm's not-traceable functions) that is neither torch's nor an operator."""
    if kind == "call_module":
        target = type(target)
    elif kind != "call_function":
        return False
    module = getattr(target, "__module__", None) or ""
    return not module.startswith(("torch", "_operator", "operator", "builtins", "math", "fxsd"))
