"""Calls a gated block's trace did not see: Whisper's, ``generate()``'s, the HF Trainer's.

A model traced by example is gated inside its layers along one recorded call; the model's
ordinary calls pass its layers other keyword arguments and flags (``use_cache``,
``num_items_in_batch``, ``output_attentions``), another cache or none. A gated layer then traces
itself again for that call, with its own gates (:mod:`fxsd.runtime.variants`). Tiny configs, random
weights, CPU; every result is compared with the untransformed model.
"""

from __future__ import annotations

import copy
import functools
import io
import re
from pathlib import Path

import pytest
import torch
from conftest import grads

import fxsd

tf = pytest.importorskip("transformers")

VOCAB = 128
GENERATE = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False)


def _ids(batch: int = 2, length: int = 9, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _llama_config():
    return tf.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=64, pad_token_id=0)


def _llama(**example):
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(_llama_config()).eval()
    gated = fxsd.stochastic_depth(model, 0.0, scale="train", seed=0,
                                  example_kwargs={"input_ids": _ids(), **example})
    return model, gated


@functools.cache
def _whisper():
    """(original, gated at rate 0, features, decoder ids), built once."""
    config = tf.WhisperConfig(
        vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
        decoder_ffn_dim=64, num_mel_bins=8, max_source_positions=16, max_target_positions=32,
        decoder_start_token_id=1, pad_token_id=0, eos_token_id=2, bos_token_id=1,
        begin_suppress_tokens=None, suppress_tokens=None)
    torch.manual_seed(0)
    model = tf.WhisperForConditionalGeneration(config).eval()
    features = torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(1))
    decoder_ids = _ids(2, 5, seed=2)
    gated = fxsd.stochastic_depth(model, 0.0, scale="train", seed=0, example_kwargs={
        "input_features": features, "decoder_input_ids": decoder_ids})
    return model, gated, features, decoder_ids


# -- Whisper: its encoder adds use_cache to its layers' keywords at every call -----------------


def test_whisper_forward():
    model, gated, features, decoder_ids = _whisper()
    assert len(fxsd.gates(gated)) == 10
    with torch.no_grad():
        expected = model(input_features=features, decoder_input_ids=decoder_ids).logits
        got = gated.eval()(input_features=features, decoder_input_ids=decoder_ids).logits
    assert torch.equal(got, expected)


def test_whisper_training_step():
    model, gated, features, decoder_ids = _whisper()
    model.train()
    model.zero_grad()
    expected = model(input_features=features, labels=decoder_ids).loss
    expected.backward()
    expected_grads = grads(model)
    model.zero_grad()  # the gated model shares the parameters
    got = gated.train()(input_features=features, labels=decoder_ids).loss  # rate 0: all kept
    got.backward()
    assert torch.equal(got, expected)
    got_grads = grads(gated)
    assert got_grads.keys() == expected_grads.keys()
    for name, grad in expected_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=0, atol=0)
    fxsd.set_drop_rate(gated, 0.9)
    try:
        dropped = set()
        for _ in range(4):
            model.zero_grad()
            gated(input_features=features, labels=decoder_ids).loss.backward()
            named = fxsd.runtime.accessors.named_gates(gated)
            dropped |= {n for n, g in named.items() if g.dropped}
        assert dropped, "at 0.9 some layers are dropped on the calls Whisper makes"
    finally:
        fxsd.set_drop_rate(gated, 0.0)
        model.eval()
        gated.eval()
        model.zero_grad()


def test_whisper_generate():
    model, gated, features, _ = _whisper()
    got = gated.eval().generate(features, **GENERATE)
    assert got.shape[1] >= 4 and torch.equal(got, model.generate(features, **GENERATE))


# -- Llama: use_cache=False (Trainer), num_items_in_batch, then generate -----------------------


def test_a_call_without_a_cache_then_generate():
    model, gated = _llama()
    ids = _ids()
    with torch.no_grad():  # traced with a cache; Trainer calls with use_cache=False
        assert torch.equal(gated(input_ids=ids, use_cache=False).logits,
                           model(input_ids=ids, use_cache=False).logits)
        n = torch.tensor(11)
        assert torch.equal(gated(input_ids=ids, labels=ids, num_items_in_batch=n).loss,
                           model(input_ids=ids, labels=ids, num_items_in_batch=n).loss)
    assert torch.equal(gated.generate(ids, **GENERATE), model.generate(ids, **GENERATE))


def test_traced_without_a_cache_generates():
    model, gated = _llama(use_cache=False)
    ids = _ids()
    assert torch.equal(gated.generate(ids, **GENERATE), model.generate(ids, **GENERATE))


def test_tracing_again_changes_neither_the_model_nor_the_random_streams():
    model, gated = _llama()
    ids = _ids()
    keys = gated.state_dict().keys()
    before = {k: v.clone() for k, v in gated.state_dict().items()}
    torch_rng, gate_rng = torch.get_rng_state(), fxsd.get_rng_state(gated)
    fxsd.set_drop_rate(gated, 0.5)
    gated.train()
    first = gated(input_ids=ids, use_cache=False).logits  # traces each layer again
    decisions = [g.dropped for g in fxsd.gates(gated)]
    after = fxsd.get_rng_state(gated)
    assert torch.equal(torch.get_rng_state(), torch_rng)
    fxsd.set_rng_state(gated, gate_rng)  # the same call again, on the variants made above
    again = gated(input_ids=ids, use_cache=False).logits
    assert [g.dropped for g in fxsd.gates(gated)] == decisions
    assert fxsd.get_rng_state(gated)["block"] == after["block"]
    assert torch.equal(again, first)
    assert gated.state_dict().keys() == keys
    assert all(torch.equal(v, before[k]) for k, v in gated.state_dict().items())


def test_rates_reach_the_layers_traced_again():
    _, gated = _llama()
    ids = _ids()
    for gate in fxsd.gates(gated):  # every layer dropped: on any call, logits of the embedding
        gate.drop_rate = 1.0
    gated.train()
    with torch.no_grad():
        expected = gated(input_ids=ids).logits
        got = gated(input_ids=ids, use_cache=False).logits
    assert torch.equal(got, expected)
    assert all(g.dropped for g in fxsd.gates(gated))


def test_variants_are_dropped_by_copies_and_pickles_and_made_again():
    model, gated = _llama()
    ids = _ids()
    with torch.no_grad():
        expected = model(input_ids=ids, use_cache=False).logits
        gated(input_ids=ids, use_cache=False)
    buffer = io.BytesIO()
    torch.save(gated, buffer)
    buffer.seek(0)
    for other in (copy.deepcopy(gated), torch.load(buffer, weights_only=False)):
        layer = other.model.layers[0]
        assert not layer.__dict__.get("_fxsd_variants"), "a cache, not state"
        with torch.no_grad():
            assert torch.equal(other(input_ids=ids, use_cache=False).logits, expected)


# -- the HF Trainer ----------------------------------------------------------------------------


def _dataset(n: int = 8) -> list[dict[str, torch.Tensor]]:
    ids = _ids(n, 9, seed=5)
    return [{"input_ids": row, "labels": row} for row in ids]


def _train(model, tmp_path, name: str) -> tuple[object, float]:
    args = tf.TrainingArguments(output_dir=str(tmp_path / name), max_steps=3, report_to=[],
                                use_cpu=True, per_device_train_batch_size=2, save_strategy="no")
    trainer = tf.Trainer(model=model, args=args, train_dataset=_dataset())
    return trainer, trainer.train().training_loss


def test_trainer_trains_a_gated_llama_as_the_plain_one(tmp_path):
    # Trainer's defaults: num_items_in_batch=, use_cache=False; at rate 0 the gated model
    # trains exactly as the plain one
    torch.manual_seed(0)
    plain = tf.LlamaForCausalLM(_llama_config())
    _, gated = _llama()
    _, expected = _train(plain, tmp_path, "plain")
    trainer, got = _train(gated, tmp_path, "gated")
    assert trainer.state.global_step == 3
    assert got == expected
    weights = plain.state_dict()
    for key, value in gated.state_dict().items():
        torch.testing.assert_close(value, weights[key], rtol=0, atol=0)
    gated.eval()
    ids = _ids()
    plain.eval()
    assert torch.equal(gated.generate(ids, **GENERATE), plain.generate(ids, **GENERATE))


def test_the_trainer_recipe_of_training_md_runs(tmp_path, monkeypatch):
    text = (Path(__file__).resolve().parents[1] / "docs" / "training.md").read_text()
    section = text.split("**Hugging Face Trainer**", 1)[1]
    recipe = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert "max_steps=10_000," in recipe
    recipe = recipe.replace("max_steps=10_000,", "max_steps=3,")  # as written, but 3 steps
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    scope = {"config": _llama_config(), "example_ids": _ids(), "data": _dataset(16)}
    exec(compile(recipe, "docs/training.md", "exec"), scope)
    trainer, model = scope["trainer"], scope["model"]
    assert trainer.state.global_step == 3
    assert any("drop_rate" in entry for entry in trainer.state.log_history)
    assert all(g.dropped is not None for g in fxsd.gates(model)), "every gate drew"
