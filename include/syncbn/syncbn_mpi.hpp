// syncbn: the MPI communicator (C++ API). Include only where MPI is wanted; needs mpi.h.
#ifndef SYNCBN_SYNCBN_MPI_HPP
#define SYNCBN_SYNCBN_MPI_HPP

#include "syncbn/syncbn.hpp"
#include "syncbn/syncbn_mpi.h"

namespace syncbn {

// COLLECTIVE over mpi_comm: syncbn_comm_create_mpi (the communicator is duplicated inside).
inline Communicator mpi_communicator(MPI_Comm mpi_comm) {
  syncbn_comm_t h = nullptr;
  check(syncbn_comm_create_mpi(mpi_comm, &h));
  return Communicator(h);
}

}  // namespace syncbn

#endif  // SYNCBN_SYNCBN_MPI_HPP
