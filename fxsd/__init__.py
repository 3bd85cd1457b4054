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
  training time (:mod:`fxsd.training.callbacks` steps them in Lightning and the Hugging Face
  Trainer); :func:`apply_stochastic_depth` — Composer's functional API;
* :func:`compile` — ``torch.compile`` with live decisions; :func:`strip` — a gate-free eval graph
  for deployment and ``torch.export``; :func:`prune` — that graph with residual branches removed
  to an inference FLOP budget (:class:`PruneReport` says what went);
* :func:`show` — a gated model's code, each branch under its gate;
* :func:`plain_state_dict` — trained weights back to the plain model, eval scale folded in;
* :class:`FxsdError` and its subclasses — every error fxsd raises; the warnings a user may
  filter.

Advanced names — the gate runtime (:mod:`fxsd.runtime.gate`), the records (:mod:`fxsd.record`), the
analysis' types (:mod:`fxsd.analysis.residuals`), fxsd's tracer (:func:`fxsd.tracing.tracer.trace`),
the decision step (:mod:`fxsd.decisions.plan`) — are imported from their modules (docs/api.md).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from fxsd._lazy import submodules

__version__ = "0.1.0"

# Public name -> the module that defines it. Attributes load on first use (PEP 562), so that
# ``import fxsd`` — and ``fxsd --help`` — does not import torch until something needs it.
_EXPORTS = {
    "DropWarmup": "fxsd.training.schedulers",
    "DropSchedule": "fxsd.training.schedulers",
    "progressive_layer_drop": "fxsd.training.schedulers",
    "gates": "fxsd.runtime.accessors",
    "get_drop_rate": "fxsd.runtime.accessors",
    "set_drop_rate": "fxsd.runtime.accessors",
    "get_rng_state": "fxsd.runtime.accessors",
    "set_rng_state": "fxsd.runtime.accessors",
    "FxsdError": "fxsd.errors",
    "GraphError": "fxsd.errors",
    "GuardError": "fxsd.errors",
    "DroppedValueError": "fxsd.errors",
    "InvalidArgumentError": "fxsd.errors",
    "InvalidTypeError": "fxsd.errors",
    "TraceError": "fxsd.errors",
    "RandomDrawError": "fxsd.errors",
    "ModelRunError": "fxsd.errors",
    "TransformError": "fxsd.errors",
    "FoldError": "fxsd.runtime.folding",
    "plain_state_dict": "fxsd.runtime.folding",
    "get_record": "fxsd.record",
    "stochastic_depth": "fxsd.transform",
    "strip": "fxsd.passes.strip_gates",
    "ResidualSite": "fxsd.analysis.sites",
    "analyze_residuals": "fxsd.analysis.analyze",
    "find_residuals": "fxsd.analysis.analyze",
    "show": "fxsd.tools.listing",
    "table": "fxsd.tools.tables",
    "compile": "fxsd.training.compiling",
    "apply_stochastic_depth": "fxsd.training.composer",
    "expected_saving": "fxsd.decisions.budget",
    "check": "fxsd.tools.check",
    "prune": "fxsd.pruning.prune",
    "PruneReport": "fxsd.pruning.report",
}
# What a user calls. Everything else stays importable from its module (fxsd.runtime.gate.BranchGate,
# fxsd.runtime.accessors.named_gates, ...; docs/api.md lists it as advanced), and every submodule is
# reachable as an attribute (fxsd.tools.bench, fxsd.tools.models, fxsd.decisions.owners...).
__all__ = sorted(_EXPORTS)


_submodule = submodules(__name__)


def __getattr__(name: str) -> Any:
    # a public name, or a submodule: fxsd.tools.bench, fxsd.decisions.owners...
    value = getattr(importlib.import_module(_EXPORTS[name]), name) if name in _EXPORTS \
        else _submodule(name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


if TYPE_CHECKING:  # what the lazy attributes are, for type checkers and IDEs
    from fxsd.analysis.analyze import analyze_residuals, find_residuals
    from fxsd.analysis.sites import ResidualSite
    from fxsd.decisions.budget import expected_saving
    from fxsd.errors import (
        DroppedValueError,
        FxsdError,
        GraphError,
        GuardError,
        InvalidArgumentError,
        InvalidTypeError,
        ModelRunError,
        RandomDrawError,
        TraceError,
        TransformError,
    )
    from fxsd.passes.strip_gates import strip
    from fxsd.pruning.prune import prune
    from fxsd.pruning.report import PruneReport
    from fxsd.record import get_record
    from fxsd.runtime.accessors import (
        gates,
        get_drop_rate,
        get_rng_state,
        set_drop_rate,
        set_rng_state,
    )
    from fxsd.runtime.folding import FoldError, plain_state_dict
    from fxsd.tools.check import check
    from fxsd.tools.listing import show
    from fxsd.tools.tables import table
    from fxsd.training.compiling import compile  # noqa: A004
    from fxsd.training.composer import apply_stochastic_depth
    from fxsd.training.schedulers import DropSchedule, DropWarmup, progressive_layer_drop
    from fxsd.transform import stochastic_depth
