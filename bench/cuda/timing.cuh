// cuda_bench's timing: Timer (per-iteration CUDA event times behind a stream hold, their median,
// minimum, back-to-back span and the host's enqueue time; see cuda_bench_main.cpp's header) and
// Graph (one captured call, instantiated, replayed by the Timer). The hold kernel is timing.cu's.
#ifndef SYNCBN_BENCH_CUDA_TIMING_CUH
#define SYNCBN_BENCH_CUDA_TIMING_CUH

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <vector>

#include "cuda_common.cuh"
#include "driver/bench_stats.hpp"

namespace cuda_bench {

using bench::median;  // the shared driver's (bench/driver/bench_stats.hpp)

class Timer {
 public:
  Timer(cudaStream_t stream, const Options& o, void* flush, size_t flush_bytes)
      : stream_(stream),
        iters_(o.iters),
        warmup_(o.warmup),
        chunk_(std::min(o.chunk, o.iters)),
        timeout_ns_(static_cast<unsigned long long>(o.hold_timeout_ms * 1e6)),
        flush_(flush),
        flush_bytes_(flush_bytes) {
    start_.resize(chunk_);
    stop_.resize(chunk_);
    for (int i = 0; i < chunk_; ++i) {
      CUDA_CHECK(cudaEventCreate(&start_[i]));
      CUDA_CHECK(cudaEventCreate(&stop_[i]));
    }
    CUDA_CHECK(cudaEventCreateWithFlags(&held_, cudaEventDisableTiming));
    void* host = nullptr;
    CUDA_CHECK(cudaHostAlloc(&host, sizeof(int), cudaHostAllocMapped));
    release_host_ = static_cast<volatile int*>(host);
    *release_host_ = 1;
    void* dev = nullptr;
    CUDA_CHECK(cudaHostGetDevicePointer(&dev, host, 0));
    release_dev_ = static_cast<const int*>(dev);
  }
  Timer(const Timer&) = delete;
  Timer& operator=(const Timer&) = delete;
  ~Timer() {
    for (auto e : start_) (void)cudaEventDestroy(e);
    for (auto e : stop_) (void)cudaEventDestroy(e);
    (void)cudaEventDestroy(held_);
    (void)cudaFreeHost(const_cast<int*>(release_host_));
  }

  // Times op(), which enqueues one iteration on the stream and throws on failure.
  template <class F>
  Stats time(F&& op) {
    for (int i = 0; i < warmup_; ++i) op();
    CUDA_CHECK(cudaStreamSynchronize(stream_));
    std::vector<double> dev, host;
    double span_sum_us = 0;
    Stats st;
    for (int done = 0; done < iters_;) {
      const int len = std::min(chunk_, iters_ - done);
      // After a time-out (op() blocks the host, or enqueues slower than the hold lasts) the
      // rest of this measurement runs without holds rather than waiting out each one.
      const bool held = !st.host_bound;
      if (held) hold();
      try {
        for (int i = 0; i < len; ++i) {
          if (flush_ != nullptr) {
            CUDA_CHECK(cudaMemsetAsync(flush_, (done + i) & 0xff, flush_bytes_, stream_));
          }
          CUDA_CHECK(cudaEventRecord(start_[i], stream_));
          const auto t0 = std::chrono::steady_clock::now();
          op();
          const auto t1 = std::chrono::steady_clock::now();
          CUDA_CHECK(cudaEventRecord(stop_[i], stream_));
          host.push_back(std::chrono::duration<double, std::micro>(t1 - t0).count());
        }
        if (held) {
          const cudaError_t q = cudaEventQuery(held_);
          if (q == cudaSuccess) {
            st.host_bound = true;  // the hold ended on its time-out
          } else if (q != cudaErrorNotReady) {
            CUDA_CHECK(q);
          }
          if (cudaPeekAtLastError() == cudaErrorNotReady) (void)cudaGetLastError();
        }
      } catch (...) {
        release();
        throw;
      }
      release();
      CUDA_CHECK(cudaStreamSynchronize(stream_));
      for (int i = 0; i < len; ++i) {
        float ms = 0;
        CUDA_CHECK(cudaEventElapsedTime(&ms, start_[i], stop_[i]));
        dev.push_back(1e3 * ms);
      }
      float span_ms = 0;
      CUDA_CHECK(cudaEventElapsedTime(&span_ms, start_[0], stop_[len - 1]));
      span_sum_us += 1e3 * span_ms;
      done += len;
    }
    st.median_us = median(dev);
    st.min_us = *std::min_element(dev.begin(), dev.end());
    st.span_us = flush_ != nullptr ? NAN : span_sum_us / iters_;
    st.host_us = median(host);
    return st;
  }

 private:
  void hold();  // timing.cu
  void release();

  cudaStream_t stream_;
  int iters_, warmup_, chunk_;
  unsigned long long timeout_ns_;
  void* flush_;
  size_t flush_bytes_;
  std::vector<cudaEvent_t> start_, stop_;
  cudaEvent_t held_ = nullptr;
  volatile int* release_host_ = nullptr;
  const int* release_dev_ = nullptr;
};

// A CUDA graph of one captured op(), instantiated.
class Graph {
 public:
  template <class F>
  Graph(cudaStream_t stream, cudaStreamCaptureMode mode, F&& op) {
    CUDA_CHECK(cudaStreamBeginCapture(stream, mode));
    cudaGraph_t graph = nullptr;
    try {
      op();
    } catch (...) {
      (void)cudaStreamEndCapture(stream, &graph);
      if (graph != nullptr) (void)cudaGraphDestroy(graph);
      (void)cudaGetLastError();
      throw;
    }
    CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
    const cudaError_t err = cudaGraphInstantiate(&exec_, graph, 0);
    (void)cudaGraphDestroy(graph);
    CUDA_CHECK(err);
  }
  Graph(const Graph&) = delete;
  Graph& operator=(const Graph&) = delete;
  ~Graph() {
    if (exec_ != nullptr) (void)cudaGraphExecDestroy(exec_);
  }
  void launch(cudaStream_t stream) const { CUDA_CHECK(cudaGraphLaunch(exec_, stream)); }

 private:
  cudaGraphExec_t exec_ = nullptr;
};

}  // namespace cuda_bench

#endif  // SYNCBN_BENCH_CUDA_TIMING_CUH
