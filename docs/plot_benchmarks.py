"""Plot step time against drop rate from ``fxsd bench --json`` files (needs matplotlib).

    python docs/plot_benchmarks.py docs/bench/2026-11-26/resnet50_linear.json -o docs/benchmarks.png

One panel per file: baseline, fxsd, mask drop path and the limit, in milliseconds per training step.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", type=Path, help="fxsd bench --json outputs")
    parser.add_argument("-o", "--output", type=Path, default=Path("docs/benchmarks.png"))
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(args.results), figsize=(6 * len(args.results), 4.2),
                             squeeze=False)
    for ax, path in zip(axes[0], args.results):
        data = json.loads(path.read_text())
        rows, cfg = data["rows"], data["config"]
        base = next(r["mean_ms"] for r in rows if r["variant"] == "baseline")
        p0 = next(r["mean_ms"] for r in rows if r["variant"] == "fxsd p=0")

        def series(variant: str, rows=rows, start=(p0, base)) -> tuple[list, list]:
            pts = sorted((r["drop_rate"], r["mean_ms"]) for r in rows if r["variant"] == variant)
            first = start[0] if variant == "fxsd" else start[1]
            return [0.0] + [p for p, _ in pts], [first] + [t for _, t in pts]

        ax.axhline(base, color="black", lw=1, ls="--", label="baseline")
        for variant, style in (("mask drop path", "s-"), ("fxsd", "o-"), ("limit", "k:")):
            xs, ys = series(variant)
            if variant == "mask drop path":
                ys[0] = base
            ax.plot(xs, ys, style, label=variant, ms=4)
        m = data["machine"]
        ax.set_title(f"{cfg['model']}, batch {cfg['batch_size']}, {cfg['distribution']} rates\n"
                     f"{m['device']} ({m['threads']} threads), torch {m['torch']}, {m['date']}",
                     fontsize=9)
        ax.set_xlabel("drop rate")
        ax.set_ylabel("mean training step (ms)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.output, dpi=120)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
