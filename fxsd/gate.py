"""The gate runtime: :class:`BranchGate` runs or skips one residual branch.

A gated graph calls ``self.<block>_gate(skip, fork, *side_inputs)`` where the add used to be. In
training the gate draws one host-side number per forward: a dropped branch returns the skip and
its nodes never run, so neither their forward nor their backward costs anything; a kept branch
returns ``skip + branch(...)``. In eval every branch runs and is scaled by its keep probability
inside the add itself: ``torch.add(skip, branch, alpha=1 - p)``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule

__all__ = ["BranchGate", "DropSampler", "GateInfo"]


class DropSampler:
    """The stream of uniform draws a transformed model's gates share.

    A plain :class:`random.Random` on the host: drawing needs no device and no synchronisation,
    consumes nothing from torch's or Python's global generators, and its state pickles with the
    model. Every gate that runs draws exactly one number per training forward whatever its rate
    (a gate nested in a dropped branch does not run), so decisions depend on the seed alone and
    a higher rate drops a superset of the sites a lower rate drops.
    """

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)
        self._rng = random.Random(self.seed)
        self.random = self._rng.random

    def get_state(self) -> Any:
        return self._rng.getstate()

    def set_state(self, state: Any) -> None:
        self._rng.setstate(state)

    def __getstate__(self) -> dict[str, Any]:
        return {"seed": self.seed, "state": self._rng.getstate()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["seed"])
        self._rng.setstate(state["state"])

    def __repr__(self) -> str:
        return f"DropSampler(seed={self.seed})"


@dataclass(frozen=True)
class GateInfo:
    """A description of the site a gate stands for, kept for tables (names, not graph nodes)."""

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


class BranchGate(nn.Module):
    """Run or skip one residual branch; the add the branch used to feed happens here.

    Args:
        branch: the branch as a ``GraphModule`` taking ``(fork, *side_inputs)``. It is kept outside
            the module tree (it calls the model's own submodules, which already live in the tree),
            so the gate adds no parameters and no ``state_dict`` keys.
        drop_rate: probability of dropping the branch in a training forward.
        sampler: the model's shared :class:`DropSampler`.
        identity: the skip is the fork itself; the gate is then called as ``gate(fork, *side)``
            instead of ``gate(skip, fork, *side)``.
        clone_on_drop: return a copy of the skip when dropping, because something later modifies
            the result in place (``ReLU(inplace=True)``) and must not modify the skip, which
            autograd may have saved.
        info: the site's description.
    """

    def __init__(
        self,
        branch: GraphModule,
        drop_rate: float,
        sampler: DropSampler,
        *,
        identity: bool,
        clone_on_drop: bool,
        info: GateInfo,
    ) -> None:
        super().__init__()
        self.__dict__["branch"] = branch  # deliberately not a registered submodule
        self.drop_rate = float(drop_rate)
        self.sampler = sampler
        self.identity = identity
        self.clone_on_drop = clone_on_drop
        self.info = info
        self.dropped: bool | None = None  # decision of the last training forward

    def forward(self, skip: torch.Tensor, *inputs: Any) -> torch.Tensor:
        args = (skip, *inputs) if self.identity else inputs
        if self.training:
            self.dropped = self.sampler.random() < self.drop_rate
            if self.dropped:
                return skip.clone() if self.clone_on_drop else skip
            return skip + self.branch.forward(*args)
        keep = 1.0 - self.drop_rate
        if keep == 1.0:
            return skip + self.branch.forward(*args)
        if keep == 0.0:
            return skip.clone() if self.clone_on_drop else skip
        return torch.add(skip, self.branch.forward(*args), alpha=keep)

    def extra_repr(self) -> str:
        i = self.info
        return (f"'{i.module_path or '<root>'}', depth={i.depth}/{i.num_levels}, "
                f"drop_rate={self.drop_rate:.4g}, skip={i.skip_kind}")
