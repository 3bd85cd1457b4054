"""Transforming never surprises the user: the model, the process and the saved weights.

After ``stochastic_depth``, ``find_residuals``, ``analyze_residuals`` and ``fxsd inspect`` — on
every tracing path, in training and in eval mode — the model's ``state_dict`` is bit-identical,
its modules' flags and attributes are as they were, and the global RNGs have not moved. A gated
model's default weights mean the same to the plain model. Bad arguments get typed errors.
"""

from __future__ import annotations

import pickle
import random
import sys
import textwrap
import warnings

import pytest
import torch
import torchvision
from torch import nn

import fxsd
from fxsd.tools.cli import main as cli


def _resnet_symbolic(train: bool):
    return torchvision.models.resnet18(num_classes=10).train(train), {}


def _resnet_by_example(train: bool):
    model = torchvision.models.resnet18(num_classes=10).train(train)
    return model, {"tracing": "example", "example_inputs": (torch.randn(2, 3, 32, 32),)}


def _timm_units(train: bool):  # timm's not-traceable units, run on a random input of fxsd's
    timm = pytest.importorskip("timm")
    return timm.create_model("tiny_vit_5m_224", num_classes=10).train(train), {}


def _bert_by_example(train: bool):  # dropout live in training: it draws from the global RNG
    tf = pytest.importorskip("transformers")
    config = tf.BertConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4,
                           max_position_embeddings=32)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    return tf.BertModel(config).train(train), {"example_kwargs": {"input_ids": ids}}


PATHS = {"symbolic": _resnet_symbolic, "by-example": _resnet_by_example,
         "timm-units": _timm_units, "hf-by-example": _bert_by_example}


def _fingerprint(model: nn.Module) -> tuple:
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modules = [(type(m), m.training, dict(m.__dict__)) for m in model.modules()]
    return state, modules, torch.get_rng_state(), random.getstate()


def _assert_untouched(model: nn.Module, before: tuple) -> None:
    state, modules, rng, py_rng = before
    after = model.state_dict()
    assert list(after) == list(state)
    changed = [k for k, v in after.items() if not torch.equal(v, state[k])]
    assert not changed, f"{len(changed)} state entries changed, e.g. {changed[:3]}"
    for (cls, training, attrs), m in zip(modules, model.modules(), strict=True):
        assert type(m) is cls and m.training == training
        assert m.__dict__.keys() == attrs.keys()
        assert all(m.__dict__[k] is v for k, v in attrs.items())
    assert torch.equal(torch.get_rng_state(), rng)
    assert random.getstate() == py_rng


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("path", [pytest.param(p, marks=pytest.mark.slow) if p == "timm-units"
                                  else p for p in PATHS])
def test_transforming_and_analysing_leave_the_model_and_the_rng_alone(path, train):
    model, kwargs = PATHS[path](train)
    before = _fingerprint(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gated = fxsd.stochastic_depth(model, 0.2, **kwargs)
        _assert_untouched(model, before)
        assert fxsd.gates(gated)
        # gated in eval mode, it is in eval mode: its new modules (the gates) included
        assert {m.training for m in gated.modules()} == {train}
        fxsd.find_residuals(model, **kwargs)
        _assert_untouched(model, before)
        fxsd.analyze_residuals(model, **kwargs)
    _assert_untouched(model, before)


def test_fxsds_own_runs_call_none_of_the_models_hooks():
    # the example runs, the abstract runs on fake tensors (shapes, FLOPs, a training step's
    # costs) and the re-trace of a block for a new call are fxsd's, not the user's calls
    model = torchvision.models.resnet18(num_classes=10).train()
    seen = []
    handles = [m.register_forward_hook(lambda m, a, out: seen.append(float(out.detach().mean())))
               for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    handles.append(model.layer2.register_forward_pre_hook(lambda m, a: seen.append("pre")))
    handles.append(model.fc.register_full_backward_hook(lambda m, gi, go: seen.append("back")))
    x = torch.randn(2, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for kwargs in ({"drop_rate": 0.2, "example_inputs": (x,)},
                       {"drop_rate": 0.2, "example_inputs": (x,), "tracing": "example"},
                       {"target_saving": 0.2, "example_inputs": (x,)}):
            gated = fxsd.stochastic_depth(model, **kwargs)
            fxsd.analyze_residuals(model, example_inputs=(x,), tracing=kwargs.get("tracing",
                                                                                   "auto"))
    assert seen == []
    model(x).sum().backward()  # the user's own calls run them all: 20 convs, fc, pre, back
    assert seen.count("pre") == 1 and seen.count("back") == 1 and len(seen) == 23
    seen.clear()
    gated.eval()(x)  # as do the gated model's calls of the modules it keeps whole
    assert seen.count("pre") == 1 and len(seen) == 22
    for h in handles:
        h.remove()


def test_fxsd_inspect_leaves_the_model_alone(tmp_path, monkeypatch, capsys):
    (tmp_path / "sound_models.py").write_text(textwrap.dedent("""
        import torchvision
        MODEL = torchvision.models.resnet18(num_classes=10).train()
        def make():
            return MODEL
    """))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("COLUMNS", "200")
    import importlib

    module = importlib.import_module("sound_models")  # the object the CLI will load
    try:
        before = _fingerprint(module.MODEL)
        cli(["inspect", "sound_models:make", "--input-shape", "2,3,32,32"])
        assert "residual sites" in capsys.readouterr().out
        _assert_untouched(module.MODEL, before)
    finally:
        sys.modules.pop("sound_models", None)


# -- a module that is called but not registered --------------------------------------------


class _Rotate(nn.Module):  # a helper held in a plain dict, as transformers' kernel wrappers are
    def forward(self, x):
        return torch.roll(x, 1, dims=-1)


class HelperBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm, self.proj = nn.LayerNorm(16), nn.Linear(16, 16)
        self.__dict__["_helpers"] = {"rotate": _Rotate()}

    def forward(self, x):
        return x + self.proj(self._helpers["rotate"](self.norm(x)))


def test_a_module_called_but_not_registered_is_traced_through():
    model = nn.Sequential(HelperBlock(), HelperBlock()).eval()
    sites = fxsd.find_residuals(model)
    assert [s.module_path for s in sites] == ["0", "1"]
    assert all(s.branch_output.target == "proj" or str(s.branch_output.target).endswith("proj")
               for s in sites)
    gated = fxsd.stochastic_depth(model, 0.0, distribution="uniform").eval()
    x = torch.randn(3, 16)
    assert torch.equal(gated(x), model(x))
    assert "roll" in gated[0].residual_gate.branch.code  # inlined where it was called
    loaded = pickle.loads(pickle.dumps(gated))
    assert torch.equal(loaded(x), model(x)) and len(fxsd.gates(loaded)) == 2


# -- weights you can ship ------------------------------------------------------------------


def test_default_weights_are_the_plain_models():
    model = torchvision.models.resnet18(num_classes=10)
    gated = fxsd.stochastic_depth(model, 0.5, distribution="uniform", seed=0)
    assert {g.scale for g in fxsd.gates(gated)} == {"train"}
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(0)
    gated.train()(x)  # a training step: kept branches are divided by 1 - p
    plain = torchvision.models.resnet18(num_classes=10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about: the weights are the plain model's
        plain.load_state_dict(gated.state_dict())
    assert torch.equal(plain.eval()(x), gated.eval()(x))


def test_eval_scaled_weights_say_what_they_need_when_saved():
    gated = fxsd.stochastic_depth(torchvision.models.resnet18(num_classes=10), 0.2,
                                  scale="eval")
    with pytest.warns(fxsd.errors.EvalScaledWeightsWarning, match="plain_state_dict"):
        gated.state_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fxsd.plain_state_dict(gated)  # the way out does not warn
        fxsd.set_drop_rate(gated, 0.0)
        gated.state_dict()  # nothing scaled any more


def test_composer_entry_keeps_composers_eval_scaling():
    model = torchvision.models.resnet50()
    fxsd.apply_stochastic_depth(model, "Bottleneck", drop_rate=0.2)
    assert {g.scale for g in fxsd.gates(model)} == {"eval"}


def test_gated_llama_saved_with_save_pretrained_loads_into_the_plain_class(tmp_path):
    tf = pytest.importorskip("transformers")
    config = tf.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            max_position_embeddings=32)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    gated = fxsd.stochastic_depth(tf.LlamaForCausalLM(config), 0.5,
                                  example_kwargs={"input_ids": ids})
    gated.train()(input_ids=ids, labels=ids).loss.backward()
    gated.save_pretrained(tmp_path)
    plain = tf.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(plain(input_ids=ids).logits, gated.eval()(input_ids=ids).logits,
                               rtol=0, atol=0)


def test_llama_plain_state_dict_folds_exactly():
    tf = pytest.importorskip("transformers")
    config = tf.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            max_position_embeddings=32)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    model = tf.LlamaForCausalLM(config).eval()
    gated = fxsd.stochastic_depth(model, 0.4, example_kwargs={"input_ids": ids},
                                  scale="eval").eval()
    assert all(g.info.fold is not None and g.info.fold.path.endswith(("o_proj", "down_proj"))
               for g in fxsd.gates(gated))
    plain = tf.LlamaForCausalLM(config).eval()
    plain.load_state_dict(fxsd.plain_state_dict(gated))
    torch.testing.assert_close(plain(input_ids=ids).logits, gated(input_ids=ids).logits)


# -- clear errors for what a user may pass -------------------------------------------------


def test_select_must_answer_with_a_bool():
    model = torchvision.models.resnet18()
    for answer in ("yes", None, 1):
        with pytest.raises(fxsd.InvalidTypeError, match="select must return True or False"):
            fxsd.stochastic_depth(model, 0.1, select=lambda site, a=answer: a)


def test_example_inputs_must_fit_the_forward():
    model = torchvision.models.resnet18()
    with pytest.raises(fxsd.InvalidArgumentError, match="unexpected keyword argument 'y'"):
        fxsd.stochastic_depth(model, 0.1, example_inputs=(torch.randn(1, 3, 32, 32),),
                              example_kwargs={"y": 1})


def test_a_compiled_model_is_refused_with_the_way_out():
    model = torch.compile(torchvision.models.resnet18())
    with pytest.raises(fxsd.InvalidArgumentError, match="_orig_mod"):
        fxsd.stochastic_depth(model, 0.1)


class _Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # control flow on data: neither tracer can follow it
            return x + self.lin(x)
        return x


def test_an_untraceable_root_with_examples_says_why():
    with pytest.raises(fxsd.TraceError, match="control flow.*Traced by example, no module"):
        fxsd.stochastic_depth(_Untraceable(), 0.1, example_inputs=(torch.randn(2, 4),))
