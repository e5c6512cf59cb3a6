// syncbn_bench's output, through the shared driver (bench/driver/bench_driver.hpp): the
// nccl-tests-style table (a group line, names, units; the exchange columns are table only), the
// CSV / JSON columns (named once, fields()) and the JSON's meta, and the footer (goals, checks,
// what the modes and columns mean).
#include <cmath>
#include <cstdio>

#include "syncbn_bench/syncbn_bench.hpp"

namespace syncbn_bench {

// The text table: the CSV / JSON columns and the exchange (in fwd, in bwd), laid out as
// nccl-tests do: a group line, the names, the units.
const bench::Table& table() {
  using C = bench::Column;
  static const bench::Table t({
      C{"shape (NxCxHxW)", "", 18, 0, "", 1},
      C{"size", "(MiB)", 6, 1},
      C{"mode", "", 9, 0},
      C{"fwd", "(us)", 10, 1, "syncbn", 2},
      C{"bwd", "(us)", 10, 1, "syncbn"},
      C{"fwd", "(GB/s)", 10, 2, "syncbn"},
      C{"bwd", "(GB/s)", 10, 2, "syncbn"},
      C{"best", "(GB/s)", 6, 1, "copy", 2},
      C{"med", "(GB/s)", 6, 1, "copy"},
      C{"fwd", "(%)", 5, 0, "% of copy", 2},
      C{"bwd", "(%)", 5, 0, "% of copy"},
      C{"allreduce", "(us)", 9, 2, "bare", 2},
      C{"in fwd", "(us)", 9, 2, "exchange and overhead", 2},
      C{"in bwd", "(us)", 9, 2, "exchange and overhead"},
      C{"ovh fwd", "(us)", 9, 1, "exchange and overhead"},
      C{"ovh bwd", "(us)", 9, 1, "exchange and overhead"},
      C{"fwd", "(x ar)", 6, 2, "exchange and overhead"},
      C{"bwd", "(x ar)", 6, 2, "exchange and overhead"},
      C{"fwd", "(us)", 8, 0, "oneDNN", 2},
      C{"bwd", "(us)", 8, 0, "oneDNN"},
      C{"ours/", "dnnl", 7, 2, "oneDNN"},
      C{"ours/", "dnnl", 7, 2, "oneDNN"},
  });
  return t;
}

bench::Record table_row(const Row& r) {
  using bench::num;
  return {bench::text(r.shape.name()),
          num(static_cast<double>(r.tensor_bytes) / 1048576.0),
          bench::text(r.mode),
          num(r.fwd_us),
          num(r.bwd_us),
          num(r.fwd_gbs),
          num(r.bwd_gbs),
          num(r.copy_best_gbs),
          num(r.copy_med_gbs),
          num(r.fwd_pct_copy),
          num(r.bwd_pct_copy),
          num(r.allreduce_us),
          num(r.exchange_fwd_us),
          num(r.exchange_bwd_us),
          num(r.overhead_fwd_us),
          num(r.overhead_bwd_us),
          num(r.overhead_fwd_ratio),
          num(r.overhead_bwd_ratio),
          num(r.onednn_fwd_us),
          num(r.onednn_bwd_us),
          num(r.ratio_onednn_fwd),
          num(r.ratio_onednn_bwd)};
}

// The CSV / JSON columns, in the documented order (empty CSV field, JSON null: n/a).
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
      {"mode", [](const Row& r) { return text(r.mode); }},
      {"ranks", [](const Row& r) { return integer(r.ranks); }},
      {"threads", [](const Row& r) { return integer(r.threads); }},
      {"bytes_fwd", [](const Row& r) { return integer(static_cast<int64_t>(r.bytes_fwd)); }},
      {"bytes_bwd", [](const Row& r) { return integer(static_cast<int64_t>(r.bytes_bwd)); }},
      {"fwd_us", [](const Row& r) { return num(r.fwd_us); }},
      {"bwd_us", [](const Row& r) { return num(r.bwd_us); }},
      {"fwd_gbs", [](const Row& r) { return num(r.fwd_gbs); }},
      {"bwd_gbs", [](const Row& r) { return num(r.bwd_gbs); }},
      {"copy_best_gbs", [](const Row& r) { return num(r.copy_best_gbs); }},
      {"copy_med_gbs", [](const Row& r) { return num(r.copy_med_gbs); }},
      {"fwd_pct_copy", [](const Row& r) { return num(r.fwd_pct_copy); }},
      {"bwd_pct_copy", [](const Row& r) { return num(r.bwd_pct_copy); }},
      {"allreduce_us", [](const Row& r) { return num(r.allreduce_us); }},
      {"overhead_fwd_us", [](const Row& r) { return num(r.overhead_fwd_us); }},
      {"overhead_bwd_us", [](const Row& r) { return num(r.overhead_bwd_us); }},
      {"overhead_fwd_ratio", [](const Row& r) { return num(r.overhead_fwd_ratio); }},
      {"overhead_bwd_ratio", [](const Row& r) { return num(r.overhead_bwd_ratio); }},
      {"onednn_fwd_us", [](const Row& r) { return num(r.onednn_fwd_us); }},
      {"onednn_bwd_us", [](const Row& r) { return num(r.onednn_bwd_us); }},
      {"ratio_onednn_fwd", [](const Row& r) { return num(r.ratio_onednn_fwd); }},
      {"ratio_onednn_bwd", [](const Row& r) { return num(r.ratio_onednn_bwd); }},
  };
  return f;
}

struct Tally {
  int pass = 0, miss = 0;
  void add(bool ok) { (ok ? pass : miss) += 1; }
  std::string str() const {
    if (pass + miss == 0) return "n/a";
    return std::to_string(pass) + " PASS, " + std::to_string(miss) + " MISS";
  }
};

std::vector<std::pair<std::string, bench::Value>> json_meta(const Meta& m) {
  using bench::integer;
  using bench::text;
  return {{"date", text(m.date)},
          {"hostname", text(m.host)},
          {"ranks", integer(m.ranks)},
          {"threads", integer(m.threads)},
          {"omp_threads", integer(m.threads)},
          {"omp_num_threads_env", text(m.omp_env)},
          {"cpus_online", integer(m.cpus)},
          {"dtype", text(m.dtype)},
          {"layout", text(m.layout)},
          {"cpu_model", text(m.cpu)},
          {"llc_bytes", integer(m.llc_bytes)},
          {"llc_source", text(m.llc_source)},
          {"iterations", integer(m.iters)},
          {"warmup", integer(m.warmup)},
          {"copy_repetitions", integer(static_cast<int64_t>(m.iters) * kCopyRepsPerRound)},
          {"onednn", text(m.onednn)}};
}

void print_summary(const std::vector<Row>& rows, const Checks& chk, const Options& o,
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
  std::printf(
      "#   >= %.0f%% of best copy, local rows, tensor > LLC (%.1f MiB):  fwd %s;  bwd %s\n",
      100 * kCopyGoal, static_cast<double>(meta.llc_bytes) / 1048576.0, copy_fwd.str().c_str(),
      copy_bwd.str().c_str());
  std::printf(
      "#   faster than oneDNN (ours/dnnl < 1), local rows:            fwd %s;  bwd %s\n",
      dnnl_fwd.str().c_str(), dnnl_bwd.str().c_str());
  std::printf(
      "#   sync overhead <= %.1fx bare allreduce, sync rows:           fwd %s;  bwd %s%s\n",
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
      const double d = chk.allgather_vs_sync;
      char tol[16];
      std::snprintf(tol, sizeof tol, "%.0e", kAllgatherTolerance);
      const std::string vs_sync =
          std::isnan(d) ? std::string("n/a (needs sync mode)")
                        : bench::format_value(bench::num(d), "") +
                              (d <= kAllgatherTolerance ? "  OK" : "  WRONG") + " (tolerance " +
                              tol + ")";
      std::printf(
          "#   allgather save_mean identical on all %d ranks: %d of %d shapes  %s; "
          "max rel diff of save_mean/save_invstd to sync: %s\n",
          meta.ranks, chk.allgather_shapes - chk.allgather_unequal, chk.allgather_shapes,
          chk.allgather_unequal == 0 ? "OK" : "WRONG",
          vs_sync.c_str());
    }
  }
  std::printf(
      "# Modes: local = self communicator (no exchange); sync = one MPI_Allreduce(SUM) of "
      "2C+18 doubles per call;\n");
  if (o.mode[2]) {
    std::printf(
        "#   allgather = PyTorch/Apex-style exchange: a custom communicator whose allreduce is "
        "MPI_Allgather of P x (2C+18)\n");
    std::printf(
        "#   doubles + a rank-order sum on every rank (bench/allgather_comm.hpp), in %s.\n",
        o.allgather_bwd ? "forward and backward"
                        : "forward only (backward is an allreduce, as in PyTorch/Apex)");
    const char* warning = chk.allgather_hits == chk.expected_hits ? ""
                          : chk.allgather_hits == 0
                              ? "  WRONG: no allgather was made: allgather rows are sync rows"
                              : "  WRONG: not the expected count";
    std::printf("#   allgathers made by the custom communicator: %ld (expected %ld)%s\n",
                chk.allgather_hits, chk.expected_hits, warning);
    if (*warning) std::fprintf(stderr, "syncbn_bench:%s\n", warning + 1);
  }
  if (o.mode[1] || o.mode[2]) {
    std::printf(
        "# Exchange: in fwd / in bwd = the exchange inside libsyncbn's call, logged by a custom "
        "communicator (sync rows: a\n#   logged plan on a blocking MPI_Allreduce, run beside "
        "the timed one), last rank in to last rank out,\n#   median over calls (one host only; "
        "not in the CSV / JSON).\n");
  }
  std::printf(
      "# Times: median of %d rounds (%d warm-up), each running every op once (copy %d times) in "
      "a random order, per rank,\n#   max over ranks; overhead = median over rounds of (mode - "
      "local), each call as long as on its slowest rank;\n#   (x ar) = overhead / bare "
      "allreduce.\n",
      o.common.iters, o.common.warmup, kCopyRepsPerRound);
  std::printf(
      "# Copy: %d repetitions (%d per round), each on all ranks at once (after the barrier), "
      "timed\n#   %s;\n#   best = the fastest repetition, the floor that %% of copy and the %.0f%% "
      "goal are against; med = their median.\n",
      o.common.iters * kCopyRepsPerRound, kCopyRepsPerRound,
      o.one_host ? "from the first rank's start to the last rank's end"
                 : "on the slowest rank (ranks on several hosts: no common clock)",
      100 * kCopyGoal);
  std::fflush(stdout);
}

}  // namespace syncbn_bench
