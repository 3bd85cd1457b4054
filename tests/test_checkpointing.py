"""Activation checkpointing (``apply_activation_checkpointing``) on gated blocks, applied before or
after the transform: kept blocks are recomputed in backward with the decision of their forward
replayed, dropped blocks compute nothing, and gradients equal those without checkpointing."""

from __future__ import annotations

import functools

import pytest
import torch
import torchvision
from conftest import grads
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    apply_activation_checkpointing,
    checkpoint_wrapper,
)
from torch.utils.checkpoint import checkpoint
from torchvision.models.resnet import BasicBlock

import fxsd

SEED = 3


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10)


def _unwrapped(name: str) -> str:
    return name.replace("_checkpoint_wrapped_module.", "")


def _step(model: torch.nn.Module, xs: list[torch.Tensor]):
    """One optimizer-free step on the micro-batches ``xs`` (summed losses, one backward)."""
    model.zero_grad(set_to_none=True)
    outs = [model(x) for x in xs]
    sum((o * torch.linspace(-1, 1, o.numel()).view_as(o)).sum() for o in outs).backward()
    return ([o.detach() for o in outs], {_unwrapped(k): v for k, v in grads(model).items()},
            [g.dropped for g in fxsd.gates(model)])


def _count_conv1(model: torch.nn.Module) -> tuple[dict[str, int], list]:
    counts: dict[str, int] = {}
    handles = []
    for name, m in model.named_modules():
        if isinstance(m, BasicBlock):
            key = _unwrapped(name)
            counts[key] = 0
            handles.append(m.conv1.register_forward_hook(
                lambda mod, a, o, k=key: counts.__setitem__(k, counts[k] + 1)))
    return counts, handles


@pytest.mark.parametrize("when", ["after", "before"])
def test_checkpointed_blocks_replay_decisions_and_match_gradients(when):
    x = [torch.randn(2, 3, 32, 32)]
    reference = fxsd.stochastic_depth(_model(), 0.5, distribution="uniform", seed=SEED).train()
    out_ref, grads_ref, decisions = _step(reference, x)
    assert True in decisions and False in decisions, decisions

    model = _model()
    if when == "before":
        apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, BasicBlock))
        gated = fxsd.stochastic_depth(model, 0.5, distribution="uniform", seed=SEED).train()
    else:
        gated = fxsd.stochastic_depth(model, 0.5, distribution="uniform", seed=SEED).train()
        # gated blocks are still BasicBlocks: the usual policy finds them
        apply_activation_checkpointing(gated, check_fn=lambda m: isinstance(m, BasicBlock))
    wrapped = [m for m in gated.modules() if type(m).__name__ == "CheckpointWrapper"]
    assert len(wrapped) == 8
    assert all(isinstance(w._checkpoint_wrapped_module, torch.fx.GraphModule) for w in wrapped)
    counts, handles = _count_conv1(gated)
    out, got, replayed = _step(gated, x)
    for h in handles:
        h.remove()
    assert replayed == decisions
    blocks = list(counts)
    for block, dropped in zip(blocks, decisions):
        # forward + recomputation for a kept block, nothing at all for a dropped one
        assert counts[block] == (0 if dropped else 2), (block, dropped, counts)
    torch.testing.assert_close(out[0], out_ref[0], rtol=0, atol=0)
    assert got.keys() == grads_ref.keys()
    for k in got:
        torch.testing.assert_close(got[k], grads_ref[k], rtol=0, atol=0, msg=k)


def test_several_forwards_before_one_backward_replay_their_own_decisions():
    xs = [torch.randn(2, 3, 32, 32) for _ in range(3)]
    reference = fxsd.stochastic_depth(_model(), 0.5, distribution="uniform", seed=SEED).train()
    outs_ref, grads_ref, _ = _step(reference, xs)
    gated = fxsd.stochastic_depth(_model(), 0.5, distribution="uniform", seed=SEED).train()
    apply_activation_checkpointing(gated, check_fn=lambda m: isinstance(m, BasicBlock))
    outs, got, _ = _step(gated, xs)
    for a, b in zip(outs, outs_ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for k in got:
        torch.testing.assert_close(got[k], grads_ref[k], rtol=0, atol=0, msg=k)


class Mlp(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm, self.fc = torch.nn.LayerNorm(16), torch.nn.Linear(16, 16)

    def forward(self, x):
        return x + self.fc(self.norm(x))


def test_sample_mode_replays_its_row_mask():
    def build():
        torch.manual_seed(0)
        return torch.nn.Sequential(*[Mlp() for _ in range(4)])

    x = [torch.randn(32, 16)]
    kw = dict(distribution="uniform", mode="sample", seed=SEED)
    reference = fxsd.stochastic_depth(build(), 0.5, **kw).train()
    out_ref, grads_ref, _ = _step(reference, x)
    gated = fxsd.stochastic_depth(build(), 0.5, **kw).train()
    assert {g.sample_impl for g in fxsd.gates(gated)} == {"subset"}
    apply_activation_checkpointing(gated, check_fn=lambda m: isinstance(m, Mlp))
    out, got, _ = _step(gated, x)
    torch.testing.assert_close(out[0], out_ref[0], rtol=0, atol=0)
    for k in got:
        torch.testing.assert_close(got[k], grads_ref[k], rtol=0, atol=0, msg=k)


def test_reentrant_checkpointing_is_refused_clearly():
    gated = fxsd.stochastic_depth(_model(), 0.0, seed=SEED).train()
    apply_activation_checkpointing(
        gated, check_fn=lambda m: isinstance(m, BasicBlock),
        checkpoint_wrapper_fn=functools.partial(checkpoint_wrapper,
                                                checkpoint_impl=CheckpointImpl.REENTRANT))
    out = gated(torch.randn(2, 3, 32, 32, requires_grad=True))
    with pytest.raises(fxsd.GraphError, match="use_reentrant=False"):
        out.sum().backward()


def test_functional_checkpoint_of_a_gated_block():
    block = fxsd.stochastic_depth(Mlp(), 0.5, distribution="uniform", seed=SEED).train()
    x = torch.randn(4, 16, requires_grad=True)
    for _ in range(6):
        y = checkpoint(block, x, use_reentrant=False)
        y.sum().backward()
        (gate,) = fxsd.gates(block)
        expected = x if gate.dropped else x + block.fc(block.norm(x))
        torch.testing.assert_close(y, expected)
