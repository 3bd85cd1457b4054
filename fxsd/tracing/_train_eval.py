"""Training-aware tracing: code that reads ``self.training`` keeps following the model's mode.

A trace evaluates ``if self.training`` and ``dropout_p=p if self.training else 0.0`` once, so
the graph would keep the mode the model had when traced. :func:`_trace_training_aware` traces a
second time with every module's flag flipped and compares the two graphs module by module: a
constant that differs becomes an :func:`~fxsd.tracing.tracer.if_training` call (defined in
:mod:`fxsd.tracing.tracer`, where generated code finds it), a module whose ops differ otherwise is
traced again as a live leaf, and a traced module's own mode-dependent code is guarded
(:func:`_guard_mode`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.fx.node import map_aggregate

from fxsd.arguments import LeafSpec
from fxsd.graph_module import wrapped_call
from fxsd.tracing.calls import ModuleCall, calls_of
from fxsd.tracing.guards import check_argument
from fxsd.tracing.ops import MISMATCH, zip_arguments
from fxsd.tracing.tracer import (
    FxsdTracer,
    Modes,
    _functional_drop_path,
    _symbolic_trace,
    if_training,
)

__all__ = ["mode_choices"]

# Each round of the training-aware trace that does not converge makes at least one more module a
# live leaf and costs two full traces; a bound keeps a pathological model from looping.
MAX_MODE_ROUNDS = 8


def _trace_training_aware(
    model: nn.Module, leaves: Sequence[LeafSpec], concrete_args: dict[str, Any] | None,
    make_tracer: Callable[[Sequence[LeafSpec]], FxsdTracer] = FxsdTracer, prefix: str = "",
    modes: Modes = Modes.BOTH,
) -> tuple[fx.Graph, dict[str, Any], list[str], list[ModuleCall], bool | None]:
    """Trace so that code reading ``self.training`` keeps following ``.train()``/``.eval()``.

    Tracing evaluates ``if self.training`` and ``dropout_p=p if self.training else 0.0`` once, so
    the graph would keep the mode the model had when traced (attention dropout in timm,
    Hugging Face and torchvision's Swin is written like this). fxsd traces a second time with
    every module's flag flipped and compares the two graphs module by module:

    * where a module's ops differ only in constant arguments (``dropout_p``), the constant becomes
      ``if_training(module, train_value, eval_value)``, read at run time;
    * a module whose ops differ otherwise (``if self.training: x = f(x)``) is re-traced as a
      leaf, which reads its flag at run time; those are listed in ``live_leaves``.

    ``prefix`` is the traced module's qualified name in its model (``""`` for the root).
    ``modes`` other than ``Modes.BOTH`` trace once, in one mode, merging nothing.
    """
    if modes is not Modes.BOTH:
        with _modes_flipped(model, modes is Modes.FLIPPED):
            graph, extras, calls = _symbolic_trace(model, make_tracer(leaves), concrete_args)
        return graph, extras, [], calls, None
    leaves = list(leaves)
    live: list[str] = []
    own_mode: bool | None = None
    for _ in range(MAX_MODE_ROUNDS):
        graph, extras, calls = _symbolic_trace(model, make_tracer(leaves), concrete_args)
        with _modes_flipped(model):
            flipped, _, flipped_calls = _symbolic_trace(model, make_tracer(leaves),
                                                        concrete_args)
        a, b = _scope_signatures(graph, calls), _scope_signatures(flipped, flipped_calls)
        differing = {p for p in a.keys() | b.keys() if a.get(p) != b.get(p)}
        if not differing:
            break
        reshaped = {p for p in differing if _ops(a.get(p)) != _ops(b.get(p))}
        if not reshaped and ("" not in differing or prefix) \
                and _merge_modes(graph, flipped, calls, prefix, model.training):
            break
        if "" in differing:  # the traced module's own code: right in this mode only
            own_mode = model.training
        kept = sorted((reshaped or differing) - {""})
        if not kept:
            break
        leaves += kept
        live += kept
    return graph, extras, live, calls, own_mode


@contextmanager
def _modes_flipped(model: nn.Module, flip: bool = True) -> Iterator[None]:
    """Every module of ``model`` in the other training mode (when ``flip``), until exit."""
    modes = [(m, m.training) for m in model.modules()] if flip else []
    try:
        for m, mode in modes:
            m.training = not mode
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def mode_choices(gm: fx.GraphModule, model: nn.Module) -> dict[fx.Node, Any] | None:
    """Where ``gm`` (traced with ``Modes.BOTH``) differs between the two training modes: each
    :func:`~fxsd.tracing.tracer.if_training` node with the value it takes in the modes the
    modules of ``model`` are in now, so that ``gm`` can be compared with one trace in those
    modes. ``None`` when its modes differ otherwise (a module kept whole for its flag, a guard on
    the traced module's own flag)."""
    record = gm.meta.get("fxsd")
    if getattr(record, "live_leaves", ()):
        return None
    choices: dict[fx.Node, Any] = {}
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        if n.target is check_argument and n.args[3] == "self.training":
            return None
        if n.target is if_training:
            flag = n.args[0]
            training = flag if isinstance(flag, bool) else model.get_submodule(
                str(flag.target)).training
            choices[n] = n.args[1] if training else n.args[2]
    return choices


def _guard_mode(graph: fx.Graph, path: str, mode: bool) -> None:
    """Guard the traced module's own ``training`` flag: its code took ``mode``'s branches
    (``if self.training: x = x.contiguous()``), so the graph is right in that mode only. In
    the other mode the guard refuses the call; a rewritten module then traces itself again for
    it (:mod:`fxsd.runtime.variants`), so its own mode-dependent code keeps following
    ``.train()``/``.eval()``."""
    first = next(n for n in graph.nodes if n.op != "placeholder")
    with graph.inserting_before(first):
        flag = graph.get_attr(f"{path}.training" if path else "training")
        wrapped_call(graph, check_argument, (flag, mode, path, "self.training"))


def _ops(signature: list[Any] | None) -> list[Any] | None:
    return None if signature is None else [(op, target) for op, target, _, _ in signature]


def _merge_modes(graph: fx.Graph, flipped: fx.Graph, calls: list[ModuleCall], prefix: str,
                 training: bool) -> bool:
    """Replace each constant argument of ``graph`` that differs in ``flipped`` by an
    :func:`if_training` of the module whose code chose it. ``False`` (``graph`` unchanged) when
    the two graphs do not pair up node for node."""
    edits = _mode_edits(graph, flipped, calls, prefix, training)
    if edits is None:
        return False
    reads = _FlagReads(graph)
    for node, args, kwargs in edits:
        with graph.inserting_before(node):
            def choose(value: Any, node: fx.Node = node) -> Any:
                if isinstance(value, _Choice):
                    choice = wrapped_call(
                        graph, if_training, (reads.of(value.module), value.train, value.eval))
                    choice.meta["fxsd"] = node.meta.get("fxsd")
                    return choice
                return value

            node.args = map_aggregate(args, choose)
            node.kwargs = map_aggregate(kwargs, choose)
    return True


def _mode_edits(graph: fx.Graph, flipped: fx.Graph, calls: list[ModuleCall], prefix: str,
                training: bool) -> list[tuple[fx.Node, Any, Any]] | None:
    """Each node of ``graph`` whose constant arguments differ in ``flipped``, with its arguments
    where those constants are :class:`_Choice` s; ``None`` when the graphs do not pair up."""
    nodes, others = list(graph.nodes), list(flipped.nodes)
    if len(nodes) != len(others) or any(
            x.op != y.op or x.target != y.target for x, y in zip(nodes, others)):
        return None
    pair = dict(zip(others, nodes))
    edits: list[tuple[fx.Node, Any, Any]] = []
    for x, y in zip(nodes, others):
        chain = calls_of(x)
        owner = calls[chain[-1]].path if chain else prefix
        diffs: list[Any] = []
        args = _merged(x.args, y.args, pair, owner, training, diffs)
        kwargs = _merged(x.kwargs, y.kwargs, pair, owner, training, diffs)
        if args is MISMATCH or kwargs is MISMATCH:
            return None
        if diffs:
            if not owner:
                return None
            edits.append((x, args, kwargs))
    return edits


def _merged(u: Any, v: Any, pair: dict[fx.Node, fx.Node], owner: str, training: bool,
            diffs: list[Any]) -> Any:
    """One argument of a node in the two modes: the same, a :class:`_Choice` between two
    constants (recorded in ``diffs``), or ``MISMATCH``."""
    def leaf(x: Any, y: Any) -> Any:
        if isinstance(x, fx.Node) or isinstance(y, fx.Node):
            return x if isinstance(y, fx.Node) and pair.get(y) is x else MISMATCH
        if type(x) is type(y) and (x is y or (not isinstance(x, torch.Tensor) and x == y)):
            return x
        diffs.append((x, y))
        return _Choice(owner, *((x, y) if training else (y, x)))

    return zip_arguments(u, v, leaf)


class _FlagReads:
    """One ``get_attr`` read of each module whose flag a graph uses, after its last placeholder
    (guards on arguments may sit between placeholders)."""

    def __init__(self, graph: fx.Graph) -> None:
        self.graph = graph
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        self.anchor = placeholders[-1] if placeholders else None
        self.reads: dict[str, fx.Node] = {}

    def of(self, path: str) -> fx.Node:
        if path not in self.reads:
            if self.anchor is None:
                with self.graph.inserting_before(next(iter(self.graph.nodes))):
                    self.reads[path] = self.anchor = self.graph.get_attr(path)
            else:
                with self.graph.inserting_after(self.anchor):
                    self.reads[path] = self.anchor = self.graph.get_attr(path)
        return self.reads[path]


@dataclass(frozen=True)
class _Choice:
    module: str
    train: Any
    eval: Any


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
