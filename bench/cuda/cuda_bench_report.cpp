// cuda_bench's output, through the shared driver (bench/driver/bench_driver.hpp): the forward and
// backward tables (nccl-tests style: names, units, aligned columns), the footer (failures,
// tolerance, host-bound rows, the bare allreduce, the goal, the ResNet-50 sums), the CSV (one
// row per problem as it is measured; "nan" for n/a) and the JSON (the same columns, null for
// n/a, and the run's meta). Also the ResNet-50 shape table and the --torch-csv reader.
#include <algorithm>
#include <cinttypes>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <set>
#include <sstream>
#include <stdexcept>

#include "cuda_bench.hpp"
#include "driver/bench_driver.hpp"

namespace cuda_bench {

const std::vector<ShapeSpec>& resnet50_shapes() {
  static const std::vector<ShapeSpec> shapes = {
      {"64x112x112", 64, 112, 112, 1},  // stem bn1
      {"64x56x56", 64, 56, 56, 6},      // layer1.{0,1,2} bn1, bn2
      {"256x56x56", 256, 56, 56, 4},    // layer1.{0,1,2} bn3, layer1.0 downsample
      {"128x56x56", 128, 56, 56, 1},    // layer2.0 bn1
      {"128x28x28", 128, 28, 28, 7},    // layer2.0 bn2, layer2.{1,2,3} bn1, bn2
      {"512x28x28", 512, 28, 28, 5},    // layer2.{0..3} bn3, layer2.0 downsample
      {"256x28x28", 256, 28, 28, 1},    // layer3.0 bn1
      {"256x14x14", 256, 14, 14, 11},   // layer3.0 bn2, layer3.{1..5} bn1, bn2
      {"1024x14x14", 1024, 14, 14, 7},  // layer3.{0..5} bn3, layer3.0 downsample
      {"512x14x14", 512, 14, 14, 1},    // layer4.0 bn1
      {"512x7x7", 512, 7, 7, 5},        // layer4.0 bn2, layer4.{1,2} bn1, bn2
      {"2048x7x7", 2048, 7, 7, 4},      // layer4.{0,1,2} bn3, layer4.0 downsample
  };
  return shapes;
}

static double parse_double(const std::string& s) {
  char* end = nullptr;
  const double v = std::strtod(s.c_str(), &end);
  return (s.empty() || *end != '\0') ? NAN : v;
}

std::map<TorchKey, TorchTimes> read_torch_csv(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw std::runtime_error("--torch-csv: cannot open " + path);
  std::map<TorchKey, TorchTimes> out;
  std::map<std::string, size_t> col;
  std::string line;
  auto cells = [](const std::string& l) {
    std::vector<std::string> v;
    std::stringstream ss(l);
    std::string c;
    while (std::getline(ss, c, ',')) v.push_back(c);
    return v;
  };
  while (std::getline(in, line)) {
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.empty() || line[0] == '#') continue;
    const auto v = cells(line);
    if (col.empty()) {
      for (size_t i = 0; i < v.size(); ++i) col[v[i]] = i;
      for (const char* need : {"shape", "n", "dtype", "layout"}) {
        if (!col.count(need)) throw std::runtime_error("--torch-csv: no column '" + std::string(need) + "' in " + path);
      }
      continue;
    }
    auto get = [&](const char* k) -> std::string {
      const auto it = col.find(k);
      return (it == col.end() || it->second >= v.size()) ? std::string() : v[it->second];
    };
    TorchTimes t;
    t.kernels_fwd = parse_double(get("tk_fwd_us"));
    t.kernels_bwd = parse_double(get("tk_bwd_us"));
    t.functional_fwd = parse_double(get("F_fwd_us"));
    t.functional_bwd = parse_double(get("F_bwd_us"));
    t.syncbn_fwd = parse_double(get("sbn_fwd_us"));
    t.syncbn_bwd = parse_double(get("sbn_bwd_us"));
    const double n = parse_double(get("n"));
    if (!std::isfinite(n)) continue;
    out[TorchKey{get("shape"), static_cast<int64_t>(n), get("dtype"), get("layout")}] = t;
  }
  return out;
}

namespace {

std::string fmt(double v, int width, int prec) {
  char buf[64];
  if (!std::isfinite(v)) {
    std::snprintf(buf, sizeof(buf), "%*s", width, "n/a");
  } else {
    std::snprintf(buf, sizeof(buf), "%*.*f", width, prec, v);
  }
  return buf;
}
double gbps(double bytes, double us) { return bytes / (us * 1e-6) / 1e9; }
double ratio(double num, double den) { return num / den; }  // NaN propagates

// The forward or backward table.
const bench::Table& table() {
  using C = bench::Column;
  static const bench::Table t({
      C{"shape", "(CxHxW)", 10, 0},
      C{"N", "", 4, 0},
      C{"type", "", 4, 0},
      C{"lay", "", 4, 0},
      C{"size", "(MB)", 8, 2},
      C{"copy", "(us)", 8, 2},
      C{"time", "(us)", 8, 2}.after_bar(),
      C{"graph", "(us)", 8, 2},
      C{"host", "(us)", 8, 2},
      C{"effbw", "(GB/s)", 8, 1},
      C{"%copy", "(%)", 6, 0},
      C{"cudnn", "(us)", 8, 2}.after_bar(),
      C{"xcudnn", "(x)", 6, 2},
      C{"xtorchK", "(x)", 7, 2},
      C{"xtorchF", "(x)", 7, 2},
      C{"err", "", 7, 1}.after_bar().sci(),
      C{"flags", "", 0, 0}.align_left(),
  });
  return t;
}

void print_table(const std::vector<Result>& rows, bool forward, CommKind comm) {
  std::printf("#\n# %s (syncbn_%s, comm %s)\n", forward ? "forward training" : "backward",
              forward ? "forward_training" : "backward",
              comm == CommKind::nccl ? "nccl: kernels + one-rank ncclAllReduce"
                                     : "self: kernels only");
  table().print_header();
  using bench::integer;
  using bench::num;
  using bench::text;
  for (const auto& r : rows) {
    const double bytes = static_cast<double>(r.p.bytes());
    const double copy_bw = gbps(2 * bytes, r.copy.median_us);
    const Stats& t = forward ? r.fwd : r.bwd;
    const Stats& g = forward ? r.fwd_graph : r.bwd_graph;
    const double model = (forward ? 3 : 5) * bytes;
    const double bw = gbps(model, t.median_us);
    const double cud = forward ? r.cudnn_fwd_us() : r.cudnn_bwd_us();
    const double tk = forward ? r.torch.kernels_fwd : r.torch.kernels_bwd;
    const double tf = forward ? r.torch.functional_fwd : r.torch.functional_bwd;
    const double err = forward ? r.fwd_err : r.bwd_err;
    std::string flags;
    if (!r.failure.empty()) flags += "FAIL ";
    if (err > tolerance(r.p.dtype)) flags += "WRONG ";
    if (r.host_bound()) flags += "h";
    table().print_row({text(r.p.shape.name), integer(r.p.n), text(name(r.p.dtype)),
                       text(name(r.p.layout)), num(bytes / 1e6), num(r.copy.median_us),
                       num(t.median_us), num(g.median_us), num(t.host_us), num(bw),
                       num(100 * bw / copy_bw), num(cud), num(ratio(cud, t.median_us)),
                       num(ratio(tk, t.median_us)), num(ratio(tf, t.median_us)), num(err),
                       text(flags)});
  }
}

// A CSV / JSON record: the communicator and one problem's result.
struct CsvRow {
  CommKind comm;
  const Result& r;
  double bytes() const { return static_cast<double>(r.p.bytes()); }
  double copy_bw() const { return gbps(2 * bytes(), r.copy.median_us); }
  double fwd_bw() const { return gbps(3 * bytes(), r.fwd.median_us); }
  double bwd_bw() const { return gbps(5 * bytes(), r.bwd.median_us); }
  std::string status() const {
    std::string s = r.failure.empty() ? "ok" : "FAIL: " + r.failure;
    if (r.wrong()) s += " WRONG";
    if (!r.cudnn_note.empty()) s += " cudnn: " + r.cudnn_note;
    return s;
  }
};

bench::Value mode_name(int m) { return bench::text(m < 0 ? "n/a" : kCudnnModeName[m]); }

// The CSV / JSON columns (the CSV header is their keys, in this order).
const bench::Fields<CsvRow>& csv_fields() {
  using bench::integer;
  using bench::num;
  using bench::text;
  using R = CsvRow;
  static const bench::Fields<CsvRow> f = {
      {"comm", [](const R& x) { return text(x.comm == CommKind::nccl ? "nccl" : "self"); }},
      {"shape", [](const R& x) { return text(x.r.p.shape.name); }},
      {"c", [](const R& x) { return integer(x.r.p.shape.c); }},
      {"h", [](const R& x) { return integer(x.r.p.shape.h); }},
      {"w", [](const R& x) { return integer(x.r.p.shape.w); }},
      {"n", [](const R& x) { return integer(x.r.p.n); }},
      {"dtype", [](const R& x) { return text(name(x.r.p.dtype)); }},
      {"layout", [](const R& x) { return text(name(x.r.p.layout)); }},
      {"bytes", [](const R& x) { return integer(static_cast<int64_t>(x.r.p.bytes())); }},
      {"copy_us", [](const R& x) { return num(x.r.copy.median_us); }},
      {"copy_gbps", [](const R& x) { return num(x.copy_bw()); }},
      {"fwd_us", [](const R& x) { return num(x.r.fwd.median_us); }},
      {"fwd_min_us", [](const R& x) { return num(x.r.fwd.min_us); }},
      {"fwd_span_us", [](const R& x) { return num(x.r.fwd.span_us); }},
      {"fwd_host_us", [](const R& x) { return num(x.r.fwd.host_us); }},
      {"fwd_graph_us", [](const R& x) { return num(x.r.fwd_graph.median_us); }},
      {"fwd_graph_min_us", [](const R& x) { return num(x.r.fwd_graph.min_us); }},
      {"fwd_gbps", [](const R& x) { return num(x.fwd_bw()); }},
      {"fwd_pct_copy", [](const R& x) { return num(100 * x.fwd_bw() / x.copy_bw()); }},
      {"fwd_err", [](const R& x) { return num(x.r.fwd_err); }},
      {"bwd_us", [](const R& x) { return num(x.r.bwd.median_us); }},
      {"bwd_min_us", [](const R& x) { return num(x.r.bwd.min_us); }},
      {"bwd_span_us", [](const R& x) { return num(x.r.bwd.span_us); }},
      {"bwd_host_us", [](const R& x) { return num(x.r.bwd.host_us); }},
      {"bwd_graph_us", [](const R& x) { return num(x.r.bwd_graph.median_us); }},
      {"bwd_graph_min_us", [](const R& x) { return num(x.r.bwd_graph.min_us); }},
      {"bwd_gbps", [](const R& x) { return num(x.bwd_bw()); }},
      {"bwd_pct_copy", [](const R& x) { return num(100 * x.bwd_bw() / x.copy_bw()); }},
      {"bwd_err", [](const R& x) { return num(x.r.bwd_err); }},
      {"cudnn_fwd_us", [](const R& x) { return num(x.r.cudnn_fwd_us()); }},
      {"cudnn_fwd_mode", [](const R& x) { return mode_name(x.r.best_cudnn_fwd()); }},
      {"cudnn_bwd_us", [](const R& x) { return num(x.r.cudnn_bwd_us()); }},
      {"cudnn_bwd_mode", [](const R& x) { return mode_name(x.r.best_cudnn_bwd()); }},
      {"cudnn_spatial_fwd_us", [](const R& x) { return num(x.r.cudnn_fwd[0].median_us); }},
      {"cudnn_spatial_bwd_us", [](const R& x) { return num(x.r.cudnn_bwd[0].median_us); }},
      {"cudnn_persistent_fwd_us", [](const R& x) { return num(x.r.cudnn_fwd[1].median_us); }},
      {"cudnn_persistent_bwd_us", [](const R& x) { return num(x.r.cudnn_bwd[1].median_us); }},
      {"cudnn_err", [](const R& x) { return num(x.r.cudnn_err); }},
      {"torch_tk_fwd_us", [](const R& x) { return num(x.r.torch.kernels_fwd); }},
      {"torch_tk_bwd_us", [](const R& x) { return num(x.r.torch.kernels_bwd); }},
      {"torch_F_fwd_us", [](const R& x) { return num(x.r.torch.functional_fwd); }},
      {"torch_F_bwd_us", [](const R& x) { return num(x.r.torch.functional_bwd); }},
      {"torch_sbn_fwd_us", [](const R& x) { return num(x.r.torch.syncbn_fwd); }},
      {"torch_sbn_bwd_us", [](const R& x) { return num(x.r.torch.syncbn_bwd); }},
      {"x_cudnn_fwd", [](const R& x) { return num(x.r.cudnn_fwd_us() / x.r.fwd.median_us); }},
      {"x_cudnn_bwd", [](const R& x) { return num(x.r.cudnn_bwd_us() / x.r.bwd.median_us); }},
      {"x_torch_tk_fwd",
       [](const R& x) { return num(x.r.torch.kernels_fwd / x.r.fwd.median_us); }},
      {"x_torch_tk_bwd",
       [](const R& x) { return num(x.r.torch.kernels_bwd / x.r.bwd.median_us); }},
      {"x_torch_F_fwd",
       [](const R& x) { return num(x.r.torch.functional_fwd / x.r.fwd.median_us); }},
      {"x_torch_F_bwd",
       [](const R& x) { return num(x.r.torch.functional_bwd / x.r.bwd.median_us); }},
      {"x_torch_sbn_fwd",
       [](const R& x) { return num(x.r.torch.syncbn_fwd / x.r.fwd.median_us); }},
      {"x_torch_sbn_bwd",
       [](const R& x) { return num(x.r.torch.syncbn_bwd / x.r.bwd.median_us); }},
      {"nccl_allreduce_us", [](const R& x) { return num(x.r.allreduce.median_us); }},
      {"nccl_allreduce_host_us", [](const R& x) { return num(x.r.allreduce.host_us); }},
      {"host_bound", [](const R& x) { return integer(x.r.host_bound() ? 1 : 0); }},
      {"status", [](const R& x) { return text(x.status()); }},
  };
  return f;
}

void print_resnet50_totals(const std::vector<Result>& rows, const Options& o) {
  const auto& all = resnet50_shapes();
  bool header = false;
  for (int64_t n : o.batches) {
    for (DType d : o.dtypes) {
      for (Layout l : o.layouts) {
        double sb = 0, sg = 0, cud = 0, floor = 0, tk = 0, tf = 0;
        size_t found = 0;
        for (const auto& spec : all) {
          for (const auto& r : rows) {
            if (r.p.n != n || r.p.dtype != d || r.p.layout != l || r.p.shape.name != spec.name) {
              continue;
            }
            ++found;
            const int k = spec.resnet50_layers;
            sb += k * (r.fwd.median_us + r.bwd.median_us);
            sg += k * (r.fwd_graph.median_us + r.bwd_graph.median_us);
            cud += k * (r.cudnn_fwd_us() + r.cudnn_bwd_us());
            floor += k * r.copy.median_us * (3.0 + 5.0) / 2.0;  // model bytes at copy speed
            tk += k * (r.torch.kernels_fwd + r.torch.kernels_bwd);
            tf += k * (r.torch.functional_fwd + r.torch.functional_bwd);
          }
        }
        if (found != all.size()) continue;
        if (!header) {
          std::printf("#\n# ResNet-50, all 53 BN layers, forward + backward, sum of medians (us);"
                      " (x) = other / syncbn\n");
          header = true;
        }
        std::printf("#   N=%-3" PRId64 " %-4s %-4s syncbn %s  graph %s  copy floor %s"
                    "  cuDNN %s (x%s)  torch kernels %s (x%s)  F.batch_norm %s (x%s)\n",
                    n, name(d), name(l), fmt(sb, 9, 1).c_str(), fmt(sg, 9, 1).c_str(),
                    fmt(floor, 9, 1).c_str(), fmt(cud, 9, 1).c_str(),
                    fmt(cud / sb, 4, 2).c_str(), fmt(tk, 9, 1).c_str(), fmt(tk / sb, 4, 2).c_str(),
                    fmt(tf, 9, 1).c_str(), fmt(tf / sb, 4, 2).c_str());
      }
    }
  }
}

// The goal: 2048x7x7, batch 2, forward under graph replay (with the one-rank NCCL
// allreduce) under 10 us.
void print_goal(const std::vector<Result>& rows, CommKind comm) {
  bool any = false;
  for (const auto& r : rows) {
    if (r.p.shape.name != "2048x7x7" || r.p.n != 2) continue;
    any = true;
    const double t = r.fwd_graph.median_us;
    const char* verdict = !std::isfinite(t) ? "n/a" : t < 10.0 ? "PASS" : "MISS";
    std::printf("# goal: 2048x7x7 N=2 %-4s %s forward, CUDA graph replay, %s: %s us "
                "(target < 10 us): %s%s\n",
                name(r.p.dtype), name(r.p.layout),
                comm == CommKind::nccl ? "comm nccl (one rank)" : "comm self (no allreduce)",
                fmt(t, 6, 2).c_str(), verdict,
                comm == CommKind::nccl ? "" : "  [the goal is stated for --comm nccl]");
  }
  if (!any) {
    std::printf("# goal: 2048x7x7 N=2 forward under graph replay: not measured "
                "(needs --shapes 2048x7x7 --batches 2)\n");
  }
}

}  // namespace

struct Report::Impl {
  const Options& o;
  bench::CsvWriter csv;
};

Report::Report(const Options& o) : impl_(new Impl{o, {}}) {
  if (!o.csv.empty()) {
    try {
      impl_->csv = bench::CsvWriter(o.csv, bench::schema_of(csv_fields()), "nan");
    } catch (const std::runtime_error&) {
      throw std::runtime_error("--csv: cannot open " + o.csv + " for writing");
    }
  }
}

Report::~Report() = default;

void Report::add(const Result& r) {
  if (impl_->csv.is_open()) impl_->csv.write(bench::record_of(csv_fields(), CsvRow{impl_->o.comm, r}));
}

int Report::finish(const std::vector<Result>& rows, const RunInfo& info) {
  const Options& o = impl_->o;
  print_table(rows, true, o.comm);
  print_table(rows, false, o.comm);

  // Footer: failures, wrong results, host-bound rows, the goal, the ResNet-50 sums.
  size_t failed = 0, wrong = 0, host_bound = 0, cudnn_wrong = 0;
  std::printf("#\n");
  for (const auto& r : rows) {
    if (!r.failure.empty()) {
      ++failed;
      std::printf("# FAIL %s N=%" PRId64 " %s %s: %s\n", r.p.shape.name.c_str(), r.p.n,
                  name(r.p.dtype), name(r.p.layout), r.failure.c_str());
    }
    if (r.wrong()) ++wrong;
    if (r.host_bound()) ++host_bound;
    if (r.cudnn_err > tolerance(r.p.dtype)) ++cudnn_wrong;
  }
  std::set<std::string> notes;
  for (const auto& r : rows) {
    if (!r.cudnn_note.empty()) {
      notes.insert(std::string(name(r.p.dtype)) + " " + name(r.p.layout) + ": " + r.cudnn_note);
    }
  }
  for (const auto& n : notes) std::printf("# cuDNN n/a for %s\n", n.c_str());
  std::printf("# err = max |out - fp64 ref| / (1 + |ref|); tolerance f32 1e-3, f16 5e-3, "
              "bf16 2e-2\n");
  std::printf("# Out of tolerance (syncbn): %zu of %zu rows %s\n", wrong, rows.size(),
              !o.check ? "(check off)" : wrong == 0 ? "OK" : "WRONG");
  if (cudnn_wrong) {
    std::printf("# Out of tolerance (cuDNN reference runs): %zu rows: the cuDNN column is "
                "suspect\n",
                cudnn_wrong);
  }
  std::printf("# Failed (syncbn): %zu of %zu rows\n", failed, rows.size());
  if (host_bound) {
    std::printf("# flag h: %zu rows had a stream hold time out (host slower than device); their"
                " times include launch gaps\n",
                host_bound);
  }
  if (o.comm == CommKind::nccl) {
    double dmin = INFINITY, dmax = -INFINITY, hmin = INFINITY, hmax = -INFINITY;
    for (const auto& r : rows) {
      if (!r.allreduce.ok()) continue;
      dmin = std::min(dmin, r.allreduce.median_us);
      dmax = std::max(dmax, r.allreduce.median_us);
      hmin = std::min(hmin, r.allreduce.host_us);
      hmax = std::max(hmax, r.allreduce.host_us);
    }
    if (std::isfinite(dmin)) {
      std::printf("# bare one-rank ncclAllReduce (2C + 18 doubles, in place): device %.2f..%.2f "
                  "us, host %.2f..%.2f us (one rank: NCCL enqueues nothing for it)\n",
                  dmin, dmax, hmin, hmax);
    }
  }
  print_goal(rows, o.comm);
  print_resnet50_totals(rows, o);
  if (!o.json.empty()) {
    std::vector<bench::Record> records;
    for (const auto& r : rows) records.push_back(bench::record_of(csv_fields(), CsvRow{o.comm, r}));
    bench::write_json(o.json,
                      {{"date", bench::text(bench::utc_now())},
                       {"hostname", bench::text(bench::host_name())},
                       {"device", bench::text(info.device)},
                       {"cuda_runtime", bench::text(info.cuda_runtime)},
                       {"driver", bench::text(info.driver)},
                       {"cudnn", bench::text(info.cudnn)},
                       {"nccl", bench::text(info.nccl)},
                       {"syncbn", bench::text(info.syncbn)},
                       {"comm", bench::text(o.comm == CommKind::nccl ? "nccl" : "self")},
                       {"iterations", bench::integer(o.iters)},
                       {"warmup", bench::integer(o.warmup)},
                       {"cold_l2", bench::integer(o.cold_l2 ? 1 : 0)},
                       {"graph", bench::integer(o.graph ? 1 : 0)}},
                      bench::schema_of(csv_fields()), records);
  }
  std::fflush(stdout);
  if (failed) return 1;
  if (wrong) return 3;
  return 0;
}

}  // namespace cuda_bench
