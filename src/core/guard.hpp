// Guard slots: how ranks reach one verdict without extra collectives (docs/design.md section 2).
//
// Every collective this library makes is an allreduce(SUM) of fp64 slots. Next to the data it
// carries:
//   - a participation count (1 per rank; the sum must be the group size);
//   - an error record: count of failing ranks, sum of (rank + 1), sum of code and of code^2
//     over failing ranks, where code (< 4096) names an argument and what is wrong with it;
//   - agreement pairs: a small integer v (< 4096) sent as v and v^2. All ranks sent the same v
//     iff P * sum(v^2) == sum(v)^2 (Cauchy-Schwarz), evaluated exactly in integers. Call
//     fingerprints (plan, operation, sequence number) and plan configurations travel this way.
// Every rank evaluates the same sums and so raises the same error with the same message.
#ifndef SYNCBN_CORE_GUARD_HPP
#define SYNCBN_CORE_GUARD_HPP

#include <cstddef>
#include <cstdint>
#include <string>

#include "core/hd.hpp"
#include "syncbn/syncbn.h"

namespace syncbn::core {

// Exact test of "all group_size ranks sent the same v" from s1 = sum v and s2 = sum v^2
// (non-negative integers, exact in fp64): group_size * s2 == s1^2, in 128-bit integers.
SYNCBN_HD inline bool all_equal(double s1, double s2, int group_size) {
  // Sums a transport broke (NaN, huge) are no agreement, and must not reach the casts.
  constexpr double kLimit = 4611686018427387904.0;  // 2^62
  if (!(s1 >= 0.0 && s1 < kLimit && s2 >= 0.0 && s2 < kLimit)) return false;
  const auto a = static_cast<__int128>(group_size) * static_cast<__int128>(static_cast<long long>(s2 + 0.5));
  const auto r1 = static_cast<__int128>(static_cast<long long>(s1 + 0.5));
  return a == r1 * r1;
}

// The argument a rank rejected. Values are part of the wire format: append only.
enum class Arg : std::uint16_t {
  none = 0,
  x, y, weight, bias, save_mean, save_invstd, running_mean, running_var, num_batches_tracked,
  dy, dx, dweight, dbias, shape, ndim, stream,
  config, num_features, dtype, layout, device, eps, momentum, group_size, plan, sub,
  memory,
  other,  // an argument the caller named in syncbn_plan_reject_call that is none of the above
  z, dz, activation, args,
  mask,
};

// What is wrong with it. Values are part of the wire format: append only.
enum class Problem : std::uint16_t {
  null = 1,        // a required pointer is NULL
  channels,        // shape's channel dimension differs from num_features
  negative,        // a negative dimension
  ndim_range,      // ndim outside [2, 5]
  overflow,        // element count does not fit int64
  not_null,        // must be NULL (stream on a CPU plan)
  not_positive,    // must be > 0 and finite
  out_of_range,    // momentum outside [0, 1]
  unsupported,     // valid, but not built into this library (SYNCBN_ERROR_NOT_SUPPORTED)
  not_divisor,     // group_size does not divide the communicator size
  disagrees,       // the ranks passed different values
  invalid_enum,    // not one of the enumeration's values
  out_of_memory,   // an allocation failed (SYNCBN_ERROR_OUT_OF_MEMORY)
  no_device,       // a CUDA plan, and no usable CUDA device on this rank
  wrong_device,    // the current CUDA device is not the plan's (or its NCCL communicator's)
  cuda_failed,     // a CUDA call (launch, copy, synchronization) failed (SYNCBN_ERROR_INTERNAL)
  wrong_dtype,     // the caller says: not of the plan's dtype or parameter type
  wrong_memory,    // the caller says: not in the memory of the plan's device
  wrong_layout,    // the caller says: not dense in the plan's layout
  wrong_shape,     // the caller says: a shape other than the call's
  rejected,        // the caller rejected it for a reason syncbn has no name for
  comm_failed,     // the communicator's backend failed on this rank (SYNCBN_ERROR_COMM)
  cannot_split,    // a custom communicator without a split function (SYNCBN_ERROR_NOT_SUPPORTED)
  wrong_group,     // a split produced a group of the wrong size or rank
  unexpected,      // must be NULL: the plan's activation takes no such argument
  aliases,         // is the same memory as an output it must not be (dz and dx)
  with_mask,       // must be NULL when mask is given (backward's y: the mask replaces it)
  mask_aliases,    // the mask is the same memory as x, y, z (forward), dx or dz (backward)
};

// An error's wire code: argument and problem in 12 bits (so that code^2 stays exact in sums).
constexpr unsigned kProblemBits = 5;
SYNCBN_HD inline std::uint32_t error_code(Arg arg, Problem problem) {
  return (static_cast<std::uint32_t>(arg) << kProblemBits) | static_cast<std::uint32_t>(problem);
}

// A rank's own finding about its arguments. detail is extra text for this rank's message only.
struct ArgError {
  Arg arg = Arg::none;
  Problem problem = Problem::null;
  std::string detail;
  explicit operator bool() const { return arg != Arg::none; }
};

// The first problem found wins: sets err to (arg, problem) unless ok or err is already set.
void require(ArgError& err, bool ok, Arg arg, Problem problem = Problem::null);
// The rank's own error, raised on this rank only ("rank 2: weight is null").
[[noreturn]] void fail_local(int rank, const ArgError& err);

// "weight is null", "shape: channel dimension differs from num_features", ...
std::string describe(Arg arg, Problem problem);
// The argument of a C API name ("x", "running_var", ...); Arg::other for NULL or another name.
Arg arg_from_name(const char* name);
syncbn_status_t status_of(Problem problem);

// Slots of the participation count and error record: [1, failed, rank + 1, code, code^2].
constexpr std::size_t kErrorSlots = 5;
SYNCBN_HD inline void put_error_slots(double* slots, int rank, std::uint32_t code) {
  slots[1] = 1.0;
  slots[2] = static_cast<double>(rank) + 1.0;
  slots[3] = static_cast<double>(code);
  slots[4] = static_cast<double>(code) * static_cast<double>(code);
}
void put_error_record(double* slots, int rank, const ArgError& mine);
// Throws Failure(SYNCBN_ERROR_INTERNAL) if the participation count is not group_size.
void check_participation(const double* slots, int group_size);
// After the allreduce: throws Failure, identically on every rank, if any rank failed or the
// participation count is not group_size. rank is this rank's, to name it in messages.
void check_error_record(const double* slots, int group_size, int rank, const ArgError& mine);

// An agreement pair: v (< 4096) and v^2.
constexpr std::size_t kAgreeSlots = 2;
constexpr std::uint32_t kAgreeMask = 0xFFF;
SYNCBN_HD inline void put_agree(double* slots, std::uint64_t v) {
  v &= kAgreeMask;
  slots[0] = static_cast<double>(v);
  slots[1] = static_cast<double>(v) * static_cast<double>(v);
}
bool agreed(const double* slots, int group_size);

// A 48-bit value as four agreement pairs of 12 bits.
constexpr std::size_t kAgree48Slots = 4 * kAgreeSlots;
void put_agree48(double* slots, std::uint64_t v);
bool agreed48(const double* slots, int group_size);

// Which call a rank is in: plan tag (48 bits: creation serial and configuration, so two layers
// collide with probability 2^-48), operation, call sequence number (12 bits).
enum class Op : std::uint32_t { forward_training = 1, forward_inference = 2, backward = 3 };
// "forward_training", "forward_inference", "backward" ("?" for another value).
const char* op_name(Op op);
struct Fingerprint {
  std::uint64_t plan = 0;
  Op op = Op::forward_training;
  std::uint64_t seq = 0;
};
constexpr std::size_t kFingerprintSlots = kAgree48Slots + 2 * kAgreeSlots;
// Where the sequence number's pair sits in a packed buffer.
constexpr std::size_t kSequenceSlot = kErrorSlots + kAgree48Slots + kAgreeSlots;
// Writes the sequence number's pair of a packed buffer's guards (put_guards does; CUDA plans
// rewrite it on the device from their call counter).
SYNCBN_HD inline void put_sequence(double* guards, std::uint64_t seq) {
  put_agree(guards + kSequenceSlot, seq);
}

// Everything a per-call packed buffer carries, at its start: at a fixed offset, so that even
// ranks in calls of different plans (different C) compare the same slots.
constexpr std::size_t kGuardSlots = kErrorSlots + kFingerprintSlots;
void put_guards(double* slots, int rank, const ArgError& mine, const Fingerprint& fp);
// Participation, then fingerprints (a rank in another call makes its error record
// meaningless), then errors.
void check_guards(const double* slots, int group_size, int rank, const ArgError& mine,
                  const Fingerprint& fp);

// A call's verdict, in the order it is reached (docs/design.md section 2.3), written once: device
// code evaluates it (verdict_of) and the host turns it into a status and message (check_guards,
// check_batch_count, check_verdict).
enum class Verdict : int {
  pass = 0,
  participation,  // the participation count is not the group size
  other_plan,     // the plan tags differ
  other_op,       // the operations differ
  other_call,     // the sequence numbers differ
  rank_failed,    // a rank sent an error
  empty_batch,    // m < 1
  single_value,   // m < 2 in training with running statistics
  bad_count,      // m is no count of values (NaN, infinite, negative): the sum is garbage
};

// The guards' part of the verdict: participation, fingerprint, error record.
SYNCBN_HD inline Verdict guard_verdict(const double* slots, int group_size) {
  if (!(slots[0] + 0.5 >= 0.0 && slots[0] + 0.5 < 2147483648.0) ||
      static_cast<long long>(slots[0] + 0.5) != group_size) {
    return Verdict::participation;
  }
  const double* f = slots + kErrorSlots;
  for (std::size_t i = 0; i < kAgree48Slots; i += kAgreeSlots) {
    if (!all_equal(f[i], f[i + 1], group_size)) return Verdict::other_plan;
  }
  if (!all_equal(f[kAgree48Slots], f[kAgree48Slots + 1], group_size)) return Verdict::other_op;
  if (!all_equal(f[kAgree48Slots + kAgreeSlots], f[kAgree48Slots + kAgreeSlots + 1], group_size)) {
    return Verdict::other_call;
  }
  return slots[1] != 0.0 ? Verdict::rank_failed : Verdict::pass;
}

// The group's count per channel m must be >= 1, and >= 2 in training with running statistics
// (the unbiased variance).
SYNCBN_HD inline Verdict batch_verdict(double m, bool track) {
  if (!(m >= 0.0 && m <= 9.3e18)) return Verdict::bad_count;  // NaN fails both
  if (m < 1.0) return Verdict::empty_batch;
  return track && m < 2.0 ? Verdict::single_value : Verdict::pass;
}

// The whole verdict of a packed buffer [guards | 2C sums | m].
SYNCBN_HD inline Verdict verdict_of(const double* slots, int group_size, double m, bool track) {
  const Verdict v = guard_verdict(slots, group_size);
  return v != Verdict::pass ? v : batch_verdict(m, track);
}

// Throws Failure(SYNCBN_ERROR_BATCH_TOO_SMALL) unless batch_verdict passes.
void check_batch_count(double m, bool track);
// check_guards, then check_batch_count.
void check_verdict(const double* slots, int group_size, int rank, const ArgError& mine,
                   const Fingerprint& fp, double m, bool track);

}  // namespace syncbn::core

#endif  // SYNCBN_CORE_GUARD_HPP
