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

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fxsd.analysis.sites import RejectedAdd
    from fxsd.training.schedulers import DropWarmup

__all__ = ["FxsdRecord", "NodeRecord", "get_record"]


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
            :func:`fxsd.decisions.budget.count_pending`): until then ``step_flops`` is ``None`` and
            this holds what the count takes (:class:`fxsd.decisions.budget.PendingCosts`).
        warmup: the :class:`~fxsd.DropWarmup` that :func:`fxsd.apply_stochastic_depth` created
            for ``drop_warmup``, if any.
        stripped: the modules holding this record were made by :func:`fxsd.strip` (no gates).
        traced: when modules were traced one by one (by example, or timm's not-traceable
            modules on their own), their paths.
        untraced: ``(path, class name, why)`` of the modules that could not be traced.
        schedule: the schedule in charge of the rates, held weakly (one per model:
            :func:`fxsd.training.schedulers.schedule_of`); a copied or unpickled record has none.
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
    warmup: DropWarmup | None = field(default=None, repr=False)
    stripped: bool = False
    traced: tuple[str, ...] = ()
    untraced: tuple[tuple[str, str, str], ...] = ()
    schedule: Any = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class NodeRecord:
    """``node.meta["fxsd"]`` on a node of a graph fxsd traced.

    Attributes:
        calls: indices (into the trace's :class:`~fxsd.tracing.calls.CallTree`) of the module calls
        that
            were running when the node was created, outermost first. A leaf module's own
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
