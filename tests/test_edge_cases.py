"""Hand-written models, one per structural case the analysis and the rewrite must get right."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F
from conftest import CallCounter, branch_only_modules
from torch import nn

import fxsd
from fxsd.analysis.sites import SkipKind
from fxsd.record import RejectReason

torch.manual_seed(0)
C = 8


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(C, 2 * C), nn.GELU(), nn.Linear(2 * C, C))


class PlusEquals(nn.Module):  # ``out += x`` traces to operator.add (branch first)
    def __init__(self):
        super().__init__()
        self.f = mlp()

    def forward(self, x):
        out = self.f(x)
        out += x
        return out


class TorchAdd(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = mlp()

    def forward(self, x):
        return torch.add(x, self.f(x))


class MethodAddInplace(nn.Module):  # ``out.add_(x)`` used for its effect, result unused
    def __init__(self):
        super().__init__()
        self.f = mlp()

    def forward(self, x):
        out = self.f(x)
        out.add_(x)
        return torch.tanh(out)


class SkipAddInplace(nn.Module):  # the skip is mutated: ``x.add_(f(x))``, then x is read again
    def __init__(self):
        super().__init__()
        self.f = mlp()

    def forward(self, x):
        x = x * 1.0
        y = self.f(x)
        x.add_(y)
        return torch.tanh(x)


class Reversed(nn.Module):  # skip first, branch second
    def __init__(self):
        super().__init__()
        self.f = mlp()

    def forward(self, x):
        return x + self.f(x)


class Projection(nn.Module):  # ResNet downsample: conv+bn skip, conv-bn-relu-conv-bn branch
    def __init__(self):
        super().__init__()
        self.down = nn.Sequential(nn.Conv2d(4, C, 1, stride=2, bias=False), nn.BatchNorm2d(C))
        self.body = nn.Sequential(
            nn.Conv2d(4, C, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(C), nn.ReLU(),
            nn.Conv2d(C, C, 3, padding=1, bias=False), nn.BatchNorm2d(C),
        )

    def forward(self, x):
        return F.relu(self.body(x) + self.down(x))


class PooledProjection(nn.Module):  # ResNet-D style skip: avg-pool then 1x1 conv
    def __init__(self):
        super().__init__()
        self.pool = nn.AvgPool2d(2)
        self.proj = nn.Conv2d(4, C, 1)
        self.body = nn.Sequential(nn.Conv2d(4, C, 3, stride=2, padding=1), nn.ReLU(),
                                  nn.Conv2d(C, C, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(C, C, 3, padding=1))

    def forward(self, x):
        return self.proj(self.pool(x)) + self.body(x)


class Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = mlp()

    def forward(self, x):
        return x + self.f(x)


class Nested(nn.Module):  # an outer residual whose branch holds two inner ones
    def __init__(self):
        super().__init__()
        self.a, self.b = Inner(), Inner()
        self.norm = nn.LayerNorm(C)

    def forward(self, x):
        return x + self.b(self.a(self.norm(x)))


class LayerScale(nn.Module):  # ConvNeXt/CaiT: the branch ends in a learnable per-channel scale
    def __init__(self):
        super().__init__()
        self.f = mlp()
        self.gamma = nn.Parameter(torch.full((C,), 0.5))

    def forward(self, x):
        return x + self.gamma * self.f(x)


class MaskedAttention(nn.Module):  # BERT-like: the mask enters the branch from outside the fork
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(C, 2, batch_first=True)
        self.norm = nn.LayerNorm(C)
        self.ffn = mlp()

    def forward(self, x, mask):
        h = self.norm(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.ffn(x)


class SharedWeights(nn.Module):  # the same block applied at three depths (ALBERT-style)
    def __init__(self):
        super().__init__()
        self.f = mlp()

    def forward(self, x):
        for _ in range(3):
            x = x + self.f(x)
        return x


class Towers(nn.Module):  # two parallel towers of residual blocks, merged by an add
    def __init__(self):
        super().__init__()
        self.left = nn.ModuleList([Inner(), Inner()])
        self.right = nn.ModuleList([Inner(), Inner()])

    def forward(self, x):
        a, b = torch.tanh(x), torch.sigmoid(x)
        for blk in self.left:
            a = blk(a)
        for blk in self.right:
            b = blk(b)
        return a + b


def _x(shape=(4, 5, C)):
    return torch.randn(*shape)


ACCEPTED = {
    "plus_equals": (PlusEquals, _x, 1, [SkipKind.IDENTITY]),
    "torch_add": (TorchAdd, _x, 1, [SkipKind.IDENTITY]),
    "method_add_inplace": (MethodAddInplace, _x, 1, [SkipKind.IDENTITY]),
    "skip_add_inplace": (SkipAddInplace, _x, 1, [SkipKind.IDENTITY]),
    "reversed_operands": (Reversed, _x, 1, [SkipKind.IDENTITY]),
    "projection": (Projection, lambda: torch.randn(4, 4, 8, 8), 1, [SkipKind.PROJECTION]),
    "pooled_projection": (PooledProjection, lambda: torch.randn(4, 4, 8, 8), 1,
                          [SkipKind.PROJECTION]),
    "nested": (Nested, _x, 3, [SkipKind.IDENTITY] * 3),
    "layer_scale": (LayerScale, _x, 1, [SkipKind.IDENTITY]),
    "shared_weights": (SharedWeights, _x, 3, [SkipKind.IDENTITY] * 3),
    "towers": (Towers, _x, 4, [SkipKind.IDENTITY] * 4),
}


@pytest.mark.parametrize("case", ACCEPTED)
def test_sites_found(case):
    cls, make_x, n_sites, kinds = ACCEPTED[case]
    sites = fxsd.find_residuals(cls())
    assert len(sites) == n_sites, [s.add.name for s in sites]
    assert [s.skip_kind for s in sites] == kinds


@pytest.mark.parametrize("case", ACCEPTED)
def test_eval_at_zero_equals_original(case):
    cls, make_x, _, _ = ACCEPTED[case]
    model = cls().eval()
    x = make_x()
    gm = fxsd.stochastic_depth(model, 0.0).eval()
    torch.testing.assert_close(gm(x.clone()), model(x.clone()), rtol=0, atol=0)


@pytest.mark.parametrize("case", ACCEPTED)
def test_dropped_branches_do_not_run(case):
    cls, make_x, n_sites, _ = ACCEPTED[case]
    model = cls().train()
    gm = fxsd.stochastic_depth(model, 1.0, distribution="uniform").train()
    branch_modules = branch_only_modules(gm)
    assert branch_modules, "every case has modules inside its branches"
    counter = CallCounter(branch_modules)
    x = make_x().requires_grad_()
    gm(x).sum().backward()
    counter.remove()
    assert counter.ran() == [], f"dropped branches ran: {counter.ran()}"
    assert not any(g.dropped is False for g in fxsd.gates(gm)), "a gate kept its branch"
    for name, module in branch_modules.items():
        for p in module.parameters():
            assert p.grad is None, f"{name} got a gradient although its branch was dropped"
    assert x.grad is not None


@pytest.mark.parametrize("case", ACCEPTED)
def test_training_with_nothing_dropped_matches_original(case):
    cls, make_x, _, _ = ACCEPTED[case]
    model = cls().train()
    gm = fxsd.stochastic_depth(model, 0.0).train()
    x = make_x()
    if case == "skip_add_inplace":
        # x.add_ overwrites a tensor the Linear saved, so the original cannot backpropagate; the
        # gated model computes the add the source wrote (fxsd/runtime/join.py), in place, and
        # neither can
        torch.testing.assert_close(gm(x.clone()), model(x.clone()), rtol=0, atol=0)
        for m in (model, gm):
            with pytest.raises(RuntimeError, match="inplace operation"):
                m(x.clone()).sum().backward()
        return
    ref = model(x.clone())
    ref.sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    out = gm(x.clone())
    out.sum().backward()
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[name], rtol=0, atol=0, msg=name)


def test_all_dropped_outputs_follow_the_skip():
    # Reversed: y = x + f(x) -> x; Projection: relu(body + down) -> relu(down(x));
    # Nested: the outer branch is dropped, so y = x.
    x = _x()
    gm = fxsd.stochastic_depth(Reversed(), 1.0, distribution="uniform").train()
    torch.testing.assert_close(gm(x), x)
    model = Projection().train()
    gm = fxsd.stochastic_depth(model, 1.0, distribution="uniform").train()
    xi = torch.randn(4, 4, 8, 8)
    torch.testing.assert_close(gm(xi), F.relu(model.down(xi)))
    gm = fxsd.stochastic_depth(Nested(), 1.0, distribution="uniform").train()
    torch.testing.assert_close(gm(x), x)


def test_skip_mutated_in_place_keeps_semantics():
    model = SkipAddInplace().eval()
    gm = fxsd.stochastic_depth(model, 0.0).eval()
    x = _x()
    expected = torch.tanh(x + model.f(x))
    torch.testing.assert_close(gm(x), expected)


def test_nested_depths_and_gating():
    gm = fxsd.stochastic_depth(Nested(), 0.5, seed=0)
    by_path = {g.info.module_path: g for g in fxsd.gates(gm)}
    assert by_path["a"].info.depth == 1 and by_path["b"].info.depth == 2
    assert by_path[""].info.depth == 3
    outer = by_path[""]
    # The outer branch calls the two inner blocks, themselves gated in place.
    inner_calls = [n.target for n in outer.branch.graph.nodes if n.op == "call_module"]
    assert inner_calls == ["norm", "a", "b"]
    assert outer.branch.get_submodule("a") is gm.a and isinstance(gm.a.residual_gate,
                                                                   fxsd.runtime.gate.BranchGate)
    assert list(fxsd.runtime.accessors.named_gates(gm)) == ["a.residual_gate", "b.residual_gate",
                                          "residual_gate"]


def test_layer_scale_is_a_branch_parameter():
    site, = fxsd.find_residuals(LayerScale())
    assert [n.target for n in site.param_inputs] == ["gamma"]
    assert site.num_params == sum(p.numel() for p in LayerScale().parameters())


def test_side_input_mask():
    model = MaskedAttention().eval()
    sites = fxsd.find_residuals(model)
    assert len(sites) == 2
    assert [n.name for n in sites[0].side_inputs] == ["mask"]
    x = _x()
    mask = torch.triu(torch.full((5, 5), float("-inf")), diagonal=1)
    gm = fxsd.stochastic_depth(model, 0.0).eval()
    torch.testing.assert_close(gm(x, mask), model(x, mask), rtol=0, atol=0)
    # The mask matters: a different mask changes the (kept) branch's output.
    assert not torch.allclose(gm(x, mask), gm(x, torch.zeros(5, 5)))


def test_shared_weights_sites_have_distinct_depths():
    gm = fxsd.stochastic_depth(SharedWeights(), 0.3, seed=0)
    assert [g.info.depth for g in fxsd.gates(gm)] == [1, 2, 3]
    assert [round(g.drop_rate, 6) for g in fxsd.gates(gm)] == [0.1, 0.2, 0.3]
    # One depth dropped, the others kept: the shared weights still get a gradient.
    g1, g2, g3 = fxsd.gates(gm)
    g1.drop_rate, g2.drop_rate, g3.drop_rate = 1.0, 0.0, 0.0
    x = _x()
    gm.train()(x).sum().backward()
    model_f = gm.get_submodule("f")
    assert model_f[0].weight.grad is not None


def test_parallel_towers_share_depths():
    analysis = fxsd.analyze_residuals(Towers())
    assert sorted(s.depth for s in analysis.sites) == [1, 1, 2, 2]
    assert analysis.num_levels == 2
    merge = [r for r in analysis.rejected if r.reason is RejectReason.NO_CHEAP_SKIP]
    assert len(merge) == 1, analysis.rejected


# -- rejected adds ----------------------------------------------------------------------------


class PosEmbed(nn.Module):
    def __init__(self):
        super().__init__()
        self.pos = nn.Parameter(torch.zeros(5, C))

    def forward(self, x):
        return x + self.pos


class Bias(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("bias", torch.ones(C))

    def forward(self, x):
        return torch.add(self.bias, x)


class Scalar(nn.Module):
    def forward(self, x):
        return x + 1.0


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = mlp()

    def forward(self, x, y):
        return self.f(x) + y


class Broadcast(nn.Module):
    def forward(self, x):
        return x + x.mean(dim=1, keepdim=True).tanh()


class Double(nn.Module):
    def forward(self, x):
        h = torch.tanh(x)
        return h + h


class DenseReuse(nn.Module):  # a branch intermediate is used after the add, and not by a
    def __init__(self):        # second join or a concatenation (those share the gate:
        super().__init__()     # tests/test_shared_work.py)
        self.f1, self.f2 = nn.Linear(C, C), nn.Linear(C, C)

    def forward(self, x):
        h = self.f1(x)
        y = x + self.f2(h)
        return y * h.sigmoid()


class Alpha(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = mlp()

    def forward(self, x):  # a number as alpha is a join (tests/test_join.py); a value is not
        return torch.add(x, self.f(x), alpha=x.size(0))


class LinearTerms(nn.Module):  # a lambda layer's two terms: each linear in v, neither a skip
    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(C, C), nn.Linear(C, C), nn.Linear(C, C)
        self.pos1, self.pos2 = nn.Linear(C, C), nn.Linear(C, C)

    def forward(self, x):
        q, k, v = self.q(x), self.k(x), self.v(x)
        content = v * (q * k).sum(-1, keepdim=True)
        return content + q * self.pos2(self.pos1(v))


REJECTED = {
    "parameter_operand": (PosEmbed, RejectReason.CONSTANT_OPERAND, "pos"),
    "buffer_operand": (Bias, RejectReason.CONSTANT_OPERAND, "bias"),
    "scalar": (Scalar, RejectReason.SCALAR_OPERAND, "1.0"),
    "no_common_fork": (TwoInputs, RejectReason.NO_COMMON_FORK, "share no ancestor"),
    "broadcast": (Broadcast, RejectReason.BROADCAST, "[4, 5, 8] and [4, 1, 8]"),
    "x_plus_x": (Double, RejectReason.SAME_OPERAND, "tanh"),
    "escaping_value": (DenseReuse, RejectReason.ESCAPING_VALUE, "'f1', a tensor computed from"),
    "alpha": (Alpha, RejectReason.UNSUPPORTED_ARGUMENTS, "alpha"),
    "linear_terms": (LinearTerms, RejectReason.PARALLEL_PATHS, "both linear in the fork"),
}


@pytest.mark.parametrize("case", REJECTED)
def test_rejected_with_reason(case):
    cls, reason, detail = REJECTED[case]
    example = (_x(), _x()) if cls is TwoInputs else (_x(),)
    analysis = fxsd.analyze_residuals(cls(), example)
    assert analysis.sites == []
    assert len(analysis.rejected) == 1
    rejected = analysis.rejected[0]
    assert rejected.reason is reason
    assert detail in rejected.detail, rejected.detail
    text = fxsd.table(analysis, rejected=True)
    assert reason.value in text and rejected.name in text


def test_rejected_model_warns_and_is_unchanged():
    model = DenseReuse().eval()
    with pytest.warns(fxsd.errors.NoResidualSitesWarning, match="no residual site"):
        gm = fxsd.stochastic_depth(model, 0.5)
    x = _x()
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)
    assert fxsd.gates(gm) == []


def test_add_kinds_reported():
    kinds = {
        "plus_equals": "operator.add",
        "torch_add": "torch.add",
        "method_add_inplace": "Tensor.add_",
    }
    for case, kind in kinds.items():
        site, = fxsd.find_residuals(ACCEPTED[case][0]())
        assert site.add_kind == kind, case


def test_operator_iadd_in_foreign_graph():
    # A graph built by hand (as another tracer might) with operator.iadd.
    model = Reversed()
    gm = torch.fx.symbolic_trace(model)
    for n in gm.graph.nodes:
        if n.target is operator.add:
            n.target = operator.iadd
    gm.recompile()
    site, = fxsd.find_residuals(gm)
    assert site.add_kind == "operator.iadd"
    out = fxsd.stochastic_depth(gm, 0.0).eval()
    x = _x()
    mine, theirs = x.clone(), x.clone()
    torch.testing.assert_close(out(mine), model.eval()(x), rtol=0, atol=0)
    gm.eval()(theirs)
    assert torch.equal(mine, theirs) and not torch.equal(mine, x)  # iadd adds into x, as gm does


def test_projection_found_when_branch_weights_are_read_via_get_attr():
    # torchvision's video ResNets use Conv3d subclasses that fx traces through: their weights
    # reach the branch through get_attr nodes, not module calls, and must count as branch cost.
    from torchvision.models.video import r3d_18
    from torchvision.models.video.resnet import BasicBlock

    model = r3d_18()
    sites = fxsd.find_residuals(model)
    assert len(sites) == sum(isinstance(m, BasicBlock) for m in model.modules())
    assert sum(s.skip_kind is SkipKind.PROJECTION for s in sites) == 3


# -- metadata reads are not data dependencies -------------------------------------------------


class ExpandedPosEmbed(nn.Module):  # ViT-style: a parameter expanded to the batch size
    def __init__(self):
        super().__init__()
        self.pos = nn.Parameter(torch.zeros(1, 5, C))

    def forward(self, x):
        return x + self.pos.expand(x.shape[0], -1, -1)


class MaskFromDtype(nn.Module):  # Hugging Face style: the mask reads the embeddings' dtype
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(C, C) for _ in range(2))

    def forward(self, x, keep):
        bias = (1.0 - keep.to(x.dtype)) * -1e4  # depends on x only through its dtype
        for blk in self.blocks:
            x = x + torch.softmax(blk(x) + bias, dim=-1)
        return x


class ShapeInBranch(nn.Module):  # timm Attention style: B, N, C = x.shape, N unused
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(C)
        self.fc = nn.Linear(C, C)

    def forward(self, x):
        h = self.norm(x)
        b, n, c = h.shape
        return x + self.fc(h).reshape(b, -1, c)


def test_expanded_parameter_is_a_constant_operand():
    analysis = fxsd.analyze_residuals(ExpandedPosEmbed())
    assert analysis.sites == []
    assert analysis.rejected[0].reason is RejectReason.CONSTANT_OPERAND


def test_mask_built_from_dtype_is_a_side_input_of_every_block():
    model = MaskFromDtype().eval()
    sites = fxsd.find_residuals(model)
    assert len(sites) == 2
    assert all([n.name for n in s.side_inputs] == ["mul"] for s in sites), \
        [[n.name for n in s.side_inputs] for s in sites]
    x, keep = _x(), torch.ones(4, 5, C)
    gm = fxsd.stochastic_depth(model, 0.0).eval()
    torch.testing.assert_close(gm(x, keep), model(x, keep), rtol=0, atol=0)


def test_shape_reads_inside_a_branch_stay_in_it():
    model = ShapeInBranch()
    (site,) = fxsd.find_residuals(model)
    assert any(n.op == "call_function" and n.target is getattr for n in site.branch)
    gm = fxsd.stochastic_depth(model, 0.5, distribution="uniform", mode="sample", seed=0)
    (gate,) = fxsd.gates(gm)
    assert gate.sample_impl == "subset"  # the batch size is read from the kept rows
    out = gm.train()(_x((16, 5, C)))
    assert out.shape == (16, 5, C)


class OptionalMask(nn.Module):  # timm's Hiera: `if mask is not None` in the root's forward
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(mlp() for _ in range(3))

    def forward(self, x, mask=None):
        for block in self.blocks:
            h = block(x)
            if mask is not None:
                h = h * mask
            x = x + h
        return x


def test_an_argument_the_examples_leave_out_is_traced_as_none():
    model, x = OptionalMask().eval(), _x()
    analysis = fxsd.analyze_residuals(model, (x,))  # runs on the trace: the mask-free one
    assert len(analysis.sites) == 3 and analysis.total_flops is not None
    gated = fxsd.stochastic_depth(model, 0.5, example_inputs=(x,)).eval()
    assert "def forward(self, x, mask = None)" in gated.code  # the model's own signature
    assert torch.equal(gated(x), model(x))
    mask = torch.rand_like(x)  # a call the examples did not show: the root traces itself again
    assert torch.equal(gated(x, mask=mask), model(x, mask=mask))
    assert len(fxsd.gates(gated)) == 3
