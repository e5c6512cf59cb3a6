// Subgroups: validated, collective split of a communicator into consecutive groups.
#ifndef SYNCBN_CORE_SPLIT_HPP
#define SYNCBN_CORE_SPLIT_HPP

#include <memory>

#include "comm/communicator.hpp"

namespace syncbn::core {

// COLLECTIVE over parent (one allreduce of guard slots, the backend's split, one allreduce of
// its outcome). Every rank must pass the same group_size, >= 1 and dividing parent.size();
// sub_null says the caller gave no place for the result. Throws Failure identically on every
// rank otherwise (SYNCBN_ERROR_INVALID_ARGUMENT), or when the backend failed to split on any
// rank (SYNCBN_ERROR_COMM; SYNCBN_ERROR_NOT_SUPPORTED for a custom communicator without split).
std::shared_ptr<comm::Communicator> split_consecutive(comm::Communicator& parent, int group_size,
                                                      bool sub_null);

}  // namespace syncbn::core

#endif  // SYNCBN_CORE_SPLIT_HPP
