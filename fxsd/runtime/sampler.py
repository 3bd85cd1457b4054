"""The random decisions of a transformed model's gates: :class:`DropSampler`, shared by every
gate of one model and drawn on the host.

One seeded :class:`random.Random` gives block decisions, one CPU :class:`torch.Generator` gives
per-row decisions; neither touches torch's or Python's global generators, and both travel with the
model (``deepcopy``, ``torch.save``) and through :func:`fxsd.get_rng_state` /
:func:`fxsd.set_rng_state`.
"""

from __future__ import annotations

import random
from typing import Any

import torch

from fxsd.runtime.distributed import check_unsynced_sharding, unsynced_sharding_generation

__all__ = ["DropSampler"]


class DropSampler:
    """The random decisions a transformed model's gates share, drawn on the host.

    Block decisions come from a :class:`random.Random`, per-row decisions from a CPU
    :class:`torch.Generator`; both are seeded from ``seed``. Drawing needs no device and no
    synchronisation, consumes nothing from torch's or Python's global generators, and the state
    (:meth:`get_state` / :meth:`set_state`) travels with ``deepcopy`` and ``torch.save``.

    Every block gate that runs draws exactly one number per training forward whatever its rate (a
    gate nested in a dropped branch does not run), so a higher rate drops a superset of the sites
    a lower rate drops, and the sequence depends on the seed alone.

    Args:
        seed: the seed (already offset by the rank for per-rank streams).
        sync_ranks: whether every rank draws the same decisions. When not, each draw first makes
            sure no FSDP2-sharded module would issue mismatched collectives
            (:func:`fxsd.runtime.distributed.check_unsynced_sharding`).
    """

    def __init__(self, seed: int, sync_ranks: bool = True) -> None:
        self.seed = int(seed)
        self.sync_ranks = bool(sync_ranks)
        self._rng = random.Random(self.seed)
        self._rows = torch.Generator().manual_seed(self.seed & (2**63 - 1))
        self._sharding_checked = -1

    def _check_sharding(self) -> None:
        generation = unsynced_sharding_generation()
        if generation != self._sharding_checked:
            check_unsynced_sharding()
            self._sharding_checked = generation

    def random(self) -> float:
        """One uniform draw in [0, 1)."""
        if not self.sync_ranks:
            self._check_sharding()
        return self._rng.random()

    def rows(self, n: int) -> torch.Tensor:
        """``n`` uniform draws in [0, 1) as a CPU tensor."""
        if not self.sync_ranks:
            self._check_sharding()
        return torch.rand(n, generator=self._rows)

    def get_state(self) -> dict[str, Any]:
        return {"seed": self.seed, "block": self._rng.getstate(),
                "rows": self._rows.get_state()}

    def set_state(self, state: dict[str, Any]) -> None:
        try:
            self._rng.setstate(state["block"])
            self._rows.set_state(state["rows"])
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            from fxsd.errors import InvalidArgumentError

            raise InvalidArgumentError(
                f"not a state returned by fxsd.get_rng_state: {type(exc).__name__}: {exc}"
            ) from exc

    def __getstate__(self) -> dict[str, Any]:
        return {**self.get_state(), "sync_ranks": self.sync_ranks}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["seed"], state.get("sync_ranks", True))
        self.set_state(state)

    def __repr__(self) -> str:
        sync = "" if self.sync_ranks else ", sync_ranks=False"
        return f"DropSampler(seed={self.seed}{sync})"
