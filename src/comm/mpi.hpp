// The MPI backend: a duplicate of the caller's MPI_Comm with MPI_ERRORS_RETURN.
#ifndef SYNCBN_COMM_MPI_HPP
#define SYNCBN_COMM_MPI_HPP

#include <mpi.h>

#include <memory>

#include "comm/communicator.hpp"

namespace syncbn::comm {

// COLLECTIVE over mpi_comm (MPI_Comm_dup). Throws core::Failure: SYNCBN_ERROR_INVALID_ARGUMENT
// if MPI is not initialized or mpi_comm is MPI_COMM_NULL, SYNCBN_ERROR_COMM if MPI fails.
std::shared_ptr<Communicator> make_mpi_communicator(MPI_Comm mpi_comm);

}  // namespace syncbn::comm

#endif  // SYNCBN_COMM_MPI_HPP
