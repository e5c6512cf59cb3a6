// syncbn_bench: synchronized batch norm on P MPI ranks, in the style of nccl-tests. One table row
// per shape and mode, with units in the header, times reduced over ranks, and goals counted in
// the footer. Run it under the launch script:
//
//   launch/run_local.sh -n P -- build/bench/syncbn_bench [--shape NxCxHxW ...] [--batch 32]
//       [--dtype f32|f64] [--layout nchw|nhwc] [-n 20] [-w 3] [--mode local,sync,allgather]
//       [--csv FILE] [--json FILE] [--no-onednn] [--no-check] [--allgather-bwd]
//
// Shapes are per rank (weak scaling: the global batch is P x N). The default is the distinct
// batch-norm input shapes of ResNet-50 at N = --batch.
//
// Modes (each times forward training and backward of the same tensors):
//   local      a plan on syncbn_comm_create_self: the kernels, no communication.
//   sync       a plan on an MPI communicator over MPI_COMM_WORLD: one MPI_Allreduce(SUM) of
//              2C + 18 doubles per forward and per backward (docs/design.md section 2).
//   allgather  the exchange of PyTorch's SyncBatchNorm and Apex, as a baseline: every rank
//              allgathers every rank's statistics (P x the buffer) and combines them itself.
//              Built into this executable by PMPI interposition: the MPI_Allreduce defined below
//              takes precedence over Open MPI's for libsyncbn's calls (libsyncbn.so resolves
//              MPI_Allreduce dynamically, and the executable is first in the lookup scope), and
//              while g_allgather_mode is set it replaces an MPI_Allreduce(SUM) of doubles by
//              PMPI_Allgather of every rank's buffer (P x count doubles) and a sum of the P
//              contributions in rank order on every rank; anything else goes to PMPI_Allreduce.
//              The sums are those of sync mode (checked). As in PyTorch and Apex, only the
//              forward exchange is an allgather; their backward is an allreduce of
//              [sum dy | sum dy (x - mean)], so backward in this mode equals sync unless
//              --allgather-bwd. The calls that went through the replacement are counted, and a
//              warning is printed if there were none (the interposition did not take) or not as
//              many as allgather mode made.
//   Both sync and allgather run without a deadline (syncbn_comm_set_timeout 0): only then is
//   libsyncbn's exchange the MPI_Allreduce that allgather mode replaces (with a deadline it is
//   a polled point-to-point recursive doubling; bench/exchange_bench times the two against
//   each other).
//
// Per shape, on the same OpenMP threads and in the same run:
//   fwd, bwd (us)      median over the timed rounds of one call's wall time on each rank,
//                      then the maximum over ranks (MPI_Allreduce MAX). Every call starts after
//                      an MPI_Barrier, so ranks compete for memory alike in every mode. The
//                      measurements of a shape are interleaved: each of the -w + -n rounds runs
//                      copy, local fwd/bwd, sync fwd/bwd, allgather fwd/bwd, the bare allreduce
//                      and oneDNN fwd/bwd once, in a random order (the same on every rank), so
//                      outside load (shared machines) and cache state hit all alike.
//   GB/s               bytes that must move over that time: forward reads x twice and writes y
//                      (3 x tensor bytes), backward reads x and dy twice and writes dx (5 x), as
//                      in kernel_bench.
//   copy GB/s, % copy  a STREAM-style copy y = x of the same tensor (2 x tensor bytes), median,
//                      max over ranks; % copy = GB/s / copy GB/s.
//   allreduce (us)     a bare MPI_Allreduce(SUM, in place) of 2C + 18 doubles on a duplicate of
//                      MPI_COMM_WORLD, one call per round at a random point between the other
//                      ops, median, max over ranks. Like the library's allreduce, it then
//                      follows work that streamed megabytes through the caches; in a hot loop
//                      it is up to ~10x faster on this machine (nccl-tests style numbers), which
//                      would not be a fair baseline.
//   in fwd, in bwd     (table only) the exchange inside libsyncbn's sync or allgather call,
//                      logged by the interposed MPI_Allreduce: from the last rank's entry to the
//                      last rank's exit, median over calls. Waiting for the slowest rank's
//                      kernels is not in it; it is the number to hold against the bare
//                      allreduce without the kernels' noise. Needs one host (one clock).
//   overhead           sync (or allgather) time minus local time of the same shape in this run,
//                      and that over the bare allreduce (forward and backward): per round, each
//                      call's time on the slowest rank (max over ranks); the median over rounds
//                      of the difference. Both sides include the slowest rank's kernels, so the
//                      ranks' imbalance (which the fwd / bwd columns of sync rows do include)
//                      cancels, and pairing within a round cancels slow periods of the machine.
//                      Needs local mode in the run.
//   oneDNN             dnnl::batch_normalization_forward (forward_training, use_scale |
//                      use_shift) and batch_normalization_backward (backward, use_scale |
//                      use_shift), same shape, layout and threads; f32 only (oneDNN has no f64
//                      batch norm). ours / oneDNN < 1: syncbn is faster.
//
// Goals (footer): forward and backward at >= 80% of copy where one rank's tensor is larger than
// the last-level cache (sysfs, else sysconf) (local rows); faster than oneDNN (local rows); sync
// overhead <= 1.2 x the bare allreduce (sync rows, 2 or more ranks).
// Check (default on, --no-check): syncbn's local forward output y and backward dx against
// oneDNN's (max abs difference over all ranks); save_mean of sync and allgather mode identical
// on every rank; allgather's saved statistics against sync's.
//
// Exit status: 0; 1 if a check failed (a WRONG in the footer); 2 on bad arguments.
// Only rank 0 prints and writes files. CSV: one header line, one line per row, empty fields for
// n/a. JSON: {"meta": {...}, "results": [{same keys as the CSV}, ...]}, null for n/a.
#include <mpi.h>
#include <omp.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cinttypes>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <fstream>
#include <functional>
#include <limits>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "syncbn/syncbn.hpp"
#include "syncbn/syncbn_mpi.hpp"
#ifdef SYNCBN_BENCH_HAVE_ONEDNN
#include "onednn_bn.hpp"
#endif

// ---- allgather mode: MPI_Allreduce interposed --------------------------------------------------

// Set around the syncbn calls timed in allgather mode. MPI calls come from one thread.
bool g_allgather_mode = false;
// Calls that went through the allgather replacement.
long g_allgather_hits = 0;
// When set, every MPI_Allreduce logs when it was entered and left (steady_clock, seconds): the
// exchange as libsyncbn's sync and allgather calls see it.
struct ExchangeLog {
  std::vector<double> enter, leave;
};
ExchangeLog* g_exchange_log = nullptr;

namespace {

std::vector<double> g_gathered;  // P x count, reused across calls

// The allgather exchange: every rank's count doubles to every rank, summed in rank order.
int allgather_sum(const void* sendbuf, void* recvbuf, int count, MPI_Comm comm) {
  ++g_allgather_hits;
  int size = 0;
  int rc = PMPI_Comm_size(comm, &size);
  if (rc != MPI_SUCCESS) return rc;
  const std::size_t n = static_cast<std::size_t>(count);
  g_gathered.resize(static_cast<std::size_t>(size) * n);
  const void* mine = sendbuf == MPI_IN_PLACE ? recvbuf : sendbuf;
  rc = PMPI_Allgather(mine, count, MPI_DOUBLE, g_gathered.data(), count, MPI_DOUBLE, comm);
  if (rc != MPI_SUCCESS) return rc;
  // The combine: the same sum on every rank, in rank order.
  double* out = static_cast<double*>(recvbuf);
  for (std::size_t i = 0; i < n; ++i) {
    double s = g_gathered[i];
    for (int r = 1; r < size; ++r) s += g_gathered[static_cast<std::size_t>(r) * n + i];
    out[i] = s;
  }
  return MPI_SUCCESS;
}

}  // namespace

extern "C" int MPI_Allreduce(const void* sendbuf, void* recvbuf, int count, MPI_Datatype datatype,
                             MPI_Op op, MPI_Comm comm) {
  const bool gather = g_allgather_mode && op == MPI_SUM && datatype == MPI_DOUBLE && count > 0;
  if (!gather && !g_exchange_log) {
    return PMPI_Allreduce(sendbuf, recvbuf, count, datatype, op, comm);
  }
  using seconds = std::chrono::duration<double>;
  const double enter = seconds(std::chrono::steady_clock::now().time_since_epoch()).count();
  const int rc = gather ? allgather_sum(sendbuf, recvbuf, count, comm)
                        : PMPI_Allreduce(sendbuf, recvbuf, count, datatype, op, comm);
  if (g_exchange_log) {
    g_exchange_log->enter.push_back(enter);
    g_exchange_log->leave.push_back(
        seconds(std::chrono::steady_clock::now().time_since_epoch()).count());
  }
  return rc;
}

namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr double kCopyGoal = 0.80;        // fraction of copy bandwidth
constexpr double kOverheadGoal = 1.2;     // sync overhead / bare allreduce
constexpr double kCheckTolerance = 1e-3;  // max abs difference to oneDNN (f32, values O(1))
const char* const kModes[] = {"local", "sync", "allgather"};

// ---- shapes, options ----------------------------------------------------------------------------

struct Shape {
  int64_t n, c, h, w;
  int64_t count() const { return n * c * h * w; }
  std::string name() const {
    return std::to_string(n) + "x" + std::to_string(c) + "x" + std::to_string(h) + "x" +
           std::to_string(w);
  }
};

Shape parse_shape(const std::string& s) {
  Shape sh{};
  char tail = 0;
  if (std::sscanf(s.c_str(), "%" SCNd64 "x%" SCNd64 "x%" SCNd64 "x%" SCNd64 "%c", &sh.n, &sh.c,
                  &sh.h, &sh.w, &tail) != 4 ||
      sh.n < 1 || sh.c < 1 || sh.h < 1 || sh.w < 1) {
    throw CLI::ValidationError("--shape", "expected NxCxHxW with positive sizes, got " + s);
  }
  return sh;
}

// The distinct batch-norm input shapes (C x H x W) of ResNet-50 (torchvision, 224 x 224 input).
std::vector<Shape> resnet50_shapes(int64_t batch) {
  const int64_t chw[][3] = {{64, 112, 112}, {64, 56, 56},  {256, 56, 56}, {128, 56, 56},
                            {128, 28, 28},  {512, 28, 28}, {256, 28, 28}, {256, 14, 14},
                            {1024, 14, 14}, {512, 14, 14}, {512, 7, 7},   {2048, 7, 7}};
  std::vector<Shape> shapes;
  for (const auto& s : chw) shapes.push_back({batch, s[0], s[1], s[2]});
  return shapes;
}

struct Options {
  std::vector<Shape> shapes;
  bool f64 = false;
  bool nhwc = false;
  int iters = 20;
  int warmup = 3;
  bool mode[3] = {true, true, true};  // local, sync, allgather
  std::string csv, json;
  bool onednn = true;
  bool check = true;
  bool allgather_bwd = false;
  bool one_host = true;  // every rank on this host (one steady clock)
};

// ---- machine -----------------------------------------------------------------------------------

struct Llc {
  int64_t bytes = 0;
  std::string source = "unknown";
};

int64_t parse_cache_size(const std::string& s) {  // "32768K", "32M", "1048576"
  char* end = nullptr;
  const double v = std::strtod(s.c_str(), &end);
  if (end == s.c_str()) return 0;
  const char unit = *end;
  const double scale = unit == 'K'   ? 1024.0
                       : unit == 'M' ? 1048576.0
                       : unit == 'G' ? 1073741824.0
                                     : 1.0;
  return static_cast<int64_t>(v * scale);
}

// The last-level cache: the highest data or unified level in sysfs (cpu0); else glibc's
// sysconf(_SC_LEVEL3_CACHE_SIZE) (on some VMs that one is the L3 size times the thread count).
Llc last_level_cache() {
  Llc llc;
  int best_level = 0;
  for (int i = 0; i < 16; ++i) {
    const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(i) + "/";
    std::ifstream flevel(dir + "level"), ftype(dir + "type"), fsize(dir + "size");
    int level = 0;
    std::string type, size;
    if (!(flevel >> level) || !(ftype >> type) || !(fsize >> size)) continue;
    if (type == "Instruction" || level < best_level) continue;
    const int64_t bytes = parse_cache_size(size);
    if (bytes > 0) {
      best_level = level;
      llc = {bytes, "sysfs L" + std::to_string(level)};
    }
  }
  if (llc.bytes > 0) return llc;
#ifdef _SC_LEVEL3_CACHE_SIZE
  const long l3 = sysconf(_SC_LEVEL3_CACHE_SIZE);
  if (l3 > 0) return {l3, "sysconf L3"};
#endif
#ifdef _SC_LEVEL2_CACHE_SIZE
  const long l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);
  if (l2 > 0) return {l2, "sysconf L2"};
#endif
  return llc;
}

std::string cpu_model() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("model name", 0) == 0) {
      const auto colon = line.find(':');
      if (colon != std::string::npos) {
        std::string m = line.substr(colon + 1);
        m.erase(0, m.find_first_not_of(" \t"));
        return m;
      }
    }
  }
  return "unknown";
}

std::string host_name() {
  char buf[256] = {};
  if (gethostname(buf, sizeof buf - 1) != 0) return "unknown";
  return buf;
}

std::string utc_now() {
  const std::time_t t = std::time(nullptr);
  std::tm tm{};
  gmtime_r(&t, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

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

// ---- timing ------------------------------------------------------------------------------------

double median_of(std::vector<double> t) {
  std::nth_element(t.begin(), t.begin() + t.size() / 2, t.end());
  return t[t.size() / 2];
}

// One measured operation of a shape.
struct Op {
  std::function<void()> run;
  std::vector<double> seconds;
};

// Interleaved timing: warmup untimed rounds, then iters timed rounds, each running every op
// once, every call after an MPI_Barrier. Load from outside (these machines are shared) then
// falls on all ops alike, and their ratios stay meaningful. Each round runs the ops in a new
// random order (the same on every rank), so that no op always follows the same one: what a
// predecessor leaves in the caches (clean or dirty lines of the same tensors) would bias the
// comparison. Returns, per op, the median of one call's wall time on this rank, then the maximum
// over ranks (seconds). The samples stay in op.seconds, in round order.
std::vector<double> time_interleaved(std::vector<Op>& ops, int iters, int warmup, MPI_Comm comm) {
  std::vector<std::size_t> order(ops.size());
  for (int round = 0; round < warmup + iters; ++round) {
    std::iota(order.begin(), order.end(), std::size_t{0});
    std::mt19937 rng(static_cast<unsigned>(round));  // the same order on every rank
    std::shuffle(order.begin(), order.end(), rng);
    for (const std::size_t j : order) {
      MPI_Barrier(comm);
      const auto a = std::chrono::steady_clock::now();
      ops[j].run();
      const double t = std::chrono::duration<double>(std::chrono::steady_clock::now() - a).count();
      if (round >= warmup) ops[j].seconds.push_back(t);
    }
  }
  std::vector<double> median;
  for (const Op& op : ops) median.push_back(median_of(op.seconds));
  MPI_Allreduce(MPI_IN_PLACE, median.data(), static_cast<int>(median.size()), MPI_DOUBLE, MPI_MAX,
                comm);
  return median;
}

double max_over_ranks(double v, MPI_Comm comm) {
  MPI_Allreduce(MPI_IN_PLACE, &v, 1, MPI_DOUBLE, MPI_MAX, comm);
  return v;
}

// ---- results -----------------------------------------------------------------------------------

struct Row {
  Shape shape;
  std::string mode;
  int64_t tensor_bytes = 0;
  double bytes_fwd = 0, bytes_bwd = 0;
  double fwd_us = kNaN, bwd_us = kNaN, fwd_gbs = kNaN, bwd_gbs = kNaN, copy_gbs = kNaN;
  double fwd_pct_copy = kNaN, bwd_pct_copy = kNaN, allreduce_us = kNaN;
  double overhead_fwd_us = kNaN, overhead_bwd_us = kNaN;
  double exchange_fwd_us = kNaN, exchange_bwd_us = kNaN;  // table only, not in CSV / JSON
  double overhead_fwd_ratio = kNaN, overhead_bwd_ratio = kNaN;
  double onednn_fwd_us = kNaN, onednn_bwd_us = kNaN;
  double ratio_onednn_fwd = kNaN, ratio_onednn_bwd = kNaN;
};

struct Checks {
  double fwd_diff = kNaN, bwd_diff = kNaN;  // max over shapes and ranks, vs oneDNN
  int onednn_shapes = 0;
  int sync_shapes = 0, sync_unequal = 0;            // save_mean identical on every rank?
  int allgather_shapes = 0, allgather_unequal = 0;  // the same for allgather mode
  double allgather_vs_sync = kNaN;                  // max rel diff of saved statistics
  long expected_hits = 0;                           // calls allgather mode made into MPI
};

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
std::vector<Row> run_shape(const Shape& s, const Options& o, const syncbn::Communicator& world,
                           MPI_Comm mpi, MPI_Comm allreduce_comm, int rank, Checks& chk) {
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
  } stats[3];
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
  syncbn::BatchNorm local(syncbn::Communicator::self(), config);
  syncbn::BatchNorm synced;  // COLLECTIVE: every rank makes it, for sync and allgather mode
  if (o.mode[1] || o.mode[2]) synced = syncbn::BatchNorm(world, config);

  // The ops, in the order they run within a round. Indices into the result: -1 if not run.
  std::vector<Op> ops;
  auto add = [&ops](std::function<void()> f) {
    ops.push_back({std::move(f), {}});
    return static_cast<int>(ops.size()) - 1;
  };
  const int op_copy = add([&] {
    T* __restrict__ dst = y.data();
    const T* __restrict__ src = x.data();
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < count; ++i) dst[i] = src[i];
  });
  int op_fwd[3] = {-1, -1, -1}, op_bwd[3] = {-1, -1, -1};
  ExchangeLog exchange[3][2];    // per mode, fwd / bwd: the MPI_Allreduce of each call
  for (int m = 0; m < 3; ++m) {  // local, sync, allgather
    if (!o.mode[m]) continue;
    syncbn::BatchNorm* bn = m == 0 ? &local : &synced;
    Stats* st = &stats[m];
    const bool gather_fwd = m == 2, gather_bwd = m == 2 && o.allgather_bwd;
    ExchangeLog* exch_fwd = m == 0 ? nullptr : &exchange[m][0];
    ExchangeLog* exch_bwd = m == 0 ? nullptr : &exchange[m][1];
    op_fwd[m] = add([&, bn, st, gather_fwd, exch_fwd] {
      g_allgather_mode = gather_fwd;
      g_exchange_log = exch_fwd;
      bn->forward_training(shape, x.data(), weight.data(), bias.data(), y.data(), st->mean.data(),
                           st->invstd.data(), st->running_mean.data(), st->running_var.data(),
                           &st->num_batches_tracked);
      g_exchange_log = nullptr;
      g_allgather_mode = false;
    });
    op_bwd[m] = add([&, bn, st, gather_bwd, exch_bwd] {
      g_allgather_mode = gather_bwd;
      g_exchange_log = exch_bwd;
      bn->backward(shape, x.data(), dy.data(), weight.data(), st->mean.data(), st->invstd.data(),
                   dx.data(), dweight.data(), dbias.data());
      g_exchange_log = nullptr;
      g_allgather_mode = false;
    });
    if (m == 2) chk.expected_hits += (o.iters + o.warmup) * (gather_bwd ? 2L : 1L);
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

  const std::vector<double> t = time_interleaved(ops, o.iters, o.warmup, mpi);
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
      chk.allgather_vs_sync = nan_max(chk.allgather_vs_sync, max_over_ranks(rel, mpi));
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
      chk.fwd_diff = nan_max(chk.fwd_diff, max_over_ranks(fwd_diff, mpi));
      chk.bwd_diff = nan_max(chk.bwd_diff, max_over_ranks(bwd_diff, mpi));
      chk.onednn_shapes += 1;
    }
#endif
  }

  const double tensor_bytes = static_cast<double>(count) * sizeof(T);
  const double t_copy = seconds(op_copy), t_allreduce = seconds(op_allreduce);
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
      MPI_Allreduce(MPI_IN_PLACE, mode_t.data(), static_cast<int>(mode_t.size()), MPI_DOUBLE,
                    MPI_MAX, mpi);
      MPI_Allreduce(MPI_IN_PLACE, local_t.data(), static_cast<int>(local_t.size()), MPI_DOUBLE,
                    MPI_MAX, mpi);
      for (std::size_t i = 0; i < mode_t.size(); ++i) mode_t[i] -= local_t[i];
      overhead[m][d] = median_of(mode_t);
    }
  }
  // The exchange inside the calls of the timed rounds (the last iters): from the moment the last
  // rank entered the MPI_Allreduce to the moment the last rank left it, median over calls. The
  // ranks' steady clocks are one clock only on one host; elsewhere n/a.
  double exchange_s[3][2];
  for (int m = 0; m < 3; ++m) {
    for (int d = 0; d < 2; ++d) {
      exchange_s[m][d] = kNaN;
      const ExchangeLog& e = exchange[m][d];
      if (!o.one_host || e.enter.size() < static_cast<std::size_t>(o.iters)) continue;
      std::vector<double> enter(e.enter.end() - o.iters, e.enter.end());
      std::vector<double> leave(e.leave.end() - o.iters, e.leave.end());
      MPI_Allreduce(MPI_IN_PLACE, enter.data(), o.iters, MPI_DOUBLE, MPI_MAX, mpi);
      MPI_Allreduce(MPI_IN_PLACE, leave.data(), o.iters, MPI_DOUBLE, MPI_MAX, mpi);
      for (int i = 0; i < o.iters; ++i) leave[i] -= enter[i];
      exchange_s[m][d] = median_of(leave);
    }
  }

  std::vector<Row> rows;
  for (int m = 0; m < 3; ++m) {
    if (!o.mode[m]) continue;
    Row r;
    r.shape = s;
    r.mode = kModes[m];
    r.tensor_bytes = static_cast<int64_t>(tensor_bytes);
    r.bytes_fwd = 3 * tensor_bytes;
    r.bytes_bwd = 5 * tensor_bytes;
    r.fwd_us = times[m].fwd * 1e6;
    r.bwd_us = times[m].bwd * 1e6;
    r.fwd_gbs = r.bytes_fwd / times[m].fwd / 1e9;
    r.bwd_gbs = r.bytes_bwd / times[m].bwd / 1e9;
    r.copy_gbs = 2 * tensor_bytes / t_copy / 1e9;
    r.fwd_pct_copy = 100 * r.fwd_gbs / r.copy_gbs;
    r.bwd_pct_copy = 100 * r.bwd_gbs / r.copy_gbs;
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

// ---- output ------------------------------------------------------------------------------------

std::string csv_num(double v) {
  if (std::isnan(v)) return "";
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.6g", v);
  return buf;
}

// A right-aligned table cell of at most width characters: "n/a" for NaN; fewer decimals, then
// %g, when the value does not fit.
std::string cell(double v, int width, int precision) {
  char buf[64];
  if (std::isnan(v)) {
    std::snprintf(buf, sizeof buf, "%*s", width, "n/a");
    return buf;
  }
  for (int p = precision; p >= 0; --p) {
    if (std::snprintf(buf, sizeof buf, "%*.*f", width, p, v) <= width) return buf;
  }
  std::snprintf(buf, sizeof buf, "%*.*g", width, std::max(width - 6, 1), v);
  return buf;
}

void print_table_header() {
  std::printf("#\n");
  std::printf("# %18s %6s %9s  %-42s  %-6s  %-11s  %-9s  %-55s  %-34s\n", "", "", "",
              "------------- syncbn -------------", " copy", " % of copy", "   bare",
              "----------------- exchange and overhead -----------------",
              "------------- oneDNN -------------");
  std::printf(
      "# %18s %6s %9s  %10s %10s %10s %10s  %6s  %5s %5s  %9s  %9s %9s %9s %9s %6s %6s  "
      "%8s %8s %7s %7s\n",
      "shape (NxCxHxW)", "size", "mode", "fwd", "bwd", "fwd", "bwd", "", "fwd", "bwd", "allreduce",
      "in fwd", "in bwd", "ovh fwd", "ovh bwd", "fwd", "bwd", "fwd", "bwd", "ours/", "ours/");
  std::printf(
      "# %18s %6s %9s  %10s %10s %10s %10s  %6s  %5s %5s  %9s  %9s %9s %9s %9s %6s %6s  "
      "%8s %8s %7s %7s\n",
      "", "(MiB)", "", "(us)", "(us)", "(GB/s)", "(GB/s)", "(GB/s)", "(%)", "(%)", "(us)", "(us)",
      "(us)", "(us)", "(us)", "(x ar)", "(x ar)", "(us)", "(us)", "dnnl", "dnnl");
  std::fflush(stdout);
}

void print_row(const Row& r) {
  std::printf("  %18s %6.1f %9s  %s %s %s %s  %s  %s %s  %s  %s %s %s %s %s %s  %s %s %s %s\n",
              r.shape.name().c_str(), static_cast<double>(r.tensor_bytes) / 1048576.0,
              r.mode.c_str(), cell(r.fwd_us, 10, 1).c_str(), cell(r.bwd_us, 10, 1).c_str(),
              cell(r.fwd_gbs, 10, 2).c_str(), cell(r.bwd_gbs, 10, 2).c_str(),
              cell(r.copy_gbs, 6, 1).c_str(), cell(r.fwd_pct_copy, 5, 0).c_str(),
              cell(r.bwd_pct_copy, 5, 0).c_str(), cell(r.allreduce_us, 9, 2).c_str(),
              cell(r.exchange_fwd_us, 9, 2).c_str(), cell(r.exchange_bwd_us, 9, 2).c_str(),
              cell(r.overhead_fwd_us, 9, 1).c_str(), cell(r.overhead_bwd_us, 9, 1).c_str(),
              cell(r.overhead_fwd_ratio, 6, 2).c_str(), cell(r.overhead_bwd_ratio, 6, 2).c_str(),
              cell(r.onednn_fwd_us, 8, 0).c_str(), cell(r.onednn_bwd_us, 8, 0).c_str(),
              cell(r.ratio_onednn_fwd, 7, 2).c_str(), cell(r.ratio_onednn_bwd, 7, 2).c_str());
  std::fflush(stdout);
}

struct Tally {
  int pass = 0, miss = 0;
  void add(bool ok) { (ok ? pass : miss) += 1; }
  std::string str() const {
    if (pass + miss == 0) return "n/a";
    return std::to_string(pass) + " PASS, " + std::to_string(miss) + " MISS";
  }
};

struct Meta {
  std::string date, host, cpu, dtype, layout, llc_source, onednn;
  int ranks = 1, threads = 1, cpus = 1, iters = 0, warmup = 0;
  std::string omp_env;
  int64_t llc_bytes = 0;
};

void print_footer(const std::vector<Row>& rows, const Checks& chk, const Options& o,
                  const Meta& meta) {
  Tally copy_fwd, copy_bwd, dnnl_fwd, dnnl_bwd, ovh_fwd, ovh_bwd;
  for (const Row& r : rows) {
    if (r.mode == "local" && meta.llc_bytes > 0 && r.tensor_bytes > meta.llc_bytes) {
      copy_fwd.add(r.fwd_pct_copy >= 100 * kCopyGoal);
      copy_bwd.add(r.bwd_pct_copy >= 100 * kCopyGoal);
    }
    if (r.mode == "local" && !std::isnan(r.ratio_onednn_fwd)) {
      dnnl_fwd.add(r.ratio_onednn_fwd < 1);
      dnnl_bwd.add(r.ratio_onednn_bwd < 1);
    }
    if (r.mode == "sync" && meta.ranks > 1 && !std::isnan(r.overhead_fwd_ratio)) {
      ovh_fwd.add(r.overhead_fwd_ratio <= kOverheadGoal);
      ovh_bwd.add(r.overhead_bwd_ratio <= kOverheadGoal);
    }
  }
  std::printf("#\n# Goals (a benchmark, not a test):\n");
  std::printf("#   >= %.0f%% of copy, local rows, tensor > LLC (%.1f MiB):  fwd %s;  bwd %s\n",
              100 * kCopyGoal, static_cast<double>(meta.llc_bytes) / 1048576.0,
              copy_fwd.str().c_str(), copy_bwd.str().c_str());
  std::printf("#   faster than oneDNN (ours/dnnl < 1), local rows:       fwd %s;  bwd %s\n",
              dnnl_fwd.str().c_str(), dnnl_bwd.str().c_str());
  std::printf("#   sync overhead <= %.1fx bare allreduce, sync rows:      fwd %s;  bwd %s%s\n",
              kOverheadGoal, ovh_fwd.str().c_str(), ovh_bwd.str().c_str(),
              meta.ranks > 1 ? "" : "  (needs >= 2 ranks: on one rank MPI_Allreduce is a no-op)");
  if (o.check) {
    std::printf("# Check:\n");
    if (chk.onednn_shapes > 0) {
      const bool ok = chk.fwd_diff <= kCheckTolerance && chk.bwd_diff <= kCheckTolerance;
      std::printf(
          "#   local vs oneDNN, max |diff| over %d shapes and all ranks: y %.3g, dx %.3g  "
          "%s (tolerance %.0e)\n",
          chk.onednn_shapes, chk.fwd_diff, chk.bwd_diff, ok ? "OK" : "WRONG", kCheckTolerance);
    } else {
      std::printf("#   local vs oneDNN: n/a (%s)\n", o.f64      ? "f64"
                                                     : o.onednn ? "oneDNN not built in"
                                                                : "--no-onednn");
    }
    if (chk.sync_shapes > 0) {
      std::printf("#   sync save_mean identical on all %d ranks: %d of %d shapes  %s\n", meta.ranks,
                  chk.sync_shapes - chk.sync_unequal, chk.sync_shapes,
                  chk.sync_unequal == 0 ? "OK" : "WRONG");
    }
    if (chk.allgather_shapes > 0) {
      std::printf(
          "#   allgather save_mean identical on all %d ranks: %d of %d shapes  %s; "
          "max rel diff of save_mean/save_invstd to sync: %s\n",
          meta.ranks, chk.allgather_shapes - chk.allgather_unequal, chk.allgather_shapes,
          chk.allgather_unequal == 0 ? "OK" : "WRONG",
          std::isnan(chk.allgather_vs_sync) ? "n/a (needs sync mode)"
                                            : csv_num(chk.allgather_vs_sync).c_str());
    }
  }
  std::printf(
      "# Modes: local = self communicator (no exchange); sync = one MPI_Allreduce(SUM) of "
      "2C+18 doubles per call;\n");
  if (o.mode[2]) {
    std::printf(
        "#   allgather = PyTorch/Apex-style exchange: libsyncbn's MPI_Allreduce(SUM, double) "
        "interposed in this executable by\n");
    std::printf(
        "#   PMPI_Allgather of P x (2C+18) doubles + a rank-order sum on every rank, in "
        "%s.\n",
        o.allgather_bwd ? "forward and backward"
                        : "forward only (backward is an allreduce, as in PyTorch/Apex)");
    const char* warning = g_allgather_hits == chk.expected_hits ? ""
                          : g_allgather_hits == 0
                              ? "  WARNING: never called, the interposition did not take: "
                                "allgather rows are sync rows"
                              : "  WARNING: not the expected count";
    std::printf("#   allgather calls through the interposed MPI_Allreduce: %ld (expected %ld)%s\n",
                g_allgather_hits, chk.expected_hits, warning);
    if (*warning) std::fprintf(stderr, "syncbn_bench:%s\n", warning + 1);
  }
  if (o.mode[1] || o.mode[2]) {
    std::printf(
        "# Exchange: in fwd / in bwd = the MPI_Allreduce (allgather replacement in "
        "allgather mode) inside libsyncbn's call,\n#   last rank in to last rank out, "
        "median over calls (one host only; not in the CSV / JSON).\n");
  }
  std::printf(
      "# Times: median of %d rounds (%d warm-up), each running every op once in a random "
      "order, per rank, max over ranks;\n#   overhead = median over rounds of (mode - local), "
      "each call as long as on its slowest rank; (x ar) = overhead / bare allreduce.\n",
      o.iters, o.warmup);
  std::fflush(stdout);
}

std::string json_num(double v) {
  if (!std::isfinite(v)) return "null";
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.6g", v);
  return buf;
}

std::string json_str(const std::string& s) {
  std::string out = "\"";
  for (const char ch : s) {
    if (ch == '"' || ch == '\\') {
      out += '\\';
      out += ch;
    } else if (static_cast<unsigned char>(ch) < 0x20) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\u%04x", ch);
      out += buf;
    } else {
      out += ch;
    }
  }
  return out + "\"";
}

// The CSV / JSON fields of a row, in the documented order: (key, value, is_string).
std::vector<std::tuple<std::string, std::string, bool>> fields(const Row& r, const Meta& m,
                                                               bool json) {
  auto num = [json](double v) { return json ? json_num(v) : csv_num(v); };
  auto integer = [](int64_t v) { return std::to_string(v); };
  return {{"shape", r.shape.name(), true},
          {"n", integer(r.shape.n), false},
          {"c", integer(r.shape.c), false},
          {"h", integer(r.shape.h), false},
          {"w", integer(r.shape.w), false},
          {"dtype", m.dtype, true},
          {"layout", m.layout, true},
          {"mode", r.mode, true},
          {"ranks", integer(m.ranks), false},
          {"threads", integer(m.threads), false},
          {"bytes_fwd", integer(static_cast<int64_t>(r.bytes_fwd)), false},
          {"bytes_bwd", integer(static_cast<int64_t>(r.bytes_bwd)), false},
          {"fwd_us", num(r.fwd_us), false},
          {"bwd_us", num(r.bwd_us), false},
          {"fwd_gbs", num(r.fwd_gbs), false},
          {"bwd_gbs", num(r.bwd_gbs), false},
          {"copy_gbs", num(r.copy_gbs), false},
          {"fwd_pct_copy", num(r.fwd_pct_copy), false},
          {"bwd_pct_copy", num(r.bwd_pct_copy), false},
          {"allreduce_us", num(r.allreduce_us), false},
          {"overhead_fwd_us", num(r.overhead_fwd_us), false},
          {"overhead_bwd_us", num(r.overhead_bwd_us), false},
          {"overhead_fwd_ratio", num(r.overhead_fwd_ratio), false},
          {"overhead_bwd_ratio", num(r.overhead_bwd_ratio), false},
          {"onednn_fwd_us", num(r.onednn_fwd_us), false},
          {"onednn_bwd_us", num(r.onednn_bwd_us), false},
          {"ratio_onednn_fwd", num(r.ratio_onednn_fwd), false},
          {"ratio_onednn_bwd", num(r.ratio_onednn_bwd), false}};
}

void write_csv(const std::string& path, const std::vector<Row>& rows, const Meta& meta) {
  std::ofstream out(path);
  if (!out) throw std::runtime_error("cannot write " + path);
  const Row header_row{};
  bool first = true;
  for (const auto& f : fields(header_row, meta, false)) {
    out << (first ? "" : ",") << std::get<0>(f);
    first = false;
  }
  out << "\n";
  for (const Row& r : rows) {
    first = true;
    for (const auto& f : fields(r, meta, false)) {
      out << (first ? "" : ",") << std::get<1>(f);
      first = false;
    }
    out << "\n";
  }
}

void write_json(const std::string& path, const std::vector<Row>& rows, const Meta& m) {
  std::ofstream out(path);
  if (!out) throw std::runtime_error("cannot write " + path);
  out << "{\n  \"meta\": {"
      << "\"date\": " << json_str(m.date) << ", \"hostname\": " << json_str(m.host)
      << ", \"ranks\": " << m.ranks << ", \"threads\": " << m.threads
      << ", \"omp_threads\": " << m.threads
      << ", \"omp_num_threads_env\": " << (m.omp_env.empty() ? "null" : json_str(m.omp_env))
      << ", \"cpus_online\": " << m.cpus << ", \"dtype\": " << json_str(m.dtype)
      << ", \"layout\": " << json_str(m.layout) << ", \"cpu_model\": " << json_str(m.cpu)
      << ", \"llc_bytes\": " << m.llc_bytes << ", \"llc_source\": " << json_str(m.llc_source)
      << ", \"iterations\": " << m.iters << ", \"warmup\": " << m.warmup
      << ", \"onednn\": " << (m.onednn.empty() ? "null" : json_str(m.onednn)) << "},\n"
      << "  \"results\": [";
  for (std::size_t i = 0; i < rows.size(); ++i) {
    out << (i ? ",\n    {" : "\n    {");
    bool first = true;
    for (const auto& f : fields(rows[i], m, true)) {
      out << (first ? "" : ", ") << json_str(std::get<0>(f)) << ": "
          << (std::get<2>(f) ? json_str(std::get<1>(f)) : std::get<1>(f));
      first = false;
    }
    out << "}";
  }
  out << "\n  ]\n}\n";
}

int run(int argc, char** argv, int rank, int size) {
  CLI::App app{
      "syncbn_bench: synchronized batch norm over MPI ranks against a copy, a bare "
      "allreduce, an allgather exchange and oneDNN"};
  Options o;
  std::vector<std::string> shape_args;
  int64_t batch = 32;
  std::string dtype = "f32", layout = "nchw";
  std::vector<std::string> modes{"local", "sync", "allgather"};
  bool no_onednn = false;
  app.add_option("--shape", shape_args,
                 "NxCxHxW per rank, repeatable (default: the ResNet-50 BN shapes at --batch)");
  app.add_option("--batch", batch, "per-rank batch N of the default shapes")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--dtype", dtype, "f32 or f64")
      ->check(CLI::IsMember({"f32", "f64"}))
      ->capture_default_str();
  app.add_option("--layout", layout, "nchw (channels-first) or nhwc (channels-last)")
      ->check(CLI::IsMember({"nchw", "nhwc"}))
      ->capture_default_str();
  app.add_option("-n,--iters", o.iters, "timed rounds (median reported)")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("-w,--warmup", o.warmup, "warm-up rounds")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  app.add_option("--mode", modes, "local, sync, allgather: repeatable or a comma list")
      ->delimiter(',')
      ->check(CLI::IsMember({"local", "sync", "allgather"}))
      ->capture_default_str();
  app.add_option("--csv", o.csv, "write the rows as CSV to this file");
  app.add_option("--json", o.json, "write meta and rows as JSON to this file");
  app.add_flag("--no-onednn", no_onednn, "skip oneDNN");
  app.add_flag("--check,!--no-check", o.check, "check results (default on)");
  app.add_flag("--allgather-bwd", o.allgather_bwd,
               "allgather mode replaces backward's allreduce too (PyTorch/Apex do not)");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    if (rank == 0) app.exit(e);  // prints help or the error
    return e.get_exit_code() == 0 ? 0 : 2;
  }

  o.f64 = dtype == "f64";
  o.nhwc = layout == "nhwc";
  o.onednn = !no_onednn;
  for (int m = 0; m < 3; ++m) {
    o.mode[m] = std::find(modes.begin(), modes.end(), kModes[m]) != modes.end();
  }
  if (shape_args.empty()) {
    o.shapes = resnet50_shapes(batch);
  } else {
    try {
      for (const auto& s : shape_args) o.shapes.push_back(parse_shape(s));
    } catch (const CLI::ValidationError& e) {
      if (rank == 0) std::fprintf(stderr, "syncbn_bench: %s\n", e.what());
      return 2;
    }
  }

  Meta meta;
  meta.date = utc_now();
  meta.host = host_name();
  meta.cpu = cpu_model();
  meta.dtype = dtype;
  meta.layout = layout;
  meta.ranks = size;
  meta.threads = omp_get_max_threads();
  meta.cpus = static_cast<int>(sysconf(_SC_NPROCESSORS_ONLN));
  meta.iters = o.iters;
  meta.warmup = o.warmup;
  if (const char* env = std::getenv("OMP_NUM_THREADS")) meta.omp_env = env;
  const Llc llc = last_level_cache();
  meta.llc_bytes = llc.bytes;
  meta.llc_source = llc.source;
#ifdef SYNCBN_BENCH_HAVE_ONEDNN
  if (o.onednn && !o.f64) meta.onednn = bench::onednn_version();
#else
  o.onednn = false;
#endif

  if (rank == 0) {
    std::printf("# syncbn_bench  %s  host %s  CPU %s (%d online)\n", meta.date.c_str(),
                meta.host.c_str(), meta.cpu.c_str(), meta.cpus);
    std::printf(
        "# ranks %d, OpenMP threads per rank %d, dtype %s, layout %s, iterations %d, "
        "warm-up %d, LLC %.1f MiB (%s), oneDNN %s\n",
        size, meta.threads, dtype.c_str(), layout.c_str(), o.iters, o.warmup,
        static_cast<double>(llc.bytes) / 1048576.0, llc.source.c_str(),
        !meta.onednn.empty() ? meta.onednn.c_str()
        : o.f64              ? "n/a (f64)"
        : no_onednn          ? "off"
                             : "not built in");
    std::printf(
        "# Shapes are per rank. GB/s: forward 3x, backward 5x, copy 2x the tensor bytes "
        "over the time.\n");
    print_table_header();
  }

  {  // one host? (the same processor name on every rank)
    char name[MPI_MAX_PROCESSOR_NAME] = {};
    int length = 0;
    MPI_Get_processor_name(name, &length);
    unsigned long h[2];
    h[0] = std::hash<std::string>{}(std::string(name, static_cast<std::size_t>(length)));
    h[1] = ~h[0];
    MPI_Allreduce(MPI_IN_PLACE, h, 2, MPI_UNSIGNED_LONG, MPI_MAX, MPI_COMM_WORLD);
    o.one_host = h[0] == ~h[1];  // max(h) == min(h)
  }
  const syncbn::Communicator world = syncbn::mpi_communicator(MPI_COMM_WORLD);
  world.set_timeout(0);  // the exchange is MPI_Allreduce, which allgather mode interposes
  MPI_Comm allreduce_comm = MPI_COMM_NULL;  // like the library's: a duplicate
  MPI_Comm_dup(MPI_COMM_WORLD, &allreduce_comm);

  std::vector<Row> rows;
  Checks chk;
  for (const Shape& s : o.shapes) {
    const std::vector<Row> shape_rows =
        o.f64 ? run_shape<double>(s, o, world, MPI_COMM_WORLD, allreduce_comm, rank, chk)
              : run_shape<float>(s, o, world, MPI_COMM_WORLD, allreduce_comm, rank, chk);
    if (rank == 0) {
      for (const Row& r : shape_rows) print_row(r);
    }
    rows.insert(rows.end(), shape_rows.begin(), shape_rows.end());
  }
  // Every rank's count of interposed calls must be what allgather mode made.
  long hits_min = g_allgather_hits;
  MPI_Allreduce(MPI_IN_PLACE, &hits_min, 1, MPI_LONG, MPI_MIN, MPI_COMM_WORLD);
  g_allgather_hits = hits_min;
  MPI_Comm_free(&allreduce_comm);

  if (rank == 0) {
    print_footer(rows, chk, o, meta);
    if (!o.csv.empty()) write_csv(o.csv, rows, meta);
    if (!o.json.empty()) write_json(o.json, rows, meta);
  }
  const bool wrong = (o.check && (chk.sync_unequal > 0 || chk.allgather_unequal > 0 ||
                                  (chk.onednn_shapes > 0 && !(chk.fwd_diff <= kCheckTolerance &&
                                                              chk.bwd_diff <= kCheckTolerance))));
  return wrong ? 1 : 0;
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int rank = 0, size = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  int rc = 0;
  try {
    rc = run(argc, argv, rank, size);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "syncbn_bench: rank %d: %s\n", rank, e.what());
    MPI_Abort(MPI_COMM_WORLD, 1);
  }
  MPI_Finalize();
  return rc;
}
