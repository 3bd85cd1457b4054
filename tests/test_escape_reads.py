"""A branch value read only for its dtype, shape or device does not escape the branch (issue 25,
item 4), and a real escape is named in the user's terms."""

from __future__ import annotations

import torch
from torch import nn

import fxsd


class DtypeReadAfterJoin(nn.Module):
    """peft's LoRA layer reads ``result.dtype`` and casts after its add; tracing creates the read
    where its value is first used, after the join."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc2(torch.relu(self.fc1(x)))
        y = x + h
        return y.to(h.dtype) * h.shape[-1]


class Reuse(nn.Module):
    """The branch's output is used again after the join: a real escape."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc2(torch.relu(self.fc1(x)))
        return (x + h) * h  # (a concatenation would share the gate: test_shared_work.py)


def test_a_dtype_or_shape_read_after_the_join_is_no_escape():
    torch.manual_seed(0)
    model, x = DtypeReadAfterJoin(), torch.randn(4, 8)
    analysis = fxsd.analyze_residuals(model, (x,))
    assert len(analysis.sites) == 1, [(r.reason, r.detail) for r in analysis.rejected]
    gated = fxsd.stochastic_depth(model, 0.5, example_inputs=(x,))
    assert torch.equal(gated.eval()(x), model.eval()(x))
    gate = fxsd.gates(gated)[0]
    gate.drop_rate = 1.0  # always dropped: the skip, cast to the branch's dtype, times its width
    assert torch.equal(gated.train()(x), x * 8)
    assert fxsd.check(model, (x,)).ok


def test_a_real_escape_names_the_module_whose_output_escapes():
    analysis = fxsd.analyze_residuals(Reuse(), (torch.randn(4, 8),))
    assert not analysis.sites
    (rejected,) = analysis.rejected
    assert rejected.reason.value == "branch value escapes"
    assert "the output of 'fc2'" in rejected.detail and "DenseNet-style" not in rejected.detail
