"""``fxsd bench --transform``: how long ``fxsd.stochastic_depth`` itself takes.

:func:`transform_rows` times the pass (trace + analysis + rewrite) on one CPU thread on
torchvision models, chains of residual MLP blocks (:func:`residual_mlp`) and, traced by
example, the tiny Hugging Face and diffusers models of :data:`EXAMPLE_MODELS`, whose rows also
give the time of one of their own training steps (:func:`training_step_time`).
"""

from __future__ import annotations

import copy
import statistics
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fxsd.analysis.analyze import analyze_residuals
from fxsd.record import get_record
from fxsd.runtime.accessors import gates
from fxsd.tools.models import load_model
from fxsd.transform import stochastic_depth

__all__ = ["transform_rows", "transform_times", "EXAMPLE_MODELS", "training_step_time",
           "residual_mlp"]



def transform_rows(block_counts: Sequence[int] = (250, 500, 1000),
                   torchvision_models: Sequence[str] = ("resnet152", "vit_l_16"),
                   repeats: int = 3, by_example: Sequence[str] = ()
                   ) -> Iterator[dict[str, Any]]:
    """Time ``fxsd.stochastic_depth`` itself (trace + analysis + rewrite) on one CPU thread,
    yielding one row per model as soon as it is measured.

    ``by_example`` names models traced by example (:data:`EXAMPLE_MODELS`: ``"llama"``,
    ``"t5"``, ``"unet"``; those whose library is not installed are left out), transformed
    with one training batch as ``example_kwargs``. Their rows also hold ``step_seconds``, the
    median time of one training step of the plain model on that batch (forward, backward,
    SGD), and ``steps``, the transform's time in such steps; other rows hold ``None`` there.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cases: list[tuple[str, Callable[[], tuple[nn.Module, dict[str, Any] | None]]]] = [
            (name, lambda name=name: (load_model(name), None)) for name in torchvision_models
        ]
        cases += [(f"residual MLP x{n}", lambda n=n: (residual_mlp(n), None))
                  for n in block_counts]
        cases += [(EXAMPLE_MODELS[name][0], EXAMPLE_MODELS[name][1]) for name in by_example
                  if _installed(EXAMPLE_MODELS[name][2])]
        for label, make in cases:
            model, batch = make()
            yield _transform_row(label, model, batch, repeats)
    finally:
        torch.set_num_threads(threads)



def _transform_row(label: str, model: nn.Module, batch: dict[str, Any] | None,
                   repeats: int) -> dict[str, Any]:
    """One row of :func:`transform_rows`: the best of ``repeats`` transforms (by example on
    ``batch`` when given), then the plain model's training step on ``batch``."""
    samples = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a tiny model's notes on what it does not gate
        for _ in range(repeats):
            t0 = time.perf_counter()
            gated = stochastic_depth(model, 0.1, example_kwargs=batch)
            samples.append(time.perf_counter() - t0)
        analysis = analyze_residuals(model, example_kwargs=batch)
    # by example: the nodes of every module traced on its own
    graphs = [u.graph_module for u in analysis.units] if batch is not None else []
    nodes = sum(len(gm.graph.nodes) for gm in graphs or [analysis.graph_module])
    best = min(samples)
    step = None if batch is None else training_step_time(model, batch)
    return {"model": label, "nodes": nodes, "sites": len(gates(gated)),
            "blocks": len(get_record(gated).rewritten), "seconds": best,
            "us_per_node": best / nodes * 1e6, "step_seconds": step,
            "steps": None if step is None else best / step}



def training_step_time(model: nn.Module, batch: dict[str, Any], steps: int = 5,
                       warmup: int = 2) -> float:
    """The median time of one training step of ``model`` on ``batch`` (forward, the loss the
    model returns or the mean square of its first output, backward, an SGD step). Trains a
    copy: ``model`` is left as it is."""
    model = copy.deepcopy(model).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        out = model(**batch)
        loss = getattr(out, "loss", None)
        if loss is None:
            first = next(t for t in torch.utils._pytree.tree_leaves(out)
                         if isinstance(t, torch.Tensor))
            loss = first.float().square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)



def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None



def _ids(batch: int, length: int, vocab: int = 128) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(0))



def tiny_llama(batch: int = 8, length: int = 128) -> tuple[nn.Module, dict[str, Any]]:
    """A 4-layer Llama (width 32, random weights) and a training batch of token ids."""
    import transformers as tf

    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                            num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                            max_position_embeddings=2 * length)
    ids = _ids(batch, length)
    return tf.LlamaForCausalLM(config), {"input_ids": ids, "labels": ids}



def tiny_t5(batch: int = 8, length: int = 128) -> tuple[nn.Module, dict[str, Any]]:
    """A T5 of 6 encoder and 6 decoder layers (width 32, random weights) and a training batch
    (inputs of ``length`` tokens, targets of a quarter of that)."""
    import transformers as tf

    torch.manual_seed(0)
    config = tf.T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=6,
                         num_decoder_layers=6, num_heads=4, decoder_start_token_id=0)
    return tf.T5ForConditionalGeneration(config), {
        "input_ids": _ids(batch, length), "labels": _ids(batch, max(1, length // 4))}



def tiny_unet(batch: int = 4, size: int = 32) -> tuple[nn.Module, dict[str, Any]]:
    """A diffusers ``UNet2DConditionModel`` with two levels (32 and 64 channels, one layer
    each, cross-attention at the outer level; random weights) and a batch of latents."""
    import diffusers

    torch.manual_seed(0)
    model = diffusers.UNet2DConditionModel(
        sample_size=size, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        attention_head_dim=8, norm_num_groups=8)
    gen = torch.Generator().manual_seed(0)
    return model, {"sample": torch.randn(batch, 4, size, size, generator=gen),
                   "timestep": torch.arange(batch) * 10,
                   "encoder_hidden_states": torch.randn(batch, 8, 32, generator=gen)}



EXAMPLE_MODELS: dict[str, tuple[str, Callable[[], tuple[nn.Module, dict[str, Any]]], str]] = {
    "llama": ("tiny Llama x4", tiny_llama, "transformers"),
    "t5": ("tiny T5 6+6", tiny_t5, "transformers"),
    "unet": ("tiny UNet2DCondition", tiny_unet, "diffusers"),
}
"""The models :func:`transform_rows` traces by example: name -> (row label, builder, the
library it needs)."""



def transform_times(block_counts: Sequence[int] = (250, 500, 1000),
                    torchvision_models: Sequence[str] = ("resnet152", "vit_l_16"),
                    repeats: int = 3, by_example: Sequence[str] = ()) -> list[dict[str, Any]]:
    """:func:`transform_rows` as a list."""
    return list(transform_rows(block_counts, torchvision_models, repeats, by_example))



def residual_mlp(blocks: int, width: int = 64) -> nn.Module:
    """A plain chain of pre-norm residual MLP blocks, for timing the pass at scale."""

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = nn.LayerNorm(width)
            self.fc1 = nn.Linear(width, width)
            self.fc2 = nn.Linear(width, width)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.fc2(F.gelu(self.fc1(self.norm(x))))

    return nn.Sequential(*[Block() for _ in range(blocks)])
