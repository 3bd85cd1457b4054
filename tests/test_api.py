"""The pass's contract: state, copies, serialisation, randomness, errors, tables and the CLI."""

from __future__ import annotations

import copy
import io
import math
import random

import pytest
import torch
import torchvision
from conftest import DropPath
from torch import nn

import fxsd
from fxsd.tools.cli import main
from fxsd.tools.tables import summary


class Block(nn.Module):
    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.f = nn.Sequential(nn.Linear(c, 2 * c), nn.ReLU(), nn.Linear(2 * c, c))
        self.norm = nn.LayerNorm(c)

    def forward(self, x):
        return x + self.f(self.norm(x))


class Net(nn.Module):
    """Residual MLP with the awkward state fx usually changes."""

    def __init__(self, depth: int = 4) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(depth))
        self.unused_head = nn.Linear(8, 3)  # never called in forward
        self.register_buffer("scale", torch.tensor(2.0), persistent=False)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        x = x * self.scale
        for blk in self.blocks:
            x = blk(x)
        return x * torch.tensor(0.5)  # a tensor constant created while tracing


def _sd_equal(a: dict, b: dict) -> bool:
    return list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def net():
    torch.manual_seed(0)
    return Net()


def test_state_dict_keys_identical_and_strict_load_both_ways(net):
    gm = fxsd.stochastic_depth(net, 0.2, seed=0)
    assert list(gm.state_dict()) == list(net.state_dict())
    gm.load_state_dict(net.state_dict(), strict=True)
    net.load_state_dict(gm.state_dict(), strict=True)
    torchvision_model = torchvision.models.resnet18()
    gm = fxsd.stochastic_depth(torchvision_model, 0.2)
    assert list(gm.state_dict()) == list(torchvision_model.state_dict())


def test_parameters_shared_not_duplicated(net):
    gm = fxsd.stochastic_depth(net, 0.2, seed=0)
    assert {id(p) for p in gm.parameters()} == {id(p) for p in net.parameters()}
    assert len(list(gm.parameters())) == len(list(net.parameters()))
    assert sum(1 for _ in gm.named_parameters()) == sum(1 for _ in net.named_parameters())


def test_input_model_not_mutated(net):
    before_sd = {k: v.clone() for k, v in net.state_dict().items()}
    before_dict = set(net.__dict__)
    before_modules = [(n, type(m)) for n, m in net.named_modules()]
    before_training = net.training
    fxsd.stochastic_depth(net, 0.5, seed=0, example_inputs=(torch.randn(2, 8),))
    fxsd.analyze_residuals(net, (torch.randn(2, 8),))
    assert _sd_equal(before_sd, net.state_dict())
    assert set(net.__dict__) == before_dict, "tracing left attributes on the model"
    assert [(n, type(m)) for n, m in net.named_modules()] == before_modules
    assert net.training == before_training


def test_graph_module_input_not_mutated(net):
    traced = torch.fx.symbolic_trace(net)
    code, nodes = traced.code, len(traced.graph.nodes)
    gm = fxsd.stochastic_depth(traced, 0.0, seed=0)
    assert traced.code == code and len(traced.graph.nodes) == nodes
    assert gm is not traced and len(fxsd.gates(gm)) == 4
    x = torch.randn(3, 8)
    torch.testing.assert_close(gm.eval()(x), traced.eval()(x), rtol=0, atol=0)


def test_deepcopy(net):
    gm = fxsd.stochastic_depth(net, 0.3, seed=0)
    clone = copy.deepcopy(gm)
    assert list(clone.state_dict()) == list(net.state_dict())
    assert _sd_equal(clone.state_dict(), gm.state_dict())
    assert all(id(p) not in {id(q) for q in gm.parameters()} for p in clone.parameters())
    # The clone's branches run the clone's modules, not the original's.
    name, g = next(iter(fxsd.runtime.accessors.named_gates(clone).items()))
    owner = clone.get_submodule(name.rpartition(".")[0])
    first = next(n for n in g.branch.graph.nodes if n.op == "call_module")
    assert g.branch.get_submodule(str(first.target)) is owner.get_submodule(str(first.target))
    assert type(clone) is Net and type(clone.blocks[0]).__name__ == "Block"
    assert isinstance(clone.blocks[0], Block)
    x = torch.randn(3, 8)
    torch.testing.assert_close(clone.eval()(x), gm.eval()(x), rtol=0, atol=0)
    with torch.no_grad():
        for p in clone.parameters():
            p.zero_()
    assert not torch.equal(clone(x), gm(x))
    # One sampler shared by all the clone's gates, independent of the original's.
    assert len({id(g.sampler) for g in fxsd.gates(clone)}) == 1
    assert fxsd.gates(clone)[0].sampler is not fxsd.gates(gm)[0].sampler


def test_save_load_whole_module(net):
    gm = fxsd.stochastic_depth(net, 0.3, seed=0)
    buffer = io.BytesIO()
    torch.save(gm, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert type(loaded) is Net and isinstance(loaded.blocks[0], Block)
    assert isinstance(loaded.blocks[0], torch.fx.GraphModule)
    assert list(loaded.state_dict()) == list(net.state_dict())
    assert _sd_equal(loaded.state_dict(), gm.state_dict())
    x = torch.randn(3, 8)
    torch.testing.assert_close(loaded.eval()(x), gm.eval()(x), rtol=0, atol=0)
    # Same drop sequence continues after loading.
    gm.train(), loaded.train()
    for _ in range(5):
        gm(x), loaded(x)
        assert [g.dropped for g in fxsd.gates(gm)] == [g.dropped for g in fxsd.gates(loaded)]
    name, g = next(iter(fxsd.runtime.accessors.named_gates(loaded).items()))
    owner = loaded.get_submodule(name.rpartition(".")[0])
    first = next(n for n in g.branch.graph.nodes if n.op == "call_module")
    assert g.branch.get_submodule(str(first.target)) is owner.get_submodule(str(first.target))


def test_to_float64(net):
    gm = fxsd.stochastic_depth(net, 0.3, seed=0, scale="eval").to(torch.float64).eval()
    x = torch.randn(3, 8, dtype=torch.float64)
    out = gm(x)
    assert out.dtype == torch.float64
    assert all(p.dtype == torch.float64 for p in gm.parameters())
    assert gm.scale.dtype == torch.float64
    ref = net.eval()(x)  # parameters are shared, so the model is float64 too
    torch.testing.assert_close(out, _eval_reference(net, x, [0.3 * d / 4 for d in range(1, 5)]))
    assert ref.dtype == torch.float64


def _eval_reference(net: Net, x, rates):
    handles = [
        blk.f.register_forward_hook(lambda m, a, out, k=1 - r: out * k)
        for blk, r in zip(net.blocks, rates)
    ]
    try:
        return net.eval()(x)
    finally:
        for h in handles:
            h.remove()


def test_eval_scaling_linear_and_uniform(net):
    x = torch.randn(3, 8)
    for dist, rates in (("linear", [0.4 * d / 4 for d in range(1, 5)]), ("uniform", [0.4] * 4)):
        gm = fxsd.stochastic_depth(net, 0.4, distribution=dist, scale="eval").eval()
        assert [g.drop_rate for g in fxsd.gates(gm)] == pytest.approx(rates)
        torch.testing.assert_close(gm(x), _eval_reference(net, x, rates))


def test_custom_distributions(net):
    gm = fxsd.stochastic_depth(net, distribution=[0.1, 0.0, 0.3, 1.0])
    assert [g.drop_rate for g in fxsd.gates(gm)] == [0.1, 0.0, 0.3, 1.0]
    gm = fxsd.stochastic_depth(net, distribution=lambda d, L: 0.5 * (d - 1) / (L - 1))
    assert [g.drop_rate for g in fxsd.gates(gm)] == pytest.approx([0, 1 / 6, 1 / 3, 0.5])


def test_train_eval_switch_at_run_time(net):
    gm = fxsd.stochastic_depth(net, 1.0, distribution="uniform", seed=0, scale="eval")
    x = torch.randn(3, 8)
    gm.train()
    torch.testing.assert_close(gm(x), x * 2 * 0.5)  # every branch dropped
    gm.eval()
    torch.testing.assert_close(gm(x), x * 2 * 0.5)  # p = 1: branches scaled by 0
    gm2 = fxsd.stochastic_depth(net, 0.0).train()
    assert not torch.allclose(gm2(x), x)


def test_seeded_reproducibility_and_no_global_rng(net):
    x = torch.randn(3, 8)

    def decisions(seed, steps=30):
        gm = fxsd.stochastic_depth(net, 0.5, distribution="uniform", seed=seed).train()
        seq = []
        for _ in range(steps):
            gm(x)
            seq.append(tuple(g.dropped for g in fxsd.gates(gm)))
        return seq

    torch_state, py_state = torch.get_rng_state(), random.getstate()
    a, b, c = decisions(1), decisions(1), decisions(2)
    assert torch.equal(torch.get_rng_state(), torch_state), "global torch RNG consumed"
    assert random.getstate() == py_state, "global Python RNG consumed"
    assert a == b and a != c
    dropped = sum(sum(step) for step in a)
    n = 30 * 4
    assert abs(dropped - n / 2) < 4 * math.sqrt(n / 4), dropped  # binomial(120, 0.5)
    torch.manual_seed(7)
    d1 = fxsd.stochastic_depth(net, 0.5, seed=None)
    torch.manual_seed(7)
    d2 = fxsd.stochastic_depth(net, 0.5, seed=None)
    assert fxsd.gates(d1)[0].sampler.seed == fxsd.gates(d2)[0].sampler.seed == 7


def test_gate_names_and_code_read_naturally():
    model = fxsd.stochastic_depth(torchvision.models.resnet18(), 0.1)
    names = list(fxsd.runtime.accessors.named_gates(model))
    assert names[:3] == ["layer1.0.residual_gate", "layer1.1.residual_gate",
                         "layer2.0.residual_gate"]
    block = model.layer2[0]
    assert "downsample = self.downsample(x)" in block.code
    assert "residual_gate = self.residual_gate(downsample, x)" in block.code
    assert "conv1 = self.conv1(x)" in block.residual_gate.branch.code
    assert "conv1" not in block.code
    assert repr(model.layer4[1].residual_gate) == (
        "BranchGate('layer4.1.residual_gate', depth=8/8, drop_rate=0.1, skip=identity)"
    )
    vit = fxsd.stochastic_depth(torchvision.models.vit_b_16(image_size=32), 0.1)
    layer = vit.encoder.layers.encoder_layer_0
    gate_class = fxsd.runtime.gate.BranchGate
    assert [n for n, m in layer.named_children() if isinstance(m, gate_class)] == [
        "self_attention_gate", "mlp_gate"]
    assert "self_attention_gate = self.self_attention_gate(input_1" in layer.code


def test_no_host_device_sync_needed_for_draws(net):
    # Decisions come from a host generator: no tensor is created to draw them.
    gm = fxsd.stochastic_depth(net, 0.5, seed=3).train()
    calls: list[str] = []
    x = torch.randn(2, 8)
    with _RecordRand(calls):
        gm(x)
    assert not [c for c in calls if "rand" in c or "bernoulli" in c], calls


class _RecordRand(torch.overrides.TorchFunctionMode):
    def __init__(self, calls):
        super().__init__()
        self.calls = calls

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


# -- drop paths stay live -------------------------------------------------------------------


class FunctionalDropPath(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = nn.Linear(8, 8)

    def forward(self, x):
        return x + torchvision.ops.stochastic_depth(self.f(x), 0.5, "row", self.training)


class TimmStyle(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = nn.Linear(8, 8)
        self.drop_path = DropPath(0.5)

    def forward(self, x):
        return x + self.drop_path(self.f(x))


@pytest.mark.parametrize("model_cls", [FunctionalDropPath, TimmStyle])
def test_existing_drop_paths_follow_train_and_eval(model_cls):
    model = model_cls().train()  # traced in training mode
    gm = fxsd.stochastic_depth(model)  # adopts the model's own drop path
    assert len(fxsd.gates(gm)) == 1
    x = torch.randn(64, 8)
    gm.eval()
    torch.testing.assert_close(gm(x), model.eval()(x), rtol=0, atol=0)
    gm.train()
    torch.manual_seed(0)
    out = gm(x)
    dropped_rows = (out == x).all(dim=1).sum().item()
    assert 10 < dropped_rows < 54, "the model's own drop path should drop ~half the rows"


def test_convnext_stays_deterministic_in_eval():
    model = torchvision.models.convnext_tiny(stochastic_depth_prob=0.5).train()
    gm = fxsd.stochastic_depth(model, 0.0).eval()
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(gm(x), gm(x), rtol=0, atol=0)
    torch.testing.assert_close(gm(x), model.eval()(x), rtol=0, atol=0)


# -- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(drop_rate=1.5), fxsd.InvalidArgumentError, r"drop_rate must lie in \[0, 1\]"),
        (dict(drop_rate=-0.1), fxsd.InvalidArgumentError, "drop_rate must lie"),
        (dict(drop_rate=float("nan")), fxsd.InvalidArgumentError, "nan"),
        (dict(drop_rate="0.1"), fxsd.InvalidTypeError, "must be a number"),
        (dict(distribution="cosine"), fxsd.InvalidArgumentError, "unknown distribution 'cosine'"),
        (dict(distribution=[0.1, 0.2]), fxsd.InvalidArgumentError, "lists 2 rates but the model "
                                                                   "has 4 residual sites"),
        (dict(distribution=[0.1, 0.2, 0.3, 2.0]), fxsd.InvalidArgumentError, r"distribution\[3\]"),
        (dict(distribution=lambda d, L: -1.0), fxsd.InvalidArgumentError, "distribution"),
        (dict(distribution=3), fxsd.InvalidTypeError, "distribution must be"),
        (dict(mode="sample-ish"), fxsd.InvalidArgumentError, "unknown mode 'sample-ish'"),
        (dict(seed="x"), fxsd.InvalidTypeError, "seed must be an int"),
    ],
)
def test_bad_arguments(net, kwargs, error, match):
    with pytest.raises(error, match=match) as info:
        fxsd.stochastic_depth(net, **kwargs)
    assert isinstance(info.value, fxsd.FxsdError)


def test_already_gated_model_rejected(net):
    gm = fxsd.stochastic_depth(net, 0.2)
    with pytest.raises(fxsd.InvalidArgumentError, match="already gated by fxsd"):
        fxsd.stochastic_depth(gm, 0.3)


def test_bad_argument_errors_are_builtin_subclasses(net):
    with pytest.raises(ValueError):
        fxsd.stochastic_depth(net, 2.0)
    with pytest.raises(TypeError):
        fxsd.stochastic_depth("resnet50")


def test_non_module_rejected():
    with pytest.raises(fxsd.InvalidTypeError, match="expects an nn.Module, got function"):
        fxsd.stochastic_depth(lambda x: x)
    with pytest.raises(fxsd.InvalidTypeError, match="got list"):
        fxsd.find_residuals([nn.Linear(2, 2)])


class DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # control flow on a traced value
            return x
        return -x


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = nn.Linear(8, 8)
        self.tricky = DataDependent()

    def forward(self, x):
        return x + self.tricky(self.f(x))


def test_untraceable_module_named_with_fix():
    with pytest.raises(fxsd.TraceError) as info:
        fxsd.stochastic_depth(Outer())
    err = info.value
    assert err.module_path == "tricky" and err.module_type == "DataDependent"
    assert "module 'tricky' (DataDependent)" in str(err)
    assert "leaf_modules=" in str(err) and "concrete_args=" in str(err)
    # The suggested fix works: keep the module as a leaf, inside the gated branch.
    gm = fxsd.stochastic_depth(Outer(), 0.5, leaf_modules=[DataDependent])
    assert len(fxsd.gates(gm)) == 1
    gm = fxsd.stochastic_depth(Outer(), 0.5, leaf_modules=["tricky"])
    assert len(fxsd.gates(gm)) == 1


class Flag(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = nn.Linear(8, 8)

    def forward(self, x, flip):
        y = self.f(x)
        if flip:
            y = -y
        return x + y


def test_concrete_args_accepted():
    with pytest.raises(fxsd.TraceError, match="root module"):
        fxsd.find_residuals(Flag())
    sites = fxsd.find_residuals(Flag(), concrete_args={"flip": True})
    assert len(sites) == 1


def test_bad_leaf_modules():
    with pytest.raises(fxsd.InvalidTypeError, match="leaf_modules"):
        fxsd.find_residuals(Flag(), leaf_modules=[3])


# -- tables and CLI --------------------------------------------------------------------------


def test_table_rows_and_columns():
    model = torchvision.models.resnet50()
    text = fxsd.table(model, drop_rate=0.2, width=0)
    lines = text.splitlines()
    header = lines[0]
    for col in ("depth", "gate", "skip", "branch", "nodes", "params", "side inputs",
                "drop rate"):
        assert col in header
    rows = lines[2:]
    assert len(rows) == 16
    assert rows[0].split()[:3] == ["1", "layer1.0.residual_gate", "projection"]
    assert rows[-1].split()[-1] == "0.2000"
    gm = fxsd.stochastic_depth(model, 0.2)
    assert fxsd.table(gm, width=0) == text  # a transformed model shows its gates the same way


def test_table_rejected_and_flops():
    model = torchvision.models.vit_b_16()
    analysis = fxsd.analyze_residuals(model, (torch.zeros(1, 3, 224, 224),))
    text = fxsd.table(analysis, rejected=True)
    assert "FLOPs" in text.splitlines()[0]
    assert "rejected adds:" in text and "constant operand" in text
    assert "encoder_pos_embedding" in text
    assert all(s.flops and s.flops > 0 for s in analysis.sites)
    line = summary(analysis, drop_rate=0.2)
    assert line.startswith("24 residual sites, 1 add rejected")


def test_cli_inspect_default_is_resnet50(capsys):
    assert main(["inspect", "--no-flops", "--wide"]) == 0
    out = capsys.readouterr().out
    table_lines = [ln for ln in out.splitlines() if ln[:1].isdigit()]
    assert len(table_lines) == 16
    # without FLOPs there is no saving to print (a parameter count is not one)
    assert "resnet50: 16 residual sites, 0 adds rejected\n" in out
    assert "expected" not in out


def test_cli_inspect_callable_and_errors(capsys):
    assert main(["inspect", "tests.test_api:Net", "--rejected", "--input-shape", "2,8",
                 "--drop-rate", "0.4", "--distribution", "uniform"]) == 0
    out = capsys.readouterr().out
    assert "4 residual sites" in out and "0.4000" in out and "FLOPs" in out
    with pytest.raises(SystemExit) as refused:  # refused while parsing, before any work
        main(["inspect", "no_such_model"])
    assert refused.value.code == 2
    assert "unknown model 'no_such_model'" in capsys.readouterr().err


class SdpaAttention(nn.Module):  # timm / Hugging Face style: the flag steers a function argument
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(8, 24)
        self.p = 0.5

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return torch.nn.functional.scaled_dot_product_attention(
            q, k, v, dropout_p=self.p if self.training else 0.0)


class SdpaBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = SdpaAttention()

    def forward(self, x):
        return x + self.attn(x)


@pytest.mark.parametrize("traced_in", ["train", "eval"])
def test_modules_reading_training_stay_switchable(traced_in):
    model = SdpaBlock()
    getattr(model, traced_in)()
    gm = fxsd.stochastic_depth(model, 0.0)
    # the flag only chose a constant: no leaf needed, and the attention runs as its own module
    # (its code reads its own flag; its hooks fire)
    assert fxsd.get_record(gm).live_leaves == ()
    assert "self.attn(x)" in gm.residual_gate.branch.code
    assert len(fxsd.gates(gm)) == 1
    x = torch.randn(2, 5, 8)
    torch.testing.assert_close(gm.eval()(x), model.eval()(x), rtol=0, atol=0)
    torch.manual_seed(0)
    a = gm.train()(x)
    torch.manual_seed(0)
    b = model.train()(x)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, gm.eval()(x)), "training mode must apply attention dropout"


def _reloaded(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


class OwnDropoutBlock(nn.Module):  # the block's own flag: ``training=self.training``
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return x + torch.nn.functional.dropout(self.fc(x), 0.5, self.training)


def test_blocks_reading_their_own_training_flag_are_rewritten_in_place():
    model = nn.Sequential(OwnDropoutBlock(), OwnDropoutBlock()).train()
    gated = fxsd.stochastic_depth(model, 0.0)
    assert set(fxsd.runtime.accessors.named_gates(gated)) == {"0.residual_gate", "1.residual_gate"}
    assert type(gated) is nn.Sequential  # the blocks own their joins; the root is untouched
    assert "training = self.training" in gated[0].code
    x = torch.randn(4, 8)
    for m in (gated, _reloaded(gated)):
        torch.testing.assert_close(m.eval()(x), model.eval()(x), rtol=0, atol=0)
        torch.manual_seed(0)
        a = m.train()(x)
        torch.manual_seed(0)
        torch.testing.assert_close(a, model.train()(x), rtol=0, atol=0)
        assert not torch.allclose(a, m.eval()(x)), "training mode must apply the dropout"


class BranchingAttention(SdpaAttention):  # the flag steers which ops run
    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        if self.training:
            q = torch.nn.functional.dropout(q, self.p)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)


@pytest.mark.parametrize("traced_in", ["train", "eval"])
def test_modules_branching_on_training_stay_leaves(traced_in):
    model = SdpaBlock()
    model.attn = BranchingAttention()
    getattr(model, traced_in)()
    gm = fxsd.stochastic_depth(model, 0.0)
    assert fxsd.get_record(gm).live_leaves == ("attn",)
    x = torch.randn(2, 5, 8)
    torch.testing.assert_close(gm.eval()(x), model.eval()(x), rtol=0, atol=0)
    torch.manual_seed(0)
    a = gm.train()(x)
    torch.manual_seed(0)
    torch.testing.assert_close(a, model.train()(x), rtol=0, atol=0)


def test_swin_attention_dropout_follows_mode():
    model = torchvision.models.swin_t(dropout=0.5, attention_dropout=0.5).train()
    gm = fxsd.stochastic_depth(model, 0.0).eval()
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(gm(x), model.eval()(x), rtol=0, atol=0)
    assert len(fxsd.gates(gm)) == 24


class RootReadsTraining(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = nn.Linear(8, 8)

    def forward(self, x):
        y = self.f(x)
        if self.training:
            y = y * 2
        return x + y


@pytest.mark.parametrize("traced_in", ["train", "eval"])
def test_root_reading_training_keeps_both_behaviours(traced_in):
    # the root's own code depends on self.training: its graph is guarded on the mode it was
    # traced in, and a call in the other mode traces it again (once) instead of baking a mode
    model = getattr(RootReadsTraining(), traced_in)()
    gated = fxsd.stochastic_depth(model, 0.0)
    assert "check_argument(training, " in gated.code
    x = torch.randn(4, 8)
    for mode in ("train", "eval", "train"):
        torch.testing.assert_close(getattr(gated, mode)()(x), getattr(model, mode)()(x),
                                   rtol=0, atol=0)
    assert fxsd.check(model, (x,)).ok


def test_every_error_is_an_fxsd_error():
    with pytest.raises(fxsd.InvalidArgumentError, match="no fxsd gates"):
        fxsd.strip(torchvision.models.resnet18())
    model = fxsd.stochastic_depth(Net(), 0.2)
    with pytest.raises(fxsd.InvalidArgumentError, match="fxsd.get_rng_state"):
        fxsd.set_rng_state(model, {})
    with pytest.raises(fxsd.InvalidTypeError):
        fxsd.get_record("model")
    with pytest.raises(fxsd.InvalidArgumentError, match="not a gated module"):
        fxsd.show(model, "nowhere")


def test_show_prints_each_branch_under_its_gate():
    model = fxsd.stochastic_depth(torchvision.models.vit_b_16(image_size=32), 0.1)
    text = fxsd.show(model, "encoder.layers.encoder_layer_0")
    lines = text.splitlines()
    assert lines[0] == "# encoder.layers.encoder_layer_0 (EncoderBlock), rewritten by fxsd"
    gate = next(i for i, ln in enumerate(lines)
                if ln.startswith("    # encoder.layers.encoder_layer_0.self_attention_gate"))
    assert "self_attention = self.self_attention(ln_1, ln_1, ln_1" in "\n".join(lines[gate:])
    assert all(ln.startswith("    ") for ln in lines[gate:] if ln)
    assert len(fxsd.show(model).split("\n\n# ")) == 12  # one section per gated block
