"""fxsd.check and the verification fxsd.stochastic_depth runs by default: the transform checks
its promises on the user's own model, and a fault planted in the result fails loudly."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

import fxsd
from fxsd.checks import CheckKind, VerificationError
from fxsd.runtime.gate import BranchGate
from fxsd.tools.check import _Snapshot


class Block(nn.Module):
    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.bn(self.conv(x)))


class Aliased(nn.Module):
    """One block registered at two paths; forward goes through the second (monai's DynUNet)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.first = Block()
        self.path = nn.ModuleList([self.first])
        self.last = Block()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(self.path[0](self.stem(x))).mean((2, 3))


def _x() -> tuple[torch.Tensor]:
    return (torch.randn(2, 3, 16, 16),)


def _failed(report: fxsd.tools.check.CheckReport) -> dict[CheckKind, str]:
    return {r.kind: r.at for r in report.results if r.ok is False}


def test_resnet50_passes_every_promise():
    torch.manual_seed(0)
    report = fxsd.check(torchvision.models.resnet50(), (torch.randn(2, 3, 64, 64),),
                        drop_rate=0.3)
    assert report.ok, report.table(width=0)
    assert [r.kind for r in report.results] == list(CheckKind)
    assert all(r.ok for r in report.results), report.table(width=0)
    assert len(fxsd.gates(report.gated)) == 16


def test_tiny_llama_passes_every_promise():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4)
    ids = torch.randint(0, 128, (2, 12))
    report = fxsd.check(transformers.LlamaForCausalLM(config),
                        example_kwargs={"input_ids": ids, "labels": ids}, drop_rate=0.2)
    assert report.ok, report.table(width=0)
    assert len(fxsd.gates(report.gated)) == 4


def _planted_scale(monkeypatch: pytest.MonkeyPatch, depth: int = 2) -> None:
    """A fault in the gate: in eval, the gate at ``depth`` scales what it returns."""
    forward = BranchGate.forward

    def wrong(self: BranchGate, *args):
        out = forward(self, *args)
        return out * 1.5 if not self.training and self.info.depth == depth else out

    monkeypatch.setattr(BranchGate, "forward", wrong)


def test_a_wrongly_scaled_gate_fails_the_eval_promise_naming_its_block(monkeypatch):
    _planted_scale(monkeypatch)
    model = torchvision.models.resnet18()
    report = fxsd.check(model, (torch.randn(2, 3, 32, 32),))
    assert not report.ok
    failed = _failed(report)
    assert failed == {CheckKind.EVAL_OUTPUT: "layer1.1"}, report.table(width=0)
    assert "FAILED" in report.table(width=0)
    # the default verification of the transform catches it too, naming the same block
    with pytest.raises(VerificationError, match="layer1.1") as info:
        fxsd.stochastic_depth(model, example_inputs=(torch.randn(2, 3, 32, 32),))
    assert info.value.kind is CheckKind.EVAL_OUTPUT and info.value.module_path == "layer1.1"
    assert isinstance(info.value, fxsd.FxsdError)
    gated = fxsd.stochastic_depth(model, example_inputs=(torch.randn(2, 3, 32, 32),),
                                  verify=False)
    assert len(fxsd.gates(gated)) == 8


def test_a_block_gated_on_one_of_its_paths_fails_the_reached_promise():
    model = Aliased()
    gated = fxsd.stochastic_depth(model, 0.5, example_inputs=_x())
    assert gated.first is gated.path[0]  # aliases stay aliases
    assert fxsd.check(model, _x(), gated=gated).ok
    planted = copy.deepcopy(gated)
    planted.path[0] = copy.deepcopy(model.first)  # the plain block back on the path it runs
    report = fxsd.check(model, _x(), gated=planted)
    assert _failed(report) == {CheckKind.GATES_REACHED: "first.residual_gate"}, \
        report.table(width=0)
    with pytest.raises(VerificationError, match="first.residual_gate' is never called"):
        fxsd.checks.verify_transform(model, planted, _x(), None)


def test_depth_order_failure_names_the_gate():
    model = nn.Sequential(nn.Conv2d(3, 8, 1), Block(), Block(), nn.Flatten())
    gated = fxsd.stochastic_depth(model, 0.5, example_inputs=_x())
    first, second = fxsd.gates(gated)
    assert (first.info.depth, second.info.depth) == (1, 2)
    assert fxsd.check(model, _x(), gated=gated).ok
    first.info = type(first.info)(**{**first.info.__dict__, "depth": 3})
    report = fxsd.check(model, _x(), gated=gated)
    assert _failed(report) == {CheckKind.DEPTH_ORDER: "2.residual_gate"}, report.table(width=0)


def test_the_original_untouched_promise_sees_a_changed_attribute_and_buffer():
    model = nn.Sequential(nn.Conv2d(3, 8, 1), Block())
    snap = _Snapshot(model)
    assert snap.compare(model).ok
    model[1].bn.running_mean += 1
    assert snap.compare(model).at == "1.bn.running_mean"
    snap = _Snapshot(model)
    model[1].extra = 1
    assert snap.compare(model).at == "1"
    snap = _Snapshot(model)
    model[1]._forward_hooks[0] = print
    assert snap.compare(model).at == "1"


def test_check_needs_examples_and_reports_a_failed_transform():
    with pytest.raises(fxsd.InvalidArgumentError, match="example_inputs"):
        fxsd.check(torchvision.models.resnet18())
    report = fxsd.check(torchvision.models.resnet18(), (torch.randn(2, 3, 32, 32),),
                        drop_rate=2.0)
    assert not report.ok and report.gated is None
    assert report.result(CheckKind.TRANSFORM).ok is False
    assert report.result(CheckKind.ORIGINAL_UNTOUCHED).ok


def test_cli_check_passes_and_fails_with_a_table(monkeypatch, capsys):
    from fxsd.tools.cli import main

    assert main(["check", "resnet18", "--input-shape", "2,3,32,32"]) == 0
    out = capsys.readouterr().out
    assert "every promise holds" in out and "FAILED" not in out
    _planted_scale(monkeypatch)
    assert main(["check", "resnet18", "--input-shape", "2,3,32,32", "--wide"]) == 1
    out = capsys.readouterr().out
    assert "eval output" in out and "FAILED" in out and "layer1.1" in out


def aliased() -> nn.Module:
    """``fxsd check tests.test_check:aliased``: the model of the aliasing test."""
    torch.manual_seed(0)
    return Aliased()


def test_cli_check_fails_on_a_block_gated_on_one_of_its_paths(monkeypatch, capsys):
    from fxsd import transform as pass_module
    from fxsd.tools.cli import main

    assert main(["check", "tests.test_check:aliased", "--input-shape", "2,3,16,16"]) == 0
    capsys.readouterr()
    rewrite = pass_module.gate_residuals

    def one_path_only(analysis, plan, sampler, model, **kwargs):  # the fault fixed in #24
        gated = rewrite(analysis, plan, sampler, model, **kwargs)
        gated.path[0] = copy.deepcopy(model.first)
        return gated

    monkeypatch.setattr(pass_module, "gate_residuals", one_path_only)
    assert main(["check", "tests.test_check:aliased", "--input-shape", "2,3,16,16",
                 "--wide"]) == 1
    out = capsys.readouterr().out
    assert "gates reached" in out and "FAILED" in out and "first.residual_gate" in out
