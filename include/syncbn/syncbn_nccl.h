/*
 * syncbn: the NCCL communicator (C API). Include only where NCCL is wanted; needs nccl.h.
 * Available when the library was built with SYNCBN_WITH_NCCL.
 */
#ifndef SYNCBN_SYNCBN_NCCL_H
#define SYNCBN_SYNCBN_NCCL_H

#include <nccl.h>

#include "syncbn/syncbn.h"

#ifdef __cplusplus
extern "C" {
#endif

/* A communicator over the caller's NCCL communicator (not collective, no communication). The
   caller keeps ownership of nccl_comm and must keep it alive, and not destroy or abort it,
   until every syncbn communicator and plan made from it is destroyed. CUDA plans on this
   communicator enqueue ONE ncclAllReduce (ncclDouble, ncclSum, in place) per forward and per
   backward on the stream passed to the call, and never synchronize the host: a training step
   can be captured in a CUDA graph. The caller orders these collectives with its own NCCL calls
   on the same communicator, as NCCL requires (same order on every rank). Plan creation and
   syncbn_comm_split use an internal stream and do synchronize. syncbn_comm_split makes the
   subgroups with ncclCommSplit (COLLECTIVE, non-blocking and polled); the library owns and
   destroys those.
   Deadlines: plan creation, syncbn_comm_split and syncbn_plan_get_async_error wait on the host
   by the communicator's deadline (syncbn_comm_set_timeout), polling the stream and
   ncclCommGetAsyncError. When the deadline passes, or NCCL reports an asynchronous error, the
   library calls ncclCommAbort(nccl_comm), which ends the kernels still waiting for peers and
   FREES nccl_comm: the call returns SYNCBN_ERROR_TIMEOUT (or SYNCBN_ERROR_COMM), the syncbn
   communicator is broken, and the caller must not use or ncclCommDestroy nccl_comm again.
   syncbn_comm_abort does the same on request. Forward and backward only enqueue, so they cannot
   wait: their collectives are bounded where the host next waits for them
   (syncbn_plan_get_async_error).
   Rules NCCL sets, which hold for syncbn's calls too:
     - syncbn's forward and backward must not be called between the caller's ncclGroupStart and
       ncclGroupEnd: their ncclAllReduce would join the caller's group and the call's finalize
       kernel, enqueued right after, would read sums not yet reduced;
     - ncclCommDestroy is collective among the ranks of a node: destroy syncbn communicators
       (which destroy the subgroups syncbn_comm_split made) and the caller's nccl_comm in the
       same order on every rank;
     - one GPU per rank: NCCL rejects a communicator in which two ranks share a GPU.
   Errors: SYNCBN_ERROR_INVALID_ARGUMENT (nccl_comm or comm NULL), SYNCBN_ERROR_COMM (NCCL
   failed to report rank or size), SYNCBN_ERROR_INTERNAL (the stream or memory of host
   allreduces could not be made), SYNCBN_ERROR_NOT_SUPPORTED (built without NCCL). */
SYNCBN_API syncbn_status_t syncbn_comm_create_nccl(ncclComm_t nccl_comm, syncbn_comm_t* comm);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* SYNCBN_SYNCBN_NCCL_H */
