#include "core/split.hpp"

#include <new>
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
  with_context("syncbn_comm_split", [&] { parent.allreduce_sum(slots, kErrorSlots + kAgree48Slots); });
  check_error_record(slots, parent.size(), parent.rank(), err);
  if (!agreed48(slots + kErrorSlots, parent.size())) {
    fail(SYNCBN_ERROR_INVALID_ARGUMENT, "group_size differs across ranks (rank " +
                                            std::to_string(parent.rank()) + " has " +
                                            std::to_string(group_size) + ")");
  }
  // The backend's split, then one more allreduce so that every rank learns whether every rank
  // got its group: a backend that fails on one rank (a custom split function, an allocation)
  // must not leave the others holding groups their peer will never use.
  std::shared_ptr<comm::Communicator> group;
  ArgError outcome;
  try {
    group = parent.split_consecutive(group_size);
  } catch (const Failure& f) {
    // A timeout broke the parent: there is no group left to agree with.
    if (f.status() == SYNCBN_ERROR_TIMEOUT || f.status() == SYNCBN_ERROR_COMM_BROKEN) throw;
    outcome = {Arg::sub,
               f.status() == SYNCBN_ERROR_NOT_SUPPORTED ? Problem::cannot_split : Problem::comm_failed,
               f.what()};
  } catch (const std::bad_alloc&) {
    outcome = {Arg::memory, Problem::out_of_memory, {}};
  }
  if (!outcome && (group->size() != group_size || group->rank() != parent.rank() % group_size)) {
    outcome = {Arg::sub, Problem::wrong_group,
               "rank " + std::to_string(group->rank()) + " of " + std::to_string(group->size()) +
                   ", expected rank " + std::to_string(parent.rank() % group_size) + " of " +
                   std::to_string(group_size)};
  }
  double verdict[kErrorSlots];
  put_error_record(verdict, parent.rank(), outcome);
  with_context("syncbn_comm_split", [&] { parent.allreduce_sum(verdict, kErrorSlots); });
  check_error_record(verdict, parent.size(), parent.rank(), outcome);
  if (!group) fail(SYNCBN_ERROR_INTERNAL, "syncbn_comm_split: the backend made no group");
  return group;
}

}  // namespace syncbn::core
