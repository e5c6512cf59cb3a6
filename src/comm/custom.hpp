// The custom backend: the caller's allreduce (and optionally split) through C function pointers,
// so that any collective library can carry syncbn (syncbn_comm_create_custom).
#ifndef SYNCBN_COMM_CUSTOM_HPP
#define SYNCBN_COMM_CUSTOM_HPP

#include <memory>

#include "comm/communicator.hpp"
#include "syncbn/syncbn.h"

namespace syncbn::comm {

// Not collective. Throws core::Failure (SYNCBN_ERROR_INVALID_ARGUMENT) for allreduce NULL,
// size < 1 or rank outside [0, size); release is then not called.
std::shared_ptr<Communicator> make_custom_communicator(int rank, int size,
                                                       syncbn_allreduce_fn allreduce,
                                                       syncbn_split_fn split,
                                                       syncbn_release_fn release,
                                                       void* user_data);

}  // namespace syncbn::comm

#endif  // SYNCBN_COMM_CUSTOM_HPP
