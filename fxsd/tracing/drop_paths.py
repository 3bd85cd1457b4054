"""The drop-path kinds fxsd recognises, and how to read each one's rate, mode and scaling.

A model that already drops branches at random — torchvision's ``StochasticDepth``, timm's
``DropPath`` and its many copies — does so with a module at the end of each branch. fxsd keeps
those modules as leaves while tracing (traced through, ``self.training`` would be baked in), and
the pass adopts, replaces or keeps them (``existing=``). This registry is the one place that says
what counts as a drop path, the way timm registers the modules ``torch.fx`` cannot trace:

* ``torchvision`` — ``torchvision.ops.StochasticDepth(p, mode)``: ``mode="batch"`` drops the
  whole batch (fxsd's ``"block"``), ``"row"`` per example (``"sample"``); kept rows scaled by
  ``1/(1-p)``. The functional ``torchvision.ops.stochastic_depth`` becomes such a module when
  traced (:mod:`fxsd.tracing._live_drop_path`);
* ``timm`` — any class named ``DropPath`` or ``DropPath2d``, or a parameter-free module with a
  ``drop_prob`` (or ``drop_path_prob``) attribute: per example, scaled unless
  ``scale_by_keep=False``;
* and any class registered with :func:`register_drop_path`.

Example:
    >>> import torchvision
    >>> settings = drop_path_settings(torchvision.ops.StochasticDepth(0.2, "batch"))
    >>> settings.rate, settings.mode, settings.scale
    (0.2, 'block', 'train')
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

__all__ = ["DropPathSettings", "DropPathKind", "OwnDrop", "register_drop_path", "drop_path_kind",
           "is_drop_path", "drop_path_settings", "own_drop_path"]


@dataclass(frozen=True)
class DropPathSettings:
    """What a drop-path module does: its drop ``rate``, ``mode`` (fxsd's ``"block"`` or
    ``"sample"``) and ``scale`` (``"train"`` or ``"none"``)."""

    rate: float
    mode: str
    scale: str


@dataclass(frozen=True)
class OwnDrop:
    """A drop the model already does at a residual site, as fxsd adopts it: a drop-path op at
    the end of the branch (:func:`own_drop_path`) or a layer drop around the site
    (:attr:`fxsd.tracing.layer_drop.LayerDrop.own`). Both adopt by one rule
    (:mod:`fxsd.decisions.plan`): ``settings`` are what the gate takes over, ``label`` names the
    drop in the table's note (``"DropPath(p=0.1)"``, ``"layer drop (p=0.5)"``)."""

    settings: DropPathSettings
    label: str


@dataclass(frozen=True)
class DropPathKind:
    """One kind of drop-path module: how to recognise it and read its settings (``None`` when
    they cannot be read, so the module can be kept or replaced but not adopted)."""

    name: str
    matches: Callable[[nn.Module], bool]
    settings: Callable[[nn.Module], DropPathSettings | None]


def _attribute_settings(module: nn.Module) -> DropPathSettings | None:
    """The settings of torchvision's and timm's modules, read from their attributes."""
    rate = getattr(module, "p", getattr(module, "drop_prob", getattr(module, "drop_path_prob",
                                                                       None)))
    if not isinstance(rate, (int, float)):
        return None
    mode = "block" if getattr(module, "mode", "row") == "batch" else "sample"
    scale = "train" if getattr(module, "scale_by_keep", True) else "none"
    return DropPathSettings(float(rate), mode, scale)


def _is_torchvision(module: nn.Module) -> bool:
    from torchvision.ops import StochasticDepth

    return isinstance(module, StochasticDepth) or type(module).__name__ == "StochasticDepth"


def _is_timm_like(module: nn.Module) -> bool:
    if type(module).__name__ in ("DropPath", "DropPath2d"):
        return True
    has_rate = hasattr(module, "drop_prob") or hasattr(module, "drop_path_prob")
    return has_rate and next(module.parameters(recurse=True), None) is None


_KINDS: list[DropPathKind] = [
    DropPathKind("torchvision", _is_torchvision, _attribute_settings),
    DropPathKind("timm", _is_timm_like, _attribute_settings),
]


def register_drop_path(cls: type[nn.Module],
                       settings: Callable[[nn.Module], DropPathSettings | None]) -> None:
    """Recognise instances of ``cls`` as drop paths, read with ``settings``.

    Example:
        >>> from torch import nn
        >>> class MyDrop(nn.Module):
        ...     def __init__(self, rate):
        ...         super().__init__()
        ...         self.rate = rate
        >>> register_drop_path(MyDrop, lambda m: DropPathSettings(m.rate, "sample", "train"))
        >>> is_drop_path(MyDrop(0.1))
        True
    """
    _KINDS.insert(0, DropPathKind(cls.__qualname__, lambda m: isinstance(m, cls), settings))


def drop_path_kind(module: nn.Module) -> DropPathKind | None:
    """The registered kind ``module`` is, or ``None`` when it is no drop path."""
    return next((kind for kind in _KINDS if kind.matches(module)), None)


def is_drop_path(module: nn.Module) -> bool:
    """Whether ``module`` is a drop path of a registered kind."""
    return drop_path_kind(module) is not None


def drop_path_settings(module: nn.Module) -> DropPathSettings | None:
    """The rate, mode and scaling of the drop path ``module`` (``None``: not readable)."""
    kind = drop_path_kind(module)
    return kind.settings(module) if kind is not None else None


def own_drop_path(module: nn.Module) -> OwnDrop | None:
    """The drop path ``module`` as an :class:`OwnDrop`, labelled by its class (``None``: its
    settings cannot be read, so it cannot be adopted)."""
    settings = drop_path_settings(module)
    if settings is None:
        return None
    return OwnDrop(settings, f"{type(module).__name__}(p={settings.rate:g})")
