// Checks the SyncBatchNorm module against torch's batch norm over the concatenated global batch:
// run on P ranks (launch/run_local.sh -n P -- test_sync_batch_norm), rank r holds an uneven
// share of a global batch (the last rank none at all when P > 1), and every rank compares its
// outputs, input gradients, summed parameter gradients, running statistics and evaluation-mode
// outputs with the reference it computes itself. For (N, C) and (N, C, H, W) input, channels
// first and last, with and without affine parameters, momentum 0.1 and cumulative, float32 and
// float64. Exits nonzero on any mismatch.
#include <mpi.h>
#include <torch/torch.h>

#include <cstdio>
#include <string>
#include <vector>

#include "data_parallel.hpp"
#include "sync_batch_norm.hpp"
#include "syncbn/syncbn_mpi.hpp"

namespace {

using syncbn_examples::SyncBatchNorm;
using syncbn_examples::SyncBatchNormOptions;
namespace F = torch::nn::functional;

constexpr int64_t kChannels = 3;
constexpr int kSteps = 2;  // two training steps: the running statistics see two batches

struct Case {
  int spatial_dims;
  bool channels_last;
  bool affine;
  c10::optional<double> momentum;
  torch::Dtype dtype;

  std::string name() const {
    return std::to_string(spatial_dims) + "d" + (channels_last ? " channels_last" : "") +
           (affine ? " affine" : " no-affine") +
           (momentum ? " momentum=" + std::to_string(*momentum) : " cumulative") +
           (dtype == torch::kFloat64 ? " float64" : " float32");
  }
  double tolerance() const { return dtype == torch::kFloat64 ? 1e-12 : 2e-5; }
};

class Checker {
 public:
  explicit Checker(MPI_Comm comm) : comm_(comm), rank_(syncbn_examples::mpi_rank(comm)) {}

  // max|a - b| <= tolerance * max(1, max|b|)
  void expect_close(const std::string& what, const torch::Tensor& a, const torch::Tensor& b,
                    double tolerance) {
    if (!a.defined()) return fail(what, "not computed");
    if (a.sizes() != b.sizes()) return fail(what, "shapes differ");
    if (a.numel() == 0) return;
    const torch::Tensor a64 = a.to(torch::kFloat64), b64 = b.to(torch::kFloat64);
    const double diff = (a64 - b64).abs().max().item<double>();
    const double scale = std::max(1.0, b64.abs().max().item<double>());
    if (!(diff <= tolerance * scale)) fail(what, "max abs difference " + std::to_string(diff));
  }

  void fail(const std::string& what, const std::string& why) {
    ++failures_;
    std::fprintf(stderr, "rank %d: FAILED %s: %s\n", rank_, what.c_str(), why.c_str());
  }

  // COLLECTIVE. Failures over all ranks.
  int64_t total_failures() const { return syncbn_examples::allreduce_sum(failures_, comm_); }

 private:
  MPI_Comm comm_;
  int rank_;
  int64_t failures_ = 0;
};

// Rank r's samples [offset, offset + count) of a global batch: uneven, the last rank empty.
std::pair<int64_t, int64_t> share(int rank, int ranks) {
  auto count = [ranks](int r) { return (ranks > 1 && r == ranks - 1) ? 0 : 2 + r; };
  int64_t offset = 0;
  for (int r = 0; r < rank; ++r) offset += count(r);
  return {offset, count(rank)};
}

int64_t global_count(int ranks) {
  const auto [offset, count] = share(ranks - 1, ranks);
  return offset + count;
}

torch::Tensor in_layout(const torch::Tensor& t, const Case& c) {
  return c.channels_last && t.dim() == 4 ? t.contiguous(torch::MemoryFormat::ChannelsLast)
                                         : t.contiguous();
}

// The reference: torch's functional batch norm over the global batch, with its own statistics.
struct Reference {
  torch::Tensor weight, bias, running_mean, running_var;
  int64_t num_batches = 0;

  Reference(const torch::Tensor& w, const torch::Tensor& b, torch::Dtype dtype)
      : running_mean(torch::zeros({kChannels}, dtype)),
        running_var(torch::ones({kChannels}, dtype)) {
    if (w.defined()) {
      weight = w.detach().clone().requires_grad_();
      bias = b.detach().clone().requires_grad_();
    }
  }

  torch::Tensor forward(const torch::Tensor& x, bool training, const Case& c) {
    double momentum = c.momentum.value_or(0.0);
    if (training) {
      ++num_batches;
      if (!c.momentum) momentum = 1.0 / static_cast<double>(num_batches);
    }
    return F::batch_norm(x, running_mean, running_var,
                         F::BatchNormFuncOptions().weight(weight).bias(bias).training(training)
                             .momentum(momentum).eps(1e-5));
  }
};

torch::Tensor summed_over_ranks(const torch::Tensor& local, MPI_Comm comm) {
  torch::Tensor sum = local.to(torch::kFloat64).contiguous();
  MPI_Allreduce(MPI_IN_PLACE, sum.data_ptr(), static_cast<int>(sum.numel()), MPI_DOUBLE,
                MPI_SUM, comm);
  return sum;
}

void run_case(const Case& c, const syncbn::Communicator& comm, MPI_Comm mpi, Checker& check) {
  const int rank = syncbn_examples::mpi_rank(mpi), ranks = syncbn_examples::mpi_size(mpi);
  const auto [offset, count] = share(rank, ranks);
  const double tol = c.tolerance();
  const std::string name = c.name();

  SyncBatchNorm bn(comm, SyncBatchNormOptions(kChannels)
                             .affine(c.affine)
                             .momentum(c.momentum)
                             .channels_last(c.channels_last));
  bn->to(c.dtype);
  torch::manual_seed(7);  // the same global data and parameters on every rank
  if (c.affine) {
    torch::NoGradGuard no_grad;
    bn->weight.copy_(torch::rand({kChannels}) + 0.5);
    bn->bias.copy_(torch::randn({kChannels}));
  }
  Reference ref(bn->weight, bn->bias, c.dtype);

  std::vector<int64_t> shape{global_count(ranks), kChannels};
  if (c.spatial_dims == 2) shape.insert(shape.end(), {4, 5});
  for (int step = 0; step < kSteps; ++step) {
    const torch::Tensor x = (torch::randn(shape) * 3 + 2).to(c.dtype);
    const torch::Tensor g = torch::randn(shape).to(c.dtype);  // dLoss/dy

    const torch::Tensor x_ref = x.clone().requires_grad_();
    const torch::Tensor y_ref = ref.forward(x_ref, true, c);
    (y_ref * g).sum().backward();

    bn->train();
    const torch::Tensor x_local = in_layout(x.narrow(0, offset, count), c).requires_grad_();
    const torch::Tensor y_local = bn(x_local);
    (y_local * g.narrow(0, offset, count)).sum().backward();

    const std::string at = name + " step " + std::to_string(step);
    check.expect_close(at + " y", y_local, y_ref.narrow(0, offset, count), tol);
    check.expect_close(at + " dx", x_local.grad(), x_ref.grad().narrow(0, offset, count), tol);
    if (c.affine) {
      check.expect_close(at + " dweight (summed)", summed_over_ranks(bn->weight.grad(), mpi),
                         ref.weight.grad(), tol);
      check.expect_close(at + " dbias (summed)", summed_over_ranks(bn->bias.grad(), mpi),
                         ref.bias.grad(), tol);
      bn->weight.mutable_grad().reset();
      bn->bias.mutable_grad().reset();
      ref.weight.mutable_grad().reset();
      ref.bias.mutable_grad().reset();
    }
    check.expect_close(at + " running_mean", bn->running_mean, ref.running_mean, tol);
    check.expect_close(at + " running_var", bn->running_var, ref.running_var, tol);
    if (bn->num_batches_tracked.item<int64_t>() != step + 1) {
      check.fail(at, "num_batches_tracked is not " + std::to_string(step + 1));
    }
  }

  torch::NoGradGuard no_grad;
  bn->eval();
  const torch::Tensor x = (torch::randn(shape) * 3 + 2).to(c.dtype);
  check.expect_close(name + " eval y", bn(in_layout(x.narrow(0, offset, count), c)),
                     ref.forward(x, false, c).narrow(0, offset, count), tol);
}

// A wrong channel count on the last rank only: every rank gets the error naming that rank, and
// no rank is left waiting in the collective (the module leaves shape checks to the library).
void run_bad_shape_case(const syncbn::Communicator& comm, MPI_Comm mpi, Checker& check) {
  SyncBatchNorm bn(comm, SyncBatchNormOptions(kChannels));
  const int last = syncbn_examples::mpi_size(mpi) - 1;
  const bool bad = syncbn_examples::mpi_rank(mpi) == last;
  const torch::Tensor x = torch::randn({4, bad ? kChannels + 1 : kChannels, 5});
  std::string message;
  try {
    bn(x);
  } catch (const std::exception& e) {
    message = e.what();
  }
  const std::string want = "rank " + std::to_string(last) + ": shape";
  if (message.find(want) == std::string::npos) {
    check.fail("bad shape on the last rank",
               "expected an error containing '" + want + "', got '" + message + "'");
  }
}

std::vector<Case> all_cases() {
  std::vector<Case> cases;
  for (int spatial_dims : {0, 2}) {
    for (bool channels_last : {false, true}) {
      for (bool affine : {true, false}) {
        for (c10::optional<double> momentum : {c10::optional<double>(0.1),
                                               c10::optional<double>()}) {
          cases.push_back({spatial_dims, channels_last, affine, momentum, torch::kFloat32});
        }
      }
    }
  }
  cases.push_back({2, false, true, 0.1, torch::kFloat64});
  cases.push_back({2, true, true, c10::nullopt, torch::kFloat64});
  return cases;
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int64_t failures = 1;
  try {
    const syncbn::Communicator comm = syncbn::mpi_communicator(MPI_COMM_WORLD);
    Checker check(MPI_COMM_WORLD);
    const std::vector<Case> cases = all_cases();
    for (const Case& c : cases) run_case(c, comm, MPI_COMM_WORLD, check);
    run_bad_shape_case(comm, MPI_COMM_WORLD, check);
    failures = check.total_failures();
    if (syncbn_examples::mpi_rank(MPI_COMM_WORLD) == 0) {
      std::printf("test_sync_batch_norm: %zu cases on %d ranks: %s\n", cases.size(),
                  syncbn_examples::mpi_size(MPI_COMM_WORLD),
                  failures == 0 ? "all passed" : "FAILED");
    }
  } catch (const std::exception& e) {  // the other ranks may be waiting in a collective
    std::fprintf(stderr, "test_sync_batch_norm: error: %s\n", e.what());
    MPI_Abort(MPI_COMM_WORLD, 1);
  }
  MPI_Finalize();
  return failures == 0 ? 0 : 1;
}
