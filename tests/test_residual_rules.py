"""Only real residual blocks are sites: adds that are not a skip plus a learned branch are
rejected with their reason, so fxsd never drops or rescales them (and L stays right)."""

from __future__ import annotations

import warnings
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxsd

Reason = fxsd.analysis.residuals.RejectReason


def _reasons(model, *example):
    analysis = fxsd.analyze_residuals(model, example or None)
    return len(analysis.sites), Counter(r.reason for r in analysis.rejected), analysis


def rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class Rotary(nn.Module):  # Llama / EVA-02 rotary position embedding inside attention
    def __init__(self, dim=8):
        super().__init__()
        self.qk = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        t = torch.arange(6.0)[:, None] * torch.arange(1, dim + 1)[None, :]
        self.register_buffer("cos", t.cos())
        self.register_buffer("sin", t.sin())

    def forward(self, x):
        q, k = self.qk(x).chunk(2, dim=-1)
        q = q * self.cos + rotate_half(q) * self.sin
        k = k * self.cos + rotate_half(k) * self.sin
        return x + self.proj(F.scaled_dot_product_attention(q, k, k))


class NewGELU(nn.Module):  # GPT-2's activation: x + c * x**3 inside
    def forward(self, x):
        return 0.5 * x * (1.0 + torch.tanh(0.7978845608 * (x + 0.044715 * torch.pow(x, 3.0))))


class Mlp(nn.Module):
    def __init__(self, dim=8):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, 4 * dim), NewGELU(), nn.Linear(4 * dim, dim)

    def forward(self, x):
        return x + self.fc2(self.act(self.fc1(x)))


class GRN(nn.Module):  # ConvNeXt-V2 global response normalisation: x + gamma * (x * Nx) + beta
    def __init__(self, dim=8):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.beta = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def forward(self, x):
        gx = torch.norm(x, p=2, dim=(1, 2), keepdim=True)
        nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
        return self.gamma * (x * nx) + self.beta + x


class ConvNeXtV2Block(nn.Module):
    def __init__(self, dim=8):
        super().__init__()
        self.dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.pw1, self.grn = nn.Linear(dim, 4 * dim), GRN(4 * dim)
        self.pw2 = nn.Linear(4 * dim, dim)

    def forward(self, x):
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.pw2(self.grn(F.gelu(self.pw1(y)))).permute(0, 3, 1, 2)
        return x + y


class RepVGGBlock(nn.Module):  # parallel 3x3 + 1x1 + identity, then a nonlinearity
    def __init__(self, dim=8):
        super().__init__()
        self.conv3, self.conv1 = nn.Conv2d(dim, dim, 3, padding=1), nn.Conv2d(dim, dim, 1)

    def forward(self, x):
        return F.relu(self.conv3(x) + self.conv1(x) + x)


class Downsample(nn.Module):  # ResNet's projection skip: conv + BN against conv-BN-ReLU-conv-BN
    def __init__(self, dim=8):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(dim, 2 * dim, 3, 2, 1), nn.BatchNorm2d(2 * dim)
        self.c2, self.b2 = nn.Conv2d(2 * dim, 2 * dim, 3, 1, 1), nn.BatchNorm2d(2 * dim)
        self.down, self.bd = nn.Conv2d(dim, 2 * dim, 1, 2), nn.BatchNorm2d(2 * dim)

    def forward(self, x):
        return self.b2(self.c2(F.relu(self.b1(self.c1(x))))) + self.bd(self.down(x))


class Affine(nn.Module):
    def __init__(self, dim=8):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(dim))
        self.fc = nn.Linear(dim, dim)

    def forward(self, x):
        return self.fc(x) + self.bias  # a bias, not a skip


def test_rotary_embedding_is_not_a_site():
    sites, reasons, _ = _reasons(Rotary())
    assert sites == 1  # x + proj(attention)
    assert reasons[Reason.NO_WEIGHTS] == 2  # q and k rotations


def test_polynomial_activation_is_not_a_site():
    sites, reasons, _ = _reasons(Mlp())
    assert sites == 1
    assert reasons[Reason.NO_WEIGHTS] == 1


def test_grn_internal_add_is_not_a_site():
    sites, reasons, analysis = _reasons(ConvNeXtV2Block())
    assert sites == 1 and analysis.sites[0].module_path == ""
    assert reasons[Reason.NO_WEIGHTS] == 1


def test_parallel_convolutions_are_not_a_skip_but_the_identity_is():
    sites, reasons, analysis = _reasons(RepVGGBlock())
    assert sites == 1 and analysis.sites[0].skip_kind is fxsd.analysis.residuals.SkipKind.IDENTITY
    assert reasons[Reason.PARALLEL_PATHS] == 1


def test_shallow_projection_stays_a_skip():
    sites, reasons, analysis = _reasons(Downsample())
    assert sites == 1 and analysis.sites[0].skip_kind is fxsd.analysis.residuals.SkipKind.PROJECTION
    assert not reasons


def test_a_bias_is_not_a_skip():
    sites, _, _ = _reasons(Affine())
    assert sites == 0


def test_rejected_adds_keep_computing_the_same():
    model = nn.Sequential(Rotary(), Mlp()).eval()
    gated = fxsd.stochastic_depth(model, 1.0, distribution="uniform", scale="none")
    assert len(fxsd.gates(gated)) == 2
    x = torch.randn(2, 6, 8)
    # every gate dropped: what is left is exactly the skips, rotations and activations intact
    gated.train()
    torch.testing.assert_close(gated(x), x, rtol=0, atol=0)


class DeadShapes(nn.Module):
    def __init__(self, dim=8):
        super().__init__()
        self.fc = nn.Linear(dim, dim)

    def forward(self, x):
        h = self.fc(x)
        h.size()[-1]  # read and dropped: a dead metadata chain on a branch value
        return x + h


def test_dead_size_chain_does_not_hide_a_site():
    gm = torch.fx.symbolic_trace(DeadShapes())
    assert any(n.op == "call_method" and n.target == "size" for n in gm.graph.nodes)
    sites, reasons, _ = _reasons(gm)
    assert sites == 1 and not reasons


class FrozenDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return x + F.dropout(self.fc(x), 0.1, self.training)


def test_frozen_dropout_in_a_given_graph_module_warns():
    model = nn.Sequential(FrozenDropout(), FrozenDropout())
    gm = torch.fx.symbolic_trace(model.eval())  # training=False baked in
    with pytest.warns(fxsd.errors.FrozenDropoutWarning, match=r"dropout.*training=False"):
        fxsd.stochastic_depth(gm, 0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gated = fxsd.stochastic_depth(model, 0.0)  # the model itself: dropout stays live
    x = torch.randn(4, 8)
    torch.manual_seed(0)
    a = gated.train()(x)
    torch.manual_seed(0)
    torch.testing.assert_close(a, model.train()(x), rtol=0, atol=0)


timm = pytest.importorskip("timm")


@pytest.mark.parametrize(("name", "sites", "rejected"), [
    ("eva02_tiny_patch14_224", 24, {Reason.NO_WEIGHTS: 24}),  # rotary embeddings
    ("convnextv2_atto", 12, {Reason.NO_WEIGHTS: 12}),  # GRN
    ("repvit_m1", 49, {Reason.PARALLEL_PATHS: 23}),  # RepVGG-style token mixers
])
def test_timm_false_joins(name, sites, rejected):
    model = timm.create_model(name, pretrained=False).eval()
    found, reasons, analysis = _reasons(model)
    assert found == sites
    for reason, count in rejected.items():
        assert reasons[reason] == count


def test_repvit_keeps_the_identity_around_the_parallel_convolutions():
    model = timm.create_model("repvit_m1", pretrained=False).eval()
    analysis = fxsd.analyze_residuals(model)
    mixers = [s for s in analysis.sites if s.module_type == "RepVggDw"]
    assert mixers and all(s.skip_kind is fxsd.analysis.residuals.SkipKind.IDENTITY for s in mixers)
    parallel = [r for r in analysis.rejected if r.reason is Reason.PARALLEL_PATHS]
    assert {r.module_path.rsplit(".", 1)[-1] for r in parallel} <= {"token_mixer"}


@pytest.mark.parametrize(("name", "sites"), [
    ("tiny_vit_5m_224", 22),  # TinyVitBlock: registered not-traceable, joins traced on its own
    ("twins_svt_small", 40),
    ("convit_tiny", 24),
    ("nest_tiny", 24),
    ("hiera_tiny_224", 24),
])
def test_timm_not_traceable_registry(name, sites):
    model = timm.create_model(name, pretrained=False).eval()
    gated = fxsd.stochastic_depth(model, 0.0)  # no hints
    assert len(fxsd.gates(gated)) == sites
    x = torch.randn(1, *model.pretrained_cfg["input_size"])
    with torch.no_grad():
        torch.testing.assert_close(gated.eval()(x), model(x), rtol=0, atol=0)


class CheckedWindows(nn.Module):  # timm window attention: a shape check on a branch value
    def __init__(self, dim=8):
        super().__init__()
        self.norm, self.fc = nn.LayerNorm(dim), nn.Linear(dim, dim)

    def forward(self, x):
        h = self.norm(x)
        torch._assert(h.shape[1] % 2 == 0, "length must be even")
        return x + self.fc(h.reshape(h.shape[0], h.shape[1] // 2, 2, -1)).flatten(1, 2)


def test_shape_checks_on_a_branch_value_go_with_the_branch():
    model = CheckedWindows()
    sites, reasons, _ = _reasons(model)
    assert sites == 1 and not reasons
    gated = fxsd.stochastic_depth(model, 1.0, distribution="uniform", scale="none").train()
    x = torch.randn(2, 6, 8)
    torch.testing.assert_close(gated(x), x, rtol=0, atol=0)  # dropped: the check skipped too
    torch.testing.assert_close(gated.eval()(x), model(x), rtol=0, atol=0)
