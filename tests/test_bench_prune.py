"""``fxsd bench --prune S``: the plain and pruned models' inference side by side, beside their
FLOP ratio. The FLOPs are checked against ``FlopCounterMode`` run here on an independently pruned
model and against the removed blocks' own FLOPs; times only for their structure."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import fxsd
from fxsd.errors import InvalidArgumentError
from fxsd.tools import bench_prune
from fxsd.tools._bench_types import VariantKind
from fxsd.tools.cli import main
from fxsd.tools.models import load_model

SMALL = dict(batch_size=2, image_size=8, seed=3)


def _flops(model, x) -> tuple[int, dict[str, int]]:
    with FlopCounterMode(display=False) as counter:
        model.eval()(x)
    return counter.get_total_flops(), {k: sum(v.values())
                                       for k, v in counter.get_flop_counts().items()}


def test_the_report_holds_the_measured_flops_and_the_removed_sites():
    result = bench_prune.run("cifar_resnet8", 0.25, steps=2, warmup=1, progress=False, **SMALL)
    # the same model and batch as the bench (its seed), pruned here on its own
    torch.manual_seed(SMALL["seed"])
    model = load_model("cifar_resnet8")
    x = torch.randn(2, 3, 8, 8)
    pruned, report = fxsd.prune(model, 0.25, example_inputs=(x,), return_report=True,
                                progress=False)
    total, per_module = _flops(model, x)
    assert result.report.removed == report.removed and result.report.removed
    assert result.flops_plain == total
    assert result.flops_pruned == _flops(pruned, x)[0]
    assert result.flop_ratio == _flops(pruned, x)[0] / total
    # what went is the removed blocks' two convolutions, nothing else
    blocks = [name.removesuffix(".residual_gate") for name in report.removed]
    convs = sum(per_module[f"CifarResNet.{b}.conv{i}"] for b in blocks for i in (1, 2))
    assert result.flops_pruned == total - convs and 0.25 <= 1 - result.flop_ratio
    # the structure: plain then pruned, each timed `steps` times, ratios from medians
    assert [(r.kind, r.drop_rate, r.spec.compiled, len(r.times)) for r in result.rows] == [
        (VariantKind.BASELINE, None, False, 2), (VariantKind.PRUNED, 0.25, False, 2)]
    assert all(t > 0 for r in result.rows for t in r.times)
    assert result.time_ratio() == result.rows[1].median / result.rows[0].median
    text = bench_prune.format_table(result, width=0)
    assert f"{result.flop_ratio:.3f}" in text and ", ".join(blocks) in text
    saved = result.to_dict()
    assert saved["flop_ratio"] == result.flop_ratio and saved["removed"] == list(report.removed)
    assert [row["variant"] for row in saved["rows"]] == ["baseline", "pruned"]


def test_compiled_rows_compare_with_the_compiled_plain_model():
    result = bench_prune.run("cifar_resnet8", 0.25, steps=1, warmup=1, compile=True,
                             compile_backend="eager", progress=False, **SMALL)
    assert [r.variant for r in result.rows] == ["baseline", "pruned", "compiled baseline",
                                                 "compiled pruned"]
    assert result.time_ratio(compiled=True) == result.rows[3].median / result.rows[2].median


def test_bench_prune_command(tmp_path, capsys):
    path = tmp_path / "out" / "prune.json"
    assert main(["bench", "cifar_resnet8", "--prune", "0.25", "--batch-size", "2",
                 "--image-size", "8", "--steps", "1", "--warmup", "0", "--json",
                 str(path)]) == 0
    out = capsys.readouterr().out
    assert "FLOP ratio" in out and "pruned" in out
    saved = json.loads(path.read_text())
    assert saved["config"]["prune"] == 0.25 and saved["config"]["batch_size"] == 2
    assert "drop_rates" not in saved["config"]  # the training bench's settings do not apply
    assert 0 < saved["flop_ratio"] <= 0.75 and saved["removed"]


def test_bench_prune_refuses_what_it_does_not_use(capsys):
    assert main(["bench", "--prune", "0.2", "--mode", "sample"]) == 2
    assert "takes no --mode" in capsys.readouterr().err
    assert main(["bench", "--prune", "0.2", "--transform"]) == 2
    assert "takes no --transform" in capsys.readouterr().err
    with pytest.raises(InvalidArgumentError, match="out of reach: .* at most 0.96"):
        bench_prune.run("cifar_resnet8", 0.99, steps=1, warmup=0, progress=False, **SMALL)
