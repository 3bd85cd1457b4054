"""Names in graphs and generated code: a free attribute name on a module (:func:`free_name`), a
node's name as a module's code may spell it (:func:`node_name`, :func:`local_name`), and a node
taking over an erased node's name (:func:`take_name`).

fxsd's rewrites keep the generated code reading as the model's own: a gate's call carries the
name of the add it replaces, and a block's code names nodes without the prefix torch.fx gives them
in the whole model's graph.
"""

from __future__ import annotations

from torch import nn
from torch.fx import Node
from torch.fx.graph import _snake_case  # fx's own node naming

__all__ = ["free_name", "local_name", "node_name", "take_name"]


def free_name(module: nn.Module, base: str) -> str:
    """``base``, or ``base_1``, ``base_2``... : the first name ``module`` has no attribute for."""
    name, i = base, 1
    while hasattr(module, name):
        name, i = f"{base}_{i}", i + 1
    return name


def node_name(name: str) -> str:
    """``name`` as a node may be called: never ``self``, which names the module itself in the
    generated code (``self = None`` would clobber it; torch.fx does not reserve the name, and
    Hugging Face's ``BertAttention`` has a child called ``self``)."""
    return "self_1" if name == "self" else name


def local_name(name: str, path: str) -> str:
    """A node's ``name`` as the code of the module at ``path`` spells it: without the prefix
    torch.fx gave it in the whole model's graph (the path with dots as underscores, or its
    snake case, as fx names ``call_module`` nodes: ``swinViT.layers1`` -> ``swin_vi_t_layers1``).
    """
    if not path:
        return name
    flat = path.replace(".", "_") + "_"
    for prefix in dict.fromkeys((flat, _snake_case(flat))):
        if name.startswith(prefix) and len(name) > len(prefix):
            return name[len(prefix):]
    return name


def take_name(node: Node, name: str) -> None:
    """Give ``node`` the name of an erased node (the value it now stands for), so generated code
    keeps reading as the model's did."""
    used = getattr(node.graph._graph_namespace, "_used_names", None)
    if isinstance(used, set):  # torch.fx keeps an erased node's name reserved
        used.discard(name)
    node._rename(node_name(name))
