"""What fxsd needs to know about individual graph nodes: adds, in-place ops, aliasing views,
linear ops, checks (``torch._assert``) and what costs nothing.

These predicates look at one :class:`torch.fx.Node` at a time (or, :func:`is_linear`, at each
node of a path) and never touch the graph.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import Graph, GraphModule, Node

from fxsd.tracing.partial_join import partial_add

__all__ = [
    "dropout_training",
    "zip_arguments",
    "MISMATCH",
    "NOT_DROPOUT",
    "node_order",
    "resolve_attr",
    "is_weighted",
    "is_nonlinear",
    "add_kind",
    "add_operands",
    "data_inputs",
    "depends_on_input",
    "input_dependent_nodes",
    "is_metadata_read",
    "is_inplace",
    "mutated_operand",
    "is_view",
    "is_free",
    "is_linear",
    "is_assertion",
    "is_impure",
    "is_module",
]

# Targets of ``call_function`` nodes that add two tensors, with the name fxsd reports for them.
_ADD_FUNCTIONS: dict[Any, str] = {
    operator.add: "operator.add",
    operator.iadd: "operator.iadd",
    torch.add: "torch.add",
    torch.Tensor.add: "Tensor.add",
    torch.Tensor.add_: "Tensor.add_",
    # torch.cat([x[:, :C] + s, x[:, C:]]): see fxsd.tracing.partial_join
    partial_add: "partial add",
}
_ADD_METHODS = {"add": "Tensor.add", "add_": "Tensor.add_"}

_METADATA_ATTRS = frozenset({"shape", "dtype", "device", "ndim", "is_cuda", "layout",
                             "requires_grad", "is_sparse", "is_quantized"})
_METADATA_METHODS = frozenset({"size", "dim", "numel", "nelement", "stride", "get_device",
                               "element_size", "is_contiguous", "is_floating_point",
                               "is_complex", "ndimension"})

# Ops whose result shares storage with their first operand: an in-place op on the result mutates
# the operand too.
_VIEW_NAMES = frozenset(
    {
        "view", "view_as", "reshape", "reshape_as", "permute", "transpose", "t", "flatten",
        "unflatten", "squeeze", "unsqueeze", "expand", "expand_as", "narrow", "select",
        "chunk",
        "split", "unbind", "movedim", "swapaxes", "swapdims", "as_strided", "diagonal", "detach",
        "contiguous", "unfold", "view_as_real", "view_as_complex", "alias",
    }
)


def add_kind(node: Node) -> str | None:
    """The kind of add ``node`` performs (``"operator.add"``, ``"Tensor.add_"``...), or None."""
    if node.op == "call_function":
        try:
            return _ADD_FUNCTIONS.get(node.target)
        except TypeError:  # unhashable target
            return None
    if node.op == "call_method":
        return _ADD_METHODS.get(str(node.target))
    return None


def add_operands(node: Node) -> tuple[Any, Any]:
    """The two summands of an add node, whichever way they were passed."""
    args = list(node.args)
    if len(args) < 2:
        names = ("input", "other") if node.op == "call_function" else ("self", "other")
        for name in names[len(args):]:
            if name in node.kwargs:
                args.append(node.kwargs[name])
    if len(args) < 2:
        raise ValueError(f"add node {node.name} has fewer than two operands")
    return args[0], args[1]


def _target_name(node: Node) -> str:
    if node.op == "call_method":
        return str(node.target)
    if node.op == "call_function":
        return getattr(node.target, "__name__", "")
    return ""


def is_inplace(node: Node, root: GraphModule | None = None) -> bool:
    """Whether ``node`` mutates one of its operands.

    Recognises ``x.op_(...)`` methods and functions (``torch.relu_``), the ``operator.i*``
    functions, ``inplace=True`` keyword arguments and, given ``root``, modules with an
    ``inplace=True`` attribute such as ``nn.ReLU(inplace=True)``.
    """
    if node.op == "call_module":
        if root is None:
            return False
        try:
            module = root.get_submodule(str(node.target))
        except AttributeError:
            return False
        return bool(getattr(module, "inplace", False))
    if node.op not in ("call_function", "call_method"):
        return False
    if node.kwargs.get("inplace") is True:
        return True
    name = _target_name(node)
    if node.op == "call_function" and getattr(node.target, "__module__", None) == "_operator":
        return name == "setitem" or (name.startswith("i") and name not in {
            "is_", "is_not", "index", "inv", "invert"})
    return name.endswith("_") and not name.endswith("__")


def mutated_operand(node: Node, root: GraphModule | None = None) -> Node | None:
    """The operand an in-place ``node`` mutates (its first tensor argument), or ``None``."""
    if not is_inplace(node, root):
        return None
    first = node.args[0] if node.args else node.kwargs.get("input", node.kwargs.get("self"))
    return first if isinstance(first, Node) else None


def is_view(node: Node) -> bool:
    """Whether ``node``'s result may alias its first operand (views, ``getitem``, ``chunk``...)."""
    if node.op == "call_function" and node.target is operator.getitem:
        return True
    return _target_name(node) in _VIEW_NAMES and node.op in ("call_function", "call_method")


def is_metadata_read(node: Node) -> bool:
    """Whether ``node`` reads only a tensor's metadata (``x.shape``, ``x.size(0)``, ``x.dtype``).

    Such a node depends on its operand's shape, dtype or device, never on its values: it is not a
    data dependency. (Hugging Face builds attention masks from ``embeddings.dtype``; position
    embeddings are expanded to ``x.shape[0]``.)
    """
    if node.op == "call_function" and node.target is getattr:
        return len(node.args) > 1 and node.args[1] in _METADATA_ATTRS
    return node.op == "call_method" and str(node.target) in _METADATA_METHODS


def data_inputs(node: Node) -> list[Node]:
    """The inputs whose *values* ``node`` reads (none for a metadata read)."""
    return [] if is_metadata_read(node) else node.all_input_nodes


def input_dependent_nodes(graph: Graph) -> set[Node]:
    """Every node of ``graph`` whose value is computed from the values of a model input (a
    ``placeholder``), by :func:`data_inputs`: a metadata read (``x.shape``) does not carry the
    dependence. One pass over the graph; :func:`depends_on_input` asks the same of one node."""
    found: set[Node] = set()
    for n in graph.nodes:
        if n.op == "placeholder" or any(a in found for a in data_inputs(n)):
            found.add(n)
    return found


def depends_on_input(node: Node) -> bool:
    """Whether ``node``'s value is computed from the values of a model input (a ``placeholder``;
    the rule of :func:`input_dependent_nodes`, walking back from ``node`` only)."""
    seen, stack = {node}, [node]
    while stack:
        n = stack.pop()
        if n.op == "placeholder":
            return True
        for a in data_inputs(n):
            if a not in seen:
                seen.add(a)
                stack.append(a)
    return False


# Ops whose result is a learned transformation when one operand is a parameter.
_WEIGHTED_FUNCTIONS = frozenset({
    "linear", "bilinear", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d",
    "conv_transpose3d", "matmul", "mm", "bmm", "einsum", "addmm", "baddbmm", "embedding",
    "layer_norm", "group_norm", "batch_norm", "instance_norm", "rms_norm", "prelu", "__matmul__",
})
_NONLINEAR = frozenset({
    "relu", "relu_", "relu6", "gelu", "silu", "silu_", "tanh", "sigmoid", "hardswish",
    "hardsigmoid", "leaky_relu", "elu", "selu", "celu", "mish", "softmax", "log_softmax", "glu",
    "softplus", "hardtanh", "prelu", "rrelu", "logsigmoid", "tanhshrink", "softsign",
})


# Functional dropouts, each with the default of its ``training`` argument (``train`` for
# ``torch.dropout``, which has none).
_DROPOUT_TRAINING = {F.dropout: True, F.dropout1d: True, F.dropout2d: True, F.dropout3d: True,
                     F.alpha_dropout: False, F.feature_alpha_dropout: False, torch.dropout: None}
NOT_DROPOUT = object()


def dropout_training(node: Node) -> Any:
    """The ``training`` argument a functional dropout call runs with — a constant or the node
    computing it — or ``NOT_DROPOUT`` when ``node`` is no functional dropout."""
    if node.op != "call_function" or node.target not in _DROPOUT_TRAINING:
        return NOT_DROPOUT
    keyword = "train" if node.target is torch.dropout else "training"
    return node.kwargs.get(keyword, node.args[2] if len(node.args) > 2
                           else _DROPOUT_TRAINING[node.target])


MISMATCH = object()


def zip_arguments(u: Any, v: Any, leaf: Callable[[Any, Any], Any]) -> Any:
    """Walk two nodes' arguments together — slices, and tuples, lists and dicts of the same
    shape — and rebuild them from ``leaf(x, y)`` at each pair of leaves (a pair that is not of
    the same shape is a leaf pair too); ``MISMATCH`` when a leaf returns it. The one structural
    comparison of two traces of a module."""
    if isinstance(u, slice) and isinstance(v, slice):
        parts = zip_arguments((u.start, u.stop, u.step), (v.start, v.stop, v.step), leaf)
        return MISMATCH if parts is MISMATCH else slice(*parts)
    if isinstance(u, (tuple, list)) and type(u) is type(v) and len(u) == len(v):
        items = [zip_arguments(p, q, leaf) for p, q in zip(u, v)]
        return MISMATCH if any(p is MISMATCH for p in items) else type(u)(items)
    if isinstance(u, dict) and isinstance(v, dict) and u.keys() == v.keys():
        entries = {k: zip_arguments(u[k], v[k], leaf) for k in u}
        return MISMATCH if any(p is MISMATCH for p in entries.values()) else entries
    return leaf(u, v)


def node_order(graph: Graph) -> dict[Node, int]:
    """Each node's position in ``graph`` (valid until the graph is edited)."""
    return {n: i for i, n in enumerate(graph.nodes)}


def resolve_attr(root: Any, target: str) -> Any:
    """The object at dotted ``target`` under ``root`` (``layer1.0.conv1.weight``; ``""`` is
    ``root`` itself)."""
    obj = root
    for atom in filter(None, target.split(".")):
        obj = getattr(obj, atom)
    return obj


def _is_parameter_value(node: Any, root: Any) -> bool:
    """Whether ``node`` is a parameter, or computed from parameters alone (a view of one)."""
    if not isinstance(node, Node) or depends_on_input(node):
        return False
    seen, stack = {node}, [node]
    while stack:
        n = stack.pop()
        if n.op == "get_attr":
            try:
                obj = resolve_attr(root, str(n.target))
            except AttributeError:
                continue
            if isinstance(obj, torch.nn.Parameter):
                return True
        for a in n.all_input_nodes:
            if a not in seen:
                seen.add(a)
                stack.append(a)
    return False


def is_weighted(node: Node, root: Any) -> bool:
    """Whether ``node`` applies learned weights: a call of a module holding parameters (a
    convolution, a linear layer, an attention module, a norm), or a convolution, linear map,
    matmul or norm function one of whose operands is a parameter."""
    if node.op == "call_module":
        try:
            module = root.get_submodule(str(node.target))
        except AttributeError:
            return False
        return next(module.parameters(), None) is not None
    if node.op in ("call_function", "call_method") and _target_name(node) in _WEIGHTED_FUNCTIONS:
        operands = [*node.args, *node.kwargs.values()]
        return any(_is_parameter_value(a, root) for a in operands)
    return False


def is_nonlinear(node: Node, root: Any) -> bool:
    """Whether ``node`` is an elementwise nonlinearity (an activation function or module)."""
    if node.op == "call_module":
        try:
            module = root.get_submodule(str(node.target))
        except AttributeError:
            return False
        return type(module).__module__ == "torch.nn.modules.activation"
    return node.op in ("call_function", "call_method") and _target_name(node) in _NONLINEAR


def is_free(n: Node) -> bool:
    """Nodes that cost (almost) nothing: views, ``getitem``, attribute reads."""
    if n.op in ("placeholder", "get_attr", "output"):
        return True
    if n.op == "call_function" and n.target is getattr:
        return True
    return is_view(n)


# Ops that are linear in their input (batch norm: at inference); a path of these only is one
# linear map of the fork. A subclass counts only if it keeps its base class's ``forward``.
_LINEAR_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d,
                   nn.BatchNorm3d, nn.SyncBatchNorm, nn.Identity)
_LINEAR_FUNCTIONS = frozenset({
    torch.nn.functional.conv1d, torch.nn.functional.conv2d, torch.nn.functional.conv3d,
    torch.nn.functional.linear, torch.nn.functional.batch_norm, torch.conv1d, torch.conv2d,
    torch.conv3d, torch.batch_norm, operator.neg, torch.neg})


# Products: linear in one operand when the other is not computed from it (``q @ k``, ``x * g``).
_PRODUCT_FUNCTIONS = frozenset({operator.matmul, operator.mul, torch.matmul, torch.mul, torch.bmm,
                                torch.mm})
_PRODUCT_METHODS = frozenset({"matmul", "mul", "bmm", "mm"})


def is_linear(nodes: Iterable[Node], gm: GraphModule, fork: Node) -> bool:
    """Whether every op in ``nodes`` (a path from ``fork``) is linear in the fork: views,
    reads, adds, linear layers, and products of one path value with a value computed
    elsewhere."""
    nodes = list(nodes)
    on_path = {*nodes, fork}
    for n in nodes:
        if is_free(n) or add_kind(n) is not None:
            continue
        if (n.op == "call_function" and n.target in _PRODUCT_FUNCTIONS) or (
                n.op == "call_method" and n.target in _PRODUCT_METHODS):
            if sum(a in on_path for a in n.all_input_nodes) == 1 and len(n.args) == 2:
                continue
            return False
        if n.op == "call_module":
            try:
                module = gm.get_submodule(str(n.target))
            except AttributeError:
                return False
            if not _is_linear_module(module):
                return False
        elif not (n.op == "call_function" and n.target in _LINEAR_FUNCTIONS):
            return False
    return True


def _is_linear_module(module: nn.Module) -> bool:
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        # a batch norm, also one with an activation slot left empty (timm's BatchNormAct2d)
        return all(isinstance(c, nn.Identity) for c in module.children())
    return any(isinstance(module, c) and type(module).forward is c.forward
               for c in _LINEAR_MODULES)


def is_assertion(node: Node) -> bool:
    """``torch._assert(cond, msg)`` and friends: checks with no effect on values (a check on a
    branch value need not run when the branch is skipped)."""
    return node.op == "call_function" and node.target in _ASSERTIONS


_ASSERTIONS = tuple(f for f in (getattr(torch, "_assert", None), getattr(torch, "_check", None),
                                getattr(torch, "_assert_async", None)) if f is not None)


def is_impure(node: Node) -> bool:
    try:
        return node.is_impure()
    except AssertionError:  # a graph without its module (a block being cut out): be careful
        return node.op == "call_module"


def is_module(gm: Any, target: str) -> bool:
    try:
        return isinstance(gm.get_submodule(target), nn.Module)
    except AttributeError:
        return False
