// The sum of a device buffer over a communicator (Communicator::allreduce_sum of a DeviceSum),
// carried out here for every backend by its DeviceBuffers mode, and the pinned mirror it uses.
// A plan's backend only asks where the sum is (SumAt): on the host now, or on the device.
#include "comm/device_sum.hpp"

#include <cuda_runtime.h>

#include <string>

#include "core/error.hpp"
#include "cuda/runtime.hpp"

namespace syncbn::comm {

using cuda::check_cuda;

HostMirror::HostMirror(std::size_t count) : count_(count) {
  const auto oom = [&](cudaError_t e, const char* what) {
    cudaGetLastError();
    if (host_ != nullptr) cudaFreeHost(host_);
    host_ = nullptr;
    core::fail(SYNCBN_ERROR_OUT_OF_MEMORY,
               std::string(what) + " (" + std::to_string(count * sizeof(double)) +
                   " bytes of pinned memory) failed: " + cudaGetErrorString(e));
  };
  if (cudaError_t e = cudaMallocHost(&host_, count * sizeof(double)); e != cudaSuccess) {
    oom(e, "cudaMallocHost");
  }
  cudaEvent_t event = nullptr;
  if (cudaError_t e = cudaEventCreateWithFlags(&event, cudaEventDisableTiming); e != cudaSuccess) {
    oom(e, "cudaEventCreate");
  }
  copied_out_ = event;
}

HostMirror::~HostMirror() {
  if (copied_out_ != nullptr) cudaEventDestroy(static_cast<cudaEvent_t>(copied_out_));
  if (host_ != nullptr) cudaFreeHost(host_);
}

double* HostMirror::for_host_writes() {
  cudaEventSynchronize(static_cast<cudaEvent_t>(copied_out_));  // an error here is sticky: seen later
  return host_;
}

void HostMirror::copy_from_device(const double* device, void* stream) {
  const auto s = static_cast<cudaStream_t>(stream);
  check_cuda(cudaStreamWaitEvent(s, static_cast<cudaEvent_t>(copied_out_), 0),
             "cudaStreamWaitEvent");
  check_cuda(cudaMemcpyAsync(host_, device, count_ * sizeof(double), cudaMemcpyDeviceToHost, s),
             "cudaMemcpyAsync (device buffer to host)");
  check_cuda(cudaStreamSynchronize(s), "cudaStreamSynchronize");
}

void HostMirror::copy_to_device(double* device, void* stream) {
  const auto s = static_cast<cudaStream_t>(stream);
  check_cuda(cudaMemcpyAsync(device, host_, count_ * sizeof(double), cudaMemcpyHostToDevice, s),
             "cudaMemcpyAsync (host to device buffer)");
  check_cuda(cudaEventRecord(static_cast<cudaEvent_t>(copied_out_), s), "cudaEventRecord");
}

namespace {

// The mirror holding this rank's substitute contribution.
double* substitute_into(DeviceSum& sum, const std::string& why) {
  double* host = sum.mirror->for_host_writes();
  sum.substitute(sum.context, host, why);
  return host;
}

}  // namespace

SumAt Communicator::allreduce_sum(DeviceSum& sum) {
  switch (device_buffers()) {
    case DeviceBuffers::identity:
      return SumAt::own;

    case DeviceBuffers::on_stream:
      // An unwritten buffer holds the previous call's contribution, whose guards make every
      // rank's verdict on the device fail (core/guard.hpp: the call sequence).
      sum_device_memory(sum.buffer, sum.count, sum.stream);
      return SumAt::device;

    case DeviceBuffers::stage: {
      std::string why = sum.unwritten;
      if (why.empty()) {
        try {
          sum.mirror->copy_from_device(sum.buffer, sum.stream);
        } catch (const core::Failure& f) {  // join the sum anyway, carrying the failure
          why = f.what();
        }
      }
      if (!why.empty()) substitute_into(sum, why);
      allreduce_sum(sum.mirror->for_host_writes(), sum.count);
      sum.mirror->copy_to_device(sum.buffer, sum.stream);
      return SumAt::host;
    }

    case DeviceBuffers::after_sync: {
      std::string why = sum.unwritten;
      if (why.empty()) {
        const cudaError_t synced = cudaStreamSynchronize(static_cast<cudaStream_t>(sum.stream));
        if (synced != cudaSuccess) {
          cudaGetLastError();
          why = std::string("cudaStreamSynchronize failed: ") + cudaGetErrorString(synced);
        }
      }
      if (!why.empty()) {
        // The device buffer cannot be trusted: the same collective as every peer's (MPI matches
        // it by count, not by memory), from the pinned mirror, carrying the failure.
        sum_device_memory(substitute_into(sum, why), sum.count, nullptr);
        return SumAt::host;
      }
      sum_device_memory(sum.buffer, sum.count, sum.stream);
      sum.mirror->copy_from_device(sum.buffer, sum.stream);
      return SumAt::host;
    }
  }
  core::fail(SYNCBN_ERROR_INTERNAL, "unknown device buffer mode");
}

}  // namespace syncbn::comm
