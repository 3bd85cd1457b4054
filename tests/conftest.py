from __future__ import annotations

import torch
from torch import nn

import fxsd


def grads(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the gradients ``model``'s parameters hold, by name (those without one left out)."""
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def branch_only_modules(gm: torch.fx.GraphModule) -> dict[str, nn.Module]:
    """Modules called inside some gate's branch and nowhere in the main graph."""
    main = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    found: dict[str, nn.Module] = {}
    for gate in fxsd.gates(gm):
        for n in gate.branch.graph.nodes:
            if n.op == "call_module":
                target = str(n.target)
                module = gm.get_submodule(target)
                if target not in main and not isinstance(module, fxsd.BranchGate):
                    found[target] = module
    return found


class CallCounter:
    """Counts forward calls of a set of modules through forward hooks."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.calls = dict.fromkeys(modules, 0)
        self.handles = [m.register_forward_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name: str):
        def hook(module, args, output):
            self.calls[name] += 1

        return hook

    def ran(self) -> list[str]:
        return [name for name, n in self.calls.items() if n]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class DropPath(nn.Module):
    """timm's shape: a parameter-free module with ``drop_prob``, rows dropped and rescaled."""

    def __init__(self, drop_prob: float = 0.5) -> None:
        super().__init__()
        self.drop_prob = drop_prob
        self.scale_by_keep = True

    def forward(self, x):
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1 - self.drop_prob
        return x * x.new_empty((x.shape[0], 1)).bernoulli_(keep) / keep
