// kernel_bench: time of syncbn's forward training and backward on one process (communicator of
// one rank, so the kernels plus a no-op exchange) against a copy of the same bytes measured in
// the same run on the same threads. Ratios, not absolute times, are the result: these machines
// are shared and noisy.
//
//   kernel_bench [--shape 32x256x56x56 ...] [--dtype f32|f64] [--layout nchw,nhwc] [-n 10] [-w 2]
//                [--csv FILE] [--json FILE]
//
// Bytes that must move: forward reads x twice (reduce, normalize) and writes y once; backward
// reads x and dy twice and writes dx once. The copy moves read + write of one tensor. Each time
// is the median over -n calls after -w warm-up calls (steady clock), one measurement after the
// other (copy, forward, backward) per shape and layout.
//
// Options, timing, the table and the CSV / JSON writers are the shared driver's
// (bench/driver/bench_driver.hpp). CSV and JSON have the table's columns: shape, n, c, h, w,
// dtype, layout, threads, fwd_us, bwd_us, fwd_gbs, bwd_gbs, copy_gbs, fwd_pct_copy,
// bwd_pct_copy.
#include <omp.h>

#include <CLI/CLI.hpp>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "driver/bench_driver.hpp"
#include "syncbn/syncbn.hpp"

namespace {

using bench::Shape4;

struct Row {
  Shape4 shape;
  std::string dtype, layout;
  int threads = 1;
  double fwd_us = bench::kNaN, bwd_us = bench::kNaN;
  double fwd_gbs = bench::kNaN, bwd_gbs = bench::kNaN, copy_gbs = bench::kNaN;
  double fwd_pct_copy() const { return 100 * fwd_gbs / copy_gbs; }
  double bwd_pct_copy() const { return 100 * bwd_gbs / copy_gbs; }
};

const bench::Fields<Row>& fields() {
  using bench::integer;
  using bench::num;
  using bench::text;
  static const bench::Fields<Row> f = {
      {"shape", [](const Row& r) { return text(r.shape.name()); }},
      {"n", [](const Row& r) { return integer(r.shape.n); }},
      {"c", [](const Row& r) { return integer(r.shape.c); }},
      {"h", [](const Row& r) { return integer(r.shape.h); }},
      {"w", [](const Row& r) { return integer(r.shape.w); }},
      {"dtype", [](const Row& r) { return text(r.dtype); }},
      {"layout", [](const Row& r) { return text(r.layout); }},
      {"threads", [](const Row& r) { return integer(r.threads); }},
      {"fwd_us", [](const Row& r) { return num(r.fwd_us); }},
      {"bwd_us", [](const Row& r) { return num(r.bwd_us); }},
      {"fwd_gbs", [](const Row& r) { return num(r.fwd_gbs); }},
      {"bwd_gbs", [](const Row& r) { return num(r.bwd_gbs); }},
      {"copy_gbs", [](const Row& r) { return num(r.copy_gbs); }},
      {"fwd_pct_copy", [](const Row& r) { return num(r.fwd_pct_copy()); }},
      {"bwd_pct_copy", [](const Row& r) { return num(r.bwd_pct_copy()); }},
  };
  return f;
}

const bench::Table& table() {
  using C = bench::Column;
  static const bench::Table t({
      C{"shape (NxCxHxW)", "", 20, 0},
      C{"type", "", 4, 0},
      C{"lay", "", 4, 0},
      C{"threads", "", 7, 0},
      C{"fwd", "(us)", 10, 1},
      C{"bwd", "(us)", 10, 1},
      C{"fwd", "(GB/s)", 10, 2},
      C{"bwd", "(GB/s)", 10, 2},
      C{"copy", "(GB/s)", 10, 2},
      C{"fwd/cp", "(%)", 7, 0},
      C{"bwd/cp", "(%)", 7, 0},
  });
  return t;
}

bench::Record table_row(const Row& r) {
  using bench::num;
  using bench::text;
  return {text(r.shape.name()), text(r.dtype),    text(r.layout),
          bench::integer(r.threads), num(r.fwd_us), num(r.bwd_us),
          num(r.fwd_gbs),         num(r.bwd_gbs), num(r.copy_gbs),
          num(r.fwd_pct_copy()),  num(r.bwd_pct_copy())};
}

template <class T>
Row run(const Shape4& s, bool nhwc, int iters, int warmup) {
  const int64_t count = s.count();
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

  const double t_copy = bench::median_seconds(iters, warmup, [&] {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < count; ++i) y[i] = x[i];
  });
  const double t_fwd = bench::median_seconds(iters, warmup, [&] {
    bn.forward_training(shape, x.data(), w.data(), b.data(), y.data(), sm.data(), si.data(),
                        rm.data(), rv.data(), &nbt);
  });
  const double t_bwd = bench::median_seconds(iters, warmup, [&] {
    bn.backward(shape, x.data(), dy.data(), w.data(), sm.data(), si.data(), dx.data(), dw.data(),
                db.data());
  });
  const double bytes = static_cast<double>(count) * sizeof(T);
  Row r;
  r.shape = s;
  r.dtype = sizeof(T) == 4 ? "f32" : "f64";
  r.layout = nhwc ? "nhwc" : "nchw";
  r.threads = omp_get_max_threads();
  r.fwd_us = t_fwd * 1e6;
  r.bwd_us = t_bwd * 1e6;
  r.copy_gbs = 2 * bytes / t_copy / 1e9;
  r.fwd_gbs = 3 * bytes / t_fwd / 1e9;
  r.bwd_gbs = 5 * bytes / t_bwd / 1e9;
  return r;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"syncbn kernel throughput against a copy of the same bytes"};
  bench::CommonOptions common;
  common.iters = 10;
  common.warmup = 2;
  std::vector<std::string> shapes{"32x64x112x112", "32x256x56x56", "32x512x28x28",
                                  "32x1024x14x14", "32x2048x7x7"};
  std::string dtype = "f32";
  std::vector<std::string> layouts{"nchw", "nhwc"};
  app.add_option("--shape", shapes, "NxCxHxW, repeatable (default: ResNet-50 BN shapes, batch 32)")
      ->capture_default_str();
  app.add_option("--dtype", dtype, "f32 or f64")
      ->check(CLI::IsMember({"f32", "f64"}))
      ->capture_default_str();
  app.add_option("--layout", layouts, "nchw and/or nhwc: repeatable or a comma list")
      ->delimiter(',')
      ->check(CLI::IsMember({"nchw", "nhwc"}))
      ->capture_default_str();
  bench::add_common_options(app, common);
  CLI11_PARSE(app, argc, argv);
  std::vector<Shape4> parsed;
  try {
    for (const auto& s : shapes) parsed.push_back(bench::parse_nchw(s));
  } catch (const CLI::ValidationError& e) {
    std::fprintf(stderr, "kernel_bench: %s\n", e.what());
    return 2;
  }

  table().print_header();
  std::vector<bench::Record> records;
  for (const auto& s : parsed) {
    for (const auto& l : layouts) {
      const Row r = dtype == "f32" ? run<float>(s, l == "nhwc", common.iters, common.warmup)
                                   : run<double>(s, l == "nhwc", common.iters, common.warmup);
      table().print_row(table_row(r));
      records.push_back(bench::record_of(fields(), r));
    }
  }
  std::printf("# Times: median of %d calls (%d warm-up); GB/s: forward 3x, backward 5x, copy 2x "
              "the tensor bytes over the time.\n",
              common.iters, common.warmup);
  const bench::Schema schema = bench::schema_of(fields());
  if (!common.csv.empty()) bench::write_csv(common.csv, schema, records);
  if (!common.json.empty()) {
    bench::write_json(common.json,
                      {{"date", bench::text(bench::utc_now())},
                       {"hostname", bench::text(bench::host_name())},
                       {"cpu_model", bench::text(bench::cpu_model())},
                       {"threads", bench::integer(omp_get_max_threads())},
                       {"iterations", bench::integer(common.iters)},
                       {"warmup", bench::integer(common.warmup)}},
                      schema, records);
  }
  return 0;
}
