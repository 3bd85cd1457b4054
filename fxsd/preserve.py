"""``preserved(model)``: whatever fxsd runs on a model, the model and the process come back as they
were.

Some analyses have to *run* the model: tracing by example records each module's call in one
forward (in the model's own mode, so a training-mode forward updates BatchNorm statistics and
draws dropout masks), timm's not-traceable units run on a random input, the tracer evaluates ops
on example values. None of that may leave a trace. On exit, :func:`preserved` puts back

* every buffer's values (BatchNorm's ``running_mean``, ``running_var``, ``num_batches_tracked``),
  in place, so a tensor the user holds still is the model's buffer;
* every module's attributes — its ``training`` flag, its hook registries, its child, parameter
  and buffer registries, any plain attribute a forward set or removed;
* the global random number generators: torch's CPU generator and every initialised CUDA
  device's, Python's ``random`` and, when it is imported, NumPy's legacy global generator.

While the body runs, the modules' forward and backward hooks are not called
(:func:`hooks_silenced`): they are the user's, for the user's own calls — a hook that logs
activations must not log fxsd's runs, nor see the fake tensors of its abstract ones.

Parameters are not copied (a forward without an optimizer does not write them, and copying a
large model's weights would double its memory).

Example:
    >>> import torch, torchvision
    >>> model = torchvision.models.resnet18().train()
    >>> before = {k: v.clone() for k, v in model.state_dict().items()}
    >>> with preserved(model):
    ...     _ = model(torch.randn(2, 3, 32, 32))  # updates BatchNorm statistics, for now
    >>> all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    True
"""

from __future__ import annotations

import contextlib
import random
import sys
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

__all__ = ["hooks_silenced", "preserved"]

#: The registries of the hooks a module call runs (each a dict, emptied while fxsd runs it).
_CALL_HOOKS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")


@contextlib.contextmanager
def preserved(model: nn.Module) -> Iterator[None]:
    """Run the body, then restore ``model``'s buffers and module attributes and the process's
    global random generators to what they were on entry (also when the body raises)."""
    modules = list({id(m): m for m in model.modules()}.values())
    attributes = [(m, _attributes(m)) for m in modules]
    buffers = [(m, name, b, b.detach().clone()) for m in modules
               for name, b in m._buffers.items() if b is not None]
    generators = _generator_states()
    try:
        with hooks_silenced(model):
            yield
    finally:
        for module, saved in attributes:
            _restore_attributes(module, saved)
        with torch.no_grad():
            for module, name, buffer, value in buffers:
                module._buffers[name] = buffer
                if buffer.shape != value.shape or buffer.dtype != value.dtype:
                    buffer.data = value
                elif not torch.equal(buffer, value):
                    buffer.copy_(value)
        _restore_generators(generators)


@contextlib.contextmanager
def hooks_silenced(model: nn.Module) -> Iterator[None]:
    """Run the body without calling the forward and backward hooks of ``model``'s modules.

    Each registry is emptied in place and refilled on exit, so the handles the user holds stay
    valid; hooks registered in the body (fxsd's own) are gone on exit.

    Example:
        >>> from torch import nn
        >>> import torch
        >>> layer, seen = nn.Linear(2, 2), []
        >>> handle = layer.register_forward_hook(lambda m, args, out: seen.append(out))
        >>> with hooks_silenced(layer):
        ...     _ = layer(torch.ones(1, 2))
        >>> _ = layer(torch.ones(1, 2))
        >>> len(seen)
        1
    """
    saved = [(registry, dict(registry)) for m in {id(m): m for m in model.modules()}.values()
             for name in _CALL_HOOKS if (registry := m.__dict__.get(name))]
    for registry, _ in saved:
        registry.clear()
    try:
        yield
    finally:
        for registry, contents in saved:
            registry.clear()
            registry.update(contents)


def _attributes(module: nn.Module) -> dict[str, tuple[Any, Any]]:
    """Each attribute's object and, for a dict or set (registries), a copy of its contents."""
    return {name: (value, value.copy() if isinstance(value, (dict, set)) else None)
            for name, value in module.__dict__.items()}


def _restore_attributes(module: nn.Module, saved: dict[str, tuple[Any, Any]]) -> None:
    state = module.__dict__
    for name in [n for n in state if n not in saved]:
        del state[name]
    for name, (value, contents) in saved.items():
        state[name] = value
        if contents is not None:  # in place: a hook handle holds its registry, not the module
            value.clear()
            value.update(contents)


def _generator_states() -> dict[str, Any]:
    states: dict[str, Any] = {"torch": torch.get_rng_state(), "random": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        states["numpy"] = numpy.random.get_state()
    return states


def _restore_generators(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["random"])
    if "cuda" in states:
        torch.cuda.set_rng_state_all(states["cuda"])
    if "numpy" in states:
        sys.modules["numpy"].random.set_state(states["numpy"])
