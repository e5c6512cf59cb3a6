// src/comm: the communicator interface and its backends (single process, MPI, NCCL). A backend knows
// how to sum a small fp64 buffer over its group and how to split the group; it knows nothing of
// batch norm, guards or plans (src/core owns those).
#ifndef SYNCBN_COMM_COMMUNICATOR_HPP
#define SYNCBN_COMM_COMMUNICATOR_HPP

#include <cstddef>
#include <cstdint>
#include <memory>

namespace syncbn::comm {

// How a backend sums a buffer that lives in device (CUDA) memory.
enum class DeviceBuffers {
  identity,   // a group of one: nothing to do
  stage,      // host memory only: the caller copies through pinned memory and synchronizes
  after_sync, // device memory, once the stream's work is done (CUDA-aware MPI)
  on_stream,  // device memory, enqueued on the stream, no host synchronization (NCCL)
};

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;

  // COLLECTIVE, blocking. In-place sum of count doubles in host memory over the group, the same
  // result on every rank. Throws core::Failure (SYNCBN_ERROR_COMM) if the transport fails.
  virtual void allreduce_sum(double* buffer, std::size_t count) = 0;

  // The CUDA device the backend's collectives run on (NCCL), or -1 (host backends).
  virtual int device() const { return -1; }

  // How allreduce_sum_device may be used (see DeviceBuffers).
  virtual DeviceBuffers device_buffers() const { return DeviceBuffers::stage; }

  // COLLECTIVE. In-place sum of count doubles in device memory: for after_sync once stream's
  // work is complete, for on_stream enqueued on stream (a cudaStream_t). Throws core::Failure.
  virtual void allreduce_sum_device(double* buffer, std::size_t count, void* stream);

  // COLLECTIVE. This rank's group among consecutive groups of group_size ranks. The caller has
  // checked that group_size >= 1 divides size() and agrees across ranks.
  virtual std::shared_ptr<Communicator> split_consecutive(int group_size) = 0;

  // The serial number of the next plan made on this communicator. Plan creation is collective,
  // so every rank of the group hands out the same serials in the same order.
  std::uint32_t next_plan_serial() { return plan_serial_++; }

 private:
  std::uint32_t plan_serial_ = 0;
};

// A group of one process: rank 0, size 1, allreduce is the identity.
std::shared_ptr<Communicator> make_self_communicator();

}  // namespace syncbn::comm

#endif  // SYNCBN_COMM_COMMUNICATOR_HPP
