"""One gate for joins that share a branch's work (``fxsd/analysis/shared_work.py``): diffusers'
joint attention (SD3, Flux: one attention, two residual streams) and timm's DPN (one convolution
feeding the residual add and the dense concatenation). Every join is gated; a dropped gate gives
exactly the plain model with the work's outputs zeroed; gradients flow."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import fxsd
from fxsd.runtime.gate_info import ShareKind

diffusers = pytest.importorskip("diffusers")
timm = pytest.importorskip("timm")


def sd3() -> tuple[nn.Module, dict[str, Any]]:
    model = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
        pooled_projection_dim=16, out_channels=4)
    return model, {"hidden_states": torch.randn(2, 4, 8, 8),
                   "encoder_hidden_states": torch.randn(2, 5, 16),
                   "pooled_projections": torch.randn(2, 16), "timestep": torch.tensor([1, 2])}


def flux() -> tuple[nn.Module, dict[str, Any]]:
    model = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=16,
        guidance_embeds=False, axes_dims_rope=(2, 2, 4))
    return model, {"hidden_states": torch.randn(2, 16, 4),
                   "encoder_hidden_states": torch.randn(2, 5, 16),
                   "pooled_projections": torch.randn(2, 16), "timestep": torch.tensor([1., 2.]),
                   "img_ids": torch.zeros(16, 3), "txt_ids": torch.zeros(5, 3)}


# (builder, joins counted from diffusers' source, gates): a JointTransformerBlock adds its
# attention's two outputs to two streams and has a feed-forward join per stream; the last SD3
# block is context_pre_only (no text-stream joins); each Flux single block has one join
JOINT = {"SD3": (sd3, 4 + 4 + 2, 3 + 3 + 2), "Flux": (flux, 4 + 4 + 1 + 1, 3 + 3 + 1 + 1)}


def _zero_outputs(module: nn.Module) -> Any:
    def hook(_m: nn.Module, _args: Any, out: Any) -> Any:
        if isinstance(out, tuple):
            return tuple(torch.zeros_like(o) if isinstance(o, torch.Tensor) else o for o in out)
        return torch.zeros_like(out)
    return module.register_forward_hook(hook)


@pytest.mark.parametrize("name", list(JOINT))
def test_joint_attention_joins_share_one_gate(name: str) -> None:
    build, joins, n_gates = JOINT[name]
    torch.manual_seed(0)
    model, kwargs = build()
    model.eval()
    gated = fxsd.stochastic_depth(model, 0.3, example_kwargs=kwargs)
    gates = fxsd.gates(gated)
    assert len(gates) == n_gates, fxsd.table(gated, width=0)
    second = [u for g in gates for u in g.info.shared if u.kind is ShareKind.JOIN]
    assert len(gates) + len(second) == joins
    # fxsd.table lists each join as a row, the second joins under their gate
    rows = [line for line in fxsd.table(gated, width=0).splitlines()[2:] if line.strip()]
    assert sum("_gate" in line for line in rows[:joins]) == joins
    assert all(f"({u.name})" in fxsd.table(gated, width=0) for u in second)
    with torch.no_grad():
        assert torch.equal(gated(**kwargs).sample, model(**kwargs).sample)

    # a dropped attention gate: the plain model with the attention's outputs zeroed
    block = gated.transformer_blocks[0]
    for gate in gates:
        gate.drop_rate = 1.0 if gate is block.attn_gate else 0.0
    handle = _zero_outputs(model.transformer_blocks[0].attn)
    try:
        gated.train(), model.train()
        with torch.no_grad():
            assert torch.equal(gated(**kwargs).sample, model(**kwargs).sample)
    finally:
        handle.remove()
    assert block.attn_gate.dropped is True

    # kept, it trains: gradients reach both streams' projections
    for gate in gates:
        gate.drop_rate = 0.0
    gated(**kwargs).sample.square().mean().backward()
    attn = gated.transformer_blocks[0].attn
    for proj in (attn.to_q, attn.add_q_proj):
        assert proj.weight.grad is not None and torch.isfinite(proj.weight.grad).all()
        assert proj.weight.grad.abs().sum() > 0


def test_joint_attention_strip_and_sample_mode() -> None:
    torch.manual_seed(0)
    model, kwargs = sd3()
    model.eval()
    gated = fxsd.stochastic_depth(model, 0.5, example_kwargs=kwargs, scale="eval")
    stripped = fxsd.strip(gated)
    with torch.no_grad():
        assert torch.equal(stripped(**kwargs).sample, gated.eval()(**kwargs).sample)
    # sample mode: the second join drops the rows the first drops (the mask implementation)
    with pytest.warns(fxsd.errors.NoSavingWarning):  # every branch here reads other rows' values
        sampled = fxsd.stochastic_depth(model, 0.5, example_kwargs=kwargs, mode="sample")
    gate = sampled.transformer_blocks[0].attn_gate
    assert gate.sample_impl == "mask"
    sampled.train()
    with torch.no_grad():
        sampled(**kwargs)
    assert gate.kept_rows is not None


@pytest.mark.slow
def test_dpn_residual_and_dense_parts_share_one_gate() -> None:
    torch.manual_seed(0)
    model = timm.create_model("dpn68", pretrained=False).eval()
    x = torch.randn(2, 3, 64, 64)
    gated = fxsd.stochastic_depth(model, 0.5)
    gates = fxsd.gates(gated)
    assert len(gates) == 22
    assert all([u.kind for u in g.info.shared] == [ShareKind.ZEROS] for g in gates)
    with torch.no_grad():
        assert torch.equal(gated(x), model(x))
    # every gate dropping: the plain model with each block's last convolution zeroed (its
    # output is split between the residual add and the dense concatenation)
    for gate in gates:
        gate.drop_rate = 1.0
    blocks = [m for m in model.modules() if type(m).__name__ == "DualPathBlock"]
    assert len(blocks) == 22
    handles = [_zero_outputs(b.c1x1_c) for b in blocks]
    try:
        gated.train(), model.train()
        with torch.no_grad():
            torch.testing.assert_close(gated(x), model(x), rtol=0, atol=0)
    finally:
        for h in handles:
            h.remove()
    for gate in gates:
        gate.drop_rate = 0.5
    torch.manual_seed(1)
    gated(x).sum().backward()
    grads = [p.grad for p in gated.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
