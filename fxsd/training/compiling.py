"""``fxsd.compile``: torch.compile for gated models, with the drop decisions kept live.

Each :class:`~fxsd.runtime.gate.BranchGate` runs eagerly (its ``forward`` is
``torch.compiler.disable``-d): its host-side draw and the Python ``if`` that skips a branch run at
every call instead of being frozen
into a graph at trace time. :func:`compile` compiles every *branch* on its own and leaves the thin
trunk between gates (the skips, the adds' neighbours) eager: measured on CPU, compiling the trunk
too splits it into one small graph per gate whose fixed cost outweighs what compiling them gains
(docs/design.md, "torch.compile"). The number of compiled graphs is at most one per branch for
each of train and eval, independent of the number of steps; changing drop rates (warmup) never
recompiles, because only the eager gate reads the rate.

``torch.compile(model)`` also works on a gated model — correct, with live decisions and a bounded
number of graphs — but it compiles the trunk segments and leaves the branches eager.

Convolutional nets: give the model and its inputs ``torch.channels_last``, as usual for compiled
or mixed-precision conv training. Compiling a whole conv net lets inductor switch every activation
to channels-last internally (its ``layout_optimization``); compiled one by one, each branch would
instead convert its input and output at every call. On the CPU measured (docs/benchmarks.md) that
layout switch was the compiled baseline's whole gain, and channels-last took CIFAR ResNet-56's
compiled efficiency at drop rate 0.5 from 0.26 to 0.66 (linear) and from 0.79 to 0.87 (uniform).

>>> import torch, torchvision, fxsd
>>> model = fxsd.stochastic_depth(torchvision.models.resnet18(), 0.2)
>>> model = model.to(memory_format=torch.channels_last)  # conv nets; inputs too
>>> model = fxsd.compile(model)  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fxsd.runtime.accessors import _gates_or_error

__all__ = ["compile"]


def compile(model: nn.Module, **kwargs: Any) -> nn.Module:  # noqa: A001 - mirrors torch.compile
    """Compile every branch of ``model`` with ``torch.compile(**kwargs)``; return ``model``.

    Compiled branches live on their gates (``gate.compiled_branch``), outside the module tree:
    ``state_dict`` is unchanged, and ``deepcopy`` and pickling leave them out (compile again).
    """
    for gate in _gates_or_error(model):
        gate.__dict__["compiled_branch"] = torch.compile(gate.branch, **kwargs)
    return model
