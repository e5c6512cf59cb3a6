// tests/thread_comm.hpp: threads as the ranks of a group in one process. ThreadGroup is a
// rendezvous in memory for P threads: the allreduce of a custom communicator
// (syncbn_comm_create_custom; every rank deposits its buffer, each sums the deposits in rank
// order, so every rank gets the same bits), an allgather of bytes for the tests' own cross-rank
// checks, consecutive subgroups for the split function, and faults to inject for the failure
// tests. Member is one rank's user_data of the custom communicator; on_threads runs a body on P
// threads at once, each on one OpenMP thread (P ranks share the cores, as P processes started
// with OMP_NUM_THREADS=1 would); ThreadRanks is the Ranks policy of the scenario runner
// (scenarios.hpp). Used by test_custom_comm.cpp and test_thread_scenarios.cpp.
#ifndef SYNCBN_TESTS_THREAD_COMM_HPP
#define SYNCBN_TESTS_THREAD_COMM_HPP

#include <gtest/gtest.h>
#include <omp.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "reference.hpp"
#include "syncbn/syncbn.h"

namespace syncbn_test {

// P ranks as threads. Each exchange is a round: every rank deposits its bytes, and once all
// have, each reads the deposits; the next round starts once every rank has read.
class ThreadGroup {
 public:
  explicit ThreadGroup(int size)
      : size_(size), deposits_(static_cast<size_t>(size)), rank_calls_(static_cast<size_t>(size)) {}
  int size() const { return size_; }

  // What the group's allreduce does wrong, for the failure tests.
  enum class Fault {
    none,
    everywhere,    // the transport fails: every rank returns kFaultEverywhere
    one_rank_late  // fault_rank returns kFaultOneRank after taking part in the sum
  };
  static constexpr int kFaultEverywhere = 5;
  static constexpr int kFaultOneRank = 7;
  static constexpr int kSizesDisagree = 19;
  // Set before the threads start: the fault applies from each rank's allreduce number
  // fault_from on (0: plan creation is the first).
  Fault fault = Fault::none;
  int fault_from = 0;
  int fault_rank = 0;
  int split_fault_rank = -1;  // this rank's split function fails (after the split)
  // > 0: a rank that waits longer than this for its peers gives up and returns
  // SYNCBN_ERROR_TIMEOUT, as a transport with a deadline does (the group is unusable after).
  double wait_limit_seconds = 0;

  // The sum of count doubles over the group, in place, on rank's buffer: 0, or the fault's code.
  int allreduce(int rank, double* buffer, size_t count) {
    bool sizes_agree = true, faulty = false;
    const bool met = round(rank, buffer, count * sizeof(double), [&](const Deposits& d) {
      for (const auto& bytes : d)
        sizes_agree = sizes_agree && bytes.size() == count * sizeof(double);
      for (size_t i = 0; sizes_agree && i < count; ++i) {
        double s = 0;
        for (const auto& bytes : d) {
          double v;
          std::memcpy(&v, bytes.data() + i * sizeof(double), sizeof v);
          s += v;
        }
        buffer[i] = s;
      }
      faulty = rank_calls_[static_cast<size_t>(rank)]++ >= fault_from;
    });
    if (!met) return SYNCBN_ERROR_TIMEOUT;
    if (!sizes_agree) return kSizesDisagree;
    if (faulty && fault == Fault::everywhere) return kFaultEverywhere;
    if (faulty && fault == Fault::one_rank_late && rank == fault_rank) return kFaultOneRank;
    return 0;
  }

  // Every rank's bytes, in rank order, on every rank (empty if the round timed out).
  std::vector<std::vector<unsigned char>> allgather(int rank, const void* data, size_t bytes) {
    Deposits all;
    round(rank, data, bytes, [&](const Deposits& d) { all = d; });
    return all;
  }

  // The group of consecutive ranks [color * k, (color + 1) * k), the same object for each of them.
  std::shared_ptr<ThreadGroup> child(int k, int color) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto& g = children_[{k, color}];
    if (!g) g = std::make_shared<ThreadGroup>(k);
    return g;
  }

 private:
  using Deposits = std::vector<std::vector<unsigned char>>;

  // One round for rank; read(deposits) runs once every rank has deposited. False: the wait
  // limit passed first (the rank leaves without reading; the group is unusable after).
  template <class Read>
  bool round(int rank, const void* data, size_t bytes, Read&& read) {
    std::unique_lock<std::mutex> lock(mutex_);
    cv_.wait(lock, [&] { return !draining_; });
    const auto* p = static_cast<const unsigned char*>(data);
    deposits_[static_cast<size_t>(rank)].assign(p, p + bytes);
    if (++arrived_ == size_) {
      draining_ = true;
      cv_.notify_all();
    } else if (wait_limit_seconds > 0) {
      if (!cv_.wait_for(lock, std::chrono::duration<double>(wait_limit_seconds),
                        [&] { return draining_; })) {
        return false;
      }
    } else {
      cv_.wait(lock, [&] { return draining_; });
    }
    read(static_cast<const Deposits&>(deposits_));
    if (++departed_ == size_) {
      arrived_ = departed_ = 0;
      draining_ = false;
      cv_.notify_all();
    }
    return true;
  }

  const int size_;
  std::mutex mutex_;
  std::condition_variable cv_;
  Deposits deposits_;
  int arrived_ = 0, departed_ = 0;
  bool draining_ = false;
  std::vector<int> rank_calls_;
  std::map<std::pair<int, int>, std::shared_ptr<ThreadGroup>> children_;
};

// The number of custom communicators whose release ran (Member::release).
inline std::atomic<int>& released_count() {
  static std::atomic<int> n{0};
  return n;
}

// One rank's user_data: its group and rank. Owned by its communicator (freed by release).
struct Member {
  std::shared_ptr<ThreadGroup> group;
  int rank;

  static int allreduce(double* buffer, size_t count, syncbn_device_t device, void* stream,
                       void* self) {
    if (device != SYNCBN_DEVICE_CPU || stream != nullptr) return 11;
    auto* m = static_cast<Member*>(self);
    return m->group->allreduce(m->rank, buffer, count);
  }
  static int split(int k, void* self, syncbn_comm_t* sub) {
    auto* m = static_cast<Member*>(self);
    if (create(m->group->child(k, m->rank / k), m->rank % k, sub) != SYNCBN_SUCCESS) return 12;
    return m->rank == m->group->split_fault_rank ? 13 : 0;
  }
  static void release(void* self) {
    ++released_count();
    delete static_cast<Member*>(self);
  }
  static syncbn_status_t create(std::shared_ptr<ThreadGroup> group, int rank, syncbn_comm_t* out,
                                bool with_split = true) {
    const int size = group->size();
    auto* m = new Member{std::move(group), rank};
    const syncbn_status_t s = syncbn_comm_create_custom(
        rank, size, &allreduce, with_split ? &split : nullptr, &release, m, out);
    if (s != SYNCBN_SUCCESS) delete m;
    return s;
  }
};

// Runs body(rank) on P threads at once and waits for all of them. Each thread makes its
// OpenMP parallel regions one thread wide, so that P ranks do not start P full teams.
template <class F>
void on_threads(int P, F body) {
  std::vector<std::thread> threads;
  for (int r = 0; r < P; ++r) {
    threads.emplace_back([&body, r] {
      omp_set_num_threads(1);
      body(r);
    });
  }
  for (auto& t : threads) t.join();
}

// A custom communicator for rank of group (null, with a failed expectation, if refused).
inline CommHandle member_comm(const std::shared_ptr<ThreadGroup>& group, int rank,
                              bool with_split = true) {
  syncbn_comm_t c = nullptr;
  EXPECT_EQ(Member::create(group, rank, &c, with_split), SYNCBN_SUCCESS) << syncbn_last_error();
  return CommHandle(c);
}

// ---- the Ranks policy of the scenario runner (scenarios.hpp) ---------------------------------

// Threads as the ranks: rank r of checks' group, whose allgather and allreduce carry the
// tests' own cross-rank checks (checks is not the library's group: its rounds never meet the
// library's).
struct ThreadRanks {
  // What the ranks of one run share (one object, made by the first rank that asks).
  struct Shared {
    std::mutex mutex;
    std::shared_ptr<void> object;
  };
  std::shared_ptr<ThreadGroup> checks;
  int r = 0;
  std::shared_ptr<Shared> shared = std::make_shared<Shared>();  // the same for every rank

  int rank() const { return r; }
  int size() const { return checks->size(); }
  std::string tag() const { return "rank " + std::to_string(r); }
  // The object the first caller's make() returned, for every rank.
  template <class D, class Make>
  std::shared_ptr<D> share(Make&& make) const {
    std::lock_guard<std::mutex> lock(shared->mutex);
    if (!shared->object) shared->object = make();
    return std::static_pointer_cast<D>(shared->object);
  }

  // COLLECTIVE (every check): the consecutive group of k ranks holding rank r.
  class Group {
   public:
    Group(const ThreadRanks& ranks, int k)
        : group_(ranks.checks->child(k, ranks.r / k)),
          rank_(ranks.r % k),
          first_(ranks.r / k * k) {}
    int first() const { return first_; }

    // v equals, byte for byte, the copy of the group's rank 0.
    template <class T>
    ::testing::AssertionResult same_as_rank0(const std::string& what,
                                             const std::vector<T>& v) const {
      const size_t bytes = v.size() * sizeof(T);
      const auto all = group_->allgather(rank_, v.data(), bytes);
      if (all.empty()) return ::testing::AssertionFailure() << what << ": the exchange failed";
      const auto& root = all[0];
      if (root.size() != bytes)
        return ::testing::AssertionFailure()
               << what << ": " << bytes << " bytes here, " << root.size() << " on rank 0";
      if (bytes == 0 || std::memcmp(root.data(), v.data(), bytes) == 0)
        return ::testing::AssertionSuccess();
      size_t i = 0;
      while (std::memcmp(root.data() + i * sizeof(T), &v[i], sizeof(T)) == 0) ++i;
      T r0;
      std::memcpy(&r0, root.data() + i * sizeof(T), sizeof(T));
      std::ostringstream os;
      os.precision(17);
      os << what << " differs bitwise from the group's first rank, first at [" << i << "]: " << v[i]
         << " here vs " << r0;
      return ::testing::AssertionFailure() << os.str();
    }

    // The elementwise sum over the group, in double.
    template <class T>
    std::vector<double> sum(const std::vector<T>& v) const {
      std::vector<double> d(v.begin(), v.end());
      EXPECT_EQ(group_->allreduce(rank_, d.data(), d.size()), 0) << "the tests' own sum";
      return d;
    }

   private:
    std::shared_ptr<ThreadGroup> group_;
    int rank_, first_;
  };
};

}  // namespace syncbn_test

#endif  // SYNCBN_TESTS_THREAD_COMM_HPP
