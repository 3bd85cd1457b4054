"""Reference models for benchmarks and tests, and the model specs the command line accepts.

:func:`cifar_resnet` is the CIFAR ResNet of He et al. (2016, section 4.2) that Huang et al. used for
stochastic depth: ``depth = 6n + 2`` layers, three stages of ``n`` basic blocks with 16, 32 and 64
channels, and parameter-free shortcuts ("option A": stride-2 subsampling and zero-padded
channels), so ``cifar_resnet(110)`` has 54 residual blocks.

:func:`load_model` builds a model from a spec: a torchvision model name (``weights=None``),
``cifar_resnet<depth>`` or ``package.module:callable`` (found from the current directory too, as
``python -m`` finds modules).
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import torch.nn.functional as F
from torch import Tensor, nn

from fxsd.errors import InvalidArgumentError, InvalidTypeError

__all__ = ["BasicBlock", "CifarResNet", "cifar_resnet", "check_cifar_depth", "check_spec",
           "load_model"]


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN branch; identity or option-A shortcut; ReLU after the add."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = stride != 1 or in_planes != planes
        self.pad = (planes - in_planes) // 2

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x
        if self.downsample:
            shortcut = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))
        return F.relu(out + shortcut)


def check_cifar_depth(depth: object, name: str = "depth") -> int:
    """``depth`` if it is a CIFAR ResNet depth ``6n + 2`` (20, 56, 110...), else a clear error."""
    if isinstance(depth, bool) or not isinstance(depth, int):
        raise InvalidTypeError(f"{name} must be an int 6n + 2 (20, 56, 110...), got {depth!r}")
    if depth < 8 or (depth - 2) % 6:
        raise InvalidArgumentError(f"CIFAR ResNet {name} must be 6n + 2 (20, 56, 110...), "
                                   f"got {depth}")
    return depth


class CifarResNet(nn.Module):
    def __init__(self, depth: int = 110, num_classes: int = 10) -> None:
        super().__init__()
        n = (check_cifar_depth(depth) - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(n):
                blocks.append(BasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)


def cifar_resnet(depth: int = 110, num_classes: int = 10) -> CifarResNet:
    """The CIFAR ResNet of the stochastic-depth paper: ``cifar_resnet(110)`` has 54 blocks.

    Example:
        >>> import fxsd
        >>> len(fxsd.find_residuals(fxsd.tools.models.cifar_resnet(110)))
        54
    """
    return CifarResNet(depth, num_classes)


def load_model(spec: str, image_size: int | None = None) -> nn.Module:
    """Build the model ``spec`` names (random weights, nothing downloaded).

    ``spec`` is ``cifar_resnet<depth>`` (the paper's CIFAR network), a torchvision model name, or
    ``package.module:callable`` returning an ``nn.Module`` (the module is looked for in the
    current directory first, as ``python -m`` does). torchvision ViTs are built for
    ``image_size`` when given (they only accept the size they were built for).

    Raises:
        InvalidArgumentError: the spec names no model (:func:`check_spec`, before anything is
            built), or its callable fails or returns something else than an ``nn.Module``.
    """
    check_spec(spec)
    if spec.startswith("cifar_resnet") and spec[len("cifar_resnet"):].isdigit():
        return cifar_resnet(int(spec[len("cifar_resnet"):]))
    if ":" in spec:
        model = _call_factory(spec)
    else:
        import torchvision

        kwargs = {"image_size": image_size} if spec.startswith("vit_") and image_size else {}
        model = torchvision.models.get_model(spec, weights=None, **kwargs)
    if not isinstance(model, nn.Module):
        raise InvalidArgumentError(f"{spec!r} returned {type(model).__name__}, not an nn.Module")
    return model


def check_spec(spec: object) -> str:
    """``spec`` if it names a model :func:`load_model` can build, checked without building it.

    ``cifar_resnet<depth>``: the depth is ``6n + 2``. A torchvision name: one of
    ``torchvision.models.list_models()``. ``package.module:callable``: the module imports (the
    current directory included) and holds a callable of that name (it is not called).

    Raises:
        InvalidArgumentError: the spec names no model (the message says what is accepted).

    Example:
        >>> check_spec("resnet5")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
            ...
        fxsd.errors.InvalidArgumentError: unknown model 'resnet5'... (did you mean 'resnet50'...
    """
    if not isinstance(spec, str) or not spec:
        raise InvalidTypeError(f"a model spec must be a non-empty string, got {spec!r}")
    prefix = "cifar_resnet"
    if spec.startswith(prefix) and spec[len(prefix):].isdigit():
        check_cifar_depth(int(spec[len(prefix):]), "depth in " + repr(spec))
        return spec
    if ":" in spec:
        _find_factory(spec)
        return spec
    import difflib

    import torchvision

    names = torchvision.models.list_models()
    if spec.lower() not in names:
        close = difflib.get_close_matches(spec.lower(), names, n=3)
        hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
        raise InvalidArgumentError(
            f"unknown model {spec!r}{hint}: give cifar_resnet<depth>, a torchvision model name "
            "(see torchvision.models.list_models()) or package.module:callable")
    return spec


@contextmanager
def _current_directory_on_path() -> Iterator[None]:
    """The current directory first on ``sys.path`` while a spec's module is imported and called.

    ``python -m`` puts it there; the ``fxsd`` script does not, so ``fxsd inspect mymodels:make``
    run next to ``mymodels.py`` would not find it. Removed again afterwards: loading a model
    leaves the process's import path as it was.
    """
    cwd = os.getcwd()
    if any(os.path.abspath(entry or os.curdir) == cwd for entry in sys.path):
        yield
        return
    sys.path.insert(0, cwd)
    try:
        yield
    finally:
        if cwd in sys.path:
            sys.path.remove(cwd)


def _find_factory(spec: str) -> object:
    """The callable ``spec`` (``package.module:callable``) names, imported, not called."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise InvalidArgumentError(
            f"cannot load {spec!r}: write package.module:callable, both parts given")
    with _current_directory_on_path():
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise InvalidArgumentError(
                f"cannot load {spec!r}: {exc} (package.module is looked for in the current "
                "directory and on sys.path)") from exc
    if not callable(factory):
        raise InvalidArgumentError(
            f"cannot load {spec!r}: {attr} is a {type(factory).__name__}, not a callable "
            "(package.module:callable must name a callable that takes no arguments)")
    return factory


def _call_factory(spec: str) -> object:
    """Import ``package.module`` of ``spec`` (the current directory included) and call its
    ``callable`` with no arguments."""
    attr = spec.partition(":")[2]
    factory = _find_factory(spec)
    with _current_directory_on_path():
        try:
            return factory()
        except (Exception, SystemExit) as exc:  # builtins:exit would end the command silently
            raise InvalidArgumentError(
                f"cannot build {spec!r}: calling {attr}() raised {type(exc).__name__}: {exc} "
                "(package.module:callable must name a callable that takes no arguments)"
            ) from exc
