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

import warnings
from typing import Any

from torch import nn

from fxsd.errors import InvalidArgumentError
from fxsd.passes.stochastic_depth import NoResidualSitesWarning, stochastic_depth
from fxsd.record import get_record
from fxsd.residuals import ResidualSite
from fxsd.schedulers import DropWarmup
from fxsd.training import gates

__all__ = ["apply_stochastic_depth"]

_METHODS = ("block", "sample")


def apply_stochastic_depth(
    model: nn.Module,
    target_layer_name: str | None = None,
    stochastic_method: str = "block",
    drop_rate: float = 0.2,
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
            unchanged, with a :class:`~fxsd.NoResidualSitesWarning` (Composer logs a warning).
        stochastic_method: ``"block"`` or ``"sample"``.
        drop_rate, drop_distribution: as fxsd's ``drop_rate`` and ``distribution``; depths are
            counted over the targeted sites.
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
    if target_layer_name in _METHODS and stochastic_method not in _METHODS:
        target_layer_name, stochastic_method = stochastic_method, target_layer_name
    if drop_warmup and total_steps is None:
        raise InvalidArgumentError(
            "drop_warmup needs total_steps=<number of training steps> (Composer's trainer knew "
            "it; fxsd's functional API cannot), or build fxsd.DropWarmup yourself"
        )
    del optimizers
    select = None
    if target_layer_name is not None:
        wanted = {target_layer_name, target_layer_name.removeprefix("ResNet")}

        def select(site: ResidualSite) -> bool:
            return any(cls in wanted for _, cls in site.scope) or site.module_type in wanted

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", NoResidualSitesWarning)
        kwargs.setdefault("scale", "eval")
        stochastic_depth(model, drop_rate, distribution=drop_distribution,
                         mode=stochastic_method, sync_ranks=use_same_gpu_seed, seed=seed,
                         select=select, inplace=True, **kwargs)
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
