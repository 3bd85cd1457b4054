"""Calls a gated block's trace did not see: the block traces itself again, once per signature.

A gated block's graph holds the control flow of the call it was traced from, and its guards
(:mod:`fxsd.tracing.guards`) check what that call fixed: constant arguments, the keys of
``**kwargs``, how many ``*args``, the class of a cache, the truth of Python conditions. Later calls
differ: Hugging Face's ``Trainer`` passes ``num_items_in_batch=`` and ``use_cache=False``,
``generate()`` passes flags and a cache whose cross-attention keys are already computed, Whisper's
encoder adds ``use_cache`` to its layers' keyword arguments.

So the code of a gated block with guards starts by asking :func:`variant_for` which graph serves
the call:

* its own graph, when every guard that can be checked before the block runs holds;
* else the first of its *variants* whose guards hold;
* else a new variant: the block's original ``forward`` traced again by example on this very call
  (:class:`~fxsd.tracing.by_example.ExampleTracer`, on a view of the block that shares its children,
  parameters and buffers; the modules its own graph calls whole stay whole), analysed, and gated
  with the block's own :class:`~fxsd.runtime.gate.BranchGate` objects, found by gate name. Rates,
  schedules, the random stream, :func:`fxsd.set_drop_rate` and the replay of decisions under
  activation checkpointing see one gate per site, as before; only the branch a gate runs is the
  variant's (:class:`~fxsd.passes.regate.GateView`). A join the block's own trace did not
  gate stays a plain add.

A guard can be checked ahead when it reads the block's arguments and attributes only through
pure reads (attributes, items, comparisons, ``dim()``, ``dict.get``, methods named ``get_*``,
``is_*``, ``has_*``) and nothing earlier in the block calls a method on, or passes on, an object
it reads. Every guard also stays in the code, so a check made ahead can only pick a graph that
then refuses the call (``GuardError`` mid-call), never one that computes something else.

Tracing again does not change the model or the call: it runs on copies of the call's arguments,
under :func:`fxsd.preserve.preserved`, with the gates computing their branches without drawing
and their random stream put back.

What cannot be made right raises :class:`~fxsd.errors.GuardError` saying what: tracing again
fails, a gated join is not found again (the call takes another path through the block), an
argument cannot be copied to trace on, or a block would need more than :data:`MAX_VARIANTS`
signatures. Variants are a cache: ``deepcopy`` and pickling drop them (rebuilt on the next call
that needs one), and ``state_dict`` never sees them.
"""


from __future__ import annotations

import inspect
import operator
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.fx import Graph, Node
from torch.fx.graph import CodeGen

from fxsd.errors import GuardError
from fxsd.graph_module import FxsdGraphModule
from fxsd.runtime._retrace import _TABLE, _path, _placeholders, _trace_again
from fxsd.tracing.calls import any_leaf
from fxsd.tracing.guards import GUARDS, is_guardable, passes
from fxsd.tracing.ops import node_order, resolve_attr

__all__ = ["MAX_VARIANTS", "CallSignatureCodeGen", "allow_other_calls", "variant_for"]

#: The most variants one block keeps; a call that needs another raises ``GuardError``.
MAX_VARIANTS = 8

_PURE_FUNCTIONS = frozenset({
    getattr, operator.getitem, operator.eq, operator.ne, operator.lt, operator.le, operator.gt,
    operator.ge, operator.not_, operator.truth, operator.is_, operator.is_not,
    operator.contains, operator.and_, operator.or_, operator.add, operator.sub, operator.mul,
    operator.floordiv, operator.mod, operator.neg, len, isinstance})
_PURE_METHODS = frozenset({"dim", "size", "get", "keys", "values", "items", "__len__",
                           "__contains__", "__getitem__", "is_floating_point", "is_complex",
                           "numel"})
_PURE_PREFIXES = ("get_", "is_", "has_")
_METADATA = frozenset({"dtype", "shape", "device", "ndim", "layout", "is_cuda"})


# -- the generated code ------------------------------------------------------------------------


class CallSignatureCodeGen(CodeGen):
    """Code generation for a gated block: the generated ``forward`` first asks
    :func:`variant_for` whether another graph serves the call, and returns its result if so."""

    def gen_fn_def(self, free_vars: list[str], maybe_return_annotation: str, *,
                   expanded_def: bool = False) -> str:
        head = super().gen_fn_def(free_vars, maybe_return_annotation, expanded_def=expanded_def)
        names = [_parameter(v) for v in free_vars[1:]]  # free_vars[0] is "self"
        values = ", ".join(n.lstrip("*") for n in names) + ("," if len(names) == 1 else "")
        return (f"{head}\n"
                f"    _fxsd_variant = fxsd_variant_for(self, ({values}))\n"
                f"    if _fxsd_variant is not None:\n"
                f"        return _fxsd_variant({', '.join(_call_arguments(names))})")

    def additional_globals(self) -> list[tuple[str, Any]]:
        return [("fxsd_variant_for", variant_for)]


def _parameter(free_var: str) -> str:
    """``scale`` from ``scale : float = 1.0`` (``*args``, ``**kwargs`` keep their stars)."""
    return free_var.split("=")[0].split(":")[0].strip()


def _call_arguments(names: Sequence[str]) -> list[str]:
    """How the generated code passes its own parameters on to a variant's ``forward``."""
    out, keyword = [], False
    for name in names:
        if name.startswith("*"):
            keyword = keyword or not name.startswith("**")
            out.append(name)
        else:
            out.append(f"{name}={name}" if keyword else name)
    return out


def allow_other_calls(graph: Graph, source: type) -> None:
    """Let the block built from ``graph`` (a rewrite of a ``source`` module) trace itself again
    for calls its guards refuse: its code will start with the :func:`variant_for` check.

    Only where that can help: the graph has a guard that can be checked ahead, and its
    parameters are those of ``source.forward``, which is what is traced again.
    """
    if type(graph._codegen) is not CodeGen or not _Precheck.of(graph).nodes:
        return
    if issubclass(source, fx.GraphModule) or _signature(source) != _placeholders(graph):
        return
    graph._codegen = CallSignatureCodeGen()


def _signature(source: type) -> list[str] | None:
    """``source.forward``'s parameters as placeholder targets (``*args``, ``**kwargs``)."""
    try:
        params = list(inspect.signature(inspect.unwrap(source.forward)).parameters.values())[1:]
    except (TypeError, ValueError):
        return None
    stars = {inspect.Parameter.VAR_POSITIONAL: "*", inspect.Parameter.VAR_KEYWORD: "**"}
    return [stars.get(p.kind, "") + p.name for p in params]


# -- choosing the graph for a call -------------------------------------------------------------


@torch.compiler.disable
def variant_for(block: nn.Module, values: tuple[Any, ...]) -> Callable[..., Any] | None:
    """The ``forward`` of the variant that serves a call of ``block`` with these parameter
    values (in its placeholders' order), or ``None`` when the block's own graph does."""
    if any_leaf(values, fx.Proxy):  # the generated code itself is being traced
        return None
    table = block.__dict__.get(_TABLE)
    if not isinstance(table, _Variants) or table.block() is not block:
        table = _Variants(block)  # a copy of a block (strip, shallow copies) has its own
        block.__dict__[_TABLE] = table
    return table.select(block, values)


def _dropped() -> None:
    """Unpickle a block's variants: as nothing (they are rebuilt when needed)."""
    return None


class _Variants:
    """The variants of one block, in the order they were made."""

    def __init__(self, block: nn.Module) -> None:
        self.block = weakref.ref(block)
        self.own: tuple[Graph, _Precheck] | None = None
        self.variants: list[tuple[FxsdGraphModule, _Precheck]] = []

    def __reduce__(self) -> tuple[Any, ...]:
        return (_dropped, ())

    def __deepcopy__(self, memo: dict[int, Any]) -> None:
        return None

    def select(self, block: nn.Module, values: tuple[Any, ...]) -> Callable[..., Any] | None:
        """See :func:`variant_for`; makes the variant when none serves the call."""
        if self.own is None or self.own[0] is not block.graph:
            self.own = (block.graph, _Precheck.of(block.graph))
        refused = self.own[1].refusal(block, values)
        if refused is None:
            return None
        for module, check in self.variants:
            if check.refusal(module, values) is None:
                module.training = block.training
                return module.forward
        path = _path(block)
        if len(self.variants) >= MAX_VARIANTS:
            raise GuardError(
                f"'{path or '<root>'}' was rewritten by fxsd and has traced itself again for "
                f"{MAX_VARIANTS} other calls already; this call differs again ({refused}). "
                "Calls that vary this much cannot each get a graph: pass that argument as a "
                "tensor, or keep this module out of the rewrite (select=...)")
        module = _trace_again(block, values, path, refused)
        check = _Precheck.of(module.graph)
        if check.refusal(module, values) is not None:
            raise GuardError(f"'{path or '<root>'}' was traced again by fxsd for a call its "
                             f"trace did not see ({refused}), but the new graph's guards refuse "
                             "that call too")
        self.variants.append((module, check))
        return module.forward


@dataclass
class _Precheck:
    """The guards of a graph that can be checked before it runs, with what they read."""

    nodes: list[Node]
    placeholders: list[Node]

    @classmethod
    def of(cls, graph: Graph) -> _Precheck:
        """The guards of ``graph`` that can be checked ahead (see the module docstring)."""
        order = node_order(graph)
        chosen: set[Node] = set()
        for guard in graph.nodes:
            if guard.op != "call_function" or guard.target not in GUARDS:
                continue
            cone = _cone(guard.args[0])
            if cone is not None and not _changed_before(cone, guard, order):
                chosen |= cone | {guard}
        return cls(sorted(chosen, key=order.__getitem__),
                   [n for n in graph.nodes if n.op == "placeholder"])

    def refusal(self, module: nn.Module, values: tuple[Any, ...]) -> str | None:
        """``None`` when every guard holds for the call, else which one does not (said as
        ``name=value, traced with expected``)."""
        env: dict[Node, Any] = dict(zip(self.placeholders, values))
        for node in self.nodes:
            if node.op == "placeholder":
                continue
            try:
                if node.op == "call_function" and node.target in GUARDS:
                    read, expected = node.args[0], _plain(node.args[1])
                    value = env[read] if isinstance(read, Node) else read
                    if not passes(node.target, value, expected):
                        return f"{node.args[3]}={_short(value)}, traced with {expected!r}"
                    continue
                env[node] = _evaluate(node, env, module)
            except Exception:  # noqa: BLE001 - a read the call cannot answer: it does not fit
                return f"{node.name} cannot be read on this call"
        return None


def _plain(value: Any) -> Any:
    """A constant of a node's arguments as the generated code spells it: a plain ``dict`` or
    ``list``, not torch.fx's immutable ones (guards compare types)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(_plain(v) for v in value)
    return value


def _short(value: Any) -> str:
    """``value`` as a guard's message shows it (a mapping by its keys, an object by its class)."""
    if isinstance(value, dict):
        return f"<keys {sorted(value)}>"
    text = repr(value) if is_guardable(value) else f"<{type(value).__name__}>"
    return text if len(text) <= 80 else text[:77] + "..."


def _evaluate(node: Node, env: dict[Node, Any], module: nn.Module) -> Any:
    """What the pure read ``node`` gives on the call (``env``: the values of earlier nodes)."""

    def value(x: Any) -> Any:
        return env[x] if isinstance(x, Node) else x

    args = fx.node.map_aggregate(node.args, value)
    kwargs = fx.node.map_aggregate(node.kwargs, value)
    if node.op == "get_attr":
        return resolve_attr(module, str(node.target))
    if node.op == "call_method":
        return getattr(args[0], str(node.target))(*args[1:], **kwargs)
    return node.target(*args, **kwargs)


def _cone(value: Any) -> set[Node] | None:
    """The nodes ``value`` is read from, or ``None`` when one of them is not a pure read."""
    cone: set[Node] = set()
    stack = [value] if isinstance(value, Node) else []
    while stack:
        node = stack.pop()
        if node in cone:
            continue
        if not _pure(node):
            return None
        cone.add(node)
        stack.extend(node.all_input_nodes)
    return cone


def _pure(node: Node) -> bool:
    """Whether ``node`` only reads. Methods: those of dicts and tensor metadata, and by the
    naming convention ``get_*``, ``is_*``, ``has_*`` (a cache's ``get_seq_length()``)."""
    if node.op in ("placeholder", "get_attr"):
        return True
    if node.op == "call_function":
        return node.target in _PURE_FUNCTIONS or node.target in GUARDS
    return node.op == "call_method" and (node.target in _PURE_METHODS or str(
        node.target).startswith(_PURE_PREFIXES))


def _changed_before(cone: set[Node], guard: Node, order: dict[Node, int]) -> bool:
    """Whether something the block runs before ``guard`` may change what the guard reads (a
    method call on the cache it reads). Tensor metadata (``x.dtype``) never changes."""
    for node in cone:
        if all(_metadata_read(u) for u in node.users if u in cone):
            continue
        for user in node.users:
            if user not in cone and order[user] < order[guard] and not _pure(user):
                return True
    return False


def _metadata_read(node: Node) -> bool:
    """Whether ``node`` reads tensor metadata that nothing the block runs can change — narrower
    than :func:`fxsd.tracing.ops.is_metadata_read` (``requires_grad``, strides and contiguity can
    change within a block), because a guard checked before the block runs relies on it."""
    if node.op == "call_function" and node.target is getattr:
        return node.args[1] in _METADATA
    return node.op == "call_method" and node.target in ("dim", "size", "is_floating_point")
