"""What fxsd records on the modules and nodes it builds, in two documented dataclasses.

Like ``torch.ao`` (``ObservedGraphModuleAttrs``), fxsd keeps its bookkeeping in one place per
object instead of loose ``meta`` keys:

* :class:`FxsdRecord` describes one traced or transformed model. A transformed model's gates all
  share one record (``gate.record``), and every ``GraphModule`` fxsd builds for that model (the
  gated blocks, the stripped blocks, the graphs :func:`fxsd.tracing.tracer.trace` returns) holds it
  as ``module.meta["fxsd"]``. :func:`fxsd.get_record` finds it from the model.
* :class:`NodeRecord` is ``node.meta["fxsd"]`` on the nodes of a graph fxsd traced: the module
  calls that were running when the tracer created the node, which is how fxsd knows which module's
  ``forward`` performs each residual join and which modules can stay opaque calls.

>>> import torchvision, fxsd
>>> model = fxsd.stochastic_depth(torchvision.models.resnet18(), 0.1)
>>> rec = fxsd.get_record(model)
>>> rec.drop_rate, rec.num_levels, rec.rewritten[:2]
(0.1, 8, ('layer1.0', 'layer1.1'))
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol, runtime_checkable

__all__ = ["FxsdRecord", "NodeRecord", "RejectReason", "RejectedAdd", "Schedule", "get_record"]


@runtime_checkable
class Schedule(Protocol):
    """What a drop-rate schedule offers (:mod:`fxsd.training.schedulers` defines fxsd's own; the
    framework callbacks of :mod:`fxsd.training.callbacks` step any object that has these).

    Stepped once per optimizer step, like ``torch.optim.lr_scheduler``; ``model`` is the
    transformed model whose gates it moves and ``step_count`` the steps taken so far.
    """

    model: Any
    step_count: int

    def step(self) -> None: ...

    def get_last_rate(self) -> float: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class RejectReason(str, Enum):
    """Why an add is not a residual site."""

    SCALAR_OPERAND = "scalar operand"
    NON_TENSOR_OPERAND = "non-tensor operand"
    CONSTANT_OPERAND = "constant operand"
    SAME_OPERAND = "same operand twice"
    UNSUPPORTED_ARGUMENTS = "unsupported arguments"
    BROADCAST = "broadcasting add"
    NO_COMMON_FORK = "no common fork"
    NO_CHEAP_SKIP = "no skip path"
    ESCAPING_VALUE = "branch value escapes"
    MUTATION = "in-place mutation"
    NO_WEIGHTS = "branch holds no weights"
    PARALLEL_PATHS = "parallel paths"


@dataclass(frozen=True)
class RejectedAdd:
    """An add that is not a residual site, with the reason (kept by name, so that a transformed
    model's :class:`~fxsd.record.FxsdRecord` can hold it without the analysed graph).

    Attributes:
        add: the add node's name; ``add_kind``: how the add was written.
        reason, detail: which rule rejected it, and a sentence saying why.
        module_path: the module whose ``forward`` performs the add (``""``: the root).
    """

    add: str
    add_kind: str
    reason: RejectReason
    detail: str
    module_path: str

    @property
    def name(self) -> str:
        return self.add




@dataclass
class FxsdRecord:
    """What fxsd recorded about one model.

    Attributes:
        drop_rate: the model-wide rate last given to :func:`fxsd.stochastic_depth` or
            :func:`fxsd.set_drop_rate` (each gate's own rate is ``gate.drop_rate``).
        num_levels: ``L``, the number of depths among the gated sites.
        rewritten: qualified paths of the modules whose ``forward`` fxsd rewrote as gated
            ``GraphModule``\\ s (``""`` is the root), in model order. A module registered at
            several paths is listed once, at the first (the path ``named_modules()`` and the
            trace use); the rewritten module sits at every one of them.
        original_classes: the class name of each rewritten module before it was rewritten.
        live_leaves: modules the tracer kept whole because their traced code reads
            ``self.training`` (they stay switchable by ``train()``/``eval()``).
        rejected: the adds the analysis did not take as residual joins, with the reasons.
        total_flops: forward FLOPs of the whole model, when example inputs were given.
        step_flops: forward + backward FLOPs of one training step of the whole model on the
            example inputs, every branch kept (:mod:`fxsd.decisions.budget`); each gate's own share
            is ``gate.info.step_flops``. ``None`` without example inputs.
        step_flops_error: why counting ``step_flops`` failed, when it did.
        pending_costs: without a ``target_saving``, the step costs are counted when first
            asked for (:func:`fxsd.table`, :func:`fxsd.expected_saving`; or
            :func:`fxsd.decisions.step_costs.count_pending`): until then ``step_flops`` is ``None``
            and this holds what the count takes (:class:`fxsd.decisions.step_costs.PendingCosts`).
        warmup: the :class:`~fxsd.DropWarmup` that :func:`fxsd.apply_stochastic_depth` created
            for ``drop_warmup``, if any.
        stripped: the modules holding this record were made by :func:`fxsd.strip` (no gates).
        traced: when modules were traced one by one (by example, or timm's not-traceable
            modules on their own), their paths.
        untraced: ``(path, class name, why)`` of the modules that could not be traced.
        schedule: the schedule in charge of the rates, held weakly (one per model:
            :func:`fxsd.training.schedulers.schedule_of`); a copied or unpickled record has none.
        regate: how a gated block is traced and gated again for a call its guards refuse
            (:func:`fxsd.passes.regate.trace_again`, set by the rewrite). The runtime reaches
            the rewrite through it, not by an import; it pickles by name.
    """

    drop_rate: float = 0.0
    num_levels: int = 0
    rewritten: tuple[str, ...] = ()
    original_classes: tuple[str, ...] = ()
    live_leaves: tuple[str, ...] = ()
    rejected: tuple[RejectedAdd, ...] = ()
    total_flops: int | None = None
    step_flops: int | None = None
    step_flops_error: str | None = None
    pending_costs: Any = field(default=None, repr=False, compare=False)
    warmup: Schedule | None = field(default=None, repr=False)
    stripped: bool = False
    traced: tuple[str, ...] = ()
    untraced: tuple[tuple[str, str, str], ...] = ()
    schedule: Schedule | None = field(default=None, repr=False, compare=False)
    regate: Callable[..., Any] | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class NodeRecord:
    """``node.meta["fxsd"]`` on a node of a graph fxsd traced.

    Attributes:
        calls: indices (into the trace's :class:`~fxsd.tracing.calls.CallTree`) of the module
            calls that were running when the node was created, outermost first. A leaf module's own
            ``call_module`` node is not inside its own call: its calls are its caller's.
    """

    calls: tuple[int, ...] = ()


def get_record(model: Any) -> FxsdRecord:
    """The :class:`FxsdRecord` of a model :func:`fxsd.stochastic_depth`, :func:`fxsd.strip` or
    :func:`fxsd.tracing.tracer.trace` returned (found on its gates or on its fxsd-built
    GraphModules).

    Raises:
        InvalidArgumentError: ``model`` holds nothing fxsd built.
    """
    from torch import nn

    from fxsd.errors import InvalidArgumentError, InvalidTypeError

    if not isinstance(model, nn.Module):
        raise InvalidTypeError(f"expected a model transformed by fxsd, got {type(model).__name__}")
    for module in model.modules():
        found = getattr(module, "record", None)
        if isinstance(found, FxsdRecord):
            return found
        meta = getattr(module, "meta", None)
        if isinstance(meta, dict) and isinstance(meta.get("fxsd"), FxsdRecord):
            return meta["fxsd"]
    raise InvalidArgumentError(
        f"{type(model).__name__} holds nothing fxsd built: transform it with "
        "fxsd.stochastic_depth first")
