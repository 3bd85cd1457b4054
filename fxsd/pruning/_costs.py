"""What removing a site saves, for :func:`fxsd.prune`: each gate's own forward FLOPs.

One eval forward of the gated model on the examples, on fake tensors (nothing is computed and
nothing the model holds changes; a model that cannot run on them is run for real), counted by
``torch.utils.flop_counter`` with each FLOP charged to the innermost gate whose branch issued
it. Removing a site saves its own cost and that of every site nested in its branch
(:meth:`ForwardCosts.saving`); the skip, the join and the rest of the model stay.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from fxsd.errors import FxsdError, Run
from fxsd.runtime.accessors import named_gates

__all__ = ["ForwardCosts", "forward_costs"]


@dataclass(frozen=True)
class ForwardCosts:
    """Forward FLOPs on the examples: the whole model's (``total``), each gate's own branch's
    (``sites``, nested gates' branches not included) and each gate's ``enclosing`` gates."""

    total: int
    sites: dict[str, int]
    enclosing: dict[str, tuple[str, ...]]

    def saving(self, removed: Iterable[str]) -> float:
        """The fraction of ``total`` that removing the ``removed`` sites saves."""
        gone = set(removed)
        saved = sum(flops for name, flops in self.sites.items()
                    if name in gone or gone.intersection(self.enclosing[name]))
        return saved / self.total if self.total else 0.0


# -- costs ---------------------------------------------------------------------------------------
def forward_costs(model: nn.Module, example_inputs: Sequence[Any] = (),
                  example_kwargs: Mapping[str, Any] | None = None) -> ForwardCosts:
    """Count the gated ``model``'s forward in eval on the examples, each FLOP charged to the
    innermost gate whose branch issued it (:class:`fxsd.decisions.step_costs._Attribution`'s forward
    half).

    Runs on fake tensors; a model that cannot is run for real (its buffers and the random
    generators restored).

    Raises:
        ModelRunError: the model raised on the examples (names the module).
    """
    args, kwargs = tuple(example_inputs), dict(example_kwargs or {})
    try:
        return _count(model, args, kwargs, fake=True)
    except Exception as fake_error:  # noqa: BLE001 - data-dependent code: count a real run
        try:
            return _count(model, args, kwargs, fake=False)
        except FxsdError:
            raise
        except Exception as exc:
            raise FxsdError(
                f"could not count the forward FLOPs of {type(model).__name__} on the example "
                f"inputs: {type(exc).__name__}: {exc} (on fake tensors: "
                f"{type(fake_error).__name__}: {fake_error})") from exc


def _count(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
           fake: bool) -> ForwardCosts:
    from fxsd.decisions.step_costs import _Attribution, counting_run

    gates = named_gates(model)
    # with autograd on, as a training step's forward: under no_grad an nn.MultiheadAttention takes
    # its fused path, whose FLOPs torch.utils.flop_counter does not count
    run = Run.ABSTRACT if fake else Run.EXAMPLE
    with counting_run(model, args, kwargs, fake, run) as (args, kwargs, counter):
        seen = _Attribution(counter)
        handles = [h for name, gate in gates.items() for h in (
            gate.register_forward_pre_hook(lambda m, a, name=name: seen.enter(name, a)),
            gate.register_forward_hook(lambda m, a, out: seen.leave(out)))]
        try:
            model.eval()
            model(*args, **kwargs)
        finally:
            for h in handles:
                h.remove()
        seen.switch(None)
    return ForwardCosts(int(counter.get_total_flops()),
                        {name: int(seen.flops.get(name, 0)) for name in gates},
                        seen.enclosing(gates))
