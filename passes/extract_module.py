"""Cut one module's ``forward`` out of a whole-model trace, as a graph of its own.

fxsd traces the whole model once (the analysis needs the whole data flow: depths, forks that come
from outside a block, side inputs). To rewrite a block in place, the block's own ``forward`` is
needed as a graph over the block's arguments. :func:`extract_module` builds it from the nodes the
block's call created in the whole-model graph:

* one placeholder per parameter of the block's ``forward`` signature (defaults kept); a tensor the
  caller passed inside a tuple or dict (Llama's ``position_embeddings``) is read back with
  ``getitem``; a constant the block was traced with (``attn_mask=None``) gets a guard
  (:func:`fxsd.tracing.guards.check_argument`), an object the trace guarded by class (a cache) keeps
  that guard (:func:`fxsd.tracing.guards.check_type`); a tensor the tracer passed as it is
  (:func:`fxsd.decisions.owners.argument_tensors`: a buffer, such as open_clip's causal mask) is
  read from its placeholder wherever the block's nodes read it by ``get_attr``, guarded by class;
* the block's nodes, with module and attribute targets made relative to the block;
* each module call the plan keeps whole (:class:`~fxsd.decisions.owners.Owner`) becomes one
  ``call_module`` node, its results read back where the caller used them;
* the block's return value as the output.

The result computes exactly what the block's call computed in the trace; the mapping from the
whole-model nodes to the new ones lets the rewrite carry the analysis over. The whole-model graph
is not changed.
"""

from __future__ import annotations

import inspect
import operator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.fx import Graph, Node
from torch.fx.node import map_aggregate

from fxsd.analysis.sites import ResidualAnalysis
from fxsd.decisions.owners import Owner, reads_argument
from fxsd.errors import GraphError
from fxsd.graph_module import wrapped_call
from fxsd.graph_names import free_name, local_name, node_name
from fxsd.tracing.calls import DictRecord, any_leaf, bound_parameters, node_leaves
from fxsd.tracing.guards import check_argument, check_type, type_name
from fxsd.tracing.ops import resolve_attr
from fxsd.tracing.tracer import reads_flag_only

__all__ = ["ExtractedModule", "extract_module"]


@dataclass
class ExtractedModule:
    """A block's forward cut out of the whole-model graph.

    Attributes:
        graph: the block's graph (targets relative to the block).
        env: whole-model node -> the node of ``graph`` holding the same value.
        module: the module the graph runs on.
        extra_attrs: attributes the graph reads that the module lacks (constant tensors and
            stateless modules the trace created on the root, such as made-live drop paths). A
            rewrite that adds modules for its graph to call (gates) adds them here too.
    """

    graph: Graph
    env: dict[Node, Node]
    module: nn.Module
    extra_attrs: dict[str, Any]

    def get_submodule(self, target: str) -> nn.Module:
        """Look ``target`` up as the module built from this graph will."""
        if target in self.extra_attrs:
            return self.extra_attrs[target]
        return self.module.get_submodule(target)


def extract_module(analysis: ResidualAnalysis, owner: Owner, module: nn.Module) -> ExtractedModule:
    """Build ``owner``'s forward as a graph (see the module docstring).

    Args:
        analysis: the whole-model analysis the owner was planned on.
        owner: the module to cut out, with the calls to keep whole.
        module: the module the graph will run on (the owner's module, or its copy), used to
            name new attributes without clashes.
    """
    return _Extractor(analysis, owner, module).run()


class _Extractor:
    def __init__(self, analysis: ResidualAnalysis, owner: Owner, module: nn.Module) -> None:
        self.source = analysis.graph_module
        self.tree = analysis.calls
        self.owner = owner
        self.module = module
        self.prefix = owner.path + "." if owner.path else ""
        self.graph = Graph()
        self.env: dict[Node, Node] = {}
        self.extra: dict[str, Any] = {}
        self.rehomed: dict[str, str] = {}
        self.emitted: set[int] = set()
        self.passed: dict[int, Node] = {}  # id of a tensor argument -> the node reading it

    def run(self) -> ExtractedModule:
        if self.owner.call is None:
            region = list(self.source.graph.nodes)
            depth = 0
        else:
            call = self.tree.calls[self.owner.call]
            region = self.tree.region(call.index)
            depth = len(self.tree.ancestors(call.index)) + 1
            self._placeholders(call)
        for node in region:
            kept = self._kept_call(node, depth)
            if kept is not None:
                if kept not in self.emitted:
                    self._emit_call(kept)
                continue
            if node.op == "output":
                self.graph.output(map_aggregate(node.args[0], self._value))
                continue
            self.env[node] = self._copy(node)
        if self.owner.call is not None:
            output = self.tree.calls[self.owner.call].output
            self.graph.output(self._rebuild(output))
        self.graph.lint()
        return ExtractedModule(self.graph, self.env, self.module, self.extra)

    # -- arguments ---------------------------------------------------------------------------
    def _placeholders(self, call: Any) -> None:
        arguments = bound_parameters(inspect.signature(call.module.forward), call.args,
                                     call.kwargs)
        for param, value in arguments:
            name = param.name
            if param.kind is inspect.Parameter.VAR_POSITIONAL:
                ph = self.graph.placeholder(f"*{name}")
            elif param.kind is inspect.Parameter.VAR_KEYWORD:
                ph = self.graph.placeholder(f"**{name}")
            else:
                ph = self.graph.placeholder(name, default_value=param.default)
            if not self._bind_value(ph, value, name):
                wrapped_call(self.graph, check_argument, (ph, value, self.owner.path, name))
            elif isinstance(value, Node):
                self._keep_type_guard(ph, value, name)

    def _keep_type_guard(self, holder: Node, value: Node, name: str) -> None:
        """Guard the class of an object argument as the trace guarded it where it came in (a
        cache the owner calls methods on: ``None`` or another class must not reach the graph)."""
        for user in value.users:
            if user.op == "call_function" and user.target is check_type:
                wrapped_call(self.graph, check_type,
                             (holder, user.args[1], self.owner.path, name))
                return

    def _bind_value(self, holder: Node, value: Any, name: str) -> bool:
        """Map the nodes inside ``value`` to reads of ``holder``, and the tensors the tracer
        passed as they are (:func:`fxsd.decisions.owners.argument_tensors`) too; False if it holds
        neither."""
        if isinstance(value, Node):
            self.env.setdefault(value, holder)
            return True
        if isinstance(value, torch.Tensor):
            self.passed.setdefault(id(value), holder)
            # the code was traced with a tensor here (``if attn_mask is not None`` took its
            # branch): another kind of value must not reach the graph
            wrapped_call(self.graph, check_type, (holder, type_name(value), self.owner.path,
                                                  name))
            return True
        items = (enumerate(value) if isinstance(value, (tuple, list))
                 else value.items() if isinstance(value, dict) else ())
        found = False
        for key, item in items:
            if node_leaves(item) or any_leaf(item, torch.Tensor):
                part = self.graph.call_function(operator.getitem, (holder, key))
                found = self._bind_value(part, item, f"{name}[{key!r}]") or found
        return found

    # -- nodes -------------------------------------------------------------------------------
    def _kept_call(self, node: Node, depth: int) -> int | None:
        """The outermost call below the owner that ``node`` belongs to and the plan keeps whole."""
        if self.tree is None:
            return None
        for index in self.tree.chain(node)[depth:]:
            if index not in self.owner.inline:
                return index
        return None

    def _emit_call(self, index: int) -> None:
        self.emitted.add(index)
        call = self.tree.calls[index]
        args = map_aggregate(call.args, self._value)
        kwargs = map_aggregate(call.kwargs, self._value)
        target = self._target(call.path)
        node = self.graph.create_node("call_module", target, tuple(args), dict(kwargs),
                                      name=_name_for(target))
        self._bind_result(node, call.output, index)

    def _rebuild(self, value: Any) -> Any:
        """What a call returned, over this graph's nodes; a ``ModelOutput`` is constructed again
        (``BaseModelOutput(last_hidden_state=...)`` in the code), keeping its type."""
        def leaf(v: Any) -> Any:
            if isinstance(v, DictRecord):
                return self.graph.call_function(v.cls, (), dict(map_aggregate(v.fields, leaf)))
            return self._value(v)

        return map_aggregate(value, leaf)

    def _bind_result(self, holder: Node, value: Any, index: int) -> None:
        if isinstance(value, Node):
            if self.tree.in_region(value, index):
                self.env[value] = holder
            return
        if isinstance(value, DictRecord):  # a ModelOutput: its fields by key
            value = value.fields
        items = (enumerate(value) if isinstance(value, (tuple, list))
                 else value.items() if isinstance(value, dict) else ())
        for key, item in items:
            if node_leaves(item):
                self._bind_result(self.graph.call_function(operator.getitem, (holder, key)),
                                  item, index)

    def _copy(self, node: Node) -> Node:
        if node.op == "get_attr" and self.owner.call is not None and reads_argument(
                self.source, str(node.target), self.tree.calls[self.owner.call], self.prefix):
            return self.passed[id(resolve_attr(self.source, str(node.target)))]
        args = map_aggregate(node.args, self._value)
        kwargs = map_aggregate(node.kwargs, self._value)
        target = node.target
        name = node.name
        if node.op == "get_attr" and self.owner.path and str(node.target) == self.owner.path \
                and reads_flag_only(node):
            # the owner's own ``self.training`` chose a constant (BART's decoder layer): the
            # rewritten module reads its own flag
            target, name = "training", "training"
        elif node.op in ("call_module", "get_attr"):
            target = self._target(str(node.target))
            name = _name_for(target)
        else:
            name = local_name(name, self.owner.path)
        new = self.graph.create_node(node.op, target, tuple(args), dict(kwargs), name=name,
                                     type_expr=node.type)
        new.meta = dict(node.meta)
        return new

    def _value(self, value: Any) -> Any:
        if not isinstance(value, Node):
            return value
        if value in self.env:
            return self.env[value]
        if value.op == "get_attr":  # a parameter first read elsewhere (fx caches the node)
            self.env[value] = self._copy(value)
            return self.env[value]
        raise GraphError(
            f"cannot cut '{self.owner.path or '<root>'}' out of the traced graph: it reads "
            f"'{value.name}', which it neither computes nor receives")

    def _target(self, path: str) -> str:
        """``path`` (qualified in the model) relative to the owner, or a new attribute for a
        stateless object that lives elsewhere."""
        if not self.owner.path:
            if _has_path(self.module, path):
                return path
        elif path.startswith(self.prefix):
            return path[len(self.prefix):]
        if path not in self.rehomed:
            obj = resolve_attr(self.source, path)
            if isinstance(obj, nn.Parameter) or (
                    isinstance(obj, nn.Module) and next(obj.parameters(), None) is not None):
                raise GraphError(f"'{self.owner.path or '<root>'}' uses '{path}', which holds "
                                 "state outside it")
            name = free_name(self.module, path.replace(".", "_"))
            while name in self.extra:
                name += "_"
            self.extra[name] = obj if not isinstance(obj, torch.Tensor) else obj.detach()
            self.rehomed[path] = name
        return self.rehomed[path]


def _name_for(target: str) -> str:
    """A node name for a call of ``target``."""
    return node_name(target.replace(".", "_"))


def _has_path(module: nn.Module, path: str) -> bool:
    try:
        resolve_attr(module, path)
    except AttributeError:
        return False
    return True

