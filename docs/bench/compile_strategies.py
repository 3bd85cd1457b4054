"""Measure the ways of combining fxsd's gates with torch.compile (docs/design.md, "torch.compile").

One training step (forward + backward) of CIFAR ResNet-56 at drop rate 0 for each strategy, all
interleaved in one process, median of ``--steps`` steps, as a ratio to the compiled baseline of
the same memory format::

    python docs/bench/compile_strategies.py --steps 12 --batch-size 32

Strategies (``_cl``: model and input in channels_last):

* ``eager`` — the untransformed model, not compiled;
* ``baseline`` — ``torch.compile(model)``: one graph; ``baseline_nolayout`` with inductor's
  ``layout_optimization`` off;
* ``A`` — ``torch.compile(gm)``: the trunk compiled in segments between the (eager) gates;
* ``B`` — ``torch.compile(fxsd.compile(gm))``: trunk segments and every branch compiled;
* ``C`` — ``fxsd.compile(gm)``: every branch compiled, trunk and gates eager (what fxsd ships);
* ``C_add`` — C with the gate's add compiled into the branch's graph;
* ``U`` — per block, ``relu(shortcut(x) + branch(x))`` compiled as one graph (no gates: the cost
  of compiling block-sized units);
* ``V`` — per block, ``relu`` of the previous block's sum + branch + add as one graph;
* ``cond`` — ``torch.cond`` per block inside one compiled graph, against its own compiled baseline
  (BatchNorm without running statistics, because ``torch.cond`` refuses the buffer updates).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import types

import torch
import torch.nn.functional as F
from torch import nn

import fxsd
from fxsd.graph_module import copy_graph
from fxsd.tools.models import BasicBlock, cifar_resnet
from fxsd.runtime.accessors import gates

NO_LAYOUT = {"layout_optimization": False}


def _combined(gm: nn.Module) -> nn.Module:
    """C_add: each gate calls one compiled graph computing ``skip + branch(*args)``."""
    for gate in gates(gm):
        graph = copy_graph(gate.branch.graph)
        output = next(n for n in graph.nodes if n.op == "output")
        with graph.inserting_before(next(iter(graph.nodes))):
            skip = graph.placeholder("skip")
        with graph.inserting_before(output):
            output.args = (graph.call_function(torch.add, (skip, output.args[0])),)
        gate.__dict__["combined"] = torch.compile(torch.fx.GraphModule(gate.branch, graph))

        def forward(self, skip, *inputs):
            args = (skip, *inputs) if self.identity else inputs
            return self.__dict__["combined"](skip, *args)

        gate.forward = types.MethodType(torch.compiler.disable(forward), gate)
    return gm


def _shortcut(b: BasicBlock, x: torch.Tensor) -> torch.Tensor:
    return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, b.pad, b.pad)) if b.downsample else x


def _branch(b: BasicBlock, x: torch.Tensor) -> torch.Tensor:
    return b.bn2(b.conv2(F.relu(b.bn1(b.conv1(x)))))


class _Unit(nn.Module):
    def __init__(self, fn, *mods: nn.Module) -> None:
        super().__init__()
        self.mods = nn.ModuleList(mods)
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(*self.mods, x)


class _Units(nn.Module):
    """U / V: stem, one compiled graph per block, head (each its own code object)."""

    def __init__(self, m: nn.Module, relu_first: bool) -> None:
        super().__init__()
        blocks = [b for layer in (m.layer1, m.layer2, m.layer3) for b in layer]
        if relu_first:  # V: a block's graph starts with the ReLU of the previous sum
            stem = _Unit(lambda c, n, x: n(c(x)), m.conv1, m.bn1)
            unit = _Unit(lambda b, y: _shortcut(b, F.relu(y)) + _branch(b, F.relu(y)))
            head = _Unit(lambda fc, x: fc(F.adaptive_avg_pool2d(F.relu(x), 1).flatten(1)), m.fc)
        else:  # U: a block's graph ends with the ReLU after its sum
            stem = _Unit(lambda c, n, x: F.relu(n(c(x))), m.conv1, m.bn1)
            unit = _Unit(lambda b, x: F.relu(_shortcut(b, x) + _branch(b, x)))
            head = _Unit(lambda fc, x: fc(F.adaptive_avg_pool2d(x, 1).flatten(1)), m.fc)
        trace = torch.fx.symbolic_trace
        self.stem = torch.compile(trace(stem))
        self.units = [torch.compile(trace(_Unit(unit.fn, b))) for b in blocks]
        self.head = torch.compile(trace(head))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for unit in self.units:
            x = unit(x)
        return self.head(x)


class _CondNet(nn.Module):
    """Every block behind ``torch.cond`` on a per-step boolean; one graph for the whole model."""

    def __init__(self, m: nn.Module) -> None:
        super().__init__()
        self.m = m
        self.blocks = [b for layer in (m.layer1, m.layer2, m.layer3) for b in layer]

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        m = self.m
        x = F.relu(m.bn1(m.conv1(x)))
        for i, b in enumerate(self.blocks):
            def kept(x, s, b=b):
                return s + _branch(b, x)

            def dropped(x, s):
                return s.clone()

            x = F.relu(torch.cond(keep[i], kept, dropped, (x, _shortcut(b, x))))
        return m.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def _no_running_stats(m: nn.Module) -> nn.Module:
    for bn in m.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.track_running_stats = False
            bn.running_mean = bn.running_var = bn.num_batches_tracked = None
    return m


def strategies(model: nn.Module, x: torch.Tensor) -> dict[str, tuple]:
    def build(name: str):
        m, inp = copy.deepcopy(model), x
        if name.endswith("_cl"):
            m = m.to(memory_format=torch.channels_last)
            inp = x.contiguous(memory_format=torch.channels_last)
        kind = name.removesuffix("_cl")
        gated = fxsd.stochastic_depth(m, 0.0) if kind in ("A", "B", "C", "C_add") else None
        f = {
            "eager": lambda: m,
            "baseline": lambda: torch.compile(m),
            "baseline_nolayout": lambda: torch.compile(m, options=NO_LAYOUT),
            "A": lambda: torch.compile(gated),
            "B": lambda: torch.compile(fxsd.compile(gated)),
            "C": lambda: fxsd.compile(gated),
            "C_add": lambda: _combined(gated),
            "U": lambda: _Units(m, relu_first=False),
            "V": lambda: _Units(m, relu_first=True),
        }[kind]()
        return f, (inp,)

    names = ["baseline", "baseline_nolayout", "eager", "eager_cl", "baseline_cl", "A_cl", "B_cl",
             "C", "C_cl", "C_add_cl", "U_cl", "V_cl"]
    variants = {name: build(name) for name in names}
    plain = _no_running_stats(copy.deepcopy(model))
    variants["cond baseline"] = (torch.compile(plain), (x,))
    keep = torch.ones(len(_CondNet(plain).blocks), dtype=torch.bool)
    variants["cond"] = (torch.compile(_CondNet(copy.deepcopy(plain))), (x, keep))
    return variants


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=56)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    torch.manual_seed(0)
    variants = strategies(cifar_resnet(args.depth), torch.randn(args.batch_size, 3, 32, 32))
    times: dict[str, list[float]] = {name: [] for name in variants}
    for step in range(3 + args.steps):
        for name, (f, inputs) in variants.items():
            start = time.perf_counter()
            f(*inputs).sum().backward()
            if step >= 3:
                times[name].append(time.perf_counter() - start)
    ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    print(f"CIFAR ResNet-{args.depth}, batch {args.batch_size}, p = 0, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, median of {args.steps} interleaved steps")
    print("| strategy | ms | vs compiled baseline, same layout |\n| --- | --- | --- |")
    for name, t in ms.items():
        ref = ("cond baseline" if name.startswith("cond")
               else "baseline_cl" if name.endswith("_cl") else "baseline")
        print(f"| {name} | {t:.1f} | {t / ms[ref]:.2f} |")


if __name__ == "__main__":
    main()
