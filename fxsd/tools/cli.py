"""The ``fxsd`` command line (also ``python -m fxsd``): ``fxsd inspect``, ``fxsd check``,
``fxsd bench`` and ``fxsd demo``.

MODEL, in ``inspect``, ``check`` and ``bench``, is a torchvision model name (built with
``weights=None``: nothing is downloaded), ``cifar_resnet<depth>`` (the stochastic-depth paper's
CIFAR network) or ``package.module:callable`` returning an ``nn.Module`` (found from the current
directory too). torch is imported only once a command runs, so ``fxsd --help`` answers at once.
Errors print one line and exit with status 2; ``fxsd check`` exits with 1 when a promise fails.

Every value and output path is checked while the arguments are parsed, before any model is
built, with the checks the Python API runs (:func:`fxsd.arguments.check_rate`,
:func:`fxsd.arguments.check_int`, :func:`fxsd.tools.models.check_spec`,
:func:`fxsd.tools.bench.check_device`): a mistake costs a second, not a traced model. Ctrl-C exits
with status 130 and no traceback; ``fxsd bench`` first prints the steps it has timed. Long work
shows progress on stderr when it is a terminal.

A subcommand is a function that adds its arguments and a function that runs it, both named in
:data:`COMMANDS`. The arguments and their checks live in :mod:`fxsd.tools._cli_arguments`, ``fxsd
bench``'s runs in :mod:`fxsd.tools._cli_bench`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fxsd.decisions.distributions import DEFAULT_DROP_RATE

# imports no torch, so that `fxsd --help` stays quick
from fxsd.tools._cli_arguments import (
    _bench_arguments,
    _check_arguments,
    _demo_arguments,
    _inspect_arguments,
)
from fxsd.tools._cli_bench import _bench

__all__ = ["main"]


INTERRUPTED = 130  # the shell's status for a command ended by Ctrl-C (128 + SIGINT)


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


# --- the subcommands -------------------------------------------------------------------------

def _inspect(args: argparse.Namespace) -> None:
    from fxsd.analysis.analyze import analyze_residuals
    from fxsd.runtime.accessors import gates
    from fxsd.tools.models import load_model
    from fxsd.tools.tables import fill, summary, table, terminal_width

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

    from fxsd.decisions.plan import Options
    from fxsd.errors import InvalidArgumentError
    from fxsd.tools.check import check
    from fxsd.tools.models import load_model
    from fxsd.tools.tables import terminal_width

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
    API's own check (:meth:`fxsd.decisions.plan.Options.validated`)."""
    import torch

    from fxsd.decisions.plan import Options
    from fxsd.errors import InvalidArgumentError

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

    from fxsd.analysis.units import reporting
    from fxsd.errors import NoResidualSitesWarning
    from fxsd.tools._progress import Progress
    from fxsd.transform import stochastic_depth

    with Progress(None, prefix="[fxsd]").counter("tracing by example", "module") as tick, \
            reporting(tick), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gated = stochastic_depth(model, args.drop_rate, distribution=args.distribution,
                                 target_saving=args.target_saving, example_inputs=example)
    for warning in caught:  # one line each; the table says why there are no sites
        if not issubclass(warning.category, NoResidualSitesWarning):
            print(f"fxsd: warning: {warning.message}", file=sys.stderr)
    return gated


def _demo(args: argparse.Namespace) -> None:
    from fxsd.tools import _demo as demo

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
