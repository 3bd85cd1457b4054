"""Activation memory in ``fxsd bench``: the bytes autograd saves for backward in a step.

After the timed steps, as many untimed steps of each eager variant run under
``torch.autograd.graph.saved_tensors_hooks``, counting each saved storage once and leaving the
parameters out (they are held anyway): the ``act. MiB`` column (JSON: ``activation_bytes``),
exact on any device. The hooks cost a call per saved tensor, so they stay out of the timed steps.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

import torch
from torch import nn

from fxsd.tools._bench_step import _Runner
from fxsd.tools._bench_types import BenchConfig
from fxsd.tools._progress import Progress


class _SavedBytes:
    """Bytes autograd saves for backward, each storage once, the model's parameters left out
    (they are held anyway): what a step's activations cost in memory."""

    def __init__(self, model: nn.Module) -> None:
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.storages: dict[int, int] = {}

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in self.params:
            self.storages[storage.data_ptr()] = storage.nbytes()
        return t

    @property
    def total(self) -> int:
        return sum(self.storages.values())



def _count_activations(runners: Sequence[_Runner], x: torch.Tensor, cfg: BenchConfig,
                       report: Progress) -> None:
    """``cfg.steps`` more steps of each eager variant, untimed, counting the bytes saved for
    backward (``saved_tensors_hooks`` cost a call per saved tensor: not in the timed steps).
    Compiled rows keep ``None``: their saved tensors live inside compiled code."""
    eager = [v for v in runners if not v.spec.compiled]
    totals: dict[int, list[int]] = {id(v): [] for v in eager}
    for _ in report.steps("counting activation memory", cfg.steps):
        for v in eager:
            seen = _SavedBytes(v.model)
            with torch.autograd.graph.saved_tensors_hooks(seen.pack, lambda t: t):
                v.step(x)
            totals[id(v)].append(seen.total)
    for v in eager:
        v.row.activation_bytes = statistics.fmean(totals[id(v)])
