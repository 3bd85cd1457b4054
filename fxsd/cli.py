"""The ``fxsd`` command line.

``fxsd inspect [MODEL]`` prints the residual sites fxsd finds in a model, the drop rate each would
get, and a one-line summary. MODEL is a torchvision model name (built with ``weights=None``) or
``package.module:callable`` returning an ``nn.Module``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch

from fxsd.errors import FxsdError
from fxsd.models import load_model
from fxsd.residuals import analyze_residuals
from fxsd.schedules import DISTRIBUTIONS
from fxsd.table import summary, table

__all__ = ["main"]

DEFAULT_MODEL = "resnet50"


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(x) for x in text.replace("x", ",").split(",") if x)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a shape like 1,3,224,224, got {text!r}") from None
    if not shape:
        raise argparse.ArgumentTypeError("empty shape")
    return shape


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fxsd", description="Stochastic depth for any residual network (torch.fx pass)."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    inspect = sub.add_parser("inspect", help="show the residual sites of a model")
    inspect.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                         help=f"torchvision model name or package.module:callable "
                              f"(default: {DEFAULT_MODEL})")
    inspect.add_argument("--drop-rate", type=float, default=0.2,
                         help="largest drop rate (default: 0.2)")
    inspect.add_argument("--distribution", default="linear", choices=DISTRIBUTIONS,
                         help="how rates grow with depth (default: linear)")
    inspect.add_argument("--rejected", action="store_true",
                         help="also list the adds that are not residual sites, with reasons")
    inspect.add_argument("--input-shape", type=_shape, default=None,
                         help="shape of an example input, for FLOP counts (default for "
                              "torchvision models: 1,3,224,224)")
    inspect.add_argument("--no-flops", action="store_true", help="skip the FLOP count")
    inspect.add_argument("--format", default="simple", help="tabulate format (default: simple)")

    bench = sub.add_parser(
        "bench", help="time training steps: baseline, fxsd, mask drop path and the limit")
    bench.add_argument("model", nargs="?", default="resnet50",
                       help="torchvision model name, cifar_resnet<depth> (e.g. cifar_resnet110) "
                            "or package.module:callable (default: resnet50)")
    bench.add_argument("--drop-rate", type=float, nargs="+", default=[0.5],
                       help="one or more drop rates (default: 0.5)")
    bench.add_argument("--distribution", default="linear", choices=DISTRIBUTIONS)
    bench.add_argument("--mode", default="block", choices=["block", "sample"],
                       help="block, or sample (adds an 'fxsd (mask)' row beside fxsd's default "
                            "subset-where-exact implementation)")
    bench.add_argument("--batch-size", type=int, default=16)
    bench.add_argument("--image-size", type=int, default=None,
                       help="input height and width (default: 32 for CIFAR models, else 64)")
    bench.add_argument("--steps", type=int, default=20,
                       help="timed steps per variant, interleaved (default: 20)")
    bench.add_argument("--warmup", type=int, default=3, help="untimed steps per variant")
    bench.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    bench.add_argument("--amp", default=None, choices=["bf16", "fp16"],
                       help="autocast dtype (default: off)")
    bench.add_argument("--channels-last", action="store_true")
    bench.add_argument("--compile", action="store_true",
                       help="add torch.compile rows: compiled baseline vs fxsd.compile")
    bench.add_argument("--compile-backend", default="inductor")
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--json", metavar="PATH", help="also write the measurements as JSON")
    bench.add_argument("--transform", action="store_true",
                       help="time the pass itself (resnet152, vit_l_16, residual MLPs) instead")
    bench.add_argument("--format", default="simple", help="tabulate format (default: simple)")
    return parser


def _inspect(args: argparse.Namespace) -> None:
    model = load_model(args.model)
    shape = args.input_shape
    if shape is None and ":" not in args.model:
        shape = (1, 3, 224, 224)
    example = None if args.no_flops or shape is None else (torch.zeros(shape),)
    analysis = analyze_residuals(model, example)
    print(table(analysis, drop_rate=args.drop_rate, distribution=args.distribution,
                rejected=args.rejected, tablefmt=args.format))
    print()
    print(f"{args.model}: " + summary(analysis, drop_rate=args.drop_rate,
                                       distribution=args.distribution))


def _bench(args: argparse.Namespace) -> None:
    import json

    from fxsd import bench

    if args.transform:
        rows = bench.transform_times()
        print("fxsd.stochastic_depth (trace + analysis + rewrite), best of 3, 1 CPU thread")
        print(tabulate_rows(rows, args.format))
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"transform": rows}, f, indent=2)
        return
    result = bench.run(
        model=args.model, drop_rates=tuple(args.drop_rate), distribution=args.distribution,
        mode=args.mode, compile=args.compile, compile_backend=args.compile_backend,
        batch_size=args.batch_size, image_size=args.image_size, steps=args.steps,
        warmup=args.warmup, device=args.device, amp=args.amp, channels_last=args.channels_last,
        seed=args.seed, progress=lambda msg: print(f"[fxsd bench] {msg}", file=sys.stderr),
    )
    print(bench.format_table(result, args.format))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result.to_dict(), f, indent=2)


def tabulate_rows(rows: list[dict], tablefmt: str) -> str:
    from tabulate import tabulate

    return tabulate([[r["model"], r["nodes"], r["sites"], f"{r['seconds']:.3f}",
                      f"{r['us_per_node']:.0f}"] for r in rows],
                    headers=["model", "nodes", "sites", "seconds", "µs per node"],
                    tablefmt=tablefmt, disable_numparse=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "inspect":
            _inspect(args)
        elif args.command == "bench":
            _bench(args)
    except FxsdError as exc:
        print(f"fxsd: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
