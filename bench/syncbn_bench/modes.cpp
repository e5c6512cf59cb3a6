// syncbn_bench's measurement of one shape: the tensors (filled on the OpenMP threads), the plans
// of the selected modes (local on the self communicator, sync on the MPI one, allgather and
// sync's logged exchange on custom communicators, bench/allgather_comm.hpp), copy, the bare
// allreduce and oneDNN as interleaved ops, then the copy floor, the overheads, the exchange
// times and the checks.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <functional>
#include <limits>
#include <memory>
#include <type_traits>

#include "driver/bench_mpi.hpp"
#include "syncbn_bench/syncbn_bench.hpp"
#ifdef SYNCBN_BENCH_HAVE_ONEDNN
#include "onednn_bn.hpp"
#endif

namespace syncbn_bench {

namespace {

// ---- buffers, data -----------------------------------------------------------------------------

// 64-byte aligned, uninitialized; first touched by fill() on the OpenMP threads.
template <class T>
class Buffer {
 public:
  explicit Buffer(int64_t count) : count_(count) {
    const std::size_t bytes =
        (static_cast<std::size_t>(std::max<int64_t>(count, 1)) * sizeof(T) + 63) / 64 * 64;
    ptr_.reset(static_cast<T*>(std::aligned_alloc(64, bytes)));
    if (!ptr_) throw std::bad_alloc();
  }
  T* data() { return ptr_.get(); }
  const T* data() const { return ptr_.get(); }
  T& operator[](int64_t i) { return ptr_.get()[i]; }
  int64_t size() const { return count_; }

 private:
  struct Free {
    void operator()(T* p) const { std::free(p); }
  };
  int64_t count_;
  std::unique_ptr<T, Free> ptr_;
};

uint64_t splitmix64(uint64_t z) {
  z += 0x9e3779b97f4a7c15ULL;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

// p[i] = center + half_width * u, u uniform in [-1, 1), a pure function of (seed, i).
template <class T>
void fill(T* p, int64_t count, uint64_t seed, double center, double half_width) {
  const uint64_t key = splitmix64(seed);
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < count; ++i) {
    const double u =
        static_cast<double>(splitmix64(key ^ static_cast<uint64_t>(i)) >> 11) * 0x1.0p-53;
    p[i] = static_cast<T>(center + half_width * (2 * u - 1));
  }
}

template <class T>
double max_abs_diff(const T* a, const T* b, int64_t count) {
  double m = 0;
#pragma omp parallel for schedule(static) reduction(max : m)
  for (int64_t i = 0; i < count; ++i) {
    const double d = std::fabs(static_cast<double>(a[i]) - static_cast<double>(b[i]));
    m = std::isnan(d) ? std::numeric_limits<double>::infinity() : std::max(m, d);
  }
  return m;
}


double nan_max(double a, double b) {
  return std::isnan(a) ? b : std::isnan(b) ? a : std::max(a, b);
}

// Channels whose value differs between ranks (MPI MIN against MAX).
template <class T>
int unequal_across_ranks(const T* v, int64_t c, MPI_Comm comm) {
  std::vector<double> lo(v, v + c), hi(v, v + c);
  MPI_Allreduce(MPI_IN_PLACE, lo.data(), static_cast<int>(c), MPI_DOUBLE, MPI_MIN, comm);
  MPI_Allreduce(MPI_IN_PLACE, hi.data(), static_cast<int>(c), MPI_DOUBLE, MPI_MAX, comm);
  int unequal = 0;
  for (int64_t i = 0; i < c; ++i) unequal += !(lo[i] == hi[i]);
  return unequal;
}

// One shape: copy, the selected modes, the bare allreduce, oneDNN, the checks.
template <class T>
std::vector<Row> run_shape(const Shape4& s, const Options& o, const Comms& comms, MPI_Comm mpi,
                           MPI_Comm allreduce_comm, int rank, Checks& chk) {
  const int64_t count = s.count();
  const int64_t C = s.c;
  Buffer<T> x(count), y(count), dy(count), dx(count);
  fill(x.data(), count, 1000003ULL * rank + 1, 0.5, 1.7);
  fill(dy.data(), count, 1000003ULL * rank + 2, 0.0, 1.0);
  fill(y.data(), count, 3, 0.0, 0.0);
  fill(dx.data(), count, 4, 0.0, 0.0);
  std::vector<T> weight(C), bias(C), dweight(C), dbias(C);
  for (int64_t i = 0; i < C; ++i) {  // the same on every rank, as a trainer's parameters
    weight[i] = static_cast<T>(0.5 + static_cast<double>(splitmix64(2 * i) >> 11) * 0x1.0p-53);
    bias[i] = static_cast<T>(-0.5 + static_cast<double>(splitmix64(2 * i + 1) >> 11) * 0x1.0p-53);
  }
  struct Stats {  // per mode: saved and running statistics
    std::vector<T> mean, invstd, running_mean, running_var;
    int64_t num_batches_tracked = 0;
  } stats[4];  // local, sync, allgather, and the logged sync plan
  for (Stats& st : stats) {
    st.mean.resize(C);
    st.invstd.resize(C);
    st.running_mean.assign(C, 0);
    st.running_var.assign(C, 1);
  }

  auto config = syncbn::make_config(C, o.f64 ? SYNCBN_FLOAT64 : SYNCBN_FLOAT32);
  config.layout = o.nhwc ? SYNCBN_CHANNELS_LAST : SYNCBN_CHANNELS_FIRST;
  const std::vector<int64_t> shape =
      o.nhwc ? std::vector<int64_t>{s.n, s.h, s.w, s.c} : std::vector<int64_t>{s.n, s.c, s.h, s.w};
  // COLLECTIVE plans: every rank makes the same ones (the modes are the same on every rank).
  syncbn::BatchNorm local(syncbn::Communicator::self(), config);
  syncbn::BatchNorm synced, gathered, logged;  // sync, allgather, sync's logged exchange
  if (o.mode[1]) synced = syncbn::BatchNorm(comms.world, config);
  if (o.mode[2]) gathered = syncbn::BatchNorm(comms.gather.communicator(), config);
  if (o.mode[1]) logged = syncbn::BatchNorm(comms.logged.communicator(), config);

  // The ops, in the order they run within a round. Indices into the result: -1 if not run.
  std::vector<bench::Op> ops;
  auto add = [&ops](std::function<void()> f) {
    ops.push_back({std::move(f), {}, {}});
    return static_cast<int>(ops.size()) - 1;
  };
  // The copy y = x, the floor that fwd / bwd GB/s are held against. Its destination is already
  // faulted in (fill() wrote y, on the same threads and static partition as here), so no round
  // pays for first touch. It is kCopyRepsPerRound ops of each round rather than one: more
  // samples for its best, and spread over the whole shape's run between the BN calls (the
  // shuffle places each), so that a slow period of the machine shorter than that run cannot
  // cover them all, as it can a burst of copies back to back.
  const std::function<void()> copy = [&] {
    T* __restrict__ dst = y.data();
    const T* __restrict__ src = x.data();
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < count; ++i) dst[i] = src[i];
  };
  int op_copy[kCopyRepsPerRound];
  for (int& op : op_copy) op = add(copy);
  int op_fwd[3] = {-1, -1, -1}, op_bwd[3] = {-1, -1, -1};
  bench::ExchangeLog exchange[3][2];  // per mode, fwd / bwd: the exchange of each call
  for (int m = 0; m < 4; ++m) {  // local, sync, allgather; 3: sync's logged exchange
    if (!o.mode[m == 3 ? 1 : m]) continue;
    syncbn::BatchNorm* bn = m == 0 ? &local : m == 1 ? &synced : m == 2 ? &gathered : &logged;
    bench::ExchangeComm* ec = m == 2 ? &comms.gather : m == 3 ? &comms.logged : nullptr;
    Stats* st = &stats[m];
    const bool gather_fwd = m == 2, gather_bwd = m == 2 && o.allgather_bwd;
    bench::ExchangeLog* exch_fwd = m == 2 ? &exchange[2][0] : m == 3 ? &exchange[1][0] : nullptr;
    bench::ExchangeLog* exch_bwd = m == 2 ? &exchange[2][1] : m == 3 ? &exchange[1][1] : nullptr;
    const int f = add([&, bn, st, ec, gather_fwd, exch_fwd] {
      if (ec) {
        ec->set_allgather(gather_fwd);
        ec->set_log(exch_fwd);
      }
      bn->forward_training(shape, x.data(), weight.data(), bias.data(), y.data(), st->mean.data(),
                           st->invstd.data(), st->running_mean.data(), st->running_var.data(),
                           &st->num_batches_tracked);
      if (ec) {
        ec->set_log(nullptr);
        ec->set_allgather(false);
      }
    });
    const int b = add([&, bn, st, ec, gather_bwd, exch_bwd] {
      if (ec) {
        ec->set_allgather(gather_bwd);
        ec->set_log(exch_bwd);
      }
      bn->backward(shape, x.data(), dy.data(), weight.data(), st->mean.data(), st->invstd.data(),
                   dx.data(), dweight.data(), dbias.data());
      if (ec) {
        ec->set_log(nullptr);
        ec->set_allgather(false);
      }
    });
    if (m < 3) {
      op_fwd[m] = f;
      op_bwd[m] = b;
    }
    if (m == 2) chk.expected_hits += (o.common.iters + o.common.warmup) * (gather_bwd ? 2L : 1L);
  }
  // A bare allreduce of the buffer sync mode sends (zeros, so repeated sums stay finite).
  std::vector<double> packed(static_cast<std::size_t>(2 * C + 18), 0.0);
  const int op_allreduce = add([&] {
    MPI_Allreduce(MPI_IN_PLACE, packed.data(), static_cast<int>(packed.size()), MPI_DOUBLE, MPI_SUM,
                  allreduce_comm);
  });
  int op_dnnl_fwd = -1, op_dnnl_bwd = -1;
#ifdef SYNCBN_BENCH_HAVE_ONEDNN
  std::unique_ptr<bench::OneDnnBatchNorm> dnnl_bn;
  std::vector<float> dnnl_dweight(C), dnnl_dbias(C);
  if constexpr (std::is_same_v<T, float>) {
    if (o.onednn) {
      dnnl_bn = std::make_unique<bench::OneDnnBatchNorm>(
          s.n, s.c, s.h, s.w, o.nhwc, static_cast<float>(config.eps), x.data(), y.data(), dy.data(),
          dx.data(), weight.data(), bias.data(), dnnl_dweight.data(), dnnl_dbias.data());
      op_dnnl_fwd = add([&] { dnnl_bn->forward(); });
      op_dnnl_bwd = add([&] { dnnl_bn->backward(); });
    }
  }
#endif

  const std::vector<double> t =
      bench::time_interleaved(ops, o.common.iters, o.common.warmup, mpi);
  auto seconds = [&t](int op) { return op < 0 ? kNaN : t[static_cast<std::size_t>(op)]; };

  if (o.check) {
    // Synchronized statistics must be the same on every rank; allgather's those of sync.
    for (int m = 1; m < 3; ++m) {
      if (!o.mode[m]) continue;
      const int unequal = unequal_across_ranks(stats[m].mean.data(), C, mpi);
      (m == 1 ? chk.sync_shapes : chk.allgather_shapes) += 1;
      (m == 1 ? chk.sync_unequal : chk.allgather_unequal) += unequal != 0;
    }
    if (o.mode[1] && o.mode[2]) {
      double rel = 0;
      for (int64_t i = 0; i < C; ++i) {
        const double m1 = stats[1].mean[i], m2 = stats[2].mean[i];
        const double s1 = stats[1].invstd[i], s2 = stats[2].invstd[i];
        rel = std::max(rel, std::fabs(m2 - m1) / std::max(std::fabs(m1), 1e-30));
        rel = std::max(rel, std::fabs(s2 - s1) / std::max(std::fabs(s1), 1e-30));
      }
      chk.allgather_vs_sync = nan_max(chk.allgather_vs_sync, bench::max_over_ranks(rel, mpi));
    }
#ifdef SYNCBN_BENCH_HAVE_ONEDNN
    if (dnnl_bn) {
      // oneDNN's y and dx land in y and dx; syncbn's (local plan) in dx and then y.
      Stats& st = stats[0];
      dnnl_bn->forward();
      local.forward_training(shape, x.data(), weight.data(), bias.data(), dx.data(), st.mean.data(),
                             st.invstd.data(), st.running_mean.data(), st.running_var.data(),
                             &st.num_batches_tracked);
      const double fwd_diff = max_abs_diff(y.data(), dx.data(), count);
      dnnl_bn->backward();
      local.backward(shape, x.data(), dy.data(), weight.data(), st.mean.data(), st.invstd.data(),
                     y.data(), dweight.data(), dbias.data());
      const double bwd_diff = max_abs_diff(dx.data(), y.data(), count);
      chk.fwd_diff = nan_max(chk.fwd_diff, bench::max_over_ranks(fwd_diff, mpi));
      chk.bwd_diff = nan_max(chk.bwd_diff, bench::max_over_ranks(bwd_diff, mpi));
      chk.onednn_shapes += 1;
    }
#endif
  }

  // The copy floor: each repetition as all ranks ran it together (started by the barrier, so
  // competing for memory bandwidth as in the BN calls; bench::lockstep_seconds), and of those
  // the fastest: the most the memory system moved, which load from outside can only slow down
  // (the median of the same repetitions is reported next to it, to show the spread).
  std::vector<double> copy_t;
  for (const int op : op_copy) {
    const std::vector<double> t_op = bench::lockstep_seconds(ops[op], o.one_host, mpi);
    copy_t.insert(copy_t.end(), t_op.begin(), t_op.end());
  }
  const double t_copy_best = bench::minimum(copy_t), t_copy_med = bench::median(copy_t);

  const double tensor_bytes = static_cast<double>(count) * sizeof(T);
  const double t_allreduce = seconds(op_allreduce);
  const double t_dnnl_fwd = seconds(op_dnnl_fwd), t_dnnl_bwd = seconds(op_dnnl_bwd);
  struct Times {
    double fwd, bwd;
  } times[3];
  for (int m = 0; m < 3; ++m) times[m] = {seconds(op_fwd[m]), seconds(op_bwd[m])};
  // Overheads: per round, the mode's call and local's call each as long as on the slowest rank
  // (max over ranks); the median over rounds of their difference. Both calls then include the
  // slowest rank's kernels, so what remains is what the exchange adds; and pairing within a
  // round cancels slow periods that hit both (outside load), which a difference of two medians
  // would not: the allreduce is ~1000x shorter than the kernels.
  double overhead[3][2];
  for (int m = 0; m < 3; ++m) {
    for (int d = 0; d < 2; ++d) {
      overhead[m][d] = kNaN;
      const int op = d == 0 ? op_fwd[m] : op_bwd[m], base = d == 0 ? op_fwd[0] : op_bwd[0];
      if (m == 0 || op < 0 || base < 0) continue;  // the same on every rank
      std::vector<double> mode_t = ops[op].seconds, local_t = ops[base].seconds;
      bench::max_over_ranks(mode_t, mpi);
      bench::max_over_ranks(local_t, mpi);
      for (std::size_t i = 0; i < mode_t.size(); ++i) mode_t[i] -= local_t[i];
      overhead[m][d] = bench::median(mode_t);
    }
  }
  // The exchange inside the calls of the timed rounds (the last iters): from the moment the last
  // rank entered the custom communicator's exchange to the moment the last rank left it, median
  // over calls. The ranks' steady clocks are one clock only on one host; elsewhere n/a.
  double exchange_s[3][2];
  for (int m = 0; m < 3; ++m) {
    for (int d = 0; d < 2; ++d) {
      exchange_s[m][d] = kNaN;
      const bench::ExchangeLog& e = exchange[m][d];
      const int iters = o.common.iters;
      if (!o.one_host || e.enter.size() < static_cast<std::size_t>(iters)) continue;
      std::vector<double> enter(e.enter.end() - iters, e.enter.end());
      std::vector<double> leave(e.leave.end() - iters, e.leave.end());
      bench::max_over_ranks(enter, mpi);
      bench::max_over_ranks(leave, mpi);
      for (int i = 0; i < iters; ++i) leave[i] -= enter[i];
      exchange_s[m][d] = bench::median(leave);
    }
  }

  std::vector<Row> rows;
  for (int m = 0; m < 3; ++m) {
    if (!o.mode[m]) continue;
    Row r;
    r.shape = s;
    r.mode = kModes[m];
    r.dtype = o.f64 ? "f64" : "f32";
    r.layout = o.nhwc ? "nhwc" : "nchw";
    r.ranks = comms.world.size();
    r.threads = omp_get_max_threads();
    r.tensor_bytes = static_cast<int64_t>(tensor_bytes);
    r.bytes_fwd = 3 * tensor_bytes;
    r.bytes_bwd = 5 * tensor_bytes;
    r.fwd_us = times[m].fwd * 1e6;
    r.bwd_us = times[m].bwd * 1e6;
    r.fwd_gbs = r.bytes_fwd / times[m].fwd / 1e9;
    r.bwd_gbs = r.bytes_bwd / times[m].bwd / 1e9;
    r.copy_best_gbs = 2 * tensor_bytes / t_copy_best / 1e9;
    r.copy_med_gbs = 2 * tensor_bytes / t_copy_med / 1e9;
    r.fwd_pct_copy = 100 * r.fwd_gbs / r.copy_best_gbs;
    r.bwd_pct_copy = 100 * r.bwd_gbs / r.copy_best_gbs;
    r.allreduce_us = t_allreduce * 1e6;
    r.exchange_fwd_us = exchange_s[m][0] * 1e6;
    r.exchange_bwd_us = exchange_s[m][1] * 1e6;
    if (m >= 1 && o.mode[0]) {
      r.overhead_fwd_us = overhead[m][0] * 1e6;
      r.overhead_bwd_us = overhead[m][1] * 1e6;
      r.overhead_fwd_ratio = r.overhead_fwd_us / r.allreduce_us;
      r.overhead_bwd_ratio = r.overhead_bwd_us / r.allreduce_us;
    }
    r.onednn_fwd_us = t_dnnl_fwd * 1e6;
    r.onednn_bwd_us = t_dnnl_bwd * 1e6;
    r.ratio_onednn_fwd = times[m].fwd / t_dnnl_fwd;
    r.ratio_onednn_bwd = times[m].bwd / t_dnnl_bwd;
    rows.push_back(r);
  }
  return rows;
}

}  // namespace

std::vector<Row> run_shape(const Shape4& s, const Options& o, const Comms& comms, MPI_Comm mpi,
                           MPI_Comm allreduce_comm, int rank, Checks& chk) {
  return o.f64 ? run_shape<double>(s, o, comms, mpi, allreduce_comm, rank, chk)
               : run_shape<float>(s, o, comms, mpi, allreduce_comm, rank, chk);
}

}  // namespace syncbn_bench
