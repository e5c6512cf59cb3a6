// The MPI side of data-parallel training with libtorch modules: start every rank from the same
// state, and average gradients after each backward. Every function here but mpi_rank, mpi_size
// and the gradient packing is COLLECTIVE over comm. Tensors may live on a CUDA device: they are
// staged through host memory for MPI (no CUDA-aware MPI needed). data_parallel_nccl.hpp has
// the NCCL counterpart of average_gradients.
#ifndef SYNCBN_EXAMPLES_DATA_PARALLEL_HPP
#define SYNCBN_EXAMPLES_DATA_PARALLEL_HPP

#include <mpi.h>
#include <torch/torch.h>

#include <cstdint>
#include <vector>

namespace syncbn_examples {

int mpi_rank(MPI_Comm comm);
int mpi_size(MPI_Comm comm);
// COLLECTIVE. This rank's index among the ranks of comm on the same node (shared memory).
int local_rank(MPI_Comm comm);

// Copies the root's parameters and buffers (running statistics, num_batches_tracked) to every
// rank, tensor by tensor in registration order.
void broadcast_state(torch::nn::Module& module, MPI_Comm comm, int root = 0);

// Copies the root's buffers only (what torch's DistributedDataParallel does before each forward
// with broadcast_buffers=true).
void broadcast_buffers(torch::nn::Module& module, MPI_Comm comm, int root = 0);

// Replaces every parameter's gradient by its mean over the ranks: the gradients are packed into
// one buffer, summed with ONE MPI_Allreduce, divided by the number of ranks and unpacked.
// Parameters that do not require grad are left out; a parameter whose gradient backward left
// undefined counts as zeros (every rank must pack the same layout). Gradients on a CUDA device
// are summed in a host copy.
void average_gradients(torch::nn::Module& module, MPI_Comm comm);

// The gradients of the parameters that require grad, in registration order, packed into one
// flat tensor (a copy, on their device, in their promoted dtype). A gradient backward left
// undefined is created as zeros first.
struct PackedGradients {
  std::vector<torch::Tensor> params;
  torch::Tensor flat;  // undefined when params is empty
};
PackedGradients pack_gradients(torch::nn::Module& module);
// Copies packed.flat back into the gradients it was packed from.
void unpack_gradients(const PackedGradients& packed);

double allreduce_sum(double value, MPI_Comm comm);
int64_t allreduce_sum(int64_t value, MPI_Comm comm);

}  // namespace syncbn_examples

#endif  // SYNCBN_EXAMPLES_DATA_PARALLEL_HPP
