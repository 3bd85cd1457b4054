"""``fxsd demo``: a short configuration of the real-data example (the full one is in docs/demo)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("sklearn")

from fxsd import demo  # noqa: E402
from fxsd.cli import main  # noqa: E402


def test_digits_are_bundled_and_split():
    x, y, x_test, y_test = demo.load_digits()
    assert x.shape[1:] == (3, 8, 8) and len(x) + len(x_test) == 1797
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert set(y.tolist()) == set(y_test.tolist()) == set(range(10))


def test_short_demo_trains_both_variants_and_writes_its_outputs(tmp_path):
    pytest.importorskip("matplotlib")
    result = demo.run(epochs=2, seeds=(0,), depth=8, out_dir=tmp_path, progress=False)
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
    png = (tmp_path / "demo.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_demo_command(tmp_path, capsys):
    assert main(["demo", "--epochs", "1", "--seeds", "3", "--depth", "8", "--out",
                 str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "fxsd trains in" in out and (tmp_path / "demo.md").exists()
