// cuda_bench: syncbn's CUDA forward training and backward on one GPU, against the memory floor
// (a device-to-device copy of the same tensor measured in the same run), cuDNN 9's batch norm
// and, through a CSV written by bench/torch_bn_bench.py, PyTorch's own batch-norm kernels.
// Shapes: the 12 distinct batch-norm input shapes of torchvision ResNet-50 (53 BN layers).
//
//   cuda_bench [-n 200] [-w 20] [--batches 2,8,32] [--dtypes f32,bf16] [--layouts nchw,nhwc]
//              [--shapes 2048x7x7,...] [--comm nccl|self] [--csv FILE] [--json FILE]
//              [--torch-csv FILE] [--cudnn-mode best|spatial|persistent|none] [--no-graph]
//              [--cold-l2] ...
//   (cuda_bench --help lists every flag.)
//
// What is timed. syncbn runs a CUDA plan on a one-rank communicator: --comm nccl (default) wraps
// a one-device ncclCommInitAll communicator, so every forward and backward goes through its NCCL
// path and makes its one-rank ncclAllReduce; --comm self exchanges nothing. Each call computes
// what cuDNN's computes: forward y, save_mean, save_invstd and the running statistics; backward
// dx, dweight and dbias. Note: NCCL serves an in-place sum allreduce on ONE rank by enqueueing
// nothing (ncclLaunchOneRank: "in-place is nop"), so on one GPU the nccl rows carry NCCL's host
// cost and syncbn's device-side verdict path, not a transfer; the CSV columns nccl_allreduce_*
// time that bare call (2C + 18 doubles, in place) to show it. A real exchange needs >= 2 GPUs.
//
// How it is timed. Every number is the MEDIAN over -n iterations of per-iteration CUDA event
// timings (events recorded around each call on the same stream), after -w warm-up iterations.
// Before each group of --chunk iterations the stream is held by a kernel that spins until the
// host has enqueued the whole group (as nvbench does), so the events measure device time, not
// the host's launch latency; "host" is the separate CPU time to enqueue one call. A row marked
// "h" released the hold on a time-out: the host fell behind and those times include launch gaps.
// "graph" replays a CUDA graph holding one captured call, timed the same way, per replay.
// Without --cold-l2 the same buffers are used back to back, so tensors smaller than L2 (50 MB
// on H100/H200) are served partly from L2 and can beat the HBM copy rate; --cold-l2 overwrites
// a 2 x L2 buffer before every timed iteration (outside the events).
//
// Byte model (bytes that must move per call; O(C) parameter and statistics traffic ignored):
//   forward  = 3 x tensor bytes: x read for the reduction, x read again to normalize, y written
//   backward = 5 x tensor bytes: x and dy read for the reduction, x and dy read again, dx written
//   copy     = 2 x tensor bytes: read + write (cudaMemcpyAsync, device to device)
// effective bandwidth (GB/s) = model bytes / median time; "%copy" = that over the copy's.
//
// Ratios are "higher is better for syncbn": xcudnn = cuDNN time / syncbn time, xtorchK =
// PyTorch SyncBatchNorm kernels time / syncbn time, xtorchF = F.batch_norm time / syncbn time
// (syncbn eager time, not graph). cuDNN: cudnnBatchNormalizationForwardTraining / Backward,
// CUDNN_BATCHNORM_SPATIAL and _SPATIAL_PERSISTENT (best of both unless --cudnn-mode), NCHW or
// NHWC 4-d descriptors, bf16/f16 data with fp32 scale and bias; "n/a" where cuDNN rejects it.
//
// Correctness (like nccl-tests -c): every output of syncbn and of cuDNN is compared with an fp64
// reference computed on the device; "err" is max |out - ref| / (1 + |ref|) over y, save_mean,
// save_invstd (forward) or dx, dweight, dbias (backward). Tolerances: f32 1e-3, f16 5e-3, bf16
// 2e-2. Rows above them are counted in the footer and make the exit status 3.
//
// Exit status: 0 success, 1 a failure (CUDA, NCCL or cuDNN error, or a syncbn call failed),
// 2 bad usage or no CUDA device, 3 outputs out of tolerance.
//
// This file: the flags (CLI11, through the shared driver bench/driver/bench_driver.hpp) and
// main; it is compiled by the host compiler, like the output (cuda_bench_report.cpp). The parts:
//   cuda_bench.hpp          the shared types (problem, options, statistics, result)
//   cuda_bench_run.cu       the device, the communicator, the loop over problems, syncbn's runs
//   cudnn_baseline.cu       cuDNN's batch norm
//   timing.cuh, timing.cu   the event timer behind a stream hold, CUDA graph replay
//   reference.cuh, .cu      data generation, the fp64 reference, the output checks
//   context.cuh, cuda_common.cuh   the run's buffers and handles; error checks, device memory
//   cuda_bench_report.cpp   the tables, the footer, CSV and JSON
#include <CLI/CLI.hpp>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <string>
#include <vector>

#include "cuda_bench.hpp"
#include "driver/bench_driver.hpp"
#include "syncbn/syncbn.hpp"

namespace {

using namespace cuda_bench;

ShapeSpec parse_shape(const std::string& s) {
  for (const auto& known : resnet50_shapes()) {
    if (known.name == s) return known;
  }
  const bench::Shape3 sh = bench::parse_chw(s, "--shapes");
  return ShapeSpec{sh.name(), sh.c, sh.h, sh.w, 0};
}

// Parses the flags into o; returns -1 to go on, else the exit status (0 after --help).
int parse_options(int argc, char** argv, Options& o) {
  CLI::App app{"cuda_bench: syncbn's CUDA forward training and backward on one GPU against a "
               "copy, cuDNN and PyTorch"};
  bench::CommonOptions common;
  common.iters = o.iters;
  common.warmup = o.warmup;
  std::vector<int64_t> batches = o.batches;
  std::vector<std::string> dtypes{"f32", "bf16"}, layouts{"nchw", "nhwc"}, shapes;
  std::string comm = "nccl", capture = "global";
  int hold_timeout_ms = 100;
  bool no_graph = false, cold_l2 = false, no_check = false, no_dist = false;
  bench::add_common_options(app, common);
  app.add_option("--batches", batches, "per-GPU batch sizes, a comma list")
      ->delimiter(',')
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--dtypes", dtypes, "f32, bf16, f16 (also fp32, float32, bfloat16, fp16, "
                                     "float16), a comma list")
      ->delimiter(',')
      ->check(CLI::IsMember({"f32", "fp32", "float32", "bf16", "bfloat16", "f16", "fp16",
                             "float16"}))
      ->capture_default_str();
  app.add_option("--layouts", layouts, "nchw, nhwc (also channels_first, channels_last), a "
                                       "comma list")
      ->delimiter(',')
      ->check(CLI::IsMember({"nchw", "nhwc", "channels_first", "channels_last"}))
      ->capture_default_str();
  app.add_option("--shapes", shapes,
                 "CxHxW per sample, a comma list (default: the 12 ResNet-50 BN shapes)")
      ->delimiter(',');
  app.add_option("--comm", comm, "nccl: one-rank NCCL communicator; self: no exchange at all")
      ->check(CLI::IsMember({"nccl", "self"}))
      ->capture_default_str();
  app.add_option("--torch-csv", o.torch_csv, "the CSV of torch_bn_bench.py, for the xtorch "
                                             "columns");
  app.add_option("--cudnn-mode", o.cudnn_mode,
                 "best (the faster of the two), spatial, persistent, none")
      ->check(CLI::IsMember({"best", "spatial", "persistent", "none"}))
      ->capture_default_str();
  app.add_flag("--no-graph", no_graph, "skip the CUDA graph replay measurements");
  app.add_flag("--cold-l2", cold_l2, "overwrite 2 x L2 before every timed iteration");
  app.add_flag("--no-check", no_check, "skip the fp64 reference check");
  app.add_option("--capture-mode", capture, "global (as torch.cuda.graph), thread_local, relaxed")
      ->check(CLI::IsMember({"global", "thread_local", "relaxed"}))
      ->capture_default_str();
  app.add_option("--chunk", o.chunk, "iterations enqueued behind one stream hold")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--hold-timeout-ms", hold_timeout_ms,
                 "release a hold after T ms even if the host is behind")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--device", o.device, "CUDA device")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  // torch_bn_bench.py's; accepted so that one flag list serves both.
  app.add_flag("--no-dist", no_dist, "ignored (torch_bn_bench.py's flag)");
  try {
    app.parse(argc, argv);
    if (batches.empty()) throw CLI::ValidationError("--batches", "empty list");
    if (dtypes.empty()) throw CLI::ValidationError("--dtypes", "empty list");
    if (layouts.empty()) throw CLI::ValidationError("--layouts", "empty list");
  } catch (const CLI::ParseError& e) {
    app.exit(e);  // prints the help or the error
    return e.get_exit_code() == 0 ? 0 : 2;
  }
  o.iters = common.iters;
  o.warmup = common.warmup;
  o.csv = common.csv;
  o.json = common.json;
  o.hold_timeout_ms = static_cast<double>(hold_timeout_ms);
  o.batches = batches;
  o.dtypes.clear();
  for (const auto& d : dtypes) {
    const std::string c = bench::canonical_dtype(d);
    o.dtypes.push_back(c == "f32" ? DType::f32 : c == "bf16" ? DType::bf16 : DType::f16);
  }
  o.layouts.clear();
  for (const auto& l : layouts) {
    o.layouts.push_back(bench::canonical_layout(l) == "nchw" ? Layout::nchw : Layout::nhwc);
  }
  if (!shapes.empty()) {
    o.shapes.clear();
    try {
      for (const auto& s : shapes) o.shapes.push_back(parse_shape(s));
    } catch (const CLI::ValidationError& e) {
      std::fprintf(stderr, "cuda_bench: %s\nRun with --help for more information.\n", e.what());
      return 2;
    }
  }
  o.comm = comm == "nccl" ? CommKind::nccl : CommKind::self;
  o.capture_mode = capture == "global"         ? CaptureMode::global
                   : capture == "thread_local" ? CaptureMode::thread_local_
                                               : CaptureMode::relaxed;
  o.graph = !no_graph;
  o.cold_l2 = cold_l2;
  o.check = !no_check;
  return -1;
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  const int status = parse_options(argc, argv, o);
  if (status >= 0) return status;
  try {
    return cuda_bench::run(o);
  } catch (const syncbn::Error& e) {
    std::fprintf(stderr, "cuda_bench: syncbn error: %s\n", e.what());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "cuda_bench: error: %s\n", e.what());
  }
  return 1;
}
