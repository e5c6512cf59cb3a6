"""The Python suite's job: one process, P ranks under mpirun, or P ranks under
torch.distributed.run, told apart by the environment the launcher sets.

- mpirun (OMPI_COMM_WORLD_SIZE): syncbn communicates over MPI (Communicator.from_mpi4py).
- torch.distributed.run (RANK, WORLD_SIZE): over the gloo process group
  (Communicator.from_process_group, a duplicate of the world).
- neither: one process, Communicator.self().

In every case torch.distributed is initialized with gloo over the same ranks, for the tests' own
checks (sums over ranks, independent of syncbn) and for DistributedDataParallel. Every rank runs
every test in the same order (the tests are collective); after each test the ranks agree on its
outcome (a test fails everywhere if it failed on any rank), which also keeps them in step.
"""

import os
import socket
import zlib

import pytest
import torch
import torch.distributed as dist

import syncbn
import syncbn.torch


class Job:
    """rank and size of this test job, and the syncbn communicator under test."""

    def __init__(self):
        env = os.environ
        if "OMPI_COMM_WORLD_SIZE" in env:
            from mpi4py import MPI

            self.launcher = "mpirun"
            self.rank, self.size = syncbn.torch.init_process_group_mpi("gloo")
            self.comm = syncbn.Communicator.from_mpi4py(MPI.COMM_WORLD)
        elif "RANK" in env and "WORLD_SIZE" in env:
            self.launcher = "torchrun"
            dist.init_process_group("gloo")
            self.rank, self.size = dist.get_rank(), dist.get_world_size()
            self.comm = syncbn.Communicator.from_process_group()
        else:
            self.launcher = "single"
            self.rank, self.size = 0, 1
            dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}",
                                    rank=0, world_size=1)
            self.comm = syncbn.Communicator.self()
        torch.set_num_threads(1)

    def sum(self, t):
        """t summed over the ranks (torch.distributed, not syncbn), in float64."""
        t = t.detach().to(torch.float64).clone()
        dist.all_reduce(t)
        return t

    def all_agree(self, flag):
        """Whether flag is true on every rank."""
        t = torch.tensor([1.0 if flag else 0.0], dtype=torch.float64)
        dist.all_reduce(t)
        return int(t.item()) == self.size


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_job = None


def job_instance():
    global _job
    if _job is None:
        _job = Job()
    return _job


@pytest.fixture(scope="session")
def job():
    return job_instance()


@pytest.fixture
def seed(request):
    """A seed from the test's name: the same on every rank, different for every test."""
    return zlib.crc32(request.node.nodeid.encode())


@pytest.hookimpl(trylast=True)  # after the terminal reporter is registered
def pytest_configure(config):
    job = job_instance()
    config.addinivalue_line("markers", "ranks(n): needs at least n ranks")
    if job.rank != 0:  # rank 0 reports progress and the summary; the others their failures only
        reporter = config.pluginmanager.getplugin("terminalreporter")
        if reporter is not None:
            config.pluginmanager.unregister(reporter)
        config.pluginmanager.register(_RankFailures(job.rank), "syncbn_rank_failures")


class _RankFailures:
    def __init__(self, rank):
        self.rank = rank

    def pytest_runtest_logreport(self, report):
        if report.failed:
            text = "\n".join(f"[rank {self.rank}] {line}"
                             for line in str(report.longrepr).splitlines())
            print(f"[rank {self.rank}] FAILED {report.nodeid} ({report.when})\n{text}", flush=True)


def pytest_collection_modifyitems(config, items):
    job = job_instance()
    for item in items:
        mark = item.get_closest_marker("ranks")
        if mark is not None and job.size < mark.args[0]:
            item.add_marker(pytest.mark.skip(reason=f"needs {mark.args[0]} ranks"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """The outcome of a test's call phase, agreed by every rank: failed anywhere, failed here."""
    outcome = yield
    report = outcome.get_result()
    if call.when != "call" or report.skipped:
        return
    job = job_instance()
    passed_everywhere = job.all_agree(report.passed)
    if report.passed and not passed_everywhere:
        report.outcome = "failed"
        report.longrepr = f"[rank {job.rank}] passed here, failed on another rank"
    elif report.failed:
        report.sections.append(("rank", f"failed on rank {job.rank} of {job.size}"))


def pytest_sessionfinish(session, exitstatus):
    job = job_instance()
    if dist.is_initialized():
        dist.barrier()
