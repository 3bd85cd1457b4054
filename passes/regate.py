"""A block's new trace gated with the block's own gates: the re-gating of a variant
(:mod:`fxsd.runtime._retrace`).

The new trace is analysed like any graph and its joins are found again by gate name; each one is
cut with the rewrite's own surgery (:mod:`fxsd.passes.gate_site`) and called through a
:class:`GateView`: the block's gate itself (rate, mode, random stream, recorded decisions)
running the variant's branch. Outputs the block's own graph returns as ``None`` (a value of a
branch the model drops) are released while the analysis runs, so they do not count as uses, and
put back afterwards. A join the block's own trace did not gate stays a plain add.
"""

from __future__ import annotations

from typing import Any

from torch import fx, nn
from torch.fx import Graph, Node

from fxsd.analysis.residuals import analyze_graph
from fxsd.analysis.units import _drift, registry, trace_unit
from fxsd.decisions.owners import plan_owners
from fxsd.errors import GuardError
from fxsd.passes.extract_module import extract_module
from fxsd.passes.gate_site import gate_sites
from fxsd.runtime.escape_path import EscapePath
from fxsd.runtime.gate import BranchGate
from fxsd.runtime.gate_info import DropPathAction
from fxsd.tracing.drop_paths import is_drop_path
from fxsd.tracing.example_run import record_calls

__all__ = ["GateView", "trace_again"]


def trace_again(block: nn.Module, view: nn.Module, holder: nn.Module, at: str,
                args: tuple[Any, ...], kwargs: dict[str, Any], kept_whole: list[Any]
                ) -> tuple[Any, str | None]:
    """``view`` (a plain view of the gated ``block``, held at path ``at`` in ``holder``) traced
    by example on this call and gated with ``block``'s gates: ``(cut, None)``, or
    ``(None, why)`` when the trace is not what the block runs. ``kept_whole``: the modules the
    block's own graph calls whole. What :class:`~fxsd.record.FxsdRecord.regate` holds: the
    runtime (:mod:`fxsd.runtime._retrace`) calls it through the record."""
    leaves, autowrap = registry(None)
    recorded = record_calls(view, args, kwargs)
    gm, calls = trace_unit(holder, at, recorded[id(view)], [*kept_whole, *leaves], autowrap)
    drift = _drift(gm, calls, recorded)
    if drift is not None:
        return None, drift
    return _gate_again(block, view, gm, calls, at), None


def _gate_again(block: nn.Module, view: nn.Module, gm: fx.GraphModule, calls: Any,
                path: str) -> Any:
    """The new trace cut and gated with ``block``'s gates (an
    :class:`~fxsd.passes.extract_module.ExtractedModule`)."""
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
        own = [(site, name) for site, name in zip(owner.sites, owner.gate_names) if name in gates]
        gate_sites(cut, [(site, name, _drop_paths(analysis, site, gates[name]))
                         for site, name in own],
                   lambda site, name, piece: _gate_view(block, gates[name], name, piece))
        found.update(name for _, name in own)
    missing = sorted(set(gates) - found)
    if missing:
        rejected = "; ".join(f"{r.name}: {r.detail}" for r in analysis.rejected[:3])
        raise GuardError(f"traced again on this call, the joins of {', '.join(missing)} are not "
                         f"where they were (rejected adds: {rejected or 'none'})")
    if cut is None:
        raise GuardError("traced again on this call, it has no residual join fxsd gates")
    _restore_released(cut.graph, released)
    return cut


def _drop_paths(analysis: Any, site: Any, gate: BranchGate) -> list[Node]:
    """The drop-path calls in ``site``'s new branch that the gate took over (adopted or
    replaced), taken out as the rewrite took them out."""
    if gate.drop_path not in (DropPathAction.ADOPTED, DropPathAction.REPLACED):
        return []
    gm = analysis.graph_module
    return [n for n in site.branch if n.op == "call_module"
            and is_drop_path(gm.get_submodule(str(n.target)))]


def _gate_view(block: nn.Module, gate: BranchGate, name: str, piece: Any) -> GateView:
    """The block's own ``gate`` running the new branch ``piece`` (which reads the block's
    children), with the gate's own settings."""
    if gate.identity != piece.identity:
        raise GuardError(f"traced again on this call, the skip of {name} is another one")
    path = piece.escape_path.attach(block) if piece.escape_path is not None else None
    return GateView(gate, piece.branch_module.attach(block), path)


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

