/*
 * syncbn: the MPI communicator (C API). Include only where MPI is wanted; needs mpi.h.
 */
#ifndef SYNCBN_SYNCBN_MPI_H
#define SYNCBN_SYNCBN_MPI_H

#include <mpi.h>

#include "syncbn/syncbn.h"

#ifdef __cplusplus
extern "C" {
#endif

/* COLLECTIVE over mpi_comm. A communicator over the caller's MPI communicator. The library
   duplicates it (MPI_Comm_idup, waited for by the default deadline: SYNCBN_TIMEOUT_S, else
   600 s), so its messages never match the caller's, and sets MPI_ERRORS_RETURN on the duplicate
   so that an MPI failure comes back as SYNCBN_ERROR_COMM instead of aborting. With a deadline
   (syncbn_comm_set_timeout) its host collectives are a recursive doubling on MPI_Isend /
   MPI_Irecv polled with MPI_Testall against it (CUDA-aware device buffers: MPI_Iallreduce,
   polled); with none, the blocking MPI_Allreduce. The two do not meet: every rank must have a
   deadline, or none (a rank with 0 and another with a deadline wait for each other forever). MPI must be
   initialized; the duplicate is freed by syncbn_comm_destroy (or, if MPI is finalized by then,
   or the communicator is broken, left to MPI). syncbn_comm_abort calls MPI_Abort(duplicate, 1).
   The ranks then check that their MPI agrees on CUDA-awareness (Open MPI's
   MPIX_Query_cuda_support, or SYNCBN_MPI_CUDA_AWARE=0|1 in the environment): CUDA plans hand
   MPI the device pointer only where it is, and ranks that differ would never meet.
   Errors: SYNCBN_ERROR_INVALID_ARGUMENT (comm NULL, mpi_comm MPI_COMM_NULL, MPI not
   initialized, CUDA-awareness differing across ranks: on every rank), SYNCBN_ERROR_COMM, SYNCBN_ERROR_TIMEOUT (some rank did not join in time; the
   duplication is then left pending on mpi_comm, which must not be used for collectives again). */
SYNCBN_API syncbn_status_t syncbn_comm_create_mpi(MPI_Comm mpi_comm, syncbn_comm_t* comm);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* SYNCBN_SYNCBN_MPI_H */
