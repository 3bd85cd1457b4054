"""How a skipped branch still produces the values that escape it (found by
:func:`fxsd.analysis.escapes.find_escapes`), without the branch's work.

:class:`EscapePath` runs them: the values holding no tensor from one abstract run
(:func:`abstract_run`, remembered per input signature), the rest for real from those and the
branch's inputs. :class:`DroppedValue` stands in for a value nothing can produce (an attention
layer's weights); any use of it raises. :func:`abstract_run` is the one abstract run fxsd makes of
a branch at run time (also for the zeros a skipped partial join adds).
"""

from __future__ import annotations

import typing
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.fx import GraphModule
from torch.utils._pytree import tree_flatten, tree_map

from fxsd.errors import GraphError, Run
from fxsd.graph_module import HostedGraphModule
from fxsd.preserve import fake_weights

if typing.TYPE_CHECKING:
    from fxsd.runtime.gate_info import GateInfo

__all__ = ["EscapePath", "DroppedValue", "TensorSpec", "abstract_run", "MAX_REMEMBERED"]


class TensorSpec(NamedTuple):
    """What an abstract run tells of a tensor: its shape, dtype and device."""

    shape: torch.Size
    dtype: torch.dtype
    device: torch.device


def abstract_run(module: GraphModule, args: tuple[Any, ...]) -> Any:
    """``module``'s output on ``args`` from one run on fake tensors
    (:func:`~fxsd.preserve.fake_weights`), with its modules in eval mode and their hooks not
    called: each tensor in it is a :class:`TensorSpec`, everything else is the value itself.
    Nothing is computed, drawn or updated. Eval mode, because a skipped branch's zeros and
    escaping values are asked for in either mode and must neither draw (a dropout, the
    model's own drop path) nor depend on a draw. What the module raises arrives as a
    :class:`~fxsd.errors.ModelRunError` (``Run.ABSTRACT``)."""
    # a part of a block's code reads the block's modules: the block's state is what is faked
    owner = module.host if isinstance(module, HostedGraphModule) and module.host is not None \
        else module
    with torch.no_grad(), fake_weights(owner, args, run=Run.ABSTRACT, eval_mode=True) as inputs:
        out = module(*inputs)
        return tree_map(lambda v: TensorSpec(v.shape, v.dtype, v.device)
                        if isinstance(v, torch.Tensor) else v, out)


#: Input signatures whose abstract results a gate remembers before it forgets them all.
MAX_REMEMBERED = 256


class EscapePath:
    """The escaping values of a skipped branch, computed without the branch's work.

    Args:
        abstract: ``(fork, *inputs) -> tuple`` of the values holding no tensor (run abstractly).
        compute: ``(*those values, fork, *inputs) -> tuple`` of the escaping values (run for
            real: the branch's own nodes that compute them).
        names: the escaping values' names, as the gated module's code spells them.
        unproduced: positions (in ``names``) of the values ``compute`` does not return: a
            :class:`DroppedValue` stands in for each.
    """

    def __init__(self, abstract: GraphModule, compute: GraphModule,
                 names: tuple[str, ...], unproduced: tuple[int, ...] = ()) -> None:
        self.abstract = abstract
        self.compute = compute
        self.names = names
        self.unproduced = unproduced
        self._memo: dict[tuple[Any, ...], tuple[Any, ...]] = {}

    def __call__(self, args: tuple[Any, ...], key: tuple[Any, ...], gate: GateInfo
                 ) -> tuple[Any, ...]:
        """The escaping values on ``args`` (``key``: what the abstract values depend on) for
        ``gate``."""
        found = self._memo.get(key)
        if found is None:
            try:
                found = tuple(abstract_run(self.abstract, args))
            except Exception as exc:
                raise GraphError(
                    f"a skipped branch could not produce {', '.join(self.names)} from shapes "
                    f"alone ({type(exc).__name__}: {exc}); pass a rate of 0 for this site or "
                    "exclude it (select=)") from exc
            leaves, _ = tree_flatten(found)
            if any(isinstance(v, TensorSpec) for v in leaves):
                raise GraphError(f"a skipped branch's {', '.join(self.names)} came out as "
                                 "tensors of an abstract run: fxsd cannot produce them")
            if len(self._memo) >= MAX_REMEMBERED:
                self._memo.clear()
            self._memo[key] = found
        computed = iter(self.compute(*found, *args))
        return tuple(DroppedValue(name, gate.name, gate.module_path) if i in self.unproduced
                     else next(computed) for i, name in enumerate(self.names))

    def attach(self, block: nn.Module) -> EscapePath:
        """This path with its two modules hosted by ``block`` (a copy when another block
        hosts them: see :meth:`~fxsd.graph_module.HostedGraphModule.attach`)."""
        abstract, compute = (m.attach(block) if isinstance(m, HostedGraphModule) else m
                             for m in (self.abstract, self.compute))
        if abstract is self.abstract and compute is self.compute:
            return self
        return EscapePath(abstract, compute, self.names, self.unproduced)

    def __getstate__(self) -> dict[str, Any]:
        return {"abstract": self.abstract, "compute": self.compute, "names": self.names,
                "unproduced": self.unproduced}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["abstract"], state["compute"], state["names"],
                      state.get("unproduced", ()))



class DroppedValue:
    """Stands for a value a skipped branch did not compute (a tensor its module returns to a
    caller fxsd did not trace, such as an attention layer's weights). Any use of it raises
    :class:`~fxsd.errors.DroppedValueError`; ``is None`` checks and storing it do not.

    Example:
        >>> DroppedValue("attn_weights", "h.0.residual_gate", "h.0").sum()
        Traceback (most recent call last):
        ...
        fxsd.errors.DroppedValueError: 'attn_weights', which 'h.0' returns, was not computed: ...
    """

    __slots__ = ("name", "gate", "module")

    def __init__(self, name: str, gate: str = "", module: str = "") -> None:
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "gate", gate)
        object.__setattr__(self, "module", module)

    def _fail(self, *args: Any, **kwargs: Any) -> Any:
        from fxsd.errors import DroppedValueError

        returns = f", which '{self.module}' returns," if self.module else ""
        raise DroppedValueError(
            f"'{self.name}'{returns} was not computed: its branch was dropped by "
            f"'{self.gate}' in this training step. Do not ask for it while training "
            "(output_attentions=False), or leave the site out with select=")

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)  # copy, pickle and friends probe for protocols
        return self._fail()

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None
                           ) -> Any:
        found = [a for a in tree_flatten((args, kwargs or {}))[0] if isinstance(a, cls)]
        return found[0]._fail()

    def __repr__(self) -> str:
        return f"DroppedValue({self.name!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return DroppedValue, (self.name, self.gate, self.module)

    __setattr__ = __bool__ = __len__ = __iter__ = __getitem__ = __float__ = __int__ = _fail
    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = __matmul__ = _fail
    __rmatmul__ = __truediv__ = __rtruediv__ = __neg__ = __lt__ = __le__ = __gt__ = _fail
    __ge__ = __index__ = _fail
