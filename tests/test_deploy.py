"""Back to the plain model: ``fxsd.plain_state_dict`` and ``fxsd.strip(fold_scale=True)``."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import fxsd
from fxsd.tools.models import cifar_resnet

# Every model here is eval-scaled on purpose: its state_dict() warns, as it should.
pytestmark = pytest.mark.filterwarnings("ignore::fxsd.errors.EvalScaledWeightsWarning")


def _randomised(model: nn.Module) -> nn.Module:
    """Weights that torchvision initialises to (almost) zero made random, so every branch and
    layer scale matters."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().max() < 1e-3:
                p.copy_(torch.randn_like(p) * 0.1)
    return model


CASES = {
    "cifar_resnet20": (lambda: cifar_resnet(20), {}, (2, 3, 32, 32), "layer1.0.bn2"),
    "resnet50": (torchvision.models.resnet50, {}, (2, 3, 64, 64), "layer1.0.bn3"),
    "vit_b_16": (lambda: torchvision.models.vit_b_16(image_size=32), {}, (2, 3, 32, 32),
                 "encoder.layers.encoder_layer_0.self_attention.out_proj"),
    # the model's own drop paths become eval-scaled gates: the factor goes into layer_scale
    "convnext_tiny": (torchvision.models.convnext_tiny, {}, (1, 3, 32, 32),
                      "features.1.0.layer_scale"),
}


@pytest.mark.parametrize("name", CASES)
def test_plain_model_reproduces_the_gated_models_eval_outputs(name):
    build, kwargs, shape, first_target = CASES[name]
    torch.manual_seed(0)
    model = _randomised(build())
    gated = fxsd.stochastic_depth(model, 0.5, scale="eval", **kwargs).eval()
    assert fxsd.gates(gated)[0].info.fold.path == first_target
    before = {k: v.clone() for k, v in gated.state_dict().items()}
    state = fxsd.plain_state_dict(gated)
    assert list(state) == list(model.state_dict())
    assert all(torch.equal(before[k], v) for k, v in gated.state_dict().items())  # unchanged
    torch.manual_seed(1)
    plain = _randomised(build()).eval()
    plain.load_state_dict(state, strict=True)
    x = torch.randn(shape)
    with torch.no_grad():
        expected = gated(x)
        naive = _randomised(build()).eval()
        naive.load_state_dict(gated.state_dict())
        assert not torch.allclose(naive(x), expected, atol=1e-3)  # the trap this avoids
        torch.testing.assert_close(plain(x), expected, rtol=1e-4, atol=1e-4)
        folded = fxsd.strip(gated, fold_scale=True)
        torch.testing.assert_close(folded(x), expected, rtol=1e-4, atol=1e-4)
    code = "\n".join(m.code for m in folded.modules() if isinstance(m, torch.fx.GraphModule))
    assert "alpha" not in code


def test_train_scaled_gates_need_no_folding():
    model = cifar_resnet(20)
    gated = fxsd.stochastic_depth(model, 0.5, scale="train").eval()
    state = fxsd.plain_state_dict(gated)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


class TanhBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return x + torch.tanh(self.fc(x))


class Foldable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.drop = nn.Dropout(0.1)

    def forward(self, x):
        return x + self.drop(self.fc(x))


def test_unfoldable_sites_are_all_listed_and_nothing_is_folded():
    model = nn.Sequential(Foldable(), TanhBranch(), TanhBranch())
    gated = fxsd.stochastic_depth(model, 0.3, distribution="uniform", scale="eval").eval()
    with pytest.raises(fxsd.FoldError) as info:
        fxsd.plain_state_dict(gated)
    message = str(info.value)
    assert "1.residual_gate" in message and "2.residual_gate" in message
    assert "0.residual_gate" not in message and "tanh" in message
    with pytest.raises(fxsd.FoldError):
        fxsd.strip(gated, fold_scale=True)
    assert torch.equal(gated[0].fc.weight, model[0].fc.weight)  # nothing folded


def test_shared_weights_cannot_take_a_factor():
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            x = x + self.fc(x)
            return x + self.fc(x)

    gated = fxsd.stochastic_depth(Shared(), 0.4, distribution="uniform", scale="eval")
    with pytest.raises(fxsd.FoldError, match="used elsewhere"):
        fxsd.plain_state_dict(gated)


class Conv1D(nn.Module):
    """GPT-2's linear layer: its weight transposed, applied with ``torch.addmm``."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n, n) / n**0.5)
        self.bias = nn.Parameter(torch.randn(n))

    def forward(self, x):
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(x.shape)


class FunctionalBlock(nn.Module):
    def __init__(self, n: int = 8, tie: nn.Linear | None = None) -> None:
        super().__init__()
        self.fc = nn.Linear(n, n)
        self.proj = Conv1D(n)
        self.out = tie if tie is not None else nn.Linear(n, n)

    def forward(self, x):
        x = x + self.proj(torch.relu(self.fc(x)))  # addmm on proj's weight and bias
        return x + nn.functional.linear(torch.relu(x), self.out.weight, self.out.bias)


def test_functional_weights_fold_into_their_module():
    model = nn.Sequential(FunctionalBlock(), FunctionalBlock())
    gated = fxsd.stochastic_depth(model, 0.4, scale="eval").eval()
    plain = nn.Sequential(FunctionalBlock(), FunctionalBlock()).eval()
    plain.load_state_dict(fxsd.plain_state_dict(gated))
    x = torch.randn(3, 5, 8)
    torch.testing.assert_close(plain(x), gated(x))
    assert not torch.allclose(model.eval()(x), gated(x))  # the scales were real


def test_functional_weights_used_twice_are_not_folded():
    shared = nn.Linear(8, 8)
    model = nn.Sequential(FunctionalBlock(tie=shared), FunctionalBlock(tie=shared))
    gated = fxsd.stochastic_depth(model, 0.4, scale="eval").eval()
    with pytest.raises(fxsd.FoldError) as info:
        fxsd.plain_state_dict(gated)
    message = str(info.value)  # the tied 'out' layer takes no factor; both 'proj' layers would
    assert message.count("'0.out' is used elsewhere") == 2 and "fc_gate" not in message
