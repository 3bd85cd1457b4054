"""DistributedDataParallel on a transformed model: two CPU processes on the gloo backend."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import fxsd

STEPS = 20


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(16)
        self.fc = nn.Linear(16, 16)

    def forward(self, x):
        return x + self.fc(self.norm(x))


def _worker(rank: int, world: int, init_file: str, sync: bool, find_unused: bool,
            out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    decisions: list = []
    error = None
    try:
        torch.manual_seed(0)  # same initial weights on every rank
        model = nn.Sequential(*[Block() for _ in range(6)], nn.Linear(16, 1))
        gm = fxsd.stochastic_depth(model, 0.5, distribution="uniform", seed=7, sync_ranks=sync)
        ddp = DDP(gm, find_unused_parameters=find_unused)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
        data = torch.Generator().manual_seed(100 + rank)  # different data per rank
        try:
            for _ in range(STEPS):
                x = torch.randn(8, 16, generator=data)
                loss = ddp(x).pow(2).mean()
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                decisions.append([bool(g.dropped) for g in fxsd.gates(gm)])
        except RuntimeError as exc:
            error = str(exc)
        flat = torch.cat([p.detach().flatten() for p in gm.parameters()]).tolist()
        with open(f"{out}.{rank}", "w") as f:
            json.dump({"decisions": decisions, "params": flat, "error": error}, f)
    finally:
        if error is None:
            dist.destroy_process_group()


def _launch(tmp_path, sync: bool, find_unused: bool = True, world: int = 2) -> list[dict]:
    init_file = tmp_path / "init"
    out = tmp_path / "out.json"
    mp.spawn(_worker, args=(world, str(init_file), sync, find_unused, str(out)), nprocs=world,
             join=True)
    return [json.loads((tmp_path / f"out.json.{r}").read_text()) for r in range(world)]


pytestmark = pytest.mark.skipif(not dist.is_available() or os.name == "nt",
                                reason="needs torch.distributed with gloo")


def test_ddp_sync_ranks_same_decisions_identical_params(tmp_path):
    r0, r1 = _launch(tmp_path, sync=True)
    assert r0["error"] is None and r1["error"] is None
    assert len(r0["decisions"]) == STEPS
    assert r0["decisions"] == r1["decisions"]
    flat = [d for step in r0["decisions"] for d in step]
    assert 0 < sum(flat) < len(flat), "rate 0.5 should drop some branches and keep others"
    assert r0["params"] == r1["params"], "DDP must keep parameters identical across ranks"


def test_ddp_per_rank_streams_differ_and_train(tmp_path):
    r0, r1 = _launch(tmp_path, sync=False)
    assert r0["error"] is None and r1["error"] is None
    assert len(r0["decisions"]) == len(r1["decisions"]) == STEPS
    assert r0["decisions"] != r1["decisions"]
    torch.testing.assert_close(torch.tensor(r0["params"]), torch.tensor(r1["params"]))


def test_ddp_without_find_unused_parameters_fails_as_documented(tmp_path):
    # One process is enough: DDP's reducer raises on the step after a branch was dropped. (With
    # several, the failed collective leaves gloo unable to shut down cleanly.)
    (r0,) = _launch(tmp_path, sync=True, find_unused=False, world=1)
    assert r0["error"] is not None
    assert "find_unused_parameters=True" in r0["error"]
    assert "Expected to have finished reduction in the prior iteration" in r0["error"]
    assert len(r0["decisions"]) < STEPS
