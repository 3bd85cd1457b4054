"""Symbolic tracing for fxsd: ``torch.fx`` with drop-path modules kept live and clear errors.

:func:`trace` turns a model into an :class:`~fxsd.graph_module.FxsdGraphModule` that fxsd owns (the
model itself is never modified) and prepares its graph for analysis:

* drop-path modules (torchvision ``StochasticDepth``, timm-style ``DropPath``) stay leaf modules,
  and calls of the ``torch.fx.wrap``-ped function ``torchvision.ops.stochastic_depth`` become
  ``StochasticDepth`` modules, so that they still read ``self.training`` at run time instead of
  having the flag baked into the graph as a constant;
* in-place ops get explicit results (see :mod:`fxsd.passes.explicit_inplace`).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from typing import Any

from torch import fx, nn
from torch.fx.node import map_aggregate

from fxsd.calls import CallTree, ModuleCall, calls_of
from fxsd.distributed import check_not_wrapped
from fxsd.errors import InvalidTypeError, TraceError
from fxsd.graph_module import FxsdGraphModule, copy_graph, module_from_graph
from fxsd.passes.explicit_inplace import make_inplace_explicit
from fxsd.passes.live_drop_path import make_drop_paths_live
from fxsd.record import FxsdRecord, NodeRecord

__all__ = ["trace", "trace_calls", "is_drop_path", "FxsdTracer", "TrainingDependenceWarning"]

LeafSpec = type | str


def is_drop_path(module: nn.Module) -> bool:
    """Whether ``module`` is a drop-path module: torchvision ``StochasticDepth`` or timm-like.

    timm's ``DropPath`` (and the many copies of it in other code bases) is recognised by shape: a
    parameter-free module with a ``drop_prob`` attribute, or any class named ``DropPath``.
    """
    try:
        from torchvision.ops import StochasticDepth
    except ImportError:  # pragma: no cover - torchvision is a dependency
        StochasticDepth = ()  # type: ignore[assignment]
    if isinstance(module, StochasticDepth):
        return True
    if type(module).__name__ in ("DropPath", "DropPath2d", "StochasticDepth"):
        return True
    has_rate = hasattr(module, "drop_prob") or hasattr(module, "drop_path_prob")
    return has_rate and next(module.parameters(recurse=True), None) is None


def _functional_drop_path() -> Any:
    from torchvision.ops.stochastic_depth import stochastic_depth

    return stochastic_depth


class FxsdTracer(fx.Tracer):
    """A :class:`torch.fx.Tracer` that keeps drop-path modules and user-named modules as leaves.

    It also records every module call it traces through (a :class:`~fxsd.calls.ModuleCall`, in
    :attr:`calls`) and tags each node with the calls running when it was created
    (``node.meta["fxsd"]``, a :class:`~fxsd.record.NodeRecord`). Modules are traced through
    their ``forward`` alone: their hooks are not run on proxies (nor copied into the graph).
    Activation-checkpoint wrappers (``CheckpointWrapper``) are traced as the module they wrap.

    Args:
        leaf_modules: module classes, or qualified module names (``"encoder.layers.0.attn"``), to
            keep as single ``call_module`` nodes instead of tracing through them.
    """

    def __init__(self, leaf_modules: Iterable[LeafSpec] = ()) -> None:
        super().__init__(autowrap_functions=(_functional_drop_path(),))
        leaves = list(leaf_modules)
        self._leaf_types = tuple(x for x in leaves if isinstance(x, type))
        self._leaf_names = {x for x in leaves if isinstance(x, str)}
        self.scope_stack: list[tuple[str, str]] = []
        self.calls: list[ModuleCall] = []
        self._running: list[int] = []

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self._leaf_names:
            return True
        if self._leaf_types and isinstance(m, self._leaf_types):
            return True
        if is_drop_path(m):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def trace(self, root: nn.Module | Any, concrete_args: dict[str, Any] | None = None) -> fx.Graph:
        # ``torchvision.ops.stochastic_depth`` is only fx-wrapped where torchvision itself calls
        # it; ``autowrap_functions`` covers a global import of it in the user's module, and this
        # patch covers calls spelled ``torchvision.ops.stochastic_depth(...)``.
        import torchvision.ops as ops

        original = _functional_drop_path()
        tracer = self

        def stochastic_depth(*args: Any, **kwargs: Any) -> Any:
            if any(isinstance(a, fx.Proxy) for a in (*args, *kwargs.values())):
                return tracer.create_proxy("call_function", original, args, kwargs)
            return original(*args, **kwargs)

        ops.stochastic_depth = stochastic_depth
        try:
            return super().trace(root, concrete_args)
        finally:
            ops.stochastic_depth = original

    def create_node(self, *args: Any, **kwargs: Any) -> fx.Node:
        node = super().create_node(*args, **kwargs)
        node.meta["fxsd"] = NodeRecord(tuple(self._running))
        return node

    def call_module(self, m: nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        path = self.path_of_module(m)
        # Remember which module is being traced, so that a failure can name it.
        # On failure the entry stays on the stack: the innermost one names the failing module.
        self.scope_stack.append((path, type(m).__name__))
        if self.is_leaf_module(m, path):
            out = super().call_module(m, forward, args, kwargs)
            self.scope_stack.pop()
            return out
        call = ModuleCall(len(self.calls), path, m, self._running[-1] if self._running else None,
                          _as_nodes(args), _as_nodes(kwargs))
        self.calls.append(call)
        self._running.append(call.index)
        # Trace the module's own forward, without its hooks: a hook must never see proxies, and
        # the rewritten module runs its hooks itself. A checkpoint wrapper is traced as the
        # module it wraps (not through torch.utils.checkpoint).
        wrapped = _checkpoint_wrapped(m)
        out = super().call_module(m, wrapped if wrapped is not None else m.forward, args, kwargs)
        self._running.pop()
        call.output = _as_nodes(out)
        self.scope_stack.pop()
        return out


def _as_nodes(value: Any) -> Any:
    return map_aggregate(value, lambda x: x.node if isinstance(x, fx.Proxy) else x)


def _checkpoint_wrapped(module: nn.Module) -> nn.Module | None:
    """The module an activation-checkpoint wrapper (``CheckpointWrapper``) wraps, if any."""
    inner = module.__dict__.get("_modules", {}).get("_checkpoint_wrapped_module")
    return inner if isinstance(inner, nn.Module) else None


def _validate_leaves(leaf_modules: Iterable[LeafSpec] | None) -> list[LeafSpec]:
    leaves = list(leaf_modules or ())
    for leaf in leaves:
        ok = isinstance(leaf, str) or (isinstance(leaf, type) and issubclass(leaf, nn.Module))
        if not ok:
            raise InvalidTypeError(
                f"leaf_modules entries must be nn.Module subclasses or qualified module names, "
                f"got {leaf!r}"
            )
    return leaves


def trace(
    model: nn.Module,
    *,
    leaf_modules: Iterable[LeafSpec] | None = None,
    concrete_args: dict[str, Any] | None = None,
) -> FxsdGraphModule:
    """Trace ``model`` into a fresh :class:`~fxsd.graph_module.FxsdGraphModule` that fxsd may edit.

    An ``nn.Module`` is traced with :class:`FxsdTracer`; a ``GraphModule`` (traced by any tracer,
    for example Hugging Face's) is not traced again: its graph is copied. Either way the result
    shares submodules and parameters with ``model``, has its exact ``state_dict`` keys, and
    ``model`` is left untouched.

    Args:
        model: the model to trace.
        leaf_modules: module classes or qualified names not to trace through.
        concrete_args: passed to :meth:`torch.fx.Tracer.trace` (fix data-dependent arguments).

    Raises:
        InvalidTypeError: ``model`` is not an ``nn.Module``.
        TraceError: tracing failed; the error names the innermost module being traced.

    Example:
        >>> import torchvision, fxsd
        >>> gm = fxsd.trace(torchvision.models.resnet18())
        >>> gm.state_dict().keys() == torchvision.models.resnet18().state_dict().keys()
        True
    """
    return trace_calls(model, leaf_modules=leaf_modules, concrete_args=concrete_args)[0]


def trace_calls(
    model: nn.Module,
    *,
    leaf_modules: Iterable[LeafSpec] | None = None,
    concrete_args: dict[str, Any] | None = None,
) -> tuple[FxsdGraphModule, CallTree | None]:
    """:func:`trace`, plus the module calls the tracer went through (``None`` for a
    ``GraphModule`` input, whose graph is copied, not traced)."""
    if not isinstance(model, nn.Module):
        raise InvalidTypeError(f"expected an nn.Module to trace, got {type(model).__name__}")
    leaves = _validate_leaves(leaf_modules)
    check_not_wrapped(model)
    calls: list[ModuleCall] | None = None
    if isinstance(model, fx.GraphModule):
        graph = copy_graph(model.graph)
        extras: dict[str, Any] = {}
        live: list[str] = []
    else:
        graph, extras, live, calls = _trace_training_aware(model, leaves, concrete_args)
    gm = module_from_graph(model, graph, extras, keep_class=False)
    gm.meta["fxsd"] = FxsdRecord(live_leaves=tuple(live))
    make_drop_paths_live(gm)
    make_inplace_explicit(gm)
    return gm, None if calls is None else CallTree(calls, gm.graph)


class TrainingDependenceWarning(UserWarning):
    """Traced code of the root module depends on ``self.training``; it keeps the traced mode."""


def _trace_training_aware(
    model: nn.Module, leaves: Sequence[LeafSpec], concrete_args: dict[str, Any] | None
) -> tuple[fx.Graph, dict[str, Any], list[str], list[ModuleCall]]:
    """Trace, and keep as leaves the modules whose traced code depends on ``self.training``.

    Tracing evaluates ``if self.training`` and ``dropout_p=p if self.training else 0.0`` once, so
    the graph would keep the mode the model had when traced (attention dropout in timm,
    Hugging Face and torchvision's Swin is written like this). fxsd traces a second time with every
    module's flag flipped, compares the two graphs module by module, and re-traces with the
    modules that differ kept as leaves, which read their flag at run time.
    """
    leaves = list(leaves)
    live: list[str] = []
    for _ in range(8):
        graph, extras, calls = _symbolic_trace(model, leaves, concrete_args)
        modes = [(m, m.training) for m in model.modules()]
        try:
            for m, mode in modes:
                m.training = not mode
            flipped, _, flipped_calls = _symbolic_trace(model, leaves, concrete_args)
        finally:
            for m, mode in modes:
                m.training = mode
        differing = _scopes_that_differ((graph, calls), (flipped, flipped_calls))
        if not differing:
            break
        if "" in differing:
            warnings.warn(
                f"the traced forward of {type(model).__name__} itself depends on self.training; "
                f"the graph keeps the {'training' if model.training else 'eval'} behaviour it was "
                "traced with. Move that code into a submodule to keep it switchable.",
                TrainingDependenceWarning,
                stacklevel=3,
            )
            break
        leaves += sorted(differing)
        live += sorted(differing)
    return graph, extras, live, calls


def _scopes_that_differ(a: tuple[fx.Graph, list[ModuleCall]],
                        b: tuple[fx.Graph, list[ModuleCall]]) -> set[str]:
    sa, sb = _scope_signatures(*a), _scope_signatures(*b)
    return {p for p in sa.keys() | sb.keys() if sa.get(p) != sb.get(p)}


def _scope_signatures(graph: fx.Graph, calls: list[ModuleCall]) -> dict[str, list[Any]]:
    """For each module path, the ops its ``forward`` recorded (op, target, constant arguments)."""
    def sig(x: Any) -> Any:
        if isinstance(x, fx.Node):
            return "%"
        if isinstance(x, (list, tuple)):
            return tuple(sig(v) for v in x)
        if isinstance(x, dict):
            return tuple((k, sig(v)) for k, v in x.items())
        return repr(x)

    drop_path = _functional_drop_path()
    out: dict[str, list[Any]] = {}
    for n in graph.nodes:
        chain = calls_of(n)
        path = calls[chain[-1]].path if chain else ""
        args, kwargs = n.args, n.kwargs
        if n.op == "call_function" and n.target is drop_path:  # made live by live_drop_path
            args, kwargs = args[:3], {k: v for k, v in kwargs.items() if k != "training"}
        out.setdefault(path, []).append((n.op, repr(n.target), sig(args), sig(kwargs)))
    return out


def _symbolic_trace(
    model: nn.Module, leaves: Sequence[LeafSpec], concrete_args: dict[str, Any] | None
) -> tuple[fx.Graph, dict[str, Any], list[ModuleCall]]:
    tracer = FxsdTracer(leaves)
    # fx's tracer stores tensor constants (``_tensor_constant0``...) on the root it traces; take
    # them back off the user's model and hand them to the GraphModule instead.
    before = set(model.__dict__), set(model._buffers), set(model._parameters), set(model._modules)
    try:
        graph = tracer.trace(model, concrete_args=concrete_args)
    except Exception as exc:
        path, kind = tracer.scope_stack[-1] if tracer.scope_stack else ("", type(model).__name__)
        where = f"module '{path}' ({kind})" if path else f"the root module ({kind})"
        hint = (
            f"Pass leaf_modules=[{kind}] (or leaf_modules=['{path}']) to keep it as one opaque "
            "call, or concrete_args={...} to fix the arguments that steer its control flow."
            if path else "Pass concrete_args={...} to fix the arguments that steer Python control "
            "flow, or leaf_modules=[...] for the submodules that cannot be traced."
        )
        raise TraceError(
            f"torch.fx could not trace {where}: {type(exc).__name__}: {exc}\n{hint}",
            module_path=path,
            module_type=kind,
        ) from exc
    finally:
        extras = _take_new_attrs(model, before)
    return graph, extras, tracer.calls


def _take_new_attrs(model: nn.Module, before: tuple[set[str], ...]) -> dict[str, Any]:
    dict_keys, buffers, params, modules = before
    taken: dict[str, Any] = {}
    for name in set(model.__dict__) - dict_keys:
        taken[name] = model.__dict__.pop(name)
    for store, seen in ((model._buffers, buffers), (model._parameters, params),
                        (model._modules, modules)):
        for name in set(store) - seen:
            taken[name] = store.pop(name)
    return taken


