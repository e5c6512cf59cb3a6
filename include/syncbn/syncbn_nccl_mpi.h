/*
 * syncbn: bootstrapping an NCCL communicator from MPI (C API). Needs mpi.h and nccl.h.
 * Available when the library was built with both SYNCBN_WITH_MPI and SYNCBN_WITH_NCCL.
 */
#ifndef SYNCBN_SYNCBN_NCCL_MPI_H
#define SYNCBN_SYNCBN_NCCL_MPI_H

#include <mpi.h>
#include <nccl.h>

#include "syncbn/syncbn.h"

#ifdef __cplusplus
extern "C" {
#endif

/* COLLECTIVE over mpi_comm. One GPU per local rank, and an NCCL communicator over the same
   ranks in the same order:
     1. local_rank = rank in MPI_Comm_split_type(mpi_comm, MPI_COMM_TYPE_SHARED) (the ranks on
        this node); cudaSetDevice(local_rank % n) makes its GPU current, n being the devices
        this rank sees (all of the node's, or one per rank with a CUDA_VISIBLE_DEVICES of its
        own). The ranks of a node compare their GPUs' UUIDs (MPI_Iallgather): two ranks on one
        GPU (more ranks than GPUs) fail on every rank (SYNCBN_ERROR_INVALID_ARGUMENT), since
        NCCL refuses them;
     2. rank 0 makes an ncclUniqueId and MPI_Bcast sends it to every rank;
     3. ncclCommInitRankConfig(nccl_comm, size, id, rank) with config.blocking = 0, polled with
        ncclCommGetAsyncError until it is ready or fails.
   Before step 2 the ranks agree (MPI_Allreduce) that every rank found a GPU, so a rank without
   one makes every rank fail instead of leaving the others in ncclCommInitRank; after step 3 they
   agree that every rank's init succeeded. Every step but MPI_Comm_split_type (which has no
   non-blocking form) is bounded by the default deadline (SYNCBN_TIMEOUT_S, else 600 s; see
   syncbn_comm_set_timeout; the final agreement by twice that): MPI's collectives are
   non-blocking and polled, and an NCCL init that has not completed by then is aborted
   (ncclCommAbort), so a rank that fails or never arrives cannot leave its peers in NCCL's
   bootstrap. After SYNCBN_ERROR_TIMEOUT, collectives may be left pending on mpi_comm: do not use
   it for further collectives. *nccl_comm is the caller's: pass it to syncbn_comm_create_nccl and release it with
   ncclCommDestroy. It is a NON-BLOCKING communicator: NCCL calls on it may return ncclInProgress,
   after which ncclCommGetAsyncError says when the call has settled. *local_rank (may be NULL) is
   the rank's index on its node, not the device index (that is local_rank % n, the current
   device on return).
   Errors (on every rank alike): SYNCBN_ERROR_INVALID_ARGUMENT (nccl_comm NULL, MPI not
   initialized, mpi_comm MPI_COMM_NULL, no CUDA device on some rank, two ranks of a node on one
   GPU; the message names the rank), SYNCBN_ERROR_COMM (MPI or NCCL failed), SYNCBN_ERROR_TIMEOUT (a step did not complete
   by the deadline, on the ranks that waited), SYNCBN_ERROR_NOT_SUPPORTED (built without NCCL or
   MPI). */
SYNCBN_API syncbn_status_t syncbn_nccl_comm_init_mpi(MPI_Comm mpi_comm, ncclComm_t* nccl_comm,
                                                     int* local_rank);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* SYNCBN_SYNCBN_NCCL_MPI_H */
