from __future__ import annotations

import torch
from torch import nn

import fxsd
from fxsd.runtime.accessors import gated_blocks  # noqa: F401  (the tests import it from here)


def grads(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the gradients ``model``'s parameters hold, by name (those without one left out)."""
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def called_modules(model: nn.Module) -> list[nn.Module]:
    """Every module a gated block's graph or a gate's branch calls (gates excluded)."""
    found = []
    graphs = [(block, block.graph) for block in gated_blocks(model).values()]
    graphs += [(gate.branch, gate.branch.graph) for gate in fxsd.gates(model)]
    for owner, graph in graphs:
        for n in graph.nodes:
            if n.op == "call_module":
                module = owner.get_submodule(str(n.target))
                if not isinstance(module, fxsd.runtime.gate.BranchGate):
                    found.append(module)
    return found


def branch_only_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Modules called inside some gate's branch and nowhere in a gated block's own graph."""
    trunk = {id(block.get_submodule(str(n.target))) for block in gated_blocks(model).values()
             for n in block.graph.nodes if n.op == "call_module"}
    found: dict[str, nn.Module] = {}
    for name, gate in fxsd.runtime.accessors.named_gates(model).items():
        owner = name.rpartition(".")[0]
        for n in gate.branch.graph.nodes:
            if n.op == "call_module":
                module = gate.branch.get_submodule(str(n.target))
                if id(module) not in trunk and not isinstance(module, fxsd.runtime.gate.BranchGate):
                    found[f"{owner}.{n.target}" if owner else str(n.target)] = module
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
