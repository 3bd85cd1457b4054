"""Activation checkpointing on gated blocks, applied before or after the transform: kept blocks
are recomputed in backward with the decision of their forward replayed, dropped blocks compute
nothing, and gradients equal those without checkpointing. ``apply_activation_checkpointing`` on
torchvision's ResNet-18 and on a Hugging Face Llama, Hugging Face's own checkpointing
(``gradient_checkpointing_enable()``) on the Llama; reentrant checkpointing and a checkpointed
module whose code must be copied into its parent's graph are refused loudly."""

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
    block = fxsd.stochastic_depth(Mlp(), 0.5, distribution="uniform", seed=SEED,
                                 scale="eval").train()  # kept: x + branch, unscaled
    x = torch.randn(4, 16, requires_grad=True)
    for _ in range(6):
        y = checkpoint(block, x, use_reentrant=False)
        y.sum().backward()
        (gate,) = fxsd.gates(block)
        expected = x if gate.dropped else x + block.fc(block.norm(x))
        torch.testing.assert_close(y, expected)


def _unwrapped_keys(named: dict) -> dict:
    return {_unwrapped(k): v for k, v in named.items()}


# Hugging Face: a gated decoder layer is still a GradientCheckpointingLayer (transformers 5.25
# checkpoints its forward through a wrapper its __init_subclass__ installs), and a
# CheckpointWrapper applied before the transform stays around the layer it wraps.
IDS = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
LLAMA_SEED = 5


def _llama() -> torch.nn.Module:
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            max_position_embeddings=64)
    return tf.LlamaForCausalLM(config).train()


def _gate_llama(model: torch.nn.Module) -> torch.nn.Module:
    return fxsd.stochastic_depth(model, 0.5, distribution="uniform", seed=LLAMA_SEED,
                                 example_kwargs={"input_ids": IDS}, scale="train").train()


def _is_decoder_layer(module: torch.nn.Module) -> bool:
    return type(module).__name__ == "LlamaDecoderLayer"


def _hf_checkpointing(model: torch.nn.Module, reentrant: bool) -> None:
    """Hugging Face's checkpointing, by its current name (``gradient_checkpointing_enable``, its
    older name, is a deprecated alias of it in transformers 5.25)."""
    kwargs = {"use_reentrant": reentrant}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _checkpointed_llama(how: str, when: str, reentrant: bool = False) -> torch.nn.Module:
    model = _llama()
    if when == "after":
        model = _gate_llama(model)
    if how == "hf":
        _hf_checkpointing(model, reentrant)
    else:
        apply_activation_checkpointing(model, check_fn=_is_decoder_layer)
    return _gate_llama(model) if when == "before" else model


def _llama_step(model: torch.nn.Module) -> tuple[dict[str, int], dict[str, bool], dict]:
    """The second of two training steps: MLP calls and MLP gate decisions by decoder layer, and
    the gradients.

    Calls are counted by forward *pre*-hooks: a recomputation stops as soon as it has rebuilt
    what backward needs, inside the MLP (its last module), before a forward hook would fire. The
    first step is left out: checkpointing calls the layers with ``cache=None``, which their
    trace did not see, and a gated layer traces itself again on such a call (running its
    modules once more)."""
    model(input_ids=IDS, labels=IDS).loss.backward()
    layers = {_unwrapped(f"{n}.")[:-1]: m for n, m in model.named_modules()
              if _is_decoder_layer(m)}
    counts = dict.fromkeys(layers, 0)
    handles = [layer.mlp.register_forward_pre_hook(
        lambda mod, args, k=name: counts.__setitem__(k, counts[k] + 1))
        for name, layer in layers.items()]
    model.zero_grad(set_to_none=True)
    model(input_ids=IDS, labels=IDS).loss.backward()
    for h in handles:
        h.remove()
    gates = _unwrapped_keys(fxsd.runtime.accessors.named_gates(model))
    dropped = {name: gates[f"{name}.mlp_gate"].dropped for name in layers}
    return counts, dropped, _unwrapped_keys(grads(model))


@functools.cache
def _llama_reference() -> tuple[dict[str, int], dict[str, bool], dict]:
    return _llama_step(_gate_llama(_llama()))


@pytest.mark.parametrize("how", ["hf", "apply_activation_checkpointing"])
@pytest.mark.parametrize("when", ["before", "after"])
def test_checkpointed_gated_llama_recomputes_kept_layers(how, when):
    counts_ref, dropped, grads_ref = _llama_reference()
    assert True in dropped.values() and False in dropped.values(), dropped
    assert counts_ref == {k: 0 if d else 1 for k, d in dropped.items()}
    model = _checkpointed_llama(how, when)
    counts, replayed, got = _llama_step(model)
    assert replayed == dropped
    # forward + recomputation for a kept MLP, nothing at all for a dropped one
    assert counts == {k: 0 if d else 2 for k, d in dropped.items()}
    assert got.keys() == grads_ref.keys()
    for k in got:
        torch.testing.assert_close(got[k], grads_ref[k], rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("when", ["before", "after"])
def test_hf_reentrant_checkpointing_of_a_gated_llama_is_refused_clearly(when):
    model = _checkpointed_llama("hf", when, reentrant=True)
    loss = model(input_ids=IDS, labels=IDS).loss
    with pytest.raises(fxsd.GraphError, match="use_reentrant=False"):
        loss.backward()


class _Output(torch.nn.Module):  # BERT's SelfOutput: its join's fork comes from outside it
    def __init__(self) -> None:
        super().__init__()
        self.dense, self.norm = torch.nn.Linear(8, 8), torch.nn.LayerNorm(8)

    def forward(self, hidden, input_tensor):
        return self.norm(self.dense(hidden) + input_tensor)


class _SelfAttention(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = torch.nn.Linear(8, 24)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v


class _Attention(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.self, self.output = _SelfAttention(), _Output()

    def forward(self, x):
        return self.output(self.self(x), x)


def test_a_checkpointed_module_copied_into_its_parent_warns():
    model = torch.nn.Sequential(_Attention(), _Attention())
    apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, _Output))
    with pytest.warns(fxsd.errors.InlinedHooksWarning) as record:
        fxsd.stochastic_depth(model, 0.5, scale="train")
    for i, warning in enumerate(record):
        assert str(warning.message).startswith(
            f"'{i}.output' (CheckpointWrapper) is an activation-checkpoint wrapper"), warning
        assert str(warning.message).endswith(f"Checkpoint '{i}' (or a module above it) instead.")
    assert len(record) == 2
