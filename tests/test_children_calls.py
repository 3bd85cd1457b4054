"""Children stay module calls (issue 25, "Rewrite only what owns a join").

In a rewritten block every child that owns no join is called as itself, and a gate's branch
looks the block's children up on the block when it runs. So the user's hooks fire (Hugging
Face collects ``output_attentions`` with hooks), and a child replaced after gating —
``apply_activation_checkpointing``, ``torch.compile``, a wrapper, ``fully_shard`` — is the one
that runs, in the model, in its deep copies and in what ``torch.load`` gives back.

(One class per block kind, found by ``get_module_class_from_name``, is tested in
``tests/test_one_class.py::test_llama_layers_share_one_class_found_by_name``.)
"""

from __future__ import annotations

import copy
import io
import json
import os
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torchvision
from conftest import CallCounter, grads
from torch import nn

import fxsd

tf = pytest.importorskip("transformers")
from transformers.models.llama.modeling_llama import LlamaMLP  # noqa: E402

VOCAB = 128
LAYERS = 2
RATE = 0.5
SEED = 11


def _ids(batch: int = 2, length: int = 7, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _plain() -> nn.Module:
    """A tiny Llama with random weights, in eval mode; eager attention, which can return its
    weights (``output_attentions=True``)."""
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                            num_hidden_layers=LAYERS, num_attention_heads=4,
                            num_key_value_heads=2, max_position_embeddings=64,
                            attn_implementation="eager")
    return tf.LlamaForCausalLM(config).eval()


def _gate(model: nn.Module) -> nn.Module:
    return fxsd.stochastic_depth(model, RATE, distribution="uniform", seed=SEED,
                                 example_kwargs={"input_ids": _ids()})


@pytest.fixture(scope="module")
def llama() -> tuple[nn.Module, nn.Module]:
    model = _plain()
    return model, _gate(model).eval()


def _layers(model: nn.Module) -> list[nn.Module]:
    return list(model.model.layers)


def _decisions(model: nn.Module) -> list[tuple[bool, bool]]:
    """The last training forward's decisions: (self_attn dropped, mlp dropped) per layer."""
    return [(bool(b.self_attn_gate.dropped), bool(b.mlp_gate.dropped)) for b in _layers(model)]


class Counting(nn.Module):
    """A wrapper around a child, counting its calls (what ``checkpoint_wrapper`` or
    ``torch.compile`` put in a child's place)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.calls = 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.inner(*args, **kwargs)


def _train_step(model: nn.Module, step: int) -> torch.Tensor:
    """One forward and backward in training; the loss."""
    ids = _ids(seed=100 + step)
    loss = model(ids, labels=ids).loss
    loss.backward()
    return loss.detach()


# -- hooks on the children ---------------------------------------------------------------------

def test_output_attentions_one_per_layer_equal_to_plain(llama):
    model, gated = llama
    ids = _ids()
    with torch.no_grad():
        want = model(ids, output_attentions=True)
        got = gated(ids, output_attentions=True)
    assert len(want.attentions) == LAYERS
    assert len(got.attentions) == LAYERS, "attentions are collected by hooks on self_attn"
    for a, b in zip(got.attentions, want.attentions, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(got.logits, want.logits)


def test_forward_hooks_on_children_fire_once_per_kept_call():
    gated = _gate(_plain()).train()
    layers = _layers(gated)
    counter = CallCounter({f"{i}.{part}": getattr(b, part) for i, b in enumerate(layers)
                           for part in ("self_attn", "mlp")})
    seen = []
    try:
        for step in range(4):
            counter.calls = dict.fromkeys(counter.calls, 0)
            with torch.no_grad():
                gated(_ids(seed=step))
            decisions = _decisions(gated)
            seen += [d for pair in decisions for d in pair]
            want = {f"{i}.{part}": int(not dropped) for i, pair in enumerate(decisions)
                    for part, dropped in zip(("self_attn", "mlp"), pair)}
            assert counter.calls == want, f"step {step}"
    finally:
        counter.remove()
    assert 0 < sum(seen) < len(seen), "rate 0.5: some branches dropped, some kept"


def test_pre_hook_registered_before_gating_still_fires():
    model = _plain()
    calls = []
    model.model.layers[0].self_attn.register_forward_pre_hook(lambda m, a: calls.append(m))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gated = _gate(model).eval()
    assert calls == [], "fxsd's own runs of the model do not call the user's hooks"
    with torch.no_grad():
        gated(_ids())
    assert calls == [gated.model.layers[0].self_attn]
    assert not [w for w in caught if issubclass(w.category, fxsd.errors.InlinedHooksWarning)]


# -- children replaced after gating ------------------------------------------------------------

def _checkpointed_and_plain(check: bool) -> tuple[nn.Module, nn.Module]:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointWrapper,
        apply_activation_checkpointing,
    )

    model = _plain()
    plain, wrapped = _gate(model).train(), _gate(model).train()
    if check:
        apply_activation_checkpointing(wrapped, check_fn=lambda m: isinstance(m, LlamaMLP))
        assert all(isinstance(b.mlp, CheckpointWrapper) for b in _layers(wrapped))
    return plain, wrapped


def test_activation_checkpointing_after_gating_recomputes_kept_mlps():
    plain, wrapped = _checkpointed_and_plain(check=True)
    # forward *pre*-hooks: checkpoint's recomputation stops early, once it has what backward
    # needs (``torch.utils.checkpoint.set_checkpoint_early_stop``), so a forward hook misses it
    inner = [b.mlp._checkpoint_wrapped_module for b in _layers(wrapped)]
    calls = dict.fromkeys(map(str, range(LAYERS)), 0)
    handles = [m.register_forward_pre_hook(lambda m, a, i=str(i): calls.__setitem__(i, calls[i]
                                                                                    + 1))
               for i, m in enumerate(inner)]
    kept = 0
    try:
        for step in range(3):
            calls.update(dict.fromkeys(calls, 0))
            want_loss = _train_step(plain, step)
            got_loss = _train_step(wrapped, step)
            assert _decisions(wrapped) == _decisions(plain)
            mlp_kept = [not d for _, d in _decisions(wrapped)]
            kept += sum(mlp_kept)
            # forward, then recomputed in backward: twice per kept MLP, never when dropped
            assert calls == {str(i): 2 * k for i, k in enumerate(mlp_kept)}, step
            assert torch.equal(got_loss, want_loss)
            want, got = grads(plain), grads(wrapped)
            assert {k.replace("._checkpoint_wrapped_module", "") for k in got} == set(want)
            for name, g in got.items():
                torch.testing.assert_close(g, want[name.replace("._checkpoint_wrapped_module",
                                                                "")], rtol=0, atol=0)
            plain.zero_grad(set_to_none=True)
            wrapped.zero_grad(set_to_none=True)
    finally:
        for h in handles:
            h.remove()
    assert 0 < kept < 3 * LAYERS, "rate 0.5: some MLPs dropped, some kept"


def test_child_replaced_after_gating_is_the_one_called():
    plain, wrapped = _checkpointed_and_plain(check=False)
    wrappers = []
    for block in _layers(wrapped):
        block.mlp = Counting(block.mlp)
        block.self_attn = Counting(block.self_attn)
        wrappers.append((block.self_attn, block.mlp))
    for step in range(3):
        before = [(a.calls, m.calls) for a, m in wrappers]
        assert torch.equal(_train_step(wrapped, step), _train_step(plain, step))
        decisions = _decisions(wrapped)
        assert decisions == _decisions(plain)
        for (a, m), (a0, m0), (da, dm) in zip(wrappers, before, decisions, strict=True):
            assert (a.calls - a0, m.calls - m0) == (int(not da), int(not dm)), step
    with torch.no_grad():
        wrapped.eval(), plain.eval()
        assert torch.equal(wrapped(_ids()).logits, plain(_ids()).logits)


def test_torch_compiled_mlp_after_gating_is_the_one_called():
    plain, gated = _checkpointed_and_plain(check=False)
    calls = [0]

    def backend(gm, example_inputs):  # dynamo's graph, run eagerly, counted
        def run(*args):
            calls[0] += 1
            return gm.forward(*args)

        return run

    torch._dynamo.reset()
    for block in _layers(gated):
        block.mlp = torch.compile(block.mlp, backend=backend)
    kept = 0
    for step in range(3):
        assert torch.equal(_train_step(gated, step), _train_step(plain, step))
        kept += sum(not d for _, d in _decisions(gated))
    assert calls[0] == kept > 0
    torch._dynamo.reset()


# -- copies ------------------------------------------------------------------------------------

def _copies(gated: nn.Module) -> list[nn.Module]:
    buffer = io.BytesIO()
    torch.save(gated, buffer)
    buffer.seek(0)
    return [copy.deepcopy(gated), torch.load(buffer, weights_only=False)]


@pytest.mark.parametrize("how", ["deepcopy", "torch.load"])
def test_copies_read_their_own_children(how):
    # a fresh model: once run with ``output_attentions=True``, a transformers 5 model holds
    # hooks that are local functions and no longer pickles (the plain model neither)
    model = _plain()
    gated = _gate(model).eval()
    other = _copies(gated)[["deepcopy", "torch.load"].index(how)].eval()
    for block in _layers(other):
        block.mlp = Counting(block.mlp)
    originals = CallCounter({str(i): b.mlp for i, b in enumerate(_layers(gated))})
    ids = _ids()
    try:
        with torch.no_grad():
            want = model(ids).logits
            assert torch.equal(gated(ids).logits, want)
            assert [b.mlp.calls for b in _layers(other)] == [0] * LAYERS
            assert originals.calls == dict.fromkeys(originals.calls, 1)
            assert torch.equal(other(ids).logits, want)
        assert [b.mlp.calls for b in _layers(other)] == [1] * LAYERS
        assert originals.calls == dict.fromkeys(originals.calls, 1), "the copy's own MLPs ran"
    finally:
        originals.remove()
    assert all(b.mlp_gate.branch.host is b for b in _layers(other))


# -- the generated code ------------------------------------------------------------------------

def test_llama_branches_call_attention_and_mlp(llama):
    _, gated = llama
    for block in _layers(gated):
        attn, mlp = block.self_attn_gate.branch.code, block.mlp_gate.branch.code
        assert "self.self_attn(" in attn and "self.input_layernorm(" in attn
        assert "q_proj" not in attn and "softmax" not in attn, "attention is not inlined"
        assert "self.mlp(" in mlp and "self.post_attention_layernorm(" in mlp
        assert "down_proj" not in mlp


def test_resnet50_and_vit_b16_branches_call_their_children():
    torch.manual_seed(0)
    resnet = fxsd.stochastic_depth(torchvision.models.resnet50(num_classes=10), RATE)
    code = resnet.layer1[0].residual_gate.branch.code
    for child in ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3"):
        assert f"self.{child}(" in code, child
    assert "self.downsample(" in resnet.layer1[0].code
    vit = fxsd.stochastic_depth(torchvision.models.vit_b_16(), RATE)
    block = vit.encoder.layers.encoder_layer_0
    attn, mlp = block.self_attention_gate.branch.code, block.mlp_gate.branch.code
    assert "self.ln_1(" in attn and "self.self_attention(" in attn
    assert "self.ln_2(" in mlp and "self.mlp(" in mlp


# -- FSDP2 on every MLP ------------------------------------------------------------------------

FSDP_STEPS = 3


def _fsdp_worker(rank: int, world: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (world,))
    result: dict = {"error": None, "decisions": [], "mlp_calls": []}
    try:
        model = _gate(_plain()).train()
        layers = _layers(model)
        for block in layers:
            fully_shard(block.mlp, mesh=mesh)
        fully_shard(model, mesh=mesh)  # the rest: one group, as FSDP2 wants
        counter = CallCounter({str(i): b.mlp for i, b in enumerate(layers)})
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for step in range(FSDP_STEPS):
            counter.calls = dict.fromkeys(counter.calls, 0)
            ids = _ids(seed=1000 * rank + step)
            model(ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
            result["decisions"].append(_decisions(model))
            result["mlp_calls"].append([counter.calls[str(i)] for i in range(LAYERS)])
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
        result["state"] = {k: v.tolist() for k, v in full.items()}
    except Exception as exc:  # noqa: BLE001 - reported to the test, which fails with it
        result["error"] = f"{type(exc).__name__}: {exc}"
    with open(f"{out}.{rank}", "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


def _fsdp_reference(decisions: list) -> dict[str, torch.Tensor]:
    """One process, both ranks' batches together, the same decisions."""
    model = _gate(_plain()).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(FSDP_STEPS):
        ids = torch.cat([_ids(seed=step), _ids(seed=1000 + step)])
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        assert [list(d) for d in _decisions(model)] == decisions[step]
    return model.state_dict()


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available() or os.name == "nt",
                    reason="needs torch.distributed with gloo")
def test_fully_shard_every_mlp_trains_as_one_process(tmp_path):
    out = str(tmp_path / "fsdp")
    mp.spawn(_fsdp_worker, args=(2, str(tmp_path / "init"), out), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"fsdp.{r}").read_text()) for r in range(2))
    assert r0["error"] is None and r1["error"] is None, (r0["error"], r1["error"])
    assert r0["decisions"] == r1["decisions"]
    for decisions, calls in zip(r0["decisions"], r0["mlp_calls"], strict=True):
        assert calls == [int(not mlp) for _, mlp in decisions]
    flat = [d for step in r0["decisions"] for pair in step for d in pair]
    assert 0 < sum(flat) < len(flat)
    reference = _fsdp_reference(r0["decisions"])
    assert list(r0["state"]) == list(reference)
    assert r0["state"] == r1["state"]
    for k, v in r0["state"].items():
        torch.testing.assert_close(torch.tensor(v), reference[k], rtol=1e-5, atol=1e-6, msg=k)
