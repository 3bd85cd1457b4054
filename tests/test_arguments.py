"""Every argument is checked once, by type and value, before any work (issue 24, item 8).

Each bad input raises a typed ``FxsdError`` that names the argument and what it accepts, and the
model is intact afterwards: the same ``state_dict``, the same module objects, no gate.
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

import fxsd


def schedule_of(model):
    from fxsd.training.schedulers import schedule_of as in_charge  # new with this file's checks

    return in_charge(model)


class Block(nn.Module):
    def __init__(self, dim=8):
        super().__init__()
        self.fc = nn.Linear(dim, dim)

    def forward(self, x):
        return x + torch.relu(self.fc(x))


class Net(nn.Module):
    """Six blocks that each own one join (so ``inplace=True`` can gate them in their parent)."""

    def __init__(self, depth=6, dim=8):
        super().__init__()
        self.blocks = nn.Sequential(*(Block(dim) for _ in range(depth)))
        self.head = nn.Linear(dim, 2)
        self.calls = 0
        self.register_forward_pre_hook(self._count)

    @staticmethod
    def _count(module, args):
        module.calls += 1

    def forward(self, x, flag=None):
        return self.head(self.blocks(x))


def _snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [(name, id(m)) for name, m in model.named_modules()])


def _assert_intact(model, snapshot):
    state, modules = snapshot
    now = model.state_dict()
    assert now.keys() == state.keys()
    assert all(torch.equal(now[k], state[k]) for k in state)
    assert [(name, id(m)) for name, m in model.named_modules()] == modules
    assert fxsd.gates(model) == []


def _refused(model, error, match, **kwargs):
    """``stochastic_depth(model, **kwargs)`` raises ``error`` before any work; model intact."""
    before = _snapshot(model)
    with pytest.raises(error, match=match) as info:
        fxsd.stochastic_depth(model, **kwargs)
    assert isinstance(info.value, fxsd.FxsdError)
    _assert_intact(model, before)
    return info.value


# -- booleans ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["inplace", "sync_ranks"])
@pytest.mark.parametrize("value", ["no", 1, None])
def test_flags_must_be_bools(name, value):
    # "no" is truthy: before, inplace="no" gated the model in place and sync_ranks="no" meant True
    _refused(Net(), fxsd.InvalidTypeError, rf"{name} must be True or False, got {value!r}",
             **{name: value})


# -- rates ------------------------------------------------------------------------------------


@pytest.mark.parametrize("distribution", [[0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
                                          lambda depth, levels: 0.1 * depth])
def test_drop_rate_beside_a_per_site_distribution_is_refused(distribution):
    _refused(Net(), fxsd.InvalidArgumentError,
             r"give drop_rate= or a per-site distribution=, not both \(got drop_rate=0.5",
             drop_rate=0.5, distribution=distribution)


def test_per_site_rates_give_the_model_wide_rate():
    rates = [0.0, 0.1, 0.2, 0.4, 0.3, 0.2]
    gated = fxsd.stochastic_depth(Net(), distribution=rates)
    assert [g.drop_rate for g in fxsd.gates(gated)] == pytest.approx(rates)
    assert fxsd.get_drop_rate(gated) == pytest.approx(0.4)  # what the model does: its largest
    fxsd.set_drop_rate(gated, 0.2)  # one factor for every site, the shape kept
    assert [g.drop_rate for g in fxsd.gates(gated)] == pytest.approx([r / 2 for r in rates])


def test_per_site_rates_are_checked_before_tracing():
    model = Net()
    _refused(model, fxsd.InvalidTypeError, r"distribution\[1\] must be a number",
             distribution=[0.1, "0.2", 0.3, 0.4, 0.5, 0.6], example_inputs=(torch.randn(2, 8),),
             tracing="example")
    assert model.calls == 0


# -- tracing options against the model --------------------------------------------------------


def test_unknown_leaf_module_path_is_named_with_close_matches():
    error = _refused(Net(), fxsd.InvalidArgumentError, "leaf_modules names 'block.1'",
                     leaf_modules=["block.1"])
    assert "did you mean 'blocks.1'" in str(error)
    with pytest.raises(fxsd.InvalidArgumentError, match="'blocks.9'"):
        fxsd.find_residuals(Net(), leaf_modules=["blocks.9"])
    with pytest.raises(fxsd.InvalidArgumentError, match="Linear that is not a module of Net"):
        fxsd.find_residuals(Net(), leaf_modules=[nn.Linear(2, 2)])


def test_unknown_concrete_arg_is_named_with_close_matches():
    error = _refused(Net(), fxsd.InvalidArgumentError,
                     r"concrete_args names 'flga', which is not a parameter of Net.forward",
                     concrete_args={"flga": None})
    assert "did you mean 'flag'" in str(error)
    with pytest.raises(fxsd.InvalidArgumentError, match="'flga'"):
        fxsd.analyze_residuals(Net(), concrete_args={"flga": None})
    with pytest.raises(fxsd.InvalidTypeError, match="concrete_args must be a dict"):
        fxsd.find_residuals(Net(), concrete_args=[("flag", None)])


def test_one_leaf_class_or_name_is_a_list_of_one():
    model = Net()
    assert len(fxsd.gates(fxsd.stochastic_depth(model))) == 6
    # a class alone (was: TypeError 'type' object is not iterable)
    with pytest.warns(fxsd.errors.NoResidualSitesWarning):
        assert len(fxsd.gates(fxsd.stochastic_depth(model, leaf_modules=Block))) == 0
    # a name alone is that name, not its characters (was: silently ignored)
    assert len(fxsd.gates(fxsd.stochastic_depth(model, leaf_modules="blocks.0"))) == 5
    assert len(fxsd.gates(fxsd.stochastic_depth(model, leaf_modules=model.blocks[1]))) == 5


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    (dict(tracing=3), fxsd.InvalidTypeError, "tracing must be one of"),
    (dict(tracing="exampel"), fxsd.InvalidArgumentError, "did you mean 'example'"),
    (dict(example_inputs={"x": 1}), fxsd.InvalidTypeError, "keyword inputs go in example_kwargs"),
    (dict(example_kwargs={1: 2}), fxsd.InvalidTypeError, "example_kwargs must be a dict"),
    (dict(example_inputs=(torch.randn(2, 8),), example_kwargs={"flg": 1}),
     fxsd.InvalidArgumentError, "do not fit Net.forward"),
    (dict(leaf_modules=3), fxsd.InvalidTypeError, "leaf_modules must be a list"),
    (dict(leaf_modules=[3]), fxsd.InvalidTypeError, "leaf_modules entries must be"),
])
def test_analysis_arguments(kwargs, error, match):
    """find_residuals and stochastic_depth check them alike (one function, both places)."""
    with pytest.raises(error, match=match):
        fxsd.find_residuals(Net(), **kwargs)
    _refused(Net(), error, match, **kwargs)


# -- the other options of stochastic_depth ----------------------------------------------------


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    (dict(mode=1), fxsd.InvalidTypeError, "mode must be one of"),
    (dict(mode="smaple"), fxsd.InvalidArgumentError, "did you mean 'sample'"),
    (dict(scale="eavl"), fxsd.InvalidArgumentError, "did you mean 'eval'"),
    (dict(existing=None), fxsd.InvalidTypeError, "existing must be one of"),
    (dict(sample_impl="all"), fxsd.InvalidArgumentError, "unknown sample_impl 'all'"),
    (dict(seed=1.5), fxsd.InvalidTypeError, "seed must be an int"),
    (dict(seed=True), fxsd.InvalidTypeError, "seed must be an int"),
    (dict(select="layer1"), fxsd.InvalidTypeError, r"select must be a callable"),
    (dict(select=lambda: True), fxsd.InvalidTypeError,
     r"select is called as select\(site\) -> bool, but its signature \(\)"),
    (dict(distribution=lambda depth: 0.1), fxsd.InvalidTypeError, r"distribution\(depth, L\)"),
    (dict(target_saving="0.1"), fxsd.InvalidTypeError, "target_saving must be a number"),
])
def test_bad_options_are_refused_before_the_model_runs(kwargs, error, match):
    model = Net()
    # tracing by example runs the model: a late check would show up as a call
    _refused(model, error, match, example_inputs=(torch.randn(2, 8),), tracing="example",
             **kwargs)
    assert model.calls == 0


def test_a_type_error_inside_select_is_wrapped():
    def select(site):
        return site.depth > "1"  # a bug in the user's function

    error = _refused(Net(), fxsd.InvalidTypeError, r"select\(site\) raised TypeError for",
                     select=select)
    assert isinstance(error.__cause__, TypeError)


# -- the gate's rate --------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "error"), [(5.0, fxsd.InvalidArgumentError),
                                              (-0.5, fxsd.InvalidArgumentError),
                                              (math.nan, fxsd.InvalidArgumentError),
                                              ("0.3", fxsd.InvalidTypeError),
                                              (True, fxsd.InvalidTypeError)])
def test_gate_rate_is_checked_on_assignment(value, error):
    gated = fxsd.stochastic_depth(Net(), 0.2, distribution="uniform", seed=0)
    gate = fxsd.gates(gated)[0]
    with pytest.raises(error, match="drop_rate of gate 'blocks.0.residual_gate'"):
        gate.drop_rate = value
    assert gate.drop_rate == 0.2


def test_gate_rate_survives_copies_and_old_pickles():
    model = Net()
    gated = fxsd.stochastic_depth(model, 0.3, distribution="uniform", seed=0).eval()
    gate = fxsd.gates(gated)[2]
    gate.drop_rate = 1.0
    x = torch.randn(3, 8)
    buffer = io.BytesIO()
    torch.save(gated, buffer)
    buffer.seek(0)
    for other in (copy.deepcopy(gated), torch.load(buffer, weights_only=False)):
        assert [g.drop_rate for g in fxsd.gates(other)] == [0.3, 0.3, 1.0, 0.3, 0.3, 0.3]
        with pytest.raises(fxsd.InvalidArgumentError):
            fxsd.gates(other)[0].drop_rate = 2.0
        torch.testing.assert_close(other(x), model(x), rtol=0, atol=0)  # eval: the plain model
        other.train()(x)
        assert fxsd.gates(other)[2].dropped is True  # rate 1: always dropped
    state = gate.__getstate__()
    state["drop_rate"] = state.pop("_drop_rate")  # a gate pickled before the property
    old = type(gate).__new__(type(gate))
    old.__setstate__(state)
    assert old.drop_rate == 1.0


def test_gate_rate_drives_the_forward():
    model = Net().train()
    gated = fxsd.stochastic_depth(model, 0.0, seed=0).train()
    x = torch.randn(3, 8)
    for gate in fxsd.gates(gated):
        gate.drop_rate = 1.0  # every branch dropped: the blocks pass x through
    torch.testing.assert_close(gated(x), model.head(x))


# -- schedules --------------------------------------------------------------------------------


def _gated(rate=0.2):
    return fxsd.stochastic_depth(Net(), rate)


@pytest.mark.parametrize("second", [
    lambda m: fxsd.DropSchedule(m, lambda t: 1.0),
    lambda m: fxsd.DropWarmup(m, total_steps=10),
    lambda m: fxsd.progressive_layer_drop(m, total_steps=10),
])
def test_a_second_schedule_is_refused(second):
    model = _gated()
    first = fxsd.DropWarmup(model, total_steps=10, warmup=0.5)
    first.step()
    rates = [(g.drop_rate, g.rate_weight) for g in fxsd.gates(model)]
    with pytest.raises(fxsd.InvalidArgumentError,
                       match=r"already has a DropWarmup in charge of its drop rates \(at step "
                             r"1\).*Call .remove\(\) on the one in charge first"):
        second(model)
    assert [(g.drop_rate, g.rate_weight) for g in fxsd.gates(model)] == rates
    assert schedule_of(model) is first
    first.remove()  # the documented way out
    assert schedule_of(model) is None
    replacement = second(model)
    assert schedule_of(model) is replacement
    with pytest.raises(fxsd.InvalidArgumentError, match="was removed"):
        first.step()


def test_a_forgotten_schedule_frees_the_model():
    model = _gated()
    fxsd.DropSchedule(model, lambda t: 1.0)  # not kept: garbage at once
    fxsd.DropSchedule(model, lambda t: 0.5)
    assert fxsd.get_drop_rate(model) == pytest.approx(0.1)


def test_a_copied_model_starts_without_a_schedule():
    model = _gated()
    schedule = fxsd.DropSchedule(model, lambda t: 0.5)
    twin = copy.deepcopy(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    copies = []
    for other in (twin, loaded):
        assert schedule_of(other) is None
        copies.append(fxsd.DropSchedule(other, lambda t: 2.0))
    schedule.step()  # the original still steps its own model only
    assert fxsd.get_drop_rate(model) == pytest.approx(0.1)
    assert fxsd.get_drop_rate(twin) == pytest.approx(0.2)
    assert schedule_of(model) is schedule


@pytest.mark.parametrize(("factor", "error"), [("1", fxsd.InvalidTypeError),
                                               (True, fxsd.InvalidTypeError),
                                               (None, fxsd.InvalidTypeError),
                                               (math.inf, fxsd.InvalidArgumentError)])
def test_schedule_factors_are_numbers(factor, error):
    model = _gated()
    with pytest.raises(error, match=r"fn\(0\) returned .*factors must be numbers >= 0"):
        fxsd.DropSchedule(model, lambda t: factor)
    assert fxsd.get_drop_rate(model) == 0.2 and schedule_of(model) is None


def test_schedule_fn_arity_is_checked():
    with pytest.raises(fxsd.InvalidTypeError, match=r"fn is called as fn\(step\) -> factor"):
        fxsd.DropSchedule(_gated(), lambda: 1.0)


@pytest.mark.parametrize("make", [lambda m: fxsd.DropSchedule(m, lambda t: 1.0),
                                  lambda m: fxsd.DropWarmup(m, total_steps=10),
                                  lambda m: fxsd.progressive_layer_drop(m, total_steps=10)])
@pytest.mark.parametrize(("state", "error", "match"), [
    ({"junk": 1}, fxsd.InvalidArgumentError, "state_dict\\(\\) has the keys"),
    ([1, 2], fxsd.InvalidTypeError, "takes a dict"),
])
def test_schedule_load_state_dict_checks_the_state(make, state, error, match):
    model = _gated()
    schedule = make(model)
    schedule.step()
    before = (schedule.state_dict(), [g.drop_rate for g in fxsd.gates(model)])
    with pytest.raises(error, match=match):
        schedule.load_state_dict(state)
    assert (schedule.state_dict(), [g.drop_rate for g in fxsd.gates(model)]) == before


def test_schedule_load_state_dict_is_all_or_nothing():
    model = _gated()
    warmup = fxsd.DropWarmup(model, total_steps=10)
    state = {**warmup.state_dict(), "step_count": 3, "warmup": 2.0}
    with pytest.raises(fxsd.InvalidArgumentError, match=r"warmup must lie in \[0, 1\]"):
        warmup.load_state_dict(state)
    assert warmup.step_count == 0 and warmup.warmup == 0.1


def test_schedule_state_that_fails_to_apply_leaves_the_schedule_as_it_was():
    model = _gated()
    schedule = fxsd.DropSchedule(model, lambda t: 1.0 + t)
    with pytest.raises(fxsd.InvalidArgumentError, match=r"fn\(5\) returned 6"):
        schedule.load_state_dict({"step_count": 5, "base_rate": 0.5})  # 0.5 x 6 > 1
    assert schedule.state_dict() == {"step_count": 0, "base_rate": 0.2}
    assert fxsd.get_drop_rate(model) == 0.2


def test_warmup_and_pld_arguments():
    with pytest.raises(fxsd.InvalidTypeError, match="total_steps must be an int"):
        fxsd.DropWarmup(_gated(), total_steps="100")
    with pytest.raises(fxsd.InvalidArgumentError, match="gamma= or total_steps=, not both"):
        fxsd.progressive_layer_drop(_gated(), gamma=0.1, total_steps=100)
    with pytest.raises(fxsd.InvalidTypeError, match="gamma must be a number"):
        fxsd.progressive_layer_drop(_gated(), gamma="0.1")


# -- training accessors and tables ------------------------------------------------------------


def test_training_accessors_check_their_arguments():
    model = _gated()
    with pytest.raises(fxsd.InvalidTypeError, match="drop_rate must be a number"):
        fxsd.set_drop_rate(model, "0.1")
    with pytest.raises(fxsd.InvalidTypeError, match="expected a model returned by"):
        fxsd.gates("resnet50")
    with pytest.raises(fxsd.InvalidTypeError, match="state must be the dict"):
        fxsd.set_rng_state(model, [1, 2])
    assert fxsd.get_drop_rate(model) == 0.2


def test_table_refuses_an_unknown_format():
    with pytest.raises(fxsd.InvalidArgumentError, match=r"unknown tablefmt 'gitub'.*'github'"):
        fxsd.table(Net(), tablefmt="gitub")
    assert "|" in fxsd.table(Net(), tablefmt="github", width=0)


# -- Composer's entry -------------------------------------------------------------------------


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    (dict(stochastic_method="blok"), fxsd.InvalidArgumentError,
     "unknown stochastic_method 'blok'.*did you mean 'block'"),
    (dict(use_same_gpu_seed="no"), fxsd.InvalidTypeError, "use_same_gpu_seed must be True"),
    (dict(drop_distribution="linaer"), fxsd.InvalidArgumentError,
     "unknown drop_distribution 'linaer'"),
    (dict(drop_rate=2.0), fxsd.InvalidArgumentError, r"drop_rate must lie in \[0, 1\]"),
    # was: the model gated in place, then DropWarmup refused total_steps=0
    (dict(drop_warmup=0.1, total_steps=0), fxsd.InvalidArgumentError, "total_steps must be"),
    (dict(drop_warmup=1.5, total_steps=10), fxsd.InvalidArgumentError, "drop_warmup must lie"),
    (dict(sacle="eval"), fxsd.InvalidTypeError, "unexpected keyword argument 'sacle'.*'scale'"),
    (dict(inplace=False), fxsd.InvalidTypeError, "unexpected keyword argument 'inplace'"),
    (dict(leaf_modules=["blocks.7"]), fxsd.InvalidArgumentError, "'blocks.7'"),
    (dict(target_layer_name=Block), fxsd.InvalidTypeError, "target_layer_name must be"),
])
def test_composer_entry_checks_before_gating_in_place(kwargs, error, match):
    model = Net()
    before = _snapshot(model)
    with pytest.raises(error, match=match):
        fxsd.apply_stochastic_depth(model, **kwargs)
    _assert_intact(model, before)


def test_composer_entry_still_gates():
    model = Net()
    fxsd.apply_stochastic_depth(model, "Block", "sample", 0.3, drop_warmup=0.5, total_steps=4)
    assert len(fxsd.gates(model)) == 6 and schedule_of(model) is fxsd.get_record(model).warmup
    with pytest.raises(fxsd.InvalidArgumentError, match="already has a DropWarmup"):
        fxsd.DropSchedule(model, lambda t: 1.0)
