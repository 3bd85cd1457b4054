"""A drop-in for MosaicML Composer's functional ``apply_stochastic_depth``.

Composer's version rewrites torchvision ``Bottleneck`` modules of ResNet-50/101/152 only, and
cannot be installed beside current torch. This one takes the same arguments and works on any
residual network:

>>> import torchvision, fxsd
>>> model = torchvision.models.resnet50()
>>> gm = fxsd.apply_stochastic_depth(model, target_layer_name="Bottleneck",
...                                  stochastic_method="block", drop_rate=0.2,
...                                  drop_distribution="linear")
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.fx import GraphModule

from fxsd.errors import InvalidArgumentError
from fxsd.passes.stochastic_depth import stochastic_depth
from fxsd.residuals import ResidualSite
from fxsd.training import DropWarmup, gates

__all__ = ["apply_stochastic_depth"]


def apply_stochastic_depth(
    model: nn.Module,
    target_layer_name: str | None = None,
    stochastic_method: str = "block",
    drop_rate: float = 0.2,
    drop_distribution: str = "linear",
    drop_warmup: float = 0.0,
    use_same_gpu_seed: bool = True,
    *,
    total_steps: int | None = None,
    seed: int | None = None,
    **kwargs: Any,
) -> GraphModule:
    """Composer's ``apply_stochastic_depth``, returning the transformed ``GraphModule``.

    Args:
        model: any model fxsd can trace (Composer: torchvision ResNets only).
        target_layer_name: a module class name (``"Bottleneck"``; Composer's
            ``"ResNetBottleneck"`` is accepted as the same). Only sites inside modules of that
            class are gated; ``None`` gates every site.
        stochastic_method: ``"block"`` or ``"sample"``.
        drop_rate, drop_distribution: as fxsd's ``drop_rate`` and ``distribution``; depths are
            counted over the targeted sites.
        drop_warmup: fraction of training to ramp the rate up over; needs ``total_steps``. The
            :class:`~fxsd.DropWarmup` is stored as ``gm.meta["fxsd_warmup"]``: call its ``step()``
            once per optimizer step (Composer's trainer did this for you).
        use_same_gpu_seed: ``sync_ranks``: the same decisions on every rank.
        total_steps: the number of training steps, for ``drop_warmup``.
        seed, kwargs: passed to :func:`fxsd.stochastic_depth`. Composer's ``scale`` semantics is
            the paper's (``scale="eval"``), the default.
    """
    if drop_warmup and total_steps is None:
        raise InvalidArgumentError(
            "drop_warmup needs total_steps=<number of training steps> (Composer's trainer knew "
            "it; fxsd's functional API cannot), or build fxsd.DropWarmup yourself"
        )
    select = None
    if target_layer_name is not None:
        wanted = {target_layer_name, target_layer_name.removeprefix("ResNet")}

        def select(site: ResidualSite) -> bool:
            return _inside(site, wanted)

    gm = stochastic_depth(model, drop_rate, distribution=drop_distribution,
                          mode=stochastic_method, sync_ranks=use_same_gpu_seed, seed=seed,
                          select=select, **kwargs)
    if target_layer_name is not None and not gates(gm):
        raise InvalidArgumentError(
            f"no residual site lies inside a module of class {target_layer_name!r}")
    if drop_warmup:
        gm.meta["fxsd_warmup"] = DropWarmup(gm, total_steps, warmup=drop_warmup)
    return gm


def _inside(site: ResidualSite, wanted: set[str]) -> bool:
    stack = site.add.meta.get("nn_module_stack") or {}
    for value in stack.values():
        cls = value[1] if isinstance(value, tuple) and len(value) > 1 else None
        name = cls if isinstance(cls, str) else getattr(cls, "__name__", "")
        if name.rsplit(".", 1)[-1] in wanted:
            return True
    return site.module_type in wanted
