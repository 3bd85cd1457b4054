"""``fxsd.prune``: residual branches removed for inference, to a forward-FLOP budget.

Every saving is measured on the pruned model with ``torch.utils.flop_counter.FlopCounterMode``;
outputs are compared with the plain model whose removed branches output zeros (forward hooks),
or with the chain run by hand without the removed blocks.
"""

from __future__ import annotations

import pytest
import torch
from test_restore import _assert_unchanged, _snapshot
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import fxsd
from fxsd.errors import InvalidArgumentError, InvalidTypeError

WIDTH = 16


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(WIDTH, WIDTH)
        self.fc2 = nn.Linear(WIDTH, WIDTH)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(x)))


class Chain(nn.Module):
    def __init__(self, depth: int = 12) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*[Block() for _ in range(depth)])
        self.head = nn.Linear(WIDTH, 4)

    def forward(self, x):
        return self.head(self.blocks(x))

    def without(self, removed: set[int], x):
        for i, block in enumerate(self.blocks):
            if i not in removed:
                x = block(x)
        return self.head(x)


def _chain(seed: int = 0) -> Chain:
    torch.manual_seed(seed)
    return Chain().eval()


def _x(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1))


def _flops(model: nn.Module, *args, **kwargs) -> tuple[int, dict[str, int]]:
    with FlopCounterMode(display=False) as counter:
        model(*args, **kwargs)
    return counter.get_total_flops(), {k: sum(v.values())
                                       for k, v in counter.get_flop_counts().items()}


def _gate(i: int) -> str:
    return f"blocks.{i}.residual_gate"


def _block_share(chain: Chain, x) -> float:
    total, per_module = _flops(chain, x)
    return per_module["Chain.blocks.0"] / total


# -- the chain: strategies, the report, errors ---------------------------------------------------
def test_every_other_removes_every_second_block():
    chain, x = _chain(), _x(8, WIDTH)
    before = _snapshot(chain)
    share = _block_share(chain, x)
    pruned, report = fxsd.prune(chain, 6 * share, strategy="every_other", example_inputs=(x,),
                                return_report=True)
    _assert_unchanged(chain, before)  # inplace=False: the user's model is never modified
    assert report.removed == tuple(_gate(i) for i in range(1, 12, 2))
    total, _ = _flops(chain, x)
    assert _flops(pruned, x)[0] == total - round(6 * share * total) == report.flops_after
    torch.testing.assert_close(pruned(x), chain.without(set(range(1, 12, 2)), x), rtol=0,
                               atol=0)
    assert type(pruned) is Chain
    assert "blocks.1.fc1.weight" not in pruned.state_dict()
    assert not hasattr(pruned.blocks[1], "fc1")  # the modules left the tree
    assert "removed" in str(report) and "every_other" in str(report)


def test_a_target_above_the_maximum_raises_with_the_maximum():
    chain, x = _chain(), _x(8, WIDTH)
    reach = 12 * _block_share(chain, x)
    with pytest.raises(InvalidArgumentError, match=f"at most {reach:.4f}"):
        fxsd.prune(chain, min(1.0, reach + 0.01), example_inputs=(x,))
    # exactly the maximum is reachable: every branch goes, the head stays
    pruned = fxsd.prune(chain, reach, example_inputs=(x,))
    torch.testing.assert_close(pruned(x), chain.head(x), rtol=0, atol=0)


def test_greedy_removes_the_branches_that_barely_matter_first():
    chain, x = _chain(), _x(8, WIDTH)
    with torch.no_grad():
        for i in (3, 8):  # these blocks' branches are scaled to near zero
            chain.blocks[i].fc2.weight.mul_(1e-4)
            chain.blocks[i].fc2.bias.mul_(1e-4)
    data = [(xb, chain(xb).detach()) for xb in _x(4, 8, WIDTH)]

    def mse(output, batch):
        return torch.nn.functional.mse_loss(output, batch[1])

    share = _block_share(chain, x)
    pruned, report = fxsd.prune(chain, 2 * share, strategy="greedy", data=data, loss=mse,
                                return_report=True, progress=False)
    assert set(report.removed) == {_gate(3), _gate(8)}
    assert report.loss_before == 0.0 and 0.0 < report.loss_after < 1e-6
    torch.testing.assert_close(pruned(x), chain.without({3, 8}, x), rtol=0, atol=0)
    # the first batch is the example: the FLOPs are those of a batch of 8
    assert report.flops_before == _flops(chain, data[0][0])[0]


def test_rates_of_a_gated_model_and_explicit_sites():
    chain, x = _chain(), _x(8, WIDTH)
    rates = [0.0] * 12
    rates[2], rates[5], rates[7] = 0.5, 0.9, 0.7
    gated = fxsd.stochastic_depth(chain, distribution=rates, example_inputs=(x,))
    share = _block_share(chain, x)
    _, report = fxsd.prune(gated, 2.5 * share, example_inputs=(x,), return_report=True)
    assert report.removed == (_gate(5), _gate(7), _gate(2))  # the highest trained rate first
    assert all(g.drop_rate in (0.0, 0.5, 0.9, 0.7) for g in fxsd.gates(gated))  # untouched
    pruned = fxsd.prune(gated, sites=[_gate(0)], example_inputs=(x,))
    torch.testing.assert_close(pruned(x), chain.without({0}, x), rtol=0, atol=0)
    assert not fxsd.gates(pruned)


def test_a_callable_strategy_and_inplace():
    chain, x = _chain(), _x(8, WIDTH)
    expected = chain.without({11, 10}, x)

    def last_first(gated, flops):
        assert set(flops) == {_gate(i) for i in range(12)}
        return [_gate(i) for i in reversed(range(12))]

    share = _block_share(chain, x)
    pruned = fxsd.prune(chain, 1.5 * share, strategy=last_first, example_inputs=(x,),
                        inplace=True)
    assert pruned is chain
    torch.testing.assert_close(chain(x), expected, rtol=0, atol=0)
    assert {k for k in Chain().state_dict() if k not in chain.state_dict()} == {
        f"blocks.{i}.{m}.{p}" for i in (10, 11) for m in ("fc1", "fc2") for p in ("weight", "bias")}


def test_runs_under_torch_compile():
    chain, x = _chain(), _x(8, WIDTH)
    pruned = fxsd.prune(chain, 0.3, example_inputs=(x,))
    # (not fullgraph: dynamo breaks at the call of a stripped block's generated forward)
    compiled = torch.compile(pruned, backend="aot_eager")
    torch.testing.assert_close(compiled(x), pruned(x))


def test_bad_arguments_are_typed_errors():
    chain, x = _chain(), _x(8, WIDTH)
    with pytest.raises(InvalidArgumentError, match="exactly one"):
        fxsd.prune(chain, example_inputs=(x,))
    with pytest.raises(InvalidArgumentError, match="exactly one"):
        fxsd.prune(chain, 0.2, sites=[_gate(0)], example_inputs=(x,))
    with pytest.raises(InvalidArgumentError, match="example_inputs="):
        fxsd.prune(chain, 0.2)
    with pytest.raises(InvalidArgumentError, match="pass data="):
        fxsd.prune(chain, 0.2, strategy="greedy", example_inputs=(x,))
    with pytest.raises(InvalidArgumentError, match="did you mean 'greedy'"):
        fxsd.prune(chain, 0.2, strategy="gredy", example_inputs=(x,))
    with pytest.raises(InvalidArgumentError, match="blocks.1.residual_gate"):
        fxsd.prune(chain, sites=["blocks.1.residual_gat"], example_inputs=(x,))
    with pytest.raises(InvalidTypeError, match="prune expects an nn.Module"):
        fxsd.prune("resnet", 0.2)
    with pytest.raises(InvalidArgumentError, match="target_saving"):
        fxsd.prune(chain, 1.5, example_inputs=(x,))


# -- torchvision --------------------------------------------------------------------------------
def _zeroed(model: nn.Module, blocks: list[str], last: str):
    """Forward hooks making each removed branch's last module output zeros."""
    return [model.get_submodule(f"{b}.{last}").register_forward_hook(
        lambda m, a, out: torch.zeros_like(out)) for b in blocks]


@pytest.fixture(scope="module")
def resnet50():
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.resnet50().eval(), torch.randn(1, 3, 64, 64)


@pytest.mark.slow
@pytest.mark.parametrize("source", ["gated", "plain"])
def test_resnet50_pruned_by_a_quarter(resnet50, source):
    model, x = resnet50
    given = model if source == "plain" else fxsd.stochastic_depth(
        model, 0.2, example_inputs=(x,), verify=False)
    before = _snapshot(given)
    pruned, report = fxsd.prune(given, 0.25, example_inputs=(x,), return_report=True)
    _assert_unchanged(given, before)
    blocks = [name.rpartition(".")[0] for name in report.removed]
    total, per_module = _flops(model, x)
    shares = [sum(per_module[f"ResNet.{b}.conv{i}"] for i in (1, 2, 3)) / total for b in blocks]
    saved = 1 - _flops(pruned, x)[0] / total
    assert 0.25 <= saved < 0.25 + max(shares)
    assert saved == pytest.approx(sum(shares)) and saved == pytest.approx(report.saving)
    handles = _zeroed(model, blocks, "bn3")
    try:
        expected = model(x)
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(pruned(x), expected, rtol=0, atol=0)
    gone = {k for k in model.state_dict() if k not in pruned.state_dict()}
    assert gone == {k for k in model.state_dict() for b in blocks
                    if k.startswith((f"{b}.conv", f"{b}.bn"))}
    pruned.load_state_dict(pruned.state_dict(), strict=True)
    exported = torch.export.export(pruned, (x,))
    torch.testing.assert_close(exported.module()(x), expected)


@pytest.mark.slow
def test_vit_and_swin_prune_and_export():
    import torchvision

    torch.manual_seed(0)
    vit = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=4,
                                               num_heads=2, hidden_dim=32, mlp_dim=64).eval()
    swin = torchvision.models.swin_t().eval()
    for model, x in ((vit, torch.randn(1, 3, 32, 32)), (swin, torch.randn(1, 3, 64, 64))):
        pruned, report = fxsd.prune(model, 0.2, example_inputs=(x,), return_report=True)
        assert report.saving >= 0.2
        assert 1 - _flops(pruned, x)[0] / _flops(model, x)[0] == pytest.approx(report.saving)
        assert set(pruned.state_dict()) < set(model.state_dict())
        exported = torch.export.export(pruned, (x,))
        torch.testing.assert_close(exported.module()(x), pruned(x))


# -- Hugging Face --------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_tiny_llama_pruned_by_a_quarter_generates_with_fewer_flops():
    tf = pytest.importorskip("transformers")
    from test_transformers import llama

    torch.manual_seed(0)
    model, kwargs = llama()
    model.eval()
    pruned, report = fxsd.prune(model, 0.25, example_kwargs=kwargs, return_report=True)
    assert report.saving >= 0.25 and isinstance(pruned, tf.LlamaForCausalLM)
    prompt = kwargs["input_ids"][:1, :5]

    def per_token(m):
        flops, _ = _flops(lambda: m.generate(prompt, max_new_tokens=4, min_new_tokens=4,
                                             do_sample=False))
        return flops / 4

    out = pruned.generate(prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape == (1, 9) and torch.equal(out[:, :5], prompt)
    assert per_token(pruned) < 0.8 * per_token(model)
