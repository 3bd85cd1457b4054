"""A gated block traced again on a call its guards refuse: what
:func:`fxsd.runtime.variants.variant_for` makes when no graph of the block serves the call.

The block's original ``forward`` is traced by example on copies of the call's arguments, over a
view of the block that shares its children, parameters and buffers (the modules its own graph
calls whole stay whole), under :func:`fxsd.preserve.preserved`, with the gates computing their
branches without drawing and their random stream put back. The new trace is then gated with the
block's own gates, and the variant is its graph over the block's live children, parameters and
buffers. Tracing and gating belong to earlier steps: the runtime reaches them through the
block's record (``FxsdRecord.regate``, which the rewrite sets to
:func:`fxsd.passes.regate.trace_again`), never by importing them.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.fx import Graph

from fxsd.errors import FxsdError, GuardError
from fxsd.graph_module import (
    _GRAPH_MODULE_ATTRS,
    FxsdGraphModule,
    _source_class,
    module_from_graph,
)
from fxsd.preserve import preserved
from fxsd.runtime.gate import BranchGate
from fxsd.tracing.guards import GUARDS, is_guardable
from fxsd.tracing.ops import is_metadata_read

__all__: list[str] = []

_TABLE = "_fxsd_variants"
_AT = "root"  # the name the model's root module is traced again under


def _placeholders(graph: Graph) -> list[str]:
    """The targets of ``graph``'s placeholders (``x``, ``*args``, ``**kwargs``), in order."""
    return [str(n.target) for n in graph.nodes if n.op == "placeholder"]


def _path(block: nn.Module) -> str:
    """The block's name in its model, as its gates (or else its guards) spell it (``""``: the
    root)."""
    for module in block.children():
        if isinstance(module, BranchGate) and module.info.name:
            return module.info.name.rpartition(".")[0]
    for node in block.graph.nodes:
        if node.op == "call_function" and node.target in GUARDS and isinstance(node.args[2], str):
            return node.args[2]
    return ""


def _trace_again(block: nn.Module, values: tuple[Any, ...], path: str,
                 refused: str) -> FxsdGraphModule:
    """A variant of ``block`` for the call with these parameter values (see the module
    docstring); ``GuardError`` when it cannot be made."""
    shown = path or "<root>"
    record = block.meta.get("fxsd")
    regate = getattr(record, "regate", None)
    if regate is None:
        raise GuardError(f"'{shown}' was rewritten by fxsd for other calls than this one "
                         f"({refused}), and its record holds no way to gate a new trace of it "
                         "(a model saved by an older fxsd): transform the plain model again")
    view = _plain_view(block)
    args, kwargs = _call(_placeholders(block.graph), values)
    args, kwargs = _copied((args, kwargs), shown)
    at = path or _AT
    try:
        with _quietly(view):
            cut, drift = regate(block, view, _holder(at, view), at, args, kwargs,
                                _kept_whole(block))
    except FxsdError as exc:
        raise GuardError(f"'{shown}' was rewritten by fxsd for other calls than this one "
                         f"({refused}), and tracing it again on this call failed: {exc}") from exc
    if drift is not None:
        raise GuardError(f"'{shown}' was rewritten by fxsd for other calls than this one "
                         f"({refused}), and its trace on this call is not what it runs: {drift}")
    return _variant_module(block, view, cut)


def _holder(path: str, view: nn.Module) -> nn.Module:
    """Plain modules holding ``view`` at ``path``: the block is traced again where it was
    traced in its model, so its node names and messages are the same, and code that reads its
    own ``training`` flag stays switchable (as for any module traced under a prefix)."""
    *parents, name = path.split(".")
    root = node = nn.Module()
    for atom in parents:
        node._modules[atom] = nn.Module()
        node = node._modules[atom]
    node._modules[name] = view
    return root


def _call(names: Sequence[str], values: Sequence[Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The positional and keyword arguments that give ``forward`` these parameter values."""
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    keyword = False
    for name, value in zip(names, values):
        if name.startswith("**"):
            kwargs.update(value)
        elif name.startswith("*"):
            args.extend(value)
            keyword = True
        elif keyword:
            kwargs[name] = value
        else:
            args.append(value)
    return tuple(args), kwargs


def _detached_memo(value: Any, limit: int = 8) -> dict[int, Any]:
    """A ``deepcopy`` memo giving each tensor autograd computed that ``value`` holds (through
    containers and attributes, ``limit`` levels deep) a detached copy: such a tensor refuses
    ``deepcopy``, and a cache filled under autograd (a ``DynamicCache`` after a training
    forward) holds nothing else."""
    memo: dict[int, Any] = {}
    seen: set[int] = set()
    todo = [(value, 0)]
    while todo:
        item, depth = todo.pop()
        if id(item) in seen or depth > limit or isinstance(item, nn.Module):
            continue
        seen.add(id(item))
        if isinstance(item, torch.Tensor):
            if not item.is_leaf:
                memo[id(item)] = item.detach().clone()
                memo.setdefault(id(memo), []).append(item)  # deepcopy's keep-alive convention
            continue
        inside = item.values() if isinstance(item, dict) else item if isinstance(
            item, (list, tuple, set)) else vars(item).values() if hasattr(item, "__dict__") \
            else ()
        todo.extend((v, depth + 1) for v in inside)
    return memo


def _copied(value: Any, path: str) -> Any:
    """A copy of a call's arguments that tracing may run on and change (a cache fills up)."""
    if isinstance(value, torch.Tensor):
        copied = value.detach().clone()
        return copied.requires_grad_() if value.requires_grad else copied
    if is_guardable(value) or isinstance(value, nn.Module):
        return value
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(_copied(v, path) for v in value))
    if isinstance(value, (tuple, list)):
        return type(value)(_copied(v, path) for v in value)
    if type(value) is dict:
        return {k: _copied(v, path) for k, v in value.items()}
    try:
        return copy.deepcopy(value, _detached_memo(value))
    except Exception as exc:  # noqa: BLE001 - whatever deepcopy raises, the answer is the same
        raise GuardError(
            f"'{path}' must be traced again by fxsd for a call its trace did not see, on a copy "
            f"of its arguments, but a {type(value).__name__} cannot be copied ({exc})") from exc


def _plain_view(block: nn.Module) -> nn.Module:
    """An instance of the block's original class over the block's own children, parameters and
    buffers, without its gates and hooks: what is traced again."""
    source = _source_class(type(block))
    view = source.__new__(source)
    state = {k: v for k, v in block.__dict__.items()
             if k not in _GRAPH_MODULE_ATTRS and k != _TABLE}
    for name, value in state.items():
        if name.endswith(("_hooks", "_hooks_with_kwargs", "_hooks_always_called")):
            state[name] = type(value)()
    state["_modules"] = type(block._modules)(
        (k, m) for k, m in block._modules.items() if not isinstance(m, BranchGate))
    view.__dict__.update(state)
    return view


def _kept_whole(block: nn.Module) -> list[Any]:
    """The modules the block's graph (and its gates' branches) call whole: leaves again, so the
    new trace sees what the first one saw. Gated blocks inside are leaves too."""
    kept: dict[int, nn.Module] = {}
    owners = [block, *(g.branch for g in block.children() if isinstance(g, BranchGate))]
    for owner in owners:
        for node in owner.graph.nodes:
            if node.op == "call_module":
                module = owner.get_submodule(str(node.target))
                if not isinstance(module, BranchGate):
                    kept[id(module)] = module
    return [*kept.values(), FxsdGraphModule, BranchGate]


@contextlib.contextmanager
def _quietly(view: nn.Module) -> Iterator[None]:
    """Run the body leaving the model as it was: buffers, attributes, global generators (see
    :func:`fxsd.preserve.preserved`) and the gates' random stream; gates inside compute their
    branches without drawing (nor recording decisions for a checkpoint's replay)."""
    gates = [m for m in view.modules() if isinstance(m, BranchGate)]
    samplers = {id(g.sampler): (g.sampler, g.sampler.get_state()) for g in gates}
    with preserved(view), torch.no_grad():
        for gate in gates:
            gate.__dict__["forward"] = _undrawn(gate)
        try:
            yield
        finally:
            for gate in gates:
                gate.__dict__.pop("forward", None)
            for sampler, state in samplers.values():
                sampler.set_state(state)


def _undrawn(gate: BranchGate) -> Callable[..., Any]:
    """``gate``'s forward while tracing again: the branch always runs, nothing is drawn."""
    return gate.undrawn


def _variant_module(block: nn.Module, view: nn.Module, cut: Any) -> FxsdGraphModule:
    """The variant: ``cut``'s graph over the block's own (live) children, parameters and
    buffers, with its gate views and constants as plain attributes."""
    for node in reversed(cut.graph.nodes):  # shape reads left behind by the branches
        if not node.users and is_metadata_read(node):
            cut.graph.erase_node(node)
    for node in cut.graph.nodes:  # the guards name the block in the model
        if node.op == "call_function" and node.target in GUARDS:
            node.args = (node.args[0], node.args[1], _path(block), *node.args[3:])
    cut.graph.lint()
    module = module_from_graph(view, cut.graph, keep_class=False)
    module.__dict__.update(_parameters=block._parameters, _buffers=block._buffers,
                           _modules=block._modules)
    module.__dict__.update(cut.extra_attrs)
    return module
