"""Training features: sample mode (mask and subset), scaling, adopting drop paths, schedules,
warmup, RNG state and the Composer-compatible entry point."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from conftest import DropPath, called_modules, grads
from torch import nn

import fxsd


class LnMlpBlock(nn.Module):
    def __init__(self, c: int = 16) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(c)
        self.fc1, self.fc2 = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)

    def forward(self, x):
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm(x))))


class LnMlp(nn.Module):
    def __init__(self, depth: int = 3) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*[LnMlpBlock() for _ in range(depth)])

    def forward(self, x):
        return self.blocks(x)


def _run(gm, x, seed=0):
    for g in fxsd.gates(gm):
        g.sampler.set_state(fxsd.runtime.gate.DropSampler(seed).get_state())
    gm.zero_grad(set_to_none=True)
    xi = x.clone().requires_grad_()
    out = gm(xi)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out, xi.grad, grads(gm)


# -- sample mode -----------------------------------------------------------------------------


def test_sample_mask_equals_torchvision_row_drop_path():
    model = LnMlp(1)
    gm = fxsd.stochastic_depth(model, 0.5, distribution="uniform", mode="sample",
                               sample_impl="mask", scale="train", seed=0).train()
    x = torch.randn(64, 16)
    out = gm(x)
    (gate,) = fxsd.gates(gm)
    kept = gate.kept_rows
    assert 10 < int(kept.sum()) < 54
    block = model.blocks[0]
    branch = block.fc2(torch.nn.functional.gelu(block.fc1(block.norm(x))))
    # torchvision's op with the same mask: noise = mask / keep, branch * noise.
    noise = kept.to(torch.float32).div_(0.5).view(64, 1)
    expected = x + branch * noise
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(3)
    ref = torchvision.ops.stochastic_depth(branch, 0.5, "row", True)
    torch.manual_seed(3)
    mask = torch.empty(64, 1).bernoulli_(0.5)
    torch.testing.assert_close(ref, branch * mask / 0.5)
    del gen


@pytest.mark.parametrize("scale", ["train", "eval"])
def test_subset_equals_mask_outputs_and_gradients_ln_mlp(scale):
    model = LnMlp(3)
    x = torch.randn(32, 16)
    kw = dict(distribution="uniform", mode="sample", scale=scale, seed=0)
    subset = fxsd.stochastic_depth(model, 0.5, sample_impl="subset", **kw).train()
    mask = fxsd.stochastic_depth(model, 0.5, sample_impl="mask", **kw).train()
    assert [g.sample_impl for g in fxsd.gates(subset)] == ["subset"] * 3
    o1, gx1, g1 = _run(subset, x)
    o2, gx2, g2 = _run(mask, x)
    torch.testing.assert_close(o1, o2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx1, gx2, rtol=1e-5, atol=1e-6)
    assert g1.keys() == g2.keys()
    for k in g1:
        torch.testing.assert_close(g1[k], g2[k], rtol=1e-4, atol=1e-6, msg=k)


def test_subset_computes_only_kept_rows():
    model = LnMlp(1)
    gm = fxsd.stochastic_depth(model, 0.75, distribution="uniform", mode="sample", seed=0)
    rows_seen = []
    h = gm.blocks[0].fc1.register_forward_hook(lambda m, a, o: rows_seen.append(a[0].shape[0]))
    gm.train()(torch.randn(40, 16))
    h.remove()
    (gate,) = fxsd.gates(gm)
    assert rows_seen == [int(gate.kept_rows.sum())] and rows_seen[0] < 40


def test_subset_equals_mask_on_vit():
    model = torchvision.models.vit_b_16(image_size=32)
    with torch.no_grad():
        model.heads.head.weight.normal_(0, 0.02)
    x = torch.randn(6, 3, 32, 32)
    kw = dict(distribution="uniform", mode="sample", scale="train", seed=0)
    subset = fxsd.stochastic_depth(model, 0.4, **kw).train()
    mask = fxsd.stochastic_depth(model, 0.4, sample_impl="mask", **kw).train()
    assert {g.sample_impl for g in fxsd.gates(subset)} == {"subset"}
    o1, gx1, g1 = _run(subset, x)
    o2, gx2, g2 = _run(mask, x)
    torch.testing.assert_close(o1, o2, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gx1, gx2, rtol=1e-4, atol=1e-5)
    for k in g1:
        torch.testing.assert_close(g1[k], g2[k], rtol=1e-3, atol=1e-5, msg=k)
    # The attention module sees only the kept rows.
    seen = []
    attn = subset.encoder.layers[0].self_attention
    h = attn.register_forward_hook(lambda m, a, o: seen.append(a[0].shape[0]))
    subset(x)
    h.remove()
    gate = fxsd.gates(subset)[0]
    assert seen == [int(gate.kept_rows.sum())] or (seen == [] and not gate.kept_rows.any())


def test_batchnorm_branch_falls_back_to_mask_with_reason():
    gm = fxsd.stochastic_depth(torchvision.models.resnet18(), 0.2, mode="sample")
    assert {g.sample_impl for g in fxsd.gates(gm)} == {"mask"}
    assert all("BatchNorm2d" in g.note for g in fxsd.gates(gm))
    text = fxsd.table(gm, width=0)
    assert "sample/mask" in text and "mixes the rows of a batch" in text
    with pytest.raises(fxsd.InvalidArgumentError, match="BatchNorm2d"):
        fxsd.stochastic_depth(torchvision.models.resnet18(), 0.2, mode="sample",
                              sample_impl="subset")


def test_sample_mode_eval_scaling():
    model = LnMlp(2).eval()
    x = torch.randn(4, 16)
    train_scaled = fxsd.stochastic_depth(model, 0.4, distribution="uniform", mode="sample",
                                         scale="train").eval()
    torch.testing.assert_close(train_scaled(x), model(x), rtol=0, atol=0)


# -- scaling in block mode -------------------------------------------------------------------


def test_block_scale_train_divides_kept_branches():
    model = LnMlp(1)
    gm = fxsd.stochastic_depth(model, 0.25, distribution="uniform", scale="train", seed=1).train()
    x = torch.randn(3, 16)
    block = model.blocks[0]
    branch = block.fc2(torch.nn.functional.gelu(block.fc1(block.norm(x))))
    outs = set()
    for _ in range(30):
        out = gm(x)
        (gate,) = fxsd.gates(gm)
        expected = x if gate.dropped else x + branch / 0.75
        torch.testing.assert_close(out, expected)
        outs.add(gate.dropped)
    assert outs == {True, False}
    torch.testing.assert_close(gm.eval()(x), model.eval()(x), rtol=0, atol=0)


# -- existing drop paths ---------------------------------------------------------------------


def test_adopt_convnext_drop_paths():
    model = torchvision.models.convnext_tiny(stochastic_depth_prob=0.4)
    own = [m.p for m in model.modules() if isinstance(m, torchvision.ops.StochasticDepth)]
    gm = fxsd.stochastic_depth(model)  # no rate given: the model's own
    gates = fxsd.gates(gm)
    assert [g.drop_rate for g in gates] == pytest.approx(own)
    assert all(g.mode == "sample" and g.scale == "train" for g in gates)
    assert all(g.drop_path is fxsd.runtime.gate.DropPathAction.ADOPTED for g in gates)
    assert all(g.note.startswith("adopted StochasticDepth") for g in gates)
    assert not [m for m in called_modules(gm) if isinstance(m, torchvision.ops.StochasticDepth)]
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(gm.eval()(x), model.eval()(x), rtol=0, atol=0)
    assert "adopted StochasticDepth(p=0.4)" in fxsd.table(gm, width=0)


def test_existing_replace_and_keep():
    model = torchvision.models.convnext_tiny(stochastic_depth_prob=0.4)
    replaced = fxsd.stochastic_depth(model, 0.2, existing="replace")
    assert [g.drop_rate for g in fxsd.gates(replaced)][-1] == pytest.approx(0.2)
    assert all(g.mode == "block" for g in fxsd.gates(replaced))
    kept = fxsd.stochastic_depth(model, 0.2, existing="keep")
    assert all(g.note == "kept existing drop path" for g in fxsd.gates(kept))
    sd_nodes = [n for g in fxsd.gates(kept) for n in g.branch.graph.nodes
                if n.op == "call_module" and "stochastic_depth" in str(n.target)]
    assert len(sd_nodes) == 18


def test_adopt_timm_vit_drop_path():
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_small_patch16_224", drop_path_rate=0.1, img_size=32,
                              pretrained=False)
    own = [float(m.drop_prob) for m in model.modules() if type(m).__name__ == "DropPath"]
    gm = fxsd.stochastic_depth(model)
    gates = fxsd.gates(gm)
    assert len(gates) == 24
    # timm puts nn.Identity where its schedule gives 0 (the first block): those sites keep 0.
    assert len(own) == 22
    assert [g.drop_rate for g in gates] == pytest.approx([0.0, 0.0] + own)
    assert all(g.note.startswith("adopted DropPath") for g in gates[2:])
    assert not [m for m in called_modules(gm) if type(m).__name__ == "DropPath"]
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(gm.eval()(x), model.eval()(x), rtol=0, atol=0)


# -- schedules, warmup, RNG state ------------------------------------------------------------


def test_linspace_distribution():
    gm = fxsd.stochastic_depth(LnMlp(5), 0.4, distribution="linspace")
    assert [g.drop_rate for g in fxsd.gates(gm)] == pytest.approx([0, 0.1, 0.2, 0.3, 0.4])


def test_set_drop_rate_keeps_distribution():
    gm = fxsd.stochastic_depth(LnMlp(4), 0.2)
    fxsd.set_drop_rate(gm, 0.4)
    assert [g.drop_rate for g in fxsd.gates(gm)] == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert fxsd.get_drop_rate(gm) == 0.4
    gm0 = fxsd.stochastic_depth(LnMlp(4), 0.0)
    fxsd.set_drop_rate(gm0, 0.8)
    assert [g.drop_rate for g in fxsd.gates(gm0)] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    with pytest.raises(fxsd.InvalidArgumentError):
        fxsd.set_drop_rate(gm, 1.2)
    with pytest.raises(fxsd.InvalidArgumentError, match="no fxsd gates"):
        fxsd.set_drop_rate(nn.Linear(2, 2), 0.1)


def test_drop_warmup_reaches_exact_rate_and_resumes():
    gm = fxsd.stochastic_depth(LnMlp(4), 0.4)
    warm = fxsd.DropWarmup(gm, total_steps=100, warmup=0.1)
    assert fxsd.get_drop_rate(gm) == 0.0
    rates = []
    for _ in range(12):
        warm.step()
        rates.append(fxsd.get_drop_rate(gm))
    assert rates[:10] == pytest.approx([0.04 * i for i in range(1, 11)])
    assert rates[9] == 0.4 and rates[11] == 0.4  # exactly the full rate at the end of warmup
    assert fxsd.gates(gm)[-1].drop_rate == 0.4
    state = warm.state_dict()
    gm2 = fxsd.stochastic_depth(LnMlp(4), 0.4)
    warm2 = fxsd.DropWarmup(gm2, total_steps=100, warmup=0.1)
    warm2.load_state_dict({**state, "step_count": 5})
    assert fxsd.get_drop_rate(gm2) == pytest.approx(0.2)


def test_rng_state_resume_continues_the_same_sequence():
    x = torch.randn(2, 16)

    def decisions(gm, steps):
        seq = []
        for _ in range(steps):
            gm(x)
            seq.append(tuple(g.dropped for g in fxsd.gates(gm)))
        return seq

    full = fxsd.stochastic_depth(LnMlp(4), 0.5, distribution="uniform", seed=11).train()
    expected = decisions(full, 20)
    first = fxsd.stochastic_depth(LnMlp(4), 0.5, distribution="uniform", seed=11).train()
    part1 = decisions(first, 8)
    state = fxsd.get_rng_state(first)
    resumed = fxsd.stochastic_depth(LnMlp(4), 0.5, distribution="uniform", seed=999).train()
    fxsd.set_rng_state(resumed, state)
    assert part1 + decisions(resumed, 12) == expected
    assert list(resumed.state_dict()) == list(LnMlp(4).state_dict())


def test_sync_ranks_false_offsets_seed_by_rank(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    a = fxsd.stochastic_depth(LnMlp(2), 0.5, seed=3, sync_ranks=False)
    b = fxsd.stochastic_depth(LnMlp(2), 0.5, seed=3, sync_ranks=True)
    assert fxsd.gates(a)[0].sampler.seed != fxsd.gates(b)[0].sampler.seed == 3


# -- Composer-compatible entry point ---------------------------------------------------------


def test_composer_functional_example_runs():
    # The seed document's example, with torchvision's ResNet-50 and fxsd's entry point.
    import torch.nn.functional as F

    model = torchvision.models.resnet50()
    opt = torch.optim.Adam(model.parameters())
    gm = fxsd.apply_stochastic_depth(model, target_layer_name="Bottleneck",
                                     stochastic_method="block", drop_rate=0.2,
                                     drop_distribution="linear")
    assert len(fxsd.gates(gm)) == 16
    assert [g.drop_rate for g in fxsd.gates(gm)][-1] == pytest.approx(0.2)
    gm.train()
    X, y = torch.randn(2, 3, 64, 64), torch.tensor([1, 2])
    loss = F.cross_entropy(gm(X), y)
    loss.backward()
    opt.step()
    opt.zero_grad()


def test_composer_target_layer_limits_sites():
    model = torchvision.models.vit_b_16(image_size=32)
    gm = fxsd.apply_stochastic_depth(model, target_layer_name="EncoderBlock", drop_rate=0.3)
    assert len(fxsd.gates(gm)) == 24
    # Composer does nothing (and logs a warning) when no layer matches; so does fxsd.
    resnet18 = torchvision.models.resnet18()
    before = [(n, type(m)) for n, m in resnet18.named_modules()]
    with pytest.warns(fxsd.errors.NoResidualSitesWarning, match="no residual site lies inside"):
        same = fxsd.apply_stochastic_depth(resnet18, target_layer_name="Bottleneck")
    assert same is resnet18 and not fxsd.gates(resnet18)
    assert [(n, type(m)) for n, m in resnet18.named_modules()] == before


def test_composer_warmup_needs_total_steps():
    with pytest.raises(fxsd.InvalidArgumentError, match="total_steps"):
        fxsd.apply_stochastic_depth(LnMlp(2), drop_warmup=0.1)
    gm = fxsd.apply_stochastic_depth(LnMlp(2), drop_warmup=0.5, total_steps=10, drop_rate=0.2)
    warm = fxsd.get_record(gm).warmup
    assert fxsd.get_drop_rate(gm) == 0.0
    for _ in range(5):
        warm.step()
    assert math.isclose(fxsd.get_drop_rate(gm), 0.2)


def test_mask_mode_computes_every_row_and_zeroes_the_dropped_ones():
    # mask mode is the comparison point: the branch runs on the whole batch, dropped rows are
    # multiplied by zero afterwards (subset mode, above, does not compute them).
    model = LnMlp(1)
    gm = fxsd.stochastic_depth(model, 0.5, distribution="uniform", mode="sample",
                               sample_impl="mask", scale="none").train()
    seen = []
    handle = gm.blocks[0].fc1.register_forward_hook(lambda m, a, o: seen.append(len(a[0])))
    x = torch.randn(8, 16)
    out = gm(x)
    handle.remove()
    (gate,) = fxsd.gates(gm)
    assert seen == [8] and 0 < int(gate.kept_rows.sum()) < 8
    dropped = ~gate.kept_rows
    torch.testing.assert_close(out[dropped], x[dropped], rtol=0, atol=0)
    assert not torch.equal(out[~dropped], x[~dropped])


@pytest.mark.parametrize("name", ["efficientnet_b0", "swin_t", "maxvit_t"])
def test_adopt_torchvision_drop_paths(name):
    model = torchvision.models.get_model(name, weights=None).eval()  # default drop-path rates
    # One rate per *call* of a StochasticDepth module (Swin and MaxViT call one module twice).
    traced = fxsd.tracing.tracer.trace(model)  # keeps drop-path modules as calls
    own = [traced.get_submodule(str(n.target)).p for n in traced.graph.nodes
           if n.op == "call_module"
           and isinstance(traced.get_submodule(str(n.target)), torchvision.ops.StochasticDepth)]
    gm = fxsd.stochastic_depth(model)
    adopted = [g.drop_rate for g in fxsd.gates(gm) if g.note.startswith("adopted")]
    assert adopted == pytest.approx(own)
    others = [g.drop_rate for g in fxsd.gates(gm) if not g.note.startswith("adopted")]
    assert all(r == 0.0 for r in others), "sites without a drop path had rate 0 in the model"
    assert not [m for m in called_modules(gm) if isinstance(m, torchvision.ops.StochasticDepth)]
    x = torch.randn(1, 3, 224, 224) if name == "maxvit_t" else torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(gm.eval()(x), model(x), rtol=0, atol=0)


class Scale(nn.Module):  # timm MetaFormer's per-channel scale, traced through
    def __init__(self, c: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.full((c,), 0.5))

    def forward(self, x):
        return x * self.scale.view(1, -1)


class MetaFormerLike(nn.Module):
    def __init__(self, gate_by_activation: bool = False) -> None:
        super().__init__()
        self.mixer = nn.Linear(16, 16)
        self.drop_path = DropPath(0.3)
        self.layer_scale = Scale(16)
        self.gate_by_activation = gate_by_activation

    def forward(self, x):
        y = self.drop_path(self.mixer(x))
        if self.gate_by_activation:  # scaled by an activation: a row mask would not commute
            return x + y * torch.sigmoid(self.mixer(x))
        return x + self.layer_scale(y)


def test_adopt_through_layer_scale_module():
    model = MetaFormerLike().eval()
    gm = fxsd.stochastic_depth(model)
    (gate,) = fxsd.gates(gm)
    assert gate.note == "adopted DropPath(p=0.3)" and gate.drop_rate == pytest.approx(0.3)
    x = torch.randn(4, 16)
    torch.testing.assert_close(gm.eval()(x), model(x), rtol=0, atol=0)


def test_unadoptable_drop_path_is_kept_without_a_second_drop():
    model = MetaFormerLike(gate_by_activation=True).eval()
    gm = fxsd.stochastic_depth(model)
    (gate,) = fxsd.gates(gm)
    assert gate.note.startswith("kept existing drop path") and gate.drop_rate == 0.0
    x = torch.randn(4, 16)
    torch.testing.assert_close(gm.eval()(x), model(x), rtol=0, atol=0)


# -- explicit rates beat adopted ones ----------------------------------------------------------


def test_explicit_rate_replaces_adopted_rates_everywhere():
    model = torchvision.models.convnext_tiny(stochastic_depth_prob=0.1)
    gated = fxsd.stochastic_depth(model, 1.0, distribution="uniform")
    gates = fxsd.gates(gated)
    assert [g.drop_rate for g in gates] == [1.0] * 18
    # the drop paths still became gates (nothing drops twice), keeping their kind of dropping
    assert all(g.drop_path is fxsd.runtime.gate.DropPathAction.ADOPTED for g in gates)
    assert all(g.mode == "sample" and g.scale == "train" for g in gates)
    assert gates[-1].note == "adopted StochasticDepth(p=0.1), rate replaced"
    assert not [m for m in called_modules(gated)
                if isinstance(m, torchvision.ops.StochasticDepth)]
    assert fxsd.get_drop_rate(gated) == 1.0


def test_explicit_mode_and_scale_apply_to_adopted_sites():
    model = torchvision.models.convnext_tiny(stochastic_depth_prob=0.1)
    gated = fxsd.stochastic_depth(model, 0.2, mode="block", scale="eval")
    gates = fxsd.gates(gated)
    assert all(g.mode == "block" and g.scale == "eval" for g in gates)
    assert [g.drop_rate for g in gates] == pytest.approx([0.2 * d / 18 for d in range(1, 19)])


class WithDropPath(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.f, self.drop_path = nn.Linear(16, 16), DropPath(0.3)

    def forward(self, x):
        return x + self.drop_path(self.f(x))


def test_explicit_distribution_alone_is_explicit_too():
    model = nn.Sequential(LnMlpBlock(), WithDropPath())  # a drop path on one block only
    own = fxsd.stochastic_depth(model)
    assert [g.drop_rate for g in fxsd.gates(own)] == [0.0, 0.3]  # no drop path: rate 0
    gated = fxsd.stochastic_depth(model, distribution="uniform")
    assert [g.drop_rate for g in fxsd.gates(gated)] == [0.1, 0.1]  # the default rate, everywhere


def test_no_rate_and_no_drop_paths_uses_the_default_schedule():
    gated = fxsd.stochastic_depth(LnMlp(4))
    assert [g.drop_rate for g in fxsd.gates(gated)] == pytest.approx([0.025, 0.05, 0.075, 0.1])


def test_adopted_rates_scale_with_set_drop_rate():
    model = torchvision.models.convnext_tiny(stochastic_depth_prob=0.4)
    gated = fxsd.stochastic_depth(model)
    own = [g.drop_rate for g in fxsd.gates(gated)]
    assert fxsd.get_drop_rate(gated) == pytest.approx(max(own))
    fxsd.set_drop_rate(gated, 0.2)  # halve the model's own schedule
    assert [g.drop_rate for g in fxsd.gates(gated)] == pytest.approx([r / 2 for r in own])


@pytest.mark.parametrize("rates", [lambda n: torch.linspace(0, 0.2, n),
                                   lambda n: __import__("numpy").linspace(0, 0.2, n),
                                   lambda n: tuple(0.05 * i for i in range(n))])
def test_distribution_takes_any_one_dimensional_sequence(rates):
    gated = fxsd.stochastic_depth(LnMlp(4), distribution=rates(4))
    assert [g.drop_rate for g in fxsd.gates(gated)] == pytest.approx(
        [float(r) for r in rates(4)])


def test_bad_distributions_are_fxsd_errors():
    with pytest.raises(fxsd.InvalidTypeError, match=r"distribution\(depth, L\)"):
        fxsd.stochastic_depth(LnMlp(2), distribution=lambda depth: 0.1)
    with pytest.raises(fxsd.InvalidArgumentError, match="1-D"):
        fxsd.stochastic_depth(LnMlp(2), distribution=torch.zeros(2, 1))
    with pytest.raises(fxsd.InvalidTypeError, match="linspace"):
        fxsd.stochastic_depth(LnMlp(2), distribution=object())
