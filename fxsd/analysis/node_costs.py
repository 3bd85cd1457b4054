"""Shapes and FLOPs of every node, from one abstract run of the graph on fake tensors.

Nothing is computed for real and nothing the model holds changes: parameters and buffers are
swapped for fake copies for the duration of the run (:func:`fxsd.preserve.fake_weights`: so
BatchNorm's running-stat updates land on the copies, and the user's hooks are not called), and
``torch.utils.flop_counter`` counts each node's FLOPs from shapes alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import GraphModule, Interpreter, Node
from torch.utils._pytree import tree_flatten

from fxsd.errors import FxsdError, Run
from fxsd.preserve import fake_weights, run_error

__all__ = ["NodeProfile", "profile_nodes", "short_count"]


@dataclass(frozen=True)
class NodeProfile:
    """What one abstract run learned about a node.

    Attributes:
        shape: the node's tensor shape, or ``None`` when its value is not a single tensor.
        dtype: the tensor's dtype, or ``None``.
        is_tensor: whether the value is a tensor (``False`` for ints, tuples, ...).
        flops: forward FLOPs the node performs (``torch.utils.flop_counter`` counting).
        holds_tensor: whether the value is or contains a tensor (a tuple ``(x, [h, w])`` does).
    """

    shape: tuple[int, ...] | None
    dtype: torch.dtype | None
    is_tensor: bool
    flops: int
    holds_tensor: bool = True


class _Profiler(Interpreter):
    def __init__(self, gm: GraphModule, counter: Any) -> None:
        super().__init__(gm)
        self.counter = counter
        self.profiles: dict[Node, NodeProfile] = {}
        self.current: Node | None = None  # the node running (a failure names it)
        self.extra_traceback = False  # the error names the node itself, its message stays whole

    def run_node(self, n: Node) -> Any:
        self.current = n
        before = self.counter.get_total_flops()
        value = super().run_node(n)
        flops = self.counter.get_total_flops() - before
        if isinstance(value, torch.Tensor):
            prof = NodeProfile(tuple(value.shape), value.dtype, True, flops)
        else:
            holds = any(isinstance(v, torch.Tensor) for v in tree_flatten(value)[0])
            prof = NodeProfile(None, None, False, flops, holds)
        self.profiles[n] = prof
        return value

    def call_module(self, target: Any, args: Any, kwargs: Any) -> Any:
        from torch._subclasses.fake_tensor import DataDependentOutputException

        try:
            return super().call_module(target, args, kwargs)
        except DataDependentOutputException:
            # a module kept whole because its code draws on the host (fxsd.tracing.tracer) reads the
            # draw's value in training, which fake tensors do not have: its shapes are those of
            # its eval-mode run, which draws nothing
            module = self.fetch_attr(target)
            saved = [(m, m.training) for m in module.modules()]
            try:
                for m, _ in saved:
                    m.training = False
                return super().call_module(target, args, kwargs)
            finally:
                for m, training in saved:
                    m.training = training


def profile_nodes(gm: GraphModule, example_inputs: tuple[Any, ...]) -> dict[Node, NodeProfile]:
    """Run ``gm`` abstractly on ``example_inputs`` and return each node's :class:`NodeProfile`.

    Only the inputs' shapes and dtypes matter; their values are never read.

    Raises:
        ModelRunError: the model raised on inputs of these shapes (names the module and the
            node; the model's exception is chained).
    """
    from torch.utils.flop_counter import FlopCounterMode

    # in the model's own mode, as it will run (a module that draws on the host: eval, above)
    with fake_weights(gm, example_inputs, run=Run.ABSTRACT, eval_mode=False) as args:
        profiler = None
        try:
            with FlopCounterMode(display=False) as counter:
                profiler = _Profiler(gm, counter)
                profiler.run(*args)
        except FxsdError:
            raise
        except Exception as exc:
            node = profiler.current if profiler is not None else None
            shapes = [tuple(x.shape) for x in tree_flatten(example_inputs)[0]
                      if isinstance(x, torch.Tensor)]
            at = f", at node {node.name}" if node is not None else ""
            raise run_error(gm, Run.ABSTRACT, exc,
                            f" (example inputs of shapes {shapes}{at})") from exc
    return profiler.profiles


def short_count(n: int | None) -> str:
    """A FLOP or parameter count as tables print it (``4.1G``, ``25.6M``, ``812``; ``-`` for
    none)."""
    if n is None:
        return "-"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)
