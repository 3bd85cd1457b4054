"""Models written with ``from __future__ import annotations``: every annotation is a string, which
``torch.fx`` copies into the generated code (pickling must still work)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class AnnotatedBlock(nn.Module):
    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(c)
        self.fc = nn.Linear(c, c)

    def forward(self, x: Tensor, scale: float = 1.0) -> Tensor:
        return x + scale * self.fc(self.norm(x))


class AnnotatedNet(nn.Module):
    def __init__(self, depth: int = 3) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(AnnotatedBlock() for _ in range(depth))
        self.head = nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        for blk in self.blocks:
            x = blk(x)
        return self.head(torch.tanh(x))
