#include "comm/mpi.hpp"

#include <array>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <utility>
#include <vector>
#if __has_include(<mpi-ext.h>)
#include <mpi-ext.h>  // Open MPI: MPIX_CUDA_AWARE_SUPPORT, MPIX_Query_cuda_support
#endif

#include "core/error.hpp"

namespace syncbn::comm {
namespace {

std::string mpi_error_text(int code) {
  char text[MPI_MAX_ERROR_STRING];
  int length = 0;
  if (MPI_Error_string(code, text, &length) != MPI_SUCCESS) return "MPI error " + std::to_string(code);
  return std::string(text, static_cast<std::size_t>(length));
}

// Whether MPI_Allreduce may be given device pointers: Open MPI's run-time answer where it has
// one (MPIX_Query_cuda_support), overridden by SYNCBN_MPI_CUDA_AWARE=0|1 in the environment.
bool cuda_aware() {
  static const bool aware = [] {
    if (const char* env = std::getenv("SYNCBN_MPI_CUDA_AWARE")) return std::strcmp(env, "1") == 0;
#if defined(MPIX_CUDA_AWARE_SUPPORT) && MPIX_CUDA_AWARE_SUPPORT
    return MPIX_Query_cuda_support() == 1;
#else
    return false;
#endif
  }();
  return aware;
}

bool mpi_finalized() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  return finalized != 0;
}

// A collective abandoned at its deadline (or after an MPI error): its pending requests and the
// memory MPI may still write, kept for the life of the process (MPI forbids freeing or
// cancelling a pending collective request; a late peer may still complete it).
void abandon(const MPI_Request* requests, int n, std::shared_ptr<void> keep_alive) {
  auto kept = std::make_shared<std::pair<std::vector<MPI_Request>, std::shared_ptr<void>>>();
  for (int i = 0; i < n; ++i) {
    if (requests[i] != MPI_REQUEST_NULL) kept->first.push_back(requests[i]);
  }
  kept->second = std::move(keep_alive);
  keep_forever(std::move(kept));
}

// Polls the n requests with MPI_Testall until all complete (true) or the clock passes end
// (false: the requests still pending are abandoned with keep_alive). An MPI error abandons them
// too and throws Failure(SYNCBN_ERROR_COMM).
bool poll_until(MPI_Request* requests, int n, double end, std::shared_ptr<void> keep_alive) {
  int done = 0;
  for (unsigned i = 0;; ++i) {
    const int code = MPI_Testall(n, requests, &done, MPI_STATUSES_IGNORE);
    if (code != MPI_SUCCESS) {
      abandon(requests, n, std::move(keep_alive));
      check_mpi(code, "MPI_Testall");
    }
    if (done) return true;
    // The clock is read every 64 polls: cheap next to MPI_Testall, fine-grained next to seconds.
    if ((i & 63u) == 63u && now_seconds() >= end) {
      abandon(requests, n, std::move(keep_alive));
      return false;
    }
  }
}

class MpiCommunicator final : public Communicator {
 public:
  // Takes ownership of comm (a communicator this library created).
  explicit MpiCommunicator(MPI_Comm comm) : comm_(comm) {
    MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN);
    check_mpi(MPI_Comm_rank(comm_, &rank_), "MPI_Comm_rank");
    check_mpi(MPI_Comm_size(comm_, &size_), "MPI_Comm_size");
  }
  ~MpiCommunicator() override {
    // A broken communicator may have a collective in flight that a late peer can still
    // complete: leave it to MPI_Finalize rather than free it under MPI's feet.
    if (!mpi_finalized() && !broken()) MPI_Comm_free(&comm_);
  }
  MpiCommunicator(const MpiCommunicator&) = delete;
  MpiCommunicator& operator=(const MpiCommunicator&) = delete;

  int rank() const override { return rank_; }
  int size() const override { return size_; }

  DeviceBuffers device_buffers() const override {
    return cuda_aware() ? DeviceBuffers::after_sync : DeviceBuffers::stage;
  }

 protected:
  // Without a deadline, the blocking MPI_Allreduce. With one, recursive doubling over
  // non-blocking point-to-point messages, polled (see recursive_doubling).
  void allreduce_host(double* buffer, std::size_t count, Deadline deadline) override {
    if (deadline.none()) {
      check_mpi(MPI_Allreduce(MPI_IN_PLACE, buffer, static_cast<int>(count), MPI_DOUBLE, MPI_SUM,
                              comm_),
                "MPI_Allreduce");
      return;
    }
    if (size_ == 1) return;
    recursive_doubling(buffer, count, deadline);
  }

  // CUDA-aware MPI takes the device pointer. On expiry MPI may still write buffer, the plan's
  // device memory: the communicator is broken then, and a CUDA plan on a broken communicator
  // never frees its device memory (core/plan.cpp, Plan::~Plan).
  void allreduce_device(double* buffer, std::size_t count, void*, Deadline deadline) override {
    MPI_Request request = MPI_REQUEST_NULL;
    check_mpi(MPI_Iallreduce(MPI_IN_PLACE, buffer, static_cast<int>(count), MPI_DOUBLE, MPI_SUM,
                             comm_, &request),
              "MPI_Iallreduce");
    wait(&request, deadline, count, nullptr);
  }

  // MPI has no non-blocking split: MPI_Comm_split follows the allreduces of syncbn_comm_split
  // that found every rank present and agreeing.
  std::shared_ptr<Communicator> split(int group_size, Deadline) override {
    MPI_Comm sub = MPI_COMM_NULL;
    check_mpi(MPI_Comm_split(comm_, rank_ / group_size, rank_, &sub), "MPI_Comm_split");
    return std::make_shared<MpiCommunicator>(sub);
  }

  void abort_backend() override { MPI_Abort(comm_, 1); }

 private:
  void wait(MPI_Request* request, Deadline deadline, std::size_t count,
            std::shared_ptr<void> keep_alive) {
    mpi_wait(request, deadline,
             "MPI_Iallreduce of " + std::to_string(count) + " doubles over " +
                 std::to_string(size_) + " ranks (rank " + std::to_string(rank_) + ")",
             std::move(keep_alive));
  }

  // The sum by recursive doubling (Thakur, Rabenseifner and Gropp, "Optimization of collective
  // communication operations in MPICH", IJHPCA 19(1), 2005, section 4.4), the algorithm MPI
  // libraries use for short vectors, on MPI_Isend / MPI_Irecv polled with MPI_Testall against
  // the deadline. (Open MPI's MPI_Iallreduce, a generic schedule, takes 1.4x to 1.8x as long as
  // its blocking MPI_Allreduce on buffers of 146 to 4114 doubles at 2 ranks; this takes about
  // the same: bench/exchange_bench.) P not a power of two: the first 2r ranks (r = P - 2^k)
  // fold in pairs, the odd one of each pair going on, and get the result back at the end.
  // Every rank ends with the same bits: each step adds the same two vectors on both partners,
  // and floating-point addition is commutative.
  // The work is done on the communicator's own memory ([work | incoming]), so that after a
  // timeout the abandoned messages own what MPI may still write.
  void recursive_doubling(double* buffer, std::size_t count, Deadline deadline) {
    if (!wire_ || wire_->size() < 2 * count) {
      wire_ = std::make_shared<std::vector<double>>(2 * count);
    }
    double* const work = wire_->data();
    double* const incoming = work + count;
    std::memcpy(work, buffer, count * sizeof(double));
    const int n = static_cast<int>(count);
    const double start = now_seconds();

    int pof2 = 1;
    while (pof2 * 2 <= size_) pof2 *= 2;
    const int rem = size_ - pof2;
    int virtual_rank = 0;
    if (rank_ < 2 * rem) {
      if (rank_ % 2 == 0) {
        exchange(work, nullptr, n, rank_ + 1, start, deadline);  // send, then wait for the sum
        virtual_rank = -1;
      } else {
        exchange(nullptr, incoming, n, rank_ - 1, start, deadline);
        for (int i = 0; i < n; ++i) work[i] += incoming[i];
        virtual_rank = rank_ / 2;
      }
    } else {
      virtual_rank = rank_ - rem;
    }
    if (virtual_rank >= 0) {
      for (int mask = 1; mask < pof2; mask <<= 1) {
        const int partner_virtual = virtual_rank ^ mask;
        const int partner = partner_virtual < rem ? partner_virtual * 2 + 1 : partner_virtual + rem;
        exchange(work, incoming, n, partner, start, deadline);
        for (int i = 0; i < n; ++i) work[i] += incoming[i];
      }
    }
    if (rank_ < 2 * rem) {
      if (rank_ % 2 == 1) {
        exchange(work, nullptr, n, rank_ - 1, start, deadline);
      } else {
        exchange(nullptr, work, n, rank_ + 1, start, deadline);
      }
    }
    std::memcpy(buffer, work, count * sizeof(double));
  }

  // Sends send (unless NULL) to peer and receives recv (unless NULL) from it, by start + deadline.
  // Whatever fails, requests still pending are abandoned with wire_.
  void exchange(const double* send, double* recv, int n, int peer, double start, Deadline deadline) {
    MPI_Request requests[2] = {MPI_REQUEST_NULL, MPI_REQUEST_NULL};
    const auto checked = [&](int code, const char* what) {
      if (code != MPI_SUCCESS) {
        abandon(requests, 2, wire_);
        check_mpi(code, what);
      }
    };
    if (recv != nullptr) {
      checked(MPI_Irecv(recv, n, MPI_DOUBLE, peer, kTag, comm_, &requests[0]), "MPI_Irecv");
    }
    if (send != nullptr) {
      checked(MPI_Isend(send, n, MPI_DOUBLE, peer, kTag, comm_, &requests[1]), "MPI_Isend");
    }
    if (!poll_until(requests, 2, start + deadline.seconds, wire_)) {
      core::fail(SYNCBN_ERROR_TIMEOUT,
                 "allreduce of " + std::to_string(n) + " doubles over " + std::to_string(size_) +
                     " ranks did not complete within " + format_seconds(deadline.seconds) +
                     " (rank " + std::to_string(rank_) + " waited " +
                     format_seconds(now_seconds() - start) + ", last for rank " +
                     std::to_string(peer) + ")");
    }
  }

  static constexpr int kTag = 0x5B;  // the duplicate carries nothing else

  MPI_Comm comm_;
  int rank_ = 0;
  int size_ = 1;
  std::shared_ptr<std::vector<double>> wire_;  // grows to the largest count, never shrinks
};

}  // namespace

void check_mpi(int code, const char* what) {
  if (code != MPI_SUCCESS) {
    core::fail(SYNCBN_ERROR_COMM, std::string(what) + " failed: " + mpi_error_text(code));
  }
}

void mpi_wait(MPI_Request* request, Deadline deadline, const std::string& what,
              std::shared_ptr<void> keep_alive) {
  if (deadline.none()) {
    check_mpi(MPI_Wait(request, MPI_STATUS_IGNORE), "MPI_Wait");
    return;
  }
  const double start = now_seconds();
  if (!poll_until(request, 1, start + deadline.seconds, std::move(keep_alive))) {
    core::fail(SYNCBN_ERROR_TIMEOUT, what + " did not complete within " +
                                         format_seconds(deadline.seconds) + " (waited " +
                                         format_seconds(now_seconds() - start) + ")");
  }
}

void check_mpi_comm(MPI_Comm mpi_comm) {
  int initialized = 0;
  MPI_Initialized(&initialized);
  if (!initialized || mpi_finalized()) {
    core::fail(SYNCBN_ERROR_INVALID_ARGUMENT, "mpi_comm: MPI is not initialized (or finalized)");
  }
  if (mpi_comm == MPI_COMM_NULL) core::fail(SYNCBN_ERROR_INVALID_ARGUMENT, "mpi_comm is MPI_COMM_NULL");
}

std::shared_ptr<Communicator> make_mpi_communicator(MPI_Comm mpi_comm) {
  check_mpi_comm(mpi_comm);
  int rank = 0, size = 0;
  check_mpi(MPI_Comm_rank(mpi_comm, &rank), "MPI_Comm_rank");
  check_mpi(MPI_Comm_size(mpi_comm, &size), "MPI_Comm_size");
  // MPI writes the new communicator when the duplication completes: on the heap, kept after a
  // timeout.
  auto dup = std::make_shared<MPI_Comm>(MPI_COMM_NULL);
  MPI_Request request = MPI_REQUEST_NULL;
  const Deadline deadline{default_timeout_seconds()};
  check_mpi(MPI_Comm_idup(mpi_comm, dup.get(), &request), "MPI_Comm_idup");
  mpi_wait(&request, deadline,
           "MPI_Comm_idup over " + std::to_string(size) + " ranks (rank " + std::to_string(rank) +
               ")",
           dup);
  auto comm = std::make_shared<MpiCommunicator>(*dup);
  // Every rank must sum a CUDA plan's device buffer the same way (a device pointer to
  // MPI_Iallreduce, or pinned memory to the host allreduce): CUDA-awareness is a property of each
  // process (its MPI library, SYNCBN_MPI_CUDA_AWARE), and ranks that differ would never meet in
  // one collective. [aware, -aware] summed by MPI_MIN gives [min, -max].
  auto aware = std::make_shared<std::array<int, 4>>();
  (*aware)[0] = cuda_aware() ? 1 : 0;
  (*aware)[1] = -(*aware)[0];
  check_mpi(MPI_Iallreduce(aware->data(), aware->data() + 2, 2, MPI_INT, MPI_MIN, *dup, &request),
            "MPI_Iallreduce");
  mpi_wait(&request, deadline,
           "syncbn_comm_create_mpi: MPI_Iallreduce over " + std::to_string(size) +
               " ranks (rank " + std::to_string(rank) + ")",
           aware);
  if ((*aware)[2] != -(*aware)[3]) {
    core::fail(SYNCBN_ERROR_INVALID_ARGUMENT,
               std::string("mpi_comm: some ranks' MPI is CUDA-aware and some not (rank ") +
                   std::to_string(rank) + ": " + ((*aware)[0] ? "CUDA-aware" : "not CUDA-aware") +
                   "); set SYNCBN_MPI_CUDA_AWARE=0 (or 1) alike on every rank");
  }
  return comm;
}

}  // namespace syncbn::comm
