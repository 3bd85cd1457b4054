"""A model's own training-time layer drop (LayerDrop, as Hugging Face implements it).

Hugging Face encoders and decoders (Wav2Vec2, Whisper, BART, OPT, ...) skip whole layers in
training inside the loop over their ``ModuleList`` of layers::

    if self.training and torch.rand([]) < self.layerdrop:  # or self.config.layerdrop
        continue

fxsd finds such a module by what its ``forward`` reads (the name ``layerdrop`` among its
attribute reads) and the rate it holds (``module.layerdrop`` or ``module.config.layerdrop``).
Under ``existing="adopt"`` such a drop is one of the model's own drops, adopted by the rule that
adopts drop paths (:mod:`fxsd.decisions.plan`): the joins inside its layers take its settings
(:attr:`LayerDrop.own`: its rate unless rates are explicit; block mode, unscaled as LayerDrop
is, unless ``mode``/``scale`` are given). The rewrite (:mod:`fxsd.passes.gate_residuals`)
switches the model's own loop off in the result (its module's rate set to 0) wherever fxsd gates
those layers, so nothing drops twice. ``existing="keep"`` leaves it; where the module that loops
was itself rewritten (its ``forward`` is then fxsd's traced code, which has no such loop),
:class:`~fxsd.errors.LayerDropWarning` says so.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from torch import nn

from fxsd.tracing.drop_paths import DropPathSettings, OwnDrop

__all__ = ["LayerDrop", "find_layer_drops", "layer_drop_of", "switch_off_layer_drops"]


@dataclass(frozen=True)
class LayerDrop:
    """One module that drops its layers at random in training.

    Attributes:
        path: the module whose ``forward`` loops over the layers (``""``: the root).
        rate: its layer-drop rate.
        layers: qualified names of the layers it may skip.
        attribute: where the rate lives: ``"layerdrop"`` or ``"config.layerdrop"``.
    """

    path: str
    rate: float
    layers: tuple[str, ...]
    attribute: str

    @property
    def own(self) -> OwnDrop:
        """What the joins inside its layers adopt, as a drop path's settings: its rate, one
        draw for the whole batch (``"block"``) and no rescaling (``"none"``), as LayerDrop
        does."""
        return OwnDrop(DropPathSettings(self.rate, "block", "none"),
                       f"layer drop (p={self.rate:g})")


def find_layer_drops(model: nn.Module) -> list[LayerDrop]:
    """The modules of ``model`` that implement layer drop with a rate above 0."""
    found = []
    for path, module in model.named_modules():
        forward = inspect.unwrap(type(module).forward)
        code = getattr(forward, "__code__", None)
        if code is None or "layerdrop" not in code.co_names:
            continue
        rate, attribute = _rate(module)
        prefix = f"{path}." if path else ""
        layers = tuple(f"{prefix}{name}.{i}" for name, child in module.named_children()
                       if isinstance(child, nn.ModuleList) for i in range(len(child)))
        if rate and layers:
            found.append(LayerDrop(path, rate, layers, attribute))
    return found


def _rate(module: nn.Module) -> tuple[float, str]:
    own = module.__dict__.get("layerdrop")
    if _is_rate(own):
        return float(own), "layerdrop"
    config = getattr(module, "config", None)
    value = getattr(config, "layerdrop", None)
    return (float(value), "config.layerdrop") if _is_rate(value) else (0.0, "")


def _is_rate(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= 1


def layer_drop_of(module_path: str, scope: Sequence[tuple[str, str]],
                  drops: Sequence[LayerDrop]) -> LayerDrop | None:
    """The layer drop whose layers hold a join performed in ``module_path`` (``scope``: the
    modules running at the join, as :attr:`fxsd.ResidualSite.scope` lists them)."""
    paths = {p for p, _ in scope} | {module_path}
    for drop in drops:
        if any(layer in paths or module_path.startswith(layer + ".") for layer in drop.layers):
            return drop
    return None


def switch_off_layer_drops(root: nn.Module, drops: Sequence[LayerDrop]) -> None:
    """Set each module's layer-drop rate to 0 in ``root`` (a config is copied first, so the
    model's other modules and the original model keep theirs)."""
    for drop in drops:
        module = root.get_submodule(drop.path) if drop.path else root
        if drop.attribute == "layerdrop":
            module.layerdrop = 0.0
        elif getattr(module, "config", None) is not None:
            module.config = copy.copy(module.config)
            module.config.layerdrop = 0.0


#: The layer-drop loops switched off while fxsd analyses their model (:func:`layer_drops_off`).
_OFF: weakref.WeakSet[nn.Module] = weakref.WeakSet()


@contextlib.contextmanager
def layer_drops_off(model: nn.Module) -> Iterator[list[LayerDrop]]:
    """While fxsd runs and traces ``model``, its own layer-drop loops skip nothing: a layer the
    loop skipped in the example run would not be traced, and its joins would silently not be
    gated (in training mode, a Wav2Vec2 gated 1 of its 5 joins for one seed in six). The
    modules still count as layer-drop loops for the tracer (their draw is the loop's, which
    fxsd takes over: :func:`is_layer_drop_loop`). Everything is put back on exit. Yields the
    layer drops found (rates as they were)."""
    drops = find_layer_drops(model)
    modules = [model.get_submodule(d.path) if d.path else model for d in drops]
    saved = [(m, m.__dict__.get("layerdrop", _MISSING), m.__dict__.get("config", _MISSING))
             for m in modules]
    try:
        switch_off_layer_drops(model, drops)
        _OFF.update(modules)
        yield drops
    finally:
        for module, layerdrop, config in saved:
            _OFF.discard(module)
            for name, value in (("layerdrop", layerdrop), ("config", config)):
                if value is _MISSING:
                    module.__dict__.pop(name, None)  # set by switching off: not the model's
                else:
                    module.__dict__[name] = value


_MISSING = object()


def is_layer_drop_loop(module: nn.Module) -> bool:
    """Whether ``module``'s own ``forward`` is a layer-drop loop fxsd takes over (a rate above 0,
    or switched off by :func:`layer_drops_off` while fxsd analyses it)."""
    return module in _OFF or any(drop.path == "" for drop in find_layer_drops(module))
