"""syncbn: synchronized batch normalization across processes and nodes.

Batch statistics over every rank of a group with one allreduce of 2C + 18 float64 per forward
and per backward, computed by libsyncbn (C, OpenMP and CUDA kernels) through its C API.

    import syncbn, syncbn.torch
    comm = syncbn.Communicator.from_mpi4py()            # under mpirun; or from_process_group()
    model = syncbn.torch.convert_sync_batchnorm(model, communicator=comm)

syncbn.torch needs torch >= 1.13; it is imported on its own (import syncbn.torch).
"""

from ._capi import Status, SyncBNError, library_path, library_version
from .comm import Communicator

__version__ = library_version()  # the loaded libsyncbn's (syncbn_get_version)
__all__ = ["Communicator", "Status", "SyncBNError", "library_path", "__version__"]
