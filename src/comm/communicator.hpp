// src/comm: the communicator interface and its backends (single process, MPI, NCCL, custom). A
// backend knows how to sum a small fp64 buffer over its group by a deadline and how to split the
// group; it knows nothing of batch norm, guards or plans (src/core owns those).
#ifndef SYNCBN_COMM_COMMUNICATOR_HPP
#define SYNCBN_COMM_COMMUNICATOR_HPP

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

namespace syncbn::comm {

// How a backend sums a buffer that lives in device (CUDA) memory (allreduce_sum of a DeviceSum
// carries it out).
enum class DeviceBuffers {
  identity,   // a group of one: nothing to do
  stage,      // host memory only: through the DeviceSum's pinned mirror, one stream sync
  after_sync, // device memory, once the stream's work is done (CUDA-aware MPI)
  on_stream,  // device memory, enqueued on the stream, no host synchronization (NCCL, custom)
};

class HostMirror;  // comm/device_sum.hpp (CUDA builds)

// A buffer of count doubles in CUDA device memory, to be summed over the group.
struct DeviceSum {
  double* buffer = nullptr;  // device memory of the communicator's device (or the caller's)
  std::size_t count = 0;
  void* stream = nullptr;    // the cudaStream_t whose work writes buffer (NULL: legacy stream)
  HostMirror* mirror = nullptr;  // pinned memory of count doubles, for the host-side exchanges
  // Empty when buffer holds this rank's contribution; else why it does not (its writer could
  // not be launched): this rank then takes part with substitute's contribution.
  std::string unwritten;
  // Writes this rank's contribution into host (count doubles of pinned memory) when the device
  // buffer cannot be read, with the reason. Called at most once, before the sum.
  void (*substitute)(void* context, double* host, const std::string& why) = nullptr;
  void* context = nullptr;
  // What the host reads of the sum when it is on the device and the host's copy is made only
  // for it (CUDA-aware MPI): the first host_reads values and the last one (0: all).
  std::size_t host_reads = 0;
};

// Where the group's sum is when allreduce_sum(DeviceSum&) returns.
enum class SumAt {
  own,     // a group of one: the buffer is the sum, this rank's own contribution
  host,    // in the mirror (and, staged, copied back into the device buffer in stream order)
  device,  // in the device buffer only, once the stream's work is done
};

// The deadline of a collective: seconds from its start, 0 for none (wait forever).
struct Deadline {
  double seconds = 0.0;
  bool none() const { return seconds <= 0.0; }
};

// The deadline a new top-level communicator gets: SYNCBN_TIMEOUT_S from the environment if it is
// a number >= 0, else kDefaultTimeoutSeconds (PyTorch's NCCL default).
constexpr double kDefaultTimeoutSeconds = 600.0;
double default_timeout_seconds();

// Seconds on a monotonic clock, for deadlines.
double now_seconds();

// Keeps memory alive for the rest of the process: what a transport may still write after a
// collective was abandoned (a late peer can complete it), reachable so that leak checkers do
// not report it.
void keep_forever(std::shared_ptr<void> memory);

// A communicator's collectives go through these public, non-virtual entry points, which
//   - fail at once with SYNCBN_ERROR_COMM_BROKEN once the communicator is broken;
//   - hand the backend the communicator's deadline;
//   - mark the communicator broken when a collective failed (SYNCBN_ERROR_TIMEOUT: the collective
//     was abandoned and can never complete; SYNCBN_ERROR_COMM: the transport failed, and the
//     ranks may no longer be in step).
// Backends implement the protected virtuals.
class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;

  // COLLECTIVE. In-place sum of count doubles in host memory over the group, the same result on
  // every rank, by the deadline. Throws core::Failure: SYNCBN_ERROR_TIMEOUT (the message says
  // what was waited for and how long), SYNCBN_ERROR_COMM (the transport failed),
  // SYNCBN_ERROR_COMM_BROKEN (an earlier collective failed).
  void allreduce_sum(double* buffer, std::size_t count);

  // The CUDA device the backend's collectives run on (NCCL), or -1 (host backends).
  virtual int device() const { return -1; }

  // How allreduce_sum of a DeviceSum sums (see DeviceBuffers).
  virtual DeviceBuffers device_buffers() const { return DeviceBuffers::stage; }

  // COLLECTIVE. The sum of a buffer in device memory over the group, the one entry point for
  // device memory (defined in comm/device_sum.cpp, CUDA builds): identity does nothing (own);
  // stage copies it into the mirror on the stream, synchronizes, sums on the host and copies
  // the sum back on the stream (host); after_sync synchronizes the stream and hands MPI the
  // device pointer, then copies the sum into the mirror (host); on_stream enqueues the sum on
  // the stream (device). A rank whose buffer is unwritten, or whose stream synchronization
  // fails, still joins the same collective, with sum.substitute's contribution from the mirror.
  // Throws as allreduce_sum; SYNCBN_ERROR_INTERNAL if a CUDA copy fails after the sum.
  SumAt allreduce_sum(DeviceSum& sum);

  // Makes room for host allreduces of count doubles (NCCL stages them through device memory of
  // a size fixed here, so that no collective allocates). Local; throws
  // Failure(SYNCBN_ERROR_OUT_OF_MEMORY).
  virtual void reserve_host(std::size_t count) { (void)count; }

  // Waits on the host until stream's work is done, by the deadline when the backend's collectives
  // run on the stream (NCCL: polling the stream and the communicator's asynchronous error, and
  // aborting the communicator on expiry). Throws as allreduce_sum; SYNCBN_ERROR_INTERNAL if the
  // CUDA runtime fails.
  void wait_stream(void* stream);

  // COLLECTIVE. This rank's group among consecutive groups of group_size ranks, with this
  // communicator's deadline. The caller has checked that group_size >= 1 divides size() and
  // agrees across ranks. Throws as allreduce_sum.
  std::shared_ptr<Communicator> split_consecutive(int group_size);

  // Ends the job where the backend can (MPI_Abort: does not return); otherwise (NCCL:
  // ncclCommAbort, self, custom) marks the communicator broken and returns.
  void abort();

  // The deadline of every collective, in seconds (0: none).
  double timeout_seconds() const { return timeout_.seconds; }
  void set_timeout_seconds(double seconds) { timeout_.seconds = seconds; }

  // Whether an earlier collective failed; why.
  bool broken() const { return !broken_.empty(); }
  const std::string& broken_reason() const { return broken_; }
  // Throws Failure(SYNCBN_ERROR_COMM_BROKEN) if broken.
  void check_usable() const;

  // The serial number of the next plan made on this communicator. Plan creation is collective,
  // so every rank of the group hands out the same serials in the same order.
  std::uint32_t next_plan_serial() { return plan_serial_++; }

 protected:
  // The backend's collectives; they throw core::Failure (SYNCBN_ERROR_TIMEOUT when deadline
  // expires first, SYNCBN_ERROR_COMM if the transport fails).
  virtual void allreduce_host(double* buffer, std::size_t count, Deadline deadline) = 0;
  virtual void allreduce_device(double* buffer, std::size_t count, void* stream,
                                Deadline deadline);
  virtual void wait_device_stream(void* stream, Deadline deadline);
  virtual std::shared_ptr<Communicator> split(int group_size, Deadline deadline) = 0;
  // What abort() does beyond marking the communicator broken.
  virtual void abort_backend() {}

 private:
  template <class F> void collective(F&& body, bool comm_failure_breaks = true);
  // allreduce_device through the collective's checks.
  void sum_device_memory(double* buffer, std::size_t count, void* stream);

  Deadline timeout_{default_timeout_seconds()};
  std::string broken_;
  std::uint32_t plan_serial_ = 0;
};

// A group of one process: rank 0, size 1, allreduce is the identity.
std::shared_ptr<Communicator> make_self_communicator();

// "3 s", "0.25 s", "600 s".
std::string format_seconds(double seconds);

}  // namespace syncbn::comm

#endif  // SYNCBN_COMM_COMMUNICATOR_HPP
