// src/comm's pinned-memory mirror of a device buffer, which the host-side exchanges of device
// memory (staged MPI, the host's view of CUDA-aware MPI's sum) read and write
// (Communicator::allreduce_sum of a DeviceSum, comm/device_sum.cpp). CUDA builds only.
#ifndef SYNCBN_COMM_DEVICE_SUM_HPP
#define SYNCBN_COMM_DEVICE_SUM_HPP

#include <cstddef>

#include "comm/communicator.hpp"

namespace syncbn::comm {

// count doubles of pinned host memory and an event recorded after the last copy out of them,
// which host writes wait for: a copy back to the device that an earlier call queued on any
// stream is never overwritten before it ran. Owned by whoever owns the device buffer (a plan's
// backend), one per buffer, made with the current device's context.
class HostMirror {
 public:
  // Throws Failure(SYNCBN_ERROR_OUT_OF_MEMORY) when the pinned memory or the event cannot be had.
  explicit HostMirror(std::size_t count);
  ~HostMirror();
  HostMirror(const HostMirror&) = delete;
  HostMirror& operator=(const HostMirror&) = delete;

  std::size_t count() const { return count_; }
  // The host's view, for reading after a copy from the device has been waited for.
  const double* data() const { return host_; }

  // The memory for host writes, once the last copy out of it is done.
  double* for_host_writes();
  // Enqueues device -> mirror on stream, after the last copy out of the mirror, and waits for
  // the stream: all of it, or (head > 0) the first head values and the last one. Throws
  // Failure(SYNCBN_ERROR_INTERNAL) when CUDA fails.
  void copy_from_device(const double* device, void* stream, std::size_t head = 0);
  // Enqueues mirror -> device on stream and records the event after it. Throws as above.
  void copy_to_device(double* device, void* stream);

 private:
  std::size_t count_;
  double* host_ = nullptr;  // pinned
  void* copied_out_ = nullptr;  // cudaEvent_t, recorded after the last copy out of host_
};

}  // namespace syncbn::comm

#endif  // SYNCBN_COMM_DEVICE_SUM_HPP
