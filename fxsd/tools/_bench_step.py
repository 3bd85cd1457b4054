"""One variant's training step as ``fxsd bench`` takes it.

A ``_Runner`` holds one variant's model in training with its optimiser, under
``torch.compile`` for a compiled row, and collects the row's step times. Beside it are the
pieces the timing loop and the limit's branch timings share: the loss a step backpropagates,
autocast for ``--amp``, device syncs around a timed region, how many rows each gate's branch
computed, and the gated module under a compiled wrapper.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fxsd.runtime.accessors import gates
from fxsd.runtime.gate import BranchGate
from fxsd.tools._bench_types import BenchConfig, BenchRow, Variant, VariantKind
from fxsd.training.compiling import compile as compile_gated


def _loss(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor) and out.dim() == 2:
        target = torch.arange(out.shape[0], device=out.device) % out.shape[1]
        return F.cross_entropy(out.float(), target)
    leaves = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
    return sum(t.float().mean() for t in leaves)



class _Runner:
    """One variant's model in training, with its optimiser; :attr:`row` collects its times."""

    def __init__(self, spec: Variant, model: nn.Module, cfg: BenchConfig):
        self.row = BenchRow(spec, [])
        self.gates = gates(model)
        self.model = model.train()
        self.opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
        if spec.compiled:
            self.model = (compile_gated(model, backend=cfg.compile_backend) if self.gates
                          else torch.compile(model, backend=cfg.compile_backend))
        self.rows_run: list[list[int]] = []  # per step, per gate: rows perfect skipping computes
        self.cfg = cfg

    @property
    def spec(self) -> Variant:
        return self.row.spec

    def step(self, x: torch.Tensor) -> None:
        """One training step (forward, backward, optimiser), the gates' last decisions cleared."""
        for g in self.gates:
            g.dropped = None
            g.kept_rows = None
        self.opt.zero_grad(set_to_none=True)
        with _autocast(self.cfg):
            loss = _loss(self.model(x))
        loss.backward()
        self.opt.step()



def _autocast(cfg: BenchConfig) -> Any:
    if cfg.amp is None:
        return nullcontext()
    return torch.autocast(torch.device(cfg.device).type, dtype=getattr(torch, cfg.amp))



def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)



def _rows_needed(gates: Sequence[BranchGate], n: int) -> list[int]:
    """How many rows each gate's branch had to compute in the last step: ``n`` kept, 0 dropped
    (or not run: inside a dropped branch), the kept rows in sample mode (whatever ran)."""
    rows = []
    for g in gates:
        if g.kept_rows is not None:
            rows.append(int(g.kept_rows.sum()))
        else:
            rows.append(n if g.dropped is False else 0)
    return rows



def _find(runners: Sequence[_Runner], kind: VariantKind) -> _Runner:
    """The first of ``runners`` of ``kind``."""
    return next(v for v in runners if v.spec.kind is kind)



def _gated(model: nn.Module) -> nn.Module:
    return getattr(model, "_orig_mod", model)  # the module under torch.compile's wrapper
