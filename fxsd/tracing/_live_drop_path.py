"""Keep functional ``torchvision.ops.stochastic_depth`` calls aware of ``train()``/``eval()``.

``torchvision.ops.stochastic_depth`` is ``torch.fx.wrap``-ped, so tracing records it as a function
call whose ``training`` argument is the constant ``self.training`` had at trace time: the traced
model stays stochastic after ``.eval()``. This pass replaces each such call by an equivalent
``torchvision.ops.StochasticDepth`` module registered on the root, which reads its own
``training`` flag at run time. The module has no parameters, so ``state_dict`` keys do not change.
"""

from __future__ import annotations

from torch.fx import GraphModule, Node

from fxsd.errors import GraphError
from fxsd.graph_names import free_name

__all__ = ["make_drop_paths_live"]


def _is_functional_drop_path(node: Node) -> bool:
    if node.op != "call_function":
        return False
    from torchvision.ops.stochastic_depth import stochastic_depth

    return node.target is stochastic_depth


def make_drop_paths_live(gm: GraphModule) -> list[str]:
    """Replace functional stochastic-depth calls with ``StochasticDepth`` modules.

    Returns the names of the modules added. Edits ``gm`` in place.
    """
    from torchvision.ops import StochasticDepth

    added = []
    for node in list(gm.graph.nodes):
        if not _is_functional_drop_path(node):
            continue
        names = ("input", "p", "mode", "training")
        bound = dict(zip(names, node.args))
        bound.update({k: v for k, v in node.kwargs.items() if k in names})
        p, mode = bound.get("p"), bound.get("mode")
        if not isinstance(p, (int, float)) or not isinstance(mode, str):
            raise GraphError(
                f"node '{node.name}' calls torchvision.ops.stochastic_depth with a rate or mode "
                "computed at run time; fxsd needs constants there. Call it with literal p and mode "
                "or keep the calling module as a leaf (leaf_modules=[...])."
            )
        name = free_name(gm, node.name)
        gm.add_submodule(name, StochasticDepth(float(p), mode))
        with gm.graph.inserting_before(node):
            live = gm.graph.call_module(name, (bound["input"],))
        live.meta = dict(node.meta)
        node.replace_all_uses_with(live)
        gm.graph.erase_node(node)
        added.append(name)
    if added:
        gm.recompile()
    return added
