#include "data_parallel.hpp"

#include <stdexcept>
#include <string>
#include <vector>

namespace syncbn_examples {
namespace {

void check_mpi(int rc, const char* call) {
  if (rc == MPI_SUCCESS) return;
  char text[MPI_MAX_ERROR_STRING];
  int length = 0;
  MPI_Error_string(rc, text, &length);
  throw std::runtime_error(std::string(call) + " failed: " + std::string(text, length));
}

MPI_Datatype mpi_type(const torch::Tensor& t) {
  switch (t.scalar_type()) {
    case torch::kFloat32: return MPI_FLOAT;
    case torch::kFloat64: return MPI_DOUBLE;
    case torch::kInt64: return MPI_INT64_T;
    default:
      throw std::invalid_argument(std::string("no MPI datatype for tensors of ") +
                                  c10::toString(t.scalar_type()));
  }
}

int mpi_count(int64_t numel) {
  if (numel > INT32_MAX) {
    throw std::invalid_argument("tensor of " + std::to_string(numel) +
                                " elements is too large for one MPI call");
  }
  return static_cast<int>(numel);
}

void broadcast_tensor(const torch::Tensor& t, MPI_Comm comm, int root) {
  if (!t.defined() || t.numel() == 0) return;
  if (!t.is_contiguous()) throw std::invalid_argument("broadcast_tensor: tensor not contiguous");
  check_mpi(MPI_Bcast(t.data_ptr(), mpi_count(t.numel()), mpi_type(t), root, comm), "MPI_Bcast");
}

// The gradient of p, created as zeros where backward left none.
torch::Tensor& gradient_of(torch::Tensor& p) {
  torch::Tensor& grad = p.mutable_grad();
  if (!grad.defined()) grad = torch::zeros_like(p);
  return grad;
}

}  // namespace

int mpi_rank(MPI_Comm comm) {
  int rank = 0;
  check_mpi(MPI_Comm_rank(comm, &rank), "MPI_Comm_rank");
  return rank;
}

int mpi_size(MPI_Comm comm) {
  int size = 0;
  check_mpi(MPI_Comm_size(comm, &size), "MPI_Comm_size");
  return size;
}

void broadcast_state(torch::nn::Module& module, MPI_Comm comm, int root) {
  torch::NoGradGuard no_grad;
  for (const torch::Tensor& p : module.parameters()) broadcast_tensor(p, comm, root);
  broadcast_buffers(module, comm, root);
}

void broadcast_buffers(torch::nn::Module& module, MPI_Comm comm, int root) {
  torch::NoGradGuard no_grad;
  for (const torch::Tensor& b : module.buffers()) broadcast_tensor(b, comm, root);
}

void average_gradients(torch::nn::Module& module, MPI_Comm comm) {
  torch::NoGradGuard no_grad;
  std::vector<torch::Tensor> params;
  for (const torch::Tensor& p : module.parameters()) {
    if (p.requires_grad()) params.push_back(p);
  }
  if (params.empty()) return;
  std::vector<torch::Tensor> flat_grads;
  flat_grads.reserve(params.size());
  for (torch::Tensor& p : params) flat_grads.push_back(gradient_of(p).reshape(-1));
  torch::Tensor packed = torch::cat(flat_grads);  // a copy, in the promoted dtype
  check_mpi(MPI_Allreduce(MPI_IN_PLACE, packed.data_ptr(), mpi_count(packed.numel()),
                          mpi_type(packed), MPI_SUM, comm),
            "MPI_Allreduce");
  packed.div_(mpi_size(comm));
  int64_t offset = 0;
  for (torch::Tensor& p : params) {
    torch::Tensor& grad = p.mutable_grad();
    grad.copy_(packed.narrow(0, offset, grad.numel()).view_as(grad));
    offset += grad.numel();
  }
}

double allreduce_sum(double value, MPI_Comm comm) {
  double sum = 0;
  check_mpi(MPI_Allreduce(&value, &sum, 1, MPI_DOUBLE, MPI_SUM, comm), "MPI_Allreduce");
  return sum;
}

int64_t allreduce_sum(int64_t value, MPI_Comm comm) {
  int64_t sum = 0;
  check_mpi(MPI_Allreduce(&value, &sum, 1, MPI_INT64_T, MPI_SUM, comm), "MPI_Allreduce");
  return sum;
}

}  // namespace syncbn_examples
