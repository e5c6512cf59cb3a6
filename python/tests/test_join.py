"""Uneven inputs: DistributedDataParallel + torch.distributed.algorithms.Join with
SyncBatchNormJoinable, ranks holding 10, 7, 5 (and 3) batches. Ranks that run out of data
shadow the synchronized batch norm calls of each step with empty batches, so nobody waits, and
the model after training equals one process that trains on the union of the active ranks'
batches at every step (DDP averages gradients over the initial world size)."""

import copy

import pytest
import torch
from torch.distributed.algorithms.join import Join
from torch.nn.parallel import DistributedDataParallel


import syncbn.torch as sbt
from reference import draw

BATCH = 4


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1, bias=False), torch.nn.BatchNorm2d(4),
        torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 4, 6, bias=False),
        torch.nn.BatchNorm1d(6), torch.nn.ReLU(), torch.nn.Linear(6, 3)).double()


def data(seed, step, rank):
    x = draw(seed + 1000 * step + rank, [(BATCH, 1, 4, 4)], torch.float64)[0]
    return x, (torch.arange(BATCH) + step + rank) % 3


@pytest.mark.ranks(2)
def test_ddp_join_with_uneven_batches_matches_one_process(job, seed):
    counts = [10, 7, 5, 3][:job.size] + [2] * max(0, job.size - 4)
    reference = make_model()
    model = sbt.convert_sync_batchnorm(copy.deepcopy(reference), communicator=job.comm)
    ddp = DistributedDataParallel(model, broadcast_buffers=False)
    joinable = sbt.SyncBatchNormJoinable(ddp)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.05)
    with Join([joinable, ddp]):
        for step in range(counts[job.rank]):
            x, y = data(seed, step, job.rank)
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(ddp(x), y).backward()
            optimizer.step()

    optimizer = torch.optim.SGD(reference.parameters(), lr=0.05)
    for step in range(max(counts)):
        active = [r for r in range(job.size) if counts[r] > step]
        batches = [data(seed, step, r) for r in active]
        optimizer.zero_grad()
        out = reference(torch.cat([x for x, _ in batches]))
        losses = torch.nn.functional.cross_entropy(out, torch.cat([y for _, y in batches]),
                                                   reduction="none")
        (losses.view(len(active), BATCH).mean(dim=1).sum() / job.size).backward()
        optimizer.step()
    for name, want in reference.state_dict().items():
        got = model.state_dict()[name]
        torch.testing.assert_close(got.double(), want.double(), rtol=1e-9, atol=1e-11,
                                   msg=lambda m: f"rank {job.rank}, {name}: {m}")


def test_joinable_refuses_what_would_deadlock(job):
    model = sbt.convert_sync_batchnorm(make_model(), communicator=job.comm)
    ddp = DistributedDataParallel(model)  # broadcast_buffers=True
    with pytest.raises(ValueError, match="broadcast_buffers=False"):
        sbt.SyncBatchNormJoinable(ddp)
    ddp = DistributedDataParallel(model, broadcast_buffers=False)
    joinable = sbt.SyncBatchNormJoinable(ddp)
    with pytest.raises(RuntimeError, match="must come first"):
        with Join([ddp, joinable]):
            ddp(torch.randn(2, 1, 4, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="no syncbn.torch.SyncBatchNorm"):
        sbt.SyncBatchNormJoinable(torch.nn.Linear(2, 2))


def test_shadow_step_by_hand(job, seed):
    """Without Join (an MPI-only loop): the ranks with data train one step; the others call
    shadow_step() before any step of their own; running statistics agree everywhere."""
    layer = sbt.SyncBatchNorm(3, communicator=job.comm)
    joinable = sbt.SyncBatchNormJoinable(layer)
    if job.rank == 0:
        layer(draw(seed, [(4, 3, 2)], torch.float32)[0]).sum().backward()
    else:
        joinable.shadow_step()
    stats = torch.cat([layer.running_mean, layer.running_var])
    assert torch.equal(job.sum(stats), stats.double() * job.size)
    assert int(layer.num_batches_tracked) == 1

