"""Back to the plain model: fold each gate's eval scale into the weights that end its branch.

A gated model with ``scale="eval"`` computes ``skip + (1 - p) * branch`` at inference. Loading its
``state_dict`` into the untransformed model succeeds (the keys are identical) but computes
``skip + branch``: different outputs. :func:`plain_state_dict` returns a ``state_dict`` for the
untransformed model whose eval outputs equal the gated model's: each factor ``1 - p`` is
multiplied into the last weight-bearing op of its branch, found on the whole-model trace by
walking back from the branch's output through ops that are linear in it at eval —

* dropout, ``nn.Identity`` and drop paths (identities at eval), views and reshapes;
* a product with a parameter-only value (a layer scale ``gamma * f(x)``): the factor goes into
  that parameter;

— to a convolution, linear layer or affine norm (weight and bias are scaled; also in functional
form, ``F.linear`` / ``torch.addmm`` on one module's own weight and bias), or a
``MultiheadAttention`` (its ``out_proj``). A module or parameter used anywhere else in the model
cannot take the factor. Sites that cannot be folded are listed in one :class:`FoldError`; nothing
is ever folded partially.

>>> import torch, torchvision, fxsd
>>> gated = fxsd.stochastic_depth(torchvision.models.resnet18(), 0.2, scale="eval").eval()
>>> plain = torchvision.models.resnet18().eval()
>>> _ = plain.load_state_dict(fxsd.plain_state_dict(gated))
>>> x = torch.randn(1, 3, 64, 64)
>>> torch.allclose(plain(x), gated(x), atol=1e-5)
True
"""

from __future__ import annotations

import operator
import warnings
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn
from torch.fx import Graph, GraphModule, Node

from fxsd.analysis.ops import (
    NOT_DROPOUT,
    depends_on_input,
    dropout_training,
    is_metadata_read,
    is_module,
    is_view,
    resolve_attr,
)
from fxsd.analysis.sites import ResidualSite
from fxsd.decisions.drop_paths import is_drop_path
from fxsd.errors import GraphError
from fxsd.runtime.join import branch_scale

__all__ = ["FoldTarget", "FoldError", "EvalScaledWeightsWarning", "fold_target",
           "plain_state_dict", "warn_on_save"]

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


class FoldError(GraphError):
    """Some gates' eval scale cannot be folded into weights (the message lists each site)."""


@dataclass(frozen=True)
class FoldTarget:
    """Where a branch's scale goes: a module's ``weight`` and ``bias``, or one parameter.

    Attributes:
        path: qualified name in the model (``layer1.0.bn3``, ``features.1.0.layer_scale``), or
            ``""`` when the scale cannot be folded.
        is_parameter: ``path`` names a parameter (scaled whole) rather than a module.
        problem: why the scale cannot be folded (when ``path`` is empty).
    """

    path: str = ""
    is_parameter: bool = False
    problem: str = ""


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



def plain_state_dict(model: nn.Module) -> OrderedDict[str, torch.Tensor]:
    """A ``state_dict`` for the untransformed model that computes what ``model.eval()`` computes.

    ``plain.load_state_dict(fxsd.plain_state_dict(gated))`` is the deployment path for a model
    trained with ``scale="eval"`` (Composer's and the paper's convention; not the default): each
    factor ``1 - p`` is folded into the weights
    ending its branch (see the module docstring). Gates with ``scale="train"`` or ``"none"``, and
    rate 0, need nothing. ``model`` is not changed; the tensors that change are copies.

    Raises:
        FoldError: some sites cannot be folded; the message lists each with the reason.
        InvalidArgumentError: ``model`` has no fxsd gates.
    """
    from fxsd.runtime.accessors import _gates_or_error, named_gates

    _gates_or_error(model)
    factors: dict[FoldTarget, float] = {}
    problems: list[str] = []
    for name, gate in named_gates(model).items():
        keep = branch_scale(gate.drop_rate, gate.scale, False)
        if keep == 1.0:
            continue
        target = gate.info.fold
        if target is None or not target.path:
            reason = target.problem if target is not None else "no fold target recorded"
            problems.append(f"{name} (drop rate {gate.drop_rate:g}): {reason}")
        elif target in factors:
            problems.append(f"{name}: '{target.path}' also takes another gate's scale")
        else:
            factors[target] = keep
    if problems:
        raise FoldError(
            "cannot fold the eval scale (1 - p) of these gates into weights, so no plain "
            "state_dict reproduces the gated model's eval outputs:\n  " + "\n  ".join(problems)
            + "\nTrain with scale='train' (the plain model then needs no folding), or deploy "
            "the gated model, or fxsd.strip(model) without fold_scale.")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EvalScaledWeightsWarning)
        state = OrderedDict(model.state_dict())
    for target, keep in factors.items():
        keys = [target.path] if target.is_parameter else [f"{target.path}.weight",
                                                          f"{target.path}.bias"]
        for key in keys:
            key = _state_key(state, key)
            if key is not None:
                state[key] = state[key] * keep
    return state


def _state_key(state: dict[str, torch.Tensor], key: str) -> str | None:
    """``key`` as ``state`` spells it (activation-checkpoint wrappers drop their own prefix)."""
    if key in state:
        return key
    bare = key.replace("_checkpoint_wrapped_module.", "")
    return bare if bare in state else None


class EvalScaledWeightsWarning(UserWarning):
    """A ``state_dict`` was taken of a model whose gates scale branches at inference
    (``scale="eval"``): a plain model loading it as it is computes other outputs."""


def warn_on_save(model: nn.Module) -> None:
    """Make every ``state_dict()`` of ``model`` (``save_pretrained``, ``push_to_hub``,
    ``torch.save(model.state_dict())``, checkpoints) warn while a gate scales at inference."""
    model.register_state_dict_pre_hook(_warn_eval_scaled)


def _warn_eval_scaled(module: nn.Module, prefix: str, keep_vars: bool) -> None:
    from fxsd.runtime.accessors import named_gates

    scaled = [name for name, g in named_gates(module).items()
              if g.scale == "eval" and g.drop_rate > 0]
    if scaled:
        warnings.warn(
            f"{type(module).__name__} is gated by fxsd with scale='eval' ({len(scaled)} gates, "
            f"e.g. '{scaled[0]}'): in eval it computes skip + (1 - p) * branch, the plain "
            "model skip + branch. These weights resume training of the gated model as they are; "
            "for the plain model (from_pretrained, timm, deployment) save "
            "fxsd.plain_state_dict(model) instead, or train with scale='train'.",
            EvalScaledWeightsWarning, stacklevel=3)
