// The NCCL side of data-parallel training with libtorch modules on CUDA tensors: one GPU per
// rank, an NCCL communicator over the MPI ranks, and gradient averaging with ncclAllReduce.
// Available when the examples are built with SYNCBN_EXAMPLE_NCCL (CMake: SYNCBN_WITH_NCCL=ON).
//
// Stream: everything here, like the SyncBatchNorm module, works on the CUDA legacy default
// stream (stream 0), which is PyTorch's default current stream, so NCCL's collectives are in
// stream order with the rest of the step and no host synchronization is needed.
#ifndef SYNCBN_EXAMPLES_DATA_PARALLEL_NCCL_HPP
#define SYNCBN_EXAMPLES_DATA_PARALLEL_NCCL_HPP

#include <mpi.h>
#include <nccl.h>
#include <torch/torch.h>

namespace syncbn_examples {

// An NCCL communicator over the ranks of an MPI communicator, owned (ncclCommDestroy at the
// end). Destroy every syncbn communicator and plan made from get() first.
class NcclCommunicator {
 public:
  // COLLECTIVE over comm: syncbn_nccl_comm_init_mpi, which makes GPU local_rank % (visible
  // devices) current on this rank (one GPU per rank) (see syncbn/syncbn_nccl_mpi.h). Throws syncbn::Error on failure (on
  // every rank alike).
  explicit NcclCommunicator(MPI_Comm comm);
  ~NcclCommunicator();
  NcclCommunicator(const NcclCommunicator&) = delete;
  NcclCommunicator& operator=(const NcclCommunicator&) = delete;

  ncclComm_t get() const { return comm_; }
  int rank() const { return rank_; }
  int size() const { return size_; }
  int local_rank() const { return local_rank_; }
  // The CUDA device of this rank (current after construction).
  int device() const { return device_; }

  // Throws std::runtime_error if NCCL recorded an asynchronous error on the communicator (a
  // failed peer or network). Does not synchronize.
  void check_async_error() const;

 private:
  ncclComm_t comm_ = nullptr;
  int rank_ = 0;
  int size_ = 1;
  int local_rank_ = 0;
  int device_ = 0;
};

// Replaces every parameter's gradient by its mean over the ranks of comm, like the MPI
// average_gradients (data_parallel.hpp): the gradients (CUDA tensors on comm's device,
// float32, float64, float16 or bfloat16) are packed into one buffer, summed in place with ONE
// ncclAllReduce on the legacy default stream, divided by the number of ranks and unpacked.
// Enqueue only: the host does not wait. COLLECTIVE over comm (NCCL order: the same NCCL calls
// in the same order on every rank, syncbn's included).
void average_gradients(torch::nn::Module& module, const NcclCommunicator& comm);

}  // namespace syncbn_examples

#endif  // SYNCBN_EXAMPLES_DATA_PARALLEL_NCCL_HPP
