"""``FxsdGraphModule``: a GraphModule that keeps a module's whole tree, and its class.

``torch.fx.GraphModule`` keeps only the submodules and attributes its graph references, re-creates
the containers above them as plain ``nn.Module``\\ s and registers every tensor its graph reads as a
persistent buffer; its ``deepcopy`` and unpickling rebuild that partial tree. A gated block built
that way would change the model's ``state_dict`` keys and its printed tree. fxsd's GraphModules
instead hold the source module's own tree (the very same submodule, parameter and buffer objects,
as ``symbolic_trace`` shares them), its hooks and its other attributes, and keep them through
``deepcopy`` and ``torch.save``/``torch.load``.

A gated block also keeps its class: :func:`module_from_graph` builds it as an instance of
:func:`block_class` of the original class, a subclass of both :class:`FxsdGraphModule` and the
original (``isinstance(block, Bottleneck)`` still holds, the class's own methods still work,
``type(block).__name__`` is unchanged). There is one such class per original class, shared by
every block rewritten from it (``type(model.layers[0]) is type(model.layers[1])``, so a lookup
by class name, as accelerate's FSDP auto-wrap does, finds every block): the generated code is
held by each instance, and the class's ``forward`` calls it — wrapped as the source class wraps
a subclass's ``forward`` when one is created (transformers' ``GradientCheckpointingLayer``
checkpoints that way).

Pickling keeps the graph itself: its nodes (op, name, target, arguments; not their ``meta``) are
pickled with the module's state and rebuilt node for node on load, so a loaded block runs exactly
the graph that was saved. (torch.fx's own ``__reduce__`` pickles the generated code and re-traces
it on load, which evaluates every call made on no traced value: ``if_training(self.attn, 0.5,
0.0)`` would come back as the constant of the mode the model was loaded in, and guards on
non-tensor values could not be re-traced at all.) Only when a target cannot be pickled by
reference does fxsd fall back to torch.fx's way. Nothing process-global is touched.
"""

from __future__ import annotations

import copy
import inspect
import pickle
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from types import MethodType
from typing import Any

import torch
from torch import nn
from torch.fx import Graph, GraphModule, Node, Tracer
from torch.fx.graph import PythonCode, _PyTreeCodeGen
from torch.fx.graph_module import _forward_from_src
from torch.fx.node import map_aggregate, map_arg

from fxsd.graph_names import node_name

__all__ = ["FxsdBlock", "FxsdGraphModule", "HostedGraphModule", "attach_parts", "block_class",
           "copy_graph", "module_from_graph", "shallow_copy", "wrapped_call"]


# Instance attributes GraphModule manages itself: never copied over from the source module.
_GRAPH_MODULE_ATTRS = frozenset({
    "_graph", "_code", "graph", "code", "meta", "_tracer_cls", "_tracer_extras", "_in_spec",
    "_out_spec", "_erase_node_hooks", "_create_node_hooks", "_replace_hooks", "_deepcopy_hooks",
    "_graphmodule_cls_name", "_lineno_map", "_prologue_start", "_wrapped_call", "_fxsd_code",
})
# The module tree: taken from the source module, not from the graph.
_TREE = ("_modules", "_parameters", "_buffers", "_non_persistent_buffers_set")


class FxsdGraphModule(GraphModule):
    """A :class:`torch.fx.GraphModule` whose module tree is its source module's own.

    Behaves like any GraphModule (``.graph``, ``.code``, ``print_readable``); ``deepcopy``,
    ``torch.save``/``torch.load`` and ``state_dict`` see the complete original tree.
    """

    def __deepcopy__(self, memo: dict[int, Any]) -> FxsdGraphModule:
        res = type(self).__new__(type(self))
        memo[id(self)] = res
        _name_class(res, type(self).__name__)
        state = {k: v for k, v in self.__dict__.items() if k not in ("_graph", _CODE)}
        res.__dict__.update(copy.deepcopy(state, memo))
        res.graph = copy_graph(self.graph)
        return res

    def __reduce__(self) -> tuple[Any, ...]:
        source, name = _source_class(type(self)), type(self).__name__
        state = {k: v for k, v in self.__dict__.items()
                 if k not in ("_graph", "_code", _CODE, _HOST)}
        nodes = _pickled_nodes(self.graph)
        if nodes is not None:
            return (_load_graph, (state, nodes, self.graph._codegen, source, name))
        # a target that cannot be pickled by reference: torch.fx's own way (the code is pickled
        # and re-traced on load, which evaluates calls made on no traced value)
        load, (body, import_block) = super().__reduce__()
        body.pop(_CODE, None)
        return (_load, (load, body, import_block, source, name))


# The instance attribute holding a hosted part's block.
_HOST = "_fxsd_host"


class HostedGraphModule(FxsdGraphModule):
    """Part of a gated block's code kept apart from it — a gate's branch, the code that gives a
    skipped branch's escaping values — as a GraphModule that owns nothing.

    Every module, parameter, buffer and flag its code reads (``self.mlp``, ``self.training``)
    is looked up on its **host**, the block, when it runs. So a child the user replaces after
    gating (``checkpoint_wrapper``, ``apply_activation_checkpointing``, ``torch.compile``, a
    LoRA layer) is the one that runs, ``block.train()`` reaches the branch, and the part adds
    no state of its own. A block attaches its parts (:func:`attach_parts`) when it is built,
    copied or loaded; pickling leaves the host out (the block is what holds the part).

    Example:
        >>> import torch, torchvision, fxsd
        >>> from torch.utils.checkpoint import checkpoint
        >>> gated = fxsd.stochastic_depth(torchvision.models.resnet18(), 0.0)
        >>> block = gated.layer1[0]
        >>> block.residual_gate.branch.host is block
        True
    """

    def __init__(self, attrs: dict[str, Any], graph: Graph, class_name: str) -> None:
        super().__init__(attrs, graph, class_name=class_name)
        self._modules.clear()  # installed only to satisfy GraphModule: the host holds them
        self._parameters.clear()
        self._buffers.clear()
        self.__dict__["_fxsd_reads"] = frozenset(
            str(n.target).split(".")[0] for n in graph.nodes if n.op in ("call_module",
                                                                          "get_attr"))
        self.__dict__[_HOST] = None

    @property
    def host(self) -> nn.Module | None:
        """The block whose modules and attributes this part's code reads."""
        return self.__dict__.get(_HOST)

    def attach(self, host: nn.Module) -> HostedGraphModule:
        """This part hosted by ``host``: itself, or a copy when another block hosts it (two
        module trees sharing a gate's part after :func:`~fxsd.module_tree.copy_tree`)."""
        if self.host is not None and self.host is not host:
            part = shallow_copy(self)
            part.__dict__[_HOST] = host
            return part
        self.__dict__[_HOST] = host
        return self

    @property
    def training(self) -> bool:  # type: ignore[override]
        host = self.__dict__.get(_HOST)
        return host.training if host is not None else self.__dict__.get("_own_training", True)

    @training.setter
    def training(self, mode: bool) -> None:
        self.__dict__["_own_training"] = mode

    def __getattr__(self, name: str) -> Any:
        host = self.__dict__.get(_HOST)
        if host is not None and name in self.__dict__.get("_fxsd_reads", ()):
            return getattr(host, name)
        return super().__getattr__(name)


def attach_parts(block: nn.Module) -> None:
    """Make ``block`` the host of the parts its children keep apart (a gate's branch): each
    child with an ``attach_parts(block)`` method is told."""
    for child in block._modules.values():
        attach = getattr(type(child), "attach_parts", None)
        if attach is not None:
            attach(child, block)


# The instance attribute holding a shared-class block's generated ``forward`` (a function).
_CODE = "_fxsd_code"


class _InstanceCode:
    """A shared gated class's ``forward``: read on a block, the block's own generated code
    (bound, with its own signature); called through the class (as a wrapper that the source
    class's ``__init_subclass__`` put around it does), a call of the block's code."""

    def __init__(self) -> None:
        self.__name__ = self.__qualname__ = "forward"
        # what ``inspect.signature`` reports through a wrapper (a descriptor has none of its own)
        self.__signature__ = inspect.signature(self.__call__)

    def __get__(self, obj: Any, objtype: type | None = None) -> Any:
        if obj is None:
            return self
        code = obj.__dict__.get(_CODE)
        return MethodType(self if code is None else code, obj)

    def __call__(self, block: nn.Module, *args: Any, **kwargs: Any) -> Any:
        return block.__dict__[_CODE](block, *args, **kwargs)


class FxsdBlock(FxsdGraphModule):
    """The base of the gated classes :func:`block_class` makes: one class for every block
    rewritten from one original class, each instance running its own generated code.

    ``torch.fx`` gives every GraphModule a class of its own (``GraphModule.__new__``) because
    :meth:`~torch.fx.GraphModule.recompile` assigns the generated ``forward`` to the class.
    Here :meth:`recompile` keeps the generated function on the instance (``.code`` is still the
    instance's own code), and the class's :meth:`forward` calls it.
    """

    _fxsd_block_of: type | None = None

    def __new__(cls, *args: Any, **kwargs: Any) -> FxsdBlock:
        return nn.Module.__new__(cls)  # no per-instance class

    forward = _InstanceCode()

    def recompile(self) -> PythonCode:
        """Generate the code from the graph as :meth:`torch.fx.GraphModule.recompile` does, and
        keep it on this instance (the class, shared by other blocks, is left as it is)."""
        if isinstance(self._graph._codegen, _PyTreeCodeGen):
            self._in_spec = self._graph._codegen.pytree_info.in_spec
            self._out_spec = self._graph._codegen.pytree_info.out_spec
        python_code = self._graph.python_code(root_module="self")
        self._code = python_code.src
        self._lineno_map = python_code._lineno_map
        self._prologue_start = python_code._prologue_start
        co_fields = getattr(self._graph, "_co_fields", {})
        self.__dict__[_CODE] = _forward_from_src(self._code, python_code.globals, co_fields)
        self._recompile_submodules()
        return python_code


def _name_class(module: nn.Module, name: str) -> None:
    """Name ``module``'s class ``name`` when that class is its own (torch.fx's per-instance
    class); a shared gated class keeps the original class's name."""
    if not isinstance(module, FxsdBlock):
        type(module).__name__ = name


@dataclass(frozen=True)
class _NodeRef:
    """A node in a pickled graph's arguments: the name of an earlier node."""

    name: str


def _pickled_nodes(graph: Graph) -> list[tuple[Any, ...]] | None:
    """``graph`` as ``(op, name, target, args, kwargs, type)`` rows, or ``None`` when some target
    or constant cannot be pickled. Node ``meta`` is left out (it may hold example values)."""
    rows = []
    ref = partial(map_arg, fn=lambda a: _NodeRef(a.name))
    for n in graph.nodes:
        rows.append((n.op, n.name, n.target, ref(n.args), ref(n.kwargs),
                     n.type if isinstance(n.type, type) else None))
    try:
        pickle.dumps([row[2:5] for row in rows])
    except Exception:  # noqa: BLE001 - any pickling failure means: use the other way
        return None
    return rows


def _load_graph(state: dict[str, Any], rows: list[tuple[Any, ...]], codegen: Any,
                source: type, name: str) -> FxsdGraphModule:
    """Unpickle: the graph exactly as it was pickled, over the pickled tree, in its class."""
    graph = Graph()
    graph._codegen = codegen
    env: dict[str, Node] = {}
    for op, row_name, target, args, kwargs, type_expr in rows:
        resolve = partial(map_aggregate, fn=lambda a: env[a.name] if isinstance(a, _NodeRef)
                          else a)
        node = graph.create_node(op, target, resolve(args), resolve(kwargs), name=row_name,
                                 type_expr=type_expr)
        env[row_name] = node
    cls = block_class(source)
    res = cls.__new__(cls)
    _name_class(res, name)
    res.__dict__.update(state)
    res.graph = graph
    attach_parts(res)
    return res


def _source_class(cls: type) -> type:
    """The class a gated block was built from (``FxsdGraphModule`` for a plain one)."""
    for klass in cls.__mro__:
        if klass is HostedGraphModule or klass is FxsdGraphModule:
            return klass
        if klass.__qualname__.split(".")[-1] == "GraphModuleImpl":
            continue
        if getattr(klass, "_fxsd_block_of", None) is not None:
            return klass._fxsd_block_of
    return FxsdGraphModule


def _load(load: Any, body: dict[str, Any], import_block: str, source: type,
          name: str) -> FxsdGraphModule:
    """Unpickle: torch.fx rebuilds the graph from the code, then the tree and class come back."""
    plain = load(dict(body), import_block)
    res = _transplant(plain, block_class(source), body)
    _name_class(res, name)
    attach_parts(res)
    return res


def _transplant(gm: GraphModule, cls: type, state: dict[str, Any] | None = None
                ) -> FxsdGraphModule:
    """An instance of ``cls`` with ``gm``'s graph and ``state`` (default: ``gm``'s own state)."""
    res = cls.__new__(cls)
    _name_class(res, type(gm).__name__)
    res.__dict__.update({k: v for k, v in (gm.__dict__ if state is None else state).items()
                         if k not in ("_graph", _CODE)})
    for node in gm.graph.nodes:  # re-tracing code that reads a submodule called ``self``
        if node.name != node_name(node.name):
            node._rename(node_name(node.name))
    res.graph = gm.graph
    return res


def wrapped_call(where: Graph | Tracer, target: Callable[..., Any], args: tuple[Any, ...],
                 kwargs: dict[str, Any] | None = None) -> Any:
    """A call of ``target`` as one node — in a graph (the node) or while tracing (its proxy) —
    marked ``is_wrapped``: the generated code registers ``target`` with ``torch.fx.wrap``, so
    re-tracing that code (unpickling a gated model) records it as one call again. For guards,
    ``if_training``, item assignment and attention kernels, which a tracer must not enter."""
    if isinstance(where, Graph):
        node = made = where.call_function(target, args, kwargs or {})
    else:
        made = where.create_proxy("call_function", target, args, kwargs or {})
        node = made.node
    node.meta["is_wrapped"] = True
    return made


# One gated class per original class. The gated class derives from its source, so a weak key
# would never be released while its value lives: a plain dict, as long-lived as the classes.
_BLOCK_CLASSES: dict[type, type[FxsdGraphModule]] = {}


def block_class(source: type) -> type[FxsdGraphModule]:
    """The GraphModule class for a rewritten module of class ``source``: the same class for
    every module of that class.

    A subclass of :class:`FxsdBlock` (so of :class:`FxsdGraphModule`) and ``source``, with
    ``source``'s ``__name__`` and ``__qualname__`` (so ``isinstance`` checks, FSDP and
    activation-checkpointing policies by class or class name, and the class's own methods keep
    working). Its ``forward`` runs the instance's generated code, inside whatever wrapper the
    source class's ``__init_subclass__`` puts around a subclass's ``forward``. ``GraphModule``
    sources, and classes that cannot be combined with it, give plain :class:`FxsdGraphModule`.
    """
    if issubclass(source, GraphModule):
        return HostedGraphModule if issubclass(source, HostedGraphModule) else FxsdGraphModule
    cls = _BLOCK_CLASSES.get(source)
    if cls is None:
        try:
            cls = type(source.__name__, (FxsdBlock, source),
                       {"__module__": __name__, "__qualname__": source.__qualname__,
                        "_fxsd_block_of": source})
        except TypeError:  # a metaclass or layout conflict: keep the tree, lose isinstance
            cls = FxsdGraphModule
        _BLOCK_CLASSES[source] = cls
    return cls


def copy_graph(graph: Graph) -> Graph:
    new = Graph(tracer_cls=getattr(graph, "_tracer_cls", None))
    val_map: dict[Any, Any] = {}
    out = new.graph_copy(graph, val_map, return_output_node=True)
    new._codegen = copy.deepcopy(graph._codegen)
    if out is not None:
        out_val, old_out = out
        new.output(out_val, type_expr=getattr(old_out, "type", None))
    return new


def module_from_graph(source: nn.Module, graph: Graph, extra_attrs: dict[str, Any] | None = None,
                      *, keep_class: bool = True) -> FxsdGraphModule:
    """Build a GraphModule running ``graph`` over ``source``'s own module tree.

    The result shares every submodule, parameter and buffer with ``source`` (the containers are
    copies, the objects in them are not), carries its hooks and other attributes, and has its
    ``state_dict`` keys. ``extra_attrs`` are attributes the graph reads that ``source`` lacks:
    modules are added as submodules, tensors as non-persistent buffers (``.to()`` moves them,
    ``state_dict`` does not list them), anything else as a plain attribute.

    Args:
        keep_class: make the result an instance of ``type(source)`` too (see
            :func:`block_class`); otherwise a plain :class:`FxsdGraphModule` named after it.
    """
    base = _source_class(type(source)) if isinstance(source, GraphModule) else type(source)
    cls = block_class(base) if keep_class else FxsdGraphModule
    # GraphModule.__init__ would install a partial tree for what the graph reads (and, for the
    # combined class, call the source class's __init__ through super()): initialise a plain one
    # on an empty graph, move its state into an instance of ``cls``, give it the source's own
    # tree and attributes, and only then the graph (one code generation).
    empty = Graph()
    empty.output(None)
    gm = cls.__new__(cls)
    gm.__dict__.update(FxsdGraphModule({}, empty, class_name=type(source).__name__).__dict__)
    gm.__dict__.pop(_CODE, None)
    _name_class(gm, type(source).__name__)
    for name, value in source.__dict__.items():
        if name in _TREE or name.endswith("_hooks") or name.endswith("_hooks_with_kwargs") \
                or name.endswith("_hooks_always_called"):
            gm.__dict__[name] = copy.copy(value)
        elif name not in _GRAPH_MODULE_ATTRS:
            gm.__dict__[name] = value
    for name, value in (extra_attrs or {}).items():
        if isinstance(value, nn.Module):
            gm._modules[name] = value
        elif isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
            gm.register_buffer(name, value, persistent=False)
        else:
            gm.__dict__[name] = value
    gm.training = source.training
    gm.graph = graph
    attach_parts(gm)
    return gm


def shallow_copy(module: nn.Module) -> nn.Module:
    """A new module object of the same class sharing ``module``'s children, parameters, buffers
    and attributes; its containers and hook registries are copies, so replacing a child or
    adding a hook on the copy leaves ``module`` as it was."""
    if isinstance(module, GraphModule):
        res = type(module).__new__(type(module))
    else:
        res = object.__new__(type(module))
    state = dict(module.__dict__)
    for name, value in state.items():
        # torch's registries, exactly: a subclass (diffusers' FrozenDict config) may refuse
        # to be rebuilt, and is shared like any other attribute
        if type(value) in (dict, set, OrderedDict) and name.startswith("_"):
            state[name] = copy.copy(value)
    res.__dict__.update(state)
    if isinstance(module, GraphModule):
        _name_class(res, type(module).__name__)
        res.graph = copy_graph(module.graph)
    return res
