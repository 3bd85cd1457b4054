"""The gate computes the join the source wrote (fxsd/runtime/join.py): the same function, operand
order,
``alpha`` and in-place spelling, so a gated model in eval equals the plain model bit for bit."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxsd
from fxsd.runtime.join import JoinOp

C = 8


class ViewAttention(nn.Module):
    """Self-attention over an image whose output is a transposed, reshaped view (as in diffusers'
    attention processors): not contiguous, laid out unlike its input."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.proj = nn.Linear(C, 3 * C), nn.Linear(C, C)

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = self.qkv(x.flatten(2).transpose(1, 2)).chunk(3, -1)
        a = torch.softmax(q @ k.transpose(-1, -2) / c**0.5, -1) @ v
        return self.proj(a).transpose(-1, -2).reshape(b, c, h, w)


JOINS = {  # how the block joins its skip x and its branch f(x)
    "branch + skip": lambda f, x: f(x) + x,
    "skip + branch": lambda f, x: x + f(x),
    "torch.add(skip, branch, alpha)": lambda f, x: torch.add(x, f(x), alpha=0.5),
    "torch.add(branch, skip, alpha)": lambda f, x: torch.add(f(x), x, alpha=0.5),
    "skip.add(branch)": lambda f, x: x.add(f(x)),
    "skip.add_(branch)": lambda f, x: x.add_(f(x)),
    "branch.add_(skip)": lambda f, x: f(x).add_(x),
    "branch += skip": lambda f, x: _iadd(f(x), x),
}


def _iadd(out, x):
    out += x
    return out


class Block(nn.Module):
    """A convolution, a join of an attention branch, then a convolution and a GroupNorm, which
    reduce in an order that depends on the layout of the sum."""

    def __init__(self, join: str) -> None:
        super().__init__()
        self.join = JOINS[join]
        self.attn = ViewAttention()
        self.conv1, self.conv2 = nn.Conv2d(C, C, 3, padding=1), nn.Conv2d(C, C, 3, padding=1)
        self.norm = nn.GroupNorm(2, C)

    def forward(self, x):
        x = self.conv1(x)
        return self.norm(self.conv2(self.join(self.attn, x)))


def _model(join: str) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(Block(join), Block(join)).eval()


def _x() -> torch.Tensor:
    return torch.randn(2, C, 7, 7, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("join", ["branch + skip", "branch += skip", "branch.add_(skip)"])
def test_branch_written_first_is_joined_as_written(join):
    model = _model(join)
    gated = fxsd.stochastic_depth(model, 0.3).eval()
    assert len(fxsd.gates(gated)) == 2
    with torch.no_grad():
        assert torch.equal(gated(_x()), model(_x()))
        assert torch.equal(fxsd.strip(gated)(_x()), model(_x()))
    assert all(g.info.join.branch_first for g in fxsd.gates(gated))


@pytest.mark.parametrize("join", list(JOINS))
def test_every_spelling_is_gated_and_bit_identical_in_eval(join):
    model = _model(join)
    gated = fxsd.stochastic_depth(model, 0.3).eval()
    assert len(fxsd.gates(gated)) == 2
    with torch.no_grad():
        expected = model(_x())
        assert torch.equal(gated(_x()), expected)
        assert torch.equal(fxsd.strip(gated)(_x()), expected)
        gated.train()  # rate 0: every branch kept and nothing scaled, the plain add
        fxsd.set_drop_rate(gated, 0.0)
        assert torch.equal(gated(_x()), model(_x()))


class AlphaJoin(nn.Module):
    """``torch.add(x, f(x), alpha=0.5)`` (the branch scaled) or ``torch.add(f(x), x, alpha=0.5)``
    (the skip scaled)."""

    def __init__(self, branch_first: bool) -> None:
        super().__init__()
        self.branch_first = branch_first
        self.f = nn.Sequential(nn.Linear(C, 2 * C), nn.GELU(), nn.Linear(2 * C, C))

    def forward(self, x):
        if self.branch_first:
            return torch.add(self.f(x), x, alpha=0.5)
        return torch.add(x, self.f(x), alpha=0.5)


@pytest.mark.parametrize("branch_first", [False, True])
def test_alpha_is_a_join_with_its_exact_semantics(branch_first):
    torch.manual_seed(0)
    model = AlphaJoin(branch_first).eval()
    (site,) = fxsd.find_residuals(model)
    assert (site.join.op, site.join.alpha, site.join.branch_first) == \
        (JoinOp.TORCH_ADD, 0.5, branch_first)
    gated = fxsd.stochastic_depth(model, 0.5, seed=0)
    (gate,) = fxsd.gates(gated)
    x = torch.randn(4, 5, C)
    with torch.no_grad():
        assert torch.equal(gated.eval()(x), model(x))
        branch = model.f(x)
        calls = []
        handle = gated.get_submodule("f.0").register_forward_hook(lambda *a: calls.append(1))
        gated.train()
        seen = set()
        for _ in range(20):
            calls.clear()
            out = gated(x)
            seen.add(gate.dropped)
            if gate.dropped:  # skip only: x, or the 0.5 * x the source adds
                assert calls == []
                assert torch.equal(out, x * 0.5 if branch_first else x)
            else:  # the kept branch scaled by 1 / (1 - p) = 2, the skip as the source scales it
                assert calls == [1]
                expected = torch.add(x, branch, alpha=0.5 * 2.0) if not branch_first \
                    else torch.add(branch * 2.0, x, alpha=0.5)
                assert torch.equal(out, expected)
        handle.remove()
    assert seen == {True, False}


@pytest.mark.parametrize("branch_first", [False, True])
def test_alpha_join_in_sample_subset_mode(branch_first):
    torch.manual_seed(0)
    model = AlphaJoin(branch_first)
    gated = fxsd.stochastic_depth(model, 0.5, mode="sample", sample_impl="subset", seed=0)
    (gate,) = fxsd.gates(gated)
    assert gate.sample_impl == "subset"
    x = torch.randn(16, 5, C)
    with torch.no_grad():
        out = gated.train()(x)
        kept = gate.kept_rows
        assert 0 < int(kept.sum()) < 16
        rows = x[kept]
        branch = model.f(rows)
        expected = torch.add(rows, branch, alpha=1.0) if not branch_first \
            else torch.add(branch * 2.0, rows, alpha=0.5)
        assert torch.equal(out[kept], expected)
        assert torch.equal(out[~kept], x[~kept] * 0.5 if branch_first else x[~kept])


class InplaceJoin(nn.Module):
    """``x.add_(f(x))`` with a branch computing in float64: in place, the sum keeps the skip's
    dtype, and the caller's tensor holds it."""

    def __init__(self) -> None:
        super().__init__()
        self.f = nn.Linear(C, C).double()

    def forward(self, x):
        return x.add_(self.f(x.double()))


def test_inplace_join_keeps_the_skips_dtype_and_storage():
    torch.manual_seed(0)
    model = InplaceJoin().eval()
    gated = fxsd.stochastic_depth(model, 0.3).eval()
    (gate,) = fxsd.gates(gated)
    x = torch.randn(3, C)
    mine, theirs = x.clone(), x.clone()
    with torch.no_grad():
        expected = model(theirs)
        out = gated(mine)
    assert out.dtype == expected.dtype == torch.float32
    assert torch.equal(out, expected)
    assert torch.equal(mine, theirs)  # the caller's tensor was added into, as by the plain model
    assert gate.info.join.op is JoinOp.INPLACE
    stripped = fxsd.strip(gated)
    mine = x.clone()
    with torch.no_grad():
        assert torch.equal(stripped(mine), expected)
    assert torch.equal(mine, theirs)


def test_eval_scale_strips_and_folds():
    torch.manual_seed(0)
    for branch_first in (False, True):
        model = AlphaJoin(branch_first).eval()
        gated = fxsd.stochastic_depth(model, 0.4, scale="eval").eval()
        x = torch.randn(4, 5, C)
        with torch.no_grad():
            out = gated(x)
            branch = model.f(x)
            expected = torch.add(x, branch, alpha=0.5 * 0.6) if not branch_first \
                else torch.add(branch * 0.6, x, alpha=0.5)
            assert torch.equal(out, expected)
            assert torch.equal(fxsd.strip(gated)(x), out)
            plain = AlphaJoin(branch_first).eval()
            plain.load_state_dict(fxsd.plain_state_dict(gated))
            torch.testing.assert_close(plain(x), out, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(fxsd.strip(gated, fold_scale=True)(x), out,
                                       rtol=1e-5, atol=1e-6)


def test_join_survives_save_and_load(tmp_path):
    torch.manual_seed(0)
    model = AlphaJoin(branch_first=True).eval()
    gated = fxsd.stochastic_depth(model, 0.3).eval()
    torch.save(gated, tmp_path / "gated.pt")
    loaded = torch.load(tmp_path / "gated.pt", weights_only=False)
    (join,) = [g.info.join for g in fxsd.gates(loaded)]
    assert join == fxsd.gates(gated)[0].info.join and join.branch_first and join.alpha == 0.5
    x = torch.randn(4, 5, C)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
