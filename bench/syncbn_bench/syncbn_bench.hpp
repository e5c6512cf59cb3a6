// syncbn_bench's shared declarations: the goals and tolerances, the options, the communicators
// of a run, one table row, the checks' tallies, the JSON's meta, and the entry points between
// its files (syncbn_bench_main.cpp: the flags and the loop over shapes; modes.cpp: one shape's
// measurements and checks; report.cpp: the table, the footer, CSV and JSON). What the bench
// measures: syncbn_bench_main.cpp's header.
#ifndef SYNCBN_BENCH_SYNCBN_BENCH_HPP
#define SYNCBN_BENCH_SYNCBN_BENCH_HPP

#include <mpi.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "allgather_comm.hpp"
#include "driver/bench_driver.hpp"
#include "syncbn/syncbn.hpp"

namespace syncbn_bench {

using bench::kNaN;
using bench::Shape4;
constexpr double kCopyGoal = 0.80;        // fraction of the best copy's bandwidth
constexpr int kCopyRepsPerRound = 4;      // copies in each round (the copy's samples: x -n)
constexpr double kOverheadGoal = 1.2;     // sync overhead / bare allreduce
constexpr double kCheckTolerance = 1e-3;  // max abs difference to oneDNN (f32, values O(1))
constexpr double kAllgatherTolerance = 1e-5;  // max rel difference of allgather's stats to sync's
inline const char* const kModes[] = {"local", "sync", "allgather"};

struct Options {
  bench::CommonOptions common;  // -n, -w, --csv, --json
  std::vector<Shape4> shapes;
  bool f64 = false;
  bool nhwc = false;
  bool mode[3] = {true, true, true};  // local, sync, allgather
  bool onednn = true;
  bool check = true;
  bool allgather_bwd = false;
  bool one_host = true;  // every rank on this host (one steady clock)
};

// The communicators of the run: sync mode's MPI communicator, allgather mode's custom one, and
// the logged MPI_Allreduce that gives sync rows their in fwd / in bwd (see the file comment).
struct Comms {
  syncbn::Communicator world;
  bench::ExchangeComm& gather;
  bench::ExchangeComm& logged;
};

struct Row {
  Shape4 shape;
  std::string mode, dtype, layout;
  int ranks = 1, threads = 1;
  int64_t tensor_bytes = 0;
  double bytes_fwd = 0, bytes_bwd = 0;
  double fwd_us = kNaN, bwd_us = kNaN, fwd_gbs = kNaN, bwd_gbs = kNaN;
  double copy_best_gbs = kNaN, copy_med_gbs = kNaN;  // the fastest and the median repetition
  double fwd_pct_copy = kNaN, bwd_pct_copy = kNaN;   // of the best copy
  double allreduce_us = kNaN;
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
  long expected_hits = 0;                           // allgathers allgather mode made
  long allgather_hits = 0;                          // allgathers the communicator made
};


struct Meta {  // the JSON's "meta"
  std::string date, host, cpu, dtype, layout, llc_source, onednn;
  int ranks = 1, threads = 1, cpus = 1, iters = 0, warmup = 0;
  std::string omp_env;
  int64_t llc_bytes = 0;
};

// One shape: copy, the selected modes, the bare allreduce, oneDNN, the checks (modes.cpp).
// COLLECTIVE over mpi; the rows are the same on every rank.
std::vector<Row> run_shape(const Shape4& s, const Options& o, const Comms& comms, MPI_Comm mpi,
                           MPI_Comm allreduce_comm, int rank, Checks& chk);

// The output (report.cpp): the table, its rows, the CSV / JSON columns and meta, the footer.
const bench::Table& table();
bench::Record table_row(const Row& r);
const bench::Fields<Row>& fields();
std::vector<std::pair<std::string, bench::Value>> json_meta(const Meta& m);
void print_summary(const std::vector<Row>& rows, const Checks& chk, const Options& o,
                   const Meta& meta);

}  // namespace syncbn_bench

#endif  // SYNCBN_BENCH_SYNCBN_BENCH_HPP
