"""fxsd — stochastic depth for any residual network, as a ``torch.fx`` graph pass.

>>> import torch, torchvision, fxsd
>>> model = fxsd.stochastic_depth(torchvision.models.resnet50(), drop_rate=0.2, seed=0)
>>> type(model).__name__, type(model.layer1[0]).__name__
('ResNet', 'Bottleneck')
>>> print(fxsd.table(model))  # doctest: +SKIP

The public surface:

* :func:`find_residuals` / :func:`analyze_residuals` — which adds are residual joins, and why the
  others are not (pure analysis, the model is never modified);
* :func:`stochastic_depth` — the pass: gate every residual branch with a depth-indexed drop rate,
  inside the blocks that own the joins (the model keeps its class and structure);
* :func:`table` — the sites (or a transformed model's gates) as a printable table;
  :func:`get_record` — what fxsd recorded about a transformed model;
* :func:`set_drop_rate`, :func:`get_rng_state`/:func:`set_rng_state` — training-loop helpers;
  :class:`DropSchedule`, :class:`DropWarmup`, :func:`progressive_layer_drop` — rates over
  training time (:mod:`fxsd.callbacks` steps them in Lightning and the Hugging Face Trainer);
  :func:`apply_stochastic_depth` — Composer's functional API;
* :func:`compile` — ``torch.compile`` with live decisions; :func:`strip` — a gate-free eval graph
  for deployment and ``torch.export``;
* :func:`show` — a gated model's code, each branch under its gate;
* :func:`plain_state_dict` — trained weights back to the plain model, eval scale folded in;
* :func:`trace` — fxsd's tracer on its own;
* :class:`FxsdError` and its subclasses — every error fxsd raises.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public name -> the module that defines it. Attributes load on first use (PEP 562), so that
# ``import fxsd`` — and ``fxsd --help`` — does not import torch until something needs it.
_EXPORTS = {
    "BranchGate": "fxsd.gate",
    "DropPathAction": "fxsd.gate",
    "DropSampler": "fxsd.gate",
    "GateInfo": "fxsd.gate",
    "DropWarmup": "fxsd.schedulers",
    "DropSchedule": "fxsd.schedulers",
    "ProgressiveLayerDrop": "fxsd.schedulers",
    "progressive_layer_drop": "fxsd.schedulers",
    "gates": "fxsd.training",
    "named_gates": "fxsd.training",
    "get_drop_rate": "fxsd.training",
    "set_drop_rate": "fxsd.training",
    "get_rng_state": "fxsd.training",
    "set_rng_state": "fxsd.training",
    "FxsdError": "fxsd.errors",
    "GraphError": "fxsd.errors",
    "GuardError": "fxsd.errors",
    "InvalidArgumentError": "fxsd.errors",
    "InvalidTypeError": "fxsd.errors",
    "TraceError": "fxsd.errors",
    "FoldError": "fxsd.folding",
    "plain_state_dict": "fxsd.folding",
    "FxsdGraphModule": "fxsd.graph_module",
    "FxsdRecord": "fxsd.record",
    "get_record": "fxsd.record",
    "InlinedHooksWarning": "fxsd.passes.stochastic_depth",
    "NoResidualSitesWarning": "fxsd.passes.stochastic_depth",
    "stochastic_depth": "fxsd.passes.stochastic_depth",
    "strip": "fxsd.passes.strip_gates",
    "RejectedAdd": "fxsd.residuals",
    "RejectReason": "fxsd.residuals",
    "ResidualAnalysis": "fxsd.residuals",
    "ResidualSite": "fxsd.residuals",
    "SkipKind": "fxsd.residuals",
    "analyze_residuals": "fxsd.residuals",
    "find_residuals": "fxsd.residuals",
    "site_rates": "fxsd.schedules",
    "show": "fxsd.listing",
    "table": "fxsd.tables",
    "TrainingDependenceWarning": "fxsd.tracing",
    "FrozenDropoutWarning": "fxsd.tracing",
    "trace": "fxsd.tracing",
    "compile": "fxsd.compiling",
    "apply_stochastic_depth": "fxsd.composer",
}
# Submodules listed in __all__ (every submodule is reachable as an attribute: fxsd.owners...).
_SUBMODULES = ("bench", "models")

__all__ = sorted([*_EXPORTS, *_SUBMODULES])


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    else:  # a submodule: fxsd.bench, fxsd.models, fxsd.owners...
        try:
            value = importlib.import_module(f"fxsd.{name}")
        except ModuleNotFoundError:
            raise AttributeError(f"module 'fxsd' has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


if TYPE_CHECKING:  # what the lazy attributes are, for type checkers and IDEs
    from fxsd import bench, models
    from fxsd.compiling import compile  # noqa: A004
    from fxsd.composer import apply_stochastic_depth
    from fxsd.errors import (
        FxsdError,
        GraphError,
        GuardError,
        InvalidArgumentError,
        InvalidTypeError,
        TraceError,
    )
    from fxsd.folding import FoldError, plain_state_dict
    from fxsd.gate import BranchGate, DropPathAction, DropSampler, GateInfo
    from fxsd.graph_module import FxsdGraphModule
    from fxsd.listing import show
    from fxsd.passes.stochastic_depth import (
        InlinedHooksWarning,
        NoResidualSitesWarning,
        stochastic_depth,
    )
    from fxsd.passes.strip_gates import strip
    from fxsd.record import FxsdRecord, get_record
    from fxsd.residuals import (
        RejectedAdd,
        RejectReason,
        ResidualAnalysis,
        ResidualSite,
        SkipKind,
        analyze_residuals,
        find_residuals,
    )
    from fxsd.schedulers import (
        DropSchedule,
        DropWarmup,
        ProgressiveLayerDrop,
        progressive_layer_drop,
    )
    from fxsd.schedules import site_rates
    from fxsd.tables import table
    from fxsd.tracing import FrozenDropoutWarning, TrainingDependenceWarning, trace
    from fxsd.training import (
        gates,
        get_drop_rate,
        get_rng_state,
        named_gates,
        set_drop_rate,
        set_rng_state,
    )
