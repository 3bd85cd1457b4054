"""Shapes and FLOPs of every node, from one abstract run of the graph on fake tensors.

Nothing is computed for real and nothing the model holds changes: parameters and buffers are
swapped for fake copies for the duration of the run (so BatchNorm's running-stat updates land on
the copies), and ``torch.utils.flop_counter`` counts each node's FLOPs from shapes alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import GraphModule, Interpreter, Node
from torch.utils._pytree import tree_flatten

from fxsd.errors import FxsdError

__all__ = ["NodeProfile", "profile_nodes"]


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

    def run_node(self, n: Node) -> Any:
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


def profile_nodes(gm: GraphModule, example_inputs: tuple[Any, ...]) -> dict[Node, NodeProfile]:
    """Run ``gm`` abstractly on ``example_inputs`` and return each node's :class:`NodeProfile`.

    Only the inputs' shapes and dtypes matter; their values are never read.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.nn.utils.stateless import _reparametrize_module
    from torch.utils.flop_counter import FlopCounterMode

    flat, _ = tree_flatten(example_inputs)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        state = dict(gm.named_parameters(remove_duplicate=False))
        state.update(gm.named_buffers(remove_duplicate=False))
        fake_state = {k: mode.from_tensor(v) for k, v in state.items()}
        fake_inputs = [mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in flat]
        _, spec = tree_flatten(example_inputs)
        from torch.utils._pytree import tree_unflatten

        args = tree_unflatten(fake_inputs, spec)
        try:
            with _reparametrize_module(gm, fake_state, tie_weights=True), \
                    FlopCounterMode(display=False) as counter:
                profiler = _Profiler(gm, counter)
                profiler.run(*args)
        except Exception as exc:
            raise FxsdError(
                f"could not run the traced model on example inputs of shapes "
                f"{[tuple(x.shape) for x in flat if isinstance(x, torch.Tensor)]}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
    return profiler.profiles
