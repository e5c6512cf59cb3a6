// The NCCL backend: the caller's ncclComm_t (or a split of it, owned), allreduce enqueued on the
// caller's stream. And the MPI bootstrap of an NCCL communicator (syncbn_nccl_mpi.h).
#ifndef SYNCBN_COMM_NCCL_HPP
#define SYNCBN_COMM_NCCL_HPP

#include <nccl.h>

#include <memory>

#include "comm/communicator.hpp"

namespace syncbn::comm {

// Not collective. The caller keeps nccl_comm alive. Throws core::Failure.
std::shared_ptr<Communicator> make_nccl_communicator(ncclComm_t nccl_comm);

#ifdef SYNCBN_HAVE_MPI
}  // namespace syncbn::comm
#include <mpi.h>
namespace syncbn::comm {
// COLLECTIVE over mpi_comm: syncbn_nccl_comm_init_mpi (syncbn_nccl_mpi.h). Throws core::Failure.
void nccl_comm_init_mpi(MPI_Comm mpi_comm, ncclComm_t* nccl_comm, int* local_rank);
#endif

}  // namespace syncbn::comm

#endif  // SYNCBN_COMM_NCCL_HPP
