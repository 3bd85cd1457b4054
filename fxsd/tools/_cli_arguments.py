"""The ``fxsd`` command line's arguments: every subcommand's options and how each value is checked.

Each value is checked while the arguments are parsed, before any model is built, with the
checks the Python API runs (:func:`fxsd.arguments.check_rate`,
:func:`fxsd.arguments.check_int`, :func:`fxsd.tools.models.check_spec`,
:func:`fxsd.tools.bench.check_device`): an argparse ``type=`` turns fxsd's error into argparse's own
(usage, the argument's name, status 2). Output paths are checked the same way
(:func:`check_output_dir`, :func:`check_output_file`). Nothing here imports torch at import time,
so that ``fxsd --help`` stays quick.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

# imports no torch, so that `fxsd --help` stays quick
from fxsd.decisions.distributions import DEFAULT_DROP_RATE, DISTRIBUTIONS

__all__ = ["check_output_dir", "check_output_file"]


DEFAULT_MODEL = "resnet50"


DEFAULT_DEMO_OUT = "fxsd-demo"  # in the current directory, wherever fxsd is installed


MODEL_HELP = ("torchvision model name, cifar_resnet<depth> (e.g. cifar_resnet110) or "
              f"package.module:callable (default: {DEFAULT_MODEL})")


# --- argument types: each value checked while parsing, before anything is built -------------

def _argument(check: Callable[[str], Any]) -> Callable[[str], Any]:
    """``check`` as an argparse ``type=``: fxsd's errors become argparse's own (usage, the
    argument's name and the message, status 2), raised while the arguments are parsed."""

    def convert(text: str) -> Any:
        from fxsd.errors import FxsdError

        try:
            return check(text)
        except FxsdError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = check.__name__
    return convert


def _number(text: str, kind: type) -> Any:
    try:
        return kind(text)
    except ValueError:
        what = "an int" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None


def _rate(what: str) -> Callable[[str], float]:
    """A rate in [0, 1], checked as the API checks it
    (:func:`fxsd.arguments.check_rate`)."""

    def rate(text: str) -> float:
        from fxsd.arguments import check_rate

        return check_rate(_number(text, float), what)

    return _argument(rate)


def _int(minimum: int | None, what: str) -> Callable[[str], int]:
    """An int of at least ``minimum``, checked as the API checks ints
    (``fxsd.arguments``)."""

    def integer(text: str) -> int:
        from fxsd.arguments import check_int

        return check_int(_number(text, int), what, minimum=minimum)

    return _argument(integer)


@_argument
def _model(text: str) -> str:
    """A model spec, checked without building the model (:func:`fxsd.tools.models.check_spec`)."""
    from fxsd.tools.models import check_spec

    return check_spec(text)


@_argument
def _device(text: str) -> str:
    """A device torch has here (:func:`fxsd.tools.bench.check_device`)."""
    from fxsd.tools.bench import check_device

    check_device(text)
    return text


@_argument
def _depth(text: str) -> int:
    from fxsd.tools.models import check_cifar_depth

    return check_cifar_depth(_number(text, int), "--depth")


@_argument
def _out_dir(text: str) -> str:
    check_output_dir(text, "--out")
    return text


@_argument
def _json_path(text: str) -> str:
    check_output_file(text, "--json")
    return text


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


def check_output_dir(path: str | os.PathLike[str], what: str = "out_dir") -> Path:
    """``path`` if it is a folder, or one that can be created (its nearest existing ancestor is
    a writable folder): checked before the work whose results go there.

    Raises:
        InvalidArgumentError: ``path`` is a file, lies under a file, or cannot be written.
    """
    from fxsd.errors import InvalidArgumentError

    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise InvalidArgumentError(
            f"{what} {str(folder)!r} is a file, not a folder: name a folder (created if needed)")
    existing = folder.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise InvalidArgumentError(
            f"{what} {str(folder)!r} cannot be created: {str(existing)!r} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InvalidArgumentError(
            f"{what} {str(folder)!r} cannot be written: {str(existing)!r} is not writable")
    return folder


def check_output_file(path: str | os.PathLike[str], what: str = "path") -> Path:
    """``path`` if a file can be written there (its folder exists or can be created; an
    existing file is replaced), checked before the work whose results go there."""
    from fxsd.errors import InvalidArgumentError

    file = Path(path)
    if file.is_dir():
        raise InvalidArgumentError(f"{what} {str(file)!r} is a folder: name a file in it")
    check_output_dir(file.parent, f"the folder of {what}")
    return file


def _inspect_arguments(inspect: argparse.ArgumentParser) -> None:
    """``fxsd inspect``'s arguments."""
    inspect.add_argument("model", nargs="?", default=DEFAULT_MODEL, type=_model, help=MODEL_HELP)
    rates = inspect.add_mutually_exclusive_group()
    rates.add_argument("--drop-rate", type=_rate("--drop-rate"), default=None,
                       help="largest drop rate (default: the model's own drop-path rates if it "
                            f"has drop paths, else {DEFAULT_DROP_RATE}, as in the API)")
    rates.add_argument("--target-saving", type=_rate("--target-saving"), default=None,
                       metavar="S",
                       help="instead of --drop-rate: the rates whose drops save this share of a "
                            "training step's FLOPs (e.g. 0.25)")
    inspect.add_argument("--distribution", default=None, choices=DISTRIBUTIONS,
                         help="how rates grow with depth (default: linear)")
    inspect.add_argument("--rejected", action="store_true",
                         help="also list the adds that are not residual sites, with reasons")
    inspect.add_argument("--input-shape", type=_shape, default=None,
                         help="shape of an example input, for FLOP counts (default: 1,3,32,32 "
                              "for CIFAR models, 1,3,224,224 for torchvision models)")
    inspect.add_argument("--no-flops", action="store_true", help="skip the FLOP count")
    _table_arguments(inspect, "do not shorten cells to fit the terminal")


def _table_arguments(parser: argparse.ArgumentParser, wide_help: str) -> None:
    parser.add_argument("--format", type=_tablefmt, default="simple",
                        help="tabulate format (default: simple)")
    parser.add_argument("--wide", action="store_true", help=wide_help)


def _bench_arguments(bench: argparse.ArgumentParser) -> None:
    """``fxsd bench``'s arguments."""
    # Defaults are None so that --transform can refuse the options it does not use.
    bench.add_argument("model", nargs="?", default=None, type=_model, help=MODEL_HELP)
    bench.add_argument("--drop-rate", type=_rate("--drop-rate"), nargs="+", default=None,
                       help="one or more drop rates (default: 0.5)")
    bench.add_argument("--distribution", default=None, choices=DISTRIBUTIONS,
                       help="default: linear")
    bench.add_argument("--mode", default=None, choices=["block", "sample"],
                       help="block (default), or sample (adds an 'fxsd (mask)' row beside fxsd's "
                            "default subset-where-exact implementation)")
    bench.add_argument("--batch-size", type=_int(1, "--batch-size"), default=None,
                       help="default: 16")
    bench.add_argument("--image-size", type=_int(1, "--image-size"), default=None,
                       help="input height and width (default: 32 for CIFAR models, else 64)")
    bench.add_argument("--steps", type=_int(1, "--steps"), default=None,
                       help="timed steps per variant, interleaved (default: 20)")
    bench.add_argument("--warmup", type=_int(0, "--warmup"), default=None,
                       help="untimed steps per variant (default: 3)")
    bench.add_argument("--device", type=_device, default=None,
                       help="cpu, cuda[:N] or mps, where torch has it (default: cpu)")
    bench.add_argument("--amp", default=None, choices=["bf16", "fp16"],
                       help="autocast dtype (default: off)")
    bench.add_argument("--channels-last", action="store_true", default=None)
    bench.add_argument("--compile", action="store_true", default=None,
                       help="add torch.compile rows: compiled baseline vs fxsd.compile")
    bench.add_argument("--compile-backend", default=None, help="default: inductor")
    bench.add_argument("--seed", type=_int(None, "--seed"), default=None, help="default: 0")
    bench.add_argument("--json", metavar="PATH", type=_json_path,
                       help="also write the measurements as JSON (its folder is created)")
    bench.add_argument("--transform", action="store_true",
                       help="time the pass itself (resnet152, vit_l_16, residual MLPs; tiny "
                            "Llama, T5 and diffusers UNet traced by example, beside a training "
                            "step) instead; takes no MODEL and none of the timing options")
    bench.add_argument("--prune", type=_rate("--prune"), default=None, metavar="S",
                       help="instead: time inference (eval, no_grad) of the plain model and of "
                            "fxsd.prune(model, S) (e.g. 0.25 of its forward FLOPs), side by "
                            "side, beside their FLOP ratio; takes no --drop-rate, "
                            "--distribution or --mode")
    _table_arguments(bench, "do not fit the table to the terminal")


def _demo_arguments(demo: argparse.ArgumentParser) -> None:
    """``fxsd demo``'s arguments."""
    demo.add_argument("--epochs", type=_int(1, "--epochs"), default=12, help="default: 12")
    demo.add_argument("--seeds", type=_int(None, "--seeds"), nargs="+", default=[0, 1, 2],
                      help="default: 0 1 2")
    demo.add_argument("--depth", type=_depth, default=56,
                      help="CIFAR ResNet depth 6n+2 (default: 56)")
    demo.add_argument("--drop-rate", type=_rate("--drop-rate"), default=0.5,
                      help="default: 0.5 (the paper's)")
    demo.add_argument("--distribution", default="linear", choices=DISTRIBUTIONS,
                      help="default: linear")
    demo.add_argument("--batch-size", type=_int(1, "--batch-size"), default=64,
                      help="default: 64")
    demo.add_argument("--threads", type=_int(1, "--threads"), default=None,
                      help="torch threads (default: as is)")
    demo.add_argument("--out", type=_out_dir, default=DEFAULT_DEMO_OUT,
                      help="folder for demo.png, demo_prune.png, demo.md, demo.json, created if "
                           "needed "
                           f"(default: ./{DEFAULT_DEMO_OUT})")


def _check_arguments(check: argparse.ArgumentParser) -> None:
    """``fxsd check``'s arguments."""
    check.add_argument("model", nargs="?", default=DEFAULT_MODEL, type=_model, help=MODEL_HELP)
    check.add_argument("--drop-rate", type=_rate("--drop-rate"), default=None,
                       help="largest drop rate (default: as fxsd.stochastic_depth)")
    check.add_argument("--distribution", default=None, choices=DISTRIBUTIONS,
                       help="how rates grow with depth (default: linear)")
    check.add_argument("--mode", default=None, choices=["block", "sample"],
                       help="block (default) or sample")
    check.add_argument("--scale", default=None, choices=["train", "eval", "none"],
                       help="train (default), eval or none")
    check.add_argument("--input-shape", type=_shape, default=None,
                       help="shape of the example input (default: 2,3,32,32 for CIFAR models, "
                            "2,3,224,224 for torchvision models; needed for package.module:"
                            "callable)")
    _table_arguments(check, "do not wrap the report to the terminal")
