// The shared main of the MPI test binaries: MPI_Init, GoogleTest, the verdict reduced over
// MPI_COMM_WORLD, MPI_Finalize. Every rank runs every test (tests are collective); a failure on
// any rank fails the run on every rank.
//
// Output: rank 0 prints GoogleTest's usual progress. The other ranks print only their failures,
// each line prefixed with "[rank r]". After each test, the ranks gather their verdicts and rank 0
// names the ranks on which the test failed; this also keeps the ranks in step at test boundaries.
// A watchdog names a test that hangs (a rank waiting for peers) and ends the run.
#include <gtest/gtest.h>
#include <mpi.h>

#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

namespace {

// Prints failed assertions and failed tests, every line prefixed with the rank.
class RankFailurePrinter : public ::testing::EmptyTestEventListener {
 public:
  explicit RankFailurePrinter(int rank) : prefix_("[rank " + std::to_string(rank) + "] ") {}

  void OnTestPartResult(const ::testing::TestPartResult& r) override {
    if (!r.failed()) return;
    std::ostringstream os;
    os << (r.file_name() ? r.file_name() : "unknown file") << ":" << r.line_number()
       << ": Failure\n"
       << r.summary();
    print(os.str());
  }

  void OnTestEnd(const ::testing::TestInfo& info) override {
    if (info.result()->Failed())
      print(std::string("[  FAILED  ] ") + info.test_suite_name() + "." + info.name());
  }

 private:
  void print(const std::string& text) const {
    std::istringstream in(text);
    std::string out, line;
    while (std::getline(in, line)) out += prefix_ + line + "\n";
    std::fputs(out.c_str(), stdout);
    std::fflush(stdout);
  }

  std::string prefix_;
};

// After each test: rank 0 learns which ranks failed it and says so.
class RankVerdictReporter : public ::testing::EmptyTestEventListener {
 public:
  RankVerdictReporter(int rank, int size) : rank_(rank), size_(size) {}

  void OnTestEnd(const ::testing::TestInfo& info) override {
    const int failed = info.result()->Failed() ? 1 : 0;
    std::vector<int> all(rank_ == 0 ? size_ : 0);
    MPI_Gather(&failed, 1, MPI_INT, all.data(), 1, MPI_INT, 0, MPI_COMM_WORLD);
    if (rank_ != 0) return;
    std::string ranks;
    for (int r = 0; r < size_; ++r)
      if (all[r]) ranks += (ranks.empty() ? "" : ",") + std::to_string(r);
    if (!ranks.empty()) {
      std::printf("[  FAILED  ] %s.%s on rank(s) %s of %d\n", info.test_suite_name(), info.name(),
                  ranks.c_str(), size_);
      std::fflush(stdout);
    }
  }

 private:
  int rank_, size_;
};

// A test that runs longer than the limit is most likely a rank waiting for a peer that will never
// come: name it and exit, so that mpirun ends the job (ctest's TIMEOUT would only say that the
// whole binary was too slow). Limit: SYNCBN_TEST_WATCHDOG_S seconds, default 60, 0 disables.
class Watchdog : public ::testing::EmptyTestEventListener {
 public:
  Watchdog(int rank, int seconds) : rank_(rank), limit_(seconds) {
    if (limit_ > 0) thread_ = std::thread([this] { watch(); });
  }
  ~Watchdog() override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    if (thread_.joinable()) thread_.join();
  }

  void OnTestStart(const ::testing::TestInfo& info) override {
    std::lock_guard<std::mutex> lock(mu_);
    test_ = std::string(info.test_suite_name()) + "." + info.name();
    deadline_ = std::chrono::steady_clock::now() + std::chrono::seconds(limit_);
    armed_ = true;
    cv_.notify_all();
  }
  void OnTestEnd(const ::testing::TestInfo&) override {
    std::lock_guard<std::mutex> lock(mu_);
    armed_ = false;
  }

 private:
  void watch() {
    std::unique_lock<std::mutex> lock(mu_);
    while (!stop_) {
      if (!armed_) {
        cv_.wait(lock);
        continue;
      }
      const auto deadline = deadline_;
      if (cv_.wait_until(lock, deadline) == std::cv_status::timeout && armed_ &&
          deadline_ == deadline && !stop_) {
        std::fprintf(stderr,
                     "[rank %d] watchdog: %s still running after %d s (a rank waiting for its "
                     "peers?); exiting\n",
                     rank_, test_.c_str(), limit_);
        std::fflush(stderr);
        std::fflush(stdout);
        std::_Exit(124);
      }
    }
  }

  int rank_, limit_;
  std::thread thread_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::string test_;
  std::chrono::steady_clock::time_point deadline_{};
  bool armed_ = false, stop_ = false;
};

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  ::testing::InitGoogleTest(&argc, argv);
  int rank = 0, size = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);

  auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
  if (rank != 0) {
    delete listeners.Release(listeners.default_result_printer());
    listeners.Append(new RankFailurePrinter(rank));
  }
  listeners.Append(new RankVerdictReporter(rank, size));
  const char* limit = std::getenv("SYNCBN_TEST_WATCHDOG_S");
  auto* watchdog = new Watchdog(rank, limit ? std::atoi(limit) : 60);
  listeners.Append(watchdog);

  int failed = RUN_ALL_TESTS() != 0 ? 1 : 0;
  delete listeners.Release(watchdog);
  MPI_Allreduce(MPI_IN_PLACE, &failed, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  if (rank == 0)
    std::printf("[ verdict  ] %s over %d rank(s)\n", failed ? "FAILED" : "PASSED", size);
  MPI_Finalize();
  return failed;
}
