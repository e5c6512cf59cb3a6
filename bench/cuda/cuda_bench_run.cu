// cuda_bench's run: the device, the communicator (a one-rank NCCL one, or self), cuDNN, the
// buffers, and per problem the measurements in order (copy, the bare one-rank ncclAllReduce,
// syncbn eager and under CUDA graph replay, cuDNN), each Result handed to the Report as it is
// done. What is measured and how: cuda_bench_main.cpp's header.
#include <cinttypes>
#include <cstdio>
#include <stdexcept>
#include <string>
#include <vector>

#include "cudnn_baseline.cuh"
#include "reference.cuh"
#include "syncbn/syncbn.hpp"
#include "syncbn/syncbn_nccl.hpp"

namespace cuda_bench {

namespace {

syncbn_dtype_t syncbn_dtype(DType d) {
  return d == DType::f32 ? SYNCBN_FLOAT32 : d == DType::bf16 ? SYNCBN_BFLOAT16 : SYNCBN_FLOAT16;
}

void measure_syncbn(Context& ctx, Result& r, const ParamSet& ps, const Reference& ref) {
  const Problem& p = r.p;
  syncbn_config_t config = syncbn::make_config(p.shape.c, syncbn_dtype(p.dtype));
  config.layout = p.layout == Layout::nchw ? SYNCBN_CHANNELS_FIRST : SYNCBN_CHANNELS_LAST;
  config.device = SYNCBN_DEVICE_CUDA;
  syncbn::BatchNorm bn(ctx.comm, config);
  const std::vector<int64_t> shape = p.syncbn_shape();
  void* s = static_cast<void*>(ctx.stream);
  int64_t* nbt = ctx.nbt.as<int64_t>();
  auto forward = [&] {
    bn.forward_training(shape, ctx.x.get(), ps.weight, ps.bias, ctx.y.get(), ps.save_mean,
                        ps.save_invstd, ps.rm, ps.rv, nbt, s);
  };
  auto backward = [&] {
    bn.backward(shape, ctx.x.get(), ctx.dy.get(), ps.weight, ps.save_mean, ps.save_invstd,
                ctx.dx.get(), ps.dweight, ps.dbias, s);
  };
  forward();
  backward();
  bn.check_async_error(s);
  r.fwd = ctx.timer.time(forward);
  r.bwd = ctx.timer.time(backward);
  bn.check_async_error(s);
  auto check = [&] {
    if (!ctx.o.check) return;
    const auto e = check_outputs(ctx, p, ref, ps.weight, ps.bias, ctx.y.get(), ps.save_mean,
                                 ps.save_invstd, ctx.dx.get(), ps.dweight, ps.dbias);
    r.fwd_err = std::isnan(r.fwd_err) ? e.first : std::max(r.fwd_err, e.first);
    r.bwd_err = std::isnan(r.bwd_err) ? e.second : std::max(r.bwd_err, e.second);
  };
  check();
  if (ctx.o.graph) {
    // Poison the outputs so that the check after replay sees the graphs' own results.
    CUDA_CHECK(cudaMemsetAsync(ctx.y.get(), 0xff, p.bytes(), ctx.stream));
    CUDA_CHECK(cudaMemsetAsync(ctx.dx.get(), 0xff, p.bytes(), ctx.stream));
    const Graph gf(ctx.stream, capture_mode(ctx.o.capture_mode), forward);
    const Graph gb(ctx.stream, capture_mode(ctx.o.capture_mode), backward);
    r.fwd_graph = ctx.timer.time([&] { gf.launch(ctx.stream); });
    r.bwd_graph = ctx.timer.time([&] { gb.launch(ctx.stream); });
    bn.check_async_error(s);
    check();
  }
}

Result measure(Context& ctx, const Problem& p, int64_t max_c) {
  Result r;
  r.p = p;
  const ParamSet ps = param_set(ctx, max_c);
  const Reference ref = reference_of(ctx, max_c);
  const int64_t c = p.shape.c;
  prepare_problem(ctx, p, ps, ref);

  r.copy = ctx.timer.time([&] {
    CUDA_CHECK(cudaMemcpyAsync(ctx.y.get(), ctx.x.get(), p.bytes(), cudaMemcpyDeviceToDevice,
                               ctx.stream));
  });
  if (ctx.nccl != nullptr) {
    CUDA_CHECK(cudaMemsetAsync(ctx.allreduce_buf.get(), 0, ctx.allreduce_buf.bytes(), ctx.stream));
    r.allreduce = ctx.timer.time([&] {
      NCCL_CHECK(ncclAllReduce(ctx.allreduce_buf.get(), ctx.allreduce_buf.get(),
                               static_cast<size_t>(2 * c + 18), ncclDouble, ncclSum, ctx.nccl,
                               ctx.stream));
    });
  }
  try {
    measure_syncbn(ctx, r, ps, ref);
  } catch (const std::exception& e) {
    r.failure = e.what();
    recover(ctx.stream);
  }
  try {
    measure_cudnn(ctx, r, ps, ref);
  } catch (const std::exception& e) {
    r.cudnn_note += std::string("failed: ") + e.what() + "; ";
    recover(ctx.stream);
  }
  const auto it = ctx.torch.find(TorchKey{p.shape.name, p.n, name(p.dtype), name(p.layout)});
  if (it != ctx.torch.end()) r.torch = it->second;
  return r;
}

std::string version_string(int v) {
  // NCCL >= 2.9: MAJOR * 10000 + MINOR * 100 + PATCH; cuDNN 9: MAJOR * 10000 + MINOR * 100 + PATCH.
  return std::to_string(v / 10000) + "." + std::to_string(v / 100 % 100) + "." +
         std::to_string(v % 100);
}

}  // namespace

int run(const Options& o) {
  int ndev = 0;
  const cudaError_t de = cudaGetDeviceCount(&ndev);
  if (de != cudaSuccess || ndev == 0) {
    std::fprintf(stderr,
                 "cuda_bench: no CUDA device available (cudaGetDeviceCount: %s); this "
                 "benchmark needs a GPU\n",
                 de != cudaSuccess ? cudaGetErrorString(de) : "0 devices");
    return 2;
  }
  if (o.device >= ndev) {
    std::fprintf(stderr, "cuda_bench: --device %d, but only %d device(s)\n", o.device, ndev);
    return 2;
  }
  CUDA_CHECK(cudaSetDevice(o.device));
  cudaDeviceProp prop{};
  CUDA_CHECK(cudaGetDeviceProperties(&prop, o.device));
  int mem_khz = 0, bus_bits = 0, rt = 0, drv = 0, nccl_v = 0;
  // Informational only (these attributes are deprecated): 0 where the runtime declines.
  if (cudaDeviceGetAttribute(&mem_khz, cudaDevAttrMemoryClockRate, o.device) != cudaSuccess ||
      cudaDeviceGetAttribute(&bus_bits, cudaDevAttrGlobalMemoryBusWidth, o.device) != cudaSuccess) {
    (void)cudaGetLastError();
    mem_khz = bus_bits = 0;
  }
  CUDA_CHECK(cudaRuntimeGetVersion(&rt));
  CUDA_CHECK(cudaDriverGetVersion(&drv));
  NCCL_CHECK(ncclGetVersion(&nccl_v));

  std::printf("# cuda_bench: syncbn CUDA forward training / backward on one GPU\n");
  std::printf("# device %d: %s, sm_%d%d, %d SMs, %.1f GiB, L2 %.0f MB, "
              "HBM peak (from clocks) %.0f GB/s\n",
              o.device, prop.name, prop.major, prop.minor, prop.multiProcessorCount,
              prop.totalGlobalMem / 1073741824.0, prop.l2CacheSize / 1e6,
              2.0 * mem_khz * 1e3 * (bus_bits / 8) / 1e9);
  std::printf("# CUDA runtime %d.%d, driver %d.%d, cuDNN %s, NCCL %s, syncbn %d.%d.%d\n",
              rt / 1000, rt % 1000 / 10, drv / 1000, drv % 1000 / 10,
              version_string(static_cast<int>(cudnnGetVersion())).c_str(),
              version_string(nccl_v).c_str(), SYNCBN_VERSION_MAJOR, SYNCBN_VERSION_MINOR,
              SYNCBN_VERSION_PATCH);
  std::printf("# comm %s; -n %d -w %d (median of per-iteration CUDA event times, stream held "
              "while enqueuing); %s L2; graph capture %s\n",
              o.comm == CommKind::nccl ? "nccl (one-rank ncclCommInitAll)" : "self", o.iters,
              o.warmup, o.cold_l2 ? "cold" : "warm (buffers reused back to back)",
              o.graph ? "on" : "off");
  std::printf("# bytes moved: forward 3x tensor, backward 5x tensor, copy 2x tensor; "
              "x<other> = other time / syncbn time (higher: syncbn faster)\n");
  std::fflush(stdout);

  cudaStream_t stream = nullptr;
  CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  struct StreamGuard {
    cudaStream_t s;
    ~StreamGuard() { (void)cudaStreamDestroy(s); }
  } stream_guard{stream};

  ncclComm_t nccl = nullptr;
  if (o.comm == CommKind::nccl) NCCL_CHECK(ncclCommInitAll(&nccl, 1, &o.device));
  struct NcclGuard {
    ncclComm_t c;
    ~NcclGuard() {
      if (c != nullptr) (void)ncclCommDestroy(c);
    }
  } nccl_guard{nccl};

  cudnnHandle_t cudnn = nullptr;
  CUDNN_CHECK(cudnnCreate(&cudnn));
  struct CudnnGuard {
    cudnnHandle_t h;
    ~CudnnGuard() { (void)cudnnDestroy(h); }
  } cudnn_guard{cudnn};
  CUDNN_CHECK(cudnnSetStream(cudnn, stream));

  // Problems, and the buffer sizes they need.
  std::vector<Problem> problems;
  size_t max_bytes = 0;
  int64_t max_c = 1;
  for (const auto& s : o.shapes) {
    for (int64_t n : o.batches) {
      for (DType d : o.dtypes) {
        for (Layout l : o.layouts) {
          problems.push_back(Problem{s, n, d, l});
          max_bytes = std::max(max_bytes, problems.back().bytes());
          max_c = std::max(max_c, s.c);
        }
      }
    }
  }

  DeviceBuffer flush;
  if (o.cold_l2) flush = DeviceBuffer(2 * static_cast<size_t>(std::max(prop.l2CacheSize, 1 << 20)));
  Timer timer(stream, o, o.cold_l2 ? flush.get() : nullptr, flush.bytes());

  // Plans hold the communicator; the context (and every plan) goes before nccl_guard.
  Context ctx{o,
              stream,
              prop.multiProcessorCount,
              nccl,
              o.comm == CommKind::nccl ? syncbn::nccl_communicator(nccl)
                                       : syncbn::Communicator::self(),
              cudnn,
              timer,
              DeviceBuffer(max_bytes),
              DeviceBuffer(max_bytes),
              DeviceBuffer(max_bytes),
              DeviceBuffer(max_bytes),
              DeviceBuffer(max_bytes),
              DeviceBuffer(max_bytes),
              DeviceBuffer(kParamArrays * max_c * sizeof(float)),
              DeviceBuffer(sizeof(int64_t)),
              DeviceBuffer(5 * max_c * sizeof(double)),
              DeviceBuffer(6 * sizeof(unsigned)),
              DeviceBuffer((2 * max_c + 18) * sizeof(double)),
              {}};
  if (!o.torch_csv.empty()) ctx.torch = read_torch_csv(o.torch_csv);

  Report report(o);  // opens --csv

  std::vector<Result> rows;
  for (size_t i = 0; i < problems.size(); ++i) {
    const Problem& p = problems[i];
    std::fprintf(stderr, "# [%zu/%zu] %s N=%" PRId64 " %s %s\n", i + 1, problems.size(),
                 p.shape.name.c_str(), p.n, name(p.dtype), name(p.layout));
    rows.push_back(measure(ctx, p, max_c));
    report.add(rows.back());
  }

  RunInfo info;
  info.device = prop.name;
  info.cuda_runtime = std::to_string(rt / 1000) + "." + std::to_string(rt % 1000 / 10);
  info.driver = std::to_string(drv / 1000) + "." + std::to_string(drv % 1000 / 10);
  info.cudnn = version_string(static_cast<int>(cudnnGetVersion()));
  info.nccl = version_string(nccl_v);
  info.syncbn = std::to_string(SYNCBN_VERSION_MAJOR) + "." + std::to_string(SYNCBN_VERSION_MINOR) +
                "." + std::to_string(SYNCBN_VERSION_PATCH);
  return report.finish(rows, info);
}

}  // namespace cuda_bench
