"""``FxsdGraphModule``: a GraphModule that keeps the traced model's whole module tree.

``torch.fx.GraphModule`` keeps only the submodules and attributes its graph references, re-creates
the containers above them as plain ``nn.Module``\\ s and registers every tensor its graph reads as a
persistent buffer. Its ``deepcopy`` and unpickling rebuild the module from the graph the same way.
So a model with an unused submodule, a non-persistent buffer or a tensor constant gets different
``state_dict`` keys once traced. fxsd promises identical keys, so its modules carry the original
tree (the very same submodule objects, like ``symbolic_trace``) and copy and pickle it whole.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Any

import torch
from torch import nn
from torch.fx import Graph, GraphModule, Tracer

__all__ = ["FxsdGraphModule", "copy_graph", "free_name", "mirror_module", "site_module_name"]


def free_name(gm: nn.Module, base: str) -> str:
    """``base``, or ``base_1``, ``base_2``... : the first name ``gm`` has no attribute for."""
    name, i = base, 1
    while hasattr(gm, name):
        name, i = f"{base}_{i}", i + 1
    return name


def site_module_name(gm: nn.Module, module_path: str, suffix: str) -> str:
    """A free root attribute name for something added at a site: ``layer1_0_gate``."""
    base = f"{module_path.replace('.', '_')}_{suffix}" if module_path else suffix
    return free_name(gm, base)


class FxsdGraphModule(GraphModule):
    """A :class:`torch.fx.GraphModule` whose module tree is the traced model's own.

    Behaves like any GraphModule (``.graph``, ``.code``, ``print_tabular``); the difference is that
    ``deepcopy``, ``torch.save``/``torch.load`` and ``state_dict`` see the complete original tree.
    """

    def __deepcopy__(self, memo: dict[int, Any]) -> FxsdGraphModule:
        res = type(self).__new__(type(self))
        memo[id(self)] = res
        state = {k: v for k, v in self.__dict__.items() if k != "_graph"}
        res.__dict__.update(copy.deepcopy(state, memo))
        res.graph = copy_graph(self.graph)
        return res

    def __reduce__(self) -> tuple[Any, ...]:
        # Like GraphModule, serialise the generated code rather than the Graph (which has no
        # on-disk compatibility guarantee), but keep the whole __dict__ and our class.
        state = {k: v for k, v in self.__dict__.items() if k != "_graph"}
        return (_rebuild, (type(self).__mro__[1] if _is_impl(type(self)) else type(self),
                           state, self.code))


def _is_impl(cls: type) -> bool:
    return cls.__qualname__.split(".")[-1] == "GraphModuleImpl"


def copy_graph(graph: Graph) -> Graph:
    new = Graph(tracer_cls=getattr(graph, "_tracer_cls", None))
    val_map: dict[Any, Any] = {}
    out = new.graph_copy(graph, val_map, return_output_node=True)
    new._codegen = copy.deepcopy(graph._codegen)
    if out is not None:
        out_val, old_out = out
        new.output(out_val, type_expr=getattr(old_out, "type", None))
    return new


class _KeepModules(Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return True


def _rebuild(cls: type, state: dict[str, Any], code: str) -> FxsdGraphModule:
    """Unpickle an :class:`FxsdGraphModule`: restore its state, re-trace its code into a Graph."""
    from torch.fx.graph_module import _CodeOnlyModule, _forward_from_src

    globals_: dict[str, Any] = {}
    exec("import torch\nimport operator\nfrom torch import device, inf, nan\n", globals_)  # noqa: S102
    forward = _forward_from_src(code, globals_)
    holder = _CodeOnlyModule(dict(state))
    type(holder).forward = forward
    graph = _KeepModules().trace(holder)
    res = cls.__new__(cls)
    res.__dict__.update(state)
    res.graph = graph
    return res


def mirror_module(model: nn.Module, graph: Graph, extra_attrs: dict[str, Any] | None = None,
                  class_name: str | None = None) -> FxsdGraphModule:
    """Build an :class:`FxsdGraphModule` running ``graph`` over ``model``'s own module tree.

    The result shares every submodule, parameter and buffer with ``model`` (nothing is copied) and
    has the same ``state_dict`` keys. ``extra_attrs`` are root attributes the graph reads that the
    model lacks (tracing's ``_tensor_constant``\\ s): tensors among them become non-persistent
    buffers, so ``.to()`` moves them without adding ``state_dict`` keys.
    """
    extra_attrs = dict(extra_attrs or {})
    referenced: dict[str, Any] = {}
    for node in graph.nodes:
        if node.op in ("call_module", "get_attr"):
            target = str(node.target)
            referenced[target] = (extra_attrs[target] if target in extra_attrs
                                  else _resolve(model, target))
    gm = FxsdGraphModule(referenced, graph, class_name=class_name or type(model).__name__)
    # Swap the partial tree GraphModule built for the model's own.
    root_plain = {t for t in referenced if "." not in t} - set(model._modules) \
        - set(model._parameters) - set(model._buffers)
    for attr in root_plain:
        gm.__dict__.pop(attr, None)
    gm._modules = OrderedDict(model._modules)
    gm._parameters = OrderedDict(model._parameters)
    gm._buffers = OrderedDict(model._buffers)
    gm._non_persistent_buffers_set = set(model._non_persistent_buffers_set)
    gm.training = model.training
    for attr in root_plain:
        value = extra_attrs[attr] if attr in extra_attrs else model.__dict__[attr]
        if attr in extra_attrs and isinstance(value, torch.Tensor) \
                and not isinstance(value, nn.Parameter):
            gm.register_buffer(attr, value, persistent=False)
        else:
            gm.__dict__[attr] = value
    return gm


def _resolve(model: nn.Module, target: str) -> Any:
    obj: Any = model
    for atom in target.split("."):
        obj = getattr(obj, atom)
    return obj
