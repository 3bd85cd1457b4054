"""The command line: model specs in every subcommand, tables that fit, one-line errors, a fast
``--help``, and the README's example as real output."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fxsd.tools.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_help_does_not_import_torch():
    # `fxsd --help` must answer at once: importing torch alone takes over a second.
    code = ("import sys\nfrom fxsd.tools.cli import main\ntry:\n    main(['--help'])\n"
            "except SystemExit:\n    pass\nprint('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert "inspect" in out.stdout and out.stdout.strip().endswith("False")


@pytest.mark.parametrize("spec", ["cifar_resnet20", "resnet18", "tests.test_api:Net"])
def test_every_model_spec_works_in_inspect(spec, capsys):
    assert main(["inspect", spec, "--no-flops", "--wide"]) == 0
    out = capsys.readouterr().out
    assert f"{spec}: " in out and "residual sites" in out


def test_bench_accepts_a_callable_spec(capsys):
    assert main(["bench", "torchvision.models:resnet18", "--steps", "1", "--warmup", "0",
                 "--batch-size", "2", "--image-size", "32"]) == 0
    assert "torchvision.models:resnet18, batch 2" in capsys.readouterr().out


def test_errors_are_one_line_without_a_traceback():
    result = subprocess.run([sys.executable, "-m", "fxsd.tools.cli", "inspect",
                             "fxsd.tools.models:BasicBlock"], capture_output=True, text=True)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fxsd: error: cannot build")
    assert "Traceback" not in result.stderr


def test_unknown_format_is_refused(capsys):
    with pytest.raises(SystemExit) as info:
        main(["inspect", "--format", "nosuchfmt"])
    assert info.value.code == 2
    assert "unknown table format 'nosuchfmt'" in capsys.readouterr().err


def test_transform_refuses_options_it_would_ignore(capsys):
    assert main(["bench", "--transform", "resnet18", "--steps", "3"]) == 2
    err = capsys.readouterr().err
    assert "takes no MODEL, --steps" in err


def test_vit_table_fits_an_80_column_terminal(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "80")
    assert main(["inspect", "vit_b_16", "--rejected"]) == 0
    out = capsys.readouterr().out
    assert max(len(line) for line in out.splitlines()) <= 80
    # gate paths shortened from the left (indices kept), then "_gate" goes, then the end is cut:
    # which block a row is stays readable
    assert "e.l.e11.mlp " in out and "e.l.e11.sel…" in out
    monkeypatch.setenv("COLUMNS", "100")
    assert main(["inspect", "vit_b_16", "--rejected"]) == 0
    out = capsys.readouterr().out
    assert max(len(line) for line in out.splitlines()) <= 100
    assert "e.l.e11.self_attention_gate" in out and "e.l.e11.mlp_gate" in out
    assert "encoder_layer" not in out  # the same atoms shortened in every row
    assert main(["inspect", "vit_b_16", "--rejected", "--wide"]) == 0
    wide = capsys.readouterr().out
    assert "encoder.layers.encoder_layer_11.mlp_gate" in wide
    assert max(len(line) for line in wide.splitlines()) > 100


def test_readme_example_is_real_output(monkeypatch, capsys):
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"`fxsd inspect vit_b_16 --rejected` with `COLUMNS=80` prints[^`]*"
                      r"```text\n(.*?)```", readme, re.S)
    assert block, "README.md lost its fxsd inspect example"
    monkeypatch.setenv("COLUMNS", "80")
    assert main(["inspect", "vit_b_16", "--rejected"]) == 0
    out = capsys.readouterr().out.splitlines()
    shown = [line for line in block.group(1).splitlines() if line and line != "..."]
    assert shown and all(line in out for line in shown), [
        line for line in shown if line not in out]


def test_output_that_is_not_a_terminal_is_not_cut(monkeypatch, capsys):
    from fxsd.tools.tables import terminal_width

    monkeypatch.delenv("COLUMNS", raising=False)
    assert terminal_width() == 0  # captured: a pipe, as in `fxsd inspect > table.txt`
    assert main(["inspect", "resnet50", "--no-flops"]) == 0
    out = capsys.readouterr().out
    assert "layer4.2.residual_gate" in out and "…" not in out
    monkeypatch.setenv("COLUMNS", "60")
    assert terminal_width() == 60


def test_a_callable_spec_is_found_in_the_current_directory(tmp_path, monkeypatch, capsys):
    # the `fxsd` script, unlike `python -m`, does not put the current directory on sys.path
    (tmp_path / "fxsd_cwd_models.py").write_text(
        "from torch import nn\n\n"
        "class Block(nn.Linear):\n"
        "    def forward(self, x):\n"
        "        return x + super().forward(x)\n\n"
        "def make():\n"
        "    return nn.Sequential(Block(4, 4), Block(4, 4))\n")
    path = [p for p in sys.path if p and Path(p).resolve() != tmp_path.resolve()]
    monkeypatch.setattr(sys, "path", path)
    monkeypatch.delitem(sys.modules, "fxsd_cwd_models", raising=False)
    monkeypatch.chdir(tmp_path)
    assert main(["inspect", "fxsd_cwd_models:make", "--no-flops", "--wide"]) == 0
    assert "fxsd_cwd_models:make: 2 residual sites" in capsys.readouterr().out
    assert sys.path == path  # the import path is left as it was
    sys.modules.pop("fxsd_cwd_models")


def test_python_m_fxsd_is_the_command_line():
    result = subprocess.run([sys.executable, "-m", "fxsd", "--help"], capture_output=True,
                            text=True, cwd=ROOT)
    assert result.returncode == 0 and result.stdout.startswith("usage: fxsd ")
    assert all(command in result.stdout for command in ("inspect", "bench", "demo"))


def test_demo_writes_to_the_current_directory_by_default():
    from fxsd.tools._cli_arguments import DEFAULT_DEMO_OUT
    from fxsd.tools.cli import _parser

    assert _parser().parse_args(["demo"]).out == DEFAULT_DEMO_OUT == "fxsd-demo"
    readme = (ROOT / "README.md").read_text()
    assert "[--out fxsd-demo]" in readme and "--out docs/demo" in readme


@pytest.mark.parametrize("shape", ["1,3,x", "1,3,,224", "1x3x224x224", "1,0,8", "1,-3", "", "3,"])
def test_input_shape_must_be_positive_ints(shape, capsys):
    with pytest.raises(SystemExit) as info:
        main(["inspect", "cifar_resnet20", "--input-shape", shape])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --input-shape: expected a comma-separated list of positive ints" in err


def test_input_shape_gives_the_example_input(monkeypatch):
    from fxsd.tools.cli import _parser

    assert _parser().parse_args(["inspect", "--input-shape", "2, 3,16,16"]).input_shape == (
        2, 3, 16, 16)


# --- issue 24, item 9: every value and output path checked before any model is built --------

@pytest.fixture
def nothing_built(monkeypatch):
    """Fail the test if the command builds a model or starts the demo's training."""
    import fxsd.tools._demo
    import fxsd.tools.bench
    import fxsd.tools.models

    def fail(*args, **kwargs):
        pytest.fail("a model was built before the arguments were checked")

    for module, name in ((fxsd.tools.models, "load_model"), (fxsd.tools.bench, "load_model"),
                         (fxsd.tools.models, "cifar_resnet"), (fxsd.tools._demo, "load_digits")):
        monkeypatch.setattr(module, name, fail)


@pytest.mark.parametrize("argv, message", [
    (["inspect", "--drop-rate", "2"], "argument --drop-rate: --drop-rate must lie in [0, 1]"),
    (["inspect", "--target-saving", "-0.5"], "--target-saving must lie in [0, 1]"),
    (["inspect", "--drop-rate", "0.1", "--target-saving", "0.2"], "not allowed with"),
    (["inspect", "resnet5"], "unknown model 'resnet5' (did you mean 'resnet50'"),
    (["inspect", "cifar_resnet21"], "must be 6n + 2"),
    (["inspect", "no_such_fxsd_module:make"], "cannot load 'no_such_fxsd_module:make'"),
    (["inspect", "fxsd.tools.models:DEFAULT_NOTHING"], "has no attribute 'DEFAULT_NOTHING'"),
    (["bench", "nosuchnet"], "unknown model 'nosuchnet'"),
    (["bench", "cifar_resnet20", "--steps", "0"], "--steps must be an int >= 1, got 0"),
    (["bench", "cifar_resnet20", "--steps", "x"], "argument --steps: expected an int, got 'x'"),
    (["bench", "cifar_resnet20", "--warmup", "-1"], "--warmup must be an int >= 0"),
    (["bench", "cifar_resnet20", "--batch-size", "0"], "--batch-size must be an int >= 1"),
    (["bench", "cifar_resnet20", "--drop-rate", "0.5", "2"], "--drop-rate must lie in [0, 1]"),
    (["bench", "cifar_resnet20", "--device", "tpu"], "unknown device 'tpu': use one of cpu"),
    (["demo", "--batch-size", "0"], "--batch-size must be an int >= 1"),
    (["demo", "--epochs", "0"], "--epochs must be an int >= 1"),
    (["demo", "--depth", "21"], "--depth must be 6n + 2"),
    (["demo", "--drop-rate", "nan"], "--drop-rate must lie in [0, 1]"),
])
def test_bad_values_are_refused_before_any_model_is_built(argv, message, nothing_built,
                                                           capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(f"fxsd {argv[0]}: error: argument ")


@pytest.mark.parametrize("command", ["demo --out {file}", "demo --out {file}/sub",
                                     "bench cifar_resnet20 --json {file}/out.json",
                                     "bench cifar_resnet20 --json {folder}",
                                     "bench --transform --json {file}/t.json"])
def test_output_paths_are_refused_before_the_work(command, tmp_path, nothing_built, capsys):
    # `fxsd demo --out FILE` trained to the end, then raised FileExistsError and lost the
    # results; `--json` into a file's "folder" raised after the whole benchmark
    file = tmp_path / "results.txt"
    file.write_text("keep me")
    with pytest.raises(SystemExit) as info:
        main(command.format(file=file, folder=tmp_path).split())
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert re.search(r"is a file(, not a folder)?|is a folder: name a file", err), err
    assert file.read_text() == "keep me"


def test_missing_output_folders_are_created(tmp_path, capsys):
    path = tmp_path / "new" / "deeper" / "bench.json"
    assert main(["bench", "cifar_resnet20", "--steps", "1", "--warmup", "0", "--batch-size",
                 "2", "--json", str(path)]) == 0
    assert '"rows"' in path.read_text() and "baseline" in capsys.readouterr().out


def test_inspect_and_the_api_share_one_default_drop_rate(capsys):
    import torch

    import fxsd
    from fxsd.decisions.distributions import DEFAULT_DROP_RATE
    from fxsd.tools.cli import _parser

    assert _parser().parse_args(["inspect"]).drop_rate is None
    assert main(["inspect", "cifar_resnet20", "--wide"]) == 0
    out = capsys.readouterr().out
    gated = fxsd.stochastic_depth(fxsd.tools.models.cifar_resnet(20),
                                  example_inputs=(torch.zeros(1, 3, 32, 32),))
    rates = [f"{g.drop_rate:.4f}" for g in fxsd.gates(gated)]
    rows = [line.split() for line in out.splitlines() if line[:1].isdigit()]
    # drop rate, step %, saving %: the last three columns
    assert [row[-3] for row in rows] == rates and rates[-1] == f"{DEFAULT_DROP_RATE:.4f}"
    assert fxsd.get_drop_rate(gated) == DEFAULT_DROP_RATE
    assert main(["inspect", "cifar_resnet20", "--no-flops", "--wide"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line[:1].isdigit()]
    assert rows[-1][-1] == f"{DEFAULT_DROP_RATE:.4f}"


def test_target_saving_without_flops_is_refused_before_the_model_is_built(nothing_built,
                                                                        capsys):
    assert main(["inspect", "resnet18", "--no-flops", "--target-saving", "0.2"]) == 2
    assert "--target-saving counts FLOPs" in capsys.readouterr().err


def test_demo_prints_its_results_before_writing_them(monkeypatch, tmp_path, capsys):
    from fxsd.tools import _demo as demo

    runs = [demo.Run(v, 0, [(1.0 if v == "baseline" else 0.8, 0.9)])
            for v in ("baseline", "fxsd")]
    monkeypatch.setattr(demo, "run", lambda **kw: demo.DemoResult(runs, {}))

    def full_disk(result, out_dir):
        raise OSError(28, "No space left on device", str(out_dir / "demo.json"))

    monkeypatch.setattr(demo, "write", full_disk)
    assert main(["demo", "--out", str(tmp_path / "out")]) == 1
    captured = capsys.readouterr()
    assert "fxsd trains in 0.80x the baseline's time" in captured.out
    assert "90.00%" in captured.out
    assert "cannot write" in captured.err and "No space left" in captured.err
    assert "Traceback" not in captured.err


def test_ctrl_c_in_bench_prints_the_steps_timed_so_far(monkeypatch, tmp_path, capsys):
    from fxsd.tools import bench

    calls = {"n": 0}
    step = bench._Runner.step

    def interrupted_step(self, x):  # 5 variants: Ctrl-C during the third timed step
        calls["n"] += 1
        if calls["n"] == 13:
            raise KeyboardInterrupt
        step(self, x)

    monkeypatch.setattr(bench._Runner, "step", interrupted_step)
    path = tmp_path / "partial.json"
    assert main(["bench", "cifar_resnet20", "--steps", "5", "--warmup", "0", "--batch-size",
                 "2", "--wide", "--json", str(path)]) == 130
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and "fxsd: interrupted: after 2 of 5" in captured.err
    assert "2 timed steps per variant" in captured.out
    assert "warning: interrupted (Ctrl-C) after 2 of 5 timed steps" in captured.out
    table = [line.split() for line in captured.out.splitlines()]
    assert [row[0] for row in table if row[:1] in (["baseline"], ["fxsd"])] == [
        "baseline", "fxsd", "fxsd"]
    data = json.loads(path.read_text())
    assert [r["steps"] for r in data["rows"]] == [2] * 5
    assert all(r["limit"] is None for r in data["rows"])


def test_ctrl_c_exits_130_without_a_traceback(monkeypatch, capsys):
    import fxsd.tools._demo
    import fxsd.tools.models
    from fxsd.tools import bench

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(fxsd.tools.models, "load_model", ctrl_c)
    assert main(["inspect", "resnet18"]) == 130
    monkeypatch.setattr(bench, "load_model", ctrl_c)  # before any step: nothing to print
    assert main(["bench", "cifar_resnet20"]) == 130
    captured = capsys.readouterr()
    assert "before any step was timed" in captured.err and captured.out == ""
    monkeypatch.setattr(fxsd.tools._demo, "run", ctrl_c)
    assert main(["demo"]) == 130
    assert "fxsd: interrupted" in capsys.readouterr().err


@pytest.mark.parametrize("columns", [40, 50, 60])
def test_inspect_fits_narrow_terminals(columns, monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", str(columns))
    assert main(["inspect", "resnet18", "--rejected"]) == 0
    out = capsys.readouterr().out
    assert max(len(line) for line in out.splitlines()) <= columns
    header = next(line for line in out.splitlines() if line.startswith("depth"))
    assert "gate" in header and "drop rate" in header and "saving %" in header
    assert f"left out to fit {columns} columns" in " ".join(out.split())


def test_tracing_one_module_at_a_time_reports_progress():
    import torch
    from torch import nn

    import fxsd
    from fxsd.analysis.units import reporting

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return x + self.fc(x)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(Block() for _ in range(3))

        def forward(self, x):
            if x.sum() > 0:  # data-dependent: the root cannot be traced, its blocks can
                x = -x
            for block in self.blocks:
                x = block(x)
            return x

    seen: list[str] = []
    with reporting(seen.append):
        gated = fxsd.stochastic_depth(Net(), 0.1, example_inputs=(torch.randn(2, 4),),
                                      tracing="example")
    assert len(fxsd.gates(gated)) == 3
    assert [p for p in seen if p.startswith("blocks")] == ["blocks.0", "blocks.1", "blocks.2"]
    before = len(seen)
    fxsd.stochastic_depth(Net(), 0.1, example_inputs=(torch.randn(2, 4),), tracing="example")
    assert len(seen) == before  # outside the block, nothing is reported


# --- issue 24, item 10: a transform that saves nothing says so --------------------------------

def drop_path_net(norm: str = "batch"):
    """Three residual blocks whose branch ends in timm's per-row DropPath(0.2): conv + BatchNorm
    (rows mixed, as in EfficientNet's MBConv) or conv + GroupNorm (rows independent)."""
    from timm.layers import DropPath
    from torch import nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.norm = nn.BatchNorm2d(4) if norm == "batch" else nn.GroupNorm(2, 4)
            self.drop_path = DropPath(0.2)

        def forward(self, x):
            return x + self.drop_path(self.norm(self.conv(x)))

    return nn.Sequential(*(Block() for _ in range(3)))


def _transform(model, **options):
    import warnings

    import torch

    import fxsd

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gated = fxsd.stochastic_depth(model, example_inputs=(torch.randn(4, 4, 8, 8),),
                                      seed=0, **options)
    return gated, {type(w.message) for w in caught}, [str(w.message) for w in caught]


def _called(branch):
    """The modules a gate's branch calls (it owns none: it calls its block's)."""
    return [branch.get_submodule(str(n.target)) for n in branch.graph.nodes
            if n.op == "call_module"]


def test_adopted_row_drop_paths_on_row_mixing_branches_default_to_block_mode():
    import torch
    from torch import nn

    import fxsd

    torch.manual_seed(0)
    model = drop_path_net()
    gated, kinds, messages = _transform(model)
    assert kinds == {fxsd.errors.BlockModeWarning}
    assert "3 adopted per-row drop paths" in messages[0] and "mode='sample'" in messages[0]
    assert [(g.mode, g.drop_rate) for g in fxsd.gates(gated)] == [("block", 0.2)] * 3
    assert all("block mode: per-row drops would save nothing" in g.note
               for g in fxsd.gates(gated))
    assert fxsd.expected_saving(gated) > 0.05
    x = torch.randn(4, 4, 8, 8)
    torch.testing.assert_close(gated.eval()(x), model.eval()(x), rtol=0, atol=0)
    # a block-mode branch runs on the whole batch or not at all: the compute is really skipped
    calls = []
    convs = [m for g in fxsd.gates(gated) for m in _called(g.branch) if isinstance(m, nn.Conv2d)]
    assert len(convs) == 3
    for conv in convs:
        conv.register_forward_hook(lambda m, a, out: calls.append(len(out)))
    gated.train()(x)
    assert calls == [4, 4, 4]
    calls.clear()
    fxsd.set_drop_rate(gated, 1.0)
    gated(x)
    assert calls == []


def test_a_transform_that_saves_nothing_warns_and_the_summary_says_why():
    import torch
    from torch import nn

    import fxsd

    gated, kinds, messages = _transform(drop_path_net(), mode="sample")
    assert kinds == {fxsd.errors.NoSavingWarning}
    assert "save no compute" in messages[0] and "mode='block'" in messages[0]
    assert "BatchNorm2d" in messages[0]
    assert {(g.mode, g.sample_impl) for g in fxsd.gates(gated)} == {("sample", "mask")}
    assert fxsd.expected_saving(gated) == 0.0
    text = fxsd.tools.tables.summary(gated)
    assert "expected saving per training step: 0.0%" in text
    assert "no compute saved: every gated branch runs in sample mode with the mask" in text
    # the mask computes every branch on every row, whatever it drops
    rows = []
    convs = [m for g in fxsd.gates(gated) for m in _called(g.branch) if isinstance(m, nn.Conv2d)]
    for conv in convs:  # the gate calls its branch's forward: hook the modules inside it
        conv.register_forward_hook(lambda m, a, out: rows.append(len(out)))
    for _ in range(5):
        gated.train()(torch.randn(4, 4, 8, 8))
    assert rows == [4] * 15
    # rows independent (GroupNorm): per-row drops run on the kept rows only, no warning
    gated, kinds, _ = _transform(drop_path_net("group"))
    assert kinds == set()
    assert {(g.mode, g.sample_impl) for g in fxsd.gates(gated)} == {("sample", "subset")}
    assert "no compute saved" not in fxsd.tools.tables.summary(gated)


def test_inspect_says_why_nothing_is_saved(capsys):
    assert main(["inspect", "tests.test_cli:drop_path_net", "--input-shape", "4,4,8,8",
                 "--wide"]) == 0
    out = capsys.readouterr().out
    assert "block mode: per-row drops would save nothing" in out
    assert "no compute saved" not in out
