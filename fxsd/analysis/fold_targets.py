"""Where each branch's eval scale can be folded into weights: the analysis half of
:mod:`fxsd.runtime.folding`.

On the whole-model trace, :func:`fold_target` walks back from a branch's output through ops that
are linear in it at eval (dropout, ``nn.Identity``, drop paths, views, a product with a
parameter-only value) to a convolution, linear layer, affine norm (also in functional form) or a
``MultiheadAttention``'s ``out_proj``, used nowhere else in the model. The decision step records
the result on each gate (``gate.info.fold``); :func:`fxsd.plain_state_dict` folds with it.
"""

from __future__ import annotations

import operator
import weakref

import torch
from torch import nn
from torch.fx import Graph, GraphModule, Node

from fxsd.analysis.sites import ResidualSite
from fxsd.runtime.folding import FoldTarget
from fxsd.tracing.drop_paths import is_drop_path
from fxsd.tracing.ops import (
    NOT_DROPOUT,
    depends_on_input,
    dropout_training,
    is_metadata_read,
    is_module,
    is_view,
    resolve_attr,
)

__all__ = ["fold_target"]

_WEIGHTED = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm, nn.LayerNorm,
             nn.GroupNorm)
_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
             nn.FeatureAlphaDropout, nn.Identity)
_MULS = {operator.mul, torch.mul, torch.Tensor.mul}
# functional forms of weighted ops (a module inlined by the trace, such as GPT-2's ``Conv1D``:
# ``torch.addmm(self.bias, x, self.weight)``): where each takes its weight and bias
_FUNCTIONAL_WEIGHTED = {
    torch.addmm: (2, 0), torch.nn.functional.linear: (1, 2), torch.nn.functional.conv1d: (1, 2),
    torch.nn.functional.conv2d: (1, 2), torch.nn.functional.conv3d: (1, 2),
}


def fold_target(gm: GraphModule, site: ResidualSite) -> FoldTarget:
    """Where ``site``'s eval scale can be folded, read on the whole-model graph ``gm``."""
    node = site.branch_output
    while True:
        if node.op == "call_module":
            module = gm.get_submodule(str(node.target))
            if isinstance(module, _DROPOUTS) or is_drop_path(module):
                node = node.args[0]
                continue
            if isinstance(module, _WEIGHTED) and getattr(module, "weight", None) is not None:
                return _only_use(gm, node, str(node.target), False)
            return FoldTarget(problem=f"its branch ends in '{node.name}' "
                                      f"({type(module).__name__})")
        if node.op == "call_function" and node.target is operator.getitem \
                and node.args[1] == 0 and isinstance(node.args[0], Node) \
                and node.args[0].op == "call_module" and isinstance(
                    gm.get_submodule(str(node.args[0].target)), nn.MultiheadAttention):
            attention = node.args[0]
            return _only_use(gm, attention, f"{attention.target}.out_proj", False)
        if _is_dropout(node) or is_view(node):  # identities at eval, and views: linear
            node = node.args[0]
            continue
        if node.op == "call_function" and node.target in _FUNCTIONAL_WEIGHTED:
            return _functional_target(gm, node)
        if node.target in _MULS or (node.op == "call_method" and node.target == "mul"):
            scaled = _parameter_factor(gm, node)
            if scaled is not None:
                return scaled
        return FoldTarget(problem=f"its branch ends in '{node.name}' ({node.op} "
                                  f"{getattr(node.target, '__name__', node.target)})")


def _is_dropout(node: Node) -> bool:
    """A functional dropout that is the identity at eval (a dropout fixed to training mode is
    not)."""
    training = dropout_training(node)
    return training is not NOT_DROPOUT and training is not True


def _functional_target(gm: GraphModule, node: Node) -> FoldTarget:
    """``torch.addmm(bias, x, weight)``, ``F.linear(x, weight, bias)``, ...: fold into the
    module owning both, when they are all of that module's parameters and used only here."""
    weight_at, bias_at = _FUNCTIONAL_WEIGHTED[node.target]
    reads = [a for i, a in enumerate(node.args) if i in (weight_at, bias_at)]
    reads += [node.kwargs[k] for k in ("weight", "bias") if k in node.kwargs]
    reads = [r for r in reads if r is not None]
    paths = {str(r.target) for r in reads if isinstance(r, Node) and r.op == "get_attr"}
    owner = next(iter(paths)).rpartition(".")[0] if paths else ""
    if (len(paths) != len(reads) or {p.rpartition(".")[0] for p in paths} != {owner}
            or paths != {f"{owner}.{name}" for name, _
                         in gm.get_submodule(owner).named_parameters(recurse=False)}):
        return FoldTarget(problem=f"its branch ends in '{node.name}' (call_function "
                                  f"{getattr(node.target, '__name__', node.target)}) whose "
                                  "weight and bias are not one module's own parameters")
    if _use_count(gm, owner) != len(paths) or len(node.users) > 1 \
            or any(len(r.users) > 1 for r in reads):
        return FoldTarget(problem=f"'{owner}' is used elsewhere in the model too")
    return FoldTarget(owner, False)


def _parameter_factor(gm: GraphModule, node: Node) -> FoldTarget | None:
    """``x * gamma`` with ``gamma`` a parameter (through views): fold into ``gamma``."""
    for factor in node.args[:2]:
        if not isinstance(factor, Node) or depends_on_input(factor):
            continue
        param = factor
        while is_view(param) and isinstance(param.args[0], Node):
            param = param.args[0]
        if param.op == "get_attr" and isinstance(resolve_attr(gm, str(param.target)), nn.Parameter):
            return _only_use(gm, param, str(param.target), True)
    return None


def _only_use(gm: GraphModule, node: Node, path: str, is_parameter: bool) -> FoldTarget:
    """``path`` as the target, unless something else in the model uses it too."""
    # nodes reading path or something inside it, plus nodes reading a module that holds it
    if _use_count(gm, path) != 1 or (not is_parameter and len(node.users) > 1
                                     and not _is_attention(gm, node)):
        return FoldTarget(problem=f"'{path}' is used elsewhere in the model too")
    return FoldTarget(path, is_parameter)


_USES: weakref.WeakKeyDictionary[Graph, tuple[int, dict[str, int], dict[str, int]]] = \
    weakref.WeakKeyDictionary()


def _use_count(gm: GraphModule, path: str) -> int:
    """How many nodes read ``path`` or something inside it, or a module that holds it."""
    exact, under = _target_uses(gm)
    atoms = path.split(".")
    return under.get(path, 0) + sum(exact.get(".".join(atoms[:i]), 0)
                                    for i in range(1, len(atoms)))


def _target_uses(gm: GraphModule) -> tuple[dict[str, int], dict[str, int]]:
    """For the module and attribute targets of ``gm``'s graph: how many nodes read each one
    exactly, and how many read it or something inside it (counted once per graph: the fold
    targets of all sites are looked up in the same whole-model graph). A module read as a value
    (handed to an attention kernel, or to ``if_training`` for its flag) is not a use of its
    weights, nor is a read of a weight's dtype or shape (T5 casts to ``self.wo.weight.dtype``)."""
    graph = gm.graph
    size = len(graph.nodes)
    cached = _USES.get(graph)
    if cached is not None and cached[0] == size:
        return cached[1], cached[2]
    exact: dict[str, int] = {}
    under: dict[str, int] = {}
    for n in graph.nodes:
        if n.op == "call_module" or (n.op == "get_attr" and not is_module(gm, str(n.target))
                                     and not all(is_metadata_read(u) for u in n.users)):
            target = str(n.target)
            exact[target] = exact.get(target, 0) + 1
            atoms = target.split(".")
            for i in range(1, len(atoms) + 1):
                key = ".".join(atoms[:i])
                under[key] = under.get(key, 0) + 1
    _USES[graph] = (size, exact, under)
    return exact, under


def _is_attention(gm: GraphModule, node: Node) -> bool:
    return node.op == "call_module" and isinstance(gm.get_submodule(str(node.target)),
                                                   nn.MultiheadAttention)
