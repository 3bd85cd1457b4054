"""The ``fxsd`` command line (also ``python -m fxsd``): ``fxsd inspect``, ``fxsd bench`` and
``fxsd demo``.

MODEL, in ``inspect`` and ``bench``, is a torchvision model name (built with ``weights=None``:
nothing is downloaded), ``cifar_resnet<depth>`` (the stochastic-depth paper's CIFAR network) or
``package.module:callable`` returning an ``nn.Module`` (found from the current directory too).
torch is imported only once a command runs, so ``fxsd --help`` answers at once. Errors print one
line and exit with status 2.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence
from typing import Any

from fxsd.distributions import DISTRIBUTIONS  # imports no torch: `fxsd --help` stays quick

__all__ = ["main"]

DEFAULT_MODEL = "resnet50"
DEFAULT_DEMO_OUT = "fxsd-demo"  # in the current directory, wherever fxsd is installed
MODEL_HELP = ("torchvision model name, cifar_resnet<depth> (e.g. cifar_resnet110) or "
              f"package.module:callable (default: {DEFAULT_MODEL})")


def _shape(text: str) -> tuple[int, ...]:
    """``1,3,224,224`` -> ``(1, 3, 224, 224)``: positive ints and commas only, nothing skipped."""
    if not re.fullmatch(r"\s*[0-9]+\s*(,\s*[0-9]+\s*)*", text) or any(
            int(x) == 0 for x in text.split(",")):
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated list of positive ints like 1,3,224,224, got {text!r}")
    return tuple(int(x) for x in text.split(","))


def _tablefmt(text: str) -> str:
    from tabulate import tabulate_formats

    if text not in tabulate_formats:
        raise argparse.ArgumentTypeError(
            f"unknown table format {text!r}; use one of: {', '.join(sorted(tabulate_formats))}")
    return text


def _parser() -> argparse.ArgumentParser:
    """``fxsd``'s arguments: a subcommand, then that subcommand's own."""
    parser = argparse.ArgumentParser(
        prog="fxsd", description="Stochastic depth for any residual network (torch.fx pass)."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _inspect_arguments(sub.add_parser("inspect", help="show the residual sites of a model"))
    _bench_arguments(sub.add_parser(
        "bench", help="time training steps: baseline, fxsd, mask drop path and the limit"))
    _demo_arguments(sub.add_parser(
        "demo", help="train baseline vs fxsd on scikit-learn's digits; write a plot and a table "
                     "(needs pip install 'fxsd[demo]')"))
    return parser


def _inspect_arguments(inspect: argparse.ArgumentParser) -> None:
    """``fxsd inspect``'s arguments."""
    inspect.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=MODEL_HELP)
    inspect.add_argument("--drop-rate", type=float, default=None,
                         help="largest drop rate (default: 0.2)")
    inspect.add_argument("--target-saving", type=float, default=None, metavar="S",
                         help="instead of --drop-rate: the rates whose drops save this share of "
                              "a training step's FLOPs (e.g. 0.25)")
    inspect.add_argument("--distribution", default="linear", choices=DISTRIBUTIONS,
                         help="how rates grow with depth (default: linear)")
    inspect.add_argument("--rejected", action="store_true",
                         help="also list the adds that are not residual sites, with reasons")
    inspect.add_argument("--input-shape", type=_shape, default=None,
                         help="shape of an example input, for FLOP counts (default: 1,3,32,32 "
                              "for CIFAR models, 1,3,224,224 for torchvision models)")
    inspect.add_argument("--no-flops", action="store_true", help="skip the FLOP count")
    inspect.add_argument("--format", type=_tablefmt, default="simple",
                         help="tabulate format (default: simple)")
    inspect.add_argument("--wide", action="store_true",
                         help="do not shorten cells to fit the terminal")


def _bench_arguments(bench: argparse.ArgumentParser) -> None:
    """``fxsd bench``'s arguments."""
    # Defaults are None so that --transform can refuse the options it does not use.
    bench.add_argument("model", nargs="?", default=None, help=MODEL_HELP)
    bench.add_argument("--drop-rate", type=float, nargs="+", default=None,
                       help="one or more drop rates (default: 0.5)")
    bench.add_argument("--distribution", default=None, choices=DISTRIBUTIONS,
                       help="default: linear")
    bench.add_argument("--mode", default=None, choices=["block", "sample"],
                       help="block (default), or sample (adds an 'fxsd (mask)' row beside fxsd's "
                            "default subset-where-exact implementation)")
    bench.add_argument("--batch-size", type=int, default=None, help="default: 16")
    bench.add_argument("--image-size", type=int, default=None,
                       help="input height and width (default: 32 for CIFAR models, else 64)")
    bench.add_argument("--steps", type=int, default=None,
                       help="timed steps per variant, interleaved (default: 20)")
    bench.add_argument("--warmup", type=int, default=None,
                       help="untimed steps per variant (default: 3)")
    bench.add_argument("--device", default=None, help="cpu or cuda (default: cpu)")
    bench.add_argument("--amp", default=None, choices=["bf16", "fp16"],
                       help="autocast dtype (default: off)")
    bench.add_argument("--channels-last", action="store_true", default=None)
    bench.add_argument("--compile", action="store_true", default=None,
                       help="add torch.compile rows: compiled baseline vs fxsd.compile")
    bench.add_argument("--compile-backend", default=None, help="default: inductor")
    bench.add_argument("--seed", type=int, default=None, help="default: 0")
    bench.add_argument("--json", metavar="PATH", help="also write the measurements as JSON")
    bench.add_argument("--transform", action="store_true",
                       help="time the pass itself (resnet152, vit_l_16, residual MLPs) instead; "
                            "takes no MODEL and none of the timing options")
    bench.add_argument("--format", type=_tablefmt, default="simple",
                       help="tabulate format (default: simple)")
    bench.add_argument("--wide", action="store_true",
                       help="do not fit the table to the terminal")


def _demo_arguments(demo: argparse.ArgumentParser) -> None:
    """``fxsd demo``'s arguments."""
    demo.add_argument("--epochs", type=int, default=12, help="default: 12")
    demo.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="default: 0 1 2")
    demo.add_argument("--depth", type=int, default=56, help="CIFAR ResNet depth 6n+2 (default: 56)")
    demo.add_argument("--drop-rate", type=float, default=0.5, help="default: 0.5")
    demo.add_argument("--distribution", default="linear", choices=DISTRIBUTIONS,
                      help="default: linear")
    demo.add_argument("--batch-size", type=int, default=64, help="default: 64")
    demo.add_argument("--threads", type=int, default=None, help="torch threads (default: as is)")
    demo.add_argument("--out", default=DEFAULT_DEMO_OUT,
                      help="folder for demo.png, demo.md, demo.json, created if needed "
                           f"(default: ./{DEFAULT_DEMO_OUT})")


_BENCH_OPTIONS = {"model": "MODEL", "drop_rate": "--drop-rate", "distribution": "--distribution",
                  "mode": "--mode", "batch_size": "--batch-size", "image_size": "--image-size",
                  "steps": "--steps", "warmup": "--warmup", "device": "--device", "amp": "--amp",
                  "channels_last": "--channels-last", "compile": "--compile",
                  "compile_backend": "--compile-backend", "seed": "--seed"}


def _inspect(args: argparse.Namespace) -> None:
    import warnings

    import torch

    from fxsd.analysis import analyze_residuals
    from fxsd.errors import InvalidArgumentError
    from fxsd.models import load_model
    from fxsd.passes.stochastic_depth import NoResidualSitesWarning, stochastic_depth
    from fxsd.tables import fill, summary, table, terminal_width
    from fxsd.training import gates

    model = load_model(args.model)
    shape = args.input_shape
    if shape is None and ":" not in args.model:
        shape = (1, 3, 32, 32) if args.model.startswith("cifar_resnet") else (1, 3, 224, 224)
    example = None if args.no_flops or shape is None else (torch.zeros(shape),)
    if args.target_saving is not None and args.drop_rate is not None:
        raise InvalidArgumentError("give --drop-rate or --target-saving, not both")
    drop_rate = 0.2 if args.drop_rate is None and args.target_saving is None else args.drop_rate
    source: Any = analyze_residuals(model, example) if example is None else None
    rates: dict[str, Any] = {"drop_rate": drop_rate, "distribution": args.distribution}
    if source is None:  # the gated model: each site's share of a step and its saving
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NoResidualSitesWarning)
            source = stochastic_depth(model, drop_rate, distribution=args.distribution,
                                      target_saving=args.target_saving,
                                      example_inputs=example)
        rates = {}
        if not gates(source):
            source = analyze_residuals(model, example)
    elif args.target_saving is not None:
        raise InvalidArgumentError("--target-saving counts FLOPs on an example input: drop "
                                   "--no-flops, or give --input-shape for a model spec")
    width = 0 if args.wide else terminal_width()
    print(table(source, rejected=args.rejected, tablefmt=args.format, width=width, **rates))
    print()
    print(fill(f"{args.model}: " + summary(source, **rates), width))


def _bench(args: argparse.Namespace) -> None:
    import json

    from fxsd import bench
    from fxsd.errors import InvalidArgumentError

    if args.transform:
        given = [flag for name, flag in _BENCH_OPTIONS.items()
                 if getattr(args, name) not in (None, False)]
        if given:
            raise InvalidArgumentError(
                f"--transform times the pass on fixed models and takes no {', '.join(given)}")
        _transform(args)
        return
    options = {name: getattr(args, name) for name in _BENCH_OPTIONS
               if name != "drop_rate" and getattr(args, name) is not None}
    if args.drop_rate is not None:
        options["drop_rates"] = tuple(args.drop_rate)
    result = bench.run(**options)
    print(bench.format_table(result, args.format, width=0 if args.wide else None))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result.to_dict(), f, indent=2)


def _transform(args: argparse.Namespace) -> None:
    import json

    from fxsd import bench

    print("fxsd.stochastic_depth (trace + analysis + rewrite), best of 3, 1 CPU thread",
          flush=True)
    line = "{:<20} {:>7} {:>6} {:>7} {:>9} {:>12}"
    print(line.format("model", "nodes", "sites", "blocks", "seconds", "µs per node"))
    print(line.format("-" * 20, "-" * 7, "-" * 6, "-" * 7, "-" * 9, "-" * 12), flush=True)
    rows = []
    for row in bench.transform_rows():  # each row as soon as it is measured
        rows.append(row)
        print(line.format(row["model"], row["nodes"], row["sites"], row["blocks"],
                          f"{row['seconds']:.3f}", f"{row['us_per_node']:.0f}"), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"transform": rows}, f, indent=2)


def _demo(args: argparse.Namespace) -> None:
    from fxsd import demo

    result = demo.run(epochs=args.epochs, seeds=args.seeds, depth=args.depth,
                      drop_rate=args.drop_rate, distribution=args.distribution,
                      batch_size=args.batch_size, threads=args.threads, out_dir=args.out)
    print(result.table(tablefmt="simple"))
    print(f"\nfxsd trains in {result.time_ratio:.2f}x the baseline's time; wrote {args.out}/"
          "demo.png, demo.md, demo.json")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from fxsd.errors import FxsdError

    try:
        if args.command == "inspect":
            _inspect(args)
        elif args.command == "bench":
            _bench(args)
        elif args.command == "demo":
            _demo(args)
    except FxsdError as exc:  # one line, no traceback: these are the user's to fix
        message = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        print(f"fxsd: error: {message}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `fxsd inspect | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
