"""``fxsd.strip``: the gated model with every gate replaced by its eval semantics, for export.

Each gated block becomes a gate-free GraphModule (still an instance of the block's class) in which
every gate call is the branch's own nodes followed by the add the source wrote, computed by the
gate's own :class:`fxsd.runtime.join.Join` called on ``torch.fx`` proxies, so the stripped graph
holds exactly the ops the gate runs in eval: the source's add for ``scale="train"``/``"none"`` and
for ``p = 0`` (``skip + branch``, ``branch + skip``, ``torch.add(x, b, alpha=k)``, ``x.add_(b)``);
for ``scale="eval"`` gates the branch's term scaled by ``1 - p`` (``torch.add(skip, branch,
alpha=1 - p)`` where the branch is the second operand); the join without the branch for
``p = 1``, copied where the gate copies it. With ``fold_scale=True`` the factor ``1 - p`` is
instead folded into the weights that end the branch (:func:`fxsd.plain_state_dict`'s rules), so
every add is the source's. The result runs exactly the eval computation of
the gated model, keeps the model's structure and ``state_dict`` keys, has no Python-level control
flow left in the blocks and exports with ``torch.export.export``.
"""

from __future__ import annotations

import copy
import operator
from typing import Any

import torch
from torch import nn
from torch.fx import Graph, GraphModule, Node, Proxy
from torch.fx.node import map_aggregate
from torch.fx.proxy import GraphAppendingTracer

from fxsd.errors import InvalidArgumentError, InvalidTypeError
from fxsd.graph_module import module_from_graph
from fxsd.module_tree import TreeEditor, deepest_first
from fxsd.record import FxsdRecord
from fxsd.runtime.accessors import gated_blocks, gates
from fxsd.runtime.folding import plain_state_dict
from fxsd.runtime.gate import BranchGate
from fxsd.runtime.gate_info import ShareKind
from fxsd.runtime.join import branch_scale

__all__ = ["strip"]


def strip(model: nn.Module, *, fold_scale: bool = False) -> nn.Module:
    """Return ``model`` without gates, computing what ``model.eval()`` computes.

    Args:
        model: a model returned by :func:`fxsd.stochastic_depth`.
        fold_scale: fold each ``1 - p`` into the weights that end its branch, with the rules of
            :func:`fxsd.plain_state_dict` (all or nothing). The result then owns copies of the
            parameters (``model`` is not changed); without folding it shares them with
            ``model``, like the gated model shares them with its source.

    Raises:
        InvalidTypeError: ``model`` is not an ``nn.Module``.
        InvalidArgumentError: ``model`` has no fxsd gates.
        FoldError: ``fold_scale=True`` and some site's scale cannot be folded (all are listed).

    Example:
        >>> import torch, torchvision, fxsd
        >>> model = fxsd.stochastic_depth(torchvision.models.resnet18(), 0.2)
        >>> plain = fxsd.strip(model)
        >>> ep = torch.export.export(plain.eval(), (torch.randn(1, 3, 64, 64),))  # doctest: +SKIP
    """
    if not isinstance(model, nn.Module):
        raise InvalidTypeError(f"strip expects a model returned by fxsd.stochastic_depth, got "
                               f"{type(model).__name__}")
    if not gates(model):
        raise InvalidArgumentError(f"{type(model).__name__} has no fxsd gates to strip: pass the "
                                   "model fxsd.stochastic_depth returned")
    folded = plain_state_dict(model) if fold_scale else None  # raises before anything is built
    source = copy.deepcopy(model) if fold_scale else model
    tree = TreeEditor(source, in_place=fold_scale)
    for path in deepest_first(gated_blocks(source)):
        tree.replace(path, _strip_block(tree.locate(path)[2], fold_scale))
    if folded is not None:
        tree.root.load_state_dict(folded)
    tree.root.eval()
    return tree.root


def _strip_block(block: GraphModule, folded: bool) -> GraphModule:
    """The block's graph with its own gates inlined (nested gated blocks stay calls); with
    ``folded`` every gate's add is plain (its scale lives in the weights)."""
    graph = Graph()
    env: dict[Node, Any] = {}
    for node in block.graph.nodes:
        env[node] = _copy_node(block, graph, env, node, folded)
    plain = module_from_graph(block, graph)
    for name, child in list(plain.named_children()):
        if isinstance(child, BranchGate):
            del plain._modules[name]
    record = block.meta.get("fxsd")
    plain.meta["fxsd"] = (copy.copy(record) if isinstance(record, FxsdRecord)
                          else FxsdRecord())
    plain.meta["fxsd"].stripped = True
    return plain


def _lookup(env: dict[Node, Any], n: Any) -> Any:
    return env[n] if isinstance(n, Node) else n


def _copy_node(root: GraphModule, graph: Graph, env: dict[Node, Any], node: Node,
               folded: bool) -> Any:
    """Copy ``node`` into ``graph``; a gate call becomes its inlined branch and add."""
    if node.op == "call_module":
        module = root.get_submodule(str(node.target))
        if isinstance(module, BranchGate):
            return _inline_gate(root, graph, module, [_lookup(env, a) for a in node.args],
                                folded)
    source = node.args[0] if node.args else None
    if node.target is operator.getitem and isinstance(source, Node) \
            and isinstance(env.get(source), tuple):  # a part of what a gate hands on
        return env[source][node.args[1]]
    return graph.node_copy(node, lambda n: _lookup(env, n))


def _inline_gate(root: GraphModule, graph: Graph, gate: BranchGate, args: list[Any],
                 folded: bool) -> Any:
    skip = args[0]
    shared = gate.info.shared
    args, skips = gate.info.split_skips(args)
    branch_args = args if gate.identity else args[1:]
    keep = 1.0 if folded else branch_scale(gate.drop_rate, gate.scale, False)
    # the branch runs for what it hands on
    escapes = gate.escape_path is not None or bool(shared)
    if keep == 0.0 and not gate.info.join.needs_branch_shape and not escapes:
        return _without_branch(graph, gate, skip)
    env: dict[Node, Any] = {}
    placeholders = [n for n in gate.branch.graph.nodes if n.op == "placeholder"]
    for ph, value in zip(placeholders, branch_args):
        env[ph] = value
    out: Any = None
    for node in gate.branch.graph.nodes:
        if node.op == "placeholder":
            continue
        if node.op == "output":
            out = map_aggregate(node.args[0], lambda n: _lookup(env, n))
            continue
        env[node] = _copy_node(root, graph, env, node, folded)
    if escapes:
        out, *handed = out
        count = len(handed) - len(shared)
        uses = [_shared_use(graph, use, value, skip_of, keep) for use, value, skip_of in
                zip(shared, handed[count:], _skips_for(shared, skips))]
        return (_join(graph, gate, skip, out, keep), *handed[:count], *uses)
    return _join(graph, gate, skip, out, keep)


def _skips_for(shared: Any, skips: list[Any]) -> list[Any]:
    """Each second use's skip (``None`` for a concatenation), in order."""
    found = iter(skips)
    return [next(found) if use.kind is ShareKind.JOIN else None for use in shared]


def _shared_use(graph: Graph, use: Any, value: Any, skip: Any, keep: float) -> Any:
    """A second join (or a concatenation's operand) of the gate's work at eval."""
    if use.kind is ShareKind.JOIN:
        if keep == 0.0:
            return _traced(graph, use.join.without_branch, skip)
        return _traced(graph, lambda s, o: use.join(s, o, keep), skip, value)
    if keep == 0.0:
        return graph.call_function(torch.zeros_like, (value,))
    return value if keep == 1.0 else graph.call_function(operator.mul, (value, keep))


def _join(graph: Graph, gate: BranchGate, skip: Any, out: Any, keep: float) -> Any:
    """The gate's join of ``skip`` and the branch output ``out`` at eval, as graph nodes: its
    :class:`~fxsd.runtime.join.Join` run on proxies records the very ops the gate runs."""
    join = gate.info.join
    if keep == 0.0 and not join.needs_branch_shape:
        return _without_branch(graph, gate, skip)
    return _traced(graph, lambda s, o: join(s, o, keep), skip, out)


def _without_branch(graph: Graph, gate: BranchGate, skip: Any) -> Any:
    """What a dropped gate returns (:meth:`BranchGate._skip`), as graph nodes."""
    result = _traced(graph, gate.info.join.without_branch, skip)
    if result is skip and gate.clone_on_drop:
        return graph.call_method("clone", (skip,))
    return result


def _traced(graph: Graph, fn: Any, *args: Any) -> Any:
    """Append to ``graph`` the ops ``fn`` runs on ``args`` (nodes or constants)."""
    tracer = GraphAppendingTracer(graph)
    result = fn(*(Proxy(a, tracer) if isinstance(a, Node) else a for a in args))
    return result.node if isinstance(result, Proxy) else result
