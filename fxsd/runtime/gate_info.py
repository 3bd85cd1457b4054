"""What a gate knows about the site it stands for: :class:`GateInfo` (names, depth, sizes, the
join as written), :class:`SharedUse` (second uses of its work) and :class:`DropPathAction` (what
the rewrite did with a drop-path op the branch held).

These describe a site by names, not graph nodes, so they outlive the analysed graph: they travel
with a gated model (``deepcopy``, ``torch.save``) and are what tables and budgets read.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any

from fxsd.runtime.join import PLAIN_JOIN, Join, JoinOp
from fxsd.tracing.partial_join import PartialJoin

if TYPE_CHECKING:
    from fxsd.runtime.folding import FoldTarget

__all__ = ["DropPathAction", "GateInfo", "ShareKind", "SharedUse"]

_PARTIAL = JoinOp.PARTIAL


class ShareKind(str, Enum):
    """What a second use of a branch's work is (:mod:`fxsd.analysis.shared_work` finds them)."""

    JOIN = "join"  #: another residual add: dropped, it returns its skip
    ZEROS = "zeros"  #: a concatenation (DPN's dense part): dropped, it gets zeros


class DropPathAction(str, Enum):
    """What the rewrite did with a drop-path op the branch held (``existing=``)."""

    ADOPTED = "adopted"
    REPLACED = "replaced"
    KEPT = "kept"


@dataclass(frozen=True)
class GateInfo:
    """A description of the site a gate stands for, kept for tables (names, not graph nodes).

    ``name`` is the gate's qualified name in the model (``layer1.0.residual_gate``): the module
    that was rewritten, and the attribute its code calls. The other fields describe the site as
    the analysis found it (:class:`~fxsd.ResidualSite`; :func:`fxsd.analysis.sites.describe_site`
    makes one).
    """

    name: str
    add: str
    add_kind: str
    module_path: str
    module_type: str
    skip_kind: str
    depth: int
    num_levels: int
    branch_first: str
    branch_last: str
    branch_len: int
    num_params: int
    side_inputs: tuple[str, ...]
    flops: int | None = None
    fold: FoldTarget | None = None  # where the eval scale folds into weights
    step_flops: int | None = None  # own forward + backward FLOPs per step (fxsd.decisions.budget)
    enclosing: tuple[str, ...] = ()  # the gates whose branches hold this one, nearest first
    # a join into part of the branch output (fxsd.tracing.partial_join)
    part: PartialJoin | None = None
    join: Join = PLAIN_JOIN  # the add as the source wrote it, which the gate computes
    shared: tuple[SharedUse, ...] = ()  # second joins the work feeds (fxsd.analysis.shared_work)

    def split_skips(self, inputs: Any) -> tuple[Any, Any]:
        """A gate call's inputs, then the skips of the second joins its work feeds (the call
        passes those last: :mod:`fxsd.analysis.shared_work`)."""
        n = sum(use.kind is ShareKind.JOIN for use in self.shared)
        return (inputs[:-n], inputs[-n:]) if n else (inputs, inputs[:0])

    def __setstate__(self, state: dict[str, Any]) -> None:
        if "join" not in state and state.get("part") is not None:  # pickled before joins were
            state = {**state, "join": Join(_PARTIAL, branch_first=True, part=state["part"])}
        self.__dict__.update(state)


@dataclass(frozen=True)
class SharedUse:
    """A second use of a gate's work (:class:`~fxsd.analysis.shared_work.SharedOutput`, by name): a
    second join (``kind`` JOIN, with its ``join``) or a concatenation (ZEROS), named as the
    gated module's code spells the node it stands for."""

    kind: ShareKind
    name: str
    join: Join | None = None
