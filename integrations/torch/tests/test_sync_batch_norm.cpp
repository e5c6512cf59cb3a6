// Checks the SyncBatchNorm module against torch's batch norm over the concatenated global batch:
// run on P ranks (launch/run_local.sh -n P -- test_sync_batch_norm), rank r holds an uneven
// share of a global batch (the last rank none at all when P > 1), and every rank compares its
// outputs, input gradients, summed parameter gradients, running statistics and evaluation-mode
// outputs with the reference it computes itself. For (N, C) and (N, C, H, W) input, channels
// first and last, with and without affine parameters, momentum 0.1 and cumulative, float32 and
// float64. Then the layer's one plan: a rank whose input is not of the layer's dtype fails the
// call on every rank, naming that rank; ->to(dtype) makes the plan for the new dtype; and a
// counting communicator sees one plan creation per layer and per change of dtype. The fused
// layers, SyncBatchNormReLU and SyncBatchNormAddReLU, against torch::relu(batch_norm(x) [+ z])
// the same way (with z's gradient; (N, C) to (N, C, D, H, W), z in the other memory format than
// x), outputs exactly 0 (relu'(0) = 0), a bad z on the last rank, and SyncBatchNormReLU inside a
// torch::nn::Sequential. Exits nonzero on any mismatch.
//
//   test_sync_batch_norm [--device cpu|cuda] [--comm mpi|nccl]
//
// --device cuda runs the module on one GPU per rank (local rank % GPUs), over syncbn's MPI
// communicator (--comm mpi) or its NCCL one (--comm nccl, bootstrapped by
// syncbn_nccl_comm_init_mpi; NCCL allows one rank per GPU), against the same CPU reference;
// without a CUDA device it prints "SKIPPED: no CUDA device" and exits 0.
#include <mpi.h>
#include <torch/cuda.h>
#include <torch/torch.h>

#include <algorithm>
#include <cstdio>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "syncbn/syncbn_mpi.hpp"
#include "syncbn/torch/sync_batch_norm.hpp"
#ifdef SYNCBN_TORCH_TEST_NCCL
#include "syncbn/syncbn_nccl.hpp"
#include "syncbn/syncbn_nccl_mpi.h"
#endif

namespace {

using syncbn_torch::SyncBatchNorm;
using syncbn_torch::SyncBatchNormAddReLU;
using syncbn_torch::SyncBatchNormOptions;
using syncbn_torch::SyncBatchNormReLU;
namespace F = torch::nn::functional;

int mpi_rank(MPI_Comm comm) {
  int rank = 0;
  MPI_Comm_rank(comm, &rank);
  return rank;
}

int mpi_size(MPI_Comm comm) {
  int size = 0;
  MPI_Comm_size(comm, &size);
  return size;
}

// COLLECTIVE. This rank's index among the ranks of comm on its node.
int local_rank(MPI_Comm comm) {
  MPI_Comm node = MPI_COMM_NULL;
  MPI_Comm_split_type(comm, MPI_COMM_TYPE_SHARED, mpi_rank(comm), MPI_INFO_NULL, &node);
  const int rank = mpi_rank(node);
  MPI_Comm_free(&node);
  return rank;
}

constexpr int64_t kChannels = 3;
constexpr int kSteps = 2;  // two training steps: the running statistics see two batches

struct Case {
  int spatial_dims;
  bool channels_last;
  bool affine;
  c10::optional<double> momentum;
  torch::Dtype dtype;
  syncbn_activation_t activation = SYNCBN_ACTIVATION_NONE;

  std::string name() const {
    static const char* const activations[] = {"", " relu", " add_relu"};
    return std::to_string(spatial_dims) + "d" + (channels_last ? " channels_last" : "") +
           (affine ? " affine" : " no-affine") +
           (momentum ? " momentum=" + std::to_string(*momentum) : " cumulative") +
           (dtype == torch::kFloat64 ? " float64" : " float32") + activations[activation];
  }
  double tolerance() const { return dtype == torch::kFloat64 ? 1e-12 : 2e-5; }
  bool add() const { return activation == SYNCBN_ACTIVATION_ADD_RELU; }
};

// A layer of the case's activation: SyncBatchNorm, SyncBatchNormReLU or SyncBatchNormAddReLU,
// called with the residual z where it takes one.
struct Layer {
  std::shared_ptr<syncbn_torch::SyncBatchNormImpl> bn;
  std::shared_ptr<syncbn_torch::SyncBatchNormAddReLUImpl> add;  // ADD_RELU only

  Layer(const syncbn::Communicator& comm, const SyncBatchNormOptions& options,
        syncbn_activation_t activation) {
    if (activation == SYNCBN_ACTIVATION_ADD_RELU) {
      add = SyncBatchNormAddReLU(comm, options).ptr();
      bn = add;
    } else if (activation == SYNCBN_ACTIVATION_RELU) {
      bn = SyncBatchNormReLU(comm, options).ptr();
    } else {
      bn = SyncBatchNorm(comm, options).ptr();
    }
  }
  torch::Tensor operator()(const torch::Tensor& x, const torch::Tensor& z) const {
    return add ? add->forward(x, z) : bn->forward(x);
  }
  syncbn_torch::SyncBatchNormImpl* operator->() const { return bn.get(); }
};

class Checker {
 public:
  explicit Checker(MPI_Comm comm) : comm_(comm), rank_(mpi_rank(comm)) {}

  // max|a - b| <= tolerance * max(1, max|b|)
  void expect_close(const std::string& what, const torch::Tensor& a, const torch::Tensor& b,
                    double tolerance) {
    if (!a.defined()) return fail(what, "not computed");
    if (a.sizes() != b.sizes()) return fail(what, "shapes differ");
    if (a.numel() == 0) return;
    const torch::Tensor a64 = a.to(torch::kCPU, torch::kFloat64);
    const torch::Tensor b64 = b.to(torch::kCPU, torch::kFloat64);
    const double diff = (a64 - b64).abs().max().item<double>();
    const double scale = std::max(1.0, b64.abs().max().item<double>());
    if (!(diff <= tolerance * scale)) fail(what, "max abs difference " + std::to_string(diff));
  }

  void fail(const std::string& what, const std::string& why) {
    ++failures_;
    std::fprintf(stderr, "rank %d: FAILED %s: %s\n", rank_, what.c_str(), why.c_str());
  }

  // COLLECTIVE. Failures over all ranks.
  int64_t total_failures() const {
    int64_t sum = failures_;
    MPI_Allreduce(MPI_IN_PLACE, &sum, 1, MPI_INT64_T, MPI_SUM, comm_);
    return sum;
  }

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
  if (c.channels_last && t.dim() == 4) return t.contiguous(torch::MemoryFormat::ChannelsLast);
  if (c.channels_last && t.dim() == 5) return t.contiguous(torch::MemoryFormat::ChannelsLast3d);
  return t.contiguous();
}

// The global batch's shape for the case: (N, C, *spatial).
std::vector<int64_t> global_shape(const Case& c, int ranks) {
  std::vector<int64_t> shape{global_count(ranks), kChannels};
  static const std::vector<int64_t> spatial[] = {{}, {6}, {4, 5}, {2, 3, 2}};
  shape.insert(shape.end(), spatial[c.spatial_dims].begin(), spatial[c.spatial_dims].end());
  return shape;
}

// The reference: torch's functional batch norm over the global batch, with its own statistics.
struct Reference {
  torch::Tensor weight, bias, running_mean, running_var;
  int64_t num_batches = 0;

  Reference(const torch::Tensor& w, const torch::Tensor& b, torch::Dtype dtype)
      : running_mean(torch::zeros({kChannels}, dtype)),
        running_var(torch::ones({kChannels}, dtype)) {
    if (w.defined()) {
      weight = w.detach().to(torch::kCPU).clone().requires_grad_();
      bias = b.detach().to(torch::kCPU).clone().requires_grad_();
    }
  }

  // batch_norm(x), relu(batch_norm(x)) or relu(batch_norm(x) + z), by c.activation.
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& z, bool training,
                        const Case& c) {
    double momentum = c.momentum.value_or(0.0);
    if (training) {
      ++num_batches;
      if (!c.momentum) momentum = 1.0 / static_cast<double>(num_batches);
    }
    torch::Tensor y =
        F::batch_norm(x, running_mean, running_var,
                      F::BatchNormFuncOptions().weight(weight).bias(bias).training(training)
                          .momentum(momentum).eps(1e-5));
    if (c.activation == SYNCBN_ACTIVATION_ADD_RELU) y = y + z;
    return c.activation == SYNCBN_ACTIVATION_NONE ? y : torch::relu(y);
  }
};

torch::Tensor summed_over_ranks(const torch::Tensor& local, MPI_Comm comm) {
  torch::Tensor sum = local.to(torch::kCPU, torch::kFloat64).contiguous();
  MPI_Allreduce(MPI_IN_PLACE, sum.data_ptr(), static_cast<int>(sum.numel()), MPI_DOUBLE,
                MPI_SUM, comm);
  return sum;
}

#ifdef SYNCBN_TORCH_TEST_NCCL
// An NCCL communicator over the MPI ranks (syncbn_nccl_comm_init_mpi: one GPU per rank, made
// current), destroyed at the end.
struct NcclCommunicator {
  explicit NcclCommunicator(MPI_Comm comm) {
    syncbn::check(syncbn_nccl_comm_init_mpi(comm, &nccl, &device));
  }
  ~NcclCommunicator() {
    if (nccl != nullptr) ncclCommDestroy(nccl);  // nothing to do about a failure here
  }
  NcclCommunicator(const NcclCommunicator&) = delete;
  NcclCommunicator& operator=(const NcclCommunicator&) = delete;

  ncclComm_t nccl = nullptr;
  int device = 0;  // the local rank's GPU
};
#endif

// The communicator and device the module runs on.
struct Setup {
#ifdef SYNCBN_TORCH_TEST_NCCL
  std::unique_ptr<NcclCommunicator> nccl;  // outlives comm
#endif
  syncbn::Communicator comm;
  torch::Device device = torch::kCPU;
};

void run_case(const Case& c, const Setup& setup, MPI_Comm mpi, Checker& check) {
  const syncbn::Communicator& comm = setup.comm;
  const torch::Device device = setup.device;
  const int rank = mpi_rank(mpi), ranks = mpi_size(mpi);
  const auto [offset, count] = share(rank, ranks);
  const double tol = c.tolerance();
  const std::string name = c.name();

  const Layer bn(comm,
                 SyncBatchNormOptions(kChannels)
                     .affine(c.affine)
                     .momentum(c.momentum)
                     .channels_last(c.channels_last)
                     .device(device),
                 c.activation);
  if (bn->activation() != c.activation) check.fail(name, "activation() is not the layer's");
  bn->to(c.dtype);
  torch::manual_seed(7);  // the same global data and parameters on every rank
  if (c.affine) {
    torch::NoGradGuard no_grad;
    bn->weight.copy_(torch::rand({kChannels}) + 0.5);
    bn->bias.copy_(torch::randn({kChannels}));
  }
  Reference ref(bn->weight, bn->bias, c.dtype);

  const std::vector<int64_t> shape = global_shape(c, ranks);
  // A residual around the outputs' scale, so that relu cuts a part of y + z.
  const auto draw_z = [&] { return c.add() ? (torch::randn(shape) - 0.5).to(c.dtype)
                                           : torch::Tensor(); };
  for (int step = 0; step < kSteps; ++step) {
    const torch::Tensor x = (torch::randn(shape) * 3 + 2).to(c.dtype);
    const torch::Tensor z = draw_z();
    const torch::Tensor g = torch::randn(shape).to(c.dtype);  // dLoss/dy

    const torch::Tensor x_ref = x.clone().requires_grad_();
    const torch::Tensor z_ref = c.add() ? z.clone().requires_grad_() : z;
    const torch::Tensor y_ref = ref.forward(x_ref, z_ref, true, c);
    (y_ref * g).sum().backward();

    bn->train();
    const torch::Tensor x_local =
        in_layout(x.narrow(0, offset, count), c).to(device).requires_grad_();
    // z in the other memory format than x at the second step (copied into the layer's).
    const torch::Tensor z_local =
        !c.add() ? z
        : step == 0 ? in_layout(z.narrow(0, offset, count), c).to(device).requires_grad_()
                    : z.narrow(0, offset, count).contiguous().to(device).requires_grad_();
    const torch::Tensor y_local = bn(x_local, z_local);
    (y_local * g.narrow(0, offset, count).to(device)).sum().backward();
    bn->check_async_error();  // CUDA over NCCL: errors the device found; nothing otherwise

    const std::string at = name + " step " + std::to_string(step);
    check.expect_close(at + " y", y_local, y_ref.narrow(0, offset, count), tol);
    check.expect_close(at + " dx", x_local.grad(), x_ref.grad().narrow(0, offset, count), tol);
    if (c.add()) {
      check.expect_close(at + " dz", z_local.grad(), z_ref.grad().narrow(0, offset, count), tol);
    }
    if (c.activation != SYNCBN_ACTIVATION_NONE && y_local.numel() > 0 &&
        y_local.min().item<double>() < 0) {
      check.fail(at, "y has negative values");
    }
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
  const torch::Tensor z = draw_z();
  const torch::Tensor z_local =
      c.add() ? in_layout(z.narrow(0, offset, count), c).to(device) : z;
  check.expect_close(name + " eval y",
                     bn(in_layout(x.narrow(0, offset, count), c).to(device), z_local),
                     ref.forward(x, z, false, c).narrow(0, offset, count), tol);
}

// relu'(0) = 0, as torch's: channel 0 is constant over the global batch (2.0, which normalizes
// to exactly 0) with bias 0, channel 1 has weight 0 and bias 0, so bn(x) is exactly 0 there (with
// add_relu z is 0 at every other element there): y is exactly 0 and its gradient reaches neither
// x nor z nor weight nor bias (dx of channel 0 is 0, not weight * invstd * (dy - mean dy); dbias
// of channels 0 and 1 is 0, not sum dy), as the reference gives.
void run_zero_case(syncbn_activation_t activation, torch::Dtype dtype, const Setup& setup,
                   MPI_Comm mpi, Checker& check) {
  const int rank = mpi_rank(mpi), ranks = mpi_size(mpi);
  const auto [offset, count] = share(rank, ranks);
  Case c{1, false, true, 0.1, dtype, activation};
  const std::string name = "exact zeros, " + c.name();
  const Layer bn(setup.comm, SyncBatchNormOptions(kChannels).device(setup.device), activation);
  bn->to(dtype);
  torch::manual_seed(11);
  {
    torch::NoGradGuard no_grad;
    bn->weight.copy_(torch::rand({kChannels}) + 0.5);
    bn->bias.copy_(torch::randn({kChannels}));
    bn->bias.narrow(0, 0, 2).zero_();
    bn->weight[1] = 0;
  }
  Reference ref(bn->weight, bn->bias, dtype);
  const std::vector<int64_t> shape = global_shape(c, ranks);
  const torch::Tensor x = torch::randn(shape).to(dtype);
  x.select(1, 0).fill_(2.0);
  torch::Tensor z;
  if (c.add()) {
    z = torch::randn(shape).to(dtype);
    z.narrow(1, 0, 2).slice(2, 0, shape[2], 2).zero_();
  }
  const torch::Tensor g = (torch::randn(shape) + 1).to(dtype);

  const torch::Tensor x_ref = x.clone().requires_grad_();
  const torch::Tensor z_ref = c.add() ? z.clone().requires_grad_() : z;
  (ref.forward(x_ref, z_ref, true, c) * g).sum().backward();

  bn->train();
  const torch::Tensor x_local = x.narrow(0, offset, count).contiguous().to(setup.device)
                                    .requires_grad_();
  const torch::Tensor z_local =
      c.add() ? z.narrow(0, offset, count).contiguous().to(setup.device).requires_grad_() : z;
  const torch::Tensor y = bn(x_local, z_local);
  (y * g.narrow(0, offset, count).to(setup.device)).sum().backward();
  bn->check_async_error();

  const double tol = c.tolerance();
  check.expect_close(name + " dx", x_local.grad(), x_ref.grad().narrow(0, offset, count), tol);
  check.expect_close(name + " dweight (summed)", summed_over_ranks(bn->weight.grad(), mpi),
                     ref.weight.grad(), tol);
  check.expect_close(name + " dbias (summed)", summed_over_ranks(bn->bias.grad(), mpi),
                     ref.bias.grad(), tol);
  if (c.add()) {
    check.expect_close(name + " dz", z_local.grad(), z_ref.grad().narrow(0, offset, count), tol);
  }
  // Exactly: y == 0 where bn(x) [+ z] is 0, and nothing flows back from there.
  const torch::Tensor y2 = y.narrow(1, 0, 2).to(torch::kCPU);
  const torch::Tensor zero = c.add() ? (z_local.narrow(1, 0, 2).to(torch::kCPU) <= 0)
                                     : torch::ones_like(y2, torch::kBool);
  if (y2.masked_select(zero).abs().sum().item<double>() != 0) {
    check.fail(name, "y is not exactly 0 where bn(x) [+ z] is 0");
  }
  if (!c.add() && x_local.grad().select(1, 0).abs().sum().item<double>() != 0) {
    check.fail(name, "dx of the constant channel is not exactly 0");
  }
  if (c.add() &&
      z_local.grad().narrow(1, 0, 2).to(torch::kCPU).masked_select(zero).abs().sum()
              .item<double>() != 0) {
    check.fail(name, "dz is not exactly 0 where y is 0");
  }
  if (summed_over_ranks(bn->bias.grad(), mpi).narrow(0, 0, 1).abs().item<double>() != 0 &&
      !c.add()) {
    check.fail(name, "dbias of the constant channel is not exactly 0");
  }
}

// A residual of another shape (or dtype) on the last rank only: every rank gets the error naming
// that rank and z.
void run_bad_residual_case(const Setup& setup, MPI_Comm mpi, Checker& check) {
  const int last = mpi_size(mpi) - 1;
  const bool bad = mpi_rank(mpi) == last;
  for (const char* what : {"shape", "dtype", "undefined"}) {
    SyncBatchNormAddReLU bn(setup.comm, SyncBatchNormOptions(kChannels).device(setup.device));
    const torch::Tensor x = torch::randn({4, kChannels, 5}).to(setup.device);
    torch::Tensor z = x.clone();
    if (bad && std::string(what) == "shape") z = torch::randn({4, kChannels, 6}).to(setup.device);
    if (bad && std::string(what) == "dtype") z = z.to(torch::kFloat64);
    if (bad && std::string(what) == "undefined") z = torch::Tensor();
    std::string message;
    try {
      bn(x, z);
      bn->check_async_error();
    } catch (const std::exception& e) {
      message = e.what();
    }
    const std::string want = "rank " + std::to_string(last) + ": z";
    if (message.find(want) == std::string::npos) {
      check.fail(std::string("bad residual (") + what + ") on the last rank",
                 "expected an error containing '" + want + "', got '" + message + "'");
    }
    if (bn->num_batches_tracked.item<int64_t>() != 0) {
      check.fail(std::string("bad residual (") + what + ")", "num_batches_tracked changed");
    }
  }
}

// SyncBatchNormReLU goes into a torch::nn::Sequential (one forward, not overloaded), and prints
// its own name; its output is torch::relu of SyncBatchNorm's on the same input.
void run_sequential_case(const Setup& setup, Checker& check) {
  torch::nn::Sequential seq(
      torch::nn::Conv2d(torch::nn::Conv2dOptions(2, kChannels, 1)),
      SyncBatchNormReLU(setup.comm, SyncBatchNormOptions(kChannels).device(setup.device)));
  seq->to(setup.device);
  SyncBatchNorm plain(setup.comm, SyncBatchNormOptions(kChannels).device(setup.device));
  const torch::Tensor x = torch::randn({3, 2, 4, 4}).to(setup.device);
  torch::NoGradGuard no_grad;
  const torch::Tensor h = seq[0]->as<torch::nn::Conv2d>()->forward(x);
  const torch::Tensor y = seq->forward(x);
  const torch::Tensor want = torch::relu(plain(h));
  check.expect_close("SyncBatchNormReLU in a Sequential", y, want, 1e-6);
  std::ostringstream printed;
  printed << *seq;
  if (printed.str().find("SyncBatchNormReLU(3, eps=") == std::string::npos) {
    check.fail("SyncBatchNormReLU's pretty_print", printed.str());
  }
}

// A wrong channel count on the last rank only: every rank gets the error naming that rank, and
// no rank is left waiting in the collective (the module leaves shape checks to the library).
// Over NCCL the other ranks learn it from the device (check_async_error), not from the call.
void run_bad_shape_case(const Setup& setup, MPI_Comm mpi, Checker& check) {
  SyncBatchNorm bn(setup.comm, SyncBatchNormOptions(kChannels).device(setup.device));
  const int last = mpi_size(mpi) - 1;
  const bool bad = mpi_rank(mpi) == last;
  const torch::Tensor x =
      torch::randn({4, bad ? kChannels + 1 : kChannels, 5}).to(setup.device);
  std::string message;
  try {
    bn(x);
    bn->check_async_error();
  } catch (const std::exception& e) {
    message = e.what();
  }
  const std::string want = "rank " + std::to_string(last) + ": shape";
  if (message.find(want) == std::string::npos) {
    check.fail("bad shape on the last rank",
               "expected an error containing '" + want + "', got '" + message + "'");
  }
}

// The layer's one plan, counted on a one-rank custom communicator (CPU) whose allreduce records
// its sizes: plan creation sums 85 doubles (docs/design.md section 2.2: an error record of 5 and
// 10 configuration fields, activation included since 0.4, of 8 slots each), a training forward
// 2C + 18. Construction makes one plan, ->to() to another dtype one more, ->to() to the same
// dtype none.
void run_plan_count_case(Checker& check) {
  auto sizes = std::make_shared<std::vector<std::size_t>>();
  const syncbn::Communicator comm = syncbn::custom_communicator(
      0, 1, [sizes](double*, std::size_t count, syncbn_device_t, void*) {
        sizes->push_back(count);
        return 0;
      });
  const auto creations = [&sizes] {
    return std::count(sizes->begin(), sizes->end(), std::size_t{85});
  };
  SyncBatchNorm bn(comm, SyncBatchNormOptions(kChannels));
  if (creations() != 1) check.fail("plans of a new layer", std::to_string(creations()));
  bn->to(torch::kFloat64);
  bn->to(torch::kFloat64);
  if (creations() != 2) check.fail("plans after ->to(float64) twice", std::to_string(creations()));
  bn->to(torch::kCPU, torch::kFloat32);
  if (creations() != 3) check.fail("plans after ->to(cpu, float32)", std::to_string(creations()));
  // Data of mean 0, the plan's first shift: no second allreduce to refine the shift (syncbn.h,
  // Precision), whatever the random state.
  const torch::Tensor centered =
      torch::tensor({1.0f, -1.0f, 2.0f, -2.0f}).view({4, 1}).expand({4, kChannels}).contiguous();
  bn(centered);
  if (sizes->size() != 4 || sizes->back() != 2 * kChannels + 18) {
    check.fail("one forward", "not one allreduce of 2C + 18 doubles after the plans");
  }
  // A fused layer is one plan too, and its forward and backward one allreduce each.
  SyncBatchNormAddReLU fused(comm, SyncBatchNormOptions(kChannels));
  if (creations() != 4) check.fail("plans of a fused layer", std::to_string(creations()));
  const torch::Tensor x = centered.clone().requires_grad_();
  fused(x, torch::randn({4, kChannels}, torch::requires_grad())).sum().backward();
  if (sizes->size() != 7 || sizes->back() != 2 * kChannels + 18) {
    check.fail("one fused forward and backward", "not two allreduces of 2C + 18 doubles");
  }
}

// A float64 input on the last rank only, in training, into a float32 layer: every rank fails the
// call, with the error naming that rank (the layer's one plan is float32; the rank rejects its
// input). ->to(torch::kFloat64) then makes the plan for float64 on every rank, and the layer
// trains on float64 input; ->to(torch::kFloat32) goes back.
void run_dtype_case(const Setup& setup, MPI_Comm mpi, Checker& check) {
  SyncBatchNorm bn(setup.comm, SyncBatchNormOptions(kChannels).device(setup.device));
  const int last = mpi_size(mpi) - 1;
  const bool bad = mpi_rank(mpi) == last;
  const auto x = [&](torch::Dtype dtype) {
    return torch::randn({4, kChannels, 5}, torch::TensorOptions().dtype(dtype))
        .to(setup.device);
  };
  if (bn->dtype() != torch::kFloat32) check.fail("dtype", "a new layer is not float32");

  std::string message;
  try {
    bn(x(bad ? torch::kFloat64 : torch::kFloat32));
    bn->check_async_error();
  } catch (const std::exception& e) {
    message = e.what();
  }
  const std::string want = "rank " + std::to_string(last) + ": x is not of the plan's dtype";
  if (message.find(want) == std::string::npos) {
    check.fail("float64 input on the last rank",
               "expected an error containing '" + want + "', got '" + message + "'");
  }

  // A layer made while torch's default dtype is float64 is still float32, parameters and
  // statistics included, and trains on float32 input.
  {
    const caffe2::TypeMeta previous = torch::get_default_dtype();
    torch::set_default_dtype(caffe2::TypeMeta::Make<double>());
    SyncBatchNorm made(setup.comm, SyncBatchNormOptions(kChannels).device(setup.device));
    torch::set_default_dtype(previous);
    for (const torch::Tensor* t : {&made->weight, &made->bias, &made->running_mean,
                                   &made->running_var}) {
      if (t->scalar_type() != torch::kFloat32) {
        check.fail("a layer made with a float64 default dtype", "a parameter or statistic is not float32");
      }
    }
    try {
      made(x(torch::kFloat32));
      made->check_async_error();
    } catch (const std::exception& e) {
      check.fail("a layer made with a float64 default dtype", std::string("forward threw: ") + e.what());
    }
  }

  for (torch::Dtype dtype : {torch::kFloat64, torch::kFloat32}) {
    bn->to(dtype);
    const std::string at = std::string("after ->to(") + c10::toString(dtype) + ")";
    if (bn->dtype() != dtype) check.fail(at, "dtype() is not the new dtype");
    if (bn->weight.scalar_type() != dtype) check.fail(at, "weight is not of the new dtype");
    if (bn->num_batches_tracked.scalar_type() != torch::kInt64) {
      check.fail(at, "num_batches_tracked is not int64");
    }
    try {
      const torch::Tensor y = bn(x(dtype));
      bn->check_async_error();
      if (y.scalar_type() != dtype) check.fail(at, "y is not of the new dtype");
    } catch (const std::exception& e) {
      check.fail(at, std::string("forward threw: ") + e.what());
    }
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
  // The fused layers: every input rank, both layouts, both dtypes.
  for (syncbn_activation_t activation : {SYNCBN_ACTIVATION_RELU, SYNCBN_ACTIVATION_ADD_RELU}) {
    for (int spatial_dims : {0, 1, 2, 3}) {
      for (bool channels_last : {false, true}) {
        if (channels_last && spatial_dims == 0) continue;  // (N, C): one layout
        for (torch::Dtype dtype : {torch::kFloat32, torch::kFloat64}) {
          cases.push_back({spatial_dims, channels_last, true, 0.1, dtype, activation});
        }
      }
    }
    cases.push_back({2, false, false, c10::nullopt, torch::kFloat32, activation});
  }
  return cases;
}

// --device cpu|cuda, --comm mpi|nccl.
void parse_arguments(int argc, char** argv, std::string& device, std::string& comm) {
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if ((arg == "--device" || arg == "--comm") && i + 1 < argc) {
      (arg == "--device" ? device : comm) = argv[++i];
    } else {
      throw std::invalid_argument("unknown argument '" + arg +
                                  "' (usage: [--device cpu|cuda] [--comm mpi|nccl])");
    }
  }
  if (device != "cpu" && device != "cuda") throw std::invalid_argument("--device cpu|cuda");
  if (comm != "mpi" && comm != "nccl") throw std::invalid_argument("--comm mpi|nccl");
  if (comm == "nccl" && device != "cuda") throw std::invalid_argument("--comm nccl: --device cuda");
}

// COLLECTIVE. The communicator and, for CUDA, this rank's GPU made current.
void set_up(const std::string& device, const std::string& comm, Setup& setup) {
  if (device == "cpu") {
    setup.comm = syncbn::mpi_communicator(MPI_COMM_WORLD);
    return;
  }
  if (comm == "nccl") {
#ifdef SYNCBN_TORCH_TEST_NCCL
    setup.nccl = std::make_unique<NcclCommunicator>(MPI_COMM_WORLD);
    setup.device =
        torch::Device(torch::kCUDA, static_cast<c10::DeviceIndex>(setup.nccl->device));
    setup.comm = syncbn::nccl_communicator(setup.nccl->nccl);
    return;
#else
    throw std::invalid_argument("--comm nccl: built without NCCL (SYNCBN_WITH_NCCL=OFF)");
#endif
  }
  // One GPU per local rank, as syncbn_nccl_comm_init_mpi chooses it; the layers make it current
  // for their calls (SyncBatchNormOptions::device).
  const int local = local_rank(MPI_COMM_WORLD);
  const int count = static_cast<int>(torch::cuda::device_count());
  if (count <= 0) throw std::runtime_error("no CUDA device");
  setup.device = torch::Device(torch::kCUDA, static_cast<c10::DeviceIndex>(local % count));
  setup.comm = syncbn::mpi_communicator(MPI_COMM_WORLD);
}

}  // namespace

int main(int argc, char** argv) {
  // With --device cuda, the module's backward (and its MPI allreduce) runs on autograd's CUDA
  // thread while the main thread waits: one thread at a time.
  int provided = MPI_THREAD_SINGLE;
  MPI_Init_thread(&argc, &argv, MPI_THREAD_SERIALIZED, &provided);
  const int rank = mpi_rank(MPI_COMM_WORLD);
  int64_t failures = 1;
  // Outlives the handler below: a failing rank aborts before tearing down communicators that
  // its peers may be waiting in.
  auto setup = std::make_unique<Setup>();
  try {
    std::string device = "cpu", comm = "mpi";
    parse_arguments(argc, argv, device, comm);
    if (device == "cuda" &&
        !(syncbn_torch::built_with_cuda() && torch::cuda::is_available())) {
      if (rank == 0) {
        std::printf("test_sync_batch_norm: SKIPPED: no CUDA device (%s)\n",
                    syncbn_torch::built_with_cuda() ? "torch::cuda::is_available() is false"
                                                       : "built without SYNCBN_WITH_CUDA");
      }
      MPI_Finalize();
      return 0;
    }
    if (device == "cuda" && comm == "mpi" && provided < MPI_THREAD_SERIALIZED) {
      throw std::runtime_error("--device cuda --comm mpi needs MPI_THREAD_SERIALIZED, this MPI "
                               "provides level " + std::to_string(provided));
    }
    set_up(device, comm, *setup);
    Checker check(MPI_COMM_WORLD);
    const std::vector<Case> cases = all_cases();
    for (const Case& c : cases) run_case(c, *setup, MPI_COMM_WORLD, check);
    for (syncbn_activation_t activation : {SYNCBN_ACTIVATION_RELU, SYNCBN_ACTIVATION_ADD_RELU}) {
      for (torch::Dtype dtype : {torch::kFloat32, torch::kFloat64}) {
        run_zero_case(activation, dtype, *setup, MPI_COMM_WORLD, check);
      }
    }
    run_bad_residual_case(*setup, MPI_COMM_WORLD, check);
    run_sequential_case(*setup, check);
    run_bad_shape_case(*setup, MPI_COMM_WORLD, check);
    run_dtype_case(*setup, MPI_COMM_WORLD, check);
    run_plan_count_case(check);
    failures = check.total_failures();
    setup.reset();  // the syncbn communicator, then the NCCL one
    if (rank == 0) {
      std::printf("test_sync_batch_norm: %zu cases on %d ranks, %s over %s: %s\n", cases.size(),
                  mpi_size(MPI_COMM_WORLD), device.c_str(), comm.c_str(),
                  failures == 0 ? "all passed" : "FAILED");
    }
  } catch (const std::exception& e) {  // the other ranks may be waiting in a collective
    std::fprintf(stderr, "test_sync_batch_norm: error: %s\n", e.what());
    MPI_Abort(MPI_COMM_WORLD, 1);
  }
  MPI_Finalize();
  return failures == 0 ? 0 : 1;
}
