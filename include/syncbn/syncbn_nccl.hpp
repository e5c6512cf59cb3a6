// syncbn: the NCCL communicator (C++ API). Include only where NCCL is wanted; needs nccl.h.
#ifndef SYNCBN_SYNCBN_NCCL_HPP
#define SYNCBN_SYNCBN_NCCL_HPP

#include "syncbn/syncbn.hpp"
#include "syncbn/syncbn_nccl.h"

namespace syncbn {

// syncbn_comm_create_nccl: the caller keeps nccl_comm alive (and owns it) until every
// communicator and plan made from it is gone.
inline Communicator nccl_communicator(ncclComm_t nccl_comm) {
  syncbn_comm_t h = nullptr;
  check(syncbn_comm_create_nccl(nccl_comm, &h));
  return Communicator(h);
}

}  // namespace syncbn

#endif  // SYNCBN_SYNCBN_NCCL_HPP
