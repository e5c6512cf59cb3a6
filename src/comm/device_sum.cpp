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
  // A failure here leaves nothing to wait for; cleared, so that no later launch reports it.
  if (cudaEventSynchronize(static_cast<cudaEvent_t>(copied_out_)) != cudaSuccess) {
    cudaGetLastError();
  }
  return host_;
}

void HostMirror::copy_from_device(const double* device, void* stream, std::size_t head) {
  const auto s = static_cast<cudaStream_t>(stream);
  check_cuda(cudaStreamWaitEvent(s, static_cast<cudaEvent_t>(copied_out_), 0),
             "cudaStreamWaitEvent");
  if (head == 0 || head + 1 >= count_) {
    check_cuda(cudaMemcpyAsync(host_, device, count_ * sizeof(double), cudaMemcpyDeviceToHost, s),
               "cudaMemcpyAsync (device buffer to host)");
  } else {  // the first head slots and the last one
    check_cuda(cudaMemcpyAsync(host_, device, head * sizeof(double), cudaMemcpyDeviceToHost, s),
               "cudaMemcpyAsync (device buffer to host)");
    check_cuda(cudaMemcpyAsync(host_ + count_ - 1, device + count_ - 1, sizeof(double),
                               cudaMemcpyDeviceToHost, s),
               "cudaMemcpyAsync (device buffer to host)");
  }
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
      // An unwritten buffer holds the previous call's group sum (or zeros), whose participation
      // count makes every rank's verdict on the device fail (core/guard.hpp).
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
      // A rank whose device part failed has its verdict on the host already (it fails): no copy
      // back, which could fail on its own and give this rank another message than its peers.
      if (why.empty()) sum.mirror->copy_to_device(sum.buffer, sum.stream);
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
      sum.mirror->copy_from_device(sum.buffer, sum.stream, sum.host_reads);
      return SumAt::host;
    }
  }
  core::fail(SYNCBN_ERROR_INTERNAL, "unknown device buffer mode");
}

}  // namespace syncbn::comm
