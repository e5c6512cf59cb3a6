// train_fashion_mnist: data-parallel training of a small network on Fashion-MNIST over MPI
// ranks, with batch norm synchronized across the ranks by syncbn (--bn sync) or torch's own
// per-rank batch norm (--bn local, what plain data parallelism gives).
//
//   launch/run_local.sh -n 4 -- train_fashion_mnist --model mlp --bn sync --batch-per-rank 4
//
// Each epoch the training set is shuffled with a permutation drawn from --seed and the epoch
// number (the same on every rank); global batch k is samples [k*P*b, (k+1)*P*b) of it, of which
// rank r takes [r*b, (r+1)*b); an incomplete last global batch is dropped. Every rank starts
// from the same parameters (same seed, then broadcast from rank 0), computes the mean loss over
// its local batch, and after backward the parameter gradients are averaged over the ranks (one
// MPI_Allreduce) before the SGD step. Rank 0 prints one line per epoch and a final JSON line.
// With --device cuda each rank runs on one GPU (local rank % GPUs of the node), and the ranks
// talk through NCCL (--comm nccl: syncbn's NCCL communicator for batch norm, ncclAllReduce for
// the gradients) or MPI (--comm mpi: syncbn stages its buffers through host memory, and so does
// the gradient averaging). README.md has the details.
#include <mpi.h>
#include <omp.h>
#include <torch/torch.h>

#include <CLI/CLI.hpp>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <functional>
#include <memory>
#include <optional>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "cuda_device.hpp"
#include "data_parallel.hpp"
#include "fashion_mnist_data.hpp"
#include "models.hpp"
#include "syncbn/syncbn_mpi.hpp"
#include "syncbn/torch/sync_batch_norm.hpp"
#ifdef SYNCBN_EXAMPLE_NCCL
#include "data_parallel_nccl.hpp"
#include "syncbn/syncbn_nccl.hpp"
#endif

namespace {

using namespace syncbn_examples;
using syncbn_torch::check_async_errors;

constexpr double kPixelMean = 0.2860;  // of the training set, pixels scaled to [0, 1]
constexpr double kPixelStd = 0.3530;
constexpr int64_t kEvalBatch = 1000;

struct Options {
  std::string model = "mlp";
  std::string bn = "sync";
  int64_t batch_per_rank = 32;
  int epochs = 1;
  int64_t max_steps = 0;
  double lr = 0.01;
  double momentum = 0.9;
  uint64_t seed = 1;
  int threads = 0;
  std::string dtype = "float32";
  std::string data = kDefaultFashionMnistDir;
  std::string device = "cpu";
  std::string comm = "auto";  // resolved to mpi or nccl by resolve_device_options
  bool check_equivalence = false;
  double timeout = -1;  // < 0: syncbn's default deadline
};

void add_options(CLI::App& app, Options& o) {
  app.add_option("--model", o.model, "network: mlp (784-128-BN-64-BN-10) or cnn (two conv-BN)")
      ->check(CLI::IsMember({"mlp", "cnn"}))
      ->capture_default_str();
  app.add_option("--bn", o.bn,
                 "batch norm: sync (syncbn, statistics of the global batch) or local "
                 "(torch::nn::BatchNorm, statistics of each rank's batch)")
      ->check(CLI::IsMember({"sync", "local"}))
      ->capture_default_str();
  app.add_option("--batch-per-rank", o.batch_per_rank, "samples per rank and step (b)")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--epochs", o.epochs, "passes over the training set")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--max-steps", o.max_steps, "stop after this many steps in total (0: no limit)")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  app.add_option("--lr", o.lr, "SGD learning rate")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--momentum", o.momentum, "SGD momentum")
      ->check(CLI::Range(0.0, 1.0))
      ->capture_default_str();
  app.add_option("--seed", o.seed, "seed of the initial parameters and of the data order")
      ->capture_default_str();
  app.add_option("--threads", o.threads,
                 "threads per rank for libtorch and syncbn (0: OMP_NUM_THREADS or the default)")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  app.add_option("--dtype", o.dtype, "data, parameters and statistics: float32 or float64")
      ->check(CLI::IsMember({"float32", "float64"}))
      ->capture_default_str();
  app.add_option("--data", o.data, "directory of the gzipped Fashion-MNIST IDX files")
      ->capture_default_str();
  app.add_option("--device", o.device,
                 "where the model runs: cpu, or cuda (one GPU per rank: the local rank modulo "
                 "the node's GPU count; needs a build with SYNCBN_WITH_CUDA and a CUDA libtorch)")
      ->check(CLI::IsMember({"cpu", "cuda"}))
      ->capture_default_str();
  app.add_option("--comm", o.comm,
                 "communication of batch norm and gradients: mpi, or nccl (--device cuda, a "
                 "build with SYNCBN_WITH_NCCL); auto: nccl for --device cuda when built with "
                 "NCCL, else mpi")
      ->check(CLI::IsMember({"auto", "mpi", "nccl"}))
      ->capture_default_str();
  app.add_option("--timeout", o.timeout,
                 "deadline in seconds of every syncbn collective (syncbn_comm_set_timeout; 0: "
                 "none). A rank whose peer stops answering gets SYNCBN_ERROR_TIMEOUT, prints it "
                 "and ends the job with a non-zero exit status. Default: SYNCBN_TIMEOUT_S, else "
                 "600")
      ->check(CLI::NonNegativeNumber);
  app.add_flag("--check-equivalence", o.check_equivalence,
               "rank 0 also trains a reference copy of the model in one process on the whole "
               "global batch, with torch::nn::BatchNorm1d/2d, from the same initial parameters, "
               "on the same samples with the same optimizer, and reports max_rel_param_diff: "
               "the maximum over parameter and buffer tensors of max|a - b| / max|b| (a: this "
               "run's model, b: the reference). At rounding level with --bn sync, not with "
               "--bn local (use with --max-steps)");
}

torch::Dtype dtype_of(const Options& o) {
  return o.dtype == "float64" ? torch::kFloat64 : torch::kFloat32;
}

// Resolves --comm auto and refuses what this build or machine cannot do, with the reason.
// mpi_thread_level: what MPI_Init_thread provided.
void resolve_device_options(Options& o, int mpi_thread_level) {
  if (o.comm == "auto") o.comm = (o.device == "cuda" && built_with_nccl()) ? "nccl" : "mpi";
  if (o.device == "cpu") {
    if (o.comm == "nccl") throw std::invalid_argument("--comm nccl needs --device cuda");
    return;
  }
  require_cuda("--device cuda");
  if (o.comm == "nccl" && !built_with_nccl()) {
    throw std::invalid_argument(
        "--comm nccl: this build has no NCCL support (configure syncbn with "
        "-DSYNCBN_WITH_NCCL=ON, NCCL found through NCCL_HOME); use --comm mpi");
  }
  if (o.comm == "mpi" && o.bn == "sync" && mpi_thread_level < MPI_THREAD_SERIALIZED) {
    throw std::runtime_error(
        "--device cuda --comm mpi --bn sync: syncbn's backward calls MPI from autograd's CUDA "
        "thread, which needs MPI_THREAD_SERIALIZED; this MPI provides only level " +
        std::to_string(mpi_thread_level) + " (use --comm nccl)");
  }
}

// ---- data ------------------------------------------------------------------------------------

struct Dataset {
  torch::Tensor images;  // (n, 1, 28, 28) float32 or float64, normalized
  torch::Tensor labels;  // (n) int64
  int64_t size() const { return labels.size(0); }
};

// The whole split on device (nothing is copied for the CPU).
Dataset on_device(Dataset d, const torch::Device& device) {
  d.images = d.images.to(device);
  d.labels = d.labels.to(device);
  return d;
}

Dataset to_tensors(FashionMnistSplit split, torch::Dtype dtype) {
  const auto uint8 = torch::TensorOptions(torch::kUInt8);
  const torch::Tensor pixels = torch::from_blob(
      split.pixels.data(), {split.count, 1, kFashionMnistRows, kFashionMnistCols}, uint8);
  const torch::Tensor labels = torch::from_blob(split.labels.data(), {split.count}, uint8);
  Dataset d;
  d.images = pixels.to(dtype).div_(255).sub_(kPixelMean).div_(kPixelStd);
  d.labels = labels.to(torch::kInt64);
  return d;
}

Dataset load_split(const std::string& dir, const std::string& split, torch::Dtype dtype) {
  try {
    return to_tensors(load_fashion_mnist(dir, split), dtype);
  } catch (const std::exception& e) {
    throw std::runtime_error(std::string("cannot load Fashion-MNIST: ") + e.what() +
                             " (install the Debian package dataset-fashion-mnist, or pass "
                             "--data DIR)");
  }
}

// The order of the training set in one epoch: the same on every rank for the same seed.
std::vector<int64_t> epoch_order(int64_t n, uint64_t seed, int epoch) {
  std::seed_seq seq{static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32),
                    static_cast<uint32_t>(epoch)};
  std::mt19937_64 rng(seq);
  std::vector<int64_t> order(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) order[static_cast<size_t>(i)] = i;
  for (int64_t i = n - 1; i > 0; --i) {  // Fisher-Yates, independent of the standard library's
    const auto j = static_cast<int64_t>(rng() % static_cast<uint64_t>(i + 1));
    std::swap(order[static_cast<size_t>(i)], order[static_cast<size_t>(j)]);
  }
  return order;
}

// ---- training --------------------------------------------------------------------------------

// A model with its optimizer.
struct Replica {
  torch::nn::Sequential model;
  std::unique_ptr<torch::optim::SGD> optimizer;
};

Replica make_replica(torch::nn::Sequential model, const Options& o) {
  auto sgd = torch::optim::SGDOptions(o.lr).momentum(o.momentum);
  auto optimizer = std::make_unique<torch::optim::SGD>(model->parameters(), sgd);
  return Replica{std::move(model), std::move(optimizer)};
}

// Averages the gradients of a model over the ranks.
using GradientAverager = std::function<void(torch::nn::Module&)>;

// One SGD step on samples indices[0, count) with the mean cross-entropy over them. With an
// averager, the gradients are averaged over the ranks before the step. Returns the loss (a
// scalar tensor; reading it on a GPU waits for the step).
torch::Tensor train_step(Replica& r, const Dataset& data, const int64_t* indices, int64_t count,
                         const GradientAverager& average_gradients) {
  const torch::Tensor index =
      torch::from_blob(const_cast<int64_t*>(indices), {count}, torch::kInt64)
          .to(data.images.device());
  const torch::Tensor x = data.images.index_select(0, index);
  const torch::Tensor y = data.labels.index_select(0, index);
  r.model->train();
  r.optimizer->zero_grad();
  const torch::Tensor loss = torch::nn::functional::cross_entropy(r.model->forward(x), y);
  loss.backward();
  if (average_gradients) average_gradients(*r.model);
  r.optimizer->step();
  return loss.detach();
}

// Test accuracy in evaluation mode: each rank classifies its share of the test set, and the
// counts of correct answers are summed.
double evaluate(torch::nn::Sequential& model, const Dataset& test, MPI_Comm comm) {
  torch::NoGradGuard no_grad;
  model->eval();
  const int64_t rank = mpi_rank(comm), ranks = mpi_size(comm), n = test.size();
  const int64_t end = n * (rank + 1) / ranks;
  int64_t correct = 0;
  for (int64_t begin = n * rank / ranks; begin < end; begin += kEvalBatch) {
    const int64_t count = std::min(kEvalBatch, end - begin);
    const torch::Tensor predicted = model->forward(test.images.narrow(0, begin, count)).argmax(1);
    correct += predicted.eq(test.labels.narrow(0, begin, count)).sum().item<int64_t>();
  }
  return static_cast<double>(allreduce_sum(correct, comm)) / static_cast<double>(n);
}

// ---- equivalence check -----------------------------------------------------------------------

using NamedTensors = torch::OrderedDict<std::string, torch::Tensor>;

NamedTensors state_of(const torch::nn::Module& m) {
  NamedTensors state = m.named_parameters();
  for (const auto& item : m.named_buffers()) state.insert(item.key(), item.value());
  return state;
}

const torch::Tensor& counterpart(const NamedTensors& state, const std::string& name) {
  const torch::Tensor* t = state.find(name);
  if (t == nullptr) throw std::logic_error("models differ: no tensor named " + name);
  return *t;
}

void copy_state(const torch::nn::Module& from, torch::nn::Module& to) {
  torch::NoGradGuard no_grad;
  const NamedTensors source = state_of(from);
  for (auto& item : state_of(to)) item.value().copy_(counterpart(source, item.key()));
}

// max over tensors of max|a - b| / max|b|, over parameters and buffers (running statistics,
// num_batches_tracked); a tensor whose reference is all zeros counts max|a - b|. NaN if either
// model holds a NaN or an infinity.
double max_relative_difference(const torch::nn::Module& a, const torch::nn::Module& reference) {
  const NamedTensors state = state_of(a);
  double worst = 0;
  for (const auto& item : state_of(reference)) {
    const torch::Tensor b = item.value().to(torch::kFloat64);
    const torch::Tensor diff = (counterpart(state, item.key()).to(torch::kFloat64) - b).abs();
    const double scale = b.abs().max().item<double>();
    const double max_diff = diff.max().item<double>();
    const double relative = scale > 0 ? max_diff / scale : max_diff;
    if (!std::isfinite(relative)) return NAN;
    worst = std::max(worst, relative);
  }
  return worst;
}

// ---- output ----------------------------------------------------------------------------------

// One JSON object on one line.
class JsonLine {
 public:
  JsonLine& add(const std::string& key, const std::string& value) {
    return raw(key, "\"" + value + "\"");
  }
  JsonLine& add(const std::string& key, int64_t value) { return raw(key, std::to_string(value)); }
  JsonLine& add(const std::string& key, double value) {
    std::ostringstream s;
    s.precision(7);
    s << value;
    return raw(key, std::isfinite(value) ? s.str() : "null");
  }
  std::string str() const { return "{" + body_.str() + "}"; }

 private:
  JsonLine& raw(const std::string& key, const std::string& value) {
    if (body_.tellp() > 0) body_ << ", ";
    body_ << "\"" << key << "\": " << value;
    return *this;
  }
  std::ostringstream body_;
};

class Stopwatch {
 public:
  double seconds() const {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  }

 private:
  std::chrono::steady_clock::time_point start_ = std::chrono::steady_clock::now();
};

// ---- the run ---------------------------------------------------------------------------------

struct RunResult {
  int64_t steps = 0;
  double train_loss = NAN;  // mean over the last epoch's steps and ranks
  double test_accuracy = NAN;
  double seconds = 0;
};

class Run {
 public:
  Run(const Options& o, MPI_Comm world)
      : o_(o),
        world_(world),
        rank_(mpi_rank(world)),
        ranks_(mpi_size(world)),
        device_(setup_device()),
        train_(on_device(load_split(o.data, "train", dtype_of(o)), device_)),
        test_(on_device(load_split(o.data, "t10k", dtype_of(o)), device_)) {
    steps_per_epoch_ = train_.size() / global_batch();
    if (steps_per_epoch_ == 0) {
      throw std::invalid_argument("global batch " + std::to_string(global_batch()) +
                                  " exceeds the training set (" +
                                  std::to_string(train_.size()) + " samples)");
    }
    torch::manual_seed(o.seed);
    torch::nn::Sequential model = make_model(o.model, batch_norm_factory());
    model->to(device_, dtype_of(o));
    model_.emplace(make_replica(model, o));
    broadcast_state(*model_->model, world_);
    if (o.check_equivalence && rank_ == 0) {
      torch::nn::Sequential copy = make_model(o.model, torch_batch_norm_factory());
      copy->to(device_, dtype_of(o));
      copy_state(*model_->model, *copy);
      reference_.emplace(make_replica(copy, o));
    }
  }

  RunResult train() {
    print_header();
    RunResult result;
    const Stopwatch total;
    for (int epoch = 1; epoch <= o_.epochs && !reached_max_steps(result.steps); ++epoch) {
      const Stopwatch clock;
      const auto [steps, loss_sum] = train_epoch(epoch, result.steps);
      result.steps += steps;
      result.train_loss = allreduce_sum(loss_sum, world_) / static_cast<double>(ranks_ * steps);
      result.test_accuracy = test_accuracy();
      print_epoch(epoch, steps, result, clock.seconds());
    }
    result.seconds = total.seconds();
    return result;
  }

  void report(const RunResult& r) {
    if (rank_ != 0) return;
    JsonLine json;
    json.add("ranks", int64_t{ranks_})
        .add("model", o_.model)
        .add("bn", o_.bn)
        .add("device", o_.device)
        .add("comm", o_.comm)
        .add("batch_per_rank", o_.batch_per_rank)
        .add("global_batch", global_batch())
        .add("steps", r.steps)
        .add("test_accuracy", r.test_accuracy)
        .add("train_loss", r.train_loss)
        .add("seconds", r.seconds);
    if (reference_) {
      json.add("max_rel_param_diff", max_relative_difference(*model_->model, *reference_->model));
    }
    std::printf("%s\n", json.str().c_str());
    std::fflush(stdout);
  }

 private:
  int64_t global_batch() const { return ranks_ * o_.batch_per_rank; }

  bool reached_max_steps(int64_t steps) const { return o_.max_steps > 0 && steps >= o_.max_steps; }

  // The CPU, or this rank's GPU made current: by the NCCL bootstrap for --comm nccl, else as
  // the bootstrap would choose it (local rank % device count).
  torch::Device setup_device() {
    if (o_.device == "cpu") return torch::kCPU;
#ifdef SYNCBN_EXAMPLE_NCCL
    if (o_.comm == "nccl") {
      nccl_ = std::make_unique<NcclCommunicator>(world_);
      return torch::Device(torch::kCUDA, static_cast<c10::DeviceIndex>(nccl_->device()));
    }
#endif
    return torch::Device(torch::kCUDA,
                         static_cast<c10::DeviceIndex>(select_local_cuda_device(world_)));
  }

  BatchNormFactory batch_norm_factory() {
    if (o_.bn == "local") return torch_batch_norm_factory();
#ifdef SYNCBN_EXAMPLE_NCCL
    if (nccl_) {
      comm_ = syncbn::nccl_communicator(nccl_->get());
      if (o_.timeout >= 0) comm_.set_timeout(o_.timeout);
      return sync_batch_norm_factory(comm_, device_);
    }
#endif
    comm_ = syncbn::mpi_communicator(world_);
    if (o_.timeout >= 0) comm_.set_timeout(o_.timeout);
    return sync_batch_norm_factory(comm_, device_);
  }

  // With NCCL, one ncclAllReduce on the GPU; with MPI, one MPI_Allreduce (of a host copy for
  // CUDA tensors).
  void average_gradients_over_ranks(torch::nn::Module& model) {
#ifdef SYNCBN_EXAMPLE_NCCL
    if (nccl_) return average_gradients(model, *nccl_);
#endif
    average_gradients(model, world_);
  }

  // On a GPU, once per step, where the step is waited for anyway (before reading the loss):
  // the errors that syncbn's CUDA plans over NCCL, and NCCL itself, only find on the device
  // (another rank's bad argument, a call mismatch, a failed peer). Throws if there is one.
  void check_device_errors(int64_t step) {
    if (!device_.is_cuda()) return;
    try {
      check_async_errors(*model_->model);  // waits for the legacy default stream
#ifdef SYNCBN_EXAMPLE_NCCL
      if (nccl_) nccl_->check_async_error();
#endif
    } catch (const std::exception& e) {
      throw std::runtime_error("step " + std::to_string(step) +
                               ": error reported by the device: " + e.what());
    }
  }

  // Returns the number of steps taken and the sum of this rank's losses.
  std::pair<int64_t, double> train_epoch(int epoch, int64_t steps_before) {
    const std::vector<int64_t> order = epoch_order(train_.size(), o_.seed, epoch);
    const int64_t b = o_.batch_per_rank;
    int64_t steps = 0;
    double loss_sum = 0;
    for (; steps < steps_per_epoch_ && !reached_max_steps(steps_before + steps); ++steps) {
      const int64_t* global = order.data() + steps * global_batch();
      const torch::Tensor loss =
          train_step(*model_, train_, global + rank_ * b, b,
                     [this](torch::nn::Module& m) { average_gradients_over_ranks(m); });
      check_device_errors(steps_before + steps + 1);
      loss_sum += loss.item<double>();
      if (reference_) train_step(*reference_, train_, global, global_batch(), nullptr);
    }
    return {steps, loss_sum};
  }

  double test_accuracy() {
    // With per-rank batch norm the running statistics differ between ranks; evaluate with
    // rank 0's, as torch's DistributedDataParallel (broadcast_buffers) would. Synchronized ones
    // are identical on every rank already.
    if (o_.bn == "local") broadcast_buffers(*model_->model, world_);
    return evaluate(model_->model, test_, world_);
  }

  void print_header() const {
    if (rank_ != 0) return;
    std::printf("train_fashion_mnist: %d ranks x batch %lld = global batch %lld, model %s, bn %s, "
                "device %s, comm %s, lr %g, momentum %g, %lld steps/epoch, %d threads/rank\n",
                ranks_, static_cast<long long>(o_.batch_per_rank),
                static_cast<long long>(global_batch()), o_.model.c_str(), o_.bn.c_str(),
                o_.device.c_str(), o_.comm.c_str(), o_.lr, o_.momentum,
                static_cast<long long>(steps_per_epoch_), torch::get_num_threads());
    std::fflush(stdout);
  }

  void print_epoch(int epoch, int64_t steps, const RunResult& r, double seconds) const {
    if (rank_ != 0) return;
    std::printf("epoch %d  steps %lld  train_loss %.4f  test_accuracy %.4f  seconds %.1f\n",
                epoch, static_cast<long long>(steps), r.train_loss, r.test_accuracy, seconds);
    std::fflush(stdout);
  }

  const Options o_;
  const MPI_Comm world_;
  const int rank_;
  const int ranks_;
#ifdef SYNCBN_EXAMPLE_NCCL
  // --comm nccl. Declared before everything made from it, so that it is destroyed last.
  std::unique_ptr<NcclCommunicator> nccl_;
#endif
  const torch::Device device_;
  const Dataset train_;
  const Dataset test_;
  int64_t steps_per_epoch_ = 0;
  syncbn::Communicator comm_;           // --bn sync only
  std::optional<Replica> model_;        // this rank's replica
  std::optional<Replica> reference_;    // --check-equivalence, rank 0 only
};

void configure_threads(int threads) {
  if (threads <= 0) return;
  torch::set_num_threads(threads);
  omp_set_num_threads(threads);  // syncbn's kernels
}

// MPI_Init_thread .. MPI_Finalize. MPI calls are made by one thread at a time: the main
// thread, except that with --device cuda --comm mpi syncbn's backward allreduce runs on
// autograd's CUDA worker thread while the main thread waits in backward(), hence
// MPI_THREAD_SERIALIZED.
class MpiSession {
 public:
  MpiSession(int* argc, char*** argv) {
    MPI_Init_thread(argc, argv, MPI_THREAD_SERIALIZED, &provided_);
  }
  ~MpiSession() { MPI_Finalize(); }
  MpiSession(const MpiSession&) = delete;
  MpiSession& operator=(const MpiSession&) = delete;
  int provided() const { return provided_; }

 private:
  int provided_ = MPI_THREAD_SINGLE;
};

// A rank that fails cannot leave the others waiting in a collective: abort them all. (A syncbn
// deadline that passed, SYNCBN_ERROR_TIMEOUT, arrives here as any other error: its message says
// which layer, call and rank waited, and for how long.)
int fail(int rank, const char* message) {
  std::fprintf(stderr, "train_fashion_mnist: rank %d: error: %s\n", rank, message);
  std::fflush(stderr);
  if (mpi_size(MPI_COMM_WORLD) > 1) MPI_Abort(MPI_COMM_WORLD, 1);
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  MpiSession mpi(&argc, &argv);
  const int rank = mpi_rank(MPI_COMM_WORLD);
  Options options;
  CLI::App app{"Data-parallel Fashion-MNIST training with synchronized batch norm (syncbn)"};
  add_options(app, options);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return rank == 0 ? app.exit(e) : e.get_exit_code();  // every rank parsed the same argv
  }
  // Outlives the handlers below, so that a failed rank aborts the job before it tears down
  // communicators its peers may still be waiting in.
  std::unique_ptr<Run> run;
  try {
    configure_threads(options.threads);
    resolve_device_options(options, mpi.provided());
    run = std::make_unique<Run>(options, MPI_COMM_WORLD);
    run->report(run->train());
    run.reset();
    return 0;
  } catch (const c10::Error& e) {
    return fail(rank, e.what_without_backtrace());
  } catch (const std::exception& e) {
    return fail(rank, e.what());
  }
}
