"""The command line: model specs in every subcommand, tables that fit, one-line errors, a fast
``--help``, and the README's example as real output."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from fxsd.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_help_does_not_import_torch():
    # `fxsd --help` must answer at once: importing torch alone takes over a second.
    code = ("import sys\nfrom fxsd.cli import main\ntry:\n    main(['--help'])\n"
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
    result = subprocess.run([sys.executable, "-m", "fxsd.cli", "inspect",
                             "fxsd.models:BasicBlock"], capture_output=True, text=True)
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
    from fxsd.tables import terminal_width

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
    from fxsd.cli import DEFAULT_DEMO_OUT, _parser

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
    from fxsd.cli import _parser

    assert _parser().parse_args(["inspect", "--input-shape", "2, 3,16,16"]).input_shape == (
        2, 3, 16, 16)
