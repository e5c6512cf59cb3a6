// exchange_bench: the statistics exchange alone, syncbn's against PyTorch's and Apex's, over the
// MPI ranks it runs on, and where the two cross over as the rank count P grows.
//
//   mpirun -n P exchange_bench [--channels 64,128,...] [-n 200] [-w 20] [--max-p 4096] [--csv F]
//       [--json F]
//
// Per channel count C (default: ResNet-50's batch-norm widths), one call's payload is the packed
// buffer libsyncbn allreduces, n = 2C + 18 doubles (sums, sums of squares, count, guard slots):
//   allreduce  MPI_Allreduce(SUM, in place) of n doubles: syncbn's exchange, O(C) per rank;
//   allgather  MPI_Allgather of n doubles from every rank (P x n received) and the rank-order
//              sum of the P vectors on every rank: the exchange of PyTorch's SyncBatchNorm and
//              Apex (mean, invstd and count per rank), O(P C) per rank. The same code as
//              syncbn_bench's allgather mode (bench/allgather_comm.hpp, AllgatherExchange);
//              "combine" is its sum alone.
// Both run in the same loop, in alternating order, each call after a barrier; a call's time is
// its slowest rank's (steady clock); the table gives the median over iterations (microseconds).
// Options, timing, the tables and the CSV / JSON writers are the shared driver's
// (bench/driver/bench_driver.hpp, bench_mpi.hpp). CSV and JSON: one record per C, the measured
// times of both tables and the model's fit and crossovers (columns as in the CSV header; the
// model's columns are empty, null in the JSON, where it was not fitted).
//
// Model (printed below the table; the crossover has to be modelled where P cannot grow, e.g. on
// a 2-core machine). The allgather times at this P, less the combine, are fitted by least
// squares over the C sweep with recursive doubling's cost L alpha + (P - 1) n beta (Hockney:
// alpha per step, beta per byte; at P = 2 one plain exchange), the combine with (P - 1) n gamma.
// (The allreduce is not fitted: the algorithm Open MPI picks changes with the size.) These go
// into the costs of the standard algorithms (Thakur, Rabenseifner and Gropp, "Optimization of
// collective communication operations in MPICH", IJHPCA 19(1), 2005), each collective taking
// its cheaper one, for P = 2, 4, 8, ... up to --max-p:
//   allreduce  min(recursive doubling: L (alpha + n beta + n gamma),
//                  ring (reduce-scatter + allgather): 2 (P - 1) alpha + 2 (P - 1)/P n beta
//                                                      + (P - 1)/P n gamma)
//   allgather  min(recursive doubling: L alpha + (P - 1) n beta, ring: (P - 1) (alpha + n beta))
//              + (P - 1) n gamma (the combine)
// with L = ceil(log2 P) and n in bytes (the fit needs two or more distinct C). It reports, per
// C, the smallest P at which the allgather exchange takes 1.1x and 2x as long as the allreduce
// (">max" in the table, 0 in the CSV: not within --max-p). At the measured P the table's own ratio
// is the one to trust (Open MPI's actual algorithms); beyond it the model's.
//
// Deadlines. The same loop also times libsyncbn's own exchange, as a whole training call
// (syncbn_forward_training of a plan of C channels, affine and running statistics off, one sample
// on rank 0 and none elsewhere, so that the call is its packing, its one allreduce of 2C + 18
// doubles and its per-channel finalize), twice: with no deadline (syncbn_comm_set_timeout 0: the
// blocking MPI_Allreduce) and with the default 600 s deadline (recursive doubling on MPI_Isend /
// MPI_Irecv over the communicator's copy of the buffer, polled with MPI_Testall). The second table gives both against the blocking
// MPI_Allreduce of the same n doubles, and the deadline's own cost (deadline / no deadline).
// The two calls differ only in their exchange, so the deadline-aware exchange alone takes
// allreduce + (deadline - no deadline), the difference taken per iteration (both calls run in
// the same iteration) and its median used: its ratio to the blocking MPI_Allreduce is the last
// column ("exchange/ar").
#include <mpi.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "allgather_comm.hpp"
#include "driver/bench_driver.hpp"
#include "driver/bench_mpi.hpp"
#include "syncbn/syncbn.h"
#include "syncbn/syncbn_mpi.h"

namespace {

constexpr int kGuardDoubles = 18;  // the packed buffer's count and guard slots (2C + 18)

using bench::median;

struct Row {
  int ranks = 1, channels = 0;
  double bytes = 0, allreduce_us = 0, allgather_us = 0, combine_us = 0;
  double call_blocking_us = 0, call_deadline_us = 0;  // syncbn_forward_training, see above
  double deadline_extra_us = 0;  // median over iterations of (deadline - no deadline)
  // The model (NaN where not fitted); crossover P 0: not within --max-p.
  double alpha_us = bench::kNaN, beta_us_per_byte = bench::kNaN, gamma_us_per_byte = bench::kNaN;
  int p_11 = -1, p_2 = -1;  // -1: not modelled
  double exchange_ratio() const { return (allreduce_us + deadline_extra_us) / allreduce_us; }
};

// The CSV / JSON columns.
const bench::Fields<Row>& fields() {
  using bench::integer;
  using bench::num;
  static const bench::Fields<Row> f = {
      {"ranks", [](const Row& r) { return integer(r.ranks); }},
      {"channels", [](const Row& r) { return integer(r.channels); }},
      {"bytes_per_rank", [](const Row& r) { return integer(static_cast<int64_t>(r.bytes)); }},
      {"allreduce_us", [](const Row& r) { return num(r.allreduce_us); }},
      {"allgather_us", [](const Row& r) { return num(r.allgather_us); }},
      {"combine_us", [](const Row& r) { return num(r.combine_us); }},
      {"model_alpha_us", [](const Row& r) { return num(r.alpha_us); }},
      {"model_beta_us_per_byte", [](const Row& r) { return num(r.beta_us_per_byte); }},
      {"model_gamma_us_per_byte", [](const Row& r) { return num(r.gamma_us_per_byte); }},
      {"model_crossover_p_1.1x",
       [](const Row& r) { return r.p_11 < 0 ? num(bench::kNaN) : integer(r.p_11); }},
      {"model_crossover_p_2x",
       [](const Row& r) { return r.p_2 < 0 ? num(bench::kNaN) : integer(r.p_2); }},
      {"call_no_deadline_us", [](const Row& r) { return num(r.call_blocking_us); }},
      {"call_deadline_us", [](const Row& r) { return num(r.call_deadline_us); }},
      {"deadline_exchange_ratio", [](const Row& r) { return num(r.exchange_ratio()); }},
  };
  return f;
}

const bench::Table& exchange_table() {
  using C = bench::Column;
  static const bench::Table t({C{"C", "", 6, 0}, C{"bytes/rank", "", 10, 0},
                               C{"allreduce(us)", "", 14, 2}, C{"allgather(us)", "", 14, 2},
                               C{"combine(us)", "", 12, 2}, C{"allgather/ar", "", 14, 2}});
  return t;
}

const bench::Table& deadline_table() {
  using C = bench::Column;
  static const bench::Table t({C{"C", "", 6, 0}, C{"allreduce(us)", "", 14, 2},
                               C{"no deadline(us)", "", 16, 2}, C{"deadline(us)", "", 16, 2},
                               C{"deadline/ar", "", 14, 2}, C{"deadline/none", "", 14, 2},
                               C{"exchange/ar", "", 12, 2}});
  return t;
}

void check(syncbn_status_t s, const char* what) {
  if (s != SYNCBN_SUCCESS) {
    std::fprintf(stderr, "exchange_bench: %s: %s: %s\n", what, syncbn_status_string(s),
                 syncbn_last_error());
    MPI_Abort(MPI_COMM_WORLD, 1);
  }
}

// One training call of a plan of c channels whose only sample is on rank 0 (see the file
// comment), over comm with the given deadline.
class SyncbnCall {
 public:
  SyncbnCall(int c, int rank, double timeout_seconds) : c_(c), rank_(rank) {
    check(syncbn_comm_create_mpi(MPI_COMM_WORLD, &comm_), "syncbn_comm_create_mpi");
    check(syncbn_comm_set_timeout(comm_, timeout_seconds), "syncbn_comm_set_timeout");
    syncbn_config_t config;
    check(syncbn_config_init(&config, c, SYNCBN_FLOAT32), "syncbn_config_init");
    config.affine = 0;
    config.track_running_stats = 0;
    check(syncbn_plan_create(comm_, &config, &plan_), "syncbn_plan_create");
    x_.assign(static_cast<std::size_t>(c), 1.0f);
    y_.assign(static_cast<std::size_t>(c), 0.0f);
  }
  ~SyncbnCall() {
    syncbn_plan_destroy(plan_);
    syncbn_comm_destroy(comm_);
  }
  SyncbnCall(const SyncbnCall&) = delete;
  SyncbnCall& operator=(const SyncbnCall&) = delete;
  void run() {
    const std::int64_t shape[2] = {rank_ == 0 ? 1 : 0, c_};
    check(syncbn_forward_training(plan_, 2, shape, x_.data(), nullptr, nullptr, y_.data(), nullptr,
                                  nullptr, nullptr, nullptr, nullptr, nullptr),
          "syncbn_forward_training");
  }

 private:
  int c_, rank_;
  syncbn_comm_t comm_ = nullptr;
  syncbn_plan_t plan_ = nullptr;
  std::vector<float> x_, y_;
};

// Least-squares line y = a + b x.
void fit_line(const std::vector<double>& x, const std::vector<double>& y, double& a, double& b) {
  const double n = static_cast<double>(x.size());
  double sx = 0, sy = 0, sxx = 0, sxy = 0;
  for (std::size_t i = 0; i < x.size(); ++i) {
    sx += x[i];
    sy += y[i];
    sxx += x[i] * x[i];
    sxy += x[i] * y[i];
  }
  const double den = n * sxx - sx * sx;
  b = den != 0 ? (n * sxy - sx * sy) / den : 0;
  a = (sy - b * sx) / n;
}

struct Model {
  double alpha = 0, beta = 0, gamma = 0;  // us per step, us per byte sent, us per byte summed
  double allreduce(double p, double n) const {
    const double l = std::ceil(std::log2(p));
    const double rd = l * (alpha + n * beta + n * gamma);
    const double ring = 2 * (p - 1) * alpha + 2 * (p - 1) / p * n * beta + (p - 1) / p * n * gamma;
    return std::min(rd, ring);
  }
  double allgather(double p, double n) const {
    const double l = std::ceil(std::log2(p));
    return std::min(l * alpha + (p - 1) * n * beta, (p - 1) * (alpha + n * beta)) +
           (p - 1) * n * gamma;
  }
};

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int rank = 0, size = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);

  CLI::App app{"syncbn's O(C) allreduce against the O(P C) allgather exchange of PyTorch / Apex"};
  std::vector<int> channels{64, 128, 256, 512, 1024, 2048};
  bench::CommonOptions o;
  o.iters = 200;
  o.warmup = 20;
  int max_p = 4096;
  app.add_option("--channels", channels, "channel counts C (payload 2C + 18 doubles)")
      ->delimiter(',')
      ->check(CLI::Range(1, 1 << 26))
      ->capture_default_str();
  bench::add_common_options(app, o);
  app.add_option("--max-p", max_p, "largest P of the model")
      ->check(CLI::Range(2, 1 << 20))
      ->capture_default_str();
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    const int code = rank == 0 ? app.exit(e) : (e.get_exit_code() == 0 ? 0 : 2);
    MPI_Finalize();
    return code;
  }
  const int iters = o.iters, warmup = o.warmup;

  bench::AllgatherExchange allgather(MPI_COMM_WORLD);
  std::vector<Row> rows;
  for (const int c : channels) {
    const int n = 2 * c + kGuardDoubles;
    std::vector<double> buf(n), sum(n);
    for (int i = 0; i < n; ++i) buf[i] = rank + i * 1e-3;
    std::vector<double> t_ar, t_ag, t_comb, t_blocking, t_deadline, t_extra;
    SyncbnCall blocking(c, rank, 0.0), deadline(c, rank, 600.0);
    for (int it = 0; it < warmup + iters; ++it) {
      std::vector<double> local(5);
      for (int k = 0; k < 4; ++k) {
        const int which = (k + it) % 4;  // rotate which one goes first
        MPI_Barrier(MPI_COMM_WORLD);
        const double a = bench::now_seconds();
        if (which == 0) {
          MPI_Allreduce(MPI_IN_PLACE, buf.data(), n, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
          local[0] = bench::now_seconds() - a;
        } else if (which == 2) {
          blocking.run();
          local[3] = bench::now_seconds() - a;
        } else if (which == 3) {
          deadline.run();
          local[4] = bench::now_seconds() - a;
        } else {
          allgather.exchange(buf.data(), sum.data(), n, &local[2]);
          local[1] = bench::now_seconds() - a;
        }
        for (int i = 0; i < n; ++i) buf[i] = rank + i * 1e-3;  // keep the values bounded
      }
      bench::max_over_ranks(local, MPI_COMM_WORLD);  // the slowest rank's
      if (it >= warmup) {
        t_ar.push_back(local[0] * 1e6);
        t_ag.push_back(local[1] * 1e6);
        t_comb.push_back(local[2] * 1e6);
        t_blocking.push_back(local[3] * 1e6);
        t_deadline.push_back(local[4] * 1e6);
        t_extra.push_back((local[4] - local[3]) * 1e6);
      }
    }
    Row r;
    r.ranks = size;
    r.channels = c;
    r.bytes = 8.0 * n;
    r.allreduce_us = median(t_ar);
    r.allgather_us = median(t_ag);
    r.combine_us = median(t_comb);
    r.call_blocking_us = median(t_blocking);
    r.call_deadline_us = median(t_deadline);
    r.deadline_extra_us = median(t_extra);
    rows.push_back(r);
  }

  std::vector<int> distinct = channels;
  std::sort(distinct.begin(), distinct.end());
  const bool fit = std::unique(distinct.begin(), distinct.end()) - distinct.begin() >= 2;
  if (rank == 0) {
    const double p = size;
    std::printf("# exchange_bench: %d ranks, %d iterations (%d warm-up), median of the slowest "
                "rank per call\n",
                size, iters, warmup);
    exchange_table().print_header();
    for (const Row& r : rows) {
      exchange_table().print_row({bench::integer(r.channels), bench::num(r.bytes),
                                  bench::num(r.allreduce_us), bench::num(r.allgather_us),
                                  bench::num(r.combine_us),
                                  bench::num(r.allgather_us / r.allreduce_us)});
    }
    std::printf("# Deadlines: syncbn_forward_training (one allreduce of 2C + 18 doubles) with no "
                "deadline and with 600 s, against MPI_Allreduce of the same buffer\n");
    deadline_table().print_header();
    for (const Row& r : rows) {
      deadline_table().print_row(
          {bench::integer(r.channels), bench::num(r.allreduce_us),
           bench::num(r.call_blocking_us), bench::num(r.call_deadline_us),
           bench::num(r.call_deadline_us / r.allreduce_us),
           bench::num(r.call_deadline_us / r.call_blocking_us), bench::num(r.exchange_ratio())});
    }

    if (!fit) {
      std::printf("# Model: needs two or more distinct --channels values to fit; skipped\n");
    } else {
      // Fit at this P: allgather less combine t = L alpha + (P - 1) n beta; combine
      // t = (P - 1) n gamma.
      const double steps = std::max(std::ceil(std::log2(p)), 1.0),
                   others = std::max(p - 1, 1.0);
      std::vector<double> x, y_ag, y_comb;
      for (const Row& r : rows) {
        x.push_back(r.bytes);
        y_ag.push_back(r.allgather_us - r.combine_us);
        y_comb.push_back(r.combine_us);
      }
      Model m;
      double intercept = 0, slope = 0, unused = 0;
      fit_line(x, y_ag, intercept, slope);
      fit_line(x, y_comb, unused, m.gamma);
      m.alpha = std::max(intercept / steps, 0.0);
      m.beta = std::max(slope / others, 0.0);
      m.gamma = std::max(m.gamma / others, 0.0);
      std::printf("# Model (Hockney, allgather fitted at P = %d over the C sweep): alpha %.3f us "
                  "per step, beta %.3g us/byte (%.2f GB/s), gamma %.3g us/byte summed\n",
                  size, m.alpha, m.beta, m.beta > 0 ? 1e-3 / m.beta : 0.0, m.gamma);
      std::printf("# Modelled allgather / allreduce by P; crossover = smallest P where the ratio "
                  "reaches 1.1x and 2x\n");
      std::vector<bench::Column> cols{bench::Column{"C", "", 6, 0}};
      for (int q = 2; q <= max_p; q *= 2) cols.emplace_back(std::to_string(q), "", 7, 2);
      cols.emplace_back("P(1.1x)", "", 9, 0);
      cols.emplace_back("P(2x)", "", 9, 0);
      const bench::Table model_table(cols);
      model_table.print_header();
      for (Row& r : rows) {
        bench::Record cells{bench::integer(r.channels)};
        int p11 = 0, p2 = 0;
        for (int q = 2; q <= max_p; q *= 2) {
          const double ratio = m.allgather(q, r.bytes) / m.allreduce(q, r.bytes);
          cells.push_back(bench::num(ratio));
          if (p11 == 0 && ratio >= 1.1) p11 = q;
          if (p2 == 0 && ratio >= 2.0) p2 = q;
        }
        const auto cell = [](int q) {
          return bench::text(q > 0 ? std::to_string(q) : std::string(">max"));
        };
        cells.push_back(cell(p11));
        cells.push_back(cell(p2));
        model_table.print_row(cells);
        r.alpha_us = m.alpha;
        r.beta_us_per_byte = m.beta;
        r.gamma_us_per_byte = m.gamma;
        r.p_11 = p11;
        r.p_2 = p2;
      }
    }
    std::vector<bench::Record> records;
    for (const Row& r : rows) records.push_back(bench::record_of(fields(), r));
    try {
      if (!o.csv.empty()) bench::write_csv(o.csv, bench::schema_of(fields()), records);
      if (!o.json.empty()) {
        bench::write_json(o.json,
                          {{"date", bench::text(bench::utc_now())},
                           {"hostname", bench::text(bench::host_name())},
                           {"ranks", bench::integer(size)},
                           {"iterations", bench::integer(iters)},
                           {"warmup", bench::integer(warmup)},
                           {"max_p", bench::integer(max_p)}},
                          bench::schema_of(fields()), records);
      }
    } catch (const std::exception& e) {
      std::fprintf(stderr, "exchange_bench: %s\n", e.what());
    }
  }
  MPI_Finalize();
  return 0;
}
