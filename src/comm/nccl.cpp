#include "comm/nccl.hpp"

#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>
#include <string>

#include "core/error.hpp"
#include "cuda/runtime.hpp"
#ifdef SYNCBN_HAVE_MPI
#include <mpi.h>
#endif

namespace syncbn::comm {
namespace {

std::string nccl_detail(ncclResult_t r, ncclComm_t comm) {
  std::string detail = ncclGetErrorString(r);
  if (comm != nullptr) {
    const char* last = ncclGetLastError(comm);
    if (last != nullptr && *last != '\0') detail += std::string(" (") + last + ")";
  }
  return detail;
}

// A non-blocking communicator may answer ncclInProgress: poll ncclCommGetAsyncError (on the
// host, for NCCL's own enqueueing or connection setup, not for the GPU) until the call settles,
// as NCCL requires before the next call, or until the deadline, when the communicator is
// aborted (*aborted set) and Failure(SYNCBN_ERROR_TIMEOUT) thrown.
void settle_nccl(ncclResult_t r, ncclComm_t comm, const char* what, Deadline deadline,
                 bool* aborted) {
  const double start = now_seconds();
  while (r == ncclInProgress && comm != nullptr) {
    if (ncclCommGetAsyncError(comm, &r) != ncclSuccess) break;
    if (r == ncclInProgress && !deadline.none() && now_seconds() - start >= deadline.seconds) {
      ncclCommAbort(comm);
      if (aborted != nullptr) *aborted = true;
      core::fail(SYNCBN_ERROR_TIMEOUT, std::string(what) + " did not complete within " +
                                           format_seconds(deadline.seconds) +
                                           "; the NCCL communicator was aborted (ncclCommAbort)");
    }
  }
  if (r == ncclSuccess) return;
  core::fail(SYNCBN_ERROR_COMM, std::string(what) + " failed: " + nccl_detail(r, comm));
}

// What is left of deadline, started at start (at least a millisecond: the wait still polls once).
Deadline remaining(Deadline deadline, double start) {
  if (deadline.none()) return deadline;
  return Deadline{std::max(deadline.seconds - (now_seconds() - start), 1e-3)};
}

using cuda::check_cuda;

// Host buffers a plan creation or a split sums (core/plan.cpp: 5 + 9 * 8 slots) fit in this;
// CPU plans reserve room for their packed buffers at creation (reserve_host).
constexpr std::size_t kHostSlots = 128;

class NcclCommunicator final : public Communicator {
 public:
  // Local (no collective): the stream and memory of host allreduces are made here, so that a
  // rank that cannot get them fails before any collective, not inside one its peers wait in.
  NcclCommunicator(ncclComm_t comm, bool owned) : comm_(comm), owned_(owned) {
    settle_nccl(ncclCommUserRank(comm_, &rank_), comm_, "ncclCommUserRank", {}, nullptr);
    settle_nccl(ncclCommCount(comm_, &size_), comm_, "ncclCommCount", {}, nullptr);
    settle_nccl(ncclCommCuDevice(comm_, &device_), comm_, "ncclCommCuDevice", {}, nullptr);
    try {
      cuda::DeviceSwitch on(device_);
      check_cuda(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate");
      reserve_host(kHostSlots);
    } catch (...) {
      release();
      throw;
    }
  }
  ~NcclCommunicator() override {
    release();
    if (owned_ && !aborted_) ncclCommDestroy(comm_);
  }
  NcclCommunicator(const NcclCommunicator&) = delete;
  NcclCommunicator& operator=(const NcclCommunicator&) = delete;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  DeviceBuffers device_buffers() const override { return DeviceBuffers::on_stream; }
  int device() const override { return device_; }

  // Local: new scratch and pinned memory of count doubles when the present ones are smaller
  // (host allreduces are waited for, so none is in flight).
  void reserve_host(std::size_t count) override {
    if (count <= capacity_) return;
    cuda::DeviceSwitch on(device_);
    double* scratch = nullptr;
    double* pinned = nullptr;
    const std::size_t bytes = count * sizeof(double);
    cudaError_t e = cudaMalloc(&scratch, bytes);
    if (e == cudaSuccess) e = cudaMallocHost(&pinned, bytes);
    if (e != cudaSuccess) {
      cudaGetLastError();
      if (scratch != nullptr) cudaFree(scratch);
      core::fail(SYNCBN_ERROR_OUT_OF_MEMORY, "NCCL host allreduce buffers of " +
                                                 std::to_string(bytes) +
                                                 " bytes: " + cudaGetErrorString(e));
    }
    if (scratch_ != nullptr) cudaFree(scratch_);
    if (pinned_ != nullptr) cudaFreeHost(pinned_);
    scratch_ = scratch;
    pinned_ = pinned;
    capacity_ = count;
  }

 protected:
  // Host buffers (plan creation, split): through pinned host memory and device scratch on an
  // internal stream, waited for against the deadline (a copy into pageable memory would block
  // the host until the allreduce completed, deadline or not).
  void allreduce_host(double* buffer, std::size_t count, Deadline deadline) override {
    const double start = now_seconds();
    if (count > capacity_) {
      core::fail(SYNCBN_ERROR_INTERNAL, "NCCL host allreduce of " + std::to_string(count) +
                                            " doubles, more than the " +
                                            std::to_string(capacity_) + " reserved");
    }
    cuda::DeviceSwitch on(device_);
    const std::size_t bytes = count * sizeof(double);
    std::memcpy(pinned_, buffer, bytes);
    check_cuda(cudaMemcpyAsync(scratch_, pinned_, bytes, cudaMemcpyHostToDevice, stream_),
               "cudaMemcpyAsync");
    allreduce_device(scratch_, count, stream_, deadline);
    check_cuda(cudaMemcpyAsync(pinned_, scratch_, bytes, cudaMemcpyDeviceToHost, stream_),
               "cudaMemcpyAsync");
    wait_device_stream(stream_, remaining(deadline, start));
    std::memcpy(buffer, pinned_, bytes);
  }

  void allreduce_device(double* buffer, std::size_t count, void* stream,
                        Deadline deadline) override {
    settle_nccl(ncclAllReduce(buffer, buffer, count, ncclDouble, ncclSum, comm_,
                              static_cast<cudaStream_t>(stream)),
                comm_, "ncclAllReduce", deadline, &aborted_);
  }

  // Polls the stream and the communicator's asynchronous error; on expiry aborts the
  // communicator, which ends its kernels still waiting for peers, so the stream drains.
  void wait_device_stream(void* stream, Deadline deadline) override {
    const auto s = static_cast<cudaStream_t>(stream);
    const double start = now_seconds();
    for (;;) {
      const cudaError_t q = cudaStreamQuery(s);
      if (q == cudaSuccess) return;
      if (q != cudaErrorNotReady) check_cuda(q, "cudaStreamQuery");
      ncclResult_t async = ncclSuccess;
      if (ncclCommGetAsyncError(comm_, &async) == ncclSuccess && async != ncclSuccess &&
          async != ncclInProgress) {
        ncclCommAbort(comm_);
        aborted_ = true;
        core::fail(SYNCBN_ERROR_COMM, "NCCL reported an asynchronous error: " +
                                          nccl_detail(async, nullptr) +
                                          "; the NCCL communicator was aborted (ncclCommAbort)");
      }
      const double waited = now_seconds() - start;
      if (!deadline.none() && waited >= deadline.seconds) {
        ncclCommAbort(comm_);
        aborted_ = true;
        core::fail(SYNCBN_ERROR_TIMEOUT,
                   "the stream's NCCL collectives over " + std::to_string(size_) + " ranks (rank " +
                       std::to_string(rank_) + ") did not complete within " +
                       format_seconds(deadline.seconds) +
                       "; the NCCL communicator was aborted (ncclCommAbort)");
      }
    }
  }

  // The subgroup is the library's: non-blocking, settled against the deadline.
  std::shared_ptr<Communicator> split(int group_size, Deadline deadline) override {
    ncclComm_t sub = nullptr;
    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    config.blocking = 0;
    const double start = now_seconds();
    const ncclResult_t r = ncclCommSplit(comm_, rank_ / group_size, rank_, &sub, &config);
    settle_nccl(r, comm_, "ncclCommSplit", deadline, &aborted_);
    if (sub != nullptr) {
      try {
        settle_nccl(ncclInProgress, sub, "ncclCommSplit (new communicator)",
                    remaining(deadline, start), nullptr);  // aborts sub on expiry
      } catch (const core::Failure& f) {
        if (f.status() != SYNCBN_ERROR_TIMEOUT) ncclCommAbort(sub);
        throw;
      }
    }
    return std::make_shared<NcclCommunicator>(sub, true);
  }

  void abort_backend() override {
    if (!aborted_) ncclCommAbort(comm_);
    aborted_ = true;
  }

 private:
  ncclComm_t comm_;
  bool owned_;
  bool aborted_ = false;  // ncclCommAbort freed comm_
  int rank_ = 0;
  int size_ = 1;
  int device_ = 0;
  cudaStream_t stream_ = nullptr;  // host allreduces: stream, device scratch, pinned copy
  double* scratch_ = nullptr;
  double* pinned_ = nullptr;
  std::size_t capacity_ = 0;  // doubles in scratch_ and pinned_

  void release() {
    cuda::DeviceSwitch on(device_);
    if (scratch_ != nullptr) cudaFree(scratch_);
    if (pinned_ != nullptr) cudaFreeHost(pinned_);
    if (stream_ != nullptr) cudaStreamDestroy(stream_);
    scratch_ = nullptr;
    pinned_ = nullptr;
    stream_ = nullptr;
    capacity_ = 0;
  }
};

}  // namespace

std::shared_ptr<Communicator> make_nccl_communicator(ncclComm_t nccl_comm) {
  if (nccl_comm == nullptr) core::fail(SYNCBN_ERROR_INVALID_ARGUMENT, "nccl_comm is null");
  return std::make_shared<NcclCommunicator>(nccl_comm, false);
}

}  // namespace syncbn::comm
