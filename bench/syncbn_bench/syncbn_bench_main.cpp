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
//              A plan on a custom communicator (syncbn_comm_create_custom, bench/allgather_comm.hpp:
//              ExchangeComm over a duplicate of MPI_COMM_WORLD) whose allreduce callback does
//              MPI_Allgather of every rank's buffer (P x count doubles) and sums the P
//              contributions in rank order on every rank. The sums are those of sync mode
//              (checked). As in PyTorch and Apex, only the forward exchange is an allgather;
//              their backward is an allreduce of [sum dy | sum dy (x - mean)], so the bench
//              tells the communicator before each call which one runs, and backward in this mode
//              is a plain MPI_Allreduce in the callback unless --allgather-bwd. The callback
//              counts its allgathers; a count other than the calls allgather mode made is a
//              failed check (WRONG in the footer).
//   Both sync and allgather run without a deadline (syncbn_comm_set_timeout 0): sync's exchange
//   is then libsyncbn's blocking MPI_Allreduce (with a deadline it is a polled point-to-point
//   recursive doubling; bench/exchange_bench times the two against each other), and the custom
//   communicator's callback blocks in MPI alike.
//
// Per shape, on the same OpenMP threads and in the same run:
//   fwd, bwd (us)      median over the timed rounds of one call's wall time on each rank,
//                      then the maximum over ranks (MPI_Allreduce MAX). Every call starts after
//                      an MPI_Barrier, so ranks compete for memory alike in every mode. The
//                      measurements of a shape are interleaved: each of the -w + -n rounds runs
//                      local fwd/bwd, sync fwd/bwd (and its logged twin, see in fwd), allgather
//                      fwd/bwd, the bare allreduce and oneDNN fwd/bwd once and the copy 4 times,
//                      in a random order (the same on every rank: seeded with the round), so
//                      outside load (shared machines) and cache state hit all alike. With few
//                      rounds the orders are few, and which op follows which can shift a row by
//                      a few us: compare modes at -n 50 or more.
//   GB/s               bytes that must move over that time: forward reads x twice and writes y
//                      (3 x tensor bytes), backward reads x and dy twice and writes dx (5 x), as
//                      in kernel_bench.
//   copy best, med     a STREAM-style copy y = x of the same tensor (2 x tensor bytes over the
//   (GB/s)             time), 4 x -n repetitions (4 per round, kCopyRepsPerRound, each placed
//                      by the shuffle).
//                      Each repetition runs on all ranks at once (the barrier starts them, so
//                      they compete for memory bandwidth as in the BN calls) and is timed from
//                      the first rank's start to the last rank's end (one host; else the
//                      slowest rank's time; a rank's own time would be short where it ran
//                      alone while the other was descheduled). best = the fastest repetition:
//                      the floor, the most the memory system moved, which outside load can only
//                      lower. On the 2-core VM, in back-to-back runs, the median moved by up to
//                      43% and the best by up to 8%; a slow period of the machine that outlasts
//                      a shape's rounds lowers every column, the best too. med = the median
//                      repetition, to show the spread. The destination is already faulted in
//                      (written by the fill, on the same threads and static partition).
//   % of copy          fwd or bwd GB/s / best copy GB/s (the goal below is on these).
//   allreduce (us)     a bare MPI_Allreduce(SUM, in place) of 2C + 18 doubles on a duplicate of
//                      MPI_COMM_WORLD, one call per round at a random point between the other
//                      ops, median, max over ranks. Like the library's allreduce, it then
//                      follows work that streamed megabytes through the caches; in a hot loop
//                      it is up to ~10x faster on this machine (nccl-tests style numbers), which
//                      would not be a fair baseline.
//   in fwd, in bwd     (table only) the exchange inside libsyncbn's sync or allgather call,
//                      logged by the custom communicator's callback: from the last rank's entry
//                      to the last rank's exit, median over calls. Waiting for the slowest
//                      rank's kernels is not in it; it is the number to hold against the bare
//                      allreduce without the kernels' noise. Needs one host (one clock).
//                      Allgather rows log their own calls. Sync rows are timed on the MPI
//                      communicator, which logs nothing, so sync mode also runs, in every round,
//                      a third plan (same shape and tensors) on a second ExchangeComm whose
//                      callback is the same blocking MPI_Allreduce(SUM, in place) on a duplicate
//                      of MPI_COMM_WORLD; its logged exchanges give the sync rows' in fwd / in
//                      bwd, and its call times are not reported.
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
// Goals (footer): forward and backward at >= 80% of the best copy where one rank's tensor is
// larger than the last-level cache (sysfs, else sysconf) (local rows); faster than oneDNN (local
// rows); sync overhead <= 1.2 x the bare allreduce (sync rows, 2 or more ranks).
// Check (default on, --no-check): syncbn's local forward output y and backward dx against
// oneDNN's (max abs difference over all ranks); save_mean of sync and allgather mode identical
// on every rank; allgather's saved statistics against sync's (max relative difference, WRONG
// above 1e-5: the sums are the same up to the order of their fp64 additions); the number of
// allgathers allgather mode made.
//
// Exit status: 0; 1 if a check failed (a WRONG in the footer); 2 on bad arguments.
// Only rank 0 prints and writes files. CSV: one header line, one line per row, empty fields for
// n/a. JSON: {"meta": {...}, "results": [{same keys as the CSV}, ...]}, null for n/a.
//
// Options, timing, the table and the CSV / JSON writers are the shared driver's
// (bench/driver/bench_driver.hpp, bench_mpi.hpp).
//
// The files: syncbn_bench_main.cpp (this: the flags, the communicators, the loop over shapes),
// modes.cpp (one shape's measurements and checks), report.cpp (table, footer, CSV, JSON),
// syncbn_bench.hpp (what they share); bench/allgather_comm.hpp (the allgather exchange).
#include <mpi.h>
#include <omp.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "driver/bench_mpi.hpp"
#include "syncbn_bench/syncbn_bench.hpp"
#include "syncbn/syncbn_mpi.hpp"
#ifdef SYNCBN_BENCH_HAVE_ONEDNN
#include "onednn_bn.hpp"
#endif

namespace syncbn_bench {

namespace {

// ---- options ------------------------------------------------------------------------------------

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
  bench::add_common_options(app, o.common);
  app.add_option("--mode", modes, "local, sync, allgather: repeatable or a comma list")
      ->delimiter(',')
      ->check(CLI::IsMember({"local", "sync", "allgather"}))
      ->capture_default_str();
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
    o.shapes = bench::resnet50_shapes(batch);
  } else {
    try {
      for (const auto& s : shape_args) o.shapes.push_back(bench::parse_nchw(s));
    } catch (const CLI::ValidationError& e) {
      if (rank == 0) std::fprintf(stderr, "syncbn_bench: %s\n", e.what());
      return 2;
    }
  }

  Meta meta;
  meta.date = bench::utc_now();
  meta.host = bench::host_name();
  meta.cpu = bench::cpu_model();
  meta.dtype = dtype;
  meta.layout = layout;
  meta.ranks = size;
  meta.threads = omp_get_max_threads();
  meta.cpus = static_cast<int>(sysconf(_SC_NPROCESSORS_ONLN));
  meta.iters = o.common.iters;
  meta.warmup = o.common.warmup;
  if (const char* env = std::getenv("OMP_NUM_THREADS")) meta.omp_env = env;
  const bench::Llc llc = bench::last_level_cache();
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
        size, meta.threads, dtype.c_str(), layout.c_str(), o.common.iters, o.common.warmup,
        static_cast<double>(llc.bytes) / 1048576.0, llc.source.c_str(),
        !meta.onednn.empty() ? meta.onednn.c_str()
        : o.f64              ? "n/a (f64)"
        : no_onednn          ? "off"
                             : "not built in");
    std::printf(
        "# Shapes are per rank. GB/s: forward 3x, backward 5x, copy 2x the tensor bytes "
        "over the time; %% of copy: of the best copy.\n");
    std::printf("#\n");
    table().print_header();
  }

  o.one_host = bench::one_host(MPI_COMM_WORLD);
  const syncbn::Communicator world = syncbn::mpi_communicator(MPI_COMM_WORLD);
  world.set_timeout(0);  // sync's exchange: the blocking MPI_Allreduce (see the file comment)
  bench::ExchangeComm gather(MPI_COMM_WORLD), logged(MPI_COMM_WORLD);  // COLLECTIVE
  const Comms comms{world, gather, logged};
  MPI_Comm allreduce_comm = MPI_COMM_NULL;  // like the library's: a duplicate
  MPI_Comm_dup(MPI_COMM_WORLD, &allreduce_comm);

  std::vector<Row> rows;
  Checks chk;
  for (const Shape4& s : o.shapes) {
    const std::vector<Row> shape_rows =
        run_shape(s, o, comms, MPI_COMM_WORLD, allreduce_comm, rank, chk);
    if (rank == 0) {
      for (const Row& r : shape_rows) table().print_row(table_row(r));
    }
    rows.insert(rows.end(), shape_rows.begin(), shape_rows.end());
  }
  // Every rank's count of allgathers must be what allgather mode made.
  chk.allgather_hits = bench::min_over_ranks(gather.allgather_calls(), MPI_COMM_WORLD);
  MPI_Comm_free(&allreduce_comm);

  if (rank == 0) {
    print_summary(rows, chk, o, meta);
    std::vector<bench::Record> records;
    for (const Row& r : rows) records.push_back(bench::record_of(fields(), r));
    if (!o.common.csv.empty()) bench::write_csv(o.common.csv, bench::schema_of(fields()), records);
    if (!o.common.json.empty()) {
      bench::write_json(o.common.json, json_meta(meta), bench::schema_of(fields()), records);
    }
  }
  const bool wrong = (o.check && (chk.sync_unequal > 0 || chk.allgather_unequal > 0 ||
                                  chk.allgather_hits != chk.expected_hits ||
                                  chk.allgather_vs_sync > kAllgatherTolerance ||
                                  (chk.onednn_shapes > 0 && !(chk.fwd_diff <= kCheckTolerance &&
                                                              chk.bwd_diff <= kCheckTolerance))));
  return wrong ? 1 : 0;
}

}  // namespace

}  // namespace syncbn_bench

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int rank = 0, size = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  int rc = 0;
  try {
    rc = syncbn_bench::run(argc, argv, rank, size);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "syncbn_bench: rank %d: %s\n", rank, e.what());
    MPI_Abort(MPI_COMM_WORLD, 1);
  }
  MPI_Finalize();
  return rc;
}

