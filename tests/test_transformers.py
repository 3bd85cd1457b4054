"""Hugging Face transformers 5.x: traced by example, gated inside the layers.

Tiny configs, random weights, CPU. The root of every transformers 5.x model defeats torch.fx,
so fxsd runs the model once on example inputs and traces its layers along the recorded calls.
"""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
from conftest import CallCounter

import fxsd

tf = pytest.importorskip("transformers")

VOCAB = 128


def _ids(batch: int = 2, length: int = 9) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(0))


def llama():
    config = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            max_position_embeddings=64)
    return tf.LlamaForCausalLM(config), {"input_ids": _ids()}


def gpt2():
    config = tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                           bos_token_id=0, eos_token_id=0)
    return tf.GPT2LMHeadModel(config), {"input_ids": _ids()}


def bert():
    config = tf.BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0  # a padded row
    return tf.BertForSequenceClassification(config), {"input_ids": _ids(), "attention_mask": mask}


def t5():
    config = tf.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                         num_decoder_layers=2, num_heads=4, decoder_start_token_id=0)
    return tf.T5ForConditionalGeneration(config), {"input_ids": _ids(),
                                                   "decoder_input_ids": _ids(2, 5)}


def bart():  # post-norm layers that read their own training flag; the root traces
    config = tf.BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2,
                           encoder_attention_heads=4, decoder_attention_heads=4,
                           encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64)
    return tf.BartForConditionalGeneration(config), {"input_ids": _ids(),
                                                     "decoder_input_ids": _ids(2, 5)}


def vit():
    config = tf.ViTConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                          num_hidden_layers=2, num_attention_heads=4)
    return tf.ViTForImageClassification(config), {"pixel_values": torch.randn(2, 3, 32, 32)}


# (builder, gates found, where they are)
FAMILIES = {
    "llama": (llama, 4, {"model.layers.0.self_attn_gate", "model.layers.0.mlp_gate"}),
    "gpt2": (gpt2, 4, {"transformer.h.0.attn_gate", "transformer.h.0.mlp_gate"}),
    "bert": (bert, 4, {"bert.encoder.layer.0.attention.residual_gate",
                       "bert.encoder.layer.0.residual_gate"}),
    # 10 joins: 2 encoder blocks x (attention, feed-forward), 2 decoder blocks x (self-attention,
    # cross-attention, feed-forward). Block 0's attentions also hand on the position bias they
    # build (fxsd.analysis.escapes)
    "t5": (t5, 10, {"encoder.block.0.layer.0.residual_gate",
                    "decoder.block.0.layer.0.residual_gate",
                    "decoder.block.0.layer.1.residual_gate",
                    "encoder.block.1.layer.0.residual_gate",
                    "decoder.block.1.layer.1.residual_gate",
                    "decoder.block.0.layer.2.residual_gate"}),
    "vit": (vit, 4, {"vit.layers.0.attention_gate", "vit.layers.0.mlp_gate"}),
    "bart": (bart, 10, {"model.encoder.layers.0.self_attn_gate", "model.encoder.layers.1.fc1_gate",
                        "model.decoder.layers.1.encoder_attn_gate"}),
}


@functools.cache
def _transform(name: str):
    """(original, transformed at rate 0, example inputs), built once per test session; eval
    scaling, so that a rate set later has a factor to fold (test_pickles_strips_and_folds)."""
    build, _, _ = FAMILIES[name]
    torch.manual_seed(0)
    model, inputs = build()
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", fxsd.errors.NoResidualSitesWarning)
        gated = fxsd.stochastic_depth(model, 0.0, example_kwargs=inputs, scale="eval")
    return model, gated, inputs


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    return request.param, *_transform(request.param)


def _tensors(output):
    return {k: v for k, v in output.items() if isinstance(v, torch.Tensor)}


def test_sites_are_the_residual_joins(family):
    name, model, gated, _ = family
    _, count, some = FAMILIES[name]
    names = set(fxsd.runtime.accessors.named_gates(gated))
    assert len(names) == count, sorted(names)
    assert some <= names, sorted(names)


def test_the_model_stays_the_model(family):
    name, model, gated, _ = family
    assert type(gated) is type(model)
    assert gated is not model and not fxsd.gates(model), "the user's model is not modified"
    # save_pretrained writes the same keys: the gates hold no state of their own
    assert gated.state_dict().keys() == model.state_dict().keys()


def test_eval_at_rate_zero_is_bit_identical(family):
    name, model, gated, inputs = family
    with torch.no_grad():
        expected, got = model(**inputs), gated.eval()(**inputs)
    assert type(got) is type(expected)
    a, b = _tensors(expected), _tensors(got)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_tables_say_what_was_traced(family):
    name, model, gated, _ = family
    record = fxsd.get_record(gated)
    assert record.traced, "traced module by module"
    owners = {gate.rpartition(".")[0] for gate in fxsd.runtime.accessors.named_gates(gated)}
    # every module holding gates lies in a module that was traced
    assert all(any(o == t or o.startswith(t + ".") or not t for t in record.traced)
               for o in owners)
    text = fxsd.table(gated, width=0)
    assert "traced one module at a time" in text
    for path, _, why in record.untraced:
        assert path in text and why[:30] in text


def test_training_skips_dropped_layers(family):
    name, model, gated, inputs = family
    fxsd.set_drop_rate(gated, 0.5)
    gated.train()
    gates = fxsd.runtime.accessors.named_gates(gated)
    # the weight-bearing modules each gate's branch calls (T5's cross-attention keys and values
    # of the encoder output are computed outside: they do not depend on the skipped input and
    # they fill the cache; the position bias block 0 hands on is computed from its table when
    # the branch is dropped, fxsd.analysis.escapes)
    def handed_on(gate):
        path = gate.escape_path
        return set() if path is None else {str(n.target) for n in path.compute.graph.nodes
                                           if n.op == "call_module"}

    inside = {f"{g}/{n.target}": gate.branch.get_submodule(str(n.target))
              for g, gate in gates.items() for n in gate.branch.graph.nodes
              if n.op == "call_module" and str(n.target) not in handed_on(gate)
              and any(True for _ in gate.branch.get_submodule(str(n.target)).parameters())}
    counter = CallCounter(inside)
    dropped: set[str] = set()
    for step in range(6):
        torch.manual_seed(step)
        gated.zero_grad()
        out = gated(**inputs)
        loss = (out.logits if "logits" in out else out[0]).float().pow(2).mean()
        loss.backward()
        now = {g for g, gate in gates.items() if gate.dropped}
        for key, calls in counter.calls.items():
            gate = key.split("/")[0]
            assert calls == (0 if gate in now else 1), (step, key)
            counter.calls[key] = 0
        for key, module in inside.items():  # nothing in a dropped branch ran backward either
            if key.split("/")[0] in now:
                assert all(p.grad is None for p in module.parameters()), key
        dropped |= now
    counter.remove()
    gated.zero_grad()
    fxsd.set_drop_rate(gated, 0.0)
    gated.eval()
    assert dropped and dropped != set(gates), "6 steps at 0.5 drop some layers, not all"


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_generate_in_eval(name):
    model, gated, inputs = _transform(name)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    expected = model.generate(inputs["input_ids"], **kwargs)
    assert torch.equal(gated.eval().generate(inputs["input_ids"], **kwargs), expected)


@pytest.mark.parametrize("name", ["t5", "bart"])
def test_encoder_decoder_generate_with_the_gated_model(name):
    # generate() passes the layers flags the example call did not (output_attentions=...), and
    # from the second step a cache whose cross-attention keys are computed: the layers trace
    # themselves again for those calls (docs/design.md, "Calls the example did not show")
    model, gated, inputs = _transform(name)
    kwargs = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False)  # 4 decode steps
    got = gated.eval().generate(inputs["input_ids"], **kwargs)
    assert torch.equal(got, model.generate(inputs["input_ids"], **kwargs))
    assert got.shape[1] >= 5
    traced_again = [path for path in fxsd.get_record(gated).rewritten
                    if gated.get_submodule(path).__dict__.get("_fxsd_variants")]
    assert traced_again, "some layers served calls their trace did not see"


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_a_padding_mask_the_example_did_not_have(name):
    # traced on a batch without padding (the layers got no mask), called with one
    model, gated, inputs = _transform(name)
    mask = torch.ones_like(inputs["input_ids"])
    mask[0, :3] = 0
    with torch.no_grad():
        expected = model(input_ids=inputs["input_ids"], attention_mask=mask).logits
        got = gated.eval()(input_ids=inputs["input_ids"], attention_mask=mask).logits
    assert torch.equal(got, expected)


def test_other_lengths_than_the_example():
    model, gated, _ = _transform("llama")
    ids = _ids(3, 4)
    with torch.no_grad():
        assert torch.equal(gated.eval()(input_ids=ids).logits, model(input_ids=ids).logits)


def test_t5_position_bias_is_handed_on_by_the_gates_that_build_it():
    # block 0's attentions build the position bias from their keys' length; their gates return
    # it next to the sum, and the generated code names it as the model's graph did
    _, gated, _ = _transform("t5")
    handing = {name: gate.escape_path.names
               for name, gate in fxsd.runtime.accessors.named_gates(gated).items()
               if gate.escape_path is not None}
    assert sorted(handing) == [f"{p}.residual_gate" for p in (
        "decoder.block.0.layer.0", "decoder.block.0.layer.1", "encoder.block.0.layer.0")]
    assert not [r for r in fxsd.get_record(gated).rejected
                if r.reason is fxsd.analysis.residuals.RejectReason.ESCAPING_VALUE]
    code = gated.encoder.block[0].layer[0].code
    assert "residual_gate = self.residual_gate(" in code
    assert f"{handing['encoder.block.0.layer.0.residual_gate'][0]} = residual_gate[1]" in code


def test_root_failure_without_examples_says_what_to_do():
    model, _ = llama()
    with pytest.raises(fxsd.TraceError, match="example_kwargs="):
        fxsd.stochastic_depth(model, 0.1)


def test_tracing_example_explicitly():
    model, inputs = vit()
    gated = fxsd.stochastic_depth(model.eval(), 0.0, tracing="example", example_kwargs=inputs)
    assert len(fxsd.gates(gated)) == 4
    with pytest.raises(fxsd.InvalidArgumentError, match="example_inputs= or example_kwargs="):
        fxsd.stochastic_depth(model, 0.1, tracing="example")


def test_pickles_strips_and_folds(family, tmp_path):
    import io

    name, model, gated, inputs = family
    with torch.no_grad():
        expected = _tensors(gated.eval()(**inputs))
    buffer = io.BytesIO()
    torch.save(gated.train(), buffer)  # saved in training mode: dropout choices stay live
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    gated.eval()
    assert type(loaded) is type(model) and len(fxsd.gates(loaded)) == len(fxsd.gates(gated))
    stripped = fxsd.strip(gated)
    with torch.no_grad():
        for other in (loaded.eval(), stripped.eval()):
            got = _tensors(other(**inputs))
            for key in expected:
                assert torch.equal(got[key], expected[key]), (name, key)
    fxsd.set_drop_rate(gated, 0.3)  # a real (1 - p) scale to fold into the weights
    warnings.simplefilter("ignore", fxsd.errors.EvalScaledWeightsWarning)
    try:
        with torch.no_grad():
            scaled = _tensors(gated.eval()(**inputs))
        plain = FAMILIES[name][0]()[0].eval()
        plain.load_state_dict(fxsd.plain_state_dict(gated))
        with torch.no_grad():
            got = _tensors(plain(**inputs))
    finally:
        fxsd.set_drop_rate(gated, 0.0)
    for key in expected:
        assert not torch.allclose(scaled[key], expected[key]), (name, key)
        torch.testing.assert_close(got[key], scaled[key])
