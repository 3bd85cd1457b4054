"""Residual joins of whole model families (issue 18): joins into part of a tensor (ReXNet),
re-parameterised parallel sums that are not joins (FastViT's MobileOne), and a model's own layer
drop (Hugging Face ``layerdrop``) adopted, never silently removed."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxsd
from fxsd.partial_join import partial_add
from fxsd.residuals import RejectReason as Reason
from fxsd.training import named_gates


class PartialJoin(nn.Module):  # ReXNet's LinearBottleneck: the shortcut joins the first C channels
    def __init__(self, c=4, out=6):
        super().__init__()
        self.c = c
        self.conv = nn.Conv2d(c, out, 3, padding=1)

    def forward(self, x):
        y = self.conv(F.relu(x))
        return torch.cat([y[:, 0:self.c] + x, y[:, self.c:]], dim=1)


def test_partial_join_is_a_site_and_skips_exactly():
    model = nn.Sequential(PartialJoin(), nn.Conv2d(6, 4, 1), PartialJoin())
    x = torch.randn(3, 4, 5, 5)
    analysis = fxsd.analyze_residuals(model, (x,))
    assert len(analysis.sites) == 2 and not analysis.rejected
    assert {s.add_kind for s in analysis.sites} == {"partial add"}
    gated = fxsd.stochastic_depth(model, 0.0)
    with torch.no_grad():
        torch.testing.assert_close(gated.eval()(x), model(x), rtol=0, atol=0)
    dropped = fxsd.stochastic_depth(model, 1.0, distribution="uniform", scale="none").train()
    out = dropped(x)  # the branch contributes zeros to every channel, the skip its channels
    h = torch.cat([x, torch.zeros(3, 2, 5, 5)], 1)
    h = model[1](h)
    torch.testing.assert_close(out, torch.cat([h, torch.zeros(3, 2, 5, 5)], 1), rtol=0, atol=0)
    out.sum().backward()
    assert model[0].conv.weight.grad is None and model[1].weight.grad is not None
    for mode in ("sample",):  # rows: the same join of the kept rows' branch
        sampled = fxsd.stochastic_depth(model, 0.5, distribution="uniform", mode=mode, seed=0)
        y = sampled.train()(x)
        assert y.shape == model(x).shape
    stripped = fxsd.strip(gated)
    assert any(n.target is partial_add for m in stripped.modules()
               if isinstance(m, torch.fx.GraphModule) for n in m.graph.nodes)
    with torch.no_grad():
        torch.testing.assert_close(stripped(x), model(x), rtol=0, atol=0)


class MobileOne(nn.Module):  # timm's MobileOneBlock: conv_scale(x) + identity_bn(x) + conv_kxk(x)
    def __init__(self, c=4):
        super().__init__()
        self.scale = nn.Sequential(nn.Conv2d(c, c, 1), nn.BatchNorm2d(c))
        self.identity = nn.BatchNorm2d(c)
        self.kxk = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c))

    def forward(self, x):
        out = self.scale(x) + self.identity(x)
        out += self.kxk(x)
        return F.relu(out)


def test_parallel_linear_paths_are_one_layer():
    analysis = fxsd.analyze_residuals(MobileOne().eval(), (torch.randn(2, 4, 6, 6),))
    assert not analysis.sites  # conv_scale + identity_bn: parallel; + conv_kxk: no cheap skip
    assert [r.reason for r in analysis.rejected] == [Reason.PARALLEL_PATHS, Reason.NO_CHEAP_SKIP]


timm = pytest.importorskip("timm")


def test_rexnet_partial_channel_joins():
    # timm 1.0.31 rexnet.py, LinearBottleneck.forward: with use_shortcut (stride 1, in_chs <=
    # out_chs) `torch.cat([x[:, 0:self.in_channels] + shortcut, x[:, self.in_channels:]], 1)`;
    # rexnet_100's 16 blocks have 11 such (the 5 stride-2 blocks and the first have none).
    model = timm.create_model("rexnet_100").eval()
    uses = [n for n, m in model.named_modules() if getattr(m, "use_shortcut", False)]
    assert len(uses) == 11
    gated = fxsd.stochastic_depth(model, 0.0)
    assert len(fxsd.gates(gated)) == 11
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(gated.eval()(x), model(x), rtol=0, atol=0)
    # always dropped in training = the plain model with those branches' outputs zero
    dropped = fxsd.stochastic_depth(model, 1.0, distribution="uniform", scale="none")
    plain = copy.deepcopy(model).train()
    for name in uses:
        plain.get_submodule(name).conv_pwl.register_forward_hook(
            lambda m, a, out: torch.zeros_like(out))
    with torch.no_grad():
        torch.manual_seed(1)  # the head's dropout draws the same in both
        out = dropped.train()(x)
        torch.manual_seed(1)
        torch.testing.assert_close(out, plain(x), rtol=0, atol=0)


def test_fastvit_mobileone_sums_are_not_joins():
    # timm 1.0.31 fastvit.py: fastvit_t8 has depths (2, 2, 4, 2) = 10 RepMixerBlocks, each with
    # two true joins (RepMixer's `x + layer_scale(mixer(x) - norm(x))` and the block's
    # `x + drop_path(layer_scale(mlp(x)))`): 20. MobileOneBlock sums conv_scale(x) +
    # identity(x) + conv_kxk(x) (parallel linear paths, merged at deployment) are no joins.
    model = timm.create_model("fastvit_t8").eval()
    analysis = fxsd.analyze_residuals(model)
    assert len(analysis.sites) == 20
    assert not [s for s in analysis.sites if s.module_type == "MobileOneBlock"]
    assert sum(r.reason is Reason.PARALLEL_PATHS for r in analysis.rejected) == 13


transformers = pytest.importorskip("transformers")


def _wav2vec2(layerdrop):
    cfg = transformers.Wav2Vec2Config(
        hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        conv_dim=(8, 8), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=4,
        num_conv_pos_embedding_groups=2, layerdrop=layerdrop, vocab_size=10, hidden_dropout=0.0,
        attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0,
        mask_time_prob=0.0)
    torch.manual_seed(0)
    return transformers.Wav2Vec2Model(cfg)


def _layer_calls(model, x, steps=120):
    """How often layer 0's attention and feed-forward ran in ``steps`` training forwards."""
    layer = model.encoder.layers[0]
    counts = {"attention": 0, "feed_forward": 0}
    hooks = [layer.attention.q_proj.register_forward_hook(
                 lambda *a: counts.__setitem__("attention", counts["attention"] + 1)),
             layer.feed_forward.intermediate_dense.register_forward_hook(
                 lambda *a: counts.__setitem__("feed_forward", counts["feed_forward"] + 1))]
    model.train()
    with torch.no_grad():
        for _ in range(steps):
            model(x)
    for h in hooks:
        h.remove()
    return counts


@pytest.mark.parametrize("traced_in", ["eval", "train"])
def test_wav2vec2_layerdrop_is_adopted_not_doubled(traced_in):
    # transformers 5.25 Wav2Vec2Encoder.forward: `if self.training and dropout_probability <
    # self.config.layerdrop: skip the layer`; joins: the encoder's positional conv and each
    # layer's attention and feed-forward (2 layers: 5).
    model = _wav2vec2(0.5)
    model.train(traced_in == "train")
    x = torch.randn(2, 400)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gated = fxsd.stochastic_depth(model, example_inputs=(x,), seed=0)
    rates = {n: g.drop_rate for n, g in named_gates(gated).items()}
    assert len(rates) == 5 and rates["encoder.residual_gate"] == 0.0
    assert all(r == 0.5 for n, r in rates.items() if ".layers." in n)
    assert model.config.layerdrop == 0.5 and model.encoder.config.layerdrop == 0.5  # untouched
    counts = _layer_calls(gated, x)
    # each join drops at 0.5: 60 of 120 expected (sd 5.5); dropped twice it would be 30
    assert all(42 <= c <= 78 for c in counts.values()), counts
    explicit = fxsd.stochastic_depth(model, 0.2, distribution="uniform", example_inputs=(x,),
                                     seed=0)
    counts = _layer_calls(explicit, x)
    # 0.2 alone: 96 expected (sd 4.4); with the model's own 0.5 on top it would be 48
    assert all(82 <= c <= 110 for c in counts.values()), counts
