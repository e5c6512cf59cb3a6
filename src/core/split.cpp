#include "core/split.hpp"

#include <string>

#include "core/error.hpp"
#include "core/guard.hpp"

namespace syncbn::core {

std::shared_ptr<comm::Communicator> split_consecutive(comm::Communicator& parent, int group_size,
                                                      bool sub_null) {
  ArgError err;
  if (sub_null) {
    err = {Arg::sub, Problem::null, {}};
  } else if (group_size < 1 || parent.size() % group_size != 0) {
    err = {Arg::group_size, Problem::not_divisor,
           "group_size = " + std::to_string(group_size) + ", communicator size = " +
               std::to_string(parent.size())};
  }
  double slots[kErrorSlots + kAgree48Slots];
  put_error_record(slots, parent.rank(), err);
  put_agree48(slots + kErrorSlots, static_cast<std::uint64_t>(static_cast<std::uint32_t>(group_size)));
  parent.allreduce_sum(slots, kErrorSlots + kAgree48Slots);
  check_error_record(slots, parent.size(), parent.rank(), err);
  if (!agreed48(slots + kErrorSlots, parent.size())) {
    fail(SYNCBN_ERROR_INVALID_ARGUMENT, "group_size differs across ranks (rank " +
                                            std::to_string(parent.rank()) + " has " +
                                            std::to_string(group_size) + ")");
  }
  return parent.split_consecutive(group_size);
}

}  // namespace syncbn::core
