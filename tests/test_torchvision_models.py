"""fxsd on torchvision's model zoo (random weights, nothing is downloaded).

For every model the expected residual sites are counted from the model's own definition (its
block modules and their residual flags, see ``torchvision/models/*.py``), never from fxsd. Then,
for the residual models:

* eval at drop rate 0 reproduces the model;
* training with every branch dropped never runs a branch module, and its parameters get no
  gradient;
* training with no branch dropped reproduces the model's output and every gradient;
* eval at drop rate 0.3 (linear) matches an independent reference built with forward hooks on the
  untransformed model (ResNet-50, ViT-B/16).

The no-residual models must warn :class:`fxsd.errors.NoResidualSitesWarning` and come back
unchanged.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import pytest
import torch
import torchvision.models as tvm
from conftest import gated_blocks
from torch import nn
from torchvision.models import (
    convnext,
    efficientnet,
    maxvit,
    mnasnet,
    mobilenetv2,
    mobilenetv3,
    regnet,
    resnet,
    swin_transformer,
    vision_transformer,
)

import fxsd
from fxsd.runtime.accessors import named_gates

# --------------------------------------------------------------------------------------------
# Expected residual joins, from each model's definition.
#
# A rule yields ``(module path, number of residual adds that module's forward performs)``.
# --------------------------------------------------------------------------------------------

Rule = Callable[[nn.Module], Iterator[tuple[str, int]]]


def _blocks(*types: type, per_block: int = 1, flag: str | None = None) -> Rule:
    """Every module of ``types`` (whose ``flag`` attribute is true, if given) adds ``per_block``."""

    def rule(model: nn.Module) -> Iterator[tuple[str, int]]:
        for path, m in model.named_modules():
            if isinstance(m, types) and (flag is None or getattr(m, flag)):
                yield path, per_block

    return rule


def _maxvit_rule(model: nn.Module) -> Iterator[tuple[str, int]]:
    """Each ``MaxVitLayer`` = MBConv (``proj(x) + layers(x)``, always) + window and grid
    ``PartitionAttentionLayer`` (``x + attn(x)`` then ``x + mlp(x)``: two adds each)."""
    for path, layer in model.named_modules():
        if not isinstance(layer, maxvit.MaxVitLayer):
            continue
        kinds = [type(m) for m in layer.layers.children()]
        assert kinds == [maxvit.MBConv, maxvit.PartitionAttentionLayer,
                         maxvit.PartitionAttentionLayer], f"unexpected MaxVitLayer {path}: {kinds}"
        for name, m in layer.layers.named_children():
            yield f"{path}.layers.{name}", 1 if isinstance(m, maxvit.MBConv) else 2


def _no_residual(model: nn.Module) -> Iterator[tuple[str, int]]:
    return iter(())


_INVERTED_RESIDUALS = (mobilenetv2.InvertedResidual, mobilenetv3.InvertedResidual)


@dataclass(frozen=True)
class Spec:
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    rule: Rule


CNN = (2, 3, 64, 64)

SPECS: dict[str, Spec] = {
    # BasicBlock / Bottleneck: ``out += identity`` in every block.
    "resnet18": Spec(lambda: tvm.resnet18(weights=None), CNN,
                     _blocks(resnet.BasicBlock, resnet.Bottleneck)),
    "resnet50": Spec(lambda: tvm.resnet50(weights=None), CNN,
                     _blocks(resnet.BasicBlock, resnet.Bottleneck)),
    "resnet152": Spec(lambda: tvm.resnet152(weights=None), CNN,
                      _blocks(resnet.BasicBlock, resnet.Bottleneck)),
    "resnext50_32x4d": Spec(lambda: tvm.resnext50_32x4d(weights=None), CNN,
                            _blocks(resnet.BasicBlock, resnet.Bottleneck)),
    "wide_resnet50_2": Spec(lambda: tvm.wide_resnet50_2(weights=None), CNN,
                            _blocks(resnet.BasicBlock, resnet.Bottleneck)),
    # ResBottleneckBlock: ``proj(x) + f(x)`` or ``x + f(x)``, always an add.
    "regnet_y_400mf": Spec(lambda: tvm.regnet_y_400mf(weights=None), CNN,
                           _blocks(regnet.ResBottleneckBlock)),
    # InvertedResidual: ``x + conv(x)`` / ``result += input`` only when use_res_connect.
    "mobilenet_v2": Spec(lambda: tvm.mobilenet_v2(weights=None), CNN,
                         _blocks(*_INVERTED_RESIDUALS, flag="use_res_connect")),
    "mobilenet_v3_small": Spec(lambda: tvm.mobilenet_v3_small(weights=None), CNN,
                               _blocks(*_INVERTED_RESIDUALS, flag="use_res_connect")),
    # MBConv / FusedMBConv: ``result += input`` only when use_res_connect.
    "efficientnet_b0": Spec(lambda: tvm.efficientnet_b0(weights=None), CNN,
                            _blocks(efficientnet.MBConv, efficientnet.FusedMBConv,
                                    flag="use_res_connect")),
    # _InvertedResidual: ``layers(input) + input`` only when apply_residual.
    "mnasnet1_0": Spec(lambda: tvm.mnasnet1_0(weights=None), CNN,
                       _blocks(mnasnet._InvertedResidual, flag="apply_residual")),
    # CNBlock: ``result += input`` in every block.
    "convnext_tiny": Spec(lambda: tvm.convnext_tiny(weights=None), CNN,
                          _blocks(convnext.CNBlock)),
    # EncoderBlock: ``x = x + input`` (attention) then ``x + y`` (MLP).
    "vit_b_16": Spec(lambda: tvm.vit_b_16(weights=None, image_size=32), (2, 3, 32, 32),
                     _blocks(vision_transformer.EncoderBlock, per_block=2)),
    # SwinTransformerBlock: ``x + sd(attn(norm1(x)))`` then ``x + sd(mlp(norm2(x)))``.
    "swin_t": Spec(lambda: tvm.swin_t(weights=None), CNN,
                   _blocks(swin_transformer.SwinTransformerBlock, per_block=2)),
    # partition_size is fixed at 7 and there are 5 halvings: 224 is the smallest input.
    "maxvit_t": Spec(lambda: tvm.maxvit_t(weights=None), (1, 3, 224, 224), _maxvit_rule),
    # No residual joins: concatenations (DenseNet, GoogLeNet, SqueezeNet, ShuffleNet) or plain.
    "densenet121": Spec(lambda: tvm.densenet121(weights=None), CNN, _no_residual),
    "vgg11": Spec(lambda: tvm.vgg11(weights=None), CNN, _no_residual),
    "googlenet": Spec(lambda: tvm.googlenet(weights=None, aux_logits=False, init_weights=False),
                      CNN, _no_residual),
    "squeezenet1_0": Spec(lambda: tvm.squeezenet1_0(weights=None), CNN, _no_residual),
    "shufflenet_v2_x1_0": Spec(lambda: tvm.shufflenet_v2_x1_0(weights=None), CNN, _no_residual),
}

NO_RESIDUAL = ["densenet121", "vgg11", "googlenet", "squeezenet1_0", "shufflenet_v2_x1_0"]
RESIDUAL = [name for name in SPECS if name not in NO_RESIDUAL]


def _params(names: list[str]) -> list:
    return [pytest.param(name, id=name) for name in names]


# --------------------------------------------------------------------------------------------
# Models, inputs and helpers
# --------------------------------------------------------------------------------------------


@functools.cache
def _model(name: str) -> nn.Module:
    """The model, built once (per run of this module) with fixed random weights.

    Parameters that torchvision initialises to (almost) zero are randomised, so that no branch or
    head is a no-op: ViT's zero head would make every output 0 and ConvNeXt's 1e-6 layer scale
    would hide its branches.
    """
    torch.manual_seed(0)
    model = SPECS[name].build()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().max() < 1e-3:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


@pytest.fixture(scope="module", autouse=True)
def _free_models() -> Iterator[None]:
    """Release the cached models (a few GB) once this module's tests are done."""
    yield
    _model.cache_clear()


def _input(name: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(2)
    return torch.randn(SPECS[name].input_shape, generator=gen)


def _expected(name: str) -> Counter[str]:
    """``module path -> number of residual adds`` from the model's definition."""
    expected: Counter[str] = Counter()
    for path, n in SPECS[name].rule(_model(name)):
        expected[path] += n
    return expected


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def _eval_out(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    m.eval()
    with torch.no_grad():
        return m(x)


def _loss_weights(out: torch.Tensor) -> torch.Tensor:
    return torch.randn(out.shape, generator=torch.Generator().manual_seed(3))


def _train_step(
    m: nn.Module, model: nn.Module, x: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
    """One training forward + backward of ``m``; gradients read from ``model``'s parameters
    (the two share them). Torch is re-seeded so built-in drop-path modules draw the same."""
    model.zero_grad(set_to_none=True)
    m.train()
    model.train()
    torch.manual_seed(1234)
    out = m(x)
    (out * _loss_weights(out)).sum().backward()
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return out.detach(), grads


def _branch_only(model: nn.Module) -> tuple[dict[str, nn.Module], dict[str, nn.Parameter]]:
    """Modules and parameters that only gated branches use.

    Branch modules are the ``call_module`` targets of every gate's ``.branch`` graph, minus
    modules a gated block's own graph also calls (torchvision ResNet calls one ``relu`` in the
    branch and after the add). Branch parameters are theirs, plus the parameters a block reads
    with ``get_attr`` only to pass them to its gates (ConvNeXt's layer scale), minus every
    parameter the blocks' own graphs use otherwise.
    """
    blocks = gated_blocks(model)
    trunk: set[int] = set()
    trunk_params: set[int] = set()
    gate_only_reads: list[tuple[str, nn.Module, str]] = []
    for path, block in blocks.items():
        gate_names = {n for n, c in block.named_children()
                      if isinstance(c, fxsd.runtime.gate.BranchGate)}
        for n in block.graph.nodes:
            target = str(n.target)
            if n.op == "call_module" and target not in gate_names:
                called = block.get_submodule(target)
                trunk.add(id(called))
                if not gated_blocks(called):
                    trunk_params.update(id(p) for p in called.parameters())
            elif n.op == "get_attr":
                if n.users and all(u.op == "call_module" and str(u.target) in gate_names
                                   for u in n.users):
                    gate_only_reads.append((path, block, target))
                else:
                    trunk_params.update(id(p) for p in _get_params(block, target))
    modules: dict[str, nn.Module] = {}
    params: dict[str, nn.Parameter] = {}

    def add_params(prefix: str, named: Iterable[tuple[str, nn.Parameter]]) -> None:
        for pname, p in named:
            if id(p) not in trunk_params:
                params[f"{prefix}.{pname}" if pname else prefix] = p

    for path, block, target in gate_only_reads:
        add_params(f"{path}.{target}", (("", p) for p in _get_params(block, target)))
    for name, gate in named_gates(model).items():
        owner = name.rpartition(".")[0]
        for n in gate.branch.graph.nodes:
            if n.op == "call_module":
                mod = gate.branch.get_submodule(str(n.target))
                if isinstance(mod, fxsd.runtime.gate.BranchGate) or id(mod) in trunk:
                    continue
                qualified = f"{owner}.{n.target}" if owner else str(n.target)
                modules[qualified] = mod
                add_params(qualified, mod.named_parameters())
    return modules, params


def _get_params(gm: nn.Module, target: str) -> list[nn.Parameter]:
    obj = gm
    for atom in target.split("."):
        obj = getattr(obj, atom)
    if isinstance(obj, nn.Parameter):
        return [obj]
    if isinstance(obj, nn.Module):
        return list(obj.parameters())
    return []


class _CallRecorder:
    """Forward hooks recording which of the given modules ran."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.ran: list[str] = []
        self.handles = [m.register_forward_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name: str) -> Callable:
        def hook(module: nn.Module, args: object, output: object) -> None:
            self.ran.append(name)

        return hook

    def __enter__(self) -> _CallRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()


# --------------------------------------------------------------------------------------------
# 1. Site counts
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", _params(list(SPECS)))
def test_site_count_matches_model_definition(name: str) -> None:
    model = _model(name)
    expected = _expected(name)
    if name in RESIDUAL:
        assert expected, f"{name}: the count rule found no residual block (wrong rule?)"
    sites = fxsd.find_residuals(model)
    assert len(sites) == sum(expected.values()), (
        f"{name}: fxsd found {len(sites)} residual sites, the model definition has "
        f"{sum(expected.values())} residual joins; found at "
        f"{[s.module_path for s in sites]}"
    )


@pytest.mark.parametrize("name", _params(RESIDUAL))
def test_sites_are_the_model_blocks(name: str) -> None:
    """Each site is attributed to the block that performs its add, and (all these models being
    one chain of blocks) site ``i`` in execution order has depth ``i``."""
    analysis = fxsd.analyze_residuals(_model(name))
    found = Counter(s.module_path for s in analysis.sites)
    expected = _expected(name)
    assert found == expected, (
        f"{name}: sites per module differ from the definition; "
        f"missing {dict(expected - found)}, unexpected {dict(found - expected)}"
    )
    depths = [s.depth for s in analysis.sites]
    n = len(analysis.sites)
    assert depths == list(range(1, n + 1)), f"{name}: site depths {depths} are not 1..{n}"
    assert analysis.num_levels == n, f"{name}: num_levels {analysis.num_levels} != {n}"


@pytest.mark.parametrize("name", _params(NO_RESIDUAL))
def test_no_residual_model_warns_and_is_unchanged(name: str) -> None:
    model = _model(name)
    analysis = fxsd.analyze_residuals(model)
    assert analysis.sites == [] and analysis.num_levels == 0, (
        f"{name}: expected no site, got {[s.module_path for s in analysis.sites]}"
    )
    with pytest.warns(fxsd.errors.NoResidualSitesWarning):
        gm = fxsd.stochastic_depth(model, 0.5, seed=0)
    assert type(gm) is type(model) and gm is not model, f"{name}: got {type(gm).__name__}"
    assert not named_gates(gm), f"{name}: unexpected gates {list(named_gates(gm))}"
    x = _input(name)
    ref = _eval_out(model, x)
    out = _eval_out(gm, x)
    assert torch.equal(out, ref), f"{name}: eval output differs by {_maxdiff(out, ref):.3g}"


# --------------------------------------------------------------------------------------------
# 2. Residual models: eval at rate 0, everything dropped, nothing dropped
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", _params(RESIDUAL))
# ``existing="keep"`` below: these tests check fxsd's own gates (issue-2 semantics) on models that
# may carry torchvision drop paths; the default, ``"adopt"``, is covered in test_training.py.
def test_eval_at_rate_zero_equals_model(name: str) -> None:
    model = _model(name)
    gm = fxsd.stochastic_depth(model, 0.0, seed=0, existing="keep")
    assert len(fxsd.gates(gm)) == sum(_expected(name).values()), f"{name}: wrong number of gates"
    x = _input(name)
    ref = _eval_out(model, x)
    out = _eval_out(gm, x)
    assert torch.isfinite(ref).all(), f"{name}: reference output is not finite"
    torch.testing.assert_close(
        out, ref, rtol=1e-6, atol=1e-6,
        msg=lambda m: f"{name}: eval output at drop_rate=0 differs from the model's: {m}",
    )


@pytest.mark.parametrize("name", _params(RESIDUAL))
def test_train_all_dropped_runs_no_branch(name: str) -> None:
    model = _model(name)
    gm = fxsd.stochastic_depth(model, 1.0, distribution="uniform", seed=0,
                               existing="keep")
    gates = named_gates(gm)
    assert len(gates) == sum(_expected(name).values()), f"{name}: wrong number of gates"
    assert all(g.drop_rate == 1.0 for g in gates.values()), (
        f"{name}: uniform rate 1.0 gave rates {sorted({g.drop_rate for g in gates.values()})}"
    )
    modules, params = _branch_only(gm)
    assert modules and params, f"{name}: no branch-only module or parameter found"
    x = _input(name)
    model.zero_grad(set_to_none=True)
    gm.train()
    with _CallRecorder(modules) as rec:
        out = gm(x)
        (out * _loss_weights(out)).sum().backward()
    try:
        kept = [n for n, g in gates.items() if g.dropped is not True]
        assert not kept, f"{name}: gates not dropped at drop_rate=1.0: {kept}"
        assert not rec.ran, (
            f"{name}: {len(rec.ran)} branch module calls with every branch dropped, e.g. "
            f"{rec.ran[:5]}"
        )
        with_grad = [n for n, p in params.items() if p.grad is not None]
        assert not with_grad, (
            f"{name}: {len(with_grad)} of {len(params)} branch-only parameters got a gradient "
            f"with every branch dropped, e.g. {with_grad[:5]}"
        )
        assert any(p.grad is not None for p in model.parameters()), (
            f"{name}: backward reached no parameter at all"
        )
    finally:
        model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("name", _params(RESIDUAL))
def test_train_none_dropped_equals_model(name: str) -> None:
    model = _model(name)
    gm = fxsd.stochastic_depth(model, 0.0, seed=0, existing="keep")
    x = _input(name)
    out_ref, grads_ref = _train_step(model, model, x)
    modules, _ = _branch_only(gm)
    with _CallRecorder(modules) as rec:
        out, grads = _train_step(gm, model, x)
    dropped = [n for n, g in named_gates(gm).items() if g.dropped is not False]
    assert not dropped, f"{name}: gates dropped (or did not run) at drop_rate=0: {dropped}"
    # The hooks do fire: every branch module ran (the positive control of the test above).
    assert set(rec.ran) == set(modules), (
        f"{name}: branch modules that did not run: {sorted(set(modules) - set(rec.ran))[:5]}"
    )
    torch.testing.assert_close(
        out, out_ref, rtol=1e-5, atol=1e-6,
        msg=lambda m: f"{name}: training output at drop_rate=0 differs from the model's: {m}",
    )
    assert grads.keys() == grads_ref.keys()
    none_mismatch = [n for n in grads if (grads[n] is None) != (grads_ref[n] is None)]
    assert not none_mismatch, (
        f"{name}: parameters with a gradient in one model but not the other: {none_mismatch[:5]}"
    )
    for pname, g in grads.items():
        if g is None:
            continue
        ref = grads_ref[pname]
        torch.testing.assert_close(
            g, ref, rtol=1e-5, atol=1e-6 * ref.abs().max().item(),
            msg=lambda m, pname=pname: f"{name}: gradient of {pname} differs: {m}",
        )


# --------------------------------------------------------------------------------------------
# 3. Eval at drop rate 0.3 (linear) against hooks on the untransformed model
# --------------------------------------------------------------------------------------------


def _scale_hook(keep: float) -> Callable:
    def hook(module: nn.Module, args: object, output: torch.Tensor) -> torch.Tensor:
        return output * keep

    return hook


def _resnet50_branch_outputs(model: nn.Module) -> list[nn.Module]:
    blocks = [m for m in model.modules() if isinstance(m, resnet.Bottleneck)]
    assert len(blocks) == 16
    return [b.bn3 for b in blocks]


def _vit_branch_outputs(model: nn.Module) -> list[nn.Module]:
    blocks = [m for m in model.modules() if isinstance(m, vision_transformer.EncoderBlock)]
    assert len(blocks) == 12
    return [m for b in blocks for m in (b.dropout, b.mlp)]


@pytest.mark.parametrize(
    ("name", "branch_outputs"),
    [
        pytest.param("resnet50", _resnet50_branch_outputs, id="resnet50"),
        pytest.param("vit_b_16", _vit_branch_outputs, id="vit_b_16"),
    ],
)
def test_eval_linear_rate_matches_hooked_reference(
    name: str, branch_outputs: Callable[[nn.Module], list[nn.Module]]
) -> None:
    rate = 0.3
    model = _model(name)
    x = _input(name)
    gm = fxsd.stochastic_depth(model, rate, distribution="linear", seed=0, scale="eval")
    model.eval()
    out = _eval_out(gm, x)
    outputs = branch_outputs(model)
    num_levels = len(outputs)
    handles = [m.register_forward_hook(_scale_hook(1 - rate * level / num_levels))
               for level, m in enumerate(outputs, start=1)]
    try:
        ref = _eval_out(model, x)
    finally:
        for h in handles:
            h.remove()
    plain = _eval_out(model, x)
    assert not torch.allclose(ref, plain, rtol=1e-3, atol=1e-3), (
        f"{name}: the hooked reference equals the plain model: the test would prove nothing"
    )
    torch.testing.assert_close(
        out, ref, rtol=1e-5, atol=1e-5,
        msg=lambda m: f"{name}: eval at drop_rate={rate} (linear) differs from the reference "
                      f"that scales branch l by 1 - {rate}*l/{num_levels}: {m}",
    )
