"""``fxsd bench`` plumbing: variants, the mask drop-path baseline, the limit, tables. No timing."""

from __future__ import annotations

import json

import pytest
import torch
import torchvision
from torch import nn

import fxsd
from fxsd.passes.mask_drop_path import add_mask_drop_paths
from fxsd.tools import _bench_limit, _bench_report, bench, bench_transform
from fxsd.tools._bench_types import Variant, VariantKind
from fxsd.tools.cli import main
from fxsd.tools.models import cifar_resnet


def test_cifar_resnet_matches_the_paper():
    model = cifar_resnet(110)
    blocks = [m for m in model.modules() if type(m).__name__ == "BasicBlock"]
    assert len(blocks) == 54
    assert [model.layer1[0].conv1.out_channels, model.layer2[0].conv1.out_channels,
            model.layer3[0].conv1.out_channels] == [16, 32, 64]
    sites = fxsd.find_residuals(model)
    assert len(sites) == 54
    # Option-A shortcuts are parameter-free projections (subsample + zero-pad).
    projections = [s for s in sites if s.skip_kind is fxsd.analysis.residuals.SkipKind.PROJECTION]
    assert [s.module_path for s in projections] == ["layer2.0", "layer3.0"]
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(fxsd.InvalidArgumentError, match="6n \\+ 2"):
        cifar_resnet(100)


def test_mask_drop_path_applies_torchvision_op_at_site_rates():
    model = cifar_resnet(20)
    analysis = fxsd.analyze_residuals(model)
    depths = [s.depth for s in analysis.sites]
    rates = fxsd.decisions.distributions.site_rates(0.5, "linear", depths, analysis.num_levels)
    gm = add_mask_drop_paths(fxsd.analyze_residuals(model), rates)
    drop_paths = [(n, gm.get_submodule(str(n.target))) for n in gm.graph.nodes
                  if n.op == "call_module"
                  and isinstance(gm.get_submodule(str(n.target)), torchvision.ops.StochasticDepth)]
    assert [m.p for _, m in drop_paths] == pytest.approx(rates)
    assert all(m.mode == "row" for _, m in drop_paths)
    # Each sits between the branch output and the residual add.
    for node, _ in drop_paths:
        (user,) = node.users
        assert fxsd.tracing.ops.add_kind(user) is not None
        assert node.args[0].target.endswith("bn2")
    assert list(gm.state_dict()) == list(model.state_dict())
    # Same values as torchvision's op applied by hand with the same random state.
    x = torch.randn(4, 3, 32, 32)
    gm.train(), model.train()
    torch.manual_seed(5)
    out = gm(x)
    torch.manual_seed(5)
    handles = [blk.bn2.register_forward_hook(
        lambda m, a, o, p=p: torchvision.ops.stochastic_depth(o, p, "row", True))
        for blk, p in zip([b for b in model.modules() if type(b).__name__ == "BasicBlock"], rates)]
    ref = model(x)
    for h in handles:
        h.remove()
    torch.testing.assert_close(out, ref)


def test_limit_saving_with_known_branch_costs():
    times = {"a": 1.0, "b": 2.0, "c": 4.0}
    rates = {"a": 0.5, "b": 0.25, "c": 0.0}
    assert _bench_limit.limit_saving(times, rates, {}) == pytest.approx(0.5 + 0.5)
    # c nested in a's branch: c is skipped whenever a drops.
    assert _bench_limit.limit_saving(times, rates, {"c": ["a"]}) == pytest.approx(0.5 + 0.5 + 2.0)
    both = {"a": 0.5, "b": 0.0, "c": 0.5}
    assert _bench_limit.limit_saving(times, both, {"c": ["a"]}) == pytest.approx(0.5 + 4.0 * 0.75)


def test_site_times_are_exclusive_for_nested_branches():
    class Inner(nn.Module):
        def __init__(self):
            super().__init__()
            self.f = nn.Linear(8, 8)

        def forward(self, x):
            return x + self.f(x)

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = Inner()

        def forward(self, x):
            return x + torch.tanh(self.inner(x))

    gm = fxsd.stochastic_depth(Outer(), 0.0)
    x, cfg = torch.randn(4, 8), bench.BenchConfig(branch_reps=2)
    assert set(bench.site_times(gm, x, cfg)) == {"inner.residual_gate", "residual_gate"}
    assert bench.gate_ancestors(gm, x, cfg) == {"inner.residual_gate": ["residual_gate"],
                                                "residual_gate": []}


def test_exclusive_times_subtract_directly_nested_branches():
    inclusive = {"outer": 10.0, "inner": 4.0, "innermost": 1.0, "other": 2.0}
    parent = {"outer": None, "inner": "outer", "innermost": "inner", "other": None}
    assert bench.exclusive_times(inclusive, parent) == {
        "outer": 6.0, "inner": 3.0, "innermost": 1.0, "other": 2.0}
    # timing noise can make an outer branch look cheaper than what it holds: clamped at 0
    assert bench.exclusive_times({"a": 1.0, "b": 1.5}, {"a": None, "b": "a"}) == {
        "a": 0.0, "b": 1.5}


@pytest.fixture(scope="module")
def small_result():
    return bench.run(model="cifar_resnet20", drop_rates=(0.5, 1.0), distribution="uniform",
                     steps=2, warmup=1, batch_size=4, branch_reps=1)


def test_run_builds_every_variant(small_result):
    r = small_result
    names = [(row.variant, row.drop_rate) for row in r.rows]
    assert names == [
        ("baseline", None), ("fxsd p=0", 0.0), ("fxsd", 0.5), ("fxsd", 1.0),
        ("mask drop path", 0.5), ("mask drop path", 1.0), ("every site dropped", 1.0),
        ("limit", 0.5), ("limit", 1.0),
    ]
    assert all(len(row.times) == 2 for row in r.rows if row.variant != "limit")
    assert len(r.site_times) == 9
    base = r.row("baseline").mean
    everything = r.row("every site dropped")
    # At rate 1 the realised and the expected limit are every branch's whole time.
    assert r.row("fxsd", 1.0).limit == pytest.approx(everything.limit)
    assert r.row("limit", 1.0).limit == pytest.approx(everything.limit)
    assert r.row("limit", 0.5).times[0] == pytest.approx(base * (1 - r.row("limit", 0.5).limit))
    assert 0 < r.row("limit", 0.5).limit < everything.limit
    assert r.machine["torch"] == torch.__version__


def test_table_columns(small_result):
    text = bench.format_table(small_result, width=0)
    header = text.splitlines()[1]
    for col in _bench_report.HEADERS:
        assert col in header
    assert "2 timed steps per variant (interleaved, after 1 warm-up)" in text
    assert "sync check: not run (CPU)" in text
    data = small_result.to_dict()
    json.dumps(data)
    assert data["rows"][0]["ratio"] == 1.0


def _widest_result():
    """The widest table there is: compiled rows, peak memory measured, a noise warning."""

    def row(kind, rate, compiled=False, limit=None):
        return bench.BenchRow(Variant(kind, rate, compiled), [0.10, 0.11, 0.12], 2**27, limit)

    rows = [row(VariantKind.BASELINE, None), row(VariantKind.FXSD, 0.5, limit=0.2),
            row(VariantKind.MASK_DROP_PATH, 0.5, limit=0.2),
            row(VariantKind.ALL_DROPPED, 1.0, limit=0.5),
            row(VariantKind.BASELINE, None, compiled=True),
            row(VariantKind.ALL_DROPPED, 1.0, compiled=True, limit=0.5)]
    return bench.BenchResult(
        bench.BenchConfig(model="cifar_resnet110", compile=True), rows, {},
        {"device": "cuda", "torch": torch.__version__, "threads": "2"}, "not run (CPU)",
        ["fxsd at 0.5: its 1.0 ms difference from the baseline is smaller than the "
         "baseline's own spread (3.0 ms IQR)"])


@pytest.mark.parametrize("columns", [40, 50, 60])
def test_table_fits_narrow_terminals(columns, monkeypatch):
    monkeypatch.setenv("COLUMNS", str(columns))
    text = bench.format_table(_widest_result())
    assert max(len(line) for line in text.splitlines()) <= columns
    header = next(line for line in text.splitlines() if line.startswith("variant"))
    assert "drop rate" in header and "saving %" in header
    assert "all dropped" in text and "mask drop p" in text  # every row still says what ran


def test_progress_counts_work_of_unknown_length(capsys):
    report = bench.Progress(enabled=True, prefix="[fxsd]")
    report.tqdm = None
    with report.counter("tracing by example", "module") as tick:
        for i in range(12):
            tick(f"model.layers.{i}")
    err = capsys.readouterr().err.splitlines()
    assert err == ["[fxsd] tracing by example: module 1 (model.layers.0)",
                   "[fxsd] tracing by example: module 11 (model.layers.10)"]


def test_unknown_devices_are_refused_by_name():
    with pytest.raises(fxsd.InvalidArgumentError, match="unknown device 'tpu': use one of cpu"):
        bench.check_device("tpu")
    assert bench.check_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(fxsd.InvalidArgumentError, match="'cuda' is not available here"):
            bench.run("cifar_resnet20", device="cuda")


def test_table_fits_an_80_column_terminal(monkeypatch, capsys):
    # the widest table there is: compiled rows, peak memory measured, a noise warning
    def row(kind, rate, compiled=False, limit=None):
        return bench.BenchRow(Variant(kind, rate, compiled), [0.10, 0.11, 0.12], 2**27, limit)

    rows = [row(VariantKind.BASELINE, None), row(VariantKind.FXSD, 0.5, limit=0.2),
            row(VariantKind.ALL_DROPPED, 1.0, limit=0.5),
            row(VariantKind.BASELINE, None, compiled=True),
            row(VariantKind.ALL_DROPPED, 1.0, compiled=True, limit=0.5)]
    result = bench.BenchResult(
        bench.BenchConfig(model="cifar_resnet110", compile=True), rows, {},
        {"device": "cuda", "torch": torch.__version__, "threads": "2"}, "not run (CPU)",
        ["fxsd at 0.5: its 1.0 ms difference from the baseline is smaller than the "
         "baseline's own spread (3.0 ms IQR)"])
    monkeypatch.setenv("COLUMNS", "80")
    text = bench.format_table(result)
    assert max(len(line) for line in text.splitlines()) <= 80
    header = next(line for line in text.splitlines() if line.startswith("variant"))
    assert "mean ms" in header and "IQR ms" in header and "efficiency" in header
    assert "median ms" not in header and "left out to fit 80 columns" in text
    assert "comp. all dropped" in text  # shortened, still saying what ran
    wide = bench.format_table(result, width=0)
    assert "compiled every site dropped" in wide and "median ms" in wide and "peak MiB" in wide
    assert max(len(line) for line in wide.splitlines()) > 100


def test_variants_use_the_requested_rates_and_distribution():
    cfg = bench.BenchConfig(model="cifar_resnet20", drop_rates=(0.5, 0.2), distribution="linear")
    base = cifar_resnet(20)
    variants = bench._variants(cfg, base, cfg.drop_rates, fxsd.analyze_residuals(base))
    by_name = {(v.row.variant, v.row.drop_rate): v for v in variants}
    for rate in (0.5, 0.2):
        expected = [rate * d / 9 for d in range(1, 10)]
        assert [g.drop_rate for g in by_name[("fxsd", rate)].gates] == pytest.approx(expected)
        masked = by_name[("mask drop path", rate)].model
        ps = [m.p for m in masked.modules() if isinstance(m, torchvision.ops.StochasticDepth)]
        assert ps == pytest.approx(expected)
    assert all(g.drop_rate == 0.0 for g in by_name[("fxsd p=0", 0.0)].gates)
    assert all(g.drop_rate == 1.0 for g in by_name[("every site dropped", 1.0)].gates)
    assert not fxsd.gates(by_name[("baseline", None)].model)


def test_variant_labels_are_the_names_tables_and_json_show():
    kind = VariantKind
    assert [Variant(k, 0.5).label for k in kind] == [
        "baseline", "fxsd p=0", "fxsd", "mask drop path", "every site dropped", "limit",
        "pruned"]
    assert Variant(kind.FXSD, 0.5, mask_impl=True).label == "fxsd (mask)"
    everything = Variant(kind.ALL_DROPPED, 1.0, compiled=True)
    assert everything.label == "compiled every site dropped" and everything.group == "compiled"
    assert everything.short_label(short_compiled=False) == "compiled all dropped"
    assert everything.short_label(short_compiled=True) == "comp. all dropped"
    assert Variant(kind.FXSD, 0.5).short_label(short_compiled=True) == "fxsd"
    row = bench.BenchRow(Variant(kind.LIMIT, 0.3, compiled=True), [1.0])
    assert (row.variant, row.kind, row.drop_rate, row.group) == (
        "compiled limit", kind.LIMIT, 0.3, "compiled")
    # values: equal specs are one variant (usable as keys), and cannot change under a row
    assert Variant(kind.FXSD, 0.5) == Variant(kind.FXSD, 0.5)
    assert len({Variant(kind.FXSD, 0.5), Variant(kind.FXSD, 0.5, compiled=True)}) == 2
    with pytest.raises(AttributeError):
        row.spec.rate = 0.1


def test_variant_specs_in_table_order():
    cfg = bench.BenchConfig(drop_rates=(0.5, 0.2), mode="sample", compile=True)
    specs = bench._variant_specs(cfg, cfg.drop_rates)
    assert [(s.label, s.rate) for s in specs] == [
        ("baseline", None), ("fxsd p=0", 0.0), ("fxsd", 0.5), ("fxsd (mask)", 0.5),
        ("fxsd", 0.2), ("fxsd (mask)", 0.2), ("mask drop path", 0.5), ("mask drop path", 0.2),
        ("every site dropped", 1.0), ("compiled baseline", None), ("compiled fxsd p=0", 0.0),
        ("compiled fxsd", 0.5), ("compiled fxsd", 0.2), ("compiled every site dropped", 1.0)]
    # a requested rate of 0 is an fxsd row, told apart from the gates' overhead by its kind
    zero = bench._variant_specs(bench.BenchConfig(), (0.0,))
    assert [(s.kind, s.label) for s in zero if s.rate == 0.0] == [
        (VariantKind.OVERHEAD, "fxsd p=0"), (VariantKind.FXSD, "fxsd"),
        (VariantKind.MASK_DROP_PATH, "mask drop path")]


def test_bench_rejects_bad_options():
    with pytest.raises(fxsd.InvalidArgumentError, match="unknown mode 'rows'"):
        bench.run("cifar_resnet20", steps=1, mode="rows")
    with pytest.raises(fxsd.InvalidArgumentError, match="steps and batch_size must be positive"):
        bench.run("cifar_resnet20", steps=0)
    with pytest.raises(fxsd.InvalidArgumentError, match="drop_rate must lie"):
        bench.run(model="cifar_resnet20", steps=1, drop_rates=(1.5,))
    with pytest.raises(fxsd.InvalidArgumentError, match="no residual site"):
        bench.run(model="vgg11", steps=1)


def test_cli_bench_and_json(tmp_path, capsys):
    path = tmp_path / "out.json"
    assert main(["bench", "cifar_resnet20", "--steps", "1", "--warmup", "0", "--batch-size", "2",
                 "--drop-rate", "0.3", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "mask drop path" in out and "limit" in out and "efficiency" in out
    data = json.loads(path.read_text())
    assert data["config"]["drop_rates"] == [0.3]


def test_transform_times_rows():
    rows = bench.transform_times(block_counts=(5,), torchvision_models=(), repeats=1)
    (row,) = rows
    assert row["model"] == "residual MLP x5" and row["sites"] == 5 and row["blocks"] == 5
    analysed = fxsd.analyze_residuals(bench_transform.residual_mlp(5))
    assert row["nodes"] == len(analysed.graph_module.graph.nodes)
    assert row["us_per_node"] == pytest.approx(row["seconds"] / row["nodes"] * 1e6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_no_host_device_sync_in_gated_cuda_step():
    model = cifar_resnet(20).cuda()
    gm = fxsd.stochastic_depth(model, 0.5, seed=0).train()
    x = torch.randn(8, 3, 32, 32, device="cuda")
    opt = torch.optim.SGD(gm.parameters(), lr=0.01)
    gm(x).sum().backward()  # warm-up (allocator, cuDNN choices)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(5):
            opt.zero_grad(set_to_none=True)
            gm(x).sum().backward()
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    result = bench.run(model="cifar_resnet20", steps=2, warmup=1, device="cuda", batch_size=8)
    assert result.sync_check.startswith("passed")


def test_noise_warnings_flag_effects_within_the_baselines_spread():
    cfg = bench.BenchConfig()
    baseline, fxsd_05 = Variant(VariantKind.BASELINE), Variant(VariantKind.FXSD, 0.5)
    quiet = bench.BenchRow(baseline, [1.00, 1.01, 0.99, 1.00])
    noisy = bench.BenchRow(baseline, [0.6, 1.4, 0.7, 1.3])
    for base, expect_noise in ((quiet, False), (noisy, True)):
        rows = [base, bench.BenchRow(fxsd_05, [0.9] * 4, limit=0.1),
                bench.BenchRow(Variant(VariantKind.LIMIT, 0.5), [0.9], limit=0.1)]
        warnings = bench.noise_warnings(bench.BenchResult(cfg, rows, {}, {}))
        assert any("smaller than the baseline's own spread" in w for w in warnings) == expect_noise
    # an efficiency of 3 cannot be real
    rows = [quiet, bench.BenchRow(fxsd_05, [0.7] * 4, limit=0.1)]
    warnings = bench.noise_warnings(bench.BenchResult(cfg, rows, {}, {}))
    assert any("efficiency 3.00 is outside [0, 1.1]" in w for w in warnings)
    assert warnings[-1].startswith("the machine was likely busy")
    assert "IQR ms" in _bench_report.HEADERS and rows[0].spread == pytest.approx(0.005)


def test_interpolated_branch_cost_between_measured_row_counts():
    curve = {0: 0.0, 4: 2.0, 16: 5.0}
    assert _bench_limit._interpolate(curve, 4) == 2.0
    assert _bench_limit._interpolate(curve, 10) == pytest.approx(3.5)
    assert _bench_limit._interpolate(curve, 2) == pytest.approx(1.0)


def test_sample_mode_limit_uses_the_row_counts_that_ran():
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                            hidden_dim=32, mlp_dim=64, num_classes=10)
    gated = fxsd.stochastic_depth(vit, 0.5, distribution="uniform", mode="sample", seed=0)
    x = torch.randn(8, 3, 32, 32)
    cfg = bench.BenchConfig(branch_reps=1)
    names = fxsd.runtime.accessors.named_gates(gated)
    curves = _bench_limit.row_times(gated, x, cfg, {name: {3, 5} for name in names})
    assert all(set(c) == {0, 3, 5, 8} for c in curves.values())
    assert all(c[8] > 0 and c[3] > 0 for c in curves.values())


def test_progress_reports_on_stderr(monkeypatch, capsys):
    report = bench.Progress(enabled=True)
    report.tqdm = None  # plain lines without the progress extra
    assert list(report.steps("timing", 20)) == list(range(20))
    err = capsys.readouterr().err
    assert "[fxsd bench] timing: 0/20" in err and "[fxsd bench] timing: 20/20" in err
    quiet = bench.Progress(enabled=False)
    assert list(quiet.steps("timing", 3)) == [0, 1, 2]
    assert capsys.readouterr().err == ""
