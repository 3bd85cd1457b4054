"""``target_saving=`` and :func:`fxsd.expected_saving`: the saving fxsd promises is the saving
``torch.utils.flop_counter`` counts over real training steps of the gated model."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch.utils.flop_counter import FlopCounterMode

import fxsd
from fxsd.decisions.budget import saving_at, site_savings
from fxsd.record import get_record
from fxsd.runtime.accessors import named_gates
from fxsd.tools.cli import main

timm = pytest.importorskip("timm")

STEPS = 24  # per model: the counted mean's standard error is then about 0.02


def step_flops(model: torch.nn.Module, x: torch.Tensor) -> int:
    """FLOPs of one real training step (forward, loss, backward), as FlopCounterMode counts."""
    with FlopCounterMode(display=False) as counter:
        out = model(x)
        F.cross_entropy(out, torch.zeros(len(out), dtype=torch.long)).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def counted_saving(plain: torch.nn.Module, gated: torch.nn.Module, x: torch.Tensor
                   ) -> tuple[float, float]:
    """The mean saving ``1 - gated / plain`` per step over STEPS steps, and its standard error."""
    base = step_flops(plain.train(), x)
    gated.train()
    savings = [1.0 - step_flops(gated, x) / base for _ in range(STEPS)]
    return statistics.fmean(savings), statistics.stdev(savings) / math.sqrt(STEPS)


def small_vit(**kw):
    """A timm ViT small enough for counted training steps on a busy CPU (6 blocks, 16 tokens)."""
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=6, num_heads=2,
                             num_classes=10, **kw)


def check_counted(plain, gated, x, target):
    expected = fxsd.expected_saving(gated)
    assert abs(expected - target) < 0.005
    mean, se = counted_saving(plain, gated, x)
    # within its standard error, as the issue asks (a seeded run: fixed numbers, reproducible)
    assert abs(mean - expected) <= se, (mean, se, expected)
    assert 0.005 < se < 0.03  # the steps really drop sites: the check is not vacuous
    print(f"expected {expected:.4f}, counted {mean:.4f} ± {se:.4f} over {STEPS} steps")
    return expected, mean, se


@pytest.mark.slow  # about 30 s on an idle 2-core machine, minutes on a busy one
def test_resnet50_linear_target_quarter_is_what_the_flop_counter_counts():
    torch.manual_seed(0)
    plain = torchvision.models.resnet50()
    x = torch.randn(2, 3, 32, 32)
    gated = fxsd.stochastic_depth(plain, target_saving=0.25, example_inputs=(x,), seed=0)
    rates = [g.drop_rate for g in fxsd.gates(gated)]
    # linear: depth l of 16 at rate * l / 16; the model-wide rate is the deepest site's
    assert rates[-1] == pytest.approx(fxsd.get_drop_rate(gated))
    assert rates[0] == pytest.approx(rates[-1] / 16)
    assert 0.45 < rates[-1] < 0.6
    record = fxsd.get_record(gated)
    # forward + backward: about three times the forward (conv1 computes no input gradient)
    assert 2.9 < record.step_flops / record.total_flops < 3.0
    check_counted(plain, gated, x, 0.25)


def test_timm_vit_uniform_target_adopts_drop_paths_and_meets_the_count():
    torch.manual_seed(0)
    plain = small_vit(drop_path_rate=0.1)
    x = torch.randn(2, 3, 32, 32)
    gated = fxsd.stochastic_depth(plain, target_saving=0.3, distribution="uniform",
                                  example_inputs=(x,), seed=0)
    found = fxsd.gates(gated)
    assert len(found) == 12 and len({g.drop_rate for g in found}) == 1
    # timm's first block holds an Identity (linspace from 0): the other 10 are adopted, in
    # timm's sample mode; attention branches read a mask from outside the fork, so they run
    # sample/mask and save nothing: the MLPs' subset drops carry the whole target
    assert sum(g.drop_path is fxsd.runtime.gate.DropPathAction.ADOPTED for g in found) == 10
    assert found[0].drop_rate != 0.1  # the target set the rates, as an explicit rate would
    check_counted(plain, gated, x, 0.3)


def test_unreachable_target_names_the_largest_saving():
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(fxsd.FxsdError, match=r"at most 0\.\d+ \(\d+\.\d%\) of a training step"):
        fxsd.stochastic_depth(torchvision.models.resnet18(), target_saving=0.95,
                              example_inputs=(x,))


def test_target_and_drop_rate_are_refused_together_and_a_target_needs_examples():
    with pytest.raises(fxsd.InvalidArgumentError, match="drop_rate= or target_saving=, not both"):
        fxsd.stochastic_depth(torchvision.models.resnet18(), 0.2, target_saving=0.1,
                              example_inputs=(torch.zeros(1, 3, 32, 32),))
    with pytest.raises(fxsd.InvalidArgumentError, match="target_saving needs example_inputs="):
        fxsd.stochastic_depth(torchvision.models.resnet18(), target_saving=0.1)
    gated = fxsd.stochastic_depth(torchvision.models.resnet18(), 0.2)
    with pytest.raises(fxsd.InvalidArgumentError, match="pass example_inputs="):
        fxsd.expected_saving(gated)


def test_a_per_site_list_is_scaled_keeping_its_shape():
    shape = [0.0, 0.1, 0.1, 0.2, 0.2, 0.3, 0.3, 0.4]
    gated = fxsd.stochastic_depth(torchvision.models.resnet18(), distribution=shape,
                                  target_saving=0.1, example_inputs=(torch.zeros(2, 3, 32, 32),))
    rates = [g.drop_rate for g in fxsd.gates(gated)]
    factor = rates[-1] / 0.4
    assert rates == pytest.approx([factor * r for r in shape])
    assert fxsd.expected_saving(gated) == pytest.approx(0.1, abs=1e-6)


def test_expected_saving_follows_set_drop_rate_and_schedules():
    x = torch.zeros(2, 3, 32, 32)
    gated = fxsd.stochastic_depth(torchvision.models.resnet18(), 0.4, example_inputs=(x,))
    full = fxsd.expected_saving(gated)
    fxsd.set_drop_rate(gated, 0.0)
    assert fxsd.expected_saving(gated) == 0.0
    fxsd.set_drop_rate(gated, 0.4)
    schedule = fxsd.DropSchedule(gated, lambda step: min(1.0, step / 4))
    assert fxsd.expected_saving(gated) == 0.0
    schedule.step()
    schedule.step()
    # the block mode saving is linear in the rates of sites that do not nest
    assert fxsd.expected_saving(gated) == pytest.approx(full / 2)
    for _ in range(4):
        schedule.step()
    assert fxsd.expected_saving(gated) == pytest.approx(full)


def test_sample_mode_mask_saves_nothing_subset_its_rows():
    x = torch.zeros(2, 3, 32, 32)
    # BatchNorm couples rows: every ResNet branch falls back to mask
    masked = fxsd.stochastic_depth(torchvision.models.resnet18(), 0.5, mode="sample",
                                   example_inputs=(x,))
    assert fxsd.expected_saving(masked) == 0.0
    block = fxsd.stochastic_depth(small_vit(), 0.5, example_inputs=(x,))
    sample = fxsd.stochastic_depth(small_vit(), 0.5, mode="sample", example_inputs=(x,))
    impl = {name: g.sample_impl for name, g in named_gates(sample).items()}
    # timm's attention reads a mask from outside the fork: mask there, subset in the MLPs
    assert sorted(set(impl.values())) == ["mask", "subset"]
    per_site = site_savings(block)
    subset_part = sum(v for name, v in per_site.items() if impl[name] == "subset")
    assert 0.1 < subset_part < fxsd.expected_saving(block)
    assert fxsd.expected_saving(sample) == pytest.approx(subset_part)


def test_nested_sites_are_saved_once():
    # a: 30 FLOPs of its own, holding b (10): dropping a also skips b
    assert saving_at({"a": 0.5, "b": 0.5}, {"a": 30, "b": 10}, {"b": ("a",)}, 100) == 0.225
    assert saving_at({"a": 1.0, "b": 0.0}, {"a": 30, "b": 10}, {"b": ("a",)}, 100) == 0.4


def test_site_savings_add_up_and_the_table_says_them(capsys):
    x = torch.zeros(2, 3, 32, 32)
    gated = fxsd.stochastic_depth(torchvision.models.resnet18(), 0.2, example_inputs=(x,))
    per_site = site_savings(gated)
    assert sum(per_site.values()) == pytest.approx(fxsd.expected_saving(gated))
    text = fxsd.table(gated, width=0)
    assert "step %" in text.splitlines()[0] and "saving %" in text.splitlines()[0]
    last = fxsd.runtime.accessors.named_gates(gated)["layer4.1.residual_gate"]
    share = last.info.step_flops / fxsd.get_record(gated).step_flops
    row = next(line for line in text.splitlines() if "layer4.1.residual_gate" in line)
    assert f"{share:.1%}"[:-1] in row and f"{per_site['layer4.1.residual_gate']:.2%}"[:-1] in row


def test_inspect_shows_per_site_saving_and_the_target(capsys):
    assert main(["inspect", "resnet50", "--target-saving", "0.25", "--wide"]) == 0
    out = capsys.readouterr().out
    assert "saving %" in out
    assert "expected saving per training step: 25.0% of its FLOPs" in out
    assert main(["inspect", "cifar_resnet20", "--wide"]) == 0
    out = capsys.readouterr().out
    assert "saving %" in out and "expected saving per training step:" in out
    with pytest.raises(SystemExit) as refused:  # refused while parsing, before any work
        main(["inspect", "resnet18", "--target-saving", "0.2", "--drop-rate", "0.1"])
    assert refused.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


class _Inner(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)

    def forward(self, x):
        z = self.a(x)
        return z + self.b(torch.relu(z))


class _Nested(torch.nn.Module):
    """Two sites, one inside the other's branch: ``x + inner(x)`` holds ``z + b(relu(z))``."""

    def __init__(self) -> None:
        super().__init__()
        self.inner, self.head = _Inner(), torch.nn.Linear(8, 8)

    def forward(self, x):
        return self.head(x + self.inner(x))


def _one_saving(line: str) -> str:
    """The one expected saving a summary line prints (``34.4%``)."""
    assert line.count("expected") == 1, line
    return line.split("expected saving per ")[1].split(": ")[1].split()[0]


def test_the_summary_prints_one_saving_the_budgets():
    """A gated model's summary says :func:`fxsd.expected_saving`; a plan's (an untransformed
    model with example inputs) the budget's :func:`saving_at` on forward FLOPs, the nested site
    saved once, not each branch's FLOPs times its rate."""
    x = torch.randn(4, 8)
    gated = fxsd.stochastic_depth(_Nested(), 0.5, distribution="uniform", example_inputs=(x,))
    line = fxsd.tools.tables.summary(gated)
    assert "per training step" in line
    assert _one_saving(line) == f"{fxsd.expected_saving(gated):.1%}"
    analysis = fxsd.analyze_residuals(_Nested(), (x,))
    outer, inner = sorted(analysis.sites, key=lambda s: -s.flops)
    assert inner.add in outer.branch  # nested
    line = fxsd.tools.tables.summary(analysis, drop_rate=0.5, distribution="uniform")
    assert "per forward" in line and "forward only" in line
    own = {"outer": outer.flops - inner.flops, "inner": inner.flops}
    expected = saving_at({"outer": 0.5, "inner": 0.5}, own, {"inner": ("outer",)},
                         analysis.total_flops)
    assert _one_saving(line) == f"{expected:.1%}"
    # each branch's FLOPs times its rate counts the inner branch twice
    assert expected < 0.5 * (outer.flops + inner.flops) / analysis.total_flops - 0.05


def test_bench_rows_carry_activation_bytes_and_the_flop_saving():
    from fxsd.tools import bench

    result = bench.run("cifar_resnet20", drop_rates=(0.5,), distribution="uniform", steps=6,
                       warmup=1, batch_size=4, branch_reps=1)
    base = result.row("baseline").activation_bytes
    fxsd_row = result.row("fxsd", 0.5)
    mask = result.row("mask drop path", 0.5)
    assert base > 0 and result.row("fxsd p=0").activation_bytes == pytest.approx(base, rel=0.02)
    # about half the branches dropped in each step: their activations are never saved
    assert fxsd_row.activation_bytes < 0.8 * base
    # the mask drop path computes and stores every branch, and its masks on top
    assert mask.activation_bytes >= base
    every = result.row("every site dropped")
    assert every.activation_bytes < 0.4 * base  # the stem, projections and head remain
    assert 0.4 < fxsd_row.flop_saving < 0.5 and mask.flop_saving == 0.0
    assert fxsd_row.flop_saving == pytest.approx(every.flop_saving / 2)
    assert result.to_dict()["rows"][2]["activation_bytes"] == fxsd_row.activation_bytes
    assert "act. MiB" in bench.format_table(result, width=0)


def test_an_outer_branch_is_charged_the_backward_of_its_nodes_before_a_nested_gate():
    """The outer branch's ``a`` (forward 2·4·8·8 FLOPs, and as much for its weight's gradient)
    feeds the output only through the nested gate: its backward is the outer gate's, not the
    trunk's (it was charged to the trunk: the outer gate's step cost was half)."""
    x = torch.randn(4, 8)
    gated = fxsd.stochastic_depth(_Nested(), 0.5, distribution="uniform", example_inputs=(x,))
    fxsd.expected_saving(gated)  # counts the step costs
    infos = [g.info for g in fxsd.gates(gated)]
    outer = next(i for i in infos if not i.enclosing)
    inner = next(i for i in infos if i.enclosing)
    assert inner.enclosing == (outer.name,)
    linear = 2 * 4 * 8 * 8
    assert outer.step_flops == 2 * linear  # a: forward and weight gradient
    assert inner.step_flops == 3 * linear  # b: forward, input and weight gradients
    assert get_record(gated).step_flops == sum(i.step_flops for i in infos) + 3 * linear  # head
