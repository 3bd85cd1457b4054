"""The docs say what the code does: every signature in docs/api.md matches the code, every
public name is documented, and the README's numbers and examples are real. (Written after the
docs and the code had drifted apart.)"""

from __future__ import annotations

import ast
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import fxsd

ROOT = Path(__file__).resolve().parents[1]
API = (ROOT / "docs" / "api.md").read_text()
SIGNATURE = re.compile(r"`(fxsd(?:\.\w+)+)\(([^`]*?)\)(?: -> [^`]*)?`")


def _split(params: str) -> list[str]:
    """Split a parameter list at top-level commas."""
    parts, depth, current, quote = [], 0, "", None
    for ch in params:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(current.strip())
            current = ""
            continue
        current += ch
    if current.strip():
        parts.append(current.strip())
    return parts


def _documented() -> list[tuple[str, str]]:
    found = {}
    for match in SIGNATURE.finditer(API.replace("\n", " ")):
        path, params = match.groups()
        if "..." in params or "…" in params:
            continue
        found.setdefault(path, re.sub(r"\s+", " ", params))
    return sorted(found.items())


def _resolve(path: str):
    obj = fxsd
    for atom in path.split(".")[1:]:
        obj = getattr(obj, atom)
    return obj


@pytest.mark.parametrize(("path", "params"), _documented(), ids=[p for p, _ in _documented()])
def test_documented_signature_matches_the_code(path, params):
    obj = _resolve(path)  # importable as documented
    sig = inspect.signature(obj)
    actual = [p for p in sig.parameters.values() if p.name != "self"]
    documented = [p for p in _split(params) if p != "*"]
    names = [p.split("=")[0].strip().lstrip("*") for p in documented]
    assert names == [p.name for p in actual], f"{path}: documented {names}"
    for text, param in zip(documented, actual):
        if "=" in text:
            default = text.split("=", 1)[1].strip()
            try:
                value = ast.literal_eval(default)
            except (ValueError, SyntaxError):
                continue  # not a literal (a callable...): the name check above must do
            assert param.default == value, f"{path}: {param.name} defaults to {param.default!r}"
        elif param.kind not in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            assert param.default is param.empty, f"{path}: {param.name} has a default"


def test_every_public_name_is_documented():
    missing = [name for name in fxsd.__all__ if not re.search(rf"\b{name}\b", API)]
    assert not missing, f"public names missing from docs/api.md: {missing}"


def test_documented_names_exist():
    for path in re.findall(r"`(fxsd(?:\.\w+)+)", API):
        _resolve(path)


@pytest.mark.slow
def test_documented_names_exist_in_a_fresh_interpreter():
    # Attributes load lazily: each documented path must resolve from a bare `import fxsd`.
    paths = sorted(set(re.findall(r"`(fxsd(?:\.\w+)+)", API)))
    code = (f"import fxsd\nfor path in {paths!r}:\n    obj = fxsd\n"
            "    for atom in path.split('.')[1:]:\n        obj = getattr(obj, atom)\nprint('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr


def test_readme_demo_numbers_are_the_recorded_run():
    import json
    import statistics

    root = Path(__file__).resolve().parents[1]
    saved = json.loads((root / "docs" / "demo" / "demo.json").read_text())
    readme = (root / "README.md").read_text()

    def mean(variant, index):
        return statistics.fmean(r["points"][-1][index] for r in saved["runs"]
                                if r["variant"] == variant)

    for variant in ("baseline", "fxsd"):
        assert f"{100 * mean(variant, 1):.2f}%" in readme, variant
        assert f"{mean(variant, 0):.1f} s" in readme, variant
    assert f"{mean('fxsd', 0) / mean('baseline', 0):.2f}×" in readme
    assert (root / "docs" / "demo" / "demo.png").exists()


@pytest.mark.slow
def test_readme_python_examples_run(tmp_path):
    """The README's Python blocks, in order, as one script in a fresh interpreter (a reader
    copies them as they are: names each block uses are defined by it or an earlier one)."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    assert len(blocks) >= 4
    script = tmp_path / "readme.py"
    script.write_text("\n".join(blocks) + "\nprint('README ok')\n")
    env = {**os.environ, "COLUMNS": "200"}  # tables print whole names
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         cwd=tmp_path, timeout=900, env=env)
    assert out.returncode == 0 and out.stdout.rstrip().endswith("README ok"), out.stderr[-3000:]
    for layer in range(4):  # the Llama table: two gates per decoder layer
        assert f"model.layers.{layer}.self_attn_gate" in out.stdout
        assert f"model.layers.{layer}.mlp_gate" in out.stdout


def test_design_module_table_lists_every_module_and_nothing_else():
    # docs/design.md's module table is the map of the code: one row per product module
    text = (ROOT / "docs" / "design.md").read_text()
    table = text[text.index("| module | one concept |"):]
    table = table[:table.index("\n\n")]
    listed = set(re.findall(r"`((?:fxsd|passes)/[\w/]+\.py)`", table))
    files = {str(p.relative_to(ROOT)) for d in ("fxsd", "passes") for p in (ROOT / d).rglob("*.py")
             if p.name != "__init__.py"}
    assert listed == files, (sorted(files - listed), sorted(listed - files))
