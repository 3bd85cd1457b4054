"""The ``fxsd`` command line.

``fxsd inspect [MODEL]`` prints the residual sites fxsd finds in a model, the drop rate each would
get, and a one-line summary. MODEL is a torchvision model name (built with ``weights=None``) or
``package.module:callable`` returning an ``nn.Module``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

import torch
from torch import nn

from fxsd.errors import FxsdError, InvalidArgumentError
from fxsd.residuals import analyze_residuals
from fxsd.schedules import DISTRIBUTIONS
from fxsd.table import summary, table

__all__ = ["main", "load_model"]

DEFAULT_MODEL = "resnet50"


def load_model(spec: str) -> nn.Module:
    """Build the model ``spec`` names: a torchvision model name or ``package.module:callable``."""
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise InvalidArgumentError(f"cannot load {spec!r}: {exc}") from exc
        model = factory()
    else:
        import torchvision

        try:
            model = torchvision.models.get_model(spec, weights=None)
        except ValueError as exc:
            raise InvalidArgumentError(
                f"unknown model {spec!r}: give a torchvision model name (see "
                "torchvision.models.list_models()) or package.module:callable"
            ) from exc
    if not isinstance(model, nn.Module):
        raise InvalidArgumentError(f"{spec!r} returned {type(model).__name__}, not an nn.Module")
    return model


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


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "inspect":
            _inspect(args)
    except FxsdError as exc:
        print(f"fxsd: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
