// The CUDA device side of the trainer: the build's paths, and the choice of a rank's GPU over
// MPI. The device helpers themselves (require_cuda, CudaDeviceScope, ...) are syncbn::torch's
// (syncbn/torch/cuda_device.hpp), which sets devices with the CUDA runtime directly, so that the
// trainer builds against a CPU-only libtorch too.
#ifndef SYNCBN_EXAMPLES_CUDA_DEVICE_HPP
#define SYNCBN_EXAMPLES_CUDA_DEVICE_HPP

#include <mpi.h>

#include "syncbn/torch/cuda_device.hpp"

namespace syncbn_examples {

using syncbn_torch::CudaDeviceScope;
using syncbn_torch::cuda_current_device;
using syncbn_torch::cuda_device_count;
using syncbn_torch::cuda_set_device;
using syncbn_torch::require_cuda;

// Whether the trainer was built with the CUDA path (SYNCBN_WITH_CUDA) and with the NCCL one
// (SYNCBN_WITH_NCCL).
constexpr bool built_with_cuda() {
#ifdef SYNCBN_EXAMPLE_CUDA
  return true;
#else
  return false;
#endif
}

constexpr bool built_with_nccl() {
#ifdef SYNCBN_EXAMPLE_NCCL
  return true;
#else
  return false;
#endif
}

// COLLECTIVE over comm. One GPU per local rank: the rank's index among the ranks of comm on the
// same node (MPI_Comm_split_type shared), modulo the node's device count, made current. The
// same choice as syncbn_nccl_comm_init_mpi. Returns the device index.
int select_local_cuda_device(MPI_Comm comm);

}  // namespace syncbn_examples

#endif  // SYNCBN_EXAMPLES_CUDA_DEVICE_HPP
