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

import warnings
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from fxsd.errors import EvalScaledWeightsWarning, GraphError
from fxsd.runtime.join import branch_scale

__all__ = ["FoldTarget", "FoldError", "plain_state_dict",
           "warn_on_save"]

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
