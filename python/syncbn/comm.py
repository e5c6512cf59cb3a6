"""Communicators: the group of ranks whose batch statistics a layer shares (syncbn_comm_t).

- Communicator.self(): one process, no communication.
- Communicator.from_mpi4py(comm): an mpi4py communicator (syncbn duplicates it inside). Under
  mpirun this is the fast path: one MPI_Allreduce of 2C + 18 doubles per call.
- Communicator.from_process_group(group): torch.distributed, any backend (gloo, nccl, mpi),
  through a custom communicator whose allreduce calls torch.distributed.all_reduce.
- Communicator.custom(rank, size, allreduce, split=None): any other collective library.

Every collective has a deadline, Communicator.timeout (seconds; default $SYNCBN_TIMEOUT_S or
600, 0 for none): a call that waits longer for its peers raises SyncBNError with status TIMEOUT
on every rank that waited, and every later call on the communicator COMM_BROKEN.
"""

import ctypes
import functools
import weakref

from . import _capi
from ._capi import SyncBNError, Status, check, lib

__all__ = ["Communicator"]


class Communicator:
    """A group of ranks (a syncbn_comm_t). Plans made on it keep it alive. Thread safety is the
    C library's: one thread at a time per communicator and per plan."""

    def __init__(self, handle, keepalive=(), description="custom"):
        self._handle = handle
        self._keepalive = keepalive  # the ctypes callbacks and what they use
        self.description = description

    @property
    def handle(self):
        """The syncbn_comm_t as a ctypes.c_void_p."""
        if self._handle is None:
            raise SyncBNError(Status.INVALID_ARGUMENT, "the communicator has been destroyed")
        return self._handle

    def __del__(self):
        handle, self._handle = getattr(self, "_handle", None), None
        if handle:
            lib.syncbn_comm_destroy(handle)

    def __deepcopy__(self, memo):
        return self  # a process-wide resource: copies of a model share it

    def __reduce__(self):
        raise TypeError("a syncbn.Communicator cannot be pickled: save the model's state_dict() "
                        "and make the communicator again where it is loaded")

    def __repr__(self):
        return f"syncbn.Communicator({self.description}, rank {self.rank} of {self.size})"

    @property
    def timeout(self):
        """The deadline of every collective on this communicator and its layers' plans, in
        seconds (syncbn_comm_get_timeout / syncbn_comm_set_timeout; 0: wait forever). Subgroups
        from split() inherit it. Set the same value on every rank."""
        value = ctypes.c_double()
        check(lib.syncbn_comm_get_timeout(self.handle, ctypes.byref(value)))
        return value.value

    @timeout.setter
    def timeout(self, seconds):
        check(lib.syncbn_comm_set_timeout(self.handle, float(seconds)))

    def abort(self):
        """syncbn_comm_abort: over MPI, MPI_Abort (the job ends, this does not return); over
        NCCL, ncclCommAbort. Other communicators are only marked broken."""
        check(lib.syncbn_comm_abort(self.handle))

    @property
    def rank(self):
        value = ctypes.c_int()
        check(lib.syncbn_comm_rank(self.handle, ctypes.byref(value)))
        return value.value

    @property
    def size(self):
        value = ctypes.c_int()
        check(lib.syncbn_comm_size(self.handle, ctypes.byref(value)))
        return value.value

    # ---- constructors ------------------------------------------------------------------------

    @classmethod
    def self(cls):
        """A group of one process (syncbn_comm_create_self): plain batch norm, no MPI."""
        handle = ctypes.c_void_p()
        check(lib.syncbn_comm_create_self(ctypes.byref(handle)))
        return cls(handle, description="self")

    @classmethod
    def from_mpi4py(cls, comm=None):
        """COLLECTIVE over comm (default mpi4py's MPI.COMM_WORLD): syncbn_comm_create_mpi, which
        duplicates comm so that syncbn's messages never meet the caller's. Needs a libsyncbn
        built with MPI (the same MPI as mpi4py's). Errors: SyncBNError NOT_SUPPORTED (no MPI in
        this build), INVALID_ARGUMENT (MPI not initialized, MPI_COMM_NULL)."""
        from mpi4py import MPI

        if comm is None:
            comm = MPI.COMM_WORLD
        create = getattr(lib, "syncbn_comm_create_mpi", None)
        if create is None:
            raise SyncBNError(Status.NOT_SUPPORTED,
                              "this libsyncbn was built without MPI (SYNCBN_WITH_MPI): install "
                              "MPI (libopenmpi-dev) and reinstall the package")
        # MPI_Comm is a pointer in Open MPI and an int in MPICH: pass it at its own size.
        handle_type = ctypes.c_void_p if MPI._sizeof(MPI.Comm) == ctypes.sizeof(ctypes.c_void_p) \
            else ctypes.c_int
        create.restype = ctypes.c_int
        create.argtypes = [handle_type, ctypes.POINTER(ctypes.c_void_p)]
        handle = ctypes.c_void_p()
        check(create(MPI._handleof(comm), ctypes.byref(handle)))
        return cls(handle, description="mpi4py")

    @classmethod
    def custom(cls, rank, size, allreduce, split=None, description="custom"):
        """Not collective: a communicator over any collective library (syncbn_comm_create_custom).

        allreduce(address, count, device, stream): sums, in place and identically on every rank,
            count float64 values at address: host memory when device is 0 (CPU; stream is 0),
            device memory of the current CUDA device when device is 1, in stream order on stream
            (a cudaStream_t as an int). Raise to fail: the syncbn call then raises SyncBNError
            (COMM) on this rank, chained to your exception; raise TimeoutError when the sum did
            not complete by the communicator's deadline (self.timeout, which the function
            keeps) and the call raises SyncBNError TIMEOUT. Either breaks the communicator.
        split(group_size) -> Communicator, optional: this rank's group of consecutive ranks
            [k * group_size, (k + 1) * group_size), called on every rank by Communicator.split
            after the group size was validated. Without it, split raises NOT_SUPPORTED.
        """
        def c_allreduce(address, count, device, stream, _user):
            try:
                allreduce(address or 0, count, device, stream or 0)
                return 0
            except TimeoutError as e:
                _capi.set_pending(e)
                return int(Status.TIMEOUT)
            except BaseException as e:  # noqa: B902 - must not cross into C
                _capi.set_pending(e)
                return 1

        def c_split(group_size, _user, sub):
            try:
                child = split(group_size)
                if not isinstance(child, Communicator):
                    raise TypeError(f"split returned {type(child).__name__}, not a Communicator")
                # syncbn takes this handle over; syncbn_comm_split returns another handle of the
                # same group, which Communicator.split gives back to child.
                sub[0] = child._handle
                child._handle = None
                owner_ref()._split_child = child
                return 0
            except BaseException as e:  # noqa: B902
                _capi.set_pending(e)
                return 1

        allreduce_fn = _capi.ALLREDUCE_FN(c_allreduce)
        split_fn = _capi.SPLIT_FN(c_split) if split is not None else _capi.SPLIT_FN()
        handle = ctypes.c_void_p()
        check(lib.syncbn_comm_create_custom(rank, size, allreduce_fn, split_fn, _capi.RELEASE_FN(),
                                            None, ctypes.byref(handle)))
        owner = cls(handle, keepalive=(allreduce_fn, split_fn, allreduce, split),
                    description=description)
        owner_ref = weakref.ref(owner)  # the callbacks must not keep their owner alive
        return owner

    @classmethod
    def from_process_group(cls, group=None, duplicate=None):
        """A communicator over a torch.distributed process group, any backend.

        group: None or torch.distributed.group.WORLD (every process), or a group made with
            torch.distributed.new_group. duplicate (default: True for the world, False for
            other groups): give syncbn a group of its own, made with new_group over the same
            ranks, so that syncbn's allreduces are never ordered against your own collectives on
            the group (DistributedDataParallel's, Join's). new_group is collective over the
            whole world, which is why other groups are used as they are by default.
        Each syncbn call makes one torch.distributed.all_reduce of 2C + 18 float64 on the group:
        on CPU tensors for CPU layers (copied through the GPU for the nccl backend), on a view of
        syncbn's device buffer for CUDA layers. COLLECTIVE over the world when it duplicates.
        Host sums are waited for by the communicator's deadline (work.wait(timeout): gloo honours
        it; the nccl backend of older torch versions waits on the host only with
        NCCL_BLOCKING_WAIT=1, else only the process group's own timeout bounds it); device sums
        are enqueued on the stream and bounded by the process group's own timeout. After a
        timeout the abandoned all_reduce stays with the process group until its own timeout
        (init_process_group / new_group timeout=) ends it; gloo aborts a process that exits
        before that, so give the group a timeout close to syncbn's.
        """
        import torch
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise SyncBNError(Status.INVALID_ARGUMENT,
                              "torch.distributed is not initialized: call "
                              "torch.distributed.init_process_group first, or pass a "
                              "communicator (syncbn.Communicator.from_mpi4py(), .self())")
        world = group is None or group is dist.group.WORLD
        if duplicate is None:
            duplicate = world
        if duplicate:
            ranks = None if world else _group_ranks(group)
            group = dist.new_group(ranks=ranks)
        elif group is None:
            group = dist.group.WORLD
        backend = dist.get_backend(group)
        rank, size = dist.get_rank(group), dist.get_world_size(group)
        owner = []  # the Communicator, once made: its timeout is the deadline

        def wait(work, count):
            import datetime

            seconds = owner[0]().timeout if owner and owner[0]() is not None else 0.0
            if seconds <= 0:
                work.wait()
                return
            try:
                done = work.wait(timeout=datetime.timedelta(seconds=seconds))
            except RuntimeError as e:  # gloo: "Timed out waiting ... for recv operation"
                if "imed out" in str(e) or "imeout" in str(e):
                    raise TimeoutError(f"torch.distributed.all_reduce of {count} float64 did not "
                                       f"complete within {seconds:g} s: {e}") from e
                raise
            if done is False:
                raise TimeoutError(f"torch.distributed.all_reduce of {count} float64 did not "
                                   f"complete within {seconds:g} s")

        def allreduce(address, count, device, stream):
            if device == _capi.DEVICE_CPU:
                t = _host_view(address, count)
                # The collective gets a tensor of torch's own memory, not the view: the process
                # group's worker thread may release it last (at exit, or after a timeout), and
                # a view's storage holds a Python object, which that thread cannot free then.
                if backend == "nccl":  # NCCL takes CUDA tensors only
                    own = t.to(torch.device("cuda", torch.cuda.current_device()))
                else:
                    own = t.clone()
                wait(dist.all_reduce(own, group=group, async_op=True), count)
                t.copy_(own.cpu() if own.is_cuda else own)
            else:
                dist.all_reduce(torch.as_tensor(_CudaBuffer(address, count), device="cuda"),
                                group=group)

        def split(group_size):
            if size != dist.get_world_size():
                raise ValueError("split needs a process group of the whole world "
                                 "(torch.distributed.new_group is collective over the world)")
            mine = None
            for first in range(0, size, group_size):  # every rank makes every group, in order
                g = dist.new_group(ranks=list(range(first, first + group_size)))
                if first <= rank < first + group_size:
                    mine = g
            return cls.from_process_group(mine, duplicate=False)

        comm = cls.custom(rank, size, allreduce, split,
                          description=f"torch.distributed {backend}")
        owner.append(weakref.ref(comm))
        return comm

    # ---- groups ------------------------------------------------------------------------------

    def split(self, group_size):
        """COLLECTIVE: this rank's group among consecutive groups of group_size ranks
        (syncbn_comm_split). group_size must divide the size and be the same on every rank
        (else SyncBNError INVALID_ARGUMENT on every rank)."""
        self._split_child = None
        handle = ctypes.c_void_p()
        try:
            check(lib.syncbn_comm_split(self.handle, group_size, ctypes.byref(handle)))
        finally:
            child, self._split_child = getattr(self, "_split_child", None), None
        if child is None:
            return Communicator(handle, keepalive=(self,), description=self.description)
        child._handle = handle
        return child


def _group_ranks(group):
    import torch.distributed as dist

    get = getattr(dist, "get_process_group_ranks", None)
    if get is not None:
        return get(group)
    from torch.distributed import distributed_c10d as c10d

    return sorted(c10d._pg_group_ranks[group].keys())


@functools.lru_cache(maxsize=64)
def _array_type(count):
    return ctypes.c_double * count


def _host_view(address, count):
    """A float64 CPU tensor over count doubles at address (no copy)."""
    import torch

    return torch.frombuffer(_array_type(count).from_address(address), dtype=torch.float64)


class _CudaBuffer:
    """count float64 at a device address, for torch.as_tensor (__cuda_array_interface__)."""

    def __init__(self, address, count):
        self.__cuda_array_interface__ = {"shape": (count,), "typestr": "<f8",
                                         "data": (address, False), "version": 2}
