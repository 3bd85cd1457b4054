"""Restoring a model by putting its objects back, and every failure as an FxsdError.

A model's attributes come back as the very objects they were, whatever their type — a dict
subclass that refuses ``update`` (diffusers' ``FrozenDict``), a ``MappingProxyType``, a custom
container — after a transform that succeeds and after one that fails; a failure is an
``FxsdError`` with the original exception chained, naming fxsd's run and the module.
"""

from __future__ import annotations

import logging
import random
import types
import warnings
from collections import OrderedDict

import pytest
import torch
from torch import nn

import fxsd
from fxsd.analysis.node_costs import profile_nodes
from fxsd.decisions.step_costs import measure_step_costs
from fxsd.errors import ModelRunError, Run, TransformError
from fxsd.preserve import fake_tensors, hooks_silenced, preserved
from fxsd.pruning._costs import forward_costs
from fxsd.runtime.escape_path import abstract_run
from fxsd.runtime.gate import BranchGate


class FrozenConfig(OrderedDict):
    """Like diffusers' ``FrozenDict``: ``clear`` works, ``update`` and assignment raise."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.__dict__["_frozen"] = True

    def update(self, *args, **kwargs):
        raise Exception("You cannot use ``update`` on a FrozenConfig instance.")

    def __setitem__(self, key, value):
        if self.__dict__.get("_frozen"):
            raise Exception("You cannot use ``__setitem__`` on a FrozenConfig instance.")
        super().__setitem__(key, value)


class Bag:
    """A custom container (neither a dict nor a set)."""

    def __init__(self, items):
        self.items = list(items)


class Block(nn.Module):
    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.norm = nn.BatchNorm1d(width)

    def forward(self, x):
        return x + self.norm(self.fc(x))


class Configured(nn.Module):
    """A residual model holding a frozen config, a mapping proxy and a custom container."""

    def __init__(self, fail: bool = False) -> None:
        super().__init__()
        self.blocks = nn.Sequential(Block(), Block())
        self.head = nn.Linear(8, 2)
        self._internal_dict = FrozenConfig(width=8, depth=2, act="relu")
        self.table = types.MappingProxyType({"a": 1, "b": [2]})
        self.bag = Bag([1, 2, 3])
        self.fail = fail

    @property
    def config(self):
        return self._internal_dict

    def forward(self, x):
        if self.fail and self.training:  # only the FLOP count, a training step, fails
            raise ValueError("planted failure")
        return self.head(self.blocks(x))


def _snapshot(model: nn.Module):
    """Every module's attributes (object and a copy of a container's contents), the state dict,
    the flags and the generators."""
    attrs = {}
    for path, m in model.named_modules():
        for name, value in vars(m).items():
            contents = dict(value) if isinstance(value, (dict, types.MappingProxyType)) else (
                list(value.items) if isinstance(value, Bag) else None)
            attrs[path, name] = (value, contents)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [m.training for m in model.modules()]
    return attrs, state, flags, torch.get_rng_state(), random.getstate()


def _assert_unchanged(model: nn.Module, before) -> None:
    attrs, state, flags, rng, py_rng = before
    now = _snapshot(model)[0]
    assert now.keys() == attrs.keys()
    for key, (value, contents) in attrs.items():
        assert now[key][0] is value, key  # the same object ...
        assert now[key][1] == contents, key  # ... with the same contents
    after = model.state_dict()
    assert after.keys() == state.keys()
    assert all(torch.equal(after[k], v) for k, v in state.items())
    assert [m.training for m in model.modules()] == flags
    assert torch.equal(torch.get_rng_state(), rng)
    assert random.getstate() == py_rng


def test_frozen_config_survives_a_transform_that_succeeds():
    torch.manual_seed(0)
    model = Configured().train()
    x = torch.randn(4, 8)
    with torch.no_grad():
        model.eval()
        expected = model(x)
        model.train()
    before = _snapshot(model)
    gated = fxsd.stochastic_depth(model, 0.5, example_inputs=(x,), seed=0)
    _assert_unchanged(model, before)
    assert dict(model.config) == {"width": 8, "depth": 2, "act": "relu"}
    assert gated.config is model.config and gated.table is model.table and gated.bag is model.bag
    assert len(fxsd.gates(gated)) == 2
    with torch.no_grad():
        torch.testing.assert_close(gated.eval()(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("inplace", [False, True])
def test_a_failed_transform_leaves_the_model_as_it_was(inplace):
    """The model (in eval mode) raises in training: in the FLOP count of a ``target_saving``,
    after its blocks were gated (in place, or in a new tree)."""
    torch.manual_seed(0)
    model = Configured(fail=True).eval()
    handle_calls = []
    handle = model.blocks[0].register_forward_hook(lambda m, a, o: handle_calls.append(1))
    x = torch.randn(4, 8)
    before = _snapshot(model)
    with pytest.raises(fxsd.FxsdError) as caught:
        fxsd.stochastic_depth(model, target_saving=0.1, example_inputs=(x,), inplace=inplace)
    _assert_unchanged(model, before)
    error = caught.value
    assert isinstance(error, ModelRunError) and error.run is Run.FLOP_COUNT
    assert error.module_path == ""  # the root's own forward raised
    cause = error.__cause__
    while cause is not None and not isinstance(cause, ValueError):
        cause = cause.__cause__
    assert cause is not None and "planted failure" in str(cause)
    model(x)  # the user's hook handle still reaches its registry
    assert handle_calls == [1]
    handle.remove()
    model(x)
    assert handle_calls == [1]


def test_an_unforeseen_error_inside_the_transform_is_an_fxsd_error(monkeypatch):
    """Any exception inside the transform arrives as an FxsdError chained to it, and the model
    (registries mutated in place before the failure included) is put back."""
    import fxsd.transform as pass_module

    model = Configured()
    before = _snapshot(model)

    def broken(*args, **kwargs):
        model.blocks._modules["0"] = nn.Identity()  # half-done surgery, then a crash
        model.extra = 1
        raise KeyError("boom")

    monkeypatch.setattr(pass_module, "gate_residuals", broken)
    with pytest.raises(TransformError) as caught:
        fxsd.stochastic_depth(model, 0.2, inplace=True)
    assert isinstance(caught.value.__cause__, KeyError)
    assert "stochastic_depth" in str(caught.value) and "boom" in str(caught.value)
    _assert_unchanged(model, before)
    assert not hasattr(model, "extra")


def test_preserved_never_mutates_an_unchanged_container():
    """Put back, not rebuilt: a frozen config, a mapping proxy and a custom container are
    neither cleared nor updated (their methods would raise); a registry that did change is
    mended in place, so a handle the user holds stays valid."""
    model = Configured()
    registry = model.blocks[0]._forward_hooks
    seen = []
    handle = model.blocks[0].register_forward_hook(lambda m, a, o: seen.append(1))
    before = _snapshot(model)
    with preserved(model):
        model(torch.randn(3, 8))  # BatchNorm statistics move, hooks are silenced
        model.table = {}
        model.bag = Bag([])
        del model._internal_dict
        model.blocks[1]._modules["fc"] = nn.Identity()
    _assert_unchanged(model, before)
    assert model.blocks[0]._forward_hooks is registry and seen == []
    handle.remove()
    assert not registry


def test_hooks_silenced_never_mutates_a_registry():
    """Silenced by swapping, not by emptying: a registry that refuses ``clear`` and ``update``
    is neither cleared nor refilled, its hook does not run in the body and runs after it."""

    class Guarded(OrderedDict):
        def clear(self):
            raise AssertionError("cleared a registry")

        def update(self, *args, **kwargs):
            raise AssertionError("updated a registry")

    layer, seen = nn.Linear(2, 2), []
    layer._forward_hooks = registry = Guarded()
    handle = layer.register_forward_hook(lambda m, a, o: seen.append(1))
    with hooks_silenced(layer):
        layer(torch.ones(1, 2))
        layer.register_forward_hook(lambda m, a, o: seen.append("fxsd's"))
    assert seen == [] and layer._forward_hooks is registry and len(registry) == 1
    layer(torch.ones(1, 2))
    assert seen == [1]
    handle.remove()
    assert not registry


class Tokens(nn.Module):
    """A model that is traced by example (its root branches on a value)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.blocks = nn.Sequential(Block(), Block())

    def forward(self, ids):
        if int(ids.max()) >= 10:
            raise IndexError("token id out of range")
        return self.blocks(self.embed(ids))


def test_a_bad_example_is_a_model_run_error_naming_the_run_and_module():
    model, floats = Tokens(), torch.rand(4)  # not token ids
    before = _snapshot(model)
    with pytest.raises(ModelRunError) as caught:
        fxsd.stochastic_depth(model, 0.1, example_inputs=(floats,))
    error = caught.value
    assert error.run is Run.EXAMPLE
    assert (error.module_path, error.module_type) == ("embed", "Embedding")
    assert "example run" in str(error) and "'embed'" in str(error)
    assert isinstance(error.__cause__, RuntimeError)
    _assert_unchanged(model, before)


def test_a_bad_example_on_a_hugging_face_model_is_wrapped_like_resnets():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2))
    floats = torch.randn(2, 8)  # input_ids must be integers
    before = _snapshot(model)
    with pytest.raises(ModelRunError) as caught:
        fxsd.stochastic_depth(model, 0.1, example_kwargs={"input_ids": floats})
    assert caught.value.run is Run.EXAMPLE
    assert caught.value.module_path == "model.embed_tokens"
    assert isinstance(caught.value.__cause__, RuntimeError)
    _assert_unchanged(model, before)


def test_target_saving_on_a_batch_of_one_names_batchnorm():
    """The FLOP count runs a training step: BatchNorm on one value per channel is the cause,
    not missing example inputs."""
    model, one = nn.Sequential(Block(), Block()).eval(), torch.randn(1, 8)
    before = _snapshot(model)
    with pytest.raises(ModelRunError) as caught:
        fxsd.stochastic_depth(model, target_saving=0.1, example_inputs=(one,))
    error = caught.value
    assert error.run is Run.FLOP_COUNT and error.module_type == "BatchNorm1d"
    assert error.module_path == "0.norm" and "batch of at least 2" in str(error)
    assert "example_inputs=" not in str(error).split("BatchNorm")[0]
    _assert_unchanged(model, before)


def test_scripted_and_meta_models_are_refused_up_front():
    scripted = torch.jit.script(nn.Sequential(Block(), Block()))
    with pytest.raises(fxsd.InvalidTypeError, match="TorchScript"):
        fxsd.stochastic_depth(scripted, 0.1)
    with torch.device("meta"):
        meta = nn.Sequential(Block(), Block())
    with pytest.raises(fxsd.InvalidArgumentError, match="meta device"):
        fxsd.stochastic_depth(meta, 0.1, example_inputs=(torch.randn(2, 8),))
    # without examples nothing runs: a meta model is analysed and gated like any other
    gated = fxsd.stochastic_depth(meta, 0.1)
    assert len(fxsd.gates(gated)) == 2
    assert len(fxsd.find_residuals(meta)) == 2


class Offset(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x) + 1  # an add, but no residual join


class Untraceable(nn.Module):
    """``int(x.max())`` in the root's forward (as PyG's ``to_dense_batch``); its child's only
    add is a constant offset, so no site anywhere."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = Offset()

    def forward(self, x):
        n = int(x.max())
        return self.inner(x)[: max(n, 1)]


def test_table_of_a_model_without_sites_says_why():
    model = Untraceable()
    x = torch.full((3, 4), 2.0)
    with pytest.warns(fxsd.errors.NoResidualSitesWarning):
        result = fxsd.stochastic_depth(model, 0.1, example_inputs=(x,))
    text = fxsd.table(result, width=0)  # raised TraceError
    assert "no residual site" in text and "could not be traced" in text and "int()" in text
    by_example = fxsd.table(result, example_inputs=(x,), width=0)
    assert "scalar operand" in by_example  # the rejected add, listed without rejected=True
    assert "<root>" in by_example and "Untraceable" in by_example  # the root, not traced


def test_a_successful_fake_run_prints_no_torch_error_log(caplog, capfd):
    """A kernel failing on fake tensors makes torch log a traceback at ERROR level before the
    exception reaches fxsd; fxsd's fake runs keep those loggers quiet, and only while they run."""
    logger = logging.getLogger("torch._subclasses.fake_tensor")
    level = logger.level
    with caplog.at_level(logging.DEBUG), fake_tensors() as mode:
        assert logger.getEffectiveLevel() > logging.CRITICAL
        logger.error("failed while attempting to run meta for aten.x")
        mode.from_tensor(torch.ones(2)) + 1
    assert logger.level == level
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert "failed while attempting" not in capfd.readouterr().err


def test_deepseek_v3_transform_logs_no_error(caplog, capfd):
    """transformers' DeepSeek-V3 runs a grouped matmul that fails on float32 fake tensors
    (torch logs it at ERROR level), which fxsd handles: the transform succeeds silently."""
    transformers = pytest.importorskip("transformers")
    config = transformers.DeepseekV3Config(
        vocab_size=128, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4,
        num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=16,
        kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, n_group=1,
        topk_group=1)
    torch.manual_seed(0)
    model = transformers.DeepseekV3ForCausalLM(config)
    ids = torch.randint(0, 128, (2, 8))
    with caplog.at_level(logging.WARNING), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gated = fxsd.stochastic_depth(model, 0.1, example_kwargs={"input_ids": ids})
    assert len(fxsd.gates(gated)) == 4
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert "Traceback" not in capfd.readouterr().err


def _skipped_branch(model: nn.Module, x: torch.Tensor):
    """The user's call of a model whose gates all drop: each branch's zeros come from an
    abstract run of the branch, hosted by its block (whose children the user's hooks are on)."""
    for gate in fxsd.gates(model):
        gate.drop_rate = 1.0
    return lambda: model(x)


def _traced(run):
    """``run`` on the model's trace, made before the hooks are (tracing calls them)."""
    def prepare(model: nn.Module, x: torch.Tensor):
        gm = torch.fx.symbolic_trace(model)
        return lambda: run(gm, (x,))
    return prepare


#: Every run fxsd makes on fake tensors (fxsd.preserve.fake_weights): whether it runs on a gated
#: model, and the run (made ready before the hooks are registered).
FAKE_RUNS = {
    "node shapes and FLOPs": (False, _traced(profile_nodes)),
    "abstract run": (False, _traced(abstract_run)),
    "skipped branch": (True, _skipped_branch),
    "step costs": (True, lambda model, x: lambda: measure_step_costs(model, (x,))),
    "prune's forward costs": (True, lambda model, x: lambda: forward_costs(model, (x,))),
}


@pytest.mark.parametrize("run", list(FAKE_RUNS))
def test_every_fake_run_silences_the_users_hooks_and_puts_the_model_back(run):
    """The user's hooks are the user's, for the user's calls: none of fxsd's runs on fake
    tensors calls them (they would see fake tensors). Each run leaves the modules' ``training``
    flags, parameters and buffers (the same objects, with the same values) as they were."""
    gated, prepare = FAKE_RUNS[run]
    torch.manual_seed(0)
    model = nn.Sequential(Block(), Block(), nn.Linear(8, 2)).train()
    if gated:
        model = fxsd.stochastic_depth(model, 0.2)
    model[0].norm.eval()  # mixed flags, each kept
    x = torch.randn(4, 8)
    fake_run = prepare(model, x)
    seen = []
    handles = [h for name, m in model.named_modules() if not isinstance(m, BranchGate) for h in (
        m.register_forward_pre_hook(lambda m, a, name=name: seen.append(("pre", name))),
        m.register_forward_hook(lambda m, a, o, name=name: seen.append(("post", name))))]
    tensors = {k: (t, t.detach().clone()) for k, t in
               [*model.named_parameters(), *model.named_buffers()]}
    flags = [(m, m.training) for m in model.modules()]
    fake_run()
    if run == "skipped branch":  # the user's call runs its hooks, but no branch runs
        assert ("post", "") in seen and ("post", "1") in seen
        assert not any(name.startswith(("0.", "1.")) for _, name in seen)
    else:
        assert seen == []
    assert [(m, m.training) for m in model.modules()] == flags
    now = dict([*model.named_parameters(), *model.named_buffers()])
    assert now.keys() == tensors.keys()
    for name, (tensor, value) in tensors.items():
        assert now[name] is tensor and torch.equal(tensor, value), name
    for h in handles:
        h.remove()
