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
  if (t.is_cpu()) {
    check_mpi(MPI_Bcast(t.data_ptr(), mpi_count(t.numel()), mpi_type(t), root, comm),
              "MPI_Bcast");
    return;
  }
  const torch::Tensor host = t.to(torch::kCPU).contiguous();  // waits for t
  check_mpi(MPI_Bcast(host.data_ptr(), mpi_count(host.numel()), mpi_type(host), root, comm),
            "MPI_Bcast");
  t.copy_(host);
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

int local_rank(MPI_Comm comm) {
  MPI_Comm node = MPI_COMM_NULL;
  check_mpi(MPI_Comm_split_type(comm, MPI_COMM_TYPE_SHARED, mpi_rank(comm), MPI_INFO_NULL, &node),
            "MPI_Comm_split_type");
  int rank = 0;
  const int rc = MPI_Comm_rank(node, &rank);
  MPI_Comm_free(&node);
  check_mpi(rc, "MPI_Comm_rank");
  return rank;
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

PackedGradients pack_gradients(torch::nn::Module& module) {
  torch::NoGradGuard no_grad;
  PackedGradients packed;
  for (const torch::Tensor& p : module.parameters()) {
    if (p.requires_grad()) packed.params.push_back(p);
  }
  if (packed.params.empty()) return packed;
  std::vector<torch::Tensor> flat_grads;
  flat_grads.reserve(packed.params.size());
  for (torch::Tensor& p : packed.params) flat_grads.push_back(gradient_of(p).reshape(-1));
  packed.flat = torch::cat(flat_grads);  // a copy, in the promoted dtype
  return packed;
}

void unpack_gradients(const PackedGradients& packed) {
  torch::NoGradGuard no_grad;
  int64_t offset = 0;
  for (const torch::Tensor& p : packed.params) {
    torch::Tensor& grad = p.mutable_grad();
    grad.copy_(packed.flat.narrow(0, offset, grad.numel()).view_as(grad));
    offset += grad.numel();
  }
}

void average_gradients(torch::nn::Module& module, MPI_Comm comm) {
  torch::NoGradGuard no_grad;
  PackedGradients packed = pack_gradients(module);
  if (packed.params.empty()) return;
  // MPI sums host memory: a device buffer goes through a host copy and back.
  const bool staged = !packed.flat.is_cpu();
  torch::Tensor host = staged ? packed.flat.to(torch::kCPU) : packed.flat;
  check_mpi(MPI_Allreduce(MPI_IN_PLACE, host.data_ptr(), mpi_count(host.numel()),
                          mpi_type(host), MPI_SUM, comm),
            "MPI_Allreduce");
  host.div_(mpi_size(comm));
  if (staged) packed.flat.copy_(host);
  unpack_gradients(packed);
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
