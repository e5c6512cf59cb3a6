// kernel_bench: time of syncbn's forward training and backward on one process (communicator of
// one rank, so the kernels plus a no-op exchange) against a copy of the same bytes measured in
// the same run on the same threads. Ratios, not absolute times, are the result: these machines
// are shared and noisy.
//
//   kernel_bench [--shape 32x256x56x56] [--dtype f32|f64] [--layout nchw|nhwc] [-n 20] [-w 3]
//
// Bytes that must move: forward reads x twice (reduce, normalize) and writes y once; backward
// reads x and dy twice and writes dx once. The copy moves read + write of one tensor.
#include <omp.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "syncbn/syncbn.hpp"

namespace {

struct Shape {
  int64_t n, c, h, w;
};

Shape parse_shape(const std::string& s) {
  Shape sh{};
  if (std::sscanf(s.c_str(), "%ldx%ldx%ldx%ld", &sh.n, &sh.c, &sh.h, &sh.w) != 4) {
    throw CLI::ValidationError("--shape", "expected NxCxHxW, got " + s);
  }
  return sh;
}

template <class F>
double median_seconds(int iters, int warmup, F&& f) {
  for (int i = 0; i < warmup; ++i) f();
  std::vector<double> t;
  for (int i = 0; i < iters; ++i) {
    const auto a = std::chrono::steady_clock::now();
    f();
    t.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - a).count());
  }
  std::nth_element(t.begin(), t.begin() + t.size() / 2, t.end());
  return t[t.size() / 2];
}

template <class T>
void run(const Shape& s, bool nhwc, int iters, int warmup) {
  const int64_t count = s.n * s.c * s.h * s.w;
  std::vector<T> x(count), y(count), dy(count), dx(count);
  std::mt19937 rng(1);
  std::normal_distribution<T> nd(0, 1);
  for (auto& v : x) v = nd(rng);
  for (auto& v : dy) v = nd(rng);
  std::vector<T> w(s.c, 1), b(s.c, 0), rm(s.c, 0), rv(s.c, 1), sm(s.c), si(s.c), dw(s.c), db(s.c);
  int64_t nbt = 0;
  auto config = syncbn::make_config(s.c, sizeof(T) == 4 ? SYNCBN_FLOAT32 : SYNCBN_FLOAT64);
  config.layout = nhwc ? SYNCBN_CHANNELS_LAST : SYNCBN_CHANNELS_FIRST;
  syncbn::BatchNorm bn(syncbn::Communicator::self(), config);
  const std::vector<int64_t> shape =
      nhwc ? std::vector<int64_t>{s.n, s.h, s.w, s.c} : std::vector<int64_t>{s.n, s.c, s.h, s.w};

  const double t_copy = median_seconds(iters, warmup, [&] {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < count; ++i) y[i] = x[i];
  });
  const double t_fwd = median_seconds(iters, warmup, [&] {
    bn.forward_training(shape, x.data(), w.data(), b.data(), y.data(), sm.data(), si.data(),
                        rm.data(), rv.data(), &nbt);
  });
  const double t_bwd = median_seconds(iters, warmup, [&] {
    bn.backward(shape, x.data(), dy.data(), w.data(), sm.data(), si.data(), dx.data(), dw.data(),
                db.data());
  });
  const double bytes = static_cast<double>(count) * sizeof(T);
  const double copy_bw = 2 * bytes / t_copy / 1e9;
  const double fwd_bw = 3 * bytes / t_fwd / 1e9;
  const double bwd_bw = 5 * bytes / t_bwd / 1e9;
  std::printf("%5ldx%4ldx%3ldx%3ld %4s %4s %7d %10.1f %10.1f %10.2f %10.2f %10.2f %6.0f%% %6.0f%%\n",
              s.n, s.c, s.h, s.w, sizeof(T) == 4 ? "f32" : "f64", nhwc ? "nhwc" : "nchw",
              omp_get_max_threads(), t_fwd * 1e6, t_bwd * 1e6, fwd_bw, bwd_bw, copy_bw,
              100 * fwd_bw / copy_bw, 100 * bwd_bw / copy_bw);
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"syncbn kernel throughput against a copy of the same bytes"};
  std::vector<std::string> shapes{"32x64x112x112", "32x256x56x56", "32x512x28x28",
                                  "32x1024x14x14", "32x2048x7x7"};
  std::string dtype = "f32";
  std::vector<std::string> layouts{"nchw", "nhwc"};
  int iters = 10, warmup = 2;
  app.add_option("--shape", shapes, "NxCxHxW, repeatable (default: ResNet-50 BN shapes, batch 32)");
  app.add_option("--dtype", dtype, "f32 or f64")->check(CLI::IsMember({"f32", "f64"}));
  app.add_option("--layout", layouts, "nchw and/or nhwc")->check(CLI::IsMember({"nchw", "nhwc"}));
  app.add_option("-n,--iters", iters, "timed iterations (median reported)")->check(CLI::PositiveNumber);
  app.add_option("-w,--warmup", warmup, "warm-up iterations")->check(CLI::NonNegativeNumber);
  CLI11_PARSE(app, argc, argv);

  std::printf("# %-20s %4s %4s %7s %10s %10s %10s %10s %10s %7s %7s\n", "shape (NxCxHxW)", "type",
              "lay", "threads", "fwd (us)", "bwd (us)", "fwd GB/s", "bwd GB/s", "copy GB/s",
              "fwd/cp", "bwd/cp");
  for (const auto& s : shapes) {
    for (const auto& l : layouts) {
      if (dtype == "f32") {
        run<float>(parse_shape(s), l == "nhwc", iters, warmup);
      } else {
        run<double>(parse_shape(s), l == "nhwc", iters, warmup);
      }
    }
  }
  return 0;
}
