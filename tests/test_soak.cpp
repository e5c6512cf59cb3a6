// A soak test (label "soak"): many forward_training + backward steps of one small layer over MPI,
// fresh random data on every step and every rank. It fails (exit 1 on every rank) if
//   - a call fails;
//   - the resident memory (VmRSS) of any rank grew by --max-growth-kib (default 1024 KiB) or more
//     between the end of the warm-up and the end (a per-call leak of even 16 bytes shows after
//     100000 steps);
//   - at the end, running_mean, running_var or num_batches_tracked differ bitwise across ranks,
//     or num_batches_tracked is not the number of steps.
//
//   test_soak [--steps N] [--warmup W] [--layer NxCxHxW] [--dtype fp32|fp64] [--layout cf|cl]
//             [--max-growth-kib K]
// Defaults: 100000 steps, warm-up min(1000, N / 2), layer 8x32x4x4, fp32, channels-first.
// Prints steps, seconds, us/step and each rank's RSS before and after.
//
// A plain main (not GoogleTest): the loop is the test, and nothing but syncbn allocates in it
// (every buffer is allocated before the warm-up and reused).
#include <mpi.h>

#include <chrono>
#include <cinttypes>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <algorithm>
#include <random>
#include <string>
#include <vector>

#include "syncbn/syncbn.h"
#include "syncbn/syncbn_mpi.h"

namespace {

struct Options {
  long steps = 100000;
  long warmup = -1;
  int64_t n = 8, c = 32, h = 4, w = 4;
  syncbn_dtype_t dtype = SYNCBN_FLOAT32;
  syncbn_layout_t layout = SYNCBN_CHANNELS_FIRST;
  long max_growth_kib = 1024;
};

[[noreturn]] void usage(int rank, const char* why) {
  if (rank == 0)
    std::fprintf(stderr,
                 "test_soak: %s\nusage: test_soak [--steps N] [--warmup W] [--layer NxCxHxW] "
                 "[--dtype fp32|fp64] [--layout cf|cl] [--max-growth-kib K]\n",
                 why);
  MPI_Finalize();
  std::exit(2);
}

Options parse(int argc, char** argv, int rank) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) usage(rank, (a + " needs a value").c_str());
      return argv[++i];
    };
    auto number = [&](const std::string& v, long lo) {
      char* end = nullptr;
      const long x = std::strtol(v.c_str(), &end, 10);
      if (v.empty() || *end != '\0' || x < lo) usage(rank, (a + ": bad value '" + v + "'").c_str());
      return x;
    };
    if (a == "--steps") {
      o.steps = number(value(), 1);
    } else if (a == "--warmup") {
      o.warmup = number(value(), 0);
    } else if (a == "--max-growth-kib") {
      o.max_growth_kib = number(value(), 1);
    } else if (a == "--layer") {
      const std::string v = value();
      long long n, c, h, w;
      char tail = 0;
      if (std::sscanf(v.c_str(), "%lldx%lldx%lldx%lld%c", &n, &c, &h, &w, &tail) != 4 || n < 1 ||
          c < 1 || h < 1 || w < 1)
        usage(rank, ("--layer: want NxCxHxW, got '" + v + "'").c_str());
      o.n = n, o.c = c, o.h = h, o.w = w;
    } else if (a == "--dtype") {
      const std::string v = value();
      if (v == "fp32") o.dtype = SYNCBN_FLOAT32;
      else if (v == "fp64") o.dtype = SYNCBN_FLOAT64;
      else usage(rank, ("--dtype: fp32 or fp64, got '" + v + "'").c_str());
    } else if (a == "--layout") {
      const std::string v = value();
      if (v == "cf") o.layout = SYNCBN_CHANNELS_FIRST;
      else if (v == "cl") o.layout = SYNCBN_CHANNELS_LAST;
      else usage(rank, ("--layout: cf or cl, got '" + v + "'").c_str());
    } else {
      usage(rank, ("unknown option '" + a + "'").c_str());
    }
  }
  if (o.warmup < 0) o.warmup = std::min(1000L, o.steps / 2);
  if (o.warmup >= o.steps) usage(rank, "--warmup must be below --steps");
  return o;
}

// splitmix64: a uniform double in [0, 1).
inline double uniform01(uint64_t& state) {
  uint64_t z = (state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  z ^= z >> 31;
  return static_cast<double>(z >> 11) * 0x1.0p-53;
}

// VmRSS of this process in KiB (-1 if /proc is unreadable).
long rss_kib() {
  std::FILE* f = std::fopen("/proc/self/status", "r");
  if (!f) return -1;
  char line[256];
  long kib = -1;
  while (std::fgets(line, sizeof line, f))
    if (std::strncmp(line, "VmRSS:", 6) == 0) {
      kib = std::strtol(line + 6, nullptr, 10);
      break;
    }
  std::fclose(f);
  return kib;
}

template <class T>
int soak(const Options& o, syncbn_plan_t plan, int rank, int size) {
  const size_t C = static_cast<size_t>(o.c);
  const size_t numel = static_cast<size_t>(o.n * o.c * o.h * o.w);
  const int64_t shape_cf[] = {o.n, o.c, o.h, o.w};
  const int64_t shape_cl[] = {o.n, o.h, o.w, o.c};
  const int64_t* shape = o.layout == SYNCBN_CHANNELS_FIRST ? shape_cf : shape_cl;

  std::vector<T> x(numel), dy(numel), y(numel), dx(numel);
  std::vector<T> weight(C), bias(C), running_mean(C, T(0)), running_var(C, T(1));
  std::vector<T> save_mean(C), save_invstd(C), dweight(C), dbias(C);
  int64_t nbt = 0;
  std::mt19937 common(12345);  // parameters: the same on every rank
  std::uniform_real_distribution<double> uw(0.5, 1.5), ub(-1.0, 1.0);
  for (size_t c = 0; c < C; ++c) {
    weight[c] = static_cast<T>(uw(common));
    bias[c] = static_cast<T>(ub(common));
  }
  // Data: different per rank, uniform on [mu - 1.5, mu + 1.5) with mu in [-2, 2) per step, from
  // a cheap generator (std::normal_distribution over mt19937 cost more than the calls).
  uint64_t rng = 0x9e3779b97f4a7c15ull * static_cast<uint64_t>(rank + 1);

  int failed = 0;
  long rss_before = -1;
  double seconds = 0;
  auto t0 = std::chrono::steady_clock::now();
  for (long step = 0; step < o.steps && !failed; ++step) {
    if (step == o.warmup) {
      rss_before = rss_kib();
      t0 = std::chrono::steady_clock::now();
    }
    const double mu = 4.0 * uniform01(rng) - 2.0;
    for (size_t i = 0; i < numel; ++i) {
      x[i] = static_cast<T>(mu + 3.0 * uniform01(rng) - 1.5);
      dy[i] = static_cast<T>(2.0 * uniform01(rng) - 1.0);
    }
    syncbn_status_t s = syncbn_forward_training(
        plan, 4, shape, x.data(), weight.data(), bias.data(), y.data(), save_mean.data(),
        save_invstd.data(), running_mean.data(), running_var.data(), &nbt, nullptr);
    if (s == SYNCBN_SUCCESS)
      s = syncbn_backward(plan, 4, shape, x.data(), dy.data(), weight.data(), save_mean.data(),
                          save_invstd.data(), dx.data(), dweight.data(), dbias.data(), nullptr);
    if (s != SYNCBN_SUCCESS) {
      std::fprintf(stderr, "[rank %d] step %ld: %s: %s\n", rank, step, syncbn_status_string(s),
                   syncbn_last_error());
      failed = 1;  // the peers fail the same call alike (or hang: the ctest TIMEOUT catches it)
    }
  }
  seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const long rss_after = rss_kib();

  // Per-rank figures, gathered to rank 0.
  long mine[2] = {rss_before, rss_after};
  std::vector<long> rss(static_cast<size_t>(2 * size));
  MPI_Gather(mine, 2, MPI_LONG, rss.data(), 2, MPI_LONG, 0, MPI_COMM_WORLD);
  long growth = rss_before < 0 || rss_after < 0 ? -1 : rss_after - rss_before, max_growth = 0;
  MPI_Allreduce(&growth, &max_growth, 1, MPI_LONG, MPI_MAX, MPI_COMM_WORLD);
  MPI_Allreduce(MPI_IN_PLACE, &failed, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);

  // Running statistics and num_batches_tracked: bitwise identical across ranks.
  std::vector<unsigned char> state(2 * C * sizeof(T) + sizeof nbt);
  std::memcpy(state.data(), running_mean.data(), C * sizeof(T));
  std::memcpy(state.data() + C * sizeof(T), running_var.data(), C * sizeof(T));
  std::memcpy(state.data() + 2 * C * sizeof(T), &nbt, sizeof nbt);
  std::vector<unsigned char> all(state.size() * static_cast<size_t>(size));
  MPI_Allgather(state.data(), static_cast<int>(state.size()), MPI_BYTE, all.data(),
                static_cast<int>(state.size()), MPI_BYTE, MPI_COMM_WORLD);
  int differ = 0;
  for (int r = 1; r < size; ++r)
    if (std::memcmp(all.data(), all.data() + state.size() * r, state.size()) != 0) differ = 1;

  const long timed = o.steps - o.warmup;
  if (rank == 0) {
    std::printf("soak: %d ranks, layer %s (%" PRId64 ",%" PRId64 ",%" PRId64 ",%" PRId64
                ") %s, %ld steps (forward_training + backward), warm-up %ld\n",
                size, o.layout == SYNCBN_CHANNELS_FIRST ? "NCHW" : "NHWC", o.n, o.c, o.h, o.w,
                o.dtype == SYNCBN_FLOAT32 ? "fp32" : "fp64", o.steps, o.warmup);
    std::printf("soak: %ld steps after warm-up in %.3f s, %.2f us/step\n", timed, seconds,
                1e6 * seconds / static_cast<double>(timed));
    for (int r = 0; r < size; ++r)
      std::printf("soak: rank %d RSS %ld KiB after warm-up, %ld KiB at the end (%+ld KiB)\n", r,
                  rss[2 * r], rss[2 * r + 1], rss[2 * r + 1] - rss[2 * r]);
    std::printf("soak: num_batches_tracked %" PRId64 " (want %ld)\n", nbt, o.steps);
  }
  int bad = failed;
  if (max_growth < 0 || max_growth >= o.max_growth_kib) {
    if (rank == 0)
      std::printf("soak: FAILED: RSS grew by %ld KiB on some rank (limit: < %ld KiB)\n",
                  max_growth, o.max_growth_kib);
    bad = 1;
  }
  if (differ) {
    if (rank == 0)
      std::printf("soak: FAILED: running statistics or num_batches_tracked differ across ranks\n");
    bad = 1;
  }
  int wrong_count = !failed && nbt != o.steps;
  MPI_Allreduce(MPI_IN_PLACE, &wrong_count, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  if (wrong_count) {
    if (rank == 0) std::printf("soak: FAILED: num_batches_tracked is not the number of steps\n");
    bad = 1;
  }
  if (failed && rank == 0) std::printf("soak: FAILED: a call failed (see stderr)\n");
  if (rank == 0) std::printf("soak: %s\n", bad ? "FAILED" : "PASSED");
  std::fflush(stdout);
  return bad;
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int rank = 0, size = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  const Options o = parse(argc, argv, rank);

  syncbn_comm_t comm = nullptr;
  syncbn_plan_t plan = nullptr;
  syncbn_status_t s = syncbn_comm_create_mpi(MPI_COMM_WORLD, &comm);
  if (s == SYNCBN_SUCCESS) {
    syncbn_config_t cfg;
    syncbn_config_init(&cfg, o.c, o.dtype);
    cfg.layout = o.layout;
    s = syncbn_plan_create(comm, &cfg, &plan);
  }
  int bad = 1;
  if (s != SYNCBN_SUCCESS) {
    std::fprintf(stderr, "[rank %d] setup: %s: %s\n", rank, syncbn_status_string(s),
                 syncbn_last_error());
  } else {
    bad = o.dtype == SYNCBN_FLOAT32 ? soak<float>(o, plan, rank, size)
                                    : soak<double>(o, plan, rank, size);
  }
  syncbn_plan_destroy(plan);
  syncbn_comm_destroy(comm);
  MPI_Finalize();
  return bad;
}
