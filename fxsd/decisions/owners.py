"""Which modules fxsd rewrites, and what each keeps as whole calls: ``plan_owners``.

fxsd gates a residual join inside the module that owns it, so the rest of the model keeps its
modules, hooks and class. The **owner** of a site is the innermost module call (on the stack of
the call performing the add) that

* is the only call of its module in the traced forward (a module applied at several depths,
  ALBERT-style, would need one gate per call: its sites go to the caller that makes the calls);
* created the add, the branch and the skip path, and created or received as arguments the fork
  and the branch's side inputs;
* can be cut out of the whole-model graph as a function of its arguments: it reads nothing from
  outside except its arguments and its own parameters, nothing it computes is used outside except
  through its return value, its constant arguments can be guarded, and every module and attribute
  it uses lives under it.

The root qualifies whenever nothing smaller does. Inside an owner, each module call it makes stays
one ``call_module`` (hooks fire, FSDP and checkpoint wrappers apply) unless the rewrite must see
inside it: it performs the owner's add or holds a drop path the rewrite removes, it lies partly
inside and partly outside a branch, or it cannot be cut out itself. Such calls are *inlined*: their
nodes are copied into the owner's graph. A call that owns sites of its own but must be inlined
hands them to the enclosing owner.

Everything here is pure analysis: nothing is traced or changed.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.fx import Node

from fxsd.analysis.sites import ResidualAnalysis, ResidualSite
from fxsd.errors import RootJoinsWarning
from fxsd.tracing.calls import CallTree, ModuleCall, bound_parameters, leaves, node_leaves
from fxsd.tracing.drop_paths import is_drop_path
from fxsd.tracing.guards import is_guardable, is_literal
from fxsd.tracing.ops import node_order, resolve_attr
from fxsd.tracing.tracer import reads_flag_only

__all__ = ["Owner", "plan_owners", "ROOT", "argument_tensors",
           "other_entry_points", "reads_argument", "warn_root_joins"]

#: The owner index of the root module.
ROOT = None


@dataclass(frozen=True)
class Owner:
    """A module fxsd rewrites as a gated GraphModule.

    Attributes:
        call: index of its call in the trace's :class:`~fxsd.tracing.calls.CallTree` (``None``: the
            module the graph traced, the model itself or, for a module traced on its own, it).
        path: its qualified name in the model (``""``: the root).
        sites: the residual sites it gates, in execution order.
        gate_names: the attribute name of each site's gate on the rewritten module.
        inline: calls under it whose nodes are copied into its graph instead of kept as calls.
    """

    call: int | None
    path: str
    sites: tuple[ResidualSite, ...]
    gate_names: tuple[str, ...]
    inline: frozenset[int]

    def gate_path(self, i: int) -> str:
        """Qualified name of site ``i``'s gate in the model."""
        return f"{self.path}.{self.gate_names[i]}" if self.path else self.gate_names[i]


def plan_owners(analysis: ResidualAnalysis,
                sites: Sequence[ResidualSite] | None = None) -> list[Owner]:
    """The modules to rewrite for ``sites`` (default: every site), deepest first.

    Example:
        >>> import torchvision, fxsd
        >>> from fxsd.decisions.owners import plan_owners
        >>> owners = plan_owners(fxsd.analyze_residuals(torchvision.models.vit_b_16()))
        >>> owners[0].path, owners[0].gate_names
        ('encoder.layers.encoder_layer_0', ('self_attention_gate', 'mlp_gate'))
    """
    if analysis.units:  # modules traced one by one: plan each
        chosen = None if sites is None else {id(s) for s in sites}
        return [owner for unit in analysis.units for owner in plan_owners(
            unit, None if chosen is None else [s for s in unit.sites if id(s) in chosen])]
    sites = list(analysis.sites if sites is None else sites)
    if not sites:
        return []
    return _Planner(analysis).plan(sites)


class _Planner:
    def __init__(self, analysis: ResidualAnalysis) -> None:
        self.analysis = analysis
        self.gm = analysis.graph_module
        self.tree: CallTree | None = analysis.calls
        self._clean: dict[tuple[int, bool], bool] = {}

    # -- the owner of one site ---------------------------------------------------------------
    def plan(self, sites: list[ResidualSite]) -> list[Owner]:
        owner_of = [self.owner(site) for site in sites]
        while True:
            by_owner: dict[int | None, list[int]] = {}
            for i, k in enumerate(owner_of):
                by_owner.setdefault(k, []).append(i)
            inline = {k: self.inline_set(k, [sites[i] for i in v]) for k, v in by_owner.items()}
            moved = False
            for k, calls in inline.items():
                for other in by_owner:
                    if other is not None and other in calls:  # an owner that must be inlined
                        for i in by_owner[other]:
                            owner_of[i] = k
                        moved = True
            if not moved:
                break
        owners = [self._owner(k, [sites[i] for i in v], inline[k]) for k, v in by_owner.items()]
        order = self.analysis.order or node_order(self.gm.graph)
        owners.sort(key=lambda o: (-self.depth(o.call), order[o.sites[0].add]))
        return owners

    def depth(self, index: int | None) -> int:
        return 0 if index is None else len(self.tree.ancestors(index)) + 1

    def owner(self, site: ResidualSite) -> int | None:
        if self.tree is None:
            return ROOT
        for index in reversed(self.tree.chain(site.add)):
            if self.can_own(index, site):
                return index
        return ROOT

    def can_own(self, index: int, site: ResidualSite) -> bool:
        tree = self.tree
        if not tree.is_unique(index) or not self.clean(index):
            return False
        given = set(tree.inputs(index))
        # the branch must start inside: a branch node handed in as an argument would leave
        # the cut's branch computed from that argument rather than from the fork
        if not all(n.op == "get_attr" or tree.in_region(n, index) for n in site.branch):
            return False
        inside = (*site.skip_path, site.add, site.fork, *site.side_inputs)
        return all(tree.in_region(n, index) or n in given for n in inside)

    def clean(self, index: int, as_call: bool = False) -> bool:
        """Whether call ``index`` can be cut out as a function of its arguments (``as_call``:
        kept whole as one call of its module, which may then hand itself to a function, as a
        Hugging Face attention module hands itself to its attention kernel)."""
        key = (index, as_call)
        if key not in self._clean:
            tree = self.tree
            call = tree.calls[index]
            reads, escapes = tree.boundary(index)
            constants = [v for v in leaves((call.args, call.kwargs))
                         if not isinstance(v, (Node, torch.Tensor))]
            ok = not reads and not escapes and all(is_literal(v) for v in constants)
            ok = ok and _binds(call) and self._owns_its_attributes(index, as_call)
            self._clean[key] = ok
        return self._clean[key]

    def _owns_its_attributes(self, index: int, as_call: bool = False) -> bool:
        """Every module and tensor the call's region uses lives under the called module (or is a
        stateless object fxsd can hand it, such as a constant tensor or a drop-path module)."""
        tree = self.tree
        prefix = tree.calls[index].path + "." if tree.calls[index].path else ""
        for n in tree.region(index):
            paths = []
            if n.op in ("call_module", "get_attr"):
                paths.append(str(n.target))
            for a in n.all_input_nodes:
                if a.op == "get_attr":
                    paths.append(str(a.target))
            for path in paths:
                if path == tree.calls[index].path and (as_call or _reads_flag_only(n, path)):
                    continue  # itself: its own ``self.training`` (the rewrite reads the flag)
                if reads_argument(self.gm, path, tree.calls[index], prefix):
                    continue  # a tensor it was passed: the rewrite reads the argument
                if not path.startswith(prefix) and not _stateless(self.gm, path):
                    return False
        for child in tree.children(index):
            if not tree.calls[child].path.startswith(prefix):
                return False
        return True

    # -- inside an owner ---------------------------------------------------------------------
    def inline_set(self, owner: int | None, sites: list[ResidualSite]) -> frozenset[int]:
        """The calls under ``owner`` that its graph must copy rather than call."""
        if self.tree is None:
            return frozenset()
        protected = {s.add for s in sites}
        for s in sites:  # a skipped branch computes what escapes it from the nodes inside
            if s.escapes is not None:
                e = s.escapes
                protected.update((*e.values, *e.moved, *e.abstract, *e.shapes, *e.real))
        for s in sites:
            protected.update(n for n in s.branch if n.op == "call_module"
                             and is_drop_path(self.gm.get_submodule(str(n.target))))
        branches = [set(s.branch) for s in sites]
        inline: set[int] = set()
        todo = self.tree.children(owner)
        while todo:
            child = todo.pop()
            if self.keeps_whole(child, protected, branches):
                continue
            inline.add(child)
            todo.extend(self.tree.children(child))
        return frozenset(inline)

    def keeps_whole(self, index: int, protected: set[Node], branches: list[set[Node]]) -> bool:
        """Whether the owner's graph can keep call ``index`` as one call: it can be cut out, does
        not hold a node the rewrite edits, and lies wholly outside each branch or has nothing
        but its result used outside the part of it inside the branch."""
        if not self.clean(index, as_call=True):
            return False
        region = [n for n in self.tree.region(index) if n.op != "get_attr"]
        if any(n in protected for n in region):
            return False
        inside = set(region)
        for branch in branches:
            hits = [n in branch for n in region]
            # its nodes outside the branch (a rotary embedding's ``cos.unsqueeze(1)``, which
            # reads only a side input) run inside the call, in the branch, when the call is kept
            if any(hits) and not all(h or all(u in inside for u in n.users)
                                     for n, h in zip(region, hits)):
                return False
        return True

    # -- names -------------------------------------------------------------------------------
    def _owner(self, index: int | None, sites: list[ResidualSite],
               inline: frozenset[int]) -> Owner:
        root = self.analysis.path  # the module this graph traced: the model, or one module
        path = root if index is None else self.tree.calls[index].path
        module = self.gm.get_submodule(root) if index is None else self.tree.calls[index].module
        names = self.gate_names(module, path, sites)
        return Owner(index, path, tuple(sites), tuple(names), inline)

    def gate_names(self, module: nn.Module, path: str, sites: list[ResidualSite]) -> list[str]:
        """``residual_gate`` for a module with one site; otherwise named after the module
        performing the add (relative to the owner) and, where that module performs several
        joins, after the heaviest module in each branch (``self_attention_gate``, ``mlp_gate``).
        """
        if len(sites) == 1:
            return [_free(module, "residual_gate", set())]
        performer = [s.module_path for s in sites]
        count: dict[str, int] = {}
        for p in performer:
            count[p] = count.get(p, 0) + 1
        taken: set[str] = set()
        names = []
        for site, p in zip(sites, performer):
            rel = _relative(p, path)
            what = self.heaviest(site, p) if count[p] > 1 else ""
            base = "_".join(x for x in (rel.replace(".", "_"), what) if x) or "residual"
            name = _free(module, f"{base}_gate", taken)
            taken.add(name)
            names.append(name)
        return names

    def heaviest(self, site: ResidualSite, performer: str) -> str:
        """The attribute (under ``performer``) of the branch's largest module, by parameters."""
        prefix = performer + "." if performer else ""
        best, best_params = "", -1
        for n in site.branch:
            if n.op == "call_module":
                where = str(n.target)
            elif self.tree is not None and self.tree.innermost(n) is not None:
                where = self.tree.innermost(n).path
            else:
                continue
            if not where.startswith(prefix) or where == performer:
                continue
            top = where[len(prefix):].split(".")[0]
            try:
                params = sum(p.numel() for p in
                             self.gm.get_submodule(prefix + top).parameters())
            except AttributeError:
                params = 0
            if params > best_params:
                best, best_params = top, params
        return best


def _relative(path: str, owner: str) -> str:
    if not owner:
        return path
    return path[len(owner) + 1:] if path.startswith(owner + ".") else ""


def _free(module: nn.Module, base: str, taken: set[str]) -> str:
    name, i = base, 1
    while name in taken or hasattr(module, name):
        name, i = f"{base}_{i}", i + 1
    return name


def _binds(call: ModuleCall) -> bool:
    """Whether the call's arguments can become the placeholders (and guards) of a module cut
    out of the trace: they fit its ``forward``, and each holds graph values, is guardable, or
    holds tensors the tracer passed as they are (:func:`argument_tensors`)."""
    try:
        arguments = bound_parameters(inspect.signature(call.module.forward), call.args,
                                     call.kwargs)
    except (TypeError, ValueError):
        return False
    return all(value is inspect.Parameter.empty or node_leaves(value) or is_guardable(value)
               or _tensors_and_literals(value) for _, value in arguments)


def _tensors_and_literals(value: object) -> bool:
    found = leaves(value)
    return any(isinstance(v, torch.Tensor) for v in found) and all(
        isinstance(v, (torch.Tensor, Node)) or is_guardable(v) for v in found)


def argument_tensors(call: ModuleCall) -> dict[int, torch.Tensor]:
    """The tensors ``call`` received as they are, by ``id``: not as graph values.

    torch.fx proxies a module's parameters but hands its buffers to the code as real tensors
    (``proxy_buffer_attributes`` is off): open_clip's ``CLIP.encode_text`` passes its causal
    mask buffer, ``self.attn_mask``, down to every text block, and each block's code received
    the buffer itself. Where that code used it, the tracer recorded a ``get_attr`` of the
    buffer's path in the root. A module cut out of the trace reads such a tensor from its
    argument instead (:func:`reads_argument`): the tensor a later caller passes, wherever it
    lives. Any tensor counts, found by identity: a buffer, a plain tensor attribute (the tracer
    stores it on the root as ``_tensor_constant0``), a tensor made outside the trace.
    """
    return {id(v): v for v in leaves((call.args, call.kwargs)) if isinstance(v, torch.Tensor)}


def reads_argument(gm: nn.Module, target: str, call: ModuleCall, prefix: str) -> bool:
    """Whether a ``get_attr`` of ``target`` (a path in the traced ``gm``) inside ``call`` reads
    one of the tensors the call received (:func:`argument_tensors`) from outside the called
    module (``prefix``: its path and a dot). The module's own state stays its own."""
    if target.startswith(prefix):
        return False
    try:
        obj = resolve_attr(gm, target)
    except AttributeError:
        return False
    return isinstance(obj, torch.Tensor) and id(obj) in argument_tensors(call)


def _stateless(gm: nn.Module, target: str) -> bool:
    try:
        obj = resolve_attr(gm, target)
    except AttributeError:
        return False
    if isinstance(obj, nn.Parameter):
        return False
    if isinstance(obj, torch.Tensor):
        return True
    if isinstance(obj, nn.Module):
        return next(obj.parameters(), None) is None and next(obj.buffers(), None) is None
    return True



def _reads_flag_only(node: Node, path: str) -> bool:
    """Whether ``node`` uses the module at ``path`` only for its training flag (it is, or
    reads, a ``get_attr`` of that module that feeds nothing but ``if_training``)."""
    read = node if node.op == "get_attr" else next(
        (a for a in node.all_input_nodes if a.op == "get_attr" and str(a.target) == path), None)
    return read is not None and reads_flag_only(read)


def other_entry_points(model: nn.Module) -> list[str]:
    """The public methods of ``model``'s class, other than ``forward``, that use its children.

    The rule: functions defined in the body of ``type(model)`` or of a base class below
    :class:`torch.nn.Module` (torch's own classes left out), whose name does not start with
    ``_``, and whose code (nested functions and comprehensions included) names one of the
    model's direct children (``self.transformer``) — open_clip's ``CLIP.encode_text``, a
    ``Model.embed``. A method that reaches children only through ``getattr`` or helpers is not
    seen.
    """
    children = set(model._modules)
    found: list[str] = []
    for klass in type(model).__mro__:
        if klass is nn.Module or not issubclass(klass, nn.Module):
            break
        if klass.__module__.split(".")[0] == "torch" or klass.__module__.startswith("fxsd."):
            continue
        for name, value in vars(klass).items():
            if name.startswith("_") or name == "forward" or name in found \
                    or not inspect.isfunction(value):
                continue
            if children & _code_names(value.__code__):
                found.append(name)
    return found


def _code_names(code: object) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if inspect.iscode(const):
            names |= _code_names(const)
    return names


def warn_root_joins(model: nn.Module, owners: Sequence[Owner], stacklevel: int) -> None:
    """Warn (:class:`RootJoinsWarning`) when the root owns joins and its class has other entry
    points (:func:`other_entry_points`): the gates live in the rewritten ``forward`` only."""
    root = [o for o in owners if o.call is ROOT and not o.path]
    methods = other_entry_points(model) if root else []
    if not methods:
        return
    performers = sorted({s.module_path or "<root>" for o in root for s in o.sites})
    names = ", ".join(f"{m}()" for m in methods)
    warnings.warn(
        f"{len(root[0].sites)} residual join(s) of {type(model).__name__} (performed by "
        f"{', '.join(performers)}) can only be gated in the root's rewritten forward; its "
        f"other methods ({names}) run the class's own code and never drop them. Call the model "
        "in training, or give each join a module of its own whose forward performs it (and "
        "receives what its branch reads as arguments).",
        RootJoinsWarning, stacklevel=stacklevel + 1)
