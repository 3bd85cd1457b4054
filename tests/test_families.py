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
from fxsd.record import RejectReason as Reason
from fxsd.runtime.accessors import named_gates
from fxsd.tracing.partial_join import partial_add


class PartialJoin(nn.Module):  # ReXNet's LinearBottleneck: the shortcut joins the first C channels
    def __init__(self, c=4, out=6, inplace=False):
        super().__init__()
        self.c = c
        self.inplace = inplace
        self.conv = nn.Conv2d(c, out, 3, padding=1)

    def forward(self, x):
        y = self.conv(F.relu(x))
        if self.inplace:  # the other spelling; torch.fx alone cannot trace it
            y[:, 0:self.c] += x
            return y
        return torch.cat([y[:, 0:self.c] + x, y[:, self.c:]], dim=1)


@pytest.mark.parametrize("inplace", [False, True], ids=["cat", "inplace"])
def test_partial_join_is_a_site_and_skips_exactly(inplace):
    model = nn.Sequential(PartialJoin(inplace=inplace), nn.Conv2d(6, 4, 1),
                          PartialJoin(inplace=inplace))
    x = torch.randn(3, 4, 5, 5)
    analysis = fxsd.analyze_residuals(model, (x,))
    assert len(analysis.sites) == 2 and not analysis.rejected
    assert {s.add_kind for s in analysis.sites} == {"partial add"}
    gated = fxsd.stochastic_depth(model, 0.0)
    assert sorted(named_gates(gated)) == ["0.residual_gate", "2.residual_gate"]  # per block
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


@pytest.mark.slow
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



def test_a_layer_the_models_own_layer_drop_skips_while_fxsd_traces_is_still_gated():
    # in training mode the example run draws the model's layer drop: before, a skipped layer
    # was not traced and its joins silently not gated (seed 0: 1 gate of 5)
    x = torch.randn(2, 400)
    for seed in range(3):
        model = _wav2vec2(0.5).train()
        torch.manual_seed(seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gated = fxsd.stochastic_depth(model, example_inputs=(x,), seed=0)
        assert len(named_gates(gated)) == 5, seed
        assert model.config.layerdrop == 0.5 and model.encoder.config.layerdrop == 0.5

# -- values that escape a branch only through shapes (fxsd.analysis.escapes)
# ---------------------------


def _zero_output(module, index=None):
    """Make ``module`` return zeros in place of its output (of element ``index`` of it)."""
    def hook(m, args, out):
        if index is None:
            return torch.zeros_like(out)
        return (*out[:index], torch.zeros_like(out[index]), *out[index + 1:])
    return module.register_forward_hook(hook)


def _calls(modules):
    """Count each module's calls (forward hooks)."""
    counts = dict.fromkeys(modules, 0)

    def hook(name):
        def count(m, args, out):
            counts[name] += 1
        return count
    return counts, [m.register_forward_hook(hook(n)) for n, m in modules.items()]


def _assert_skips_like_zeroed(dropped, plain, kw, modules):
    """In training, ``dropped`` (its gates always dropping) computes the logits ``plain`` (its
    branches' outputs zeroed) does, and its backward runs, without calling ``modules``."""
    counts, hooks = _calls(modules)
    try:
        out = dropped.train()(**kw)
        torch.testing.assert_close(out.logits, plain(**kw).logits, rtol=0, atol=0)
        out.logits.sum().backward()
        assert set(counts.values()) == {0}, counts
    finally:
        for h in hooks:
            h.remove()


def _grads(model):
    return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


def _assert_same_grads(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert (a[name] is None) == (b[name] is None), name
        if a[name] is not None:
            torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)


T5_BLOCK0 = ("encoder.block.0.layer.0", "decoder.block.0.layer.0", "decoder.block.0.layer.1")


def test_t5_block0_joins_are_gated_and_skip_exactly_with_their_position_bias():
    # transformers 5.25 modeling_t5.py: T5Attention.forward builds `position_bias` from
    # `key_states.shape[-2]` when it is given none (block 0: the relative bias of encoder and
    # decoder self-attention from its embedding table, zeros for the cross-attention); each
    # T5Layer*Attention returns it, and T5Stack hands it to every later block. Joins: 2 encoder
    # blocks x (attention, feed-forward) + 2 decoder blocks x (self-, cross-attention,
    # feed-forward) = 10.
    config = transformers.T5Config(vocab_size=99, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                   num_decoder_layers=2, num_heads=4, dropout_rate=0.0,
                                   decoder_start_token_id=0)
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(config)
    kw = {"input_ids": torch.randint(0, 99, (2, 9)),
          "decoder_input_ids": torch.randint(0, 99, (2, 5)), "use_cache": False}
    analysis = fxsd.analyze_residuals(model, example_kwargs=kw)
    assert len(analysis.sites) == 10
    escaping = sorted(s.module_path for s in analysis.sites if s.escapes)
    assert escaping == sorted(T5_BLOCK0)
    dropped = fxsd.stochastic_depth(model, 1.0, distribution="uniform", scale="none",
                                    example_kwargs=kw, select=lambda s: s.module_path in T5_BLOCK0)
    assert len(fxsd.gates(dropped)) == 3
    plain = copy.deepcopy(model).train()
    hooks = [_zero_output(plain.get_submodule(f"{p}.dropout")) for p in T5_BLOCK0]
    # the projections each branch holds (the cross-attention's keys and values of the encoder
    # output do not depend on the skipped input: they stay outside, as for every other block)
    attention = {f"{p}.{name}.{proj}": dropped.get_submodule(f"{p}.{name}.{proj}")
                 for p, name, projs in zip(T5_BLOCK0, ("SelfAttention",) * 2 + ("EncDecAttention",),
                                           ("qkvo", "qkvo", "qo")) for proj in projs}
    biases = {}
    for key, m in (("plain", plain), ("gated", dropped)):
        m.get_submodule(T5_BLOCK0[0]).register_forward_hook(
            lambda mod, a, out, key=key: biases.__setitem__(key, out[1]))
    counts, count_hooks = _calls(attention)
    for _ in range(2):  # the second step reuses the shapes the first one worked out
        for m in (dropped, plain):
            m.zero_grad(set_to_none=True)
        out = dropped.train()(**kw).logits
        out.sum().backward()
        reference = plain(**kw).logits
        reference.sum().backward()
        torch.testing.assert_close(out, reference, rtol=0, atol=0)
        torch.testing.assert_close(biases["gated"], biases["plain"], rtol=0, atol=0)
        _assert_same_grads(_grads(dropped), _grads(plain))
    assert set(counts.values()) == {0}, counts  # no projection of block 0 ran for real
    for h in (*hooks, *count_hooks):
        h.remove()
    assert plain.encoder.block[0].layer[0].SelfAttention.q.weight.grad is None
    assert plain.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight.grad \
        is not None  # block 1 reads the bias: it trains


def test_mvitv2_attention_joins_hand_on_their_pooled_size():
    # timm 1.0.31 mvitv2.py, MultiScaleBlock.forward: `x_norm, feat_size_new = self.attn(x_norm,
    # feat_size)`, `x = x_shortcut + self.drop_path1(x_norm)`, then `x + drop_path2(mlp(...))`,
    # returning (x, feat_size_new): the size the attention's query pooling produced
    # (reshape_post_pool(...) -> Tuple[Tensor, List[int]]), which the next block reads.
    # mvitv2_tiny: depths (1, 2, 5, 2) = 10 blocks x 2 joins = 20.
    model = timm.create_model("mvitv2_tiny").eval()
    gated = fxsd.stochastic_depth(model, 0.0)
    names = list(named_gates(gated))
    assert len(names) == 20 and type(gated) is type(model)  # gated block by block
    assert sum(name.endswith(".attn_gate") for name in names) == 10
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(gated(x), model(x), rtol=0, atol=0)
    # every attention always dropped = the plain model with attention outputs zero (its pooled
    # size as the attention computes it)
    def attention(site):
        return any(str(n.target).endswith("attn.qkv") for n in site.branch)

    dropped = fxsd.stochastic_depth(model, 1.0, distribution="uniform", scale="none",
                                    select=attention)
    assert len(named_gates(dropped)) == 10
    plain = copy.deepcopy(model).train()
    blocks = [m for m in plain.modules() if type(m).__name__ == "MultiScaleBlock"]
    hooks = [_zero_output(b.attn, 0) for b in blocks]
    qkv = {f"{i}": b.attn.qkv for i, b in enumerate(m for m in dropped.modules()
                                                     if type(m).__name__ == "MultiScaleBlock")}
    counts, count_hooks = _calls(qkv)
    for _ in range(2):
        for m in (dropped, plain):
            m.zero_grad(set_to_none=True)
        out = dropped.train()(x)
        out.sum().backward()
        reference = plain(x)
        reference.sum().backward()
        torch.testing.assert_close(out, reference, rtol=0, atol=0)
        _assert_same_grads(_grads(dropped), _grads(plain))
    assert set(counts.values()) == {0}, counts
    for h in (*hooks, *count_hooks):
        h.remove()


def _falcon(attention):
    # transformers 5.25 modeling_falcon.py, FalconDecoderLayer.forward (parallel_attn, the
    # default): `mlp_output += attention_output` (two branches of one norm: no join), then
    # `output = dropout_add(mlp_output, residual, ...)`: one join per layer, 2 layers = 2. The
    # layer returns (output, attn_weights) to FalconModel, which fxsd cannot trace (it takes a
    # DynamicCache): under SDPA the weights are None, under eager attention a tensor.
    config = transformers.FalconConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2,
                                       num_attention_heads=4, hidden_dropout=0.0,
                                       attention_dropout=0.0)
    config._attn_implementation = attention
    torch.manual_seed(0)
    return transformers.FalconForCausalLM(config)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_falcon_layers_returning_attention_weights_are_gated(attention):
    from fxsd.errors import DroppedValueError
    from fxsd.runtime.escape_path import DroppedValue

    model = _falcon(attention).eval()
    kw = {"input_ids": torch.randint(0, 99, (2, 9))}
    gated = fxsd.stochastic_depth(model, 0.0, example_kwargs=kw)
    assert sorted(named_gates(gated)) == ["transformer.h.0.residual_gate",
                                          "transformer.h.1.residual_gate"]
    with torch.no_grad():
        torch.testing.assert_close(gated(**kw).logits, model(**kw).logits, rtol=0, atol=0)
        weights = gated(**kw, output_attentions=True).attentions
        expected = model(**kw, output_attentions=True).attentions
        for a, b in zip(weights, expected):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, rtol=0, atol=0)
    dropped = fxsd.stochastic_depth(model, 1.0, distribution="uniform", scale="none",
                                    example_kwargs=kw)
    plain = copy.deepcopy(model).train()
    for layer in plain.transformer.h:
        _zero_output(layer.self_attention, 0)
        _zero_output(layer.mlp)
    projections = {f"{i}.{n}": getattr(layer.self_attention if n != "mlp" else layer, n)
                   for i, layer in enumerate(dropped.transformer.h)
                   for n in ("query_key_value", "dense", "mlp")}
    _assert_skips_like_zeroed(dropped, plain, kw, projections)
    weights = dropped(**kw, output_attentions=True).attentions
    if attention == "sdpa":  # what a skipped layer hands on is what its run would: None
        assert all(w is None for w in weights)
    else:  # eager weights cannot be had without the layer: asking for them fails loudly
        assert all(isinstance(w, DroppedValue) for w in weights)
        with pytest.raises(DroppedValueError, match="which 'transformer.h.0' returns, .*"
                                                    "'transformer.h.0.residual_gate'"):
            weights[0].sum()
        with pytest.raises(DroppedValueError):
            torch.stack(list(weights))


def test_bloom_joins_performed_by_the_modules_a_block_calls_are_owned_by_the_block():
    # transformers 5.25 modeling_bloom.py: BloomBlock normalises, then hands the norm's output and
    # the residual to BloomAttention and BloomMLP, each of which performs its own join,
    # `dropout_add(output_tensor, residual, ...)`: 2 joins per layer, 2 layers = 4. Each branch
    # starts in the block (its norm), so the block owns both joins. The layer returns the
    # attention probabilities to BloomModel, which fxsd cannot trace.
    config = transformers.BloomConfig(vocab_size=99, hidden_size=32, n_layer=2, n_head=4)
    torch.manual_seed(0)
    model = transformers.BloomForCausalLM(config).eval()
    kw = {"input_ids": torch.randint(0, 99, (2, 9))}
    gated = fxsd.stochastic_depth(model, 0.5, example_kwargs=kw)  # gated in eval: in eval
    assert sorted(named_gates(gated)) == [f"transformer.h.{i}.{n}_gate" for i in (0, 1)
                                          for n in ("mlp", "self_attention")]
    with torch.no_grad():
        torch.testing.assert_close(gated(**kw).logits, model(**kw).logits, rtol=0, atol=0)
    dropped = fxsd.stochastic_depth(model, 1.0, distribution="uniform", scale="none",
                                    example_kwargs=kw)
    plain = copy.deepcopy(model).train()
    for layer in plain.transformer.h:  # the branches' last layers, before dropout_add
        _zero_output(layer.self_attention.dense)
        _zero_output(layer.mlp.dense_4h_to_h)
    projections = {f"{i}.{n}": getattr(layer.self_attention if n != "dense_h_to_4h"
                                       else layer.mlp, n)
                   for i, layer in enumerate(dropped.transformer.h)
                   for n in ("query_key_value", "dense", "dense_h_to_4h")}
    _assert_skips_like_zeroed(dropped, plain, kw, projections)


@pytest.mark.slow
def test_deepseek_v3_attention_writes_into_its_own_buffer():
    # transformers 5.25 modeling_deepseek_v3.py, DeepseekV3Attention.expand_kv: `key_states =
    # kv_nope.new_empty(...)`, then `key_states[..., :d].copy_(k_nope)` and
    # `key_states[..., d:].copy_(k_rot)`: in-place writes into a tensor the branch created.
    # DeepseekV3DecoderLayer: attention and MLP (dense in layer 0, MoE in layer 1) joins, 2 layers
    # = 4.
    config = transformers.DeepseekV3Config(
        vocab_size=99, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4,
        num_experts_per_tok=2, first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=16,
        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, n_group=2, topk_group=1)
    torch.manual_seed(0)
    model = transformers.DeepseekV3ForCausalLM(config).eval()
    kw = {"input_ids": torch.randint(0, 99, (2, 9))}
    gated = fxsd.stochastic_depth(model, 0.0, example_kwargs=kw)
    assert sorted(named_gates(gated)) == [f"model.layers.{i}.{n}_gate" for i in (0, 1)
                                          for n in ("mlp", "self_attn")]
    with torch.no_grad():
        torch.testing.assert_close(gated(**kw).logits, model(**kw).logits, rtol=0, atol=0)
    dropped = fxsd.stochastic_depth(
        model, 1.0, distribution="uniform", scale="none", example_kwargs=kw,
        select=lambda s: any(str(n.target).endswith("kv_b_proj") for n in s.branch))
    assert sorted(named_gates(dropped)) == ["model.layers.0.residual_gate",
                                            "model.layers.1.residual_gate"]
    plain = copy.deepcopy(model).train()
    for layer in plain.model.layers:
        _zero_output(layer.self_attn, 0)
    projections = {f"{i}": layer.self_attn.kv_b_proj
                   for i, layer in enumerate(dropped.model.layers)}
    _assert_skips_like_zeroed(dropped, plain, kw, projections)
