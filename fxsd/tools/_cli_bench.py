"""``fxsd bench``'s three runs: training steps (:mod:`fxsd.tools.bench`), ``--prune S``
(:mod:`fxsd.tools.bench_prune`) and ``--transform`` (:mod:`fxsd.tools.bench_transform`).

Each prints its table on stdout first, then writes the JSON that ``--json`` asks for, so a
failed write loses no measurement; Ctrl-C during the training bench prints the steps timed so
far. Options a run does not use are refused, not ignored. The benchmarks are imported only when
the command runs, so that ``fxsd --help`` stays quick.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

_BENCH_OPTIONS = {"model": "MODEL", "drop_rate": "--drop-rate", "distribution": "--distribution",
                  "mode": "--mode", "batch_size": "--batch-size", "image_size": "--image-size",
                  "steps": "--steps", "warmup": "--warmup", "device": "--device", "amp": "--amp",
                  "channels_last": "--channels-last", "compile": "--compile",
                  "compile_backend": "--compile-backend", "seed": "--seed"}


def _bench(args: argparse.Namespace) -> None:
    from fxsd.errors import InvalidArgumentError
    from fxsd.tools import bench

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

    from fxsd.errors import InvalidArgumentError
    from fxsd.tools import bench_prune

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

    from fxsd.tools import bench

    print(bench.format_table(result, args.format, width=0 if args.wide else None), flush=True)
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result.to_dict(), indent=2))


def _transform(args: argparse.Namespace) -> None:
    import json

    from fxsd.tools import bench_transform

    print("fxsd.stochastic_depth (trace + analysis + rewrite), best of 3, 1 CPU thread; "
          "by example: beside one training step of the plain model on the example batch",
          flush=True)
    line = "{:<20} {:>7} {:>6} {:>7} {:>9} {:>12} {:>8} {:>6}"
    print(line.format("model", "nodes", "sites", "blocks", "seconds", "µs per node", "step s",
                      "steps"))
    print(line.format(*("-" * n for n in (20, 7, 6, 7, 9, 12, 8, 6))), flush=True)
    rows = []
    try:  # each row as soon as it is measured
        examples = tuple(bench_transform.EXAMPLE_MODELS)
        for row in bench_transform.transform_rows(by_example=examples):
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
