"""Models from libraries fxsd was not built around (diffusers, monai), tiny configs and random
weights: each transforms, its sites match the library's source, and ``fxsd.check`` passes —
eval bit-identical, every gate reached, depths in data-flow order, the original (its config
included) untouched."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

import fxsd
from fxsd.checks import CheckKind

diffusers = pytest.importorskip("diffusers")
monai = pytest.importorskip("monai")


def unet2d() -> tuple[torch.nn.Module, dict[str, Any]]:
    model = diffusers.UNet2DModel(
        sample_size=16, in_channels=3, out_channels=3, block_out_channels=(32, 64),
        layers_per_block=1, norm_num_groups=8, attention_head_dim=8,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    return model, {"sample": torch.randn(2, 3, 16, 16), "timestep": torch.tensor([10, 20])}


def autoencoder_kl() -> tuple[torch.nn.Module, dict[str, Any]]:
    model = diffusers.AutoencoderKL(
        block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        sample_size=32)
    return model, {"sample": torch.randn(2, 3, 32, 32)}


def sd3() -> tuple[torch.nn.Module, dict[str, Any]]:
    model = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
        pooled_projection_dim=16, out_channels=4)
    return model, {"hidden_states": torch.randn(2, 4, 8, 8),
                   "encoder_hidden_states": torch.randn(2, 5, 16),
                   "pooled_projections": torch.randn(2, 16), "timestep": torch.tensor([1, 2])}


def dynunet() -> tuple[torch.nn.Module, dict[str, Any]]:
    model = monai.networks.nets.DynUNet(
        spatial_dims=2, in_channels=1, out_channels=2, kernel_size=[3, 3, 3],
        strides=[1, 2, 2], upsample_kernel_size=[2, 2], res_block=True)
    return model, {"x": torch.randn(2, 1, 32, 32)}


def swin_unetr() -> tuple[torch.nn.Module, dict[str, Any]]:
    pytest.importorskip("einops")
    model = monai.networks.nets.SwinUNETR(
        in_channels=1, out_channels=2, feature_size=12, spatial_dims=2, depths=(1, 1, 1, 1),
        num_heads=(1, 1, 1, 1))
    return model, {"x_in": torch.randn(2, 1, 64, 64)}


# Sites counted from each library's source for the configs above.
CASES: dict[str, tuple[Callable[[], Any], int]] = {
    # ResnetBlock2D `(input_tensor + hidden_states) / output_scale_factor` and the attention
    # processor's `hidden_states + residual`: down 1 + (1 + 1), mid 2 + 1, up (2 + 2) + 2
    "UNet2DModel": (unet2d, 12),
    # encoder 2 resnets + mid (2 + 1); decoder mid (2 + 1) + 2 x 2 resnets
    "AutoencoderKL": (autoencoder_kl, 12),
    # JointTransformerBlock: the feed-forward joins (the image stream's in both blocks, the
    # text stream's in the first; the last block is context_pre_only) and the attention joins
    # (the first block's two share one gate: tests/test_shared_work.py)
    "SD3Transformer2DModel": (sd3, 5),
    # UnetResBlock `out += residual` (res_block=True): input block, one downsample, bottleneck;
    # UnetUpBlock's conv block is a UnetBasicBlock (no join)
    "DynUNet": (dynunet, 3),
    # SwinTransformerBlock: attention and MLP joins of 4 one-block stages; UnetrBasicBlock's
    # UnetResBlock in encoder1-4 and encoder10, and in the conv block of decoder1-5 (2 x 4 + 5 + 5)
    "SwinUNETR": (swin_unetr, 18),
}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "UNet2DModel"
                                  else n for n in CASES])
def test_library_model_checks(name: str) -> None:
    build, sites = CASES[name]
    torch.manual_seed(0)
    model, kwargs = build()
    config = dict(getattr(model, "config", {}) or {})
    report = fxsd.check(model, example_kwargs=kwargs, drop_rate=0.3)
    assert report.ok, report.table(width=0)
    assert all(report.result(kind).ok for kind in (
        CheckKind.EVAL_OUTPUT, CheckKind.GATES_REACHED, CheckKind.DEPTH_ORDER,
        CheckKind.ORIGINAL_UNTOUCHED)), report.table(width=0)
    gates = fxsd.gates(report.gated)
    if sites is not None:
        assert len(gates) == sites, fxsd.table(report.gated, width=0)
    if config:  # diffusers' FrozenDict config, intact
        assert dict(model.config) == config and type(model.config).__name__ == "FrozenDict"
