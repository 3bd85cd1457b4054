"""A model's own random control flow is never baked into a trace (issue 24, item 4).

torchaudio's wav2vec2 ``Transformer.forward`` skips layers with ``if not (self.training and
torch.rand(1).item() <= self.layer_drop)`` and owns a join (the positional convolution's add).
Traced, the draw ran once and its outcome was fixed: the gated model ran every layer. fxsd now
keeps a module whose own code draws whole and gates inside its children; where the root itself
draws, it raises :class:`fxsd.RandomDrawError` naming the module and the line.
"""

from __future__ import annotations

import random
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import fxsd
from fxsd.runtime.accessors import named_gates

D = 8
LAYERS = 3


def _torch_draw() -> float:
    return torch.rand(1).item()


def _python_draw() -> float:
    return random.random()


def _numpy_draw() -> float:
    return float(np.random.rand())


DRAWS = {"torch": _torch_draw, "random": _python_draw, "numpy": _numpy_draw}


class Layer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc(x)


class Encoder(nn.Module):
    """torchaudio's shape: a join of its own, then layers skipped at random in training."""

    def __init__(self, draw: str, layer_drop: float) -> None:
        super().__init__()
        self.pos = nn.Linear(D, D)
        self.layers = nn.ModuleList(Layer() for _ in range(LAYERS))
        self.layer_drop = layer_drop
        self.draw = draw

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.pos(x)
        for layer in self.layers:
            if not (self.training and DRAWS[self.draw]() <= self.layer_drop):
                x = layer(x)
        return x


class Model(nn.Module):
    def __init__(self, draw: str = "torch", layer_drop: float = 0.5) -> None:
        super().__init__()
        self.inp = nn.Linear(D, D)
        self.encoder = Encoder(draw, layer_drop)
        self.head = nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.inp(x)))


class DrawingRoot(nn.Module):
    """The root itself owns a join and skips its layers at random."""

    def __init__(self) -> None:
        super().__init__()
        self.pos = nn.Linear(D, D)
        self.layers = nn.ModuleList(Layer() for _ in range(LAYERS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.pos(x)
        for layer in self.layers:
            if not (self.training and torch.rand(1).item() <= 0.5):  # the line named
                x = layer(x)
        return x


DRAW_LINE = next(i for i, line in enumerate(open(__file__), 1) if "# the line named" in line)


def _seed(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def _counted(model: nn.Module, paths: list[str], steps: int = 40) -> tuple[dict, list]:
    """Calls of the modules at ``paths`` (forward hooks) in ``steps`` training forwards, and
    the outputs, all under one seed of every global generator."""
    counts = dict.fromkeys(paths, 0)

    def hook(path):
        def count(module, args, out):
            counts[path] += 1
        return count

    handles = [model.get_submodule(p).register_forward_hook(hook(p)) for p in paths]
    model.train()
    _seed(1234)
    try:
        outs = [model(torch.randn(2, D)) for _ in range(steps)]
    finally:
        for h in handles:
            h.remove()
    return counts, outs


def _transform(model: nn.Module, rate: float, examples: bool, **kw) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fxsd.stochastic_depth(
            model, rate, seed=0, example_inputs=(torch.randn(2, D),) if examples else None, **kw)


LAYER_PATHS = [f"encoder.layers.{i}" for i in range(LAYERS)]
GATE_PATHS = [f"encoder.layers.{i}.residual_gate" for i in range(LAYERS)]


@pytest.mark.parametrize("examples", [False, True], ids=["symbolic", "examples"])
@pytest.mark.parametrize("rate", [0.0, 0.5])
@pytest.mark.parametrize("draw", list(DRAWS))
def test_layer_drop_keeps_running_and_layers_are_gated(draw, rate, examples):
    torch.manual_seed(0)
    model = Model(draw)  # in training mode, as a model is built
    gated = _transform(model, rate, examples)
    assert sorted(named_gates(gated)) == GATE_PATHS  # the layers' own joins, not the encoder's
    plain, plain_outs = _counted(model, LAYER_PATHS)
    both, outs = _counted(gated, LAYER_PATHS + GATE_PATHS)
    # the model's draws are the same sequence (fxsd draws from its own generators): each
    # layer runs exactly when it runs in the plain model; 40 forwards at 0.5 skip some
    assert {p: both[p] for p in LAYER_PATHS} == plain, (plain, both)
    assert all(0 < plain[p] < 40 for p in LAYER_PATHS), plain
    assert all(both[g] == both[p] for g, p in zip(GATE_PATHS, LAYER_PATHS)), both
    if rate == 0.0:  # nothing dropped by fxsd: training outputs are the plain model's
        assert all(torch.equal(a, b) for a, b in zip(outs, plain_outs))
    model.eval()
    gated.eval()
    x = torch.randn(4, D)
    assert torch.equal(gated(x), model(x))


def test_layer_drop_of_zero_keeps_the_draw_sequence():
    # the model's rate is 0: its draws decide nothing, but they still advance torch's
    # generator; a baked trace would not, and every later draw would differ
    torch.manual_seed(0)
    model = Model("torch", layer_drop=0.0)
    model.inp.register_forward_hook(lambda m, a, out: out + 0.1 * torch.randn_like(out))
    gated = _transform(model, 0.0, examples=False)
    (plain, plain_outs), (counts, outs) = (_counted(model, LAYER_PATHS),
                                           _counted(gated, LAYER_PATHS))
    assert plain == counts == dict.fromkeys(LAYER_PATHS, 40)
    assert all(torch.equal(a, b) for a, b in zip(outs, plain_outs))


@pytest.mark.parametrize("draw", list(DRAWS))
def test_the_kept_module_is_listed_with_the_line_of_its_draw(draw):
    torch.manual_seed(0)
    model = Model(draw)
    gated = _transform(model, 0.1, examples=False)
    record = fxsd.get_record(gated)
    assert "encoder" not in record.rewritten
    (path, cls, why), = record.untraced
    assert (path, cls) == ("encoder", "Encoder")
    line = next(i for i, text in enumerate(open(__file__), 1)
                if f"def {DRAWS[draw].__name__}(" in text) + 1  # the line of the draw
    assert f"{__file__}:{line}" in why, why
    table = fxsd.table(gated)
    assert "encoder" in table and "Encoder" in table and "draws a random number" in table


def test_trace_keeps_the_drawing_module_a_leaf():
    model = Model("torch")
    gm = fxsd.tracing.tracer.trace(model)
    calls = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert calls == ["inp", "encoder", "head"]
    assert [u[0] for u in fxsd.get_record(gm).untraced] == ["encoder"]
    counts, _ = _counted(gm, LAYER_PATHS)
    plain, _ = _counted(model, LAYER_PATHS)
    assert counts == plain


def test_tracing_by_example_keeps_it_too():
    torch.manual_seed(0)
    model = Model("numpy")
    gated = _transform(model, 0.0, examples=True, tracing="example")
    assert sorted(named_gates(gated)) == GATE_PATHS
    assert _counted(gated, LAYER_PATHS)[0] == _counted(model, LAYER_PATHS)[0]


@pytest.mark.parametrize("tracing", ["auto", "example"])
def test_layers_the_example_run_skipped_are_gated_and_the_rate_stays_live(tracing):
    # at layer_drop=1 the training-mode example run calls no layer: fxsd records them from a
    # run in eval mode. The encoder's code stays the model's: its rate is read at run time
    torch.manual_seed(0)
    model = Model("torch", layer_drop=1.0)
    gated = _transform(model, 0.0, examples=True, tracing=tracing)
    assert sorted(named_gates(gated)) == GATE_PATHS
    assert _counted(gated, LAYER_PATHS)[0] == dict.fromkeys(LAYER_PATHS, 0)
    gated.encoder.layer_drop = 0.0
    counts, _ = _counted(gated, LAYER_PATHS + GATE_PATHS, steps=5)
    assert counts == dict.fromkeys(LAYER_PATHS + GATE_PATHS, 5)
    x = torch.randn(4, D)
    assert torch.equal(gated.eval()(x), model.eval()(x))


def test_a_draw_spelt_past_the_module_functions_is_found_by_the_generator_state():
    from random import random as draw  # not ``random.random``: fxsd's patch cannot see it

    class Hidden(Encoder):
        def forward(self, x):
            x = x + self.pos(x)
            for layer in self.layers:
                if not (self.training and draw() <= self.layer_drop):
                    x = layer(x)
            return x

    torch.manual_seed(0)
    model = Model()
    model.encoder = Hidden("random", 0.5)
    gated = _transform(model, 0.0, examples=False)
    assert sorted(named_gates(gated)) == GATE_PATHS
    assert [u[0] for u in fxsd.get_record(gated).untraced] == ["encoder"]
    assert _counted(gated, LAYER_PATHS)[0] == _counted(model, LAYER_PATHS)[0]


def test_a_drawing_root_raises_naming_the_module_and_the_line():
    model = DrawingRoot()
    with pytest.raises(fxsd.RandomDrawError) as info:
        _transform(model, 0.1, examples=False)
    error = info.value
    assert isinstance(error, fxsd.TraceError)
    assert (error.module_path, error.module_type) == ("", "DrawingRoot")
    assert error.location == f"{__file__}:{DRAW_LINE}" and error.source == "torch.rand"
    assert f"{__file__}:{DRAW_LINE}" in str(error) and "DrawingRoot" in str(error)
    assert "leaf_modules=" in str(error)


def test_a_drawing_root_with_examples_keeps_its_code_and_gates_its_layers():
    torch.manual_seed(0)
    model = DrawingRoot()
    gated = _transform(model, 0.0, examples=True)
    paths = [f"layers.{i}" for i in range(LAYERS)]
    assert sorted(named_gates(gated)) == [f"{p}.residual_gate" for p in paths]
    assert fxsd.get_record(gated).untraced[0][:2] == ("<root>", "DrawingRoot")
    assert _counted(gated, paths)[0] == _counted(model, paths)[0]


def test_dropout_on_traced_values_is_not_a_draw():
    # random ops on proxies are traced into the graph: nothing is kept whole
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(D, D)

        def forward(self, x):
            noise = torch.rand_like(x)
            return x + nn.functional.dropout(self.fc(x), 0.1, self.training) * (noise > -1)

    model = nn.Sequential(Block(), Block()).train()
    gated = _transform(model, 0.1, examples=True)
    assert len(named_gates(gated)) == 2
    assert fxsd.get_record(gated).untraced == ()
