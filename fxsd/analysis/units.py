"""Modules traced one by one: when a model cannot be traced whole, or a module must stay opaque.

The analysis normally traces the whole model once. Two cases need more:

* **timm's not-traceable modules.** timm registers the modules and functions that ``torch.fx``
  cannot trace (``timm.layers.get_notrace_modules`` / ``get_notrace_functions``); fxsd honours
  that registry whenever timm is installed, on top of ``leaf_modules``. Such a module is an
  opaque call in the model's graph, but it may own residual joins itself (timm's
  ``TinyVitBlock``): :func:`analyze_nested` traces each one on its own, by example (on the
  example inputs given, else on a random input of the size the timm model declares in
  ``pretrained_cfg["input_size"]``), and counts its joins as depth levels at its call.
* **Models whose root cannot be traced** (every Hugging Face transformers 5.x model).
  :func:`analyze_by_example` runs the model once on the example inputs, records each module's
  call, and traces the largest traceable modules along their recorded calls
  (:class:`~fxsd.tracing.by_example.ExampleTracer`), descending into a module's children only when
  the module itself cannot be traced. A child whose tracing fails inside a traced module is kept as
  an opaque call (and tried on its own). Hugging Face attention modules are traced through;
  only the attention kernel they dispatch to through ``ALL_ATTENTION_FUNCTIONS`` stays one call
  (:mod:`fxsd.tracing.hf`), so ``is_causal``, attention dropout and shapes stay live. Modules that
  could not be traced are reported with the reason. An activation-checkpoint wrapper is never a unit
  itself: the module it wraps is, so the wrapper stays around the gated module and checkpoints
  it.

Both run the model (or a unit) once; :func:`fxsd.analysis.analyze.analyze_residuals` runs them under
:func:`fxsd.preserve.preserved`, so BatchNorm statistics, flags and the RNGs come back as they
were.

Depths: a module analysed on its own adds its levels at its call in its caller's graph (by
example too: a module a traced unit keeps opaque); units with no traced caller follow each other
in the order they first ran.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule, Node

from fxsd.analysis._free_nones import trace_freeing_nones
from fxsd.analysis.node_costs import NodeProfile
from fxsd.analysis.residuals import analyze_graph
from fxsd.analysis.sites import ResidualAnalysis
from fxsd.arguments import LeafSpec
from fxsd.errors import TraceError
from fxsd.tracing.calls import CallTree
from fxsd.tracing.drop_paths import is_drop_path
from fxsd.tracing.example_run import RecordedCall, record_calls
from fxsd.tracing.guards import is_guardable
from fxsd.tracing.hf import is_hf_attention
from fxsd.tracing.tracer import (
    _checkpoint_wrapped,
    _validate_leaves,
)

__all__ = ["registry", "analyze_nested", "analyze_by_example", "trace_unit", "reporting"]

# Called with a module's path as tracing it on its own begins (see reporting()).
_progress: ContextVar[Callable[[str], None] | None] = ContextVar("fxsd_unit_progress",
                                                                 default=None)


@contextmanager
def reporting(callback: Callable[[str], None]) -> Iterator[None]:
    """Within the block, :func:`trace_unit` calls ``callback(path)`` as it starts tracing each
    module on its own (by example, or a timm not-traceable module): ``fxsd inspect`` shows
    progress with it while a large model (a 32-layer decoder) is traced, seconds per layer."""
    token = _progress.set(callback)
    try:
        yield
    finally:
        _progress.reset(token)

# Each failed trace of a unit keeps one more inner module whole and traces again; past this many
# the unit is reported as not traced and its children are tried instead.
_RETRIES = 32


def registry(leaf_modules: Iterable[LeafSpec] | None) -> tuple[list[LeafSpec], tuple[Any, ...]]:
    """The leaves to trace with (the user's and timm's registry) and the functions to keep as
    single calls (timm's registry)."""
    leaves: list[LeafSpec] = [*_validate_leaves(leaf_modules), *_notrace_types()]
    try:
        from timm.layers import get_notrace_functions
    except ImportError:
        return leaves, ()
    return leaves, tuple(get_notrace_functions())


def _notrace_types() -> tuple[type, ...]:
    try:
        from timm.layers import get_notrace_modules
    except ImportError:
        return ()
    return tuple(get_notrace_modules())


def _may_own_joins(module: nn.Module) -> bool:
    """Whether an opaque call might hide residual joins worth tracing on its own."""
    if is_drop_path(module) or is_hf_attention(module):
        return False
    if any(True for _ in module.children()):
        return True  # torch.nn's containers and transformer layers included
    # a module of its own may join with raw parameters; torch.nn's single layers never do
    return not type(module).__module__.startswith(("torch.nn", "torch.ao.nn")) \
        and any(True for _ in module.parameters())


def analyze_nested(model: nn.Module, gm: GraphModule, calls: CallTree | None,
                   profiles: dict[Node, NodeProfile] | None, leaves: list[LeafSpec],
                   autowrap: tuple[Any, ...],
                   examples: tuple[tuple, dict] | None) -> ResidualAnalysis:
    """The analysis of the whole-model graph ``gm``, with each call of a timm not-traceable
    module that may own joins traced and analysed on its own."""
    notrace = _notrace_types()
    drawn = _drawn(gm)
    nested = [n for n in gm.graph.nodes if n.op == "call_module" and (
              str(n.target) in drawn or notrace
              and isinstance(gm.get_submodule(str(n.target)), notrace)
              and _may_own_joins(gm.get_submodule(str(n.target))))]
    if not nested:
        return analyze_graph(gm, calls, profiles)[0]
    examples = examples or _declared_example(model)
    recorded = record_calls(model, *examples) if examples else {}
    units: list[tuple[Node, list[ResidualAnalysis], int]] = []
    untraced: list[tuple[str, str, str]] = []
    done: set[int] = set()
    for node in nested:
        module = gm.get_submodule(str(node.target))
        if id(module) in done:
            continue
        done.add(id(module))
        if str(node.target) in drawn:  # kept whole: its children are traced instead
            untraced.append((str(node.target), type(module).__name__, drawn[str(node.target)]))
            units.append((node, *_inside(model, str(node.target), recorded, leaves, autowrap,
                                         untraced)))
            continue
        try:
            unit_gm, unit_calls = trace_unit(model, str(node.target),
                                              recorded.get(id(module)), leaves, autowrap)
        except TraceError as exc:
            untraced.append((str(node.target), type(module).__name__, _reason(exc)))
            continue
        units.append((node, *_traced_block(model, unit_gm, unit_calls, str(node.target),
                                           recorded, leaves, autowrap, untraced)))
    root, offsets = analyze_graph(gm, calls, profiles, "",
                                  {node: levels for node, _, levels in units})
    shifted = [_shift(unit, offsets[node]) for node, parts, _ in units for unit in parts]
    return _combine([root, *shifted], untraced, root.num_levels)


def _drawn(gm: GraphModule) -> dict[str, str]:
    """The modules ``gm``'s trace kept whole because their own code draws random numbers
    (:func:`fxsd.tracing.tracer.trace_calls`), with the reason."""
    record = gm.meta.get("fxsd")
    return {path: why for path, _, why in getattr(record, "untraced", ())}


def _traced_block(model: nn.Module, gm: GraphModule, calls: CallTree | None, path: str,
                  recorded: dict[int, RecordedCall], leaves: list[LeafSpec],
                  autowrap: tuple[Any, ...], untraced: list[tuple[str, str, str]]
                  ) -> tuple[list[ResidualAnalysis], int]:
    """The analysis of the unit ``gm`` traced at ``path``, with the joins inside the modules
    its trace kept whole because they draw random numbers (:func:`_inside`) placed at their
    calls; and the levels it spans."""
    drawn = _drawn(gm)
    inner: dict[Node, tuple[list[ResidualAnalysis], int]] = {}
    for node in gm.graph.nodes:
        target = str(node.target)
        if node.op == "call_module" and target in drawn and node not in inner:
            untraced.append((target, type(gm.get_submodule(target)).__name__, drawn[target]))
            inner[node] = _inside(model, target, recorded, leaves, autowrap, untraced)
    unit, offsets = analyze_graph(gm, calls, None, path,
                                  {node: levels for node, (_, levels) in inner.items()})
    return [unit, *(_shift(part, offsets[node]) for node, (parts, _) in inner.items()
                    for part in parts)], unit.num_levels


def _inside(model: nn.Module, path: str, recorded: dict[int, RecordedCall],
            leaves: list[LeafSpec], autowrap: tuple[Any, ...],
            untraced: list[tuple[str, str, str]]) -> tuple[list[ResidualAnalysis], int]:
    """The joins inside the module at ``path``, which is kept whole because its own code draws
    random numbers (its control flow keeps running as written): each child that may own joins
    traced on its own (by example where the example run called it), a child that cannot be
    traced, or a container, searched in turn. Children count their levels one after the other
    in the order they are registered (which module runs after which is the module's own
    code's, which no graph shows). Returns the analyses and the levels they span."""
    parts: list[ResidualAnalysis] = []
    offset = 0
    for name, child in model.get_submodule(path).named_children():
        child_path = f"{path}.{name}"
        if not _may_own_joins(child):
            continue
        found: tuple[list[ResidualAnalysis], int] | None = None
        if _checkpoint_wrapped(child) is None and type(child).forward is not nn.Module.forward:
            try:
                unit_gm, unit_calls = trace_unit(model, child_path, recorded.get(id(child)),
                                                 leaves, autowrap)
                found = _traced_block(model, unit_gm, unit_calls, child_path, recorded,
                                      leaves, autowrap, untraced)
            except TraceError as exc:
                untraced.append((child_path, type(child).__name__, _reason(exc)))
        if found is None:  # a container, a checkpoint wrapper, or not traceable: its children
            found = _inside(model, child_path, recorded, leaves, autowrap, untraced)
        parts += [_shift(part, offset) for part in found[0]]
        offset += found[1]
    return parts, offset


def _declared_example(model: nn.Module) -> tuple[tuple, dict] | None:
    """An input of the size a timm model declares (``pretrained_cfg["input_size"]``), random."""
    cfg = getattr(model, "pretrained_cfg", None)
    size = cfg.get("input_size") if isinstance(cfg, dict) else None
    if not (isinstance(size, (tuple, list)) and all(isinstance(d, int) for d in size)):
        return None
    param = next(model.parameters(), None)
    kw = {} if param is None else {"device": param.device, "dtype": param.dtype}
    return (torch.randn(1, *size, generator=torch.Generator().manual_seed(0)).to(**kw),), {}


@dataclass
class _Placed:
    """Traced units whose depths are counted from 0 among themselves, placed as one block.

    ``order`` is where the block starts in the example run (its first call's start), ``levels``
    how many depth levels it spans, and ``parts`` its units' analyses with that start order.
    """

    order: int
    levels: int
    parts: list[tuple[int, ResidualAnalysis]]


def _stack(blocks: list[_Placed]) -> _Placed:
    """Blocks that ran one after the other (siblings whose caller was not traced, so no graph
    says how data flows between them): each one's levels follow the earlier ones', in the order
    they started in the example run."""
    offset, parts = 0, []
    for block in sorted(blocks, key=lambda b: b.order):
        parts += [(order, _shift(unit, offset)) for order, unit in block.parts]
        offset += block.levels
    return _Placed(min((b.order for b in blocks), default=0), offset, parts)


def analyze_by_example(model: nn.Module, args: tuple, kwargs: dict, leaves: list[LeafSpec],
                       autowrap: tuple[Any, ...]) -> ResidualAnalysis:
    """The analysis of ``model`` traced module by module along one recorded forward call.

    Depths follow the data flow: a unit traced on its own because its caller's trace keeps it
    opaque counts as levels at its call node in the caller's graph (as a timm not-traceable
    module does in :func:`analyze_nested`), so along the caller's longest chain of joins it sits
    between the joins that run before and after it; units with no traced caller follow each other
    in the order they started in the example run.
    """
    recorded = record_calls(model, args, kwargs)
    untraced: list[tuple[str, str, str]] = []
    done: set[int] = set()

    def descend(module: nn.Module, path: str) -> list[_Placed]:
        return [block for name, child in module.named_children()
                for block in visit(child, f"{path}.{name}" if path else name)]

    def visit(module: nn.Module, path: str) -> list[_Placed]:
        call = recorded.get(id(module))
        if call is None or _checkpoint_wrapped(module) is not None:
            # never called itself (a ModuleList): its children may be. A checkpoint wrapper
            # stays in place around the module it wraps, which is traced (and gated) instead:
            # rewritten, the wrapper's forward would be the generated code, which never
            # checkpoints.
            return descend(module, path)
        if not _may_own_joins(module) or id(module) in done:
            return []  # a module called at several nodes counts at its first
        done.add(id(module))
        try:
            gm, calls = trace_unit(model, path, call, leaves, autowrap)
        except TraceError as exc:
            untraced.append((path or "<root>", type(module).__name__, _reason(exc)))
            return descend(module, path)
        drift = _drift(gm, calls, recorded)
        if drift:
            untraced.append((path or "<root>", type(module).__name__, drift))
            return descend(module, path)
        inner: dict[Node, _Placed] = {}
        for node in gm.graph.nodes:  # opaque calls inside that may hold joins of their own
            if node.op == "call_module":
                sub = gm.get_submodule(str(node.target))
                if id(sub) in recorded:  # visit() skips those that cannot own joins
                    found = visit(sub, str(node.target))
                    if found:
                        inner[node] = _stack(found)
        unit, offsets = analyze_graph(gm, calls, None, path,
                                      {node: block.levels for node, block in inner.items()})
        parts = [(call.order, unit)] + [(order, _shift(part, offsets[node]))
                                        for node, block in inner.items()
                                        for order, part in block.parts]
        return [_Placed(call.order, unit.num_levels, parts)]

    top = _stack(visit(model, ""))
    parts = [unit for _, unit in sorted(top.parts, key=lambda p: p[0])]
    return _combine(parts, untraced, top.levels)


def trace_unit(model: nn.Module, path: str, call: RecordedCall | None,
               leaves: list[LeafSpec], autowrap: tuple[Any, ...]
               ) -> tuple[GraphModule, CallTree | None]:
    """Trace the module at ``path`` on its own (by example when ``call`` is given).

    A descendant whose tracing fails is kept as an opaque call, and the trace retried. By
    example, bool arguments and dtypes stay symbolic unless Python control flow needs them
    (then they are fixed to the example's, with guards). ``None`` arguments are traced both as
    constants and as inputs: when the two graphs agree (the module only passes them on, as a
    decoder layer passes an absent attention mask to its attention), they stay inputs, so the
    block also takes a mask later; otherwise they are constants, with guards.
    """
    progress = _progress.get()
    if progress is not None:
        progress(path)
    try:
        return _trace_keeping_whole(model, path, call, leaves, autowrap)
    finally:
        if call is not None:  # its traces are done: the values they evaluated can go
            call.evaluated.clear()


def _trace_keeping_whole(model: nn.Module, path: str, call: RecordedCall | None,
                         leaves: list[LeafSpec], autowrap: tuple[Any, ...]
                         ) -> tuple[GraphModule, CallTree | None]:
    """:func:`fxsd.analysis._free_nones.trace_freeing_nones`, retried with each descendant whose
    tracing fails kept whole."""
    extra: list[nn.Module] = []
    for _ in range(_RETRIES):
        try:
            return trace_freeing_nones(model, path, call, [*leaves, *extra], autowrap)
        except TraceError as exc:
            inner = exc.module_path
            inside = inner and inner != path and (not path or inner.startswith(path + "."))
            if not inside:
                raise
            extra.append(model.get_submodule(inner))
    raise TraceError(f"'{path or '<root>'}' still fails after keeping {_RETRIES} of its modules "
                     "whole", path, type(model.get_submodule(path)).__name__)


def _drift(gm: GraphModule, calls: CallTree | None, recorded: dict[int, RecordedCall]
           ) -> str | None:
    """How the trace called a module differently from the example run, if it did.

    Code can take another path while traced (Hugging Face skips creating its cache when
    ``torch.fx`` is tracing); a module inside the trace then gets a constant where it really
    gets an object. A graph cut from such a trace would be wrong, so the unit is not used.
    """
    seen: set[int] = set()
    made: list[tuple[nn.Module, tuple, dict]] = [
        (c.module, c.args, c.kwargs) for c in (calls.calls if calls else ())]
    made += [(gm.get_submodule(str(n.target)), n.args, n.kwargs)
             for n in gm.graph.nodes if n.op == "call_module"]
    for module, args, kwargs in made:
        real = recorded.get(id(module))
        if real is None or id(module) in seen:
            continue
        seen.add(id(module))
        given = [*zip(real.args, args), *((real.kwargs[k], v) for k, v in kwargs.items()
                                          if k in real.kwargs)]
        for example, traced in given:
            if _matches(example, traced):
                continue
            return (f"traced, {real.path or '<root>'} got {traced!r} where the example run "
                    f"passed {type(example).__name__} (code that checks for tracing)")
    return None


def _matches(example: Any, traced: Any) -> bool:
    """Whether a traced argument can stand for what the example run passed."""
    if isinstance(traced, Node) or traced is example:
        return True
    if isinstance(example, (tuple, list)) and isinstance(traced, (tuple, list)):
        return len(example) == len(traced) and all(map(_matches, example, traced))
    if isinstance(example, dict) and isinstance(traced, dict):
        return example.keys() == traced.keys() and all(_matches(example[k], traced[k])
                                                       for k in example)
    return is_guardable(example) and type(traced) is type(example) and traced == example


def _reason(exc: TraceError) -> str:
    """The first line of a trace error, without fxsd's hint."""
    text = str(exc).splitlines()[0]
    return text.split(": ", 1)[1] if text.startswith("torch.fx could not trace") else text


def _shift(unit: ResidualAnalysis, offset: int) -> ResidualAnalysis:
    if offset:
        unit.sites = [replace(s, depth=s.depth + offset) for s in unit.sites]
        unit.num_levels += offset
    return unit


def _combine(parts: list[ResidualAnalysis], untraced: list[tuple[str, str, str]],
             levels: int) -> ResidualAnalysis:
    root = parts[0] if parts and parts[0].path == "" else None
    return ResidualAnalysis(
        graph_module=root.graph_module if root else None,
        sites=[s for p in parts for s in p.sites],
        rejected=[r for p in parts for r in p.rejected],
        num_levels=max([levels, *(s.depth for p in parts for s in p.sites)], default=0),
        total_flops=root.total_flops if root else None,
        profiles=root.profiles if root else None,
        calls=root.calls if root else None,
        units=parts, untraced=untraced, order=root.order if root else {})
