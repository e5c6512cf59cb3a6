// The guard protocol in one process (src/core/guard.cpp compiled into this test): P ranks'
// guard slots summed here, in rank order, as an allreduce(SUM) would, for every P from 1 to 16
// and a spread of P up to 1024, with random fingerprints and errors. Every rank's verdict must be
// the one docs/design.md section 2.3 gives, with the same status and message on every rank.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "core/error.hpp"
#include "core/guard.hpp"

namespace {

using syncbn::core::Arg;
using syncbn::core::ArgError;
using syncbn::core::Failure;
using syncbn::core::Fingerprint;
using syncbn::core::kGuardSlots;
using syncbn::core::Op;
using syncbn::core::Problem;
using syncbn::core::Verdict;

std::vector<int> group_sizes() {
  std::vector<int> sizes;
  for (int p = 1; p <= 16; ++p) sizes.push_back(p);
  for (int p : {17, 31, 32, 33, 63, 64, 100, 127, 128, 255, 256, 257, 500, 511, 512, 513, 1000,
                1023, 1024}) {
    sizes.push_back(p);
  }
  return sizes;
}

// What one rank sends.
struct Rank {
  Fingerprint fp;
  ArgError err;
};

// The allreduce of every rank's guards (those with take_part), in rank order.
std::vector<double> summed(const std::vector<Rank>& ranks, int skip = -1) {
  std::vector<double> sum(kGuardSlots, 0.0), mine(kGuardSlots);
  for (std::size_t r = 0; r < ranks.size(); ++r) {
    if (static_cast<int>(r) == skip) continue;
    syncbn::core::put_guards(mine.data(), static_cast<int>(r), ranks[r].err, ranks[r].fp);
    for (std::size_t i = 0; i < kGuardSlots; ++i) sum[i] += mine[i];
  }
  return sum;
}

// Every rank's status and message for the summed slots (SYNCBN_SUCCESS, "" when none).
struct Outcome {
  syncbn_status_t status = SYNCBN_SUCCESS;
  std::string message;
};
Outcome judge(const std::vector<double>& slots, int P, int rank, const Rank& mine) {
  try {
    syncbn::core::check_guards(slots.data(), P, rank, mine.err, mine.fp);
  } catch (const Failure& f) {
    return {f.status(), f.what()};
  }
  return {};
}

// The part of a message every rank shares: up to where it describes this rank's own call
// ("; this rank is in backward call #12 of its plan", which is each rank's own).
std::string shared_part(const std::string& message) {
  return message.substr(0, message.find("; this rank is in"));
}

// Every rank's outcome is the same status with the same message (but for its own call's).
// P is the group size the ranks expect (ranks may hold fewer: those that took part).
::testing::AssertionResult same_everywhere(const std::vector<double>& slots,
                                           const std::vector<Rank>& ranks, Outcome* out,
                                           int P = 0) {
  if (P == 0) P = static_cast<int>(ranks.size());
  *out = judge(slots, P, 0, ranks[0]);
  for (int r = 1; r < static_cast<int>(ranks.size()); ++r) {
    const Outcome o = judge(slots, P, r, ranks[r]);
    if (o.status != out->status) {
      return ::testing::AssertionFailure() << "rank " << r << " got " << o.status << ", rank 0 "
                                           << out->status;
    }
    if (shared_part(o.message) != shared_part(out->message) && !ranks[r].err && !ranks[0].err) {
      return ::testing::AssertionFailure() << "rank " << r << ": '" << o.message << "', rank 0: '"
                                           << out->message << "'";
    }
  }
  return ::testing::AssertionSuccess();
}

Fingerprint random_fingerprint(std::mt19937_64& rng) {
  return {rng() & ((std::uint64_t{1} << 48) - 1), static_cast<Op>(1 + rng() % 3), rng() % 100000};
}

TEST(Guard, AgreementPassesForEveryGroupSize) {
  std::mt19937_64 rng(2026);
  for (int P : group_sizes()) {
    SCOPED_TRACE("P = " + std::to_string(P));
    const Fingerprint fp = random_fingerprint(rng);
    std::vector<Rank> ranks(static_cast<std::size_t>(P), Rank{fp, {}});
    const std::vector<double> s = summed(ranks);
    EXPECT_EQ(syncbn::core::guard_verdict(s.data(), P), Verdict::pass);
    Outcome o;
    EXPECT_TRUE(same_everywhere(s, ranks, &o));
    EXPECT_EQ(o.status, SYNCBN_SUCCESS) << o.message;
  }
}

// One rank in another plan, operation or call (any one field of its fingerprint off by any
// amount, the largest 12-bit value included) is a call mismatch on every rank, whatever P.
TEST(Guard, OneDeviatingFingerprintIsACallMismatch) {
  std::mt19937_64 rng(7);
  for (int P : group_sizes()) {
    if (P < 2) continue;
    for (int field = 0; field < 3; ++field) {
      SCOPED_TRACE("P = " + std::to_string(P) + ", field " + std::to_string(field));
      const Fingerprint fp = random_fingerprint(rng);
      std::vector<Rank> ranks(static_cast<std::size_t>(P), Rank{fp, {}});
      Fingerprint& odd = ranks[rng() % static_cast<std::size_t>(P)].fp;
      const Verdict want = field == 0 ? Verdict::other_plan
                           : field == 1 ? Verdict::other_op
                                        : Verdict::other_call;
      if (field == 0) odd.plan ^= std::uint64_t{0xFFF} << (12 * (rng() % 4));
      if (field == 1) odd.op = static_cast<Op>(static_cast<int>(odd.op) % 3 + 1);
      if (field == 2) odd.seq += 1 + rng() % 4095;  // seq travels as its low 12 bits
      if (field == 2 && (odd.seq & 0xFFF) == (fp.seq & 0xFFF)) odd.seq += 1;
      const std::vector<double> s = summed(ranks);
      EXPECT_EQ(syncbn::core::guard_verdict(s.data(), P), want);
      Outcome o;
      EXPECT_TRUE(same_everywhere(s, ranks, &o));
      EXPECT_EQ(o.status, SYNCBN_ERROR_CALL_MISMATCH) << o.message;
    }
  }
}

// k failing ranks with the same error: the error's status and a message naming the rank (k = 1),
// "every rank" (k = P) or "k of P ranks"; with two different errors, "different errors".
TEST(Guard, FailingRanksAreNamedAlike) {
  std::mt19937_64 rng(11);
  for (int P : group_sizes()) {
    const Fingerprint fp = random_fingerprint(rng);
    for (int k : {1, 2, P}) {
      if (k > P) continue;
      SCOPED_TRACE("P = " + std::to_string(P) + ", k = " + std::to_string(k));
      std::vector<Rank> ranks(static_cast<std::size_t>(P), Rank{fp, {}});
      std::vector<int> failing;  // the last k ranks
      for (int r = P - 1; r >= P - k; --r) failing.push_back(r);
      for (int r : failing) ranks[static_cast<std::size_t>(r)].err = {Arg::weight, Problem::null, {}};
      std::vector<double> s = summed(ranks);
      EXPECT_EQ(syncbn::core::guard_verdict(s.data(), P), Verdict::rank_failed);
      Outcome o;
      EXPECT_TRUE(same_everywhere(s, ranks, &o));
      EXPECT_EQ(o.status, SYNCBN_ERROR_INVALID_ARGUMENT);
      const std::string who = k == 1   ? "rank " + std::to_string(P - 1) + ": weight is null"
                              : k == P ? "every rank: weight is null"
                                       : std::to_string(k) + " of " + std::to_string(P) + " ranks";
      EXPECT_NE(o.message.find(who), std::string::npos) << o.message;

      if (k >= 2) {  // one of them with another error
        ranks[static_cast<std::size_t>(failing[0])].err = {Arg::num_features, Problem::overflow, {}};
        s = summed(ranks);
        EXPECT_TRUE(same_everywhere(s, ranks, &o));
        EXPECT_EQ(o.status, SYNCBN_ERROR_INVALID_ARGUMENT);
        EXPECT_NE(o.message.find("different errors"), std::string::npos) << o.message;
      }
    }
  }
}

// A rank missing from the sum (a transport that does not sum) is an internal error on every
// rank, before the fingerprints are read; so is a rank whose own failure the sums lost.
TEST(Guard, ParticipationComesFirstAndLostFailuresAreInternal) {
  std::mt19937_64 rng(13);
  for (int P : group_sizes()) {
    if (P < 2) continue;
    SCOPED_TRACE("P = " + std::to_string(P));
    const Fingerprint fp = random_fingerprint(rng);
    std::vector<Rank> ranks(static_cast<std::size_t>(P), Rank{fp, {}});
    ranks[0].fp.seq += 1;  // a mismatch, which participation must hide
    const std::vector<double> s = summed(ranks, P - 1);
    EXPECT_EQ(syncbn::core::guard_verdict(s.data(), P), Verdict::participation);
    ranks.pop_back();
    Outcome o;
    EXPECT_TRUE(same_everywhere(s, ranks, &o, P));
    EXPECT_EQ(o.status, SYNCBN_ERROR_INTERNAL) << o.message;

    std::vector<Rank> honest(static_cast<std::size_t>(P), Rank{fp, {}});
    const std::vector<double> clean = summed(honest);
    const Outcome lost = judge(clean, P, 0, Rank{fp, {Arg::x, Problem::null, {}}});
    EXPECT_EQ(lost.status, SYNCBN_ERROR_INTERNAL);
    EXPECT_NE(lost.message.find("lost this rank's own failure"), std::string::npos) << lost.message;
  }
}

// Sums a broken transport could deliver (NaN, huge, negative) are never an agreement.
TEST(Guard, GarbageSumsNeverPass) {
  const int P = 4;
  std::vector<Rank> ranks(P, Rank{Fingerprint{123, Op::backward, 9}, {}});
  const std::vector<double> good = summed(ranks);
  for (std::size_t slot = 0; slot < kGuardSlots; ++slot) {
    if (slot >= 1 && slot <= 4) continue;  // the error record of a group without errors
    for (double bad : {std::nan(""), 1e300, -1.0, 0.5e19}) {
      std::vector<double> s = good;
      s[slot] = bad;
      EXPECT_NE(syncbn::core::guard_verdict(s.data(), P), Verdict::pass)
          << "slot " << slot << " = " << bad;
    }
  }
}

// A garbage error record (the count of failing ranks, the failing rank's number) from a broken
// transport is SYNCBN_ERROR_INTERNAL, with no arithmetic on the garbage (the fuzzer once reached
// llround(NaN) - 1, a signed overflow, here).
TEST(Guard, GarbageErrorRecordIsInternal) {
  const int P = 4;
  std::vector<Rank> ranks(P, Rank{Fingerprint{123, Op::backward, 9}, {}});
  ranks[2].err = {Arg::weight, Problem::null, {}};
  const std::vector<double> good = summed(ranks);
  EXPECT_EQ(judge(good, P, 0, ranks[0]).status, SYNCBN_ERROR_INVALID_ARGUMENT);
  for (std::size_t slot : {std::size_t{1}, std::size_t{2}}) {
    for (double bad : {std::nan(""), 1e300, -1e300, -7.0, 0.5e19, 1e19}) {
      std::vector<double> s = good;
      s[slot] = bad;
      EXPECT_EQ(judge(s, P, 0, ranks[0]).status, SYNCBN_ERROR_INTERNAL)
          << "slot " << slot << " = " << bad;
    }
  }
}

// Every argument and problem round-trips through its 12-bit wire code.
TEST(Guard, ErrorCodesFitTwelveBits) {
  for (int a = static_cast<int>(Arg::x); a <= static_cast<int>(Arg::other); ++a) {
    for (int p = static_cast<int>(Problem::null); p <= static_cast<int>(Problem::wrong_group); ++p) {
      const std::uint32_t code = syncbn::core::error_code(static_cast<Arg>(a), static_cast<Problem>(p));
      EXPECT_LT(code, 4096u);
      EXPECT_EQ(code >> syncbn::core::kProblemBits, static_cast<std::uint32_t>(a));
      EXPECT_EQ(code & ((1u << syncbn::core::kProblemBits) - 1), static_cast<std::uint32_t>(p));
    }
  }
}

TEST(Guard, BatchVerdict) {
  EXPECT_EQ(syncbn::core::batch_verdict(0.0, false), Verdict::empty_batch);
  EXPECT_EQ(syncbn::core::batch_verdict(0.0, true), Verdict::empty_batch);
  EXPECT_EQ(syncbn::core::batch_verdict(1.0, false), Verdict::pass);
  EXPECT_EQ(syncbn::core::batch_verdict(1.0, true), Verdict::single_value);
  EXPECT_EQ(syncbn::core::batch_verdict(2.0, true), Verdict::pass);
  // A count no batch gives is garbage from the transport, not an empty batch.
  EXPECT_EQ(syncbn::core::batch_verdict(std::nan(""), false), Verdict::bad_count);
  EXPECT_EQ(syncbn::core::batch_verdict(-1.0, true), Verdict::bad_count);
  EXPECT_EQ(syncbn::core::batch_verdict(HUGE_VAL, false), Verdict::bad_count);
  EXPECT_EQ(syncbn::core::batch_verdict(0.5, false), Verdict::empty_batch);
}

}  // namespace
