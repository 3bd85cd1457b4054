"""Depths follow the data flow however the model was traced: whole, by example, unit by unit.

A model traced by example is analysed unit by unit. A module that its caller's trace must keep
opaque is traced on its own; its joins must then count at its call in the caller's graph, between
the caller's joins that run before and after it, not after all of the caller's joins.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxsd
from fxsd.runtime.gate import BranchGate

D = 8


class Branch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc(x))


class Repeat(nn.Module):
    """Applies a residual layer ``n`` times. Inside a caller's trace ``n`` is a traced size and
    ``range(n)`` fails; traced on its own by example, ``n`` is the example's int (guarded)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Branch() for _ in range(2))

    def forward(self, x: torch.Tensor, n: int) -> torch.Tensor:
        for i in range(n):
            x = x + self.layers[i](x)
        return x


class Body(nn.Module):
    """A join, the opaque child (two joins), a join: four joins in a row."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.last = Branch(), Branch()
        self.repeat = Repeat()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _ = x.shape  # unpacking a shape: torch.fx fails, tracing by example does not
        x = x + self.first(x)
        x = self.repeat(x, b)
        return x + self.last(x)


class ByExampleRoot(Body):
    """The root itself traces by example (not symbolically) and keeps ``repeat`` opaque."""


class Tail(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.branch = Branch()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.branch(x)


class UntraceableRoot(nn.Module):
    """The root cannot be traced at all (control flow on data): ``body`` is traced by example
    with ``repeat`` opaque, ``repeat`` on its own, ``tail`` on its own after them."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(D, D)
        self.body = Body()
        self.tail = Tail()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        if x.sum() > 1e9:
            x = x * 0.5
        return self.tail(self.body(x))


def _example() -> torch.Tensor:
    return torch.randn(2, D, generator=torch.Generator().manual_seed(0))


def _gates_in_execution_order(gated: nn.Module, x: torch.Tensor) -> list[BranchGate]:
    """The gates of ``gated`` in the order their joins run in an eval forward."""
    order: list[BranchGate] = []
    gates = [m for m in gated.modules() if isinstance(m, BranchGate)]
    handles = [g.register_forward_hook(lambda g, _i, _o: order.append(g)) for g in gates]
    try:
        with torch.no_grad():
            gated.eval()(x)
    finally:
        for h in handles:
            h.remove()
    assert sorted(map(id, order)) == sorted(map(id, gates))  # each join runs once
    return order


@pytest.mark.parametrize("make, units", [
    (ByExampleRoot, ["", "repeat"]),
    (UntraceableRoot, ["body", "body.repeat", "tail"]),
])
def test_depths_increase_along_execution_when_a_child_is_traced_on_its_own(make, units):
    torch.manual_seed(0)
    model, x = make(), _example()
    analysis = fxsd.analyze_residuals(model, (x,))
    assert [u.path for u in analysis.parts()] == units  # the case this test is about
    gated = fxsd.stochastic_depth(model, 0.4, example_inputs=(x,))
    order = _gates_in_execution_order(gated, x)
    depths = [g.info.depth for g in order]
    assert depths == list(range(1, len(order) + 1))
    assert analysis.num_levels == len(order) == order[0].info.num_levels
    rates = [g.drop_rate for g in order]  # linear: drop_rate · l / L
    assert rates == pytest.approx([0.4 * d / len(order) for d in depths])
    assert all(a < b for a, b in zip(rates, rates[1:]))
    with torch.no_grad():  # the gated model still computes the model's function
        torch.testing.assert_close(gated.eval()(x), model.eval()(x), rtol=0, atol=0)


class Towers(nn.Module):
    """Traced by example: two parallel towers, one holding the opaque child (two joins), the
    other one join, merged by a join."""

    def __init__(self) -> None:
        super().__init__()
        self.left, self.right, self.merge = Repeat(), Branch(), Branch()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _ = x.shape
        left = self.left(x, b)
        right = x + self.right(x)
        y = left * right
        return y + self.merge(y)


def test_a_child_traced_on_its_own_counts_along_the_longest_chain():
    """As in one graph: sites on parallel paths share depths, the merge is one past the longest
    chain (here the child's two joins)."""
    model, x = Towers(), _example()
    analysis = fxsd.analyze_residuals(model, (x,))
    assert [u.path for u in analysis.parts()] == ["", "left"]
    by_path = sorted((s.module_path, s.depth) for s in analysis.sites)
    assert by_path == [("", 1), ("", 3), ("left", 1), ("left", 2)]
    assert analysis.num_levels == 3
