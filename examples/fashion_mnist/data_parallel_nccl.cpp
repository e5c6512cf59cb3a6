#include "data_parallel_nccl.hpp"

#include <cuda_runtime_api.h>

#include <stdexcept>
#include <string>

#include "cuda_device.hpp"
#include "data_parallel.hpp"
#include "syncbn/syncbn.hpp"
#include "syncbn/syncbn_nccl_mpi.h"

namespace syncbn_examples {
namespace {

void check_nccl(ncclResult_t rc, const std::string& call, ncclComm_t comm) {
  // syncbn_nccl_comm_init_mpi makes a non-blocking communicator: a call may answer
  // ncclInProgress until NCCL has settled it on the host.
  while (rc == ncclInProgress && comm != nullptr) {
    if (ncclCommGetAsyncError(comm, &rc) != ncclSuccess) break;
  }
  if (rc == ncclSuccess) return;
  std::string message = call + " failed: " + ncclGetErrorString(rc);
#if defined(NCCL_VERSION_CODE) && NCCL_VERSION_CODE >= NCCL_VERSION(2, 13, 0)
  const char* detail = ncclGetLastError(comm);
  if (detail != nullptr && *detail != '\0') message += std::string(" (") + detail + ")";
#else
  (void)comm;
#endif
  throw std::runtime_error(message);
}

ncclDataType_t nccl_type(const torch::Tensor& t) {
  switch (t.scalar_type()) {
    case torch::kFloat32: return ncclFloat32;
    case torch::kFloat64: return ncclFloat64;
    case torch::kFloat16: return ncclFloat16;
#if defined(NCCL_VERSION_CODE) && NCCL_VERSION_CODE >= NCCL_VERSION(2, 10, 0)
    case torch::kBFloat16: return ncclBfloat16;
#endif
    default:
      throw std::invalid_argument(std::string("no NCCL datatype for tensors of ") +
                                  c10::toString(t.scalar_type()));
  }
}

}  // namespace

NcclCommunicator::NcclCommunicator(MPI_Comm comm) {
  syncbn::check(syncbn_nccl_comm_init_mpi(comm, &comm_, &local_rank_));
  // From here on the communicator is ours: the destructor does not run if the constructor
  // throws, so release it on the way out.
  try {
    check_nccl(ncclCommUserRank(comm_, &rank_), "ncclCommUserRank", comm_);
    check_nccl(ncclCommCount(comm_, &size_), "ncclCommCount", comm_);
    int nccl_device = 0;
    check_nccl(ncclCommCuDevice(comm_, &nccl_device), "ncclCommCuDevice", comm_);
    device_ = cuda_current_device();
    if (device_ != nccl_device) {
      throw std::logic_error("the NCCL communicator is on device " + std::to_string(nccl_device) +
                             " but device " + std::to_string(device_) + " is current");
    }
  } catch (...) {
    ncclCommDestroy(comm_);
    throw;
  }
}

NcclCommunicator::~NcclCommunicator() {
  if (comm_ != nullptr) ncclCommDestroy(comm_);  // nothing to do about a failure here
}

void NcclCommunicator::check_async_error() const {
  ncclResult_t async = ncclSuccess;
  check_nccl(ncclCommGetAsyncError(comm_, &async), "ncclCommGetAsyncError", comm_);
  // ncclInProgress: an operation of a nonblocking communicator is still running (not ours).
  if (async != ncclSuccess && async != ncclInProgress) {
    check_nccl(async, "NCCL (asynchronous error on the communicator)", comm_);
  }
}

void average_gradients(torch::nn::Module& module, const NcclCommunicator& comm) {
  torch::NoGradGuard no_grad;
  PackedGradients packed = pack_gradients(module);
  if (packed.params.empty()) return;
  torch::Tensor& flat = packed.flat;
  if (!flat.is_cuda() || flat.device().index() != comm.device()) {
    throw std::invalid_argument("average_gradients: the gradients are on " +
                                flat.device().str() + ", the NCCL communicator on cuda:" +
                                std::to_string(comm.device()));
  }
  const CudaDeviceScope scope(flat.device());
  // In place on the legacy default stream (PyTorch's current stream), after the kernels that
  // wrote the gradients and before those that read them back.
  const cudaStream_t legacy_default_stream = nullptr;
  check_nccl(ncclAllReduce(flat.data_ptr(), flat.data_ptr(), static_cast<size_t>(flat.numel()),
                           nccl_type(flat), ncclSum, comm.get(), legacy_default_stream),
             "ncclAllReduce", comm.get());
  flat.div_(comm.size());
  unpack_gradients(packed);
}

}  // namespace syncbn_examples
