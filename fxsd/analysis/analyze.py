"""The analysis entry points: :func:`find_residuals` and :func:`analyze_residuals`.

They choose how to trace a model — whole (:func:`fxsd.tracing.tracer.trace_calls`), by example, or
with timm's not-traceable units traced on their own (:mod:`fxsd.analysis.units`) — and hand each
traced graph to the per-graph classifier (:func:`fxsd.analysis.residuals.analyze_graph`). Both run
under :func:`fxsd.preserve.preserved`: the model, its buffers and the RNGs come back as they were.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Sequence
from typing import Any

from torch import nn
from torch.fx import GraphModule

from fxsd.analysis.node_costs import profile_nodes
from fxsd.analysis.sites import ResidualAnalysis, ResidualSite
from fxsd.analysis.units import analyze_by_example, analyze_nested, registry
from fxsd.arguments import TRACINGS, LeafSpec, check_not_wrapped, check_trace_arguments
from fxsd.errors import InvalidArgumentError, InvalidTypeError, TraceError
from fxsd.preserve import guarded, preserved
from fxsd.tracing.layer_drop import layer_drops_off
from fxsd.tracing.tracer import trace_calls

__all__ = ["find_residuals", "analyze_residuals", "TRACINGS"]


@guarded("find_residuals")
def find_residuals(
    model: nn.Module,
    example_inputs: Sequence[Any] | None = None,
    *,
    example_kwargs: dict[str, Any] | None = None,
    tracing: str = "auto",
    leaf_modules: Iterable[LeafSpec] | None = None,
    concrete_args: dict[str, Any] | None = None,
) -> list[ResidualSite]:
    """Return the residual sites of ``model``, in execution order.

    The same analysis as :func:`analyze_residuals`, which also returns the rejected adds.

    Args:
        model: an ``nn.Module`` or an already traced ``torch.fx.GraphModule``. Never modified.
        example_inputs: positional inputs of one forward call. Optional; with them fxsd also knows
            shapes (broadcasting adds are rejected) and FLOPs (shown in tables), from a run on
            fake tensors. When the model cannot be traced whole, they (and ``example_kwargs``)
            are what it is traced by example with: the model then runs once for real, and its
            buffers, flags and the RNGs are restored afterwards.
        example_kwargs: keyword inputs of that call (``input_ids=..., attention_mask=...``).
        tracing: ``"auto"`` (trace the whole model; if that fails and example inputs are given,
            trace by example), ``"symbolic"`` (whole model only) or ``"example"`` (always by
            example: run the model once, trace the largest traceable modules along their
            recorded calls; see docs/design.md).
        leaf_modules: module classes, qualified names or module objects not to trace through
            (added to timm's own not-traceable registry, honoured when timm is installed).
        concrete_args: passed to the tracer.

    Example:
        >>> import torchvision, fxsd
        >>> sites = fxsd.find_residuals(torchvision.models.resnet50())
        >>> len(sites), sites[0].module_path, sites[0].skip_kind.value
        (16, 'layer1.0', 'projection')
    """
    return analyze_residuals(
        model, example_inputs, example_kwargs=example_kwargs, tracing=tracing,
        leaf_modules=leaf_modules, concrete_args=concrete_args,
    ).sites


@guarded("analyze_residuals")
def analyze_residuals(
    model: nn.Module,
    example_inputs: Sequence[Any] | None = None,
    *,
    example_kwargs: dict[str, Any] | None = None,
    tracing: str = "auto",
    leaf_modules: Iterable[LeafSpec] | None = None,
    concrete_args: dict[str, Any] | None = None,
) -> ResidualAnalysis:
    """Trace ``model`` and classify every add in it as a residual site or a rejected add.

    Arguments as for :func:`find_residuals`.

    Example:
        >>> import torchvision, fxsd
        >>> analysis = fxsd.analyze_residuals(torchvision.models.vit_b_16())
        >>> len(analysis.sites), analysis.rejected[0].reason.value
        (24, 'constant operand')
    """
    if not isinstance(model, nn.Module):
        raise InvalidTypeError(f"expected an nn.Module to analyse, got {type(model).__name__}")
    example_inputs, example_kwargs, tracing, leaf_modules, concrete_args = \
        check_trace_arguments(model, example_inputs, example_kwargs, tracing, leaf_modules,
                              concrete_args)
    check_not_wrapped(model)
    # a run by example must not leave BatchNorm statistics or RNG moved, nor skip layers
    with preserved(model), layer_drops_off(model):
        return _analyze(model, example_inputs, example_kwargs, tracing, leaf_modules,
                        concrete_args)


def _omitted_nones(model: nn.Module, args: tuple[Any, ...],
                   kwargs: dict[str, Any]) -> dict[str, None]:
    """The parameters of ``model.forward`` that default to ``None`` and that the example call
    leaves out. Traced symbolically, ``if mask is not None`` would take the branch the example
    does not (timm's Hiera), and the examples could not run on the trace."""
    if isinstance(model, GraphModule):
        return {}
    try:
        signature = inspect.signature(model.forward)
        bound = signature.bind(*args, **kwargs)
    except (TypeError, ValueError):
        return {}
    return {name: None for name, p in signature.parameters.items()
            if name not in bound.arguments and p.default is None
            and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def _analyze(model: nn.Module, example_inputs: Sequence[Any] | None,
             example_kwargs: dict[str, Any] | None, tracing: str,
             leaf_modules: Iterable[LeafSpec] | None, concrete_args: dict[str, Any] | None
             ) -> ResidualAnalysis:
    leaves, autowrap = registry(leaf_modules)
    examples = example_inputs is not None or example_kwargs is not None
    args, kwargs = tuple(example_inputs or ()), dict(example_kwargs or {})
    if tracing == "example":
        if not examples:
            raise InvalidArgumentError("tracing='example' needs example_inputs= or "
                                       "example_kwargs= (the inputs of one forward call)")
        return analyze_by_example(model, args, kwargs, leaves, autowrap)
    if examples:  # the examples are one call: what they leave out is None, not a tensor
        concrete_args = {**_omitted_nones(model, args, kwargs), **(concrete_args or {})}
    try:
        gm, calls = trace_calls(model, leaf_modules=leaves, concrete_args=concrete_args or None,
                                autowrap=autowrap)
    except TraceError as exc:
        if tracing == "symbolic" or not examples:
            if not exc.module_path:
                exc.args = (exc.args[0] + " Or give example_inputs= / example_kwargs= (one "
                            "forward call's inputs): fxsd then traces the model's modules by "
                            "example, as for Hugging Face models.",)
            raise
        analysis = analyze_by_example(model, args, kwargs, leaves, autowrap)
        if not analysis.units:  # nothing traced by example either: say why the root failed
            tried = "; ".join(f"{p} ({t}): {r}" for p, t, r in analysis.untraced[:3])
            exc.args = (f"{exc.args[0]} Traced by example, no module of it could be traced "
                        f"either ({tried}).",)
            raise exc
        return analysis
    profiles = None
    if example_inputs is not None and example_kwargs is None:
        profiles = profile_nodes(gm, args)
    return analyze_nested(model, gm, calls, profiles, leaves, autowrap,
                          (args, kwargs) if examples else None)
