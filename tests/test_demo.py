"""``fxsd demo``: a short configuration of the real-data example (the full one is in docs/demo)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("sklearn")

from fxsd.errors import InvalidArgumentError, InvalidTypeError  # noqa: E402
from fxsd.tools import _demo as demo  # noqa: E402
from fxsd.tools.cli import main  # noqa: E402


def test_digits_are_bundled_and_split():
    x, y, x_test, y_test = demo.load_digits()
    assert x.shape[1:] == (3, 8, 8) and len(x) + len(x_test) == 1797
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert set(y.tolist()) == set(y_test.tolist()) == set(range(10))


def test_short_demo_trains_both_variants_and_writes_its_outputs(tmp_path):
    pytest.importorskip("matplotlib")
    # two pruning levels, not six (given unsorted: the demo sorts them)
    result = demo.run(epochs=2, seeds=(0,), depth=8, out_dir=tmp_path, progress=False,
                      prune_savings=(0.3, 0.0))
    assert [(r.variant, r.seed, len(r.points)) for r in result.runs] == [
        ("baseline", 0, 2), ("fxsd", 0, 2)]
    for r in result.runs:
        times = [t for t, _ in r.points]
        assert times == sorted(times) and times[0] > 0
        assert r.accuracy > 0.3, "two epochs on digits learn well beyond chance (10%)"
    saved = json.loads((tmp_path / "demo.json").read_text())
    assert saved["settings"]["depth"] == 8 and len(saved["runs"]) == 2
    text = (tmp_path / "demo.md").read_text()
    assert "baseline (mean)" in text and f"{result.time_ratio:.2f}×" in text
    for name in ("demo.png", "demo_prune.png"):
        png = (tmp_path / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert len(saved["pruning"]) == 4 and "Pruned for inference" in text
    _assert_both_trained_models_pruned(result)


def _assert_both_trained_models_pruned(result: demo.DemoResult) -> None:
    """Each trained model at each target; saving 0 is the trained model itself."""
    assert result.settings["prune_savings"] == [0.0, 0.3]
    trained = {(r.variant, r.seed): r for r in result.runs}
    assert [(p.variant, p.seed, p.target) for p in result.pruning] == [
        (v, 0, t) for v in ("baseline", "fxsd") for t in (0.0, 0.3)]
    for p in result.pruning:
        if p.target == 0.0:  # nothing removed: the trained model's own test accuracy, exactly
            assert p.removed == [] and p.flops == p.full_flops
            assert p.accuracy == trained[p.variant, p.seed].accuracy
        else:
            assert p.removed and p.saving >= 0.3 and p.flops < p.full_flops
    table = result.pruning_table().splitlines()
    rows = [line for line in table[2:] if line.strip()]
    assert [line.split("|")[1].strip() for line in rows] == ["baseline"] * 2 + ["fxsd"] * 2
    for variant in ("baseline", "fxsd"):  # the table's accuracy at 0% is the trained mean
        (row,) = [line for line in rows if line.split("|")[1].strip() == variant
                  and line.split("|")[2].strip() == "0%"]
        assert f"{100 * result.mean(variant, 'accuracy'):.2f}%" in row


def test_pruning_targets_are_checked_before_training():
    with pytest.raises(InvalidArgumentError, match="at most 0.96"):
        demo.run(epochs=1, seeds=(0,), depth=8, out_dir=None, progress=False,
                 prune_savings=(0.99,))
    with pytest.raises(InvalidTypeError, match="prune_savings"):
        demo.run(epochs=1, seeds=(0,), depth=8, out_dir=None, prune_savings=0.2)
    with pytest.raises(InvalidArgumentError, match="prune_batches"):
        demo.run(epochs=1, seeds=(0,), depth=8, out_dir=None, prune_batches=0)


def test_demo_command(tmp_path, capsys):
    assert main(["demo", "--epochs", "1", "--seeds", "3", "--depth", "8", "--out",
                 str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "fxsd trains in" in out and (tmp_path / "demo.md").exists()
    assert "pruned for inference" in out and (tmp_path / "demo_prune.png").exists()
