// tests/scenarios.hpp: the correctness scenarios and their one runner. Every suite that checks a
// group's outputs against the single-process fp64 reference over the global batch (the
// concatenation of every rank's per-channel values) runs this table with this runner:
//   - MPI ranks, CPU plans (test_mpi_correctness.cpp);
//   - MPI ranks, CUDA plans over the MPI or NCCL communicator (test_cuda_mpi.cpp,
//     test_cuda_nccl.cpp through cuda_scenarios.hpp);
//   - threads as ranks, CPU plans over syncbn_comm_create_custom (test_thread_scenarios.cpp).
// On every rank, y, dx, save_mean, save_invstd and the running statistics equal the reference
// over the group's global batch, dweight / dbias the reference over the rank's own slice (or the
// group's, with global_param_grads) and sum to the group's, and the statistics are bitwise
// identical across the ranks of a group after every step.
//
// The runner is a template over two policies:
//   Memory (M): where tensors live. HostMemory<T> below (CPU plans); DeviceMemory<S> in
//     cuda_helpers.hpp (CUDA plans). Its storage type S and parameter type P, the dtype, the
//     plan's device, the tolerances (data, stats, sums), arrays Array<X> (n elements, or a copy
//     of a host vector; data(), size(), fill(), download()), a layer's State in that memory
//     (made from a LayerState<P>; download()), a Stream, the rounding of the reference's inputs
//     to S, and finish(plan, stream, what): wait for a call's work, no error may be recorded.
//   Ranks (R): who the ranks are and how the test itself compares them. MpiRanks in
//     mpi_helpers.hpp, ThreadRanks in thread_comm.hpp. rank(), size(), tag() ("rank r"),
//     share<D>(make) (the object make() returns, one for all ranks of the process: the draws),
//     and R::Group(ranks, k), the tests' own exchange among the consecutive group of k ranks
//     that holds this one (separate from the library's): first(), same_as_rank0(what, v),
//     sum(v).
// The library communicator over all ranks is the caller's (a syncbn_comm_t).
//
// Every rank generates the whole global batch from a seed shared by all ranks (the test's name)
// and keeps its own slice, so no data travels outside the library. Rule of the multi-rank tests
// (mpi_helpers.hpp): the sequence of collectives never depends on a check's outcome; checks
// between collectives are EXPECT_*, never ASSERT_*.
#ifndef SYNCBN_TESTS_SCENARIOS_HPP
#define SYNCBN_TESTS_SCENARIOS_HPP

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <mutex>
#include <ostream>
#include <string>
#include <utility>
#include <vector>

#include "reference.hpp"
#include "syncbn/syncbn.h"

namespace syncbn_test {

// ---- the scenarios ----------------------------------------------------------------------------

// The local batch of one rank at one step: N and the spatial sizes (C is the layer's).
struct RankBatch {
  int64_t n;
  std::vector<int64_t> spatial;
};

struct Scenario {
  const char* name;
  RankBatch (*batch)(int rank, int step);
  int group_size = 0;  // 0: the whole world; k: syncbn_comm_split(world, k)
  bool affine = true;
  bool track = true;
  double momentum = 0.1;
  bool global_grads = false;
  bool null_empty = false;  // empty local batches pass NULL data pointers (else valid ones)
  int steps = 2;
  int64_t channels = 3;
  double offset = 0;  // added to every channel's mean (mean / std of ~1e4 tests precision)
  // Relative tolerance of the statistics, when looser than the dtype's: sums of x and x^2 in
  // one allreduce lose log10(mean^2 / var) digits in var = q / m - mean^2 (docs/design.md
  // section 3), so far from zero even fp64 data only reaches what the design promises, 1e-5.
  double stats_rel = 0;
  bool default_stream = false;  // CUDA plans: stream NULL (the legacy default stream)
  // The fused activation (the named-argument calls; y checked against relu(bn(x) [+ z]), the
  // backward's g = dy (y > 0) from the y the library wrote, dz = g).
  syncbn_activation_t activation = SYNCBN_ACTIVATION_NONE;
  // With an activation: the forward also writes the relu's mask (checked against y > 0) and the
  // backward reads it instead of y.
  bool mask = false;
};

// sc with the fused activation act, named name (and the mask, with_mask).
inline Scenario with_activation(Scenario sc, const char* name, syncbn_activation_t act,
                                bool with_mask = false) {
  sc.name = name;
  sc.activation = act;
  sc.mask = with_mask;
  return sc;
}

inline void PrintTo(const Scenario& sc, std::ostream* os) { *os << sc.name; }

// The one table: uneven N per rank, ranks with N = 0 (NULL or valid pointers), different
// spatial sizes, every spatial rank, affine and tracking off, cumulative momentum, global
// parameter gradients, subgroups, many steps with changing batches, odd and wide channel
// counts, long rows, inputs far from zero, the legacy default stream.
inline const std::vector<Scenario>& scenarios() {
  constexpr double kCumulative = SYNCBN_MOMENTUM_CUMULATIVE;
  static const std::vector<Scenario> list = {
      {"equal_1d", [](int, int) { return RankBatch{3, {4}}; }},
      {"equal_0d", [](int, int) { return RankBatch{4, {}}; }},
      {"equal_2d", [](int, int) { return RankBatch{2, {3, 3}}; }},
      {"equal_3d", [](int, int) { return RankBatch{2, {2, 2, 3}}; }},
      {"uneven_n", [](int r, int) { return RankBatch{r + 1, {3, 2}}; }},
      {"empty_rank1", [](int r, int) { return RankBatch{r == 1 ? 0 : 3, {5}}; }},
      {"empty_rank1_null_pointers", [](int r, int) { return RankBatch{r == 1 ? 0 : 3, {5}}; }, 0,
       true, true, 0.1, false, /*null_empty=*/true},
      {"only_rank0_has_data", [](int r, int) { return RankBatch{r == 0 ? 4 : 0, {2}}; }, 0, true,
       true, 0.1, false, true},
      {"different_spatial", [](int r, int) { return RankBatch{2, {r + 2, 3}}; }},
      {"different_n_and_spatial", [](int r, int) { return RankBatch{r % 2 + 1, {2 * r + 2}}; }},
      {"no_affine_no_track", [](int r, int) { return RankBatch{r + 2, {4}}; }, 0, false, false},
      {"no_affine_cumulative", [](int r, int) { return RankBatch{2, {r + 1, 2}}; }, 0, false,
       true, kCumulative, false, false, 3},
      {"global_param_grads", [](int r, int) { return RankBatch{r + 1, {3}}; }, 0, true, true, 0.1,
       true},
      {"global_param_grads_empty_rank1",
       [](int r, int) { return RankBatch{r == 1 ? 0 : 2, {3}}; }, 0, true, true, 0.1, true},
      {"split1", [](int r, int) { return RankBatch{r + 2, {3}}; }, 1},
      {"split2", [](int, int) { return RankBatch{2, {3, 2}}; }, 2},
      {"split2_uneven_global_grads", [](int r, int) { return RankBatch{r + 1, {r + 1}}; }, 2,
       true, true, 0.1, true},
      {"twenty_steps", [](int r, int s) { return RankBatch{1 + (r + s) % 3, {3}}; }, 0, true,
       true, 0.1, false, false, 20},
      {"twenty_steps_cumulative",
       [](int r, int s) { return RankBatch{1 + (r + s) % 3, {2, 2}}; }, 0, true, true,
       kCumulative, false, false, 20},
      // Batch sizes change every step, some ranks empty at some steps (rank 0 never).
      {"six_steps_cumulative",
       [](int r, int s) { return RankBatch{r == 0 ? 1 + s % 2 : (r + s) % 3, {2, 2}}; }, 0, true,
       true, kCumulative, false, false, 6},
      {"channels_17", [](int r, int) { return RankBatch{2, {r + 1}}; }, 0, true, true, 0.1, false,
       false, 2, 17},
      // Odd channel count and spatial size, an empty rank (vector-load tails).
      {"c129_odd_spatial", [](int r, int) { return RankBatch{r == 1 ? 0 : r + 1, {7, 7}}; }, 0,
       true, true, 0.1, false, false, 2, 129},
      {"c1000_0d_default_stream", [](int r, int) { return RankBatch{r + 3, {}}; }, 0, true, true,
       0.1, false, false, 1, 1000, 0, 0, /*default_stream=*/true},
      {"one_channel_long_rows", [](int r, int) { return RankBatch{r + 1, {4099}}; }, 0, true,
       true, 0.1, false, false, 2, 1},
      // Running variance and invstd to 1e-5 (relative) although mean / std is ~1e4.
      {"mean_1e4", [](int r, int) { return RankBatch{r + 3, {16, 8}}; }, 0, true, true, 0.1,
       false, false, 1, 3, 1e4, 1e-5},
  };
  // The fused activations over the same shapes: uneven and empty ranks (NULL pointers too),
  // every spatial rank, no affine with cumulative momentum, global gradients, a subgroup, odd
  // channel counts.
  static const std::vector<Scenario> fused = [] {
    constexpr syncbn_activation_t kRelu = SYNCBN_ACTIVATION_RELU;
    constexpr syncbn_activation_t kAdd = SYNCBN_ACTIVATION_ADD_RELU;
    auto named = [](const char* name) {
      for (const Scenario& sc : list) {
        if (std::string(sc.name) == name) return sc;
      }
      return list.front();
    };
    std::vector<Scenario> all = list;
    all.push_back(with_activation(named("uneven_n"), "relu_uneven_n", kRelu));
    all.push_back(with_activation(named("equal_0d"), "relu_0d", kRelu));
    all.push_back(with_activation(named("equal_3d"), "add_relu_3d", kAdd));
    all.push_back(with_activation(named("empty_rank1"), "add_relu_empty_rank1", kAdd));
    all.push_back(with_activation(named("empty_rank1_null_pointers"),
                                  "add_relu_empty_rank1_null_pointers", kAdd));
    all.push_back(with_activation(named("different_n_and_spatial"),
                                  "relu_different_n_and_spatial", kRelu));
    all.push_back(with_activation(named("no_affine_cumulative"), "add_relu_no_affine_cumulative",
                                  kAdd));
    all.push_back(with_activation(named("global_param_grads_empty_rank1"),
                                  "relu_global_param_grads_empty_rank1", kRelu));
    all.push_back(with_activation(named("split2_uneven_global_grads"),
                                  "add_relu_split2_uneven_global_grads", kAdd));
    all.push_back(with_activation(named("c129_odd_spatial"), "add_relu_c129_odd_spatial", kAdd));
    all.push_back(with_activation(named("six_steps_cumulative"), "relu_six_steps_cumulative",
                                  kRelu));
    // The backward from the forward's mask instead of y.
    all.push_back(with_activation(named("uneven_n"), "relu_mask_uneven_n", kRelu, true));
    all.push_back(with_activation(named("empty_rank1_null_pointers"),
                                  "add_relu_mask_empty_rank1_null_pointers", kAdd, true));
    all.push_back(with_activation(named("c129_odd_spatial"), "add_relu_mask_c129_odd_spatial",
                                  kAdd, true));
    return all;
  }();
  return fused;
}

// Whether a scenario that splits a world of `world` ranks into groups of group_size (0: no
// split) fits it; decided from the world size alone, so alike on every rank. If not, *why says
// so.
inline bool split_fits(int world, int group_size, std::string* why) {
  if (group_size > 1 && (world % group_size != 0 || world == group_size)) {
    *why = "split(" + std::to_string(group_size) + ") needs a world that is a multiple of " +
           std::to_string(group_size) + " and larger; this one has " + std::to_string(world) +
           " rank(s)";
    return false;
  }
  return true;
}

// COLLECTIVE: the communicator a scenario runs on: world itself (group_size 0), or this rank's
// group of syncbn_comm_split(world, group_size), then owned by sub. tag names the rank.
inline syncbn_comm_t scenario_comm(syncbn_comm_t world, int group_size, CommHandle& sub,
                                   const std::string& tag) {
  if (group_size == 0) return world;
  syncbn_comm_t s = nullptr;
  EXPECT_EQ(syncbn_comm_split(world, group_size, &s), SYNCBN_SUCCESS)
      << tag << ": split(" << group_size << "): " << syncbn_last_error();
  sub.reset(s);
  int sub_size = -1;
  syncbn_comm_size(s, &sub_size);
  EXPECT_EQ(sub_size, group_size) << tag;
  return s;
}

// A scenario's layer configuration for data type dtype in layout, on device.
inline syncbn_config_t scenario_config(const Scenario& sc, syncbn_dtype_t dtype,
                                       syncbn_layout_t layout, syncbn_device_t device) {
  syncbn_config_t cfg = make_cfg(sc.channels, dtype, layout, sc.affine, sc.track, sc.momentum,
                                 1e-5, sc.global_grads);
  cfg.device = device;
  cfg.activation = sc.activation;
  return cfg;
}

// ---- host memory (CPU plans) ------------------------------------------------------------------

// n elements of T in host memory; data() is NULL when empty (as DeviceArray's).
template <class T>
class HostArray {
 public:
  HostArray() = default;
  explicit HostArray(size_t n) : v_(n) {}
  explicit HostArray(std::vector<T> host) : v_(std::move(host)) {}
  T* data() const { return v_.empty() ? nullptr : v_.data(); }
  size_t size() const { return v_.size(); }
  void fill(const T& value) { std::fill(v_.begin(), v_.end(), value); }
  std::vector<T> download() const { return v_; }

 private:
  mutable std::vector<T> v_;  // the library writes through data() of a const array
};

// A layer's parameters and statistics in host memory (DeviceLayerState's counterpart).
template <class P>
struct HostLayerState {
  HostArray<P> weight, bias, running_mean, running_var;
  HostArray<int64_t> num_batches_tracked;

  HostLayerState() = default;
  explicit HostLayerState(const LayerState<P>& st)
      : weight(st.weight),
        bias(st.bias),
        running_mean(st.running_mean),
        running_var(st.running_var),
        num_batches_tracked(std::vector<int64_t>{st.num_batches_tracked}) {}

  LayerState<P> download() const {
    return {weight.download(), bias.download(), running_mean.download(), running_var.download(),
            num_batches_tracked.download()[0]};
  }
};

// The Memory policy of CPU plans: data of type T (float, double), parameters of the same type,
// the tolerances of reference.hpp. Calls return their errors themselves.
template <class T>
struct HostMemory {
  using S = T;
  using P = T;
  static constexpr syncbn_dtype_t dtype = DtypeOf<T>::value;
  static constexpr syncbn_device_t device = SYNCBN_DEVICE_CPU;
  static constexpr double data = Tolerances<T>::data;
  static constexpr double stats = Tolerances<T>::stats;
  static constexpr double sums = Tolerances<T>::sums;
  template <class X>
  using Array = HostArray<X>;
  using State = HostLayerState<P>;
  struct Stream {
    void* handle() const { return nullptr; }  // CPU plans take no stream
  };

  static S from_double(double v) { return static_cast<S>(v); }
  static std::vector<P> rounded(std::vector<P> v) { return v; }
  static std::vector<S> storage(const std::vector<P>& v) { return v; }
  static std::vector<double> values(const Array<S>& a) { return to_double(a.download()); }
  // A CPU plan never records an error for later: the report is always SUCCESS.
  static void finish(syncbn_plan_t plan, void* stream, const char* what) {
    expect_no_async_error(plan, stream, what);
  }
};

// ---- the draws --------------------------------------------------------------------------------

// Every rank's batches of a scenario, step by step (steps training steps with dy, then the eval
// step without), drawn in order from one Rng: the same numbers whichever rank asks first. Ranks
// in one process share one Draws (ThreadRanks::share); an MPI process has its own.
template <class M>
class Draws {
 public:
  using P = typename M::P;
  struct Step {
    std::vector<Geometry> g;             // per rank
    std::vector<std::vector<P>> x, dy;   // per rank, rounded to M::S
    std::vector<std::vector<P>> z;       // per rank, ADD_RELU's residual (else empty)
    std::vector<ChannelValues> X, DY;    // per rank, the per-channel values
  };

  Draws(const Scenario& sc, syncbn_layout_t layout, int ranks, const Rng& rng)
      : sc_(sc), layout_(layout), ranks_(ranks), rng_(rng) {}

  const Step& step(int s) {
    std::lock_guard<std::mutex> lock(mutex_);
    while (static_cast<int>(steps_.size()) <= s) {
      const int t = static_cast<int>(steps_.size());
      const bool with_grad = t < sc_.steps;
      auto d = std::make_unique<Step>();
      for (int r = 0; r < ranks_; ++r) {
        const RankBatch b = sc_.batch(r, t);
        const Geometry g = make_geometry(layout_, b.n, sc_.channels, b.spatial);
        d->x.push_back(M::rounded(random_batch<P>(g, rng_, dist())));
        d->dy.push_back(with_grad ? M::rounded(random_batch<P>(g, rng_))
                                  : std::vector<P>(d->x.back().size()));
        d->z.push_back(sc_.activation == SYNCBN_ACTIVATION_ADD_RELU
                           ? M::rounded(random_batch<P>(g, rng_))
                           : std::vector<P>());
        d->X.push_back(gather(g, d->x.back().data()));
        d->DY.push_back(gather(g, d->dy.back().data()));
        d->g.push_back(g);
      }
      steps_.push_back(std::move(d));
    }
    return *steps_[static_cast<size_t>(s)];
  }

  ChannelDistribution& dist() { return dist_; }

 private:
  Scenario sc_;
  syncbn_layout_t layout_;
  int ranks_;
  Rng rng_;
  ChannelDistribution dist_;
  std::mutex mutex_;
  std::vector<std::unique_ptr<Step>> steps_;
};

// ---- the runner -------------------------------------------------------------------------------

// `steps` training steps (forward + backward), then one eval step, every output checked on every
// rank against the fp64 reference of the (already rounded) inputs, with the memory's
// tolerances. Collectives are made unconditionally, in the same order on all ranks.
template <class M, class R>
class ScenarioRun {
 public:
  using S = typename M::S;
  using P = typename M::P;
  template <class X>
  using Array = typename M::template Array<X>;

  // world: the library communicator over all ranks (for CUDA plans, the current device is set).
  ScenarioRun(const Scenario& sc, syncbn_layout_t layout, syncbn_comm_t world, const R& ranks)
      : sc_(sc),
        layout_(layout),
        world_(world),
        ranks_(ranks),
        P_(ranks.size()),
        rank_(ranks.rank()),
        k_(sc.group_size ? sc.group_size : P_),
        group_(ranks, k_),
        rng_(test_seed()),
        dummy_(4) {}

  void run() {
    CommHandle sub;
    const syncbn_comm_t comm = scenario_comm(world_, sc_.group_size, sub, ranks_.tag());
    cfg_ = scenario_config(sc_, M::dtype, layout_, M::device);
    syncbn_plan_t p = nullptr;
    EXPECT_EQ(syncbn_plan_create(comm, &cfg_, &p), SYNCBN_SUCCESS)
        << ranks_.tag() << ": " << syncbn_last_error();
    PlanHandle plan(p);

    const int64_t C = sc_.channels;
    st_ = LayerState<P>::random(C, rng_);  // identical on every rank
    ref_ = st_;
    dev_ = typename M::State(st_);
    dist_ = ChannelDistribution::random(C, rng_);
    for (double& mu : dist_.mu) mu += sc_.offset;
    draws_ = ranks_.template share<Draws<M>>([&] {
      auto d = std::make_shared<Draws<M>>(sc_, layout_, P_, rng_);
      d->dist() = dist_;
      return d;
    });
    nan_.assign(static_cast<size_t>(C), std::numeric_limits<P>::quiet_NaN());
    for (auto* a : {&ign_w_, &ign_b_, &ign_rm_, &ign_rv_}) *a = Array<P>(nan_);

    const std::string who = ranks_.tag() + " of " + std::to_string(P_);
    for (int step = 0; step < sc_.steps; ++step) {
      SCOPED_TRACE(who + ", step " + std::to_string(step));
      train_step(plan.get(), step);
    }
    SCOPED_TRACE(who + ", eval");
    eval_step(plan.get());
  }

 private:
  // Every rank's batch of this step (the same draws on every rank), rounded to S: keeps this
  // rank's slice and the group's per-channel values.
  void draw(int step) {
    const typename Draws<M>::Step& d = draws_->step(step);
    X_.clear();
    DY_.clear();
    for (int r = group_.first(); r < group_.first() + k_; ++r) {
      append(X_, d.X[static_cast<size_t>(r)]);
      append(DY_, d.DY[static_cast<size_t>(r)]);
    }
    g_ = d.g[static_cast<size_t>(rank_)];
    x_ = d.x[static_cast<size_t>(rank_)];
    dy_ = d.dy[static_cast<size_t>(rank_)];
    z_ = d.z[static_cast<size_t>(rank_)];
    counts_.clear();
    for (int r = group_.first(); r < group_.first() + k_; ++r) {
      counts_.push_back(d.g[static_cast<size_t>(r)].count_per_channel());
    }
  }

  // The group's per-channel values of a tensor every rank holds its own slice of (in X_'s
  // order), from this rank's: each rank fills its place, the test's own sum does the rest.
  ChannelValues group_values(const std::vector<P>& mine) const {
    const size_t C = static_cast<size_t>(sc_.channels);
    int64_t total = 0, offset = 0;
    for (size_t i = 0; i < counts_.size(); ++i) {
      if (static_cast<int>(i) == rank_ - group_.first()) offset = total;
      total += counts_[i];
    }
    std::vector<double> flat(C * static_cast<size_t>(total), 0.0);
    const ChannelValues own = gather(g_, mine.data());
    for (size_t ch = 0; ch < C && !own.empty(); ++ch) {
      for (size_t i = 0; i < own[ch].size(); ++i) {
        flat[ch * static_cast<size_t>(total) + static_cast<size_t>(offset) + i] = own[ch][i];
      }
    }
    const std::vector<double> all = group_.sum(flat);  // exact: one non-zero term per slot
    ChannelValues out(C);
    for (size_t ch = 0; ch < C; ++ch) {
      out[ch].assign(all.begin() + static_cast<std::ptrdiff_t>(ch * total),
                     all.begin() + static_cast<std::ptrdiff_t>((ch + 1) * total));
    }
    return out;
  }
  bool fused() const { return sc_.activation != SYNCBN_ACTIVATION_NONE; }
  bool add() const { return sc_.activation == SYNCBN_ACTIVATION_ADD_RELU; }

  // Data pointer for a local tensor: NULL or a valid dummy where it is empty.
  S* data(const Array<S>& a) const {
    if (a.size() != 0) return a.data();
    return sc_.null_empty ? nullptr : dummy_.data();
  }
  double stats_rel() const { return std::max(M::stats, sc_.stats_rel); }
  const P* weight() const { return sc_.affine ? dev_.weight.data() : ign_w_.data(); }
  const P* bias() const { return sc_.affine ? dev_.bias.data() : ign_b_.data(); }
  std::vector<double> w_eff() const { return effective_weight(sc_.affine, st_.weight); }
  std::vector<double> b_eff() const { return effective_bias(sc_.affine, st_.bias); }
  void* stream() const { return sc_.default_stream ? nullptr : stream_.handle(); }

  void train_step(syncbn_plan_t plan, int step) {
    draw(step);
    SCOPED_TRACE("local batch " + g_.str());
    const size_t C = static_cast<size_t>(sc_.channels), n = x_.size();
    const BatchStats stats = batch_stats(X_, cfg_.eps);
    const auto shape = g_.shape();
    const S sentinel = M::from_double(-777);
    const std::vector<P> out_c(C, P(-777));

    // ---- forward
    Array<S> xd(M::storage(x_)), yd(n), zd(M::storage(z_));
    yd.fill(sentinel);
    const bool with_mask = fused() && sc_.mask;
    Array<std::uint8_t> maskd(with_mask ? n : 0);
    maskd.fill(std::uint8_t{0xA5});
    std::uint8_t* const mask = maskd.size() != 0 ? maskd.data() : nullptr;
    Array<P> smd(out_c), sid(out_c);
    const std::vector<P> rm_before = dev_.running_mean.download();
    syncbn_status_t fs = SYNCBN_SUCCESS;
    if (!fused()) {
      fs = syncbn_forward_training(
          plan, g_.ndim(), shape.data(), data(xd), weight(), bias(), data(yd), smd.data(),
          sid.data(), sc_.track ? dev_.running_mean.data() : ign_rm_.data(),
          sc_.track ? dev_.running_var.data() : ign_rv_.data(),
          sc_.track ? dev_.num_batches_tracked.data() : nullptr, stream());
    } else {
      syncbn_forward_args_t fa{};
      fa.ndim = g_.ndim();
      fa.shape = shape.data();
      fa.x = data(xd);
      fa.z = add() ? data(zd) : nullptr;
      fa.weight = weight();
      fa.bias = bias();
      fa.y = data(yd);
      fa.save_mean = smd.data();
      fa.save_invstd = sid.data();
      fa.running_mean = sc_.track ? dev_.running_mean.data() : ign_rm_.data();
      fa.running_var = sc_.track ? dev_.running_var.data() : ign_rv_.data();
      fa.num_batches_tracked = sc_.track ? dev_.num_batches_tracked.data() : nullptr;
      fa.stream = stream();
      fa.mask = mask;
      fs = syncbn_forward_training_ex(plan, &fa);
    }
    EXPECT_EQ(fs, SYNCBN_SUCCESS) << syncbn_last_error();
    M::finish(plan, stream(), "forward_training");

    const std::vector<P> save_mean = smd.download(), save_invstd = sid.download();
    auto y_want = normalize(g_, x_.data(), stats.mean, stats.invstd, w_eff(), b_eff());
    if (fused()) y_want = activate(y_want, add() ? z_.data() : static_cast<const P*>(nullptr));
    const std::vector<double> y_got = M::values(yd);
    EXPECT_TRUE(all_close("y", y_got, y_want, M::data));
    if (with_mask) {
      const std::vector<std::uint8_t> mask_got = maskd.download();
      size_t wrong = 0;
      for (size_t i = 0; i < n; ++i) wrong += mask_got[i] != (y_got[i] > 0 ? 1 : 0);
      EXPECT_EQ(wrong, 0u) << "mask bytes other than y > 0";
    }
    EXPECT_TRUE(all_close("save_mean", save_mean, stats.mean, scaled(M::stats, stats.abs_mean)));
    EXPECT_TRUE(all_close("save_invstd", save_invstd, stats.invstd, Tol{stats_rel(), {}}));
    EXPECT_TRUE(group_.same_as_rank0("save_mean", save_mean));
    EXPECT_TRUE(group_.same_as_rank0("save_invstd", save_invstd));
    if (sc_.track) {
      update_running(ref_, stats, sc_.momentum);
      const LayerState<P> now = dev_.download();
      std::vector<double> rm_scale;
      for (size_t c = 0; c < C; ++c)
        rm_scale.push_back(std::fabs(static_cast<double>(rm_before[c])) + stats.abs_mean[c]);
      EXPECT_TRUE(all_close("running_mean", now.running_mean, to_double(ref_.running_mean),
                            scaled(M::stats, rm_scale)));
      EXPECT_TRUE(all_close("running_var", now.running_var, to_double(ref_.running_var),
                            Tol{stats_rel(), {}}));
      EXPECT_EQ(now.num_batches_tracked, ref_.num_batches_tracked);
      EXPECT_TRUE(group_.same_as_rank0("running_mean", now.running_mean));
      EXPECT_TRUE(group_.same_as_rank0("running_var", now.running_var));
    } else {
      EXPECT_TRUE(same_bytes("running_mean (ignored)", ign_rm_.download(), nan_));
      EXPECT_TRUE(same_bytes("running_var (ignored)", ign_rv_.download(), nan_));
    }

    // ---- backward, from the statistics the forward saved
    // With an activation the batch-norm backward sees g = dy (y > 0), y as the library wrote it
    // (the contract: the mask of the y passed in), over the whole group.
    const std::vector<double> mean = to_double(save_mean), invstd = to_double(save_invstd);
    const std::vector<P> g_mine = fused() ? relu_masked(dy_, y_got) : dy_;
    const ChannelValues G = fused() ? group_values(g_mine) : DY_;
    const GradSums global = grad_sums(X_, G, mean);
    const GradSums local = grad_sums(gather(g_, x_.data()), gather(g_, g_mine.data()), mean);
    const auto dx_want = grad_input(g_, x_.data(), g_mine.data(), w_eff(), mean, invstd, global);
    Array<S> dyd(M::storage(dy_)), dxd(n), dzd(add() ? n : 0);
    dxd.fill(sentinel);
    dzd.fill(sentinel);
    Array<P> dwd(out_c), dbd(out_c);
    syncbn_status_t bs = SYNCBN_SUCCESS;
    if (!fused()) {
      bs = syncbn_backward(plan, g_.ndim(), shape.data(), data(xd), data(dyd), weight(),
                           smd.data(), sid.data(), data(dxd), sc_.affine ? dwd.data() : nullptr,
                           sc_.affine ? dbd.data() : nullptr, stream());
    } else {
      syncbn_backward_args_t ba{};
      ba.ndim = g_.ndim();
      ba.shape = shape.data();
      ba.x = data(xd);
      ba.y = with_mask ? nullptr : data(yd);
      ba.mask = with_mask ? mask : nullptr;
      ba.dy = data(dyd);
      ba.weight = weight();
      ba.save_mean = smd.data();
      ba.save_invstd = sid.data();
      ba.dx = data(dxd);
      ba.dz = add() ? data(dzd) : nullptr;
      ba.dweight = sc_.affine ? dwd.data() : nullptr;
      ba.dbias = sc_.affine ? dbd.data() : nullptr;
      ba.stream = stream();
      bs = syncbn_backward_ex(plan, &ba);
    }
    EXPECT_EQ(bs, SYNCBN_SUCCESS) << syncbn_last_error();
    M::finish(plan, stream(), "backward");
    EXPECT_TRUE(all_close("dx", M::values(dxd), dx_want, M::data));
    if (add()) {
      EXPECT_TRUE(all_close("dz", M::values(dzd), to_double(g_mine), Tol{0.0, {}}));
    }

    // Collectives below run on every rank whatever the configuration.
    const std::vector<P> dweight = dwd.download(), dbias = dbd.download();
    const std::vector<double> dw_sum = group_.sum(dweight);
    const std::vector<double> db_sum = group_.sum(dbias);
    const ::testing::AssertionResult dw_same = group_.same_as_rank0("dweight", dweight);
    const ::testing::AssertionResult db_same = group_.same_as_rank0("dbias", dbias);
    if (!sc_.affine) return;
    const GradSums& mine = sc_.global_grads ? global : local;
    const char* kind = sc_.global_grads ? " (global)" : " (local)";
    EXPECT_TRUE(all_close(std::string("dweight") + kind, dweight, grad_weight(mine, invstd),
                          scaled(M::sums, grad_weight_scale(mine, invstd))));
    EXPECT_TRUE(all_close(std::string("dbias") + kind, dbias, mine.sum_g,
                          scaled(M::sums, mine.abs_g)));
    if (sc_.global_grads) {
      EXPECT_TRUE(dw_same) << "(global parameter gradients)";
      EXPECT_TRUE(db_same) << "(global parameter gradients)";
    } else {
      // The trainer's sum of the local gradients is the gradient of the global batch.
      EXPECT_TRUE(all_close("sum over ranks of dweight", dw_sum, grad_weight(global, invstd),
                            scaled(M::sums, grad_weight_scale(global, invstd))));
      EXPECT_TRUE(all_close("sum over ranks of dbias", db_sum, global.sum_g,
                            scaled(M::sums, global.abs_g)));
    }
  }

  // Eval, local either way: running statistics when tracked, else this rank's own batch
  // statistics (as torch's BatchNorm and SyncBatchNorm in eval mode); an empty local batch is
  // a success with nothing to write. The running statistics stay as they were.
  void eval_step(syncbn_plan_t plan) {
    draw(sc_.steps);
    SCOPED_TRACE("local batch " + g_.str());
    std::vector<double> mean, invstd;
    const LayerState<P> before = dev_.download();
    if (sc_.track) {
      mean = to_double(before.running_mean);
      invstd = eval_invstd(before.running_var, cfg_.eps);
    } else if (!x_.empty()) {
      const BatchStats stats = batch_stats(gather(g_, x_.data()), cfg_.eps);
      mean = stats.mean;
      invstd = stats.invstd;
    }
    auto want = normalize(g_, x_.data(), mean, invstd, w_eff(), b_eff());
    if (fused()) want = activate(want, add() ? z_.data() : static_cast<const P*>(nullptr));
    Array<S> xd(M::storage(x_)), yd(x_.size()), zd(M::storage(z_));
    yd.fill(M::from_double(-777));
    const auto shape = g_.shape();
    syncbn_forward_args_t fa{};
    fa.ndim = g_.ndim();
    fa.shape = shape.data();
    fa.x = data(xd);
    fa.z = add() ? data(zd) : nullptr;
    fa.weight = weight();
    fa.bias = bias();
    fa.y = data(yd);
    fa.running_mean = sc_.track ? dev_.running_mean.data() : ign_rm_.data();
    fa.running_var = sc_.track ? dev_.running_var.data() : ign_rv_.data();
    fa.stream = stream();
    EXPECT_EQ(fused() ? syncbn_forward_inference_ex(plan, &fa)
                      : syncbn_forward_inference(plan, fa.ndim, fa.shape, fa.x, fa.weight,
                                                 fa.bias, fa.running_mean, fa.running_var, fa.y,
                                                 fa.stream),
              SYNCBN_SUCCESS)
        << syncbn_last_error();
    M::finish(plan, stream(), "forward_inference");
    EXPECT_TRUE(all_close("eval y", M::values(yd), want, M::data));
    EXPECT_TRUE(state_unchanged("after eval", dev_, before));
  }

  Scenario sc_;
  syncbn_layout_t layout_;
  syncbn_comm_t world_;
  const R& ranks_;
  int P_, rank_, k_;
  typename R::Group group_;
  Rng rng_;
  syncbn_config_t cfg_{};
  LayerState<P> st_, ref_;  // st_: the initial parameters (the library never changes them)
  typename M::State dev_;
  ChannelDistribution dist_;
  std::shared_ptr<Draws<M>> draws_;
  std::vector<P> nan_;
  Array<P> ign_w_, ign_b_, ign_rm_, ign_rv_;
  Array<S> dummy_;
  typename M::Stream stream_;
  // This step's local slice and the group's per-channel values.
  Geometry g_;
  std::vector<P> x_, dy_, z_;
  ChannelValues X_, DY_;
  std::vector<int64_t> counts_;  // the group's per-channel counts, rank by rank
};

// Runs scenario sc with data of type T on CPU plans over world.
template <class T, class R>
void run_host_scenario(const Scenario& sc, syncbn_layout_t layout, syncbn_comm_t world,
                       const R& ranks) {
  ScenarioRun<HostMemory<T>, R>(sc, layout, world, ranks).run();
}

// Test names of the scenario suites: scenario_dtype_layout.
inline std::string scenario_name(const Scenario& sc, syncbn_dtype_t dtype,
                                 syncbn_layout_t layout) {
  return std::string(sc.name) + "_" + dtype_name(dtype) + "_" + layout_name(layout);
}

}  // namespace syncbn_test

#endif  // SYNCBN_TESTS_SCENARIOS_HPP
