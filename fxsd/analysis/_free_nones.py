"""Which ``None`` arguments of a module traced by example stay inputs.

A recorded call often passes ``None`` (no attention mask, no cache). Fixed to a constant, it
steers the trace as it steered the example run, and a guard refuses any other value; left an
input, the block also takes a mask later, but only when the module merely passes it on: ``x is
None`` on an input is silently false. So the module is traced both ways and a ``None`` stays an
input only when the two graphs agree (:func:`_same_but_nones`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import fx, nn
from torch.fx import GraphModule

from fxsd.arguments import LeafSpec
from fxsd.errors import RandomDrawError, TraceError
from fxsd.tracing._train_eval import mode_choices
from fxsd.tracing.by_example import example_tracer
from fxsd.tracing.calls import CallTree
from fxsd.tracing.example_run import RecordedCall
from fxsd.tracing.guards import check_argument
from fxsd.tracing.ops import MISMATCH, zip_arguments
from fxsd.tracing.tracer import Modes, reads_flag_only, trace_calls

__all__ = ["trace_freeing_nones"]


def trace_freeing_nones(model: nn.Module, path: str, call: RecordedCall | None,
                 leaves: list[LeafSpec], autowrap: tuple[Any, ...]
                 ) -> tuple[GraphModule, CallTree | None]:
    """Trace the module at ``path`` (by example when ``call`` is given): bool arguments and
    dtypes stay symbolic unless Python control flow needs them; its ``None`` arguments that it
    only passes on stay inputs (:class:`_NoneSearch`), the others are constants, guarded."""
    if call is None:
        return trace_calls(model, leaf_modules=leaves, path=path, autowrap=autowrap)
    fix = False
    try:
        traced = trace_calls(model, leaf_modules=leaves, path=path,
                             tracer=example_tracer(call, model, autowrap=autowrap))
    except RandomDrawError:
        raise  # not a flag: fixing flags cannot help
    except TraceError:
        fix = True  # control flow on a flag or a dtype
        traced = trace_calls(model, leaf_modules=leaves, path=path, tracer=example_tracer(
            call, model, autowrap=autowrap, fix_flags=True))
    nones = _none_guards(traced[0].graph)
    if not nones:
        return traced
    search = _NoneSearch(model, path, call, leaves, autowrap, fix, traced, nones)
    return search.run() or traced


class _NoneSearch:
    """Which ``None`` arguments of a unit stay inputs: each candidate set is traced with those
    arguments free and kept when its graph is ``traced``'s with inputs where ``traced`` has
    ``None`` (:func:`_same_but_nones`). All of them first; else each alone, then those that
    passed alone together.

    Alone, candidates are traced in the current training mode only (compared with ``traced``'s
    constants of that mode, :func:`fxsd.tracing._train_eval.mode_choices`), and the set chosen
    is then traced in both and compared as a whole; if it fails there, the search runs again
    with every candidate traced in both modes."""

    def __init__(self, model: nn.Module, path: str, call: RecordedCall,
                 leaves: list[LeafSpec], autowrap: tuple[Any, ...], fix: bool,
                 traced: tuple[GraphModule, CallTree | None], nones: dict[str, fx.Node]
                 ) -> None:
        self.model, self.path, self.call, self.leaves = model, path, call, leaves
        self.autowrap, self.fix, self.traced, self.nones = autowrap, fix, traced, nones
        self.choices = mode_choices(traced[0], model)

    def freed(self, names: Iterable[str], modes: Modes = Modes.BOTH
              ) -> tuple[GraphModule, CallTree | None] | None:
        """The unit traced in ``modes`` with ``names`` free, if it matches ``traced``."""
        names = tuple(names)
        try:
            free = trace_calls(self.model, leaf_modules=self.leaves, path=self.path,
                               modes=modes, tracer=example_tracer(
                                   self.call, self.model, autowrap=self.autowrap,
                                   fix_flags=self.fix, free_nones=names))
        except TraceError:
            return None
        guards = {k: v for k, v in self.nones.items() if k in names}
        choices = None if modes is Modes.BOTH else self.choices
        return free if _same_but_nones(self.traced[0].graph, free[0].graph, guards,
                                       choices) else None

    def run(self) -> tuple[GraphModule, CallTree | None] | None:
        """The first candidate set that matches, traced in both modes (``None``: none does)."""
        best = self.freed(self.nones)
        if best is not None or len(self.nones) == 1:
            return best
        if self.choices is not None:
            names = [name for name in self.nones if self.freed([name], Modes.CURRENT)]
            if len(names) in (0, len(self.nones)):  # all of them together already failed
                return None
            best = self.freed(names)
            if best is not None:
                return best
        # some are only passed on, others steer the code
        singles = {name: self.freed([name]) for name in self.nones}
        names = [name for name, free in singles.items() if free is not None]
        if len(names) == 1:
            return singles[names[0]]
        if 1 < len(names) < len(self.nones):
            return self.freed(names)
        return None


def _none_guards(graph: fx.Graph) -> dict[str, fx.Node]:
    """The guards of ``None`` arguments in ``graph``, by argument name."""
    return {n.args[3]: n for n in graph.nodes
            if n.op == "call_function" and n.target is check_argument and n.args[1] is None
            and isinstance(n.args[0], fx.Node) and n.args[0].op == "placeholder"}


def _same_but_nones(fixed: fx.Graph, free: fx.Graph, nones: dict[str, fx.Node],
                    choices: dict[fx.Node, Any] | None = None) -> bool:
    """Whether ``free`` (``None`` arguments as inputs) computes what ``fixed`` does with those
    arguments fixed to ``None``: the same nodes, with the inputs where ``fixed`` has ``None``.
    With ``choices`` (``fixed``'s :func:`~fxsd.tracing.tracer.if_training` nodes and their values
    in one mode), ``free`` is one trace in that mode: each choice stands for its value."""
    choices = choices or {}
    guards = set(nones.values())
    skipped = guards | {g.args[0] for g in guards} | set(choices) | {
        n for n in fixed.nodes if n.op == "get_attr" and reads_flag_only(n)
        and all(u in choices for u in n.users)}
    a = [n for n in fixed.nodes if n not in skipped]
    b = [n for n in free.nodes if not (n.op == "placeholder" and n.target in nones)]
    if len(a) != len(b):
        return False
    pairs: dict[fx.Node, fx.Node] = {}
    free_holders = {n for n in free.nodes if n.op == "placeholder" and n.target in nones}

    def leaf(x: Any, y: Any) -> Any:
        x = choices.get(x, x) if isinstance(x, fx.Node) else x
        if isinstance(y, fx.Node) and y in free_holders:
            return x if x is None else MISMATCH
        if isinstance(x, fx.Node) or isinstance(y, fx.Node):
            return x if isinstance(x, fx.Node) and pairs.get(x) is y else MISMATCH
        return x if type(x) is type(y) and (x is y or x == y) else MISMATCH

    def same(x: Any, y: Any) -> bool:
        return zip_arguments(x, y, leaf) is not MISMATCH

    for x, y in zip(a, b):
        if x.op != y.op or x.target != y.target or not same(x.args, y.args) \
                or not same(x.kwargs, y.kwargs):
            return False
        pairs[x] = y
    return True
