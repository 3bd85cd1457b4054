"""One class per original class (issue 25): every gated block rewritten from one class is an
instance of one gated class, named as the original, its generated code held per instance. A
lookup by class name (accelerate's and Trainer's FSDP auto-wrap) then finds every layer."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torchvision
from torchvision.models.resnet import Bottleneck

import fxsd
from fxsd.graph_module import FxsdGraphModule

tf = pytest.importorskip("transformers")
from transformers.trainer_pt_utils import get_module_class_from_name  # noqa: E402

VOCAB = 128


def _ids() -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))


def _llama():
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                            num_hidden_layers=3, num_attention_heads=4)
    model = tf.LlamaForCausalLM(config).eval()
    gated = fxsd.stochastic_depth(model, 0.2, example_kwargs={"input_ids": _ids()})
    return model, gated.eval()


def _resnet():
    torch.manual_seed(0)
    model = torchvision.models.resnet50(num_classes=10).eval()
    return model, fxsd.stochastic_depth(model, 0.2).eval()


def _bottlenecks(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if isinstance(m, Bottleneck)]


def test_llama_layers_share_one_class_found_by_name():
    model, gated = _llama()
    layers = list(gated.model.layers)
    assert len(layers) == 3 and all(isinstance(b, FxsdGraphModule) for b in layers)
    assert len({type(b) for b in layers}) == 1
    cls = type(layers[0])
    assert cls.__name__ == "LlamaDecoderLayer"
    assert cls.__qualname__ == tf.models.llama.modeling_llama.LlamaDecoderLayer.__qualname__
    assert issubclass(cls, tf.models.llama.modeling_llama.LlamaDecoderLayer)
    found = get_module_class_from_name(gated, "LlamaDecoderLayer")
    assert found is cls and all(isinstance(b, found) for b in layers)
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(gated(ids).logits, model(ids).logits)


def test_resnet_bottlenecks_share_one_class_with_own_code():
    model, gated = _resnet()
    blocks = _bottlenecks(gated)
    assert len(blocks) == 16 and all(isinstance(b, FxsdGraphModule) for b in blocks)
    assert len({type(b) for b in blocks}) == 1
    assert type(blocks[0]).__name__ == "Bottleneck"
    projection, plain = gated.layer1[0], gated.layer1[1]
    assert type(projection) is type(plain)
    assert "downsample" in projection.code and "downsample" not in plain.code
    assert projection.code != plain.code
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(gated(x), model(x))
        for block, original in zip(blocks, _bottlenecks(model), strict=True):
            y = torch.randn(1, original.conv1.in_channels, 8, 8)
            assert torch.equal(block(y), original(y))


def test_one_class_for_two_models_of_one_class():
    _, a = _resnet()
    _, b = _resnet()
    assert type(a.layer1[0]) is type(b.layer2[1])


def test_deepcopy_and_save_keep_the_class_and_outputs():
    model, gated = _resnet()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    cls = type(gated.layer1[0])
    buffer = io.BytesIO()
    torch.save(gated, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for other in (copy.deepcopy(gated), loaded):
        assert {type(b) for b in _bottlenecks(other)} == {cls}
        assert other.layer1[0].code == gated.layer1[0].code
        with torch.no_grad():
            assert torch.equal(other(x), model(x))


def test_llama_deepcopy_and_save_keep_the_class():
    model, gated = _llama()
    cls = type(gated.model.layers[0])
    buffer = io.BytesIO()
    torch.save(gated, buffer)
    buffer.seek(0)
    ids = _ids()
    for other in (copy.deepcopy(gated), torch.load(buffer, weights_only=False)):
        assert {type(b) for b in other.model.layers} == {cls}
        assert get_module_class_from_name(other, "LlamaDecoderLayer") is cls
        with torch.no_grad():
            assert torch.equal(other(ids).logits, model(ids).logits)


def test_strip_gives_back_the_original_classes():
    model, gated = _resnet()
    plain = fxsd.strip(gated)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(plain(x), model(x))


class _Root(torch.nn.Module):  # the root's own forward performs the joins
    def __init__(self, depth: int) -> None:
        super().__init__()
        self.f = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(depth))

    def forward(self, x):
        for f in self.f:
            x = x + f(x)
        return x


def test_rewritten_roots_of_one_class_share_it_and_keep_their_own_code():
    torch.manual_seed(0)
    two, three = _Root(2).eval(), _Root(3).eval()
    a, b = fxsd.stochastic_depth(two, 0.3).eval(), fxsd.stochastic_depth(three, 0.3).eval()
    assert type(a) is type(b) and type(a).__name__ == "_Root" and isinstance(a, _Root)
    assert "f_gate_2" in b.code and "f_gate_2" not in a.code
    x = torch.randn(4, 8)
    buffer = io.BytesIO()
    torch.save(b, buffer)
    buffer.seek(0)
    with torch.no_grad():
        assert torch.equal(a(x), two(x)) and torch.equal(b(x), three(x))
        for other in (copy.deepcopy(b), torch.load(buffer, weights_only=False)):
            assert type(other) is type(a) and other.code == b.code
            assert torch.equal(other(x), three(x))
