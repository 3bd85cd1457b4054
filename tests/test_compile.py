"""torch.compile with live decisions (``fxsd.compile``) and gate-free export (``fxsd.strip``)."""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch
import torch._dynamo
import torchvision
from conftest import grads
from torch._dynamo.utils import counters
from torchvision.models.vision_transformer import VisionTransformer

import fxsd

pytestmark = pytest.mark.filterwarnings("ignore::fxsd.errors.EvalScaledWeightsWarning")
BACKEND = "aot_eager"  # dynamo + AOT autograd, without inductor's C++ build time on CI


def small_vit() -> VisionTransformer:
    return VisionTransformer(image_size=32, patch_size=8, num_layers=3, num_heads=2,
                             hidden_dim=32, mlp_dim=64, num_classes=10)


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


def _step(model, x):
    out = model(x)
    out.float().pow(2).mean().backward()
    return out.detach()


CASES = {
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=10),
                 lambda: torch.randn(4, 3, 32, 32)),
    "small_vit": (small_vit, lambda: torch.randn(4, 3, 32, 32)),
}


@pytest.mark.parametrize("name", CASES)
def test_compiled_matches_eager_with_live_randomness_and_bounded_compiles(name):
    build, make_x = CASES[name]
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = build()
    eager = fxsd.stochastic_depth(model, 0.5, distribution="uniform", seed=5).train()
    traced = fxsd.stochastic_depth(model, 0.5, distribution="uniform", seed=5).train()
    compiled = fxsd.compile(traced, backend=BACKEND)
    n_gates = len(fxsd.gates(eager))
    x = make_x()
    decisions = []
    graphs_after = {}
    for step in range(20):
        model.zero_grad(set_to_none=True)
        ref = _step(eager, x)
        ref_grads = grads(model)
        model.zero_grad(set_to_none=True)
        out = _step(compiled, x)
        got = grads(model)
        eager_dec = [g.dropped for g in fxsd.gates(eager)]
        comp_dec = [g.dropped for g in fxsd.gates(traced)]
        assert eager_dec == comp_dec, f"step {step}: decisions differ"
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
        assert got.keys() == ref_grads.keys(), f"step {step}: different parameters got grads"
        for k in got:
            torch.testing.assert_close(got[k], ref_grads[k], rtol=1e-3, atol=1e-5, msg=k)
        decisions.append(tuple(comp_dec))
        graphs_after[step] = _graphs()
    # Decisions stay random under compile (not frozen at trace time).
    dropped = sum(sum(bool(d) for d in step) for step in decisions)
    n = 20 * n_gates
    assert abs(dropped - n / 2) <= 4 * math.sqrt(n / 4), (dropped, n)
    assert len(set(decisions)) > 5
    # Compilations: one graph per branch at most (the trunk stays eager).
    assert graphs_after[19] <= n_gates, graphs_after[19]
    fxsd.set_drop_rate(traced, 0.2)  # warmup-style rate change: no recompilation
    for _ in range(5):
        _step(compiled, x)
    assert _graphs() == graphs_after[19]
    # Eval compiles once more (train/eval) and matches the eager gated model.
    fxsd.set_drop_rate(eager, 0.2)
    compiled.eval(), eager.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), eager(x), rtol=1e-4, atol=1e-5)
    assert _graphs() <= 2 * graphs_after[19]


def test_plain_torch_compile_keeps_decisions_live():
    torch._dynamo.reset()
    counters.clear()
    gm = fxsd.stochastic_depth(torchvision.models.resnet18(), 0.5, distribution="uniform",
                               seed=1).train()
    compiled = torch.compile(gm, backend=BACKEND)
    x = torch.randn(2, 3, 32, 32)
    decisions = set()
    for _ in range(10):
        _step(compiled, x)
        decisions.add(tuple(g.dropped for g in fxsd.gates(gm)))
    assert len(decisions) > 3
    # Bounded: the trunk splits at each gate (a graph before it, one resuming in its block).
    assert _graphs() <= 2 * len(fxsd.gates(gm)) + 1


def test_channels_last_stays_channels_last_through_compiled_branches():
    # The layout docs/api.md recommends for conv nets: every gate (eager trunk) must see
    # channels-last activations, i.e. the compiled branches hand that layout back, and the
    # numerics must match the eager gated model.
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).to(memory_format=torch.channels_last)
    kw = dict(distribution="uniform", seed=3, scale="eval")  # outputs of the plain model's size
    eager = fxsd.stochastic_depth(model, 0.5, **kw).train()
    gated = fxsd.stochastic_depth(model, 0.5, **kw).train()
    compiled = fxsd.compile(gated, backend=BACKEND)
    layouts = []
    for gate in fxsd.gates(gated):
        gate.register_forward_pre_hook(lambda g, args: layouts.append(
            args[0].is_contiguous(memory_format=torch.channels_last)))
    x = torch.randn(4, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    for _ in range(3):
        model.zero_grad(set_to_none=True)
        ref = _step(eager, x)
        ref_grads = grads(model)
        model.zero_grad(set_to_none=True)
        out = _step(compiled, x)
        got = grads(model)
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
        assert got.keys() == ref_grads.keys()
        for k in got:
            torch.testing.assert_close(got[k], ref_grads[k], rtol=1e-3, atol=1e-5, msg=k)
    assert len(layouts) == 3 * len(fxsd.gates(gated)) and all(layouts)


def test_compiled_branches_are_not_copied_or_pickled():
    gm = fxsd.stochastic_depth(torchvision.models.resnet18(), 0.2)
    fxsd.compile(gm, backend=BACKEND)
    assert all("compiled_branch" in g.__dict__ for g in fxsd.gates(gm))
    clone = copy.deepcopy(gm)
    assert not any("compiled_branch" in g.__dict__ for g in fxsd.gates(clone))
    loaded = pickle.loads(pickle.dumps(gm))
    assert not any("compiled_branch" in g.__dict__ for g in fxsd.gates(loaded))


# -- strip + export --------------------------------------------------------------------------


def _code(model: torch.nn.Module) -> str:
    """The generated code of every GraphModule in ``model``."""
    return "\n".join(m.code for m in model.modules() if isinstance(m, torch.fx.GraphModule))


STRIP_CASES = {
    "resnet50": (lambda: torchvision.models.resnet50(), dict(drop_rate=0.3)),
    "vit_b_16": (lambda: torchvision.models.vit_b_16(image_size=32), dict(drop_rate=0.3)),
    # ConvNeXt's own drop paths replaced by fxsd's eval-scaled schedule: alpha != 1 everywhere.
    "convnext_tiny": (lambda: torchvision.models.convnext_tiny(stochastic_depth_prob=0.2),
                      dict(drop_rate=0.3, existing="replace")),
}


@pytest.mark.parametrize("name", STRIP_CASES)
def test_strip_equals_gated_eval_and_exports(name):
    build, kwargs = STRIP_CASES[name]
    torch.manual_seed(0)
    model = build()
    gm = fxsd.stochastic_depth(model, scale="eval", **kwargs).eval()
    plain = fxsd.strip(gm)
    assert not fxsd.gates(plain)
    assert not any(isinstance(m, fxsd.runtime.gate.BranchGate) for m in plain.modules())
    assert list(plain.state_dict()) == list(model.state_dict())
    assert type(plain) is type(model)
    code = _code(plain)  # the eval scale: in the add's alpha, or on a branch written first
    assert "alpha = 0." in code or " * 0." in code
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = gm(x)
        torch.testing.assert_close(plain(x), expected, rtol=1e-5, atol=1e-5)
        ep = torch.export.export(plain, (x,))
        torch.testing.assert_close(ep.module()(x), expected, rtol=1e-5, atol=1e-5)


def test_strip_fold_scale_into_weights():
    torch.manual_seed(0)
    model = torchvision.models.resnet50()
    gm = fxsd.stochastic_depth(model, 0.3, scale="eval").eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded = fxsd.strip(gm, fold_scale=True)
    assert "alpha" not in _code(folded)  # every bn3 took its branch's factor
    assert list(folded.state_dict()) == list(model.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), gm(x), rtol=1e-4, atol=1e-4)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    keep = 1 - 0.3 * 16 / 16
    torch.testing.assert_close(folded.layer4[2].bn3.weight, model.layer4[2].bn3.weight * keep)
