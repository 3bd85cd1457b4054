"""The user's model stays the user's model: class, methods, module tree, hooks, in-place gating,
Composer's in-place usage, pickling and guards on the arguments a block was traced with."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torchvision
from annotated_models import AnnotatedBlock, AnnotatedNet
from conftest import CallCounter, branch_only_modules, gated_blocks
from torch import nn
from torchvision.models.resnet import Bottleneck
from torchvision.models.vision_transformer import EncoderBlock

import fxsd
from fxsd.runtime.variants import MAX_VARIANTS


def _round_trip(model: nn.Module) -> nn.Module:
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def _same_tree(a: nn.Module, b: nn.Module) -> bool:
    gate = fxsd.runtime.gate.BranchGate
    return [n for n, _ in a.named_modules()] == [n for n, _ in b.named_modules()
                                                  if not isinstance(_, gate)]


# -- class, attributes, methods ---------------------------------------------------------------


def test_resnet50_keeps_its_class_tree_and_parameters():
    model = torchvision.models.resnet50()
    result = fxsd.stochastic_depth(model, 0.2)
    assert type(result) is torchvision.models.ResNet and result is not model
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in result.named_parameters()]
    assert all(p is q for p, q in zip(model.parameters(), result.parameters()))
    assert list(result.state_dict()) == list(model.state_dict())
    assert _same_tree(model, result)
    # Only the blocks were rewritten; every module is a new object holding the same tensors,
    # so a mode or hook set on one model never reaches the other.
    assert result.conv1 is not model.conv1 and result.conv1.weight is model.conv1.weight
    assert type(result.fc) is nn.Linear and result.fc.bias is model.fc.bias
    for name, block in gated_blocks(result).items():
        original = model.get_submodule(name)
        assert isinstance(block, Bottleneck) and isinstance(block, torch.fx.GraphModule)
        assert type(block).__name__ == "Bottleneck" and block.stride == original.stride
        assert block.conv1 is not original.conv1 and block.conv1.weight is original.conv1.weight
    assert sorted(gated_blocks(result)) == sorted(
        n for n, m in model.named_modules() if isinstance(m, Bottleneck))
    # The model itself is untouched.
    assert not fxsd.gates(model) and all(type(m) is Bottleneck for m in model.modules()
                                         if isinstance(m, Bottleneck))
    assert "residual_gate" in repr(result.layer1[0]) and "Bottleneck(" in repr(result.layer1[0])


def test_vit_keeps_its_class_and_blocks():
    model = torchvision.models.vit_b_16(image_size=32)
    result = fxsd.stochastic_depth(model, 0.2)
    assert type(result) is torchvision.models.VisionTransformer
    assert result.image_size == 32 and result.class_token is model.class_token
    layers = [m for m in result.modules() if isinstance(m, EncoderBlock)]
    assert len(layers) == 12 and all(isinstance(m, torch.fx.GraphModule) for m in layers)
    # its own method, _process_input, still works on the result
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(result._process_input(x), model._process_input(x))


def test_timm_methods_keep_working():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", img_size=32, pretrained=False).eval()
    result = fxsd.stochastic_depth(model, 0.0).eval()
    assert type(result) is type(model)
    assert isinstance(result.blocks[0], type(model.blocks[0]))
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(result.forward_features(x), model.forward_features(x),
                               rtol=0, atol=0)
    torch.testing.assert_close(result.forward_head(result.forward_features(x)), model(x),
                               rtol=0, atol=0)
    result.reset_classifier(5)  # a timm method, on the result (its head is not shared anymore)
    assert result(x).shape == (2, 5) and model(x).shape == (2, 1000)


def test_gated_block_code_reads_like_the_block():
    result = fxsd.stochastic_depth(torchvision.models.resnet50(), 0.2)
    code = result.layer1[0].code
    assert "downsample = self.downsample(x)" in code
    assert "residual_gate = self.residual_gate(downsample, x)" in code
    assert "conv1" not in code  # in the branch, behind the gate
    assert "conv1 = self.conv1(x)" in result.layer1[0].residual_gate.branch.code
    assert fxsd.get_record(result).rewritten[0] == "layer1.0"
    assert fxsd.get_record(result).original_classes[0] == "Bottleneck"


# -- hooks ------------------------------------------------------------------------------------


def test_block_hooks_fire():
    model = torchvision.models.resnet18(num_classes=10)
    calls: list[str] = []
    model.layer1[0].register_forward_hook(lambda m, a, o: calls.append("before"))
    result = fxsd.stochastic_depth(model, 0.0)
    block = result.layer1[0]
    assert block is not model.layer1[0]
    block.register_forward_hook(lambda m, a, o: calls.append("block"))
    block.conv1.register_forward_pre_hook(lambda m, a: calls.append("conv1"))
    result.train()(torch.randn(2, 3, 32, 32))
    assert calls.count("before") == 1  # a hook the user had on the block came along
    assert calls.count("block") == 1 and calls.count("conv1") == 1
    calls.clear()
    model(torch.randn(2, 3, 32, 32))  # the result's own hooks are not on the original's modules
    assert calls == ["before"]


def test_dropped_block_hooks_show_the_skip():
    model = torchvision.models.resnet18(num_classes=10)
    result = fxsd.stochastic_depth(model, 1.0, distribution="uniform").train()
    counter = CallCounter(branch_only_modules(result))
    seen = []
    result.layer2[1].register_forward_hook(lambda m, a, o: seen.append(torch.equal(
        o, torch.relu(a[0]))))
    result(torch.randn(2, 3, 32, 32)).sum().backward()
    counter.remove()
    assert counter.ran() == [] and seen == [True]  # the block ran, its branch did not


# -- in place, Composer ------------------------------------------------------------------------


def test_inplace_gates_the_model_itself():
    model = torchvision.models.resnet18(num_classes=10)
    params = list(model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out = fxsd.stochastic_depth(model, 0.5, inplace=True, seed=0)
    assert out is model and len(fxsd.gates(model)) == 8
    assert all(p is q for p, q in zip(params, model.parameters()))
    model.train()(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()  # the optimizer built before still holds the model's parameters


class SharedRoot(nn.Module):  # the root's own forward performs the joins
    def __init__(self) -> None:
        super().__init__()
        self.f = nn.Sequential(nn.Linear(8, 8), nn.Tanh())

    def forward(self, x):
        for _ in range(3):
            x = x + self.f(x)
        return x

    def extra(self) -> str:
        return "still here"


def test_root_owning_joins_is_rewritten_and_keeps_its_class():
    model = SharedRoot().eval()
    result = fxsd.stochastic_depth(model, 0.3)
    assert isinstance(result, SharedRoot) and isinstance(result, torch.fx.GraphModule)
    assert type(result) is not SharedRoot and result.extra() == "still here"
    assert fxsd.get_record(result).rewritten == ("",)
    assert [g.info.depth for g in fxsd.gates(result)] == [1, 2, 3]
    assert result.f is not model.f and result.f[0].weight is model.f[0].weight
    with pytest.raises(fxsd.InvalidArgumentError, match="cannot happen in place"):
        fxsd.stochastic_depth(model, 0.3, inplace=True)
    assert not fxsd.gates(model)


class Layer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm, self.fc = nn.LayerNorm(8), nn.Linear(8, 8)

    def forward(self, x):
        return x + self.fc(self.norm(x))


class Albert(nn.Module):  # one layer, applied at four depths
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 8)
        self.encoder = nn.ModuleDict({"layer": Layer()})
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        x = self.embed(x)
        for _ in range(4):
            x = self.encoder["layer"](x)
        return self.head(x)


def test_module_called_at_several_depths_keeps_one_gate_per_call():
    model = Albert().eval()
    result = fxsd.stochastic_depth(model, 0.4, scale="eval")
    gates = fxsd.gates(result)
    assert [g.info.depth for g in gates] == [1, 2, 3, 4]
    assert [g.drop_rate for g in gates] == pytest.approx([0.1, 0.2, 0.3, 0.4])
    # the shared layer cannot hold four gates: its caller, the root, is rewritten
    assert fxsd.get_record(result).rewritten == ("",)
    x = torch.randn(3, 8)
    expected = model.head(_albert_eval(model, x, [0.1, 0.2, 0.3, 0.4]))
    torch.testing.assert_close(result.eval()(x), expected)


def _albert_eval(model: Albert, x, rates):
    layer = model.encoder["layer"]
    x = model.embed(x)
    for r in rates:
        x = x + (1 - r) * layer.fc(layer.norm(x))
    return x


def test_composer_seed_snippet_trains_with_blocks_skipped():
    # The seed document's functional example, fxsd in place of composer.functional.
    import torch.nn.functional as F

    torch.manual_seed(0)
    model = torchvision.models.resnet50(num_classes=10)
    opt = torch.optim.Adam(model.parameters())
    fxsd.apply_stochastic_depth(
        model,
        target_layer_name="Bottleneck",
        stochastic_method="block",
        drop_rate=0.2,
        drop_distribution="linear",
    )
    assert len(fxsd.gates(model)) == 16
    counter = CallCounter(branch_only_modules(model))
    loss_fn = F.cross_entropy
    model.train()
    skipped = 0
    for _ in range(4):
        X, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 2])
        y_hat = model(X)
        loss = loss_fn(y_hat, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        skipped += sum(bool(g.dropped) for g in fxsd.gates(model))
    counter.remove()
    assert skipped > 0, "at 0.2 linear over 16 blocks and 4 steps, some block must be skipped"
    bottleneck_convs = [n for n in counter.calls if n.endswith("conv2")]
    assert sum(counter.calls[n] for n in bottleneck_convs) == 4 * 16 - skipped


def test_composer_older_signature_and_optimizers():
    model = torchvision.models.resnet50()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out = fxsd.apply_stochastic_depth(model, "block", "ResNetBottleneck", 0.2, "linear", True,
                                      [opt])
    assert out is model and len(fxsd.gates(model)) == 16
    assert fxsd.gates(model)[-1].drop_rate == pytest.approx(0.2)


# -- pickling, copying -------------------------------------------------------------------------

ZOO = {
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=10), (2, 3, 32, 32)),
    "mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(num_classes=10), (2, 3, 32, 32)),
    "efficientnet_b0": (lambda: torchvision.models.efficientnet_b0(num_classes=10),
                        (2, 3, 32, 32)),
    "regnet_y_400mf": (lambda: torchvision.models.regnet_y_400mf(num_classes=10),
                       (2, 3, 32, 32)),
    "convnext_tiny": (lambda: torchvision.models.convnext_tiny(num_classes=10), (1, 3, 32, 32)),
    "vit_b_16": (lambda: torchvision.models.vit_b_16(image_size=32, num_classes=10),
                 (2, 3, 32, 32)),
    "swin_t": (lambda: torchvision.models.swin_t(num_classes=10), (1, 3, 64, 64)),
    "cifar_resnet20": (lambda: fxsd.tools.models.cifar_resnet(20), (2, 3, 32, 32)),
    "annotated": (lambda: AnnotatedNet(), (4, 8)),
}


@pytest.mark.parametrize("name", ZOO)
def test_save_load_and_deepcopy_round_trip(name):
    build, shape = ZOO[name]
    torch.manual_seed(0)
    model = build()
    result = fxsd.stochastic_depth(model, 0.5, distribution="uniform", seed=1)
    x = torch.randn(shape)
    for make_copy in (_round_trip, copy.deepcopy):
        copied = make_copy(result)
        assert type(copied) is type(model)
        assert list(copied.state_dict()) == list(model.state_dict())
        assert all(torch.equal(a, b) for a, b in zip(copied.state_dict().values(),
                                                      result.state_dict().values()))
        assert [type(m).__name__ for m in copied.modules()] == [
            type(m).__name__ for m in result.modules()]
        with torch.no_grad():
            torch.testing.assert_close(copied.eval()(x), result.eval()(x), rtol=0, atol=0)
        # training continues with the same decisions, and the same outputs
        copied.train(), result.train()
        torch.manual_seed(2)
        a = copied(x)
        torch.manual_seed(2)
        b = result(x)
        assert [g.dropped for g in fxsd.gates(copied)] == [g.dropped for g in fxsd.gates(result)]
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        a.float().pow(2).mean().backward()
        assert any(p.grad is not None for p in copied.parameters())
        # the copy's branches run the copy's modules
        for gname, gate in fxsd.runtime.accessors.named_gates(copied).items():
            owner = copied.get_submodule(gname.rpartition(".")[0])
            for n in gate.branch.graph.nodes:
                if n.op == "call_module":
                    assert gate.branch.get_submodule(str(n.target)) is owner.get_submodule(
                        str(n.target))


@pytest.mark.parametrize("which", ["trace", "strip"])
def test_trace_and_strip_outputs_pickle(which):
    model = AnnotatedNet().eval()
    made = (fxsd.tracing.tracer.trace(model) if which == "trace"
            else fxsd.strip(fxsd.stochastic_depth(model, 0.2)))
    loaded = _round_trip(made)
    x = torch.randn(4, 8)
    torch.testing.assert_close(loaded.eval()(x), made.eval()(x), rtol=0, atol=0)
    assert list(loaded.state_dict()) == list(model.state_dict())


def test_swin_pickles_and_tracing_still_works_after():
    model = torchvision.models.swin_t(num_classes=10).eval()
    for made in (fxsd.stochastic_depth(model, 0.2), fxsd.tracing.tracer.trace(model)):
        loaded = _round_trip(made)
        x = torch.randn(1, 3, 64, 64)
        torch.testing.assert_close(loaded.eval()(x), made.eval()(x), rtol=0, atol=0)
    # Loading must not leave anything behind that breaks later traces.
    assert len(fxsd.find_residuals(torchvision.models.resnet18())) == 8
    assert len(torch.fx.symbolic_trace(torchvision.models.swin_t()).graph.nodes) > 100


# -- guards ------------------------------------------------------------------------------------


def test_block_traced_with_a_default_argument_guards_it():
    model = AnnotatedNet().eval()
    result = fxsd.stochastic_depth(model, 0.0).eval()
    block = result.blocks[0]
    assert isinstance(block, AnnotatedBlock)
    assert "check_argument(scale, 1.0, 'blocks.0', 'scale')" in block.code
    x = torch.randn(4, 8)
    torch.testing.assert_close(block(x, 1.0), model.blocks[0](x, 1.0), rtol=0, atol=0)
    # another value: the block traces itself again for it, gated by its own gate
    torch.testing.assert_close(block(x, 2.0), model.blocks[0](x, 2.0), rtol=0, atol=0)
    block.residual_gate.drop_rate = 1.0
    torch.testing.assert_close(block.train()(x, 2.0), x, rtol=0, atol=0)  # dropped: the skip
    assert block.residual_gate.dropped
    block.eval()
    for scale in range(3, 3 + MAX_VARIANTS - 1):  # one variant per value
        block(x, float(scale))
    with pytest.raises(fxsd.GuardError, match=r"'blocks.0' .* traced itself again for 8 other"):
        block(x, 99.0)


# -- strip at rate 1 ---------------------------------------------------------------------------


class ReluAfterJoin(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.act(x + self.fc(x))


def test_strip_at_rate_one_never_modifies_the_callers_input():
    result = fxsd.stochastic_depth(ReluAfterJoin(), 1.0, distribution="uniform", scale="eval")
    assert fxsd.gates(result)[0].clone_on_drop
    plain = fxsd.strip(result)
    x = torch.randn(4, 8)
    before = x.clone()
    out = plain(x)
    torch.testing.assert_close(x, before, rtol=0, atol=0)
    torch.testing.assert_close(out, torch.relu(before))
    y = torch.randn(4, 8)
    y_before = y.clone()
    result.train()(y)
    torch.testing.assert_close(y, y_before, rtol=0, atol=0)


def test_no_residual_model_comes_back_unchanged():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with pytest.warns(fxsd.errors.NoResidualSitesWarning):
        out = fxsd.stochastic_depth(model, 0.5)
    assert type(out) is nn.Sequential and out is not model and out[0] is not model[0]
    assert out[0].weight is model[0].weight
    with pytest.warns(fxsd.errors.NoResidualSitesWarning):
        assert fxsd.stochastic_depth(model, 0.5, inplace=True) is model


def test_modes_and_hooks_of_the_result_stay_its_own():
    # Every module of the result is a new object over the same tensors: switching the result's
    # mode, or hooking it, never reaches the model it was made from (and the other way round).
    model = torchvision.models.resnet18().eval()
    result = fxsd.stochastic_depth(model, 0.1)
    assert not {id(m) for m in result.modules()} & {id(m) for m in model.modules()}
    assert {n: p for n, p in result.named_parameters()}.keys() == dict(
        model.named_parameters()).keys()
    assert all(p is q for p, q in zip(model.parameters(), result.parameters()))
    assert all(b is c for b, c in zip(model.buffers(), result.buffers()))
    result.train()
    assert not any(m.training for m in model.modules())
    model.train()
    result.eval()
    assert all(m.training for m in model.modules())


class SelfOutput(nn.Module):  # BERT: the join happens here, its fork comes from outside
    def __init__(self) -> None:
        super().__init__()
        self.dense, self.norm = nn.Linear(8, 8), nn.LayerNorm(8)

    def forward(self, hidden, input_tensor):
        return self.norm(self.dense(hidden) + input_tensor)


class SelfAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(8, 24)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v


class BertAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.self, self.output = SelfAttention(), SelfOutput()

    def forward(self, x):
        return self.output(self.self(x), x)


class BertLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(BertAttention() for _ in range(2))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def test_join_inside_a_child_is_gated_in_the_module_that_has_its_fork():
    model = BertLike().eval()
    model.layers[0].output.register_forward_hook(lambda m, a, o: None)
    with pytest.warns(fxsd.errors.InlinedHooksWarning, match="'layers.0.output' \\(SelfOutput\\)"):
        result = fxsd.stochastic_depth(model, 0.0)
    assert fxsd.get_record(result).rewritten == ("layers.0", "layers.1")
    layer = result.layers[0]
    assert isinstance(layer, BertAttention)
    assert "output_norm = self.output.norm(residual_gate)" in layer.code  # copied in
    branch = layer.residual_gate.branch.code
    assert "self_1 = self.self(x)" in branch  # kept whole: its hooks still fire
    assert "output_dense = self.output.dense(self_1)" in branch
    x = torch.randn(2, 5, 8)
    torch.testing.assert_close(result(x), model(x), rtol=0, atol=0)
