"""The module calls a trace went through: which module's ``forward`` created which nodes.

Tracing a whole model flattens it: the graph calls leaf modules only. fxsd's tracer also records
every call of a module it traced *through* (a :class:`ModuleCall`: the module, the arguments it
received and the value it returned, with graph nodes in place of proxies) and tags each node it
creates with the calls that were running (:class:`~fxsd.record.NodeRecord`). A :class:`CallTree`
answers the questions the rest of fxsd asks about those calls: which nodes a call created (its
*region*), which outside values it reads, which of its values are used after it returns, and which
module performs a given node.

Nothing here changes a graph.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn
from torch.fx import Graph, Node, Proxy
from torch.fx.node import map_aggregate

from fxsd.record import NodeRecord
from fxsd.tracing.ops import node_order

__all__ = ["ModuleCall", "CallTree", "DictRecord", "any_leaf", "as_nodes", "bound_parameters",
           "calls_of", "leaves", "node_leaves", "stack_scope"]


@dataclass(frozen=True)
class DictRecord:
    """A returned dict that is also a dataclass (a Hugging Face ``ModelOutput``), with its
    fields' values as nodes. torch.fx's own containers keep no type for it: a module rewritten
    from its call would return a plain ``dict``, and its caller's ``outputs[0]`` would fail."""

    cls: type
    fields: dict[str, Any]


def is_dict_record(value: Any) -> bool:
    """Whether ``value`` is a dict that is also a dataclass instance (a ``ModelOutput``)."""
    return isinstance(value, dict) and dataclasses.is_dataclass(value)


def as_nodes(value: Any) -> Any:
    """``value`` with each proxy replaced by its node; containers kept, a ``ModelOutput`` as a
    :class:`DictRecord`."""
    if isinstance(value, Proxy):
        return value.node
    if is_dict_record(value):
        return DictRecord(type(value), {k: as_nodes(v) for k, v in value.items()})
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a named tuple
        return type(value)(*(as_nodes(v) for v in value))
    if isinstance(value, (tuple, list)):
        return type(value)(as_nodes(v) for v in value)
    if isinstance(value, dict):
        return {k: as_nodes(v) for k, v in value.items()}
    return value


@dataclass(eq=False)
class ModuleCall:
    """One call of a module the tracer went through (leaf modules are graph nodes instead).

    Attributes:
        index: position in the trace's list of calls (execution order of the calls' starts).
        path: the module's qualified name in the model (``""`` for the root).
        module: the module object.
        parent: index of the enclosing call, ``None`` for calls made by the root's ``forward``.
        args, kwargs: what the caller passed, with each traced value replaced by its graph node.
        output: what the call returned, in the same form.
    """

    index: int
    path: str
    module: nn.Module = field(repr=False)
    parent: int | None
    args: tuple[Any, ...] = field(repr=False)
    kwargs: dict[str, Any] = field(repr=False)
    output: Any = field(default=None, repr=False)

    @property
    def type_name(self) -> str:
        return type(self.module).__name__


def bound_parameters(signature: inspect.Signature, args: Sequence[Any],
                     kwargs: dict[str, Any]) -> list[tuple[inspect.Parameter, Any]]:
    """Each parameter of ``signature`` with the value a call with ``args`` and ``kwargs`` gives
    it: the value passed, else its default (``empty`` if it has none), ``()`` / ``{}`` for
    ``*args`` / ``**kwargs`` given nothing. Raises ``TypeError`` when the call does not fit."""
    bound = signature.bind(*args, **kwargs)
    out: list[tuple[inspect.Parameter, Any]] = []
    for name, param in signature.parameters.items():
        if param.kind is inspect.Parameter.VAR_POSITIONAL:
            out.append((param, tuple(bound.arguments.get(name, ()))))
        elif param.kind is inspect.Parameter.VAR_KEYWORD:
            out.append((param, dict(bound.arguments.get(name, {}))))
        else:
            out.append((param, bound.arguments.get(name, param.default)))
    return out


def leaves(value: Any) -> list[Any]:
    """The leaves of ``value`` (nested tuples, lists, dicts, slices, :class:`DictRecord`), in
    order."""
    found: list[Any] = []

    def visit(x: Any) -> Any:
        if isinstance(x, DictRecord):
            map_aggregate(x.fields, visit)
        else:
            found.append(x)
        return x

    map_aggregate(value, visit)
    return found


def any_leaf(value: Any, kind: type | tuple[type, ...]) -> bool:
    """Whether some leaf of ``value`` is an instance of ``kind``."""
    return any(isinstance(x, kind) for x in leaves(value))


def node_leaves(value: Any) -> list[Node]:
    """The graph nodes inside ``value`` (nested tuples, lists, dicts, slices), in order."""
    return [x for x in leaves(value) if isinstance(x, Node)]


def calls_of(node: Node) -> tuple[int, ...]:
    """The module calls running when ``node`` was created (its :class:`NodeRecord`)."""
    record = node.meta.get("fxsd")
    return record.calls if isinstance(record, NodeRecord) else ()


class CallTree:
    """The recorded calls of one traced graph, with their regions.

    Args:
        calls: the calls the tracer recorded.
        graph: the graph the tracer built (possibly edited by fxsd's own passes since, which keep
            each node's :class:`~fxsd.record.NodeRecord`).
    """

    def __init__(self, calls: Sequence[ModuleCall], graph: Graph) -> None:
        self.calls = list(calls)
        self.graph = graph
        self.order = node_order(graph)
        regions: list[list[Node]] = [[] for _ in self.calls]
        for node in graph.nodes:
            for index in calls_of(node):
                regions[index].append(node)
        self._regions = regions
        self._region_sets = [set(r) for r in regions]
        counts: dict[int, int] = {}
        for call in self.calls:
            counts[id(call.module)] = counts.get(id(call.module), 0) + 1
        self._call_counts = counts
        self._boundary: dict[int, tuple[frozenset[Node], frozenset[Node]]] = {}

    # -- membership ------------------------------------------------------------------------
    def chain(self, node: Node) -> tuple[int, ...]:
        """The calls running when ``node`` was created, outermost first."""
        return calls_of(node)

    def innermost(self, node: Node) -> ModuleCall | None:
        """The call whose ``forward`` performed ``node`` (``None``: the root's ``forward``)."""
        chain = calls_of(node)
        return self.calls[chain[-1]] if chain else None

    def region(self, index: int) -> list[Node]:
        """The nodes created during call ``index`` (its own and its callees'), in graph order."""
        return self._regions[index]

    def in_region(self, node: Node, index: int) -> bool:
        return node in self._region_sets[index]

    def is_unique(self, index: int) -> bool:
        """Whether the module of call ``index`` is called exactly once in the traced forward."""
        return self._call_counts[id(self.calls[index].module)] == 1

    def ancestors(self, index: int) -> list[int]:
        """The calls enclosing call ``index``, innermost first."""
        out, parent = [], self.calls[index].parent
        while parent is not None:
            out.append(parent)
            parent = self.calls[parent].parent
        return out

    # -- boundaries ------------------------------------------------------------------------
    def inputs(self, index: int) -> list[Node]:
        """The graph values passed to call ``index`` as arguments."""
        call = self.calls[index]
        return node_leaves((call.args, call.kwargs))

    def outputs(self, index: int) -> list[Node]:
        """The graph values call ``index`` returned."""
        return node_leaves(self.calls[index].output)

    def boundary(self, index: int) -> tuple[frozenset[Node], frozenset[Node]]:
        """``(reads, escapes)`` of call ``index``.

        ``reads``: values its region uses that it neither created nor received as arguments
        (parameter reads through ``get_attr`` excluded: a module may read its own parameters
        wherever the tracer first created their node). ``escapes``: values its region created
        that something outside uses although the call did not return them. A call with both
        empty can be cut out of the graph as one call of its module.
        """
        if index not in self._boundary:
            members = self._region_sets[index]
            given = set(self.inputs(index))
            returned = set(self.outputs(index))
            reads = {a for n in self._regions[index] for a in n.all_input_nodes
                     if a not in members and a not in given and a.op != "get_attr"}
            escapes = {n for n in self._regions[index] if n not in returned
                       and any(u not in members for u in n.users)}
            self._boundary[index] = (frozenset(reads), frozenset(escapes))
        return self._boundary[index]

    def scope(self, node: Node) -> tuple[tuple[str, str], ...]:
        """(path, class name) of each module call running when ``node`` was created, outermost
        first; the last one's ``forward`` performs ``node`` (empty: the root's)."""
        return tuple((self.calls[i].path, self.calls[i].type_name) for i in calls_of(node))

    def children(self, index: int | None) -> list[int]:
        """The calls made directly by call ``index``'s forward (``None``: by the root's)."""
        return [c.index for c in self.calls if c.parent == index]


def stack_scope(node: Node, branch: Iterable[Node] = (), graph_has_stacks: bool = True
                ) -> tuple[tuple[str, str], ...]:
    """:meth:`CallTree.scope` for a graph fxsd did not trace.

    Read from the ``nn_module_stack`` that ``torch.fx`` tracers record (a node without one, in a
    graph whose tracer records them, belongs to the root's ``forward``); for a graph without any,
    the longest module path shared by the ``branch``'s module calls (class unknown).
    """
    stack = node.meta.get("nn_module_stack")
    if not stack and graph_has_stacks:
        return ()
    if stack:
        scope = []
        for key, value in stack.items():
            path = value[0] if isinstance(value, tuple) and isinstance(value[0], str) else str(key)
            mtype = value[1] if isinstance(value, tuple) and len(value) > 1 else ""
            name = mtype if isinstance(mtype, str) else getattr(mtype, "__name__", str(mtype))
            scope.append((path.split("@")[0], name.rsplit(".", 1)[-1]))
        if node.op == "call_module" and scope and scope[-1][0] == str(node.target):
            scope.pop()  # a leaf module's own entry: the node belongs to its caller
        return tuple(scope)
    targets = [str(n.target).split(".") for n in branch if n.op == "call_module"]
    if not targets:
        return ()
    prefix = targets[0][:-1]
    for t in targets[1:]:
        k = 0
        while k < min(len(prefix), len(t) - 1) and prefix[k] == t[k]:
            k += 1
        prefix = prefix[:k]
    return ((".".join(prefix), ""),) if prefix else ()
