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
* :func:`set_drop_rate`, :class:`DropWarmup`, :func:`get_rng_state`/:func:`set_rng_state` —
  training-loop helpers; :func:`apply_stochastic_depth` — Composer's functional API;
* :func:`compile` — ``torch.compile`` with live decisions; :func:`strip` — a gate-free eval graph
  for deployment and ``torch.export``;
* :func:`trace` — fxsd's tracer on its own;
* :class:`FxsdError` and its subclasses — every error fxsd raises.
"""

from fxsd import bench, models  # noqa: F401  (fxsd.bench, fxsd.models)
from fxsd.compiling import compile  # noqa: A004
from fxsd.composer import apply_stochastic_depth  # noqa: E402  (needs the pass imported first)
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
from fxsd.schedules import site_rates
from fxsd.table import table
from fxsd.tracing import TrainingDependenceWarning, trace
from fxsd.training import (
    DropWarmup,
    gates,
    get_drop_rate,
    get_rng_state,
    named_gates,
    set_drop_rate,
    set_rng_state,
)

__version__ = "0.1.0"

__all__ = [
    "BranchGate",
    "DropPathAction",
    "DropWarmup",
    "DropSampler",
    "FxsdError",
    "FoldError",
    "FxsdGraphModule",
    "FxsdRecord",
    "GateInfo",
    "GraphError",
    "GuardError",
    "InlinedHooksWarning",
    "InvalidArgumentError",
    "InvalidTypeError",
    "NoResidualSitesWarning",
    "RejectReason",
    "RejectedAdd",
    "ResidualAnalysis",
    "ResidualSite",
    "SkipKind",
    "TraceError",
    "TrainingDependenceWarning",
    "analyze_residuals",
    "compile",
    "apply_stochastic_depth",
    "find_residuals",
    "gates",
    "get_drop_rate",
    "get_record",
    "get_rng_state",
    "named_gates",
    "plain_state_dict",
    "set_drop_rate",
    "set_rng_state",
    "site_rates",
    "stochastic_depth",
    "strip",
    "table",
    "trace",
]
