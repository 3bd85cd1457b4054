"""The ``fxsd`` command line (also ``python -m fxsd``): ``fxsd inspect``, ``fxsd check``,
``fxsd bench`` and ``fxsd demo``.

MODEL, in ``inspect``, ``check`` and ``bench``, is a torchvision model name (built with
``weights=None``: nothing is downloaded), ``cifar_resnet<depth>`` (the stochastic-depth paper's
CIFAR network) or ``package.module:callable`` returning an ``nn.Module`` (found from the current
directory too). torch is imported only once a command runs, so ``fxsd --help`` answers at once.
Errors print one line and exit with status 2; ``fxsd check`` exits with 1 when a promise fails.

Every value and output path is checked while the arguments are parsed, before any model is
built, with the checks the Python API runs (:func:`fxsd.distributions.check_rate`,
:func:`fxsd.arguments.check_int`, :func:`fxsd.models.check_spec`, :func:`fxsd.bench.check_device`):
a mistake costs a second, not a traced model. Ctrl-C exits with status 130 and no traceback;
``fxsd bench`` first prints the steps it has timed. Long work shows progress on stderr when it is
a terminal.

A subcommand is a function that adds its arguments and a function that runs it, both named in
:data:`COMMANDS`.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

# imports no torch, so that `fxsd --help` stays quick
from fxsd.distributions import DEFAULT_DROP_RATE, DISTRIBUTIONS

__all__ = ["main", "check_output_dir", "check_output_file"]

DEFAULT_MODEL = "resnet50"
DEFAULT_DEMO_OUT = "fxsd-demo"  # in the current directory, wherever fxsd is installed
MODEL_HELP = ("torchvision model name, cifar_resnet<depth> (e.g. cifar_resnet110) or "
              f"package.module:callable (default: {DEFAULT_MODEL})")
INTERRUPTED = 130  # the shell's status for a command ended by Ctrl-C (128 + SIGINT)


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
    """A rate in [0, 1], checked as the API checks it (:func:`fxsd.distributions.check_rate`)."""

    def rate(text: str) -> float:
        from fxsd.distributions import check_rate

        return check_rate(_number(text, float), what)

    return _argument(rate)


def _int(minimum: int | None, what: str) -> Callable[[str], int]:
    """An int of at least ``minimum``, checked as the API checks ints (``fxsd.arguments``)."""

    def integer(text: str) -> int:
        from fxsd.arguments import check_int

        return check_int(_number(text, int), what, minimum=minimum)

    return _argument(integer)


@_argument
def _model(text: str) -> str:
    """A model spec, checked without building the model (:func:`fxsd.models.check_spec`)."""
    from fxsd.models import check_spec

    return check_spec(text)


@_argument
def _device(text: str) -> str:
    """A device torch has here (:func:`fxsd.bench.check_device`)."""
    from fxsd.bench import check_device

    check_device(text)
    return text


@_argument
def _depth(text: str) -> int:
    from fxsd.models import check_cifar_depth

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


# --- the parser ------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    """``fxsd``'s arguments: a subcommand (:data:`COMMANDS`), then that subcommand's own."""
    parser = argparse.ArgumentParser(
        prog="fxsd", description="Stochastic depth for any residual network (torch.fx pass)."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (arguments, _, help_text) in COMMANDS.items():
        arguments(sub.add_parser(name, help=help_text))
    return parser


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


# --- the subcommands -------------------------------------------------------------------------

_BENCH_OPTIONS = {"model": "MODEL", "drop_rate": "--drop-rate", "distribution": "--distribution",
                  "mode": "--mode", "batch_size": "--batch-size", "image_size": "--image-size",
                  "steps": "--steps", "warmup": "--warmup", "device": "--device", "amp": "--amp",
                  "channels_last": "--channels-last", "compile": "--compile",
                  "compile_backend": "--compile-backend", "seed": "--seed"}


def _inspect(args: argparse.Namespace) -> None:
    from fxsd.analysis import analyze_residuals
    from fxsd.models import load_model
    from fxsd.tables import fill, summary, table, terminal_width
    from fxsd.training import gates

    example, rates = _inspect_plan(args)
    model = load_model(args.model)
    source: Any
    if example is None:
        source = analyze_residuals(model)
    else:  # the gated model: each site's share of a step and its saving
        source = _transform_with_progress(model, args, example)
        rates = {}
        if not gates(source):
            source = analyze_residuals(model, example)
    width = 0 if args.wide else terminal_width()
    print(table(source, rejected=args.rejected, tablefmt=args.format, width=width, **rates))
    print()
    print(fill(f"{args.model}: " + summary(source, **rates), width))


def _check(args: argparse.Namespace) -> int:
    """Transform the model and verify fxsd's promises on it (:func:`fxsd.check`); 1 when one
    does not hold."""
    import torch

    from fxsd.errors import InvalidArgumentError
    from fxsd.models import load_model
    from fxsd.plan import Options
    from fxsd.tables import terminal_width
    from fxsd.verify import check

    shape = args.input_shape
    if shape is None and ":" in args.model:
        raise InvalidArgumentError(f"{args.model} needs --input-shape: fxsd check runs the model "
                                   "on an example input of that shape")
    if shape is None:
        shape = (2, 3, 32, 32) if args.model.startswith("cifar_resnet") else (2, 3, 224, 224)
    example = (torch.randn(shape, generator=torch.Generator().manual_seed(0)),)
    options = {"drop_rate": args.drop_rate, "distribution": args.distribution,
               "mode": args.mode, "scale": args.scale}
    options = {name: value for name, value in options.items() if value is not None}
    Options.validated(example_inputs=example, **options)
    report = check(load_model(args.model), example, **options)
    print(report.table(tablefmt=args.format, width=0 if args.wide else terminal_width()))
    return 0 if report.ok else 1


def _inspect_plan(args: argparse.Namespace) -> tuple[tuple | None, dict[str, Any]]:
    """The example inputs (``None``: no FLOP count) and, for an analysis without a transform,
    the rates its table shows; the options checked together before the model is built, by the
    API's own check (:meth:`fxsd.plan.Options.validated`)."""
    import torch

    from fxsd.errors import InvalidArgumentError
    from fxsd.plan import Options

    shape = args.input_shape
    if shape is None and ":" not in args.model:
        shape = (1, 3, 32, 32) if args.model.startswith("cifar_resnet") else (1, 3, 224, 224)
    if args.no_flops or shape is None:
        if args.target_saving is not None:
            raise InvalidArgumentError("--target-saving counts FLOPs on an example input: drop "
                                       "--no-flops, or give --input-shape for a model spec")
        shape = None
    example = None if shape is None else (torch.zeros(shape),)
    Options.validated(args.drop_rate, args.distribution, args.target_saving,
                      example_inputs=example)
    rate = DEFAULT_DROP_RATE if args.drop_rate is None else args.drop_rate
    return example, {"drop_rate": rate, "distribution": args.distribution or "linear"}


def _transform_with_progress(model: Any, args: argparse.Namespace, example: tuple) -> Any:
    """``fxsd.stochastic_depth`` as the API runs it with no options given but the CLI's, with a
    progress line on stderr while modules are traced one by one (large models, by example)."""
    import warnings

    from fxsd.bench import Progress
    from fxsd.passes.stochastic_depth import NoResidualSitesWarning, stochastic_depth
    from fxsd.units import reporting

    with Progress(None, prefix="[fxsd]").counter("tracing by example", "module") as tick, \
            reporting(tick), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gated = stochastic_depth(model, args.drop_rate, distribution=args.distribution,
                                 target_saving=args.target_saving, example_inputs=example)
    for warning in caught:  # one line each; the table says why there are no sites
        if not issubclass(warning.category, NoResidualSitesWarning):
            print(f"fxsd: warning: {warning.message}", file=sys.stderr)
    return gated


def _bench(args: argparse.Namespace) -> None:
    from fxsd import bench
    from fxsd.errors import InvalidArgumentError

    if args.prune is not None:
        _bench_prune(args)
        return
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
    try:
        result = bench.run(**options)
    except bench.Interrupted as stop:
        if stop.result is not None:  # what was measured before Ctrl-C: printed, then 130
            _bench_report(stop.result, args)
        raise
    _bench_report(result, args)


def _bench_prune(args: argparse.Namespace) -> None:
    """``fxsd bench --prune S``: the plain and pruned models' inference, timed side by side."""
    import json

    from fxsd import bench_prune
    from fxsd.errors import InvalidArgumentError

    given = [flag for name, flag in _BENCH_OPTIONS.items()
             if name in ("drop_rate", "distribution", "mode") and getattr(args, name) is not None]
    if args.transform or given:
        raise InvalidArgumentError(
            "--prune times the plain and the pruned model's inference and takes no "
            f"{', '.join(['--transform'] if args.transform else given)}: run those separately")
    options = {name: getattr(args, name) for name in _BENCH_OPTIONS
               if name not in ("drop_rate", "distribution", "mode")
               and getattr(args, name) is not None}
    result = bench_prune.run(saving=args.prune, **options)
    print(bench_prune.format_table(result, args.format, width=0 if args.wide else None),
          flush=True)
    if args.json:  # after printing: a failed write loses nothing
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result.to_dict(), indent=2))


def _bench_report(result: Any, args: argparse.Namespace) -> None:
    """The table on stdout, then the JSON (printed first: a failed write loses nothing)."""
    import json

    from fxsd import bench

    print(bench.format_table(result, args.format, width=0 if args.wide else None), flush=True)
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result.to_dict(), indent=2))


def _transform(args: argparse.Namespace) -> None:
    import json

    from fxsd import bench

    print("fxsd.stochastic_depth (trace + analysis + rewrite), best of 3, 1 CPU thread; "
          "by example: beside one training step of the plain model on the example batch",
          flush=True)
    line = "{:<20} {:>7} {:>6} {:>7} {:>9} {:>12} {:>8} {:>6}"
    print(line.format("model", "nodes", "sites", "blocks", "seconds", "µs per node", "step s",
                      "steps"))
    print(line.format(*("-" * n for n in (20, 7, 6, 7, 9, 12, 8, 6))), flush=True)
    rows = []
    try:  # each row as soon as it is measured
        for row in bench.transform_rows(by_example=tuple(bench.EXAMPLE_MODELS)):
            rows.append(row)
            step = row["step_seconds"]
            print(line.format(row["model"], row["nodes"], row["sites"], row["blocks"],
                              f"{row['seconds']:.3f}", f"{row['us_per_node']:.0f}",
                              "-" if step is None else f"{step:.3f}",
                              "-" if step is None else f"{row['steps']:.1f}"), flush=True)
    finally:  # interrupted too: the rows measured so far
        if args.json and rows:
            path = Path(args.json)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"transform": rows}, indent=2))


def _demo(args: argparse.Namespace) -> None:
    from fxsd import demo

    result = demo.run(epochs=args.epochs, seeds=args.seeds, depth=args.depth,
                      drop_rate=args.drop_rate, distribution=args.distribution,
                      batch_size=args.batch_size, threads=args.threads, out_dir=None)
    print(result.table(tablefmt="simple"))
    print(f"\nfxsd trains in {result.time_ratio:.2f}x the baseline's time", flush=True)
    if result.pruning:
        print("\npruned for inference (fxsd.prune, greedy, no fine-tuning):\n"
              f"{result.pruning_table(tablefmt='simple')}", flush=True)
    demo.write(result, Path(args.out))  # after printing: a failed write loses no result
    print(f"wrote {args.out}/demo.png, {'demo_prune.png, ' if result.pruning else ''}demo.md, "
          "demo.json")


#: Each subcommand: (adds its arguments, runs it, its line in ``fxsd --help``).
COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None],
                          Callable[[argparse.Namespace], int | None], str]] = {
    "inspect": (_inspect_arguments, _inspect, "show the residual sites of a model"),
    "bench": (_bench_arguments, _bench,
              "time training steps: baseline, fxsd, mask drop path and the limit"),
    "check": (_check_arguments, _check,
              "transform a model and verify fxsd's promises on it (exit status 1 if one fails)"),
    "demo": (_demo_arguments, _demo,
             "train baseline vs fxsd on scikit-learn's digits, prune both for inference; write "
             "plots and tables (needs pip install 'fxsd[demo]')"),
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``fxsd``: 0 on success, 2 for a mistake in the arguments (one line, no traceback),
    1 when the results cannot be written, 130 after Ctrl-C."""
    try:
        args = _parser().parse_args(argv)
    except KeyboardInterrupt:  # parsing imports torch to check some values
        print("\nfxsd: interrupted", file=sys.stderr)
        return INTERRUPTED
    from fxsd.errors import FxsdError

    try:
        status = COMMANDS[args.command][1](args)
    except FxsdError as exc:  # one line, no traceback: these are the user's to fix
        message = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        print(f"fxsd: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:
        detail = getattr(stop, "message", "")
        print(f"\nfxsd: interrupted{f': {detail}' if detail else ''}", file=sys.stderr)
        return INTERRUPTED
    except BrokenPipeError:  # `fxsd inspect | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as exc:  # the work is done and printed; only writing its files failed
        print(f"fxsd: error: cannot write {exc.filename or 'the results'}: {exc.strerror or exc}",
              file=sys.stderr)
        return 1
    return status or 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
