"""Symbolic tracing for fxsd: ``torch.fx`` with drop-path modules kept live and clear errors.

:func:`trace` turns a model into an :class:`~fxsd.graph_module.FxsdGraphModule` that fxsd owns (the
model itself is never modified) and prepares its graph for analysis:

* drop-path modules (torchvision ``StochasticDepth``, timm-style ``DropPath``) stay leaf modules,
  and calls of the ``torch.fx.wrap``-ped function ``torchvision.ops.stochastic_depth`` become
  ``StochasticDepth`` modules, so that they still read ``self.training`` at run time instead of
  having the flag baked into the graph as a constant;
* in-place ops get explicit results (see :mod:`fxsd.tracing._explicit_inplace`);
* a join into part of a tensor (``torch.cat([x[:, :C] + s, x[:, C:]])``) becomes one
  :func:`~fxsd.tracing.partial_join.partial_add` call (see
  :mod:`fxsd.tracing._explicit_partial_joins`);
* code that reads ``self.training`` keeps following ``.train()``/``.eval()``: both modes are
  traced and merged (:mod:`fxsd.tracing._train_eval`) into :func:`if_training` calls, defined here;
* a module whose own code draws a random number while traced is kept whole
  (:mod:`fxsd.tracing._random_draws`), so that the draw keeps deciding at run time.
"""

from __future__ import annotations

import bisect
import dis
import enum
import functools
import operator
import sys
import types
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.utils._python_dispatch import TorchDispatchMode

from fxsd.arguments import LeafSpec, check_concrete_args, check_leaf_modules, check_not_wrapped
from fxsd.errors import FrozenDropoutWarning, InvalidTypeError, RandomDrawError, TraceError
from fxsd.graph_module import FxsdGraphModule, copy_graph, module_from_graph, wrapped_call
from fxsd.record import FxsdRecord, NodeRecord
from fxsd.tracing._explicit_inplace import make_inplace_explicit
from fxsd.tracing._explicit_partial_joins import make_partial_joins_explicit
from fxsd.tracing._live_drop_path import make_drop_paths_live
from fxsd.tracing._random_draws import (
    HostStates,
    _draw_error,
    _trace_keeping_draws,
    watching_draws,
)
from fxsd.tracing.calls import CallTree, ModuleCall, as_nodes, is_dict_record
from fxsd.tracing.drop_paths import is_drop_path
from fxsd.tracing.guards import check_argument
from fxsd.tracing.hf import opaque_attention_kernels
from fxsd.tracing.layer_drop import is_layer_drop_loop
from fxsd.tracing.ops import NOT_DROPOUT, dropout_training
from fxsd.tracing.partial_join import is_assigned_join

__all__ = ["trace", "trace_calls", "if_training", "FxsdTracer", "Modes"]


class Modes(enum.Enum):
    """Which training modes a trace covers (:func:`trace_calls`)."""

    BOTH = "both"
    """Both, merged (:mod:`fxsd.tracing._train_eval`): the graph follows ``train()``/``eval()``."""
    CURRENT = "current"
    """The modules' current modes only: one trace, right in those modes alone."""
    FLIPPED = "flipped"
    """Every module's mode flipped, one trace (the modules' flags are restored after)."""

TracerFactory = Callable[..., "FxsdTracer"]
"""Builds the tracer of one trace: called with the leaves and ``prefix=`` (the traced module's
qualified name with a dot)."""


def _functional_drop_path() -> Any:
    from torchvision.ops.stochastic_depth import stochastic_depth

    return stochastic_depth


class JoinProxy(fx.Proxy):
    """A proxy that can record one item assignment: a join into part of a tensor written in
    place, ``x[:, :C] += s`` (or ``x[:, :C] = x[:, :C] + s``), which torch.fx cannot trace. It
    becomes ``operator.setitem(x, key, x[key] + s)``, which
    :func:`fxsd.tracing._explicit_partial_joins.make_partial_joins_explicit` turns into one
    ``partial_add``.
    Any other assignment fails as in torch.fx."""

    def __setitem__(self, key: Any, item: Any) -> None:
        if not is_assigned_join(self.node, key, item.node if isinstance(item, fx.Proxy) else None):
            raise TypeError("'Proxy' object does not support item assignment")
        self.tracer.create_proxy("call_function", operator.setitem, (self, key, item), {})

    def __iter__(self) -> Iterator[fx.Proxy]:
        # torch.fx's own, with the caller's bytecode disassembled once per code object: fx
        # disassembles the whole calling function at every unpacking (``b, n = x.shape[:2]``),
        # which made up most of tracing a long ``forward`` (T5's attention) by example
        frame = sys._getframe(1)
        inst = _instruction_at(frame.f_code, frame.f_lasti)
        if inst is not None and inst.opname == "UNPACK_SEQUENCE":
            return (self[i] for i in range(inst.argval))  # type: ignore[index]
        return self.tracer.iter(self)


@functools.lru_cache(maxsize=512)
def _instructions(code: types.CodeType) -> tuple[list[int], list[dis.Instruction]]:
    found = list(dis.get_instructions(code))
    return [i.offset for i in found], found


def _instruction_at(code: types.CodeType, lasti: int) -> dis.Instruction | None:
    """The instruction of ``code`` running at offset ``lasti`` (as ``fx.Proxy.__iter__``
    finds it)."""
    offsets, found = _instructions(code)
    index = bisect.bisect_left(offsets, lasti) if sys.version_info >= (3, 11) else lasti // 2
    return found[index] if index < len(found) else None


class FxsdTracer(fx.Tracer):
    """A :class:`torch.fx.Tracer` that keeps drop-path modules and user-named modules as leaves.

    It also records every module call it traces through (a :class:`~fxsd.tracing.calls.ModuleCall`,
    in :attr:`calls`) and tags each node with the calls running when it was created
    (``node.meta["fxsd"]``, a :class:`~fxsd.record.NodeRecord`). Modules are traced through
    their ``forward`` alone: their hooks are not run on proxies (nor copied into the graph).
    Activation-checkpoint wrappers (``CheckpointWrapper``) are traced as the module they wrap.

    Args:
        leaf_modules: module classes, qualified module names (``"encoder.layers.0.attn"``) or
            module objects to keep as single ``call_module`` nodes instead of tracing through
            them.
        prefix: the traced module's qualified name in its model (``"model.layers.0."``, with the
            dot), when a module is traced on its own: module and attribute targets, and the
            recorded calls' paths, are then qualified in the whole model.
        autowrap: more functions to record as single calls (timm's not-traceable functions).
    """

    def __init__(self, leaf_modules: Iterable[LeafSpec] = (), *, prefix: str = "",
                 autowrap: Iterable[Any] = ()) -> None:
        super().__init__(autowrap_functions=(_functional_drop_path(), *autowrap))
        leaves = list(leaf_modules)
        self._leaf_types = tuple(x for x in leaves if isinstance(x, type))
        self._leaf_names = {x for x in leaves if isinstance(x, str)}
        self._leaf_objects = {id(x) for x in leaves if isinstance(x, nn.Module)}
        self.prefix = prefix
        self.scope_stack: list[tuple[str, str]] = []
        self.calls: list[ModuleCall] = []
        self._running: list[int] = []
        self.draw: RandomDrawError | None = None  # the first random draw of the model's code
        self.host_states: HostStates | None = None  # while tracing
        self.draw_watch: TorchDispatchMode | None = None  # while tracing
        # compare the global host generators' states at every module call (costly: only to
        # find which module moved them, once a trace saw them move)
        self.locate_host_draws = False

    def path_of_module(self, mod: nn.Module) -> str:
        return self.prefix + super().path_of_module(mod)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return JoinProxy(node, self)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self._leaf_names or id(m) in self._leaf_objects:
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
            with opaque_attention_kernels(self), watching_draws(self):
                return super().trace(root, concrete_args)
        finally:
            ops.stochastic_depth = original

    def watches_draws(self) -> bool:
        """Whether a random draw now is the model's own code running on concrete values (the
        tracer's evaluation of a traced op on example values is not)."""
        return True

    def drew(self, source: str, location: str) -> None:
        """The model's code drew a random number on the host (``source``, at ``location``)
        while being traced: raise :class:`~fxsd.errors.RandomDrawError` naming the innermost
        module traced (kept in :attr:`draw` too, in case the model's code swallows it). The
        loop of a module whose layer drop fxsd takes over (:mod:`fxsd.tracing.layer_drop`) may
        draw."""
        if not self.watches_draws():
            return
        path, kind = self.prefix.rstrip("."), type(self.root).__name__
        for entry in reversed(self.scope_stack):  # the innermost module traced through
            module = self.root.get_submodule(entry[0][len(self.prefix):])
            if not self.is_leaf_module(module, entry[0]):
                path, kind = entry
                break
        local = path[len(self.prefix):] if self.prefix else path
        if is_layer_drop_loop(self.root.get_submodule(local)):
            return
        error = _draw_error(path, kind, source, location)
        self.draw = self.draw or error
        raise error

    def create_arg(self, a: Any) -> Any:
        if is_dict_record(a):
            # a dict that is also a dataclass (a Hugging Face ``ModelOutput``): torch.fx would
            # return a plain dict and lose its type, and ``outputs[0]`` or ``.logits`` with it
            fields = {k: self.create_arg(v) for k, v in a.items()}
            return self.create_node("call_function", type(a), (), fields)
        return super().create_arg(a)

    def create_node(self, kind: str, target: Any, *args: Any, **kwargs: Any) -> fx.Node:
        if kind == "get_attr" and self.prefix and not str(target).startswith("_tensor_constant"):
            # a parameter of the traced module (or the module itself), in its model
            target = (self.prefix + str(target)).rstrip(".")
        node = super().create_node(kind, target, *args, **kwargs)
        node.meta["fxsd"] = NodeRecord(tuple(self._running))
        return node

    def call_module(self, m: nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        try:
            path = self.path_of_module(m)
        except NameError:
            # Called but not a registered submodule (transformers' kernel wrappers sit in a plain
            # dict): it has no path to call it by, so its forward is traced through, inline.
            return m.forward(*args, **kwargs)
        if self.locate_host_draws and self.host_states is not None:
            self.host_states.check(self)  # the caller's code since the last check
        # Remember which module is being traced, so that a failure can name it.
        # On failure the entry stays on the stack: the innermost one names the failing module.
        self.scope_stack.append((path, type(m).__name__))
        if self.is_leaf_module(m, path):
            out = super().call_module(m, forward, args, kwargs)
            self.scope_stack.pop()
            return out
        call = ModuleCall(len(self.calls), path, m, self._running[-1] if self._running else None,
                          as_nodes(args), as_nodes(kwargs))
        self.calls.append(call)
        self._running.append(call.index)
        # Trace the module's own forward, without its hooks: a hook must never see proxies, and
        # the rewritten module runs its hooks itself. A checkpoint wrapper is traced as the
        # module it wraps (not through torch.utils.checkpoint).
        wrapped = _checkpoint_wrapped(m)
        out = super().call_module(m, wrapped if wrapped is not None else m.forward, args, kwargs)
        if self.locate_host_draws and self.host_states is not None:
            self.host_states.check(self)
        self._running.pop()
        call.output = as_nodes(out)
        self.scope_stack.pop()
        return out


def _checkpoint_wrapped(module: nn.Module) -> nn.Module | None:
    """The module an activation-checkpoint wrapper (``CheckpointWrapper``) wraps, if any."""
    inner = module.__dict__.get("_modules", {}).get("_checkpoint_wrapped_module")
    return inner if isinstance(inner, nn.Module) else None


def _validate_leaves(leaf_modules: Iterable[LeafSpec] | LeafSpec | None) -> list[LeafSpec]:
    """``leaf_modules`` as a list, each entry's type checked
    (:func:`fxsd.arguments.check_leaf_modules`; the entry points check names against the
    model
    before any tracing)."""
    return check_leaf_modules(leaf_modules)


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
        >>> gm = fxsd.tracing.tracer.trace(torchvision.models.resnet18())
        >>> gm.state_dict().keys() == torchvision.models.resnet18().state_dict().keys()
        True
    """
    if isinstance(model, nn.Module):  # names and parameters against the model, once
        leaf_modules = check_leaf_modules(leaf_modules, model)
        concrete_args = check_concrete_args(concrete_args, model)
    return trace_calls(model, leaf_modules=leaf_modules, concrete_args=concrete_args)[0]


def trace_calls(
    model: nn.Module,
    *,
    leaf_modules: Iterable[LeafSpec] | None = None,
    concrete_args: dict[str, Any] | None = None,
    path: str = "",
    tracer: TracerFactory | None = None,
    autowrap: Iterable[Any] = (),
    modes: Modes = Modes.BOTH,
) -> tuple[FxsdGraphModule, CallTree | None]:
    """:func:`trace`, plus the module calls the tracer went through (``None`` for a
    ``GraphModule`` input, whose graph is copied, not traced).

    With ``path``, only that module of ``model`` is traced (its targets qualified in ``model``);
    the result runs that module's forward over ``model``'s tree. ``tracer`` builds the tracer
    for each trace (:class:`FxsdTracer` with ``autowrap`` by default; tracing by example passes
    :func:`fxsd.tracing.by_example.example_tracer`). ``modes`` other than ``BOTH`` trace one
    mode only (see :class:`Modes`), for a search that compares candidate graphs.
    """
    # fxsd.tracing._train_eval traces with this module's tracer and merges into its if_training
    from fxsd.tracing._train_eval import _guard_mode

    if not isinstance(model, nn.Module):
        raise InvalidTypeError(f"expected an nn.Module to trace, got {type(model).__name__}")
    leaves = _validate_leaves(leaf_modules)
    check_not_wrapped(model)
    calls: list[ModuleCall] | None = None
    module = model.get_submodule(path) if path else model
    if isinstance(module, fx.GraphModule) and not path:
        graph = copy_graph(module.graph)
        extras: dict[str, Any] = {}
        live: list[str] = []
        drawn: list[RandomDrawError] = []
        _warn_frozen_dropout(graph, type(module).__name__)
    else:
        factory = tracer or functools.partial(FxsdTracer, autowrap=tuple(autowrap))

        def make_tracer(leaves: Sequence[LeafSpec]) -> FxsdTracer:
            return factory(leaves, prefix=path + "." if path else "")

        graph, extras, live, calls, own_mode, drawn = _trace_keeping_draws(
            model, path, leaves, concrete_args, make_tracer, modes)
        if own_mode is not None:
            _guard_mode(graph, path, own_mode)
    _guard_specialized_nones(graph, path, concrete_args or {})
    gm = module_from_graph(model, graph, extras, keep_class=False)
    gm.meta["fxsd"] = FxsdRecord(live_leaves=tuple(live), untraced=tuple(
        (e.module_path, e.module_type, _reason_of(e)) for e in drawn))
    make_drop_paths_live(gm)
    make_partial_joins_explicit(gm, calls)  # first: an assigned join becomes a partial_add
    make_inplace_explicit(gm)
    return gm, None if calls is None else CallTree(calls, gm.graph)


def _reason_of(error: TraceError) -> str:
    """The first line of an error's message: why a module was not traced, for tables."""
    return str(error).splitlines()[0]


def _guard_specialized_nones(graph: fx.Graph, path: str, concrete: dict[str, Any]) -> None:
    """torch.fx checks an argument specialized to ``None`` (``concrete_args``) with an
    ``AssertionError``; fxsd's guard raises ``GuardError`` naming the module and the argument."""
    from torch.fx._symbolic_trace import _assert_is_none

    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is _assert_is_none:
            value = node.args[0]
            # torch.fx names the placeholder of a specialized argument ``{name}_{count}``
            target = str(value.target) if isinstance(value, fx.Node) else str(value)
            name = next((k for k in concrete if target.rpartition("_")[0] == k), target)
            if isinstance(value, fx.Node) and value.op == "placeholder":
                value.target = name  # the signature keeps the parameter's own name
            with graph.inserting_before(node):
                wrapped_call(graph, check_argument, (value, None, path, name))
            graph.erase_node(node)


def _warn_frozen_dropout(graph: fx.Graph, name: str) -> None:
    """Warn about dropout whose mode was fixed by whoever traced the graph (a tracer that
    evaluated ``self.training``): fxsd copies such a graph and cannot make it live again."""
    frozen = []
    for n in graph.nodes:
        if n.op != "call_function":
            continue
        flag = dropout_training(n)
        if flag is not NOT_DROPOUT:
            if not isinstance(flag, fx.Node):
                frozen.append(f"{n.name} (training={flag!r})")
        elif n.target is F.scaled_dot_product_attention:
            p = n.kwargs.get("dropout_p", n.args[4] if len(n.args) > 4 else 0.0)
            if not isinstance(p, fx.Node) and p == 0.0:
                frozen.append(f"{n.name} (dropout_p=0.0)")
    if frozen:
        warnings.warn(
            f"the GraphModule {name} was traced with dropout fixed to constants: "
            f"{', '.join(frozen[:6])}{' …' if len(frozen) > 6 else ''}. fxsd keeps its graph "
            "as given, so that dropout does not follow .train()/.eval() (a tracer that read "
            "self.training froze it). Give fxsd the model itself instead (for Hugging Face "
            "models with example_kwargs=), or ignore this if the model has no dropout there.",
            FrozenDropoutWarning, stacklevel=4)


@torch.fx.wrap
def if_training(module: nn.Module | bool, train_value: Any, eval_value: Any) -> Any:
    """``train_value`` if ``module`` is in training mode, else ``eval_value``: a constant that
    ``module``'s code chose by ``self.training`` when it was traced. A rewritten module whose
    own code chose it passes its own flag (``if_training(training, 0.1, 0.0)``)."""
    training = module if isinstance(module, bool) else module.training
    return train_value if training else eval_value


def reads_flag_only(read: fx.Node) -> bool:
    """Whether ``read`` (a ``get_attr`` of a module) feeds nothing but :func:`if_training`:
    the module is used for its training flag alone."""
    return bool(read.users) and all(u.target is if_training for u in read.users)


def _symbolic_trace(
    model: nn.Module, tracer: FxsdTracer, concrete_args: dict[str, Any] | None
) -> tuple[fx.Graph, dict[str, Any], list[ModuleCall]]:
    # fx's tracer stores tensor constants (``_tensor_constant0``...) on the root it traces; take
    # them back off the user's model and hand them to the GraphModule instead.
    before = set(model.__dict__), set(model._buffers), set(model._parameters), set(model._modules)
    try:
        # Without gradients, as the example run: a module that checkpoints its forward only
        # when they are enabled (transformers' checkpointing layers) is traced through its
        # plain forward, not through torch.utils.checkpoint.
        with torch.no_grad():
            graph = tracer.trace(model, concrete_args=concrete_args)
    except Exception as exc:
        if tracer.draw is not None:  # the model's code may have caught it and failed later
            raise tracer.draw from (None if exc is tracer.draw else exc)
        path, kind = (tracer.scope_stack[-1] if tracer.scope_stack
                      else (tracer.prefix.rstrip("."), type(model).__name__))
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
    if tracer.draw is not None:  # caught by the model's code, which went on
        raise tracer.draw
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
