"""``fxsd.show``: a gated model's code, each branch printed under the gate that runs it.

``print(block.code)`` shows a gated block with its gate calls where the adds were, and
``block.<gate>.branch.code`` each branch; ``print_readable()`` shows neither branch. ``show``
puts them together, with the same gate names as :func:`fxsd.table`:

>>> import torchvision, fxsd
>>> model = fxsd.stochastic_depth(torchvision.models.resnet18(), 0.1)
>>> print(fxsd.show(model, "layer2.0"))  # doctest: +SKIP
# layer2.0 (BasicBlock), rewritten by fxsd
def forward(self, x):
    downsample = self.downsample(x)
    residual_gate = self.residual_gate(downsample, x);  downsample = x = None
    ...
    # layer2.0.residual_gate: depth 3/8, drop rate 0.0375, projection skip; when kept it runs
    def forward(self, x):
        conv1 = self.conv1(x);  x = None
        ...
"""

from __future__ import annotations

import textwrap

from torch import nn
from torch.fx import GraphModule

from fxsd.errors import InvalidArgumentError
from fxsd.runtime.accessors import _gates_or_error, gated_blocks
from fxsd.runtime.gate import BranchGate

__all__ = ["show"]


def show(model: nn.Module, path: str | None = None) -> str:
    """The code of every gated module of ``model`` (or only of the one at ``path``), each gate's
    branch indented under it.

    Raises:
        InvalidArgumentError: ``model`` has no gates, or ``path`` names no gated module.
    """
    _gates_or_error(model)
    blocks = list(gated_blocks(model).items())
    if path is not None:
        chosen = [(name, m) for name, m in blocks if name == path]
        if not chosen:
            raise InvalidArgumentError(
                f"'{path}' is not a gated module of {type(model).__name__}; gated modules: "
                f"{sorted(name for name, _ in blocks)}")
        blocks = chosen
    return "\n\n".join(_block(name, block) for name, block in blocks)


def _block(name: str, block: GraphModule) -> str:
    lines = [f"# {name or '<root>'} ({type(block).__name__}), rewritten by fxsd",
             _code(block.code)]
    for gate in block.children():
        if not isinstance(gate, BranchGate):
            continue
        i = gate.info
        mode = "" if gate.mode == "block" else f", {gate.mode}/{gate.sample_impl}"
        lines.append(textwrap.indent(
            f"# {i.name}: depth {i.depth}/{i.num_levels}, drop rate {gate.drop_rate:.4g}, "
            f"{i.skip_kind} skip{mode}; when kept it runs\n{_code(gate.branch.code)}", "    "))
    return "\n".join(lines)


def _code(code: str) -> str:
    return code.strip("\n").rstrip()
