"""``fxsd.strip``: a plain GraphModule for deployment, every gate replaced by its eval semantics.

Each gate call becomes the branch's own nodes followed by one add: ``skip + (1 - p) * branch``
written as ``torch.add(skip, branch, alpha=1 - p)`` for ``scale="eval"`` gates (the plain
``skip + branch`` for ``scale="train"``/``"none"`` and for ``p = 0``; the bare skip for ``p = 1``).
With ``fold_scale=True`` the factor ``1 - p`` is instead multiplied into the weight and bias of the
module that ends the branch (a convolution, linear layer or affine norm), so the add is plain. The
result runs exactly the eval computation of the gated model, keeps its ``state_dict`` keys, has no
Python-level control flow left and exports with ``torch.export.export``.
"""

from __future__ import annotations

import copy
import operator
from typing import Any

import torch
from torch import nn
from torch.fx import Graph, GraphModule, Node

from fxsd.gate import BranchGate
from fxsd.graph_module import mirror_module

__all__ = ["strip"]

_FOLDABLE = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm, nn.LayerNorm,
             nn.GroupNorm)


def strip(gm: GraphModule, *, fold_scale: bool = False) -> GraphModule:
    """Return ``gm`` without gates, computing what ``gm.eval()`` computes.

    Args:
        gm: a model returned by :func:`fxsd.stochastic_depth`.
        fold_scale: fold each ``1 - p`` into the weights of the module that ends its branch, where
            that module is a convolution, linear layer or affine norm called once in the model.
            The result then owns copies of the parameters (``gm`` is not changed); without
            folding it shares them with ``gm``, like the gated model shares them with its source.

    Example:
        >>> import torch, torchvision, fxsd
        >>> gm = fxsd.stochastic_depth(torchvision.models.resnet18(), 0.2)
        >>> plain = fxsd.strip(gm)
        >>> ep = torch.export.export(plain.eval(), (torch.randn(1, 3, 64, 64),))  # doctest: +SKIP
    """
    source = copy.deepcopy(gm) if fold_scale else gm
    graph = Graph()
    env: dict[Node, Any] = {}
    calls: dict[str, int] = {}
    for node in source.graph.nodes:
        env[node] = _copy_node(source, graph, env, node)
    for node in graph.nodes:
        if node.op == "call_module":
            calls[str(node.target)] = calls.get(str(node.target), 0) + 1
    if fold_scale:
        _fold(source, graph, calls)
    plain = mirror_module(source, graph, class_name=type(gm).__name__)
    for name, child in list(plain.named_children()):
        if isinstance(child, BranchGate):
            del plain._modules[name]
    plain.meta = {"fxsd_stripped": True}
    plain.eval()
    return plain


def _module(gm: GraphModule, node: Node) -> nn.Module:
    return gm.get_submodule(str(node.target))


def _lookup(env: dict[Node, Any], n: Any) -> Any:
    return env[n] if isinstance(n, Node) else n


def _copy_node(root: GraphModule, graph: Graph, env: dict[Node, Any], node: Node) -> Any:
    """Copy ``node`` into ``graph``; a gate call becomes its inlined branch and add."""
    if node.op == "call_module" and isinstance(_module(root, node), BranchGate):
        return _inline_gate(root, graph, _module(root, node), [_lookup(env, a) for a in node.args])
    return graph.node_copy(node, lambda n: _lookup(env, n))


def _inline_gate(root: GraphModule, graph: Graph, gate: BranchGate, args: list[Any]) -> Any:
    skip = args[0]
    branch_args = args if gate.identity else args[1:]
    keep = 1.0 - gate.drop_rate if gate.scale == "eval" else 1.0
    if keep == 0.0:
        return skip
    env: dict[Node, Any] = {}
    placeholders = [n for n in gate.branch.graph.nodes if n.op == "placeholder"]
    for ph, value in zip(placeholders, branch_args):
        env[ph] = value
    out: Any = None
    for node in gate.branch.graph.nodes:
        if node.op == "placeholder":
            continue
        if node.op == "output":
            out = _lookup(env, node.args[0])
            continue
        env[node] = _copy_node(root, graph, env, node)
    if keep == 1.0:
        return graph.call_function(operator.add, (skip, out))
    result = graph.call_function(torch.add, (skip, out), {"alpha": keep})
    result.meta["fxsd_fold"] = (out, keep)
    return result


def _fold(root: GraphModule, graph: Graph, calls: dict[str, int]) -> None:
    """Move each eligible ``alpha=keep`` into the weights of the module computing the branch."""
    for node in list(graph.nodes):
        fold = node.meta.pop("fxsd_fold", None)
        if fold is None:
            continue
        out, keep = fold
        if not (isinstance(out, Node) and out.op == "call_module" and len(out.users) == 1):
            continue
        module = root.get_submodule(str(out.target))
        if not isinstance(module, _FOLDABLE) or calls.get(str(out.target), 0) != 1:
            continue
        if getattr(module, "weight", None) is None:
            continue
        with torch.no_grad():
            module.weight.mul_(keep)
            if getattr(module, "bias", None) is not None:
                module.bias.mul_(keep)
        node.target = operator.add
        node.kwargs = {}
