// A randomized agreement test (label "faults"): 1000 collective calls, forward_training and
// backward in turn, on a few CPU plans of different dtypes, layouts, channel counts and momenta,
// with uneven per-rank batches (N = 0 on some ranks). At each call a PRNG shared by all ranks
// (same seed everywhere) picks either no fault, or an empty global batch, or one rank and one bad
// argument for that rank. Every call checks that
//   - every rank returns the same status (the statuses allgathered with MPI);
//   - the status is the expected one: SUCCESS, INVALID_ARGUMENT for an injected fault,
//     BATCH_TOO_SMALL for an empty global batch (or m == 1 in training);
//   - on failure, the message names the faulty rank and the argument (on every rank), and
//     running statistics, num_batches_tracked and the call's outputs are bitwise unchanged;
//   - on success, the outputs match the fp64 reference of the global batch (every rank knows the
//     whole batch: all ranks draw every rank's data from the shared data PRNG and keep their own
//     slice), num_batches_tracked advanced by one, and the running statistics agree bitwise
//     across ranks.
// At the end, running statistics and num_batches_tracked are bitwise identical across ranks.
//
// Seed: SYNCBN_AGREEMENT_SEED (decimal) if set, else a fixed default; rank 0's value is
// broadcast, and printed, so a failing run can be replayed.
//
// Every library call and every MPI collective is made by every rank, in an order that depends on
// the shared PRNG only (never on a check's outcome), so a wrong library fails by assertion, and
// a library that leaves a rank waiting fails by the watchdog or the ctest TIMEOUT.
#include <gtest/gtest.h>
#include <mpi.h>

#include <chrono>
#include <cinttypes>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "mpi_helpers.hpp"
#include "reference.hpp"
#include "syncbn/syncbn.h"
#include "syncbn/syncbn_mpi.h"

namespace {

using namespace syncbn_test;

constexpr int kCalls = 1000;
constexpr uint32_t kDefaultSeed = 20261202u;
const double kCumulative = SYNCBN_MOMENTUM_CUMULATIVE;
void* const kBogusStream = reinterpret_cast<void*>(uintptr_t{0x1000});

// The shared PRNG: the same draws on every rank.
class Shared {
 public:
  explicit Shared(uint32_t seed) : gen_(seed) {}
  int below(int n) { return static_cast<int>(std::uniform_int_distribution<int>(0, n - 1)(gen_)); }
  int between(int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(gen_); }
  double unit() { return std::uniform_real_distribution<double>(0.0, 1.0)(gen_); }
  uint32_t next() { return static_cast<uint32_t>(gen_()); }

 private:
  std::mt19937 gen_;
};

uint32_t agreement_seed() {
  uint32_t seed = kDefaultSeed;
  if (const char* s = std::getenv("SYNCBN_AGREEMENT_SEED"); s && *s)
    seed = static_cast<uint32_t>(std::strtoul(s, nullptr, 10));
  MPI_Bcast(&seed, 1, MPI_UINT32_T, 0, MPI_COMM_WORLD);
  return seed;
}

// ---- what can go wrong at a call --------------------------------------------------------------

enum class Fault {
  none,
  empty_global,      // every rank N = 0
  null_x,
  null_y,
  null_weight,
  null_bias,
  null_running_mean,
  null_running_var,
  null_dy,
  null_dx,
  null_save_mean,
  null_save_invstd,
  null_shape,
  wrong_channels,
  negative_dim,
  ndim_range,
  stream,
  negative_nbt,
  reject,
};

const char* fault_name(Fault f) {
  switch (f) {
    case Fault::none: return "none";
    case Fault::empty_global: return "empty global batch";
    case Fault::null_x: return "x null";
    case Fault::null_y: return "y null";
    case Fault::null_weight: return "weight null";
    case Fault::null_bias: return "bias null";
    case Fault::null_running_mean: return "running_mean null";
    case Fault::null_running_var: return "running_var null";
    case Fault::null_dy: return "dy null";
    case Fault::null_dx: return "dx null";
    case Fault::null_save_mean: return "save_mean null";
    case Fault::null_save_invstd: return "save_invstd null";
    case Fault::null_shape: return "shape null";
    case Fault::wrong_channels: return "wrong channel dimension";
    case Fault::negative_dim: return "negative dimension";
    case Fault::ndim_range: return "ndim out of range";
    case Fault::stream: return "non-NULL stream";
    case Fault::negative_nbt: return "negative num_batches_tracked";
    case Fault::reject: return "syncbn_plan_reject_call";
  }
  return "?";
}

// The argument a fault's message must name (after "rank R: ").
const char* fault_word(Fault f) {
  switch (f) {
    case Fault::null_x: return "x is null";
    case Fault::null_y: return "y is null";
    case Fault::null_weight: return "weight is null";
    case Fault::null_bias: return "bias is null";
    case Fault::null_running_mean: return "running_mean is null";
    case Fault::null_running_var: return "running_var is null";
    case Fault::null_dy: return "dy is null";
    case Fault::null_dx: return "dx is null";
    case Fault::null_save_mean: return "save_mean is null";
    case Fault::null_save_invstd: return "save_invstd is null";
    case Fault::null_shape: return "shape is null";
    case Fault::wrong_channels: return "shape";
    case Fault::negative_dim: return "shape";
    case Fault::ndim_range: return "ndim";
    case Fault::stream: return "stream";
    case Fault::negative_nbt: return "num_batches_tracked";
    default: return "";
  }
}

// syncbn_plan_reject_call's arguments and what every rank's message then says.
const char* const kRejectArgs[] = {"x",          "dy",          "weight",    "bias",
                                   "running_mean", "running_var", "num_batches_tracked",
                                   "save_mean",  "save_invstd", "y",         "dx",
                                   "dweight",    "dbias",       "no such argument"};
struct ProblemText {
  syncbn_problem_t problem;
  const char* text;
};
const ProblemText kProblems[] = {
    {SYNCBN_PROBLEM_DTYPE, " is not of the plan's dtype"},
    {SYNCBN_PROBLEM_DEVICE, " is not in the memory of the plan's device"},
    {SYNCBN_PROBLEM_LAYOUT, " is not dense in the plan's layout"},
    {SYNCBN_PROBLEM_SHAPE, " has a shape other than the call's"},
    {static_cast<syncbn_problem_t>(77), " was rejected by the caller"},
};

// One call as the shared PRNG drew it: the same on every rank.
struct Draw {
  bool backward = false;
  Fault fault = Fault::none;
  int bad_rank = -1;
  // wrong_channels / negative_dim: which dimension and its value; ndim_range: the ndim.
  int dim = 0;
  int64_t value = 0;
  int reject_arg = 0, reject_problem = 0;
  syncbn_status_t expected = SYNCBN_SUCCESS;
  std::string words;  // what every rank's message must contain (failure by fault)
};

// ---- the plans --------------------------------------------------------------------------------

struct PlanSpec {
  const char* name;
  syncbn_dtype_t dtype;
  syncbn_layout_t layout;
  int64_t channels;
  int spatial_dims;  // 0 to 3: ndim = 2 + spatial_dims
  double momentum;
  bool affine;
  bool global_grads;
};

const PlanSpec kPlans[] = {
    {"fp32 CF C=3 (N,C,L) momentum 0.1", SYNCBN_FLOAT32, SYNCBN_CHANNELS_FIRST, 3, 1, 0.1, true,
     false},
    {"fp64 CL C=16 (N,H,W,C) cumulative", SYNCBN_FLOAT64, SYNCBN_CHANNELS_LAST, 16, 2, kCumulative,
     true, true},
    {"fp32 CL C=7 (N,C) cumulative", SYNCBN_FLOAT32, SYNCBN_CHANNELS_LAST, 7, 0, kCumulative, true,
     false},
    {"fp64 CF C=5 (N,C,D,H,W) momentum 0.3 no affine", SYNCBN_FLOAT64, SYNCBN_CHANNELS_FIRST, 5, 3,
     0.3, false, false},
    {"fp32 CF C=11 (N,C,H,W) cumulative", SYNCBN_FLOAT32, SYNCBN_CHANNELS_FIRST, 11, 2,
     kCumulative, true, true},
    {"fp32 CL C=4 (N,L,C) momentum 0.5", SYNCBN_FLOAT32, SYNCBN_CHANNELS_LAST, 4, 1, 0.5, true,
     false},
};
constexpr int kNumPlans = static_cast<int>(sizeof(kPlans) / sizeof(kPlans[0]));

// Totals over the run, for the summary line.
struct Tally {
  int calls = 0, forward = 0, backward = 0, success = 0, invalid = 0, too_small = 0,
      reference_checks = 0;
  int by_fault[static_cast<int>(Fault::reject) + 1] = {};
};

class Layer {
 public:
  virtual ~Layer() = default;
  virtual const PlanSpec& spec() const = 0;
  virtual bool has_saved() const = 0;
  // COLLECTIVE: one call of the shared draw (the layer draws its own shapes and data).
  virtual void call(Shared& ctl, Shared& data, bool backward, Tally& tally, int index) = 0;
  // COLLECTIVE: running statistics and num_batches_tracked agree bitwise across ranks.
  virtual void expect_state_agrees(const std::string& when) = 0;
};

template <class T>
class TypedLayer final : public Layer {
 public:
  TypedLayer(syncbn_comm_t comm, const PlanSpec& spec, uint32_t seed)
      : spec_(spec), rank_(world_rank()), P_(world_size()) {
    const syncbn_config_t cfg = make_cfg(spec.channels, spec.dtype, spec.layout, spec.affine,
                                         true, spec.momentum, 1e-5, spec.global_grads);
    eps_ = cfg.eps;
    syncbn_plan_t p = nullptr;
    const syncbn_status_t s = syncbn_plan_create(comm, &cfg, &p);
    EXPECT_EQ(s, SYNCBN_SUCCESS) << rank_tag() << ": " << spec.name << ": "
                                 << syncbn_last_error();
    plan_.reset(s == SYNCBN_SUCCESS ? p : nullptr);
    Rng common(seed);
    st_ = LayerState<T>::random(spec.channels, common);
  }

  const PlanSpec& spec() const override { return spec_; }
  bool has_saved() const override { return saved_; }

  void call(Shared& ctl, Shared& data, bool backward, Tally& tally, int index) override {
    Draw d;
    d.backward = backward;
    const size_t C = static_cast<size_t>(spec_.channels);

    // ---- shapes: every rank's geometry (the same draws everywhere)
    std::vector<Geometry> geo;
    if (backward) {
      geo = saved_geo_;  // the shapes of the forward whose statistics backward uses
    } else {
      std::vector<int64_t> spatial;
      for (int i = 0; i < spec_.spatial_dims; ++i) spatial.push_back(ctl.between(1, 4));
      for (int r = 0; r < P_; ++r) {
        const int64_t n = ctl.unit() < 0.3 ? 0 : ctl.between(1, 4);
        geo.push_back(make_geometry(spec_.layout, n, spec_.channels, spatial));
      }
    }

    // ---- the fault
    const double u = ctl.unit();
    if (u < 0.45) {
      d.fault = Fault::none;
    } else if (u < 0.52) {
      d.fault = Fault::empty_global;
      for (auto& g : geo) g.n = 0;
    } else {
      d.bad_rank = ctl.below(P_);
      std::vector<Fault> kinds = {Fault::null_shape, Fault::wrong_channels, Fault::negative_dim,
                                  Fault::ndim_range, Fault::stream,         Fault::reject};
      const bool has_data = geo[d.bad_rank].numel() > 0;
      if (backward) {
        if (has_data) kinds.insert(kinds.end(), {Fault::null_x, Fault::null_dy, Fault::null_dx});
        if (spec_.affine) kinds.push_back(Fault::null_weight);
        kinds.insert(kinds.end(), {Fault::null_save_mean, Fault::null_save_invstd});
      } else {
        // x and y are required only where the local tensor is not empty: make it so half the
        // time, so that the null data pointers get their turn.
        if (!has_data && ctl.unit() < 0.5) geo[d.bad_rank].n = ctl.between(1, 3);
        if (geo[d.bad_rank].numel() > 0) kinds.insert(kinds.end(), {Fault::null_x, Fault::null_y});
        if (spec_.affine) kinds.insert(kinds.end(), {Fault::null_weight, Fault::null_bias});
        kinds.insert(kinds.end(),
                     {Fault::null_running_mean, Fault::null_running_var, Fault::negative_nbt});
      }
      d.fault = kinds[ctl.below(static_cast<int>(kinds.size()))];
      const int ndim = geo[0].ndim();
      const int channel_dim = spec_.layout == SYNCBN_CHANNELS_LAST ? ndim - 1 : 1;
      if (d.fault == Fault::wrong_channels) {
        d.dim = channel_dim;
        const int64_t wrong[] = {spec_.channels + 1, spec_.channels - 1, 0, 2 * spec_.channels};
        d.value = wrong[ctl.below(4)];
        if (d.value == spec_.channels) d.value = spec_.channels + 2;  // C = 1 would leave 0 = 0
      } else if (d.fault == Fault::negative_dim) {
        do d.dim = ctl.below(ndim);
        while (d.dim == channel_dim);
        d.value = -ctl.between(1, 5);
      } else if (d.fault == Fault::ndim_range) {
        const int bad[] = {0, 1, 6, 7, -1};
        d.value = bad[ctl.below(5)];
      } else if (d.fault == Fault::negative_nbt) {
        d.value = -ctl.between(1, 1000);
      } else if (d.fault == Fault::reject) {
        d.reject_arg = ctl.below(static_cast<int>(sizeof(kRejectArgs) / sizeof(kRejectArgs[0])));
        d.reject_problem = ctl.below(static_cast<int>(sizeof(kProblems) / sizeof(kProblems[0])));
      }
    }

    // ---- data: every rank's tensors from the shared data PRNG; this rank keeps its own
    ChannelValues X, DY;
    std::vector<T> x, dy;
    for (int r = 0; r < P_; ++r) {
      Rng rr(data.next());
      const auto dist = ChannelDistribution::random(spec_.channels, rr);
      auto xr = backward ? std::vector<T>() : random_batch<T>(geo[r], rr, dist);
      auto dyr = backward ? random_batch<T>(geo[r], rr) : std::vector<T>();
      if (backward) {
        append(DY, gather(geo[r], dyr.data()));
      } else {
        append(X, gather(geo[r], xr.data()));
      }
      if (r == rank_) {
        x = std::move(xr);
        dy = std::move(dyr);
      }
    }
    const Geometry g = geo[rank_];
    if (backward) {
      // backward uses the forward's input, on every rank; an empty global batch empties it.
      const bool empty = d.fault == Fault::empty_global;
      x = empty ? std::vector<T>() : saved_x_;
      X = empty ? ChannelValues(C) : saved_X_;
    }

    // ---- expected status
    int64_t m = 0;
    for (const auto& gr : geo) m += gr.count_per_channel();
    if (d.fault == Fault::none || d.fault == Fault::empty_global) {
      d.expected = (m == 0 || (!backward && m == 1)) ? SYNCBN_ERROR_BATCH_TOO_SMALL
                                                     : SYNCBN_SUCCESS;
    } else {
      d.expected = SYNCBN_ERROR_INVALID_ARGUMENT;
      const std::string who = "rank " + std::to_string(d.bad_rank) + ": ";
      d.words = d.fault == Fault::reject
                    ? who + (d.reject_arg == 13 ? "an argument" : kRejectArgs[d.reject_arg]) +
                          kProblems[d.reject_problem].text
                    : who + fault_word(d.fault);
    }

    // ---- this rank's arguments, broken where it is the faulty rank
    const bool bad = rank_ == d.bad_rank;
    std::vector<int64_t> shape = g.shape();
    shape.resize(8, 1);  // room for ndim up to 7
    int ndim = g.ndim();
    std::vector<T> y(x.size(), T(-777)), save_mean(C, T(-777)), save_invstd(C, T(-777));
    std::vector<T> dx(x.size(), T(-555)), dweight(C, T(-555)), dbias(C, T(-555));
    const std::vector<T> y0 = y, sm0 = save_mean, si0 = save_invstd, dx0 = dx, dw0 = dweight,
                         db0 = dbias;
    const LayerState<T> before = st_;
    int64_t bad_nbt = d.value;
    const auto data_ptr = [](auto& v) { return v.empty() ? nullptr : v.data(); };
    const T* a_x = data_ptr(x);
    const T* a_dy = data_ptr(dy);
    T* a_y = data_ptr(y);
    T* a_dx = data_ptr(dx);
    const T* a_weight = spec_.affine ? st_.weight.data() : nullptr;
    const T* a_bias = spec_.affine ? st_.bias.data() : nullptr;
    T* a_rm = st_.running_mean.data();
    T* a_rv = st_.running_var.data();
    int64_t* a_nbt = &st_.num_batches_tracked;
    const T* a_bsm = saved_mean_.data();
    const T* a_bsi = saved_invstd_.data();
    const int64_t* a_shape = shape.data();
    void* a_stream = nullptr;
    if (bad) {
      switch (d.fault) {
        case Fault::null_x: a_x = nullptr; break;
        case Fault::null_y: a_y = nullptr; break;
        case Fault::null_weight: a_weight = nullptr; break;
        case Fault::null_bias: a_bias = nullptr; break;
        case Fault::null_running_mean: a_rm = nullptr; break;
        case Fault::null_running_var: a_rv = nullptr; break;
        case Fault::null_dy: a_dy = nullptr; break;
        case Fault::null_dx: a_dx = nullptr; break;
        case Fault::null_save_mean: a_bsm = nullptr; break;
        case Fault::null_save_invstd: a_bsi = nullptr; break;
        case Fault::null_shape: a_shape = nullptr; break;
        case Fault::wrong_channels:
        case Fault::negative_dim: shape[d.dim] = d.value; break;
        case Fault::ndim_range: ndim = static_cast<int>(d.value); break;
        case Fault::stream: a_stream = kBogusStream; break;
        case Fault::negative_nbt: a_nbt = &bad_nbt; break;
        default: break;
      }
    }

    // ---- the call
    syncbn_status_t s;
    if (bad && d.fault == Fault::reject) {
      s = syncbn_plan_reject_call(plan_.get(),
                                  backward ? SYNCBN_CALL_BACKWARD : SYNCBN_CALL_FORWARD_TRAINING,
                                  d.reject_arg == 13 ? "no such argument" : kRejectArgs[d.reject_arg],
                                  kProblems[d.reject_problem].problem, "detail of the faulty rank",
                                  nullptr);
    } else if (backward) {
      s = syncbn_backward(plan_.get(), ndim, a_shape, a_x, a_dy, a_weight, a_bsm, a_bsi, a_dx,
                          spec_.affine ? dweight.data() : nullptr,
                          spec_.affine ? dbias.data() : nullptr, a_stream);
    } else {
      s = syncbn_forward_training(plan_.get(), ndim, a_shape, a_x, a_weight, a_bias, a_y,
                                  save_mean.data(), save_invstd.data(), a_rm, a_rv, a_nbt,
                                  a_stream);
    }
    const std::string msg = syncbn_last_error();

    ++tally.calls;
    ++tally.by_fault[static_cast<int>(d.fault)];
    ++(backward ? tally.backward : tally.forward);
    ++(d.expected == SYNCBN_SUCCESS ? tally.success
       : d.expected == SYNCBN_ERROR_INVALID_ARGUMENT ? tally.invalid
                                                     : tally.too_small);

    std::string where = "call #" + std::to_string(index) + " " +
                        (backward ? "backward" : "forward_training") + " on " + spec_.name +
                        ", local " + g.str() + ", fault: " + fault_name(d.fault);
    if (d.bad_rank >= 0) where += " on rank " + std::to_string(d.bad_rank);
    SCOPED_TRACE(rank_tag() + ", " + where);

    // ---- every rank returns the same status, and the expected one
    std::vector<int> all(static_cast<size_t>(P_));
    const int mine = static_cast<int>(s);
    MPI_Allgather(&mine, 1, MPI_INT, all.data(), 1, MPI_INT, MPI_COMM_WORLD);
    std::string statuses;
    bool same = true;
    for (int r = 0; r < P_; ++r) {
      statuses += (r ? ", " : "") + std::string(syncbn_status_string(
                                        static_cast<syncbn_status_t>(all[r])));
      same = same && all[r] == all[0];
    }
    EXPECT_TRUE(same) << "ranks disagree on the status: " << statuses << " (this rank: " << msg
                      << ")";
    EXPECT_EQ(s, d.expected) << msg;

    if (d.expected != SYNCBN_SUCCESS) {
      // ---- a failed call: the message, and nothing changed anywhere
      if (d.expected == SYNCBN_ERROR_INVALID_ARGUMENT) {
        EXPECT_NE(msg.find(d.words), std::string::npos)
            << "message '" << msg << "' does not contain '" << d.words << "'";
        if (d.fault == Fault::reject) {
          EXPECT_EQ(msg.find("detail of the faulty rank") != std::string::npos, bad)
              << "the detail belongs in the faulty rank's message only: '" << msg << "'";
        }
      }
      EXPECT_TRUE(bitwise_equal("running_mean", st_.running_mean, before.running_mean));
      EXPECT_TRUE(bitwise_equal("running_var", st_.running_var, before.running_var));
      EXPECT_EQ(st_.num_batches_tracked, before.num_batches_tracked) << "num_batches_tracked";
      if (d.fault == Fault::negative_nbt && bad) {
        EXPECT_EQ(bad_nbt, d.value) << "the negative num_batches_tracked passed";
      }
      EXPECT_TRUE(bitwise_equal("y", y, y0));
      EXPECT_TRUE(bitwise_equal("save_mean", save_mean, sm0));
      EXPECT_TRUE(bitwise_equal("save_invstd", save_invstd, si0));
      EXPECT_TRUE(bitwise_equal("dx", dx, dx0));
      EXPECT_TRUE(bitwise_equal("dweight", dweight, dw0));
      EXPECT_TRUE(bitwise_equal("dbias", dbias, db0));
    } else if (!backward) {
      // ---- a successful forward against the reference of the global batch
      ++tally.reference_checks;
      const BatchStats stats = batch_stats(X, eps_);
      const auto w = effective_weight(spec_.affine, st_.weight);
      const auto b = effective_bias(spec_.affine, st_.bias);
      EXPECT_TRUE(all_close("y", y, normalize(g, x.data(), stats.mean, stats.invstd, w, b),
                            Tolerances<T>::data));
      EXPECT_TRUE(all_close("save_mean", save_mean, stats.mean,
                            scaled(Tolerances<T>::stats, stats.abs_mean)));
      EXPECT_TRUE(all_close("save_invstd", save_invstd, stats.invstd,
                            Tol{Tolerances<T>::stats, {}}));
      // Running statistics: one reference update from the state before this call.
      LayerState<T> ref = before;
      update_running(ref, stats, spec_.momentum);
      std::vector<double> rm_scale;
      for (size_t c = 0; c < C; ++c)
        rm_scale.push_back(std::fabs(static_cast<double>(before.running_mean[c])) +
                           stats.abs_mean[c]);
      EXPECT_TRUE(all_close("running_mean", st_.running_mean, to_double(ref.running_mean),
                            scaled(Tolerances<T>::stats, rm_scale)));
      EXPECT_TRUE(all_close("running_var", st_.running_var, to_double(ref.running_var),
                            Tol{Tolerances<T>::stats, {}}));
      EXPECT_EQ(st_.num_batches_tracked, before.num_batches_tracked + 1);
      saved_ = true;
      saved_geo_ = geo;
      saved_x_ = x;
      saved_X_ = std::move(X);
      saved_mean_ = save_mean;
      saved_invstd_ = save_invstd;
    } else {
      // ---- a successful backward against the reference
      ++tally.reference_checks;
      const std::vector<double> mean = to_double(saved_mean_), invstd = to_double(saved_invstd_);
      const GradSums global = grad_sums(X, DY, mean);
      const GradSums local = grad_sums(gather(g, x.data()), gather(g, dy.data()), mean);
      const auto w = effective_weight(spec_.affine, st_.weight);
      EXPECT_TRUE(all_close("dx", dx, grad_input(g, x.data(), dy.data(), w, mean, invstd, global),
                            Tolerances<T>::data));
      if (spec_.affine) {
        const GradSums& sums = spec_.global_grads ? global : local;
        EXPECT_TRUE(all_close("dweight", dweight, grad_weight(sums, invstd),
                              scaled(Tolerances<T>::sums, grad_weight_scale(sums, invstd))));
        EXPECT_TRUE(all_close("dbias", dbias, sums.sum_g, scaled(Tolerances<T>::sums, sums.abs_g)));
      }
      EXPECT_TRUE(bitwise_equal("running_mean (backward)", st_.running_mean, before.running_mean));
      EXPECT_TRUE(bitwise_equal("running_var (backward)", st_.running_var, before.running_var));
    }
    expect_state_agrees("after " + where);
  }

  void expect_state_agrees(const std::string& when) override {
    EXPECT_TRUE(same_as_rank0("running_mean", st_.running_mean, MPI_COMM_WORLD))
        << rank_tag() << ", " << spec_.name << ", " << when;
    EXPECT_TRUE(same_as_rank0("running_var", st_.running_var, MPI_COMM_WORLD))
        << rank_tag() << ", " << spec_.name << ", " << when;
    EXPECT_TRUE(same_as_rank0("num_batches_tracked",
                              std::vector<int64_t>{st_.num_batches_tracked}, MPI_COMM_WORLD))
        << rank_tag() << ", " << spec_.name << ", " << when;
  }

 private:
  PlanSpec spec_;
  int rank_, P_;
  double eps_ = 1e-5;
  PlanHandle plan_;
  LayerState<T> st_;
  // The last successful forward: every rank's shapes, this rank's x, the global batch, and the
  // statistics it saved (backward's inputs).
  bool saved_ = false;
  std::vector<Geometry> saved_geo_;
  std::vector<T> saved_x_;
  ChannelValues saved_X_;
  std::vector<T> saved_mean_, saved_invstd_;
};

TEST(Agreement, RandomFaultsOverManyCalls) {
  const uint32_t seed = agreement_seed();
  if (world_rank() == 0) {
    std::printf("[ agreement] seed %" PRIu32 " (override with SYNCBN_AGREEMENT_SEED), %d calls, %d "
                "rank(s), %d plans\n",
                seed, kCalls, world_size(), kNumPlans);
    std::fflush(stdout);
  }
  CommHandle comm = world_comm();
  std::vector<std::unique_ptr<Layer>> layers;
  for (int i = 0; i < kNumPlans; ++i) {
    const uint32_t s = seed * 31u + static_cast<uint32_t>(i);
    if (kPlans[i].dtype == SYNCBN_FLOAT64) {
      layers.push_back(std::make_unique<TypedLayer<double>>(comm.get(), kPlans[i], s));
    } else {
      layers.push_back(std::make_unique<TypedLayer<float>>(comm.get(), kPlans[i], s));
    }
  }

  Shared ctl(seed), data(seed ^ 0x9e3779b9u);
  Tally tally;
  const auto t0 = std::chrono::steady_clock::now();
  int last_forward = -1;
  for (int i = 0; i < kCalls; ++i) {
    bool backward = i % 2 == 1;
    int p = -1;
    if (backward) {
      // The plan of the previous forward if it saved statistics, else any plan that has some.
      if (last_forward >= 0 && layers[last_forward]->has_saved() && ctl.unit() < 0.7) {
        p = last_forward;
      } else {
        std::vector<int> with;
        for (int k = 0; k < kNumPlans; ++k)
          if (layers[k]->has_saved()) with.push_back(k);
        if (with.empty())
          backward = false;
        else
          p = with[ctl.below(static_cast<int>(with.size()))];
      }
    }
    if (!backward) {
      p = ctl.below(kNumPlans);
      last_forward = p;
    }
    layers[p]->call(ctl, data, backward, tally, i);
  }
  for (auto& l : layers) l->expect_state_agrees("at the end");
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (world_rank() == 0) {
    std::printf("[ agreement] %d calls (%d forward, %d backward) in %.2f s: %d success, %d "
                "INVALID_ARGUMENT, %d BATCH_TOO_SMALL expected; %d reference checks\n",
                tally.calls, tally.forward, tally.backward, s, tally.success, tally.invalid,
                tally.too_small, tally.reference_checks);
    std::string faults;
    for (int f = 0; f <= static_cast<int>(Fault::reject); ++f)
      faults += std::string(f ? ", " : "") + fault_name(static_cast<Fault>(f)) + " " +
                std::to_string(tally.by_fault[f]);
    std::printf("[ agreement] faults: %s\n", faults.c_str());
    std::fflush(stdout);
  }
}

}  // namespace
