// The MPI backend: a duplicate of the caller's MPI_Comm with MPI_ERRORS_RETURN, whose
// collectives are non-blocking and polled against the communicator's deadline.
#ifndef SYNCBN_COMM_MPI_HPP
#define SYNCBN_COMM_MPI_HPP

#include <mpi.h>

#include <memory>

#include "comm/communicator.hpp"

namespace syncbn::comm {

// COLLECTIVE over mpi_comm (MPI_Comm_idup, polled against the default deadline). Throws
// core::Failure: SYNCBN_ERROR_INVALID_ARGUMENT if MPI is not initialized or mpi_comm is
// MPI_COMM_NULL, SYNCBN_ERROR_COMM if MPI fails, SYNCBN_ERROR_TIMEOUT if a rank does not join.
std::shared_ptr<Communicator> make_mpi_communicator(MPI_Comm mpi_comm);

// Completes request by the deadline (none: MPI_Wait), polling with MPI_Testall. On expiry the
// request is abandoned to a list that is never freed, with keep_alive (the memory MPI may still
// write when a late peer arrives; MPI forbids freeing or cancelling a pending collective), and
// Failure(SYNCBN_ERROR_TIMEOUT) is thrown: "<what> did not complete within <seconds>".
// SYNCBN_ERROR_COMM if MPI fails.
void mpi_wait(MPI_Request* request, Deadline deadline, const std::string& what,
              std::shared_ptr<void> keep_alive = nullptr);

// Throws Failure(SYNCBN_ERROR_COMM) naming what if code is not MPI_SUCCESS.
void check_mpi(int code, const char* what);

// Throws Failure(SYNCBN_ERROR_INVALID_ARGUMENT) unless MPI is initialized and not finalized, and
// mpi_comm is not MPI_COMM_NULL.
void check_mpi_comm(MPI_Comm mpi_comm);

}  // namespace syncbn::comm

#endif  // SYNCBN_COMM_MPI_HPP
