"""A model's own drops, both kinds — a drop-path op ending a branch and a layer drop around the
site (Hugging Face's ``layerdrop``) — adopted by one rule (``fxsd.decisions.plan``), and the
rewrite applying the plan's decisions about both (issue 26)."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import DropPath, called_modules
from torch import nn

import fxsd
from fxsd.analysis.analyze import analyze_residuals
from fxsd.decisions.plan import Options, plan_gates
from fxsd.errors import LayerDropWarning
from fxsd.runtime.accessors import named_gates
from fxsd.runtime.gate_info import DropPathAction
from fxsd.tracing.layer_drop import find_layer_drops

LAYERS = 2


class Layer(nn.Module):
    """Two joins: the first branch ends in the model's own drop path, the second has none."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 8)
        self.drop_path = DropPath(p)

    def forward(self, x):
        x = x + self.drop_path(self.fc1(x))
        return x + self.fc2(torch.relu(x))


def _never() -> torch.Tensor:
    # A real draw while fxsd traces would decide which layers the trace holds; these tests are
    # about the plan and the rewrite, so the loop never skips a layer here.
    return torch.ones([])


class Encoder(nn.Module):
    """Hugging Face's layer drop: ``if self.training and draw < self.layerdrop: skip``; with
    ``own_join``, the encoder performs a join itself, so the rewrite replaces its forward."""

    def __init__(self, layerdrop: float, p: float, own_join: bool = False) -> None:
        super().__init__()
        self.layerdrop, self.own_join = layerdrop, own_join
        self.pos = nn.Linear(8, 8)
        self.layers = nn.ModuleList(Layer(p) for _ in range(LAYERS))

    def forward(self, x):
        if self.own_join:
            x = x + self.pos(x)
        for layer in self.layers:
            if self.training and _never() < self.layerdrop:
                continue
            x = layer(x)
        return x


class Model(nn.Module):
    def __init__(self, layerdrop: float = 0.5, p: float = 0.1, own_join: bool = False) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 8)
        self.encoder = Encoder(layerdrop, p, own_join)

    def forward(self, x):
        return self.encoder(self.inp(x))


def _gates(gated):
    """The layers' gates by kind of own drop: the drop-path joins and the layer-drop joins."""
    found = named_gates(gated)
    return ([g for n, g in found.items() if n.endswith("fc1_gate")],
            [g for n, g in found.items() if n.endswith("fc2_gate")])


def test_a_drop_path_and_a_layer_drop_are_adopted_by_one_rule():
    torch.manual_seed(0)
    model, x = Model(layerdrop=0.5, p=0.1), torch.randn(4, 8)
    gated = fxsd.stochastic_depth(model, example_inputs=(x,), seed=0)
    paths, layered = _gates(gated)
    assert len(paths) == len(layered) == LAYERS
    # one rule: the own drop's rate, weight = rate / model-wide rate (the largest own rate),
    # its mode and scaling, the note "adopted <label>"
    assert fxsd.get_drop_rate(gated) == 0.5
    for gate in paths:
        assert (gate.drop_rate, gate.rate_weight) == (0.1, pytest.approx(0.1 / 0.5))
        assert (gate.mode, gate.scale, gate.note) == ("sample", "train", "adopted DropPath(p=0.1)")
        assert gate.drop_path is DropPathAction.ADOPTED
    for gate in layered:
        assert (gate.drop_rate, gate.rate_weight) == (0.5, 1.0)
        assert (gate.mode, gate.scale, gate.note) == ("block", "none", "adopted layer drop (p=0.5)")
        assert gate.drop_path is None  # no op in the branch to take out
    # the rewrite applied both: the drop-path ops are gone, the model's own loop is off
    assert not [m for m in called_modules(gated) if isinstance(m, DropPath)]
    assert gated.encoder.layerdrop == 0.0 and model.encoder.layerdrop == 0.5
    torch.testing.assert_close(gated.eval()(x), model.eval()(x), rtol=0, atol=0)


def test_under_an_explicit_rate_both_kinds_say_replaced_and_keep_their_kind_of_dropping():
    torch.manual_seed(0)
    model, x = Model(layerdrop=0.5, p=0.1), torch.randn(4, 8)
    gated = fxsd.stochastic_depth(model, 0.2, distribution="uniform", example_inputs=(x,),
                                  seed=0)
    paths, layered = _gates(gated)
    assert [g.drop_rate for g in paths + layered] == [0.2] * (2 * LAYERS)
    assert {(g.mode, g.scale, g.note) for g in paths} == {
        ("sample", "train", "adopted DropPath(p=0.1), rate replaced")}
    # before issue 26 a layer drop said "layer drop (p=0.5) replaced" and fell back to "train"
    assert {(g.mode, g.scale, g.note) for g in layered} == {
        ("block", "none", "adopted layer drop (p=0.5), rate replaced")}
    given = fxsd.stochastic_depth(model, 0.2, scale="eval", mode="block", example_inputs=(x,))
    assert {(g.mode, g.scale) for g in fxsd.gates(given)} == {("block", "eval")}
    assert gated.encoder.layerdrop == 0.0 and given.encoder.layerdrop == 0.0
    torch.testing.assert_close(gated.eval()(x), model.eval()(x), rtol=0, atol=0)


@pytest.mark.parametrize("existing, switch_off", [("adopt", True), ("replace", True),
                                                   ("keep", False)])
def test_the_plan_decides_the_layer_drops_and_the_rewrite_applies_it(existing, switch_off):
    torch.manual_seed(0)
    model, x = Model(own_join=True), torch.randn(4, 8)
    options = Options.validated(existing=existing)
    analysis = analyze_residuals(model, (x,))
    (settled,) = plan_gates(analysis, options, find_layer_drops(model)).layer_drops
    assert (settled.drop.path, settled.gated, settled.switch_off) == ("encoder", True, switch_off)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gated = fxsd.stochastic_depth(model, existing=existing, example_inputs=(x,), seed=0)
    assert "encoder" in fxsd.record.get_record(gated).rewritten  # its loop is fxsd's code now
    assert gated.encoder.layerdrop == (0.0 if switch_off else 0.5)
    said = [w for w in caught if issubclass(w.category, LayerDropWarning)]
    if switch_off:
        assert not said
    else:  # kept, but the rewrite removed the loop: said so, at the caller's line
        (warning,) = said
        assert "existing='keep' leaves its layers' joins at fxsd's rates" in str(warning.message)
        assert warning.filename == __file__
    assert model.encoder.layerdrop == 0.5
    torch.testing.assert_close(gated.eval()(x), model.eval()(x), rtol=0, atol=0)
