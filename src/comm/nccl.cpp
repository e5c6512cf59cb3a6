#include "comm/nccl.hpp"

#include <cuda_runtime.h>

#include <string>

#include "core/error.hpp"
#ifdef SYNCBN_HAVE_MPI
#include <mpi.h>
#endif

namespace syncbn::comm {
namespace {

// A non-blocking communicator may answer ncclInProgress: wait (on the host, for NCCL's own
// enqueueing, not for the GPU) until the call settles, as NCCL requires before the next call.
void check_nccl(ncclResult_t r, ncclComm_t comm, const char* what) {
  while (r == ncclInProgress && comm != nullptr) {
    if (ncclCommGetAsyncError(comm, &r) != ncclSuccess) break;
  }
  if (r == ncclSuccess) return;
  std::string detail = ncclGetErrorString(r);
  if (comm != nullptr) {
    const char* last = ncclGetLastError(comm);
    if (last != nullptr && *last != '\0') detail += std::string(" (") + last + ")";
  }
  core::fail(SYNCBN_ERROR_COMM, std::string(what) + " failed: " + detail);
}

void check_cuda(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    cudaGetLastError();
    core::fail(SYNCBN_ERROR_INTERNAL, std::string(what) + " failed: " + cudaGetErrorString(e));
  }
}

class NcclCommunicator final : public Communicator {
 public:
  NcclCommunicator(ncclComm_t comm, bool owned) : comm_(comm), owned_(owned) {
    check_nccl(ncclCommUserRank(comm_, &rank_), comm_, "ncclCommUserRank");
    check_nccl(ncclCommCount(comm_, &size_), comm_, "ncclCommCount");
    check_nccl(ncclCommCuDevice(comm_, &device_), comm_, "ncclCommCuDevice");
  }
  ~NcclCommunicator() override {
    int current = -1;
    cudaGetDevice(&current);
    cudaSetDevice(device_);
    if (scratch_ != nullptr) cudaFree(scratch_);
    if (stream_ != nullptr) cudaStreamDestroy(stream_);
    if (owned_) ncclCommDestroy(comm_);
    if (current >= 0) cudaSetDevice(current);
  }
  NcclCommunicator(const NcclCommunicator&) = delete;
  NcclCommunicator& operator=(const NcclCommunicator&) = delete;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  DeviceBuffers device_buffers() const override { return DeviceBuffers::on_stream; }
  int device() const override { return device_; }

  // Host buffers (plan creation, split): through device scratch on an internal stream.
  void allreduce_sum(double* buffer, std::size_t count) override {
    int current = -1;
    check_cuda(cudaGetDevice(&current), "cudaGetDevice");
    check_cuda(cudaSetDevice(device_), "cudaSetDevice");
    struct Restore {
      int device;
      ~Restore() { cudaSetDevice(device); }
    } restore{current};
    if (stream_ == nullptr) {
      check_cuda(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate");
    }
    if (count > scratch_count_) {
      if (scratch_ != nullptr) cudaFree(scratch_);
      scratch_ = nullptr;
      scratch_count_ = 0;
      check_cuda(cudaMalloc(&scratch_, count * sizeof(double)), "cudaMalloc");
      scratch_count_ = count;
    }
    const std::size_t bytes = count * sizeof(double);
    check_cuda(cudaMemcpyAsync(scratch_, buffer, bytes, cudaMemcpyHostToDevice, stream_),
               "cudaMemcpyAsync");
    allreduce_sum_device(scratch_, count, stream_);
    check_cuda(cudaMemcpyAsync(buffer, scratch_, bytes, cudaMemcpyDeviceToHost, stream_),
               "cudaMemcpyAsync");
    check_cuda(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
  }

  void allreduce_sum_device(double* buffer, std::size_t count, void* stream) override {
    check_nccl(ncclAllReduce(buffer, buffer, count, ncclDouble, ncclSum, comm_,
                             static_cast<cudaStream_t>(stream)),
               comm_, "ncclAllReduce");
  }

  std::shared_ptr<Communicator> split_consecutive(int group_size) override {
    ncclComm_t sub = nullptr;
    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    config.blocking = 1;  // the subgroup is the library's: blocking, whatever the parent is
    check_nccl(ncclCommSplit(comm_, rank_ / group_size, rank_, &sub, &config), comm_,
               "ncclCommSplit");
    return std::make_shared<NcclCommunicator>(sub, true);
  }

 private:
  ncclComm_t comm_;
  bool owned_;
  int rank_ = 0;
  int size_ = 1;
  int device_ = 0;
  cudaStream_t stream_ = nullptr;
  double* scratch_ = nullptr;
  std::size_t scratch_count_ = 0;
};

}  // namespace

std::shared_ptr<Communicator> make_nccl_communicator(ncclComm_t nccl_comm) {
  if (nccl_comm == nullptr) core::fail(SYNCBN_ERROR_INVALID_ARGUMENT, "nccl_comm is null");
  return std::make_shared<NcclCommunicator>(nccl_comm, false);
}

}  // namespace syncbn::comm
