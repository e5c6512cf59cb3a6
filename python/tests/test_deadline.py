"""Deadlines from Python: the last rank leaves the loop, every other rank's layer raises
SyncBNError TIMEOUT within the deadline plus 2 s with its running statistics untouched and a
message naming the layer, then COMM_BROKEN at once; a communicator's timeout property round-trips.
Each test makes a communicator of its own (of the job's kind), so the suite's stays usable."""

import datetime
import time

import pytest
import torch
import torch.distributed as dist

import syncbn
import syncbn.torch

DEADLINE = 1.0
GLOO_TIMEOUT = DEADLINE + 1.0


def _fresh_communicator(job):
    """A new communicator over the job's ranks, of the kind under test."""
    if job.launcher == "mpirun":
        from mpi4py import MPI

        return syncbn.Communicator.from_mpi4py(MPI.COMM_WORLD)
    # gloo: a group of the test's own whose own timeout is short, so that the all_reduce this
    # test abandons is ended by gloo before the process exits (gloo aborts a process that exits
    # with an operation still in its worker thread)
    group = dist.new_group(timeout=datetime.timedelta(seconds=GLOO_TIMEOUT))
    return syncbn.Communicator.from_process_group(group, duplicate=False)


def test_timeout_property(job):
    comm = syncbn.Communicator.self()
    assert comm.timeout == 600.0 or comm.timeout >= 0  # SYNCBN_TIMEOUT_S may be set
    comm.timeout = 2.5
    assert comm.timeout == 2.5
    comm.timeout = 0
    assert comm.timeout == 0
    with pytest.raises(syncbn.SyncBNError) as error:
        comm.timeout = -1
    assert error.value.status == syncbn.Status.INVALID_ARGUMENT


@pytest.mark.ranks(2)
def test_rank_leaving_early_times_out_the_others(job, seed):
    torch.manual_seed(seed + job.rank)
    comm = _fresh_communicator(job)
    comm.timeout = DEADLINE
    model = syncbn.torch.convert_sync_batchnorm(
        torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4)),
        communicator=comm)
    x = torch.randn(2 + job.rank, 3, 5, 5)
    model(x).sum().backward()  # one good step everywhere
    leaver = job.size - 1
    if job.rank != leaver:
        bn = model[1]
        before = [t.clone() for t in (bn.running_mean, bn.running_var, bn.num_batches_tracked)]
        start = time.monotonic()
        with pytest.raises(syncbn.SyncBNError) as error:
            model(x)
        waited = time.monotonic() - start
        assert error.value.status == syncbn.Status.TIMEOUT, error.value
        assert DEADLINE - 0.05 <= waited <= DEADLINE + 2.0, waited
        assert "plan '1'" in error.value.message  # the layer's name in the Sequential
        assert "forward_training call #2" in error.value.message
        assert "broken" in error.value.message
        for was, now in zip(before, (bn.running_mean, bn.running_var, bn.num_batches_tracked)):
            assert torch.equal(was, now)
        start = time.monotonic()
        with pytest.raises(syncbn.SyncBNError) as error:
            model(x)
        assert error.value.status == syncbn.Status.COMM_BROKEN
        assert time.monotonic() - start < 0.5
        if job.launcher != "mpirun":
            time.sleep(GLOO_TIMEOUT + 0.5 - DEADLINE)  # gloo ends the abandoned all_reduce
    # the tests' own gloo world (not syncbn's communicator) brings the ranks together again
    dist.barrier()
