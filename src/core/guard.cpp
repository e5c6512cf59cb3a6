#include "core/guard.hpp"

#include <cmath>

#include "core/error.hpp"

namespace syncbn::core {
namespace {

const char* arg_name(Arg arg) {
  switch (arg) {
    case Arg::none: return "(none)";
    case Arg::x: return "x";
    case Arg::y: return "y";
    case Arg::weight: return "weight";
    case Arg::bias: return "bias";
    case Arg::save_mean: return "save_mean";
    case Arg::save_invstd: return "save_invstd";
    case Arg::running_mean: return "running_mean";
    case Arg::running_var: return "running_var";
    case Arg::num_batches_tracked: return "num_batches_tracked";
    case Arg::dy: return "dy";
    case Arg::dx: return "dx";
    case Arg::dweight: return "dweight";
    case Arg::dbias: return "dbias";
    case Arg::shape: return "shape";
    case Arg::ndim: return "ndim";
    case Arg::stream: return "stream";
    case Arg::config: return "config";
    case Arg::num_features: return "num_features";
    case Arg::dtype: return "dtype";
    case Arg::layout: return "layout";
    case Arg::device: return "device";
    case Arg::eps: return "eps";
    case Arg::momentum: return "momentum";
    case Arg::group_size: return "group_size";
    case Arg::plan: return "plan";
    case Arg::sub: return "sub";
    case Arg::memory: return "memory";
    case Arg::other: return "an argument";
    case Arg::z: return "z";
    case Arg::dz: return "dz";
    case Arg::activation: return "activation";
    case Arg::args: return "args";
    case Arg::mask: return "mask";
  }
  return "(unknown argument)";
}

std::uint32_t encode(const ArgError& e) { return error_code(e.arg, e.problem); }

}  // namespace

void require(ArgError& err, bool ok, Arg arg, Problem problem) {
  if (!err && !ok) err = {arg, problem, {}};
}

void fail_local(int rank, const ArgError& err) {
  fail(status_of(err.problem), "rank " + std::to_string(rank) + ": " +
                                   describe(err.arg, err.problem) +
                                   (err.detail.empty() ? "" : " (" + err.detail + ")"));
}

Arg arg_from_name(const char* name) {
  if (name == nullptr) return Arg::other;
  const std::string wanted = name;
  for (auto a = static_cast<std::uint16_t>(Arg::x); a <= static_cast<std::uint16_t>(Arg::dz); ++a) {
    if (a != static_cast<std::uint16_t>(Arg::other) && wanted == arg_name(static_cast<Arg>(a))) {
      return static_cast<Arg>(a);
    }
  }
  return wanted == arg_name(Arg::mask) ? Arg::mask : Arg::other;
}

std::string describe(Arg arg, Problem problem) {
  const std::string name = arg_name(arg);
  switch (problem) {
    case Problem::null: return name + " is null";
    case Problem::channels: return name + ": channel dimension differs from num_features";
    case Problem::negative:
      return name + (arg == Arg::shape ? " has a negative dimension" : " is negative");
    case Problem::ndim_range: return name + " must be 2 to 5 (N, C and 0 to 3 spatial dims)";
    case Problem::overflow:
      if (arg == Arg::num_batches_tracked) return name + " is INT64_MAX and cannot be incremented";
      if (arg == Arg::num_features) return name + " must be at most (INT_MAX - 64) / 2";
      return name + ": element count overflows int64";
    case Problem::not_null: return name + " must be NULL for a CPU plan";
    case Problem::not_positive: return name + " must be positive and finite";
    case Problem::out_of_range:
      return name + " must be in [0, 1] or SYNCBN_MOMENTUM_CUMULATIVE";
    case Problem::unsupported: return name + " is not supported by this build";
    case Problem::not_divisor: return name + " must be >= 1 and divide the communicator size";
    case Problem::disagrees: return name + " differs across ranks";
    case Problem::invalid_enum: return name + " is not a valid enumeration value";
    case Problem::out_of_memory: return "out of memory";
    case Problem::no_device: return name + ": no usable CUDA device on this rank";
    case Problem::wrong_device:
      return name + ": the current CUDA device is not the one the plan (or its NCCL "
                    "communicator) is on";
    case Problem::cuda_failed: return name + ": a CUDA call failed on this rank";
    case Problem::wrong_dtype: return name + " is not of the plan's dtype (or parameter type)";
    case Problem::wrong_memory: return name + " is not in the memory of the plan's device";
    case Problem::wrong_layout: return name + " is not dense in the plan's layout";
    case Problem::wrong_shape: return name + " has a shape other than the call's";
    case Problem::rejected: return name + " was rejected by the caller";
    case Problem::comm_failed: return name + ": the communicator failed on this rank";
    case Problem::cannot_split:
      return name + ": a custom communicator without a split function cannot split";
    case Problem::wrong_group:
      return name + ": the split made a group of the wrong size or rank on this rank";
    case Problem::unexpected: return name + " must be NULL: the plan's activation takes none";
    case Problem::aliases: return name + " must not be the same memory as dx";
    case Problem::with_mask: return name + " must be NULL when mask is given (it replaces " + name + ")";
    case Problem::mask_aliases:
      return name + " must not be the same memory as x, y or z (forward), dx or dz (backward)";
  }
  return name + ": invalid";
}

syncbn_status_t status_of(Problem problem) {
  switch (problem) {
    case Problem::unsupported: return SYNCBN_ERROR_NOT_SUPPORTED;
    case Problem::disagrees: return SYNCBN_ERROR_CONFIG_MISMATCH;
    case Problem::out_of_memory: return SYNCBN_ERROR_OUT_OF_MEMORY;
    case Problem::cuda_failed: return SYNCBN_ERROR_INTERNAL;
    case Problem::comm_failed: return SYNCBN_ERROR_COMM;
    case Problem::cannot_split: return SYNCBN_ERROR_NOT_SUPPORTED;
    default: return SYNCBN_ERROR_INVALID_ARGUMENT;
  }
}

void put_error_record(double* slots, int rank, const ArgError& mine) {
  slots[0] = 1.0;  // participation
  slots[1] = slots[2] = slots[3] = slots[4] = 0.0;
  if (mine) put_error_slots(slots, rank, encode(mine));
}

void check_participation(const double* slots, int group_size) {
  if (std::llround(slots[0]) != group_size) {
    fail(SYNCBN_ERROR_INTERNAL, "guard: " + std::to_string(std::llround(slots[0])) +
                                    " ranks took part in a collective of a group of " +
                                    std::to_string(group_size));
  }
}

void check_error_record(const double* slots, int group_size, int rank, const ArgError& mine) {
  check_participation(slots, group_size);
  const long long failed = std::llround(slots[1]);
  if (failed == 0 && mine) {  // a transport that broke its contract (a custom allreduce)
    fail(SYNCBN_ERROR_INTERNAL, "guard: the allreduce's sums lost this rank's own failure (rank " +
                                    std::to_string(rank) + ": " + describe(mine.arg, mine.problem) +
                                    "): the transport does not sum");
  }
  if (failed == 0) return;
  if (failed < 0 || failed > group_size) {
    fail(SYNCBN_ERROR_INTERNAL, "guard: the allreduce's count of failing ranks is not one of " +
                                    std::to_string(group_size) +
                                    " ranks: the transport does not sum");
  }
  const std::string own = mine ? " (this rank, " + std::to_string(rank) + ": " +
                                     describe(mine.arg, mine.problem) +
                                     (mine.detail.empty() ? "" : "; " + mine.detail) + ")"
                               : "";
  if (!all_equal(slots[3], slots[4], static_cast<int>(failed))) {
    fail(SYNCBN_ERROR_INVALID_ARGUMENT,
         std::to_string(failed) + " of " + std::to_string(group_size) +
             " ranks rejected their arguments, with different errors" + own);
  }
  const auto code = static_cast<std::uint32_t>(std::llround(slots[3] / static_cast<double>(failed)));
  const auto arg = static_cast<Arg>(code >> kProblemBits);
  const auto problem = static_cast<Problem>(code & ((1u << kProblemBits) - 1));
  std::string who;
  if (failed == 1) {
    const double failing = std::round(slots[2]) - 1.0;  // garbage never reaches llround
    if (!(failing >= 0.0 && failing < static_cast<double>(group_size))) {
      fail(SYNCBN_ERROR_INTERNAL, "guard: the allreduce's failing rank is not a rank of the "
                                  "group: the transport does not sum");
    }
    who = "rank " + std::to_string(static_cast<long long>(failing));
  } else if (failed == group_size) {
    who = "every rank";
  } else {
    who = std::to_string(failed) + " of " + std::to_string(group_size) + " ranks";
  }
  std::string message = who + ": " + describe(arg, problem);
  if (mine && !mine.detail.empty()) message += " (this rank: " + mine.detail + ")";
  fail(status_of(problem), message);
}

void check_batch_count(double m, bool track) {
  switch (batch_verdict(m, track)) {
    case Verdict::empty_batch:
      fail(SYNCBN_ERROR_BATCH_TOO_SMALL,
           "the group's batch is empty (0 values per channel over all ranks)");
    case Verdict::bad_count:
      fail(SYNCBN_ERROR_COMM, "the group's count of values per channel summed to " +
                                  std::to_string(m) +
                                  ", which no batch gives: the allreduce returned garbage");
    case Verdict::single_value:
      fail(SYNCBN_ERROR_BATCH_TOO_SMALL,
           "1 value per channel over all ranks in training with track_running_stats: the "
           "unbiased running variance var * m / (m - 1) is undefined");
    default:
      return;
  }
}

void check_verdict(const double* slots, int group_size, int rank, const ArgError& mine,
                   const Fingerprint& fp, double m, bool track) {
  check_guards(slots, group_size, rank, mine, fp);
  check_batch_count(m, track);
}


bool agreed(const double* slots, int group_size) { return all_equal(slots[0], slots[1], group_size); }

void put_agree48(double* slots, std::uint64_t v) {
  for (int i = 0; i < 4; ++i) put_agree(slots + i * kAgreeSlots, static_cast<std::uint32_t>(v >> (12 * i)));
}

bool agreed48(const double* slots, int group_size) {
  for (int i = 0; i < 4; ++i) {
    if (!agreed(slots + i * kAgreeSlots, group_size)) return false;
  }
  return true;
}

const char* op_name(Op op) {
  switch (op) {
    case Op::forward_training: return "forward_training";
    case Op::forward_inference: return "forward_inference";
    case Op::backward: return "backward";
  }
  return "?";
}

namespace {

// The message of a fingerprint verdict (other_plan, other_op, other_call).
[[noreturn]] void fail_call_mismatch(Verdict v, const Fingerprint& mine) {
  const char* what = v == Verdict::other_plan ? "another plan (layer)"
                     : v == Verdict::other_op
                         ? "another operation (forward vs backward, training vs inference)"
                         : "another call of the sequence (a rank skipped or repeated a call)";
  fail(SYNCBN_ERROR_CALL_MISMATCH,
       std::string("call mismatch: ranks of the group are in different calls, some in ") + what +
           "; this rank is in " + op_name(mine.op) + " call #" +
           std::to_string(mine.seq) + " of its plan. The plan's call sequence is now out of "
           "step across ranks: destroy it and create it again");
}

}  // namespace

void put_guards(double* slots, int rank, const ArgError& mine, const Fingerprint& fp) {
  put_error_record(slots, rank, mine);
  put_agree48(slots + kErrorSlots, fp.plan);
  put_agree(slots + kErrorSlots + kAgree48Slots, static_cast<std::uint32_t>(fp.op));
  put_sequence(slots, fp.seq);
}

void check_guards(const double* slots, int group_size, int rank, const ArgError& mine,
                  const Fingerprint& fp) {
  switch (const Verdict v = guard_verdict(slots, group_size)) {
    case Verdict::participation:
      check_participation(slots, group_size);
      fail(SYNCBN_ERROR_INTERNAL, "guard: the participation count is not a number of ranks");
    case Verdict::other_plan:
    case Verdict::other_op:
    case Verdict::other_call:
      fail_call_mismatch(v, fp);
    default:  // rank_failed, or pass (which check_error_record checks against this rank's error)
      check_error_record(slots, group_size, rank, mine);
  }
}

}  // namespace syncbn::core
