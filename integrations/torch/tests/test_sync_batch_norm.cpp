// Checks the SyncBatchNorm module against torch's batch norm over the concatenated global batch:
// run on P ranks (launch/run_local.sh -n P -- test_sync_batch_norm), rank r holds an uneven
// share of a global batch (the last rank none at all when P > 1), and every rank compares its
// outputs, input gradients, summed parameter gradients, running statistics and evaluation-mode
// outputs with the reference it computes itself. For (N, C) and (N, C, H, W) input, channels
// first and last, with and without affine parameters, momentum 0.1 and cumulative, float32 and
// float64. Then the layer's one plan: a rank whose input is not of the layer's dtype fails the
// call on every rank, naming that rank; ->to(dtype) makes the plan for the new dtype; and a
// counting communicator sees one plan creation per layer and per change of dtype. Exits nonzero
// on any mismatch.
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
using syncbn_torch::SyncBatchNormOptions;
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
      weight = w.detach().to(torch::kCPU).clone().requires_grad_();
      bias = b.detach().to(torch::kCPU).clone().requires_grad_();
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

  SyncBatchNorm bn(comm, SyncBatchNormOptions(kChannels)
                             .affine(c.affine)
                             .momentum(c.momentum)
                             .channels_last(c.channels_last)
                             .device(device));
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
    const torch::Tensor x_local =
        in_layout(x.narrow(0, offset, count), c).to(device).requires_grad_();
    const torch::Tensor y_local = bn(x_local);
    (y_local * g.narrow(0, offset, count).to(device)).sum().backward();
    bn->check_async_error();  // CUDA over NCCL: errors the device found; nothing otherwise

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
  check.expect_close(name + " eval y", bn(in_layout(x.narrow(0, offset, count), c).to(device)),
                     ref.forward(x, false, c).narrow(0, offset, count), tol);
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
// its sizes: plan creation sums 77 doubles (docs/design.md section 2.2), a training forward
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
    return std::count(sizes->begin(), sizes->end(), std::size_t{77});
  };
  SyncBatchNorm bn(comm, SyncBatchNormOptions(kChannels));
  if (creations() != 1) check.fail("plans of a new layer", std::to_string(creations()));
  bn->to(torch::kFloat64);
  bn->to(torch::kFloat64);
  if (creations() != 2) check.fail("plans after ->to(float64) twice", std::to_string(creations()));
  bn->to(torch::kCPU, torch::kFloat32);
  if (creations() != 3) check.fail("plans after ->to(cpu, float32)", std::to_string(creations()));
  bn(torch::randn({4, kChannels}));
  if (sizes->size() != 4 || sizes->back() != 2 * kChannels + 18) {
    check.fail("one forward", "not one allreduce of 2C + 18 doubles after the plans");
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
