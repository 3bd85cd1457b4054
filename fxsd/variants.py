"""Calls a gated block's trace did not see: the block traces itself again, once per signature.

A gated block's graph holds the control flow of the call it was traced from, and its guards
(:mod:`fxsd.guards`) check what that call fixed: constant arguments, the keys of ``**kwargs``,
how many ``*args``, the class of a cache, the truth of Python conditions. Later calls differ:
Hugging Face's ``Trainer`` passes ``num_items_in_batch=`` and ``use_cache=False``, ``generate()``
passes flags and a cache whose cross-attention keys are already computed, Whisper's encoder adds
``use_cache`` to its layers' keyword arguments.

So the code of a gated block with guards starts by asking :func:`variant_for` which graph serves
the call:

* its own graph, when every guard that can be checked before the block runs holds;
* else the first of its *variants* whose guards hold;
* else a new variant: the block's original ``forward`` traced again by example on this very call
  (:class:`~fxsd.by_example.ExampleTracer`, on a view of the block that shares its children,
  parameters and buffers; the modules its own graph calls whole stay whole), analysed, and gated
  with the block's own :class:`~fxsd.gate.BranchGate` objects, found by gate name. Rates,
  schedules, the random stream, :func:`fxsd.set_drop_rate` and the replay of decisions under
  activation checkpointing see one gate per site, as before; only the branch a gate runs is the
  variant's (:class:`GateView`). A join the block's own trace did not gate stays a plain add.

A guard can be checked ahead when it reads the block's arguments and attributes only through
pure reads (attributes, items, comparisons, ``dim()``, ``dict.get``, methods named ``get_*``,
``is_*``, ``has_*``) and nothing earlier in the block calls a method on, or passes on, an object
it reads. Every guard also stays in the code, so a check made ahead can only pick a graph that
then refuses the call (``GuardError`` mid-call), never one that computes something else.

Tracing again does not change the model or the call: it runs on copies of the call's arguments,
under :func:`fxsd.preserve.preserved`, with the gates computing their branches without drawing
and their random stream put back.

What cannot be made right raises :class:`~fxsd.errors.GuardError` saying what: tracing again
fails, a gated join is not found again (the call takes another path through the block), an
argument cannot be copied to trace on, or a block would need more than :data:`MAX_VARIANTS`
signatures. Variants are a cache: ``deepcopy`` and pickling drop them (rebuilt on the next call
that needs one), and ``state_dict`` never sees them.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import operator
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.fx import Graph, Node
from torch.fx.graph import CodeGen

from fxsd.calls import any_leaf
from fxsd.drop_paths import is_drop_path
from fxsd.errors import FxsdError, GuardError
from fxsd.escapes import EscapePath
from fxsd.gate import BranchGate, DropPathAction
from fxsd.graph_module import (
    _GRAPH_MODULE_ATTRS,
    FxsdGraphModule,
    _source_class,
    module_from_graph,
)
from fxsd.guards import GUARDS, is_guardable, passes
from fxsd.ops import is_metadata_read, node_order, resolve_attr
from fxsd.passes.gate_site import call_gate, cut_site
from fxsd.preserve import preserved

__all__ = ["MAX_VARIANTS", "CallSignatureCodeGen", "GateView", "allow_other_calls",
           "variant_for"]

#: The most variants one block keeps; a call that needs another raises ``GuardError``.
MAX_VARIANTS = 8

_TABLE = "_fxsd_variants"
_AT = "root"  # the name the model's root module is traced again under

_PURE_FUNCTIONS = frozenset({
    getattr, operator.getitem, operator.eq, operator.ne, operator.lt, operator.le, operator.gt,
    operator.ge, operator.not_, operator.truth, operator.is_, operator.is_not,
    operator.contains, operator.and_, operator.or_, operator.add, operator.sub, operator.mul,
    operator.floordiv, operator.mod, operator.neg, len, isinstance})
_PURE_METHODS = frozenset({"dim", "size", "get", "keys", "values", "items", "__len__",
                           "__contains__", "__getitem__", "is_floating_point", "is_complex",
                           "numel"})
_PURE_PREFIXES = ("get_", "is_", "has_")
_METADATA = frozenset({"dtype", "shape", "device", "ndim", "layout", "is_cuda"})


# -- the generated code ------------------------------------------------------------------------


class CallSignatureCodeGen(CodeGen):
    """Code generation for a gated block: the generated ``forward`` first asks
    :func:`variant_for` whether another graph serves the call, and returns its result if so."""

    def gen_fn_def(self, free_vars: list[str], maybe_return_annotation: str, *,
                   expanded_def: bool = False) -> str:
        head = super().gen_fn_def(free_vars, maybe_return_annotation, expanded_def=expanded_def)
        names = [_parameter(v) for v in free_vars[1:]]  # free_vars[0] is "self"
        values = ", ".join(n.lstrip("*") for n in names) + ("," if len(names) == 1 else "")
        return (f"{head}\n"
                f"    _fxsd_variant = fxsd_variant_for(self, ({values}))\n"
                f"    if _fxsd_variant is not None:\n"
                f"        return _fxsd_variant({', '.join(_call_arguments(names))})")

    def additional_globals(self) -> list[tuple[str, Any]]:
        return [("fxsd_variant_for", variant_for)]


def _parameter(free_var: str) -> str:
    """``scale`` from ``scale : float = 1.0`` (``*args``, ``**kwargs`` keep their stars)."""
    return free_var.split("=")[0].split(":")[0].strip()


def _call_arguments(names: Sequence[str]) -> list[str]:
    """How the generated code passes its own parameters on to a variant's ``forward``."""
    out, keyword = [], False
    for name in names:
        if name.startswith("*"):
            keyword = keyword or not name.startswith("**")
            out.append(name)
        else:
            out.append(f"{name}={name}" if keyword else name)
    return out


def allow_other_calls(graph: Graph, source: type) -> None:
    """Let the block built from ``graph`` (a rewrite of a ``source`` module) trace itself again
    for calls its guards refuse: its code will start with the :func:`variant_for` check.

    Only where that can help: the graph has a guard that can be checked ahead, and its
    parameters are those of ``source.forward``, which is what is traced again.
    """
    if type(graph._codegen) is not CodeGen or not _Precheck.of(graph).nodes:
        return
    if issubclass(source, fx.GraphModule) or _signature(source) != _placeholders(graph):
        return
    graph._codegen = CallSignatureCodeGen()


def _signature(source: type) -> list[str] | None:
    """``source.forward``'s parameters as placeholder targets (``*args``, ``**kwargs``)."""
    try:
        params = list(inspect.signature(inspect.unwrap(source.forward)).parameters.values())[1:]
    except (TypeError, ValueError):
        return None
    stars = {inspect.Parameter.VAR_POSITIONAL: "*", inspect.Parameter.VAR_KEYWORD: "**"}
    return [stars.get(p.kind, "") + p.name for p in params]


def _placeholders(graph: Graph) -> list[str]:
    """The targets of ``graph``'s placeholders (``x``, ``*args``, ``**kwargs``), in order."""
    return [str(n.target) for n in graph.nodes if n.op == "placeholder"]


# -- choosing the graph for a call -------------------------------------------------------------


@torch.compiler.disable
def variant_for(block: nn.Module, values: tuple[Any, ...]) -> Callable[..., Any] | None:
    """The ``forward`` of the variant that serves a call of ``block`` with these parameter
    values (in its placeholders' order), or ``None`` when the block's own graph does."""
    if any_leaf(values, fx.Proxy):  # the generated code itself is being traced
        return None
    table = block.__dict__.get(_TABLE)
    if not isinstance(table, _Variants) or table.block() is not block:
        table = _Variants(block)  # a copy of a block (strip, shallow copies) has its own
        block.__dict__[_TABLE] = table
    return table.select(block, values)


def _dropped() -> None:
    """Unpickle a block's variants: as nothing (they are rebuilt when needed)."""
    return None


class _Variants:
    """The variants of one block, in the order they were made."""

    def __init__(self, block: nn.Module) -> None:
        self.block = weakref.ref(block)
        self.own: tuple[Graph, _Precheck] | None = None
        self.variants: list[tuple[FxsdGraphModule, _Precheck]] = []

    def __reduce__(self) -> tuple[Any, ...]:
        return (_dropped, ())

    def __deepcopy__(self, memo: dict[int, Any]) -> None:
        return None

    def select(self, block: nn.Module, values: tuple[Any, ...]) -> Callable[..., Any] | None:
        """See :func:`variant_for`; makes the variant when none serves the call."""
        if self.own is None or self.own[0] is not block.graph:
            self.own = (block.graph, _Precheck.of(block.graph))
        refused = self.own[1].refusal(block, values)
        if refused is None:
            return None
        for module, check in self.variants:
            if check.refusal(module, values) is None:
                module.training = block.training
                return module.forward
        path = _path(block)
        if len(self.variants) >= MAX_VARIANTS:
            raise GuardError(
                f"'{path or '<root>'}' was rewritten by fxsd and has traced itself again for "
                f"{MAX_VARIANTS} other calls already; this call differs again ({refused}). "
                "Calls that vary this much cannot each get a graph: pass that argument as a "
                "tensor, or keep this module out of the rewrite (select=...)")
        module = _trace_again(block, values, path, refused)
        check = _Precheck.of(module.graph)
        if check.refusal(module, values) is not None:
            raise GuardError(f"'{path or '<root>'}' was traced again by fxsd for a call its "
                             f"trace did not see ({refused}), but the new graph's guards refuse "
                             "that call too")
        self.variants.append((module, check))
        return module.forward


def _path(block: nn.Module) -> str:
    """The block's name in its model, as its gates (or else its guards) spell it (``""``: the
    root)."""
    for module in block.children():
        if isinstance(module, BranchGate) and module.info.name:
            return module.info.name.rpartition(".")[0]
    for node in block.graph.nodes:
        if node.op == "call_function" and node.target in GUARDS and isinstance(node.args[2], str):
            return node.args[2]
    return ""


@dataclass
class _Precheck:
    """The guards of a graph that can be checked before it runs, with what they read."""

    nodes: list[Node]
    placeholders: list[Node]

    @classmethod
    def of(cls, graph: Graph) -> _Precheck:
        """The guards of ``graph`` that can be checked ahead (see the module docstring)."""
        order = node_order(graph)
        chosen: set[Node] = set()
        for guard in graph.nodes:
            if guard.op != "call_function" or guard.target not in GUARDS:
                continue
            cone = _cone(guard.args[0])
            if cone is not None and not _changed_before(cone, guard, order):
                chosen |= cone | {guard}
        return cls(sorted(chosen, key=order.__getitem__),
                   [n for n in graph.nodes if n.op == "placeholder"])

    def refusal(self, module: nn.Module, values: tuple[Any, ...]) -> str | None:
        """``None`` when every guard holds for the call, else which one does not (said as
        ``name=value, traced with expected``)."""
        env: dict[Node, Any] = dict(zip(self.placeholders, values))
        for node in self.nodes:
            if node.op == "placeholder":
                continue
            try:
                if node.op == "call_function" and node.target in GUARDS:
                    read, expected = node.args[0], _plain(node.args[1])
                    value = env[read] if isinstance(read, Node) else read
                    if not passes(node.target, value, expected):
                        return f"{node.args[3]}={_short(value)}, traced with {expected!r}"
                    continue
                env[node] = _evaluate(node, env, module)
            except Exception:  # noqa: BLE001 - a read the call cannot answer: it does not fit
                return f"{node.name} cannot be read on this call"
        return None


def _plain(value: Any) -> Any:
    """A constant of a node's arguments as the generated code spells it: a plain ``dict`` or
    ``list``, not torch.fx's immutable ones (guards compare types)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(_plain(v) for v in value)
    return value


def _short(value: Any) -> str:
    """``value`` as a guard's message shows it (a mapping by its keys, an object by its class)."""
    if isinstance(value, dict):
        return f"<keys {sorted(value)}>"
    text = repr(value) if is_guardable(value) else f"<{type(value).__name__}>"
    return text if len(text) <= 80 else text[:77] + "..."


def _evaluate(node: Node, env: dict[Node, Any], module: nn.Module) -> Any:
    """What the pure read ``node`` gives on the call (``env``: the values of earlier nodes)."""

    def value(x: Any) -> Any:
        return env[x] if isinstance(x, Node) else x

    args = fx.node.map_aggregate(node.args, value)
    kwargs = fx.node.map_aggregate(node.kwargs, value)
    if node.op == "get_attr":
        return resolve_attr(module, str(node.target))
    if node.op == "call_method":
        return getattr(args[0], str(node.target))(*args[1:], **kwargs)
    return node.target(*args, **kwargs)


def _cone(value: Any) -> set[Node] | None:
    """The nodes ``value`` is read from, or ``None`` when one of them is not a pure read."""
    cone: set[Node] = set()
    stack = [value] if isinstance(value, Node) else []
    while stack:
        node = stack.pop()
        if node in cone:
            continue
        if not _pure(node):
            return None
        cone.add(node)
        stack.extend(node.all_input_nodes)
    return cone


def _pure(node: Node) -> bool:
    """Whether ``node`` only reads. Methods: those of dicts and tensor metadata, and by the
    naming convention ``get_*``, ``is_*``, ``has_*`` (a cache's ``get_seq_length()``)."""
    if node.op in ("placeholder", "get_attr"):
        return True
    if node.op == "call_function":
        return node.target in _PURE_FUNCTIONS or node.target in GUARDS
    return node.op == "call_method" and (node.target in _PURE_METHODS or str(
        node.target).startswith(_PURE_PREFIXES))


def _changed_before(cone: set[Node], guard: Node, order: dict[Node, int]) -> bool:
    """Whether something the block runs before ``guard`` may change what the guard reads (a
    method call on the cache it reads). Tensor metadata (``x.dtype``) never changes."""
    for node in cone:
        if all(_metadata_read(u) for u in node.users if u in cone):
            continue
        for user in node.users:
            if user not in cone and order[user] < order[guard] and not _pure(user):
                return True
    return False


def _metadata_read(node: Node) -> bool:
    """Whether ``node`` reads tensor metadata that nothing the block runs can change — narrower
    than :func:`fxsd.ops.is_metadata_read` (``requires_grad``, strides and contiguity can
    change within a block), because a guard checked before the block runs relies on it."""
    if node.op == "call_function" and node.target is getattr:
        return node.args[1] in _METADATA
    return node.op == "call_method" and node.target in ("dim", "size", "is_floating_point")


# -- tracing again -----------------------------------------------------------------------------


def _trace_again(block: nn.Module, values: tuple[Any, ...], path: str,
                 refused: str) -> FxsdGraphModule:
    """A variant of ``block`` for the call with these parameter values (see the module
    docstring); ``GuardError`` when it cannot be made."""
    from fxsd.by_example import record_calls
    from fxsd.units import _drift, registry, trace_unit

    shown = path or "<root>"
    view = _plain_view(block)
    args, kwargs = _call(_placeholders(block.graph), values)
    args, kwargs = _copied((args, kwargs), shown)
    leaves, autowrap = registry(None)
    try:
        with _quietly(view):
            recorded = record_calls(view, args, kwargs)
            at = path or _AT
            gm, calls = trace_unit(_holder(at, view), at, recorded[id(view)],
                                   [*_kept_whole(block), *leaves], autowrap)
            drift = _drift(gm, calls, recorded)
            if drift is None:
                cut = _gate_again(block, view, gm, calls, at)
    except FxsdError as exc:
        raise GuardError(f"'{shown}' was rewritten by fxsd for other calls than this one "
                         f"({refused}), and tracing it again on this call failed: {exc}") from exc
    if drift is not None:
        raise GuardError(f"'{shown}' was rewritten by fxsd for other calls than this one "
                         f"({refused}), and its trace on this call is not what it runs: {drift}")
    return _variant_module(block, view, cut)


def _holder(path: str, view: nn.Module) -> nn.Module:
    """Plain modules holding ``view`` at ``path``: the block is traced again where it was
    traced in its model, so its node names and messages are the same, and code that reads its
    own ``training`` flag stays switchable (as for any module traced under a prefix)."""
    *parents, name = path.split(".")
    root = node = nn.Module()
    for atom in parents:
        node._modules[atom] = nn.Module()
        node = node._modules[atom]
    node._modules[name] = view
    return root


def _call(names: Sequence[str], values: Sequence[Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The positional and keyword arguments that give ``forward`` these parameter values."""
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    keyword = False
    for name, value in zip(names, values):
        if name.startswith("**"):
            kwargs.update(value)
        elif name.startswith("*"):
            args.extend(value)
            keyword = True
        elif keyword:
            kwargs[name] = value
        else:
            args.append(value)
    return tuple(args), kwargs


def _detached_memo(value: Any, limit: int = 8) -> dict[int, Any]:
    """A ``deepcopy`` memo giving each tensor autograd computed that ``value`` holds (through
    containers and attributes, ``limit`` levels deep) a detached copy: such a tensor refuses
    ``deepcopy``, and a cache filled under autograd (a ``DynamicCache`` after a training
    forward) holds nothing else."""
    memo: dict[int, Any] = {}
    seen: set[int] = set()
    todo = [(value, 0)]
    while todo:
        item, depth = todo.pop()
        if id(item) in seen or depth > limit or isinstance(item, nn.Module):
            continue
        seen.add(id(item))
        if isinstance(item, torch.Tensor):
            if not item.is_leaf:
                memo[id(item)] = item.detach().clone()
                memo.setdefault(id(memo), []).append(item)  # deepcopy's keep-alive convention
            continue
        inside = item.values() if isinstance(item, dict) else item if isinstance(
            item, (list, tuple, set)) else vars(item).values() if hasattr(item, "__dict__") \
            else ()
        todo.extend((v, depth + 1) for v in inside)
    return memo


def _copied(value: Any, path: str) -> Any:
    """A copy of a call's arguments that tracing may run on and change (a cache fills up)."""
    if isinstance(value, torch.Tensor):
        copied = value.detach().clone()
        return copied.requires_grad_() if value.requires_grad else copied
    if is_guardable(value) or isinstance(value, nn.Module):
        return value
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(_copied(v, path) for v in value))
    if isinstance(value, (tuple, list)):
        return type(value)(_copied(v, path) for v in value)
    if type(value) is dict:
        return {k: _copied(v, path) for k, v in value.items()}
    try:
        return copy.deepcopy(value, _detached_memo(value))
    except Exception as exc:  # noqa: BLE001 - whatever deepcopy raises, the answer is the same
        raise GuardError(
            f"'{path}' must be traced again by fxsd for a call its trace did not see, on a copy "
            f"of its arguments, but a {type(value).__name__} cannot be copied ({exc})") from exc


def _plain_view(block: nn.Module) -> nn.Module:
    """An instance of the block's original class over the block's own children, parameters and
    buffers, without its gates and hooks: what is traced again."""
    source = _source_class(type(block))
    view = source.__new__(source)
    state = {k: v for k, v in block.__dict__.items()
             if k not in _GRAPH_MODULE_ATTRS and k != _TABLE}
    for name, value in state.items():
        if name.endswith(("_hooks", "_hooks_with_kwargs", "_hooks_always_called")):
            state[name] = type(value)()
    state["_modules"] = type(block._modules)(
        (k, m) for k, m in block._modules.items() if not isinstance(m, BranchGate))
    view.__dict__.update(state)
    return view


def _kept_whole(block: nn.Module) -> list[Any]:
    """The modules the block's graph (and its gates' branches) call whole: leaves again, so the
    new trace sees what the first one saw. Gated blocks inside are leaves too."""
    kept: dict[int, nn.Module] = {}
    owners = [block, *(g.branch for g in block.children() if isinstance(g, BranchGate))]
    for owner in owners:
        for node in owner.graph.nodes:
            if node.op == "call_module":
                module = owner.get_submodule(str(node.target))
                if not isinstance(module, BranchGate):
                    kept[id(module)] = module
    return [*kept.values(), FxsdGraphModule, BranchGate]


@contextlib.contextmanager
def _quietly(view: nn.Module) -> Iterator[None]:
    """Run the body leaving the model as it was: buffers, attributes, global generators (see
    :func:`fxsd.preserve.preserved`) and the gates' random stream; gates inside compute their
    branches without drawing (nor recording decisions for a checkpoint's replay)."""
    gates = [m for m in view.modules() if isinstance(m, BranchGate)]
    samplers = {id(g.sampler): (g.sampler, g.sampler.get_state()) for g in gates}
    with preserved(view), torch.no_grad():
        for gate in gates:
            gate.__dict__["forward"] = _undrawn(gate)
        try:
            yield
        finally:
            for gate in gates:
                gate.__dict__.pop("forward", None)
            for sampler, state in samplers.values():
                sampler.set_state(state)


def _undrawn(gate: BranchGate) -> Callable[..., Any]:
    """``gate``'s forward while tracing again: the branch always runs, nothing is drawn."""
    return gate.undrawn


# -- gating the new trace with the block's own gates ---------------------------------------------


def _gate_again(block: nn.Module, view: nn.Module, gm: fx.GraphModule, calls: Any,
                path: str) -> Any:
    """The new trace cut and gated with ``block``'s gates (an
    :class:`~fxsd.passes.extract_module.ExtractedModule`)."""
    from fxsd.owners import plan_owners
    from fxsd.passes.extract_module import extract_module
    from fxsd.residuals import analyze_graph

    released = _release_like(gm.graph, block.graph)
    analysis = analyze_graph(gm, calls, None, path)[0]
    owners = plan_owners(analysis)
    inner = sorted(o.path for o in owners if o.path != path)
    if inner:
        raise GuardError(f"traced again on this call, its joins belong to modules inside it "
                         f"({', '.join(inner)})")
    gates = {k: m for k, m in block._modules.items() if isinstance(m, BranchGate)}
    found: set[str] = set()
    cut = None
    for owner in owners:
        cut = extract_module(analysis, owner, view)
        order = node_order(cut.graph)
        rewritten: dict[Node, Node] = {}
        for site, name in zip(owner.sites, owner.gate_names):
            if name in gates:
                _gate_site(cut, analysis, site, (block, gates[name]), name, order,
                           rewritten)
                found.add(name)
    missing = sorted(set(gates) - found)
    if missing:
        rejected = "; ".join(f"{r.name}: {r.detail}" for r in analysis.rejected[:3])
        raise GuardError(f"traced again on this call, the joins of {', '.join(missing)} are not "
                         f"where they were (rejected adds: {rejected or 'none'})")
    if cut is None:
        raise GuardError("traced again on this call, it has no residual join fxsd gates")
    _restore_released(cut.graph, released)
    return cut


def _gate_site(cut: Any, analysis: Any, site: Any, owned: tuple[nn.Module, BranchGate],
               name: str, order: dict[Node, int], rewritten: dict[Node, Node]) -> None:
    """Replace ``site``'s add in ``cut`` by a call of the gate (``owned``: the block and its
    gate) running the new branch (the rewrite's own surgery, :mod:`fxsd.passes.gate_site`,
    with the gate's own settings); the new branch reads the block's children."""
    block, gate = owned
    drops: list[Node] = []
    if gate.drop_path in (DropPathAction.ADOPTED, DropPathAction.REPLACED):
        gm = analysis.graph_module
        drops = [n for n in site.branch if n.op == "call_module"
                 and is_drop_path(gm.get_submodule(str(n.target)))]
    piece = cut_site(cut, site, drops, rewritten, order, name)
    if gate.identity != piece.identity:
        raise GuardError(f"traced again on this call, the skip of {name} is another one")
    path = piece.escape_path.attach(block) if piece.escape_path is not None else None
    cut.extra_attrs[name] = GateView(gate, piece.branch_module.attach(block), path)
    call_gate(cut.graph, piece, name, rewritten, order)


def _output_pairs(new: Any, own: Any, found: list[tuple[Node, Any, Any]]) -> None:
    """Pairs of leaves at the same place in two graphs' outputs (``(node, container, key)``
    of ``new`` where ``own`` returns ``None``)."""
    if isinstance(new, (tuple, list)) and isinstance(own, (tuple, list)) \
            and len(new) == len(own):
        for i, (a, b) in enumerate(zip(new, own)):
            if isinstance(a, Node) and b is None:
                found.append((a, new, i))
            else:
                _output_pairs(a, b, found)
    elif isinstance(new, dict) and isinstance(own, dict) and new.keys() == own.keys():
        for key in new:
            if isinstance(new[key], Node) and own[key] is None:
                found.append((new[key], new, key))
            else:
                _output_pairs(new[key], own[key], found)


def _release_like(graph: Graph, own: Graph) -> list[tuple[Node, tuple[int, ...]]]:
    """Return ``None`` where the block's own graph does (a value of a branch the model drops,
    such as attention weights: the analysis must not take the output as a use), remembering
    what was there."""
    out = next(n for n in reversed(graph.nodes) if n.op == "output")
    own_out = next(n for n in reversed(own.nodes) if n.op == "output")
    structure = _thaw(out.args[0])
    pairs: list[tuple[Node, Any, Any]] = []
    _output_pairs(structure, own_out.args[0], pairs)
    if not pairs:
        return []
    released = []
    for node, container, key in pairs:
        container[key] = None
        released.append((node, _where(structure, container, key)))
    out.args = (_freeze(structure),)
    return released


def _restore_released(graph: Graph, released: list[tuple[Node, tuple[int, ...]]]) -> None:
    """Put back the released outputs that are still computed (not inside a branch)."""
    alive = set(graph.nodes)
    keep = [(node, where) for node, where in released if node in alive]
    if not keep:
        return
    out = next(n for n in reversed(graph.nodes) if n.op == "output")
    structure = _thaw(out.args[0])
    for node, where in keep:
        container = structure
        for key in where[:-1]:
            container = container[key]
        container[where[-1]] = node
    out.args = (_freeze(structure),)


def _thaw(value: Any) -> Any:
    """``value`` with its tuples as lists (to assign into), keeping other leaves."""
    if isinstance(value, (tuple, list)) and not hasattr(value, "_fields"):
        return [_thaw(v) for v in value] if isinstance(value, tuple) else \
            _Listed([_thaw(v) for v in value])
    if type(value) is dict:
        return {k: _thaw(v) for k, v in value.items()}
    return value


class _Listed(list):
    """A list that was a list (not a tuple) before :func:`_thaw`."""


def _freeze(value: Any) -> Any:
    """Undo :func:`_thaw`."""
    if isinstance(value, _Listed):
        return [_freeze(v) for v in value]
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    if type(value) is dict:
        return {k: _freeze(v) for k, v in value.items()}
    return value


def _where(structure: Any, container: Any, key: Any) -> tuple[Any, ...]:
    """The path of keys from ``structure`` to ``container[key]``."""
    if structure is container:
        return (key,)
    items = structure.items() if isinstance(structure, dict) else \
        enumerate(structure) if isinstance(structure, list) else ()
    for k, v in items:
        if isinstance(v, (list, dict)):
            found = _where(v, container, key)
            if found:
                return (k, *found)
    return ()


class GateView:
    """One of a block's gates, called from a variant: the gate itself (rate, mode, random
    stream, recorded decisions, hooks) running the variant's branch for the call."""

    def __init__(self, gate: BranchGate, branch: fx.GraphModule,
                 escape_path: EscapePath | None = None) -> None:
        self.gate = gate
        self.branch = branch
        self.escape_path = escape_path

    def __call__(self, *args: Any) -> Any:
        gate = self.gate
        state = gate.__dict__
        own = state["branch"], state.get("escape_path")
        compiled = state.pop("compiled_branch", None)
        state["branch"], state["escape_path"] = self.branch, self.escape_path
        try:
            return gate(*args)
        finally:
            state["branch"], state["escape_path"] = own
            if compiled is not None:
                state["compiled_branch"] = compiled


def _variant_module(block: nn.Module, view: nn.Module, cut: Any) -> FxsdGraphModule:
    """The variant: ``cut``'s graph over the block's own (live) children, parameters and
    buffers, with its gate views and constants as plain attributes."""
    for node in reversed(cut.graph.nodes):  # shape reads left behind by the branches
        if not node.users and is_metadata_read(node):
            cut.graph.erase_node(node)
    for node in cut.graph.nodes:  # the guards name the block in the model
        if node.op == "call_function" and node.target in GUARDS:
            node.args = (node.args[0], node.args[1], _path(block), *node.args[3:])
    cut.graph.lint()
    module = module_from_graph(view, cut.graph, keep_class=False)
    module.__dict__.update(_parameters=block._parameters, _buffers=block._buffers,
                           _modules=block._modules)
    module.__dict__.update(cut.extra_attrs)
    return module
