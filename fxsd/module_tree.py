"""Module trees: :func:`copy_tree` (a new object for every module, sharing the tensors),
:class:`TreeEditor` (replace a module at every path it is registered at), :func:`registrations`
(those paths) and :func:`deepest_first` (children before the modules that hold them).

The rewrite and ``fxsd.prune``/``fxsd.strip`` build their results this way: the user's model is
never edited, and a module registered twice stays one object in the result.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar

from torch import nn

from fxsd.graph_module import attach_parts, shallow_copy

__all__ = ["TreeEditor", "copy_tree", "deepest_first", "registrations"]

T = TypeVar("T")


def copy_tree(model: nn.Module) -> nn.Module:
    """A new object for every module of ``model`` (:func:`shallow_copy`), sharing parameters,
    buffers and other attributes: setting a mode, a hook or a child on one tree never reaches
    the other, while training one trains the other. A module that appears twice (a shared
    layer) is copied once."""
    copies: dict[int, nn.Module] = {}

    def copy_of(module: nn.Module) -> nn.Module:
        if id(module) not in copies:
            copies[id(module)] = copied = shallow_copy(module)
            for name, child in copied._modules.items():
                if child is not None:
                    copied._modules[name] = copy_of(child)
            attach_parts(copied)
        return copies[id(module)]

    return copy_of(model)


def deepest_first(items: Iterable[T], path: Callable[[T], str] = str) -> list[T]:
    """``items`` (module paths, or things with one) ordered so that each module comes before
    the modules that contain it — a rewritten parent is built over its rewritten children — and
    the root (``""``) last; otherwise in their given order."""
    return sorted(items, key=lambda item: -path(item).count(".") - bool(path(item)))


class TreeEditor:
    """Replace modules deep in a model, at every path they are registered at.

    ``TreeEditor(model)`` works on :func:`copy_tree` of ``model`` (``in_place=True``: on
    ``model`` itself); :meth:`locate` finds a module's parent in the result and :meth:`replace`
    puts a new module in its place.

    A module object may be registered at several paths (monai's ``DynUNet`` holds each encoder
    block as ``input_block`` and as ``skip_layers.downsample``, and its ``forward`` runs the
    second): ``torch.fx`` and ``named_modules()`` name it by the first, and a rewrite made there
    must reach every path, or the model would run the original through the others.
    :meth:`replace` therefore puts the one new object at every path where the old one sits, so
    the result keeps the model's aliasing (``result.a is result.b``).
    """

    def __init__(self, model: nn.Module, in_place: bool = False) -> None:
        self.root = model if in_place else copy_tree(model)

    def locate(self, path: str) -> tuple[nn.Module | None, str, nn.Module]:
        """(parent, attribute name, module) at ``path`` in the result (parent ``None``: root)."""
        if not path:
            return None, "", self.root
        parent, _, name = path.rpartition(".")
        node = self.root.get_submodule(parent)
        return node, name, node._modules[name]

    def replace(self, path: str, module: nn.Module) -> None:
        """Put ``module`` at ``path`` in the result, and at every other path that holds the
        module now at ``path``."""
        parent, _, old = self.locate(path)
        if parent is None:
            self.root = module
            return
        for holder, name in registrations(self.root, old):
            holder._modules[name] = module


def registrations(root: nn.Module, module: nn.Module) -> list[tuple[nn.Module, str]]:
    """Every ``(parent, name)`` in ``root``'s tree with ``parent._modules[name] is module``: one
    per path ``named_modules(remove_duplicate=False)`` lists for it, less the repeats that a
    parent registered at several paths itself adds (it holds the child once)."""
    found: list[tuple[nn.Module, str]] = []
    seen: set[int] = set()
    todo = [root]
    while todo:
        node = todo.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        for name, child in node._modules.items():
            if child is module:
                found.append((node, name))
            elif child is not None:
                todo.append(child)
    return found
