"""A drop-in for MosaicML Composer's functional ``apply_stochastic_depth``.

Composer's version rewrites torchvision ``Bottleneck`` modules of ResNet-50/101/152 only, and
cannot be installed beside current torch. This one takes the same arguments, works on any residual
network, and, like Composer's, changes ``model`` in place (the blocks it gates are replaced in
their parents; the parameters are the same objects, so existing optimizers stay valid):

>>> import torchvision, fxsd
>>> model = torchvision.models.resnet50()
>>> _ = fxsd.apply_stochastic_depth(model, target_layer_name="Bottleneck",
...                                 stochastic_method="block", drop_rate=0.2,
...                                 drop_distribution="linear")
>>> len(fxsd.gates(model))
16
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable
from dataclasses import fields
from typing import Any

from torch import nn

from fxsd.analysis.sites import ResidualSite
from fxsd.arguments import check_bool, check_choice, check_int, check_rate, close_matches
from fxsd.decisions.distributions import check_distribution
from fxsd.decisions.plan import Options
from fxsd.errors import InvalidArgumentError, InvalidTypeError, NoResidualSitesWarning
from fxsd.record import get_record
from fxsd.runtime.accessors import gates
from fxsd.runtime.gate import MODES
from fxsd.training.schedulers import DropWarmup
from fxsd.transform import stochastic_depth

__all__ = ["apply_stochastic_depth"]

# what apply_stochastic_depth sets itself: the rest of stochastic_depth's options pass through
_OPTION_NAMES = frozenset(f.name for f in fields(Options))
_SET_HERE = ("model", "drop_rate", "distribution", "mode", "sync_ranks", "seed", "select",
             "inplace")


def apply_stochastic_depth(
    model: nn.Module,
    target_layer_name: str | None = None,
    stochastic_method: str = "block",
    drop_rate: float | None = 0.2,
    drop_distribution: str = "linear",
    use_same_gpu_seed: bool = True,
    optimizers: Any = None,
    *,
    drop_warmup: float = 0.0,
    total_steps: int | None = None,
    seed: int | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Composer's ``apply_stochastic_depth``: gate ``model`` in place and return it.

    Accepts the arguments of Composer's functional APIs, current and older:
    ``(model, target_layer_name, stochastic_method, drop_rate, drop_distribution,
    use_same_gpu_seed, optimizers)``, and the oldest order ``(model, stochastic_method,
    target_layer_name, ...)``, recognised when ``target_layer_name`` is ``"block"`` or
    ``"sample"`` and ``stochastic_method`` is not. ``drop_warmup`` (Composer's algorithm class)
    is keyword-only here.

    Args:
        model: any model fxsd can trace (Composer: torchvision ResNets only). Changed in place.
        target_layer_name: a module class name (``"Bottleneck"``; Composer's
            ``"ResNetBottleneck"`` is read as the same). Only sites inside modules of that class
            are gated. ``None`` gates every site. A name that matches no site leaves the model
            unchanged, with a :class:`~fxsd.errors.NoResidualSitesWarning` (Composer logs a
            warning).
        stochastic_method: ``"block"`` or ``"sample"``.
        drop_rate, drop_distribution: as fxsd's ``drop_rate`` and ``distribution``; depths are
            counted over the targeted sites. A per-site ``drop_distribution`` (a sequence or
            callable) gives every rate itself: pass ``drop_rate=None`` with it.
        use_same_gpu_seed: ``sync_ranks``: the same decisions on every rank.
        drop_warmup: fraction of training to ramp the rate up over; needs ``total_steps``. The
            :class:`~fxsd.DropWarmup` is ``fxsd.get_record(model).warmup``: call its ``step()``
            once per optimizer step (Composer's trainer did this for you).
        optimizers: accepted for compatibility and not needed: the gated model holds the same
            parameter objects, so optimizers built before keep working.
        total_steps: the number of training steps, for ``drop_warmup``.
        seed, kwargs: passed to :func:`fxsd.stochastic_depth`. Scaling is Composer's, the
            paper's (``scale="eval"``: branches × (1 − p) at inference), unless ``kwargs`` says
            otherwise; load :func:`fxsd.plain_state_dict` into a plain model.
    """
    if target_layer_name in MODES and stochastic_method not in MODES:
        target_layer_name, stochastic_method = stochastic_method, target_layer_name
    _check_arguments(model, target_layer_name, stochastic_method, drop_distribution,
                     use_same_gpu_seed, drop_warmup, total_steps, kwargs)
    del optimizers
    options = dict(distribution=drop_distribution, mode=stochastic_method,
                   sync_ranks=use_same_gpu_seed, seed=seed, select=_select(target_layer_name),
                   inplace=True, **{"scale": "eval", **kwargs})
    # every option checked, against the model too, before the model is touched (the options
    # Options does not hold, such as verify=, are stochastic_depth's own to check)
    Options.validated(drop_rate, model=model, **{k: v for k, v in options.items()
                                                 if k in _OPTION_NAMES})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", NoResidualSitesWarning)
        stochastic_depth(model, drop_rate, **options)
    for w in caught:
        if issubclass(w.category, NoResidualSitesWarning) and target_layer_name is not None:
            warnings.warn(f"no residual site lies inside a module of class "
                          f"{target_layer_name!r}; {type(model).__name__} is unchanged",
                          NoResidualSitesWarning, stacklevel=2)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if drop_warmup and gates(model):
        get_record(model).warmup = DropWarmup(model, total_steps, warmup=drop_warmup)
    return model


def _select(target_layer_name: str | None) -> Callable[[ResidualSite], bool] | None:
    """The sites inside modules of class ``target_layer_name`` (Composer's ``ResNetBottleneck``
    is ``Bottleneck``); ``None``: every site."""
    if target_layer_name is None:
        return None
    wanted = {target_layer_name, target_layer_name.removeprefix("ResNet")}

    def select(site: ResidualSite) -> bool:
        return any(cls in wanted for _, cls in site.scope) or site.module_type in wanted

    return select


def _check_arguments(model: nn.Module, target_layer_name: object, stochastic_method: object,
                     drop_distribution: object, use_same_gpu_seed: object, drop_warmup: object,
                     total_steps: object, kwargs: dict[str, Any]) -> None:
    """The arguments only this entry has (or names its own way), by the names it gives them;
    :meth:`fxsd.decisions.plan.Options.validated` checks the rest as :func:`fxsd.stochastic_depth`
    does."""
    if not isinstance(model, nn.Module):
        raise InvalidTypeError(
            f"apply_stochastic_depth expects an nn.Module, got {type(model).__name__}")
    if target_layer_name is not None and not isinstance(target_layer_name, str):
        raise InvalidTypeError(f"target_layer_name must be a module class name (a str) or None, "
                               f"got {target_layer_name!r}")
    check_choice(stochastic_method, "stochastic_method", MODES)
    check_distribution(drop_distribution, "drop_distribution")
    check_bool(use_same_gpu_seed, "use_same_gpu_seed")
    if check_rate(drop_warmup, "drop_warmup") and total_steps is None:
        raise InvalidArgumentError(
            "drop_warmup needs total_steps=<number of training steps> (Composer's trainer knew "
            "it; fxsd's functional API cannot), or build fxsd.DropWarmup yourself"
        )
    check_int(total_steps, "total_steps", minimum=1, optional=True)
    accepted = [n for n in inspect.signature(stochastic_depth).parameters if n not in _SET_HERE]
    for name in kwargs:
        if name not in accepted:
            raise InvalidTypeError(
                f"apply_stochastic_depth got an unexpected keyword argument {name!r}"
                f"{close_matches(name, accepted)}: besides its own arguments it passes these on "
                f"to fxsd.stochastic_depth: {', '.join(accepted)}")
