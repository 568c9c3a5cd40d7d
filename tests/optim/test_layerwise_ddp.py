"""Layer-wise GaLore under data parallelism: 2 gloo ranks equal one process with the same global batch.

Real processes (torch.multiprocessing spawn) and a real gloo process group; each rank sees half of every
global batch, the stepper averages each gradient across ranks inside its hook before the update.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from optim import GaLoreAdamW, LayerwiseStepper

WORLD_SIZE = 2
STEPS = 6
GLOBAL_BATCH = 8


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(16, 48),
        torch.nn.GELU(),
        torch.nn.Linear(48, 32),
        torch.nn.GELU(),
        torch.nn.Linear(32, 4),
    )


def _optimizer(model: torch.nn.Module) -> GaLoreAdamW:
    matrices = [p for p in model.parameters() if p.dim() == 2]
    vectors = [p for p in model.parameters() if p.dim() < 2]
    return GaLoreAdamW(
        [{"params": matrices, "galore": True}, {"params": vectors}], lr=1e-2, rank=4, update_proj_gap=3
    )


def _data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    return [
        (torch.randn(GLOBAL_BATCH, 16, generator=g), torch.randn(GLOBAL_BATCH, 4, generator=g))
        for _ in range(STEPS)
    ]


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    try:
        shard = slice(rank * GLOBAL_BATCH // WORLD_SIZE, (rank + 1) * GLOBAL_BATCH // WORLD_SIZE)
        # max_pending=0 waits for each reduction inside its hook; 2 lets reductions overlap backward.
        for max_pending in (0, 2):
            # Rank 1 starts from different weights: the stepper's initial broadcast must fix that.
            model = _model(seed=rank)
            opt = _optimizer(model)
            with LayerwiseStepper(opt, max_pending=max_pending) as stepper:
                assert stepper.reduces_gradients  # reduction switched on by the initialised process group
                for x, y in _data():
                    loss = torch.nn.functional.mse_loss(model(x[shard]), y[shard])
                    loss.backward()
                    assert all(p.grad is None for p in model.parameters())
            state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            torch.save(state, os.path.join(out_dir, f"rank{rank}_pending{max_pending}.pt"))
    finally:
        dist.destroy_process_group()


def _worker_then_exit(rank: int, init_file: str, out_dir: str) -> None:
    """`_worker`, then an immediate exit once its results are on disk.

    NOTE: gloo's background threads can abort the interpreter's shutdown ("terminate called without an
    active exception", SIGABRT; seen once in ~30 runs on a loaded 2-core machine) after the process group
    was destroyed and the results saved; that teardown is not what this test checks. A failure inside
    `_worker` still raises, and mp.spawn reports it as before.
    """
    _worker(rank, init_file, out_dir)
    os._exit(0)


@pytest.mark.integration
def test_two_gloo_ranks_equal_single_process_with_the_same_global_batch(tmp_path) -> None:
    mp.spawn(_worker_then_exit, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD_SIZE, join=True)

    single = _model(seed=0)
    opt = _optimizer(single)
    untrained = copy.deepcopy(single.state_dict())
    for x, y in _data():
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(single(x), y).backward()
        opt.step()

    for max_pending in (0, 2):
        rank0 = torch.load(tmp_path / f"rank0_pending{max_pending}.pt", weights_only=True)
        rank1 = torch.load(tmp_path / f"rank1_pending{max_pending}.pt", weights_only=True)
        for name, value in single.state_dict().items():
            assert torch.equal(rank0[name], rank1[name]), name  # ranks stay identical
            torch.testing.assert_close(rank0[name], value, msg=lambda m, n=name: f"{n}: {m}")
            assert not torch.equal(value, untrained[name])  # and they did train
