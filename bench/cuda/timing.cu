// cuda_bench's stream hold: the kernel that holds the stream while the host enqueues a group of
// iterations, and Timer's hold / release of it (timing.cuh).
#include "timing.cuh"

namespace cuda_bench {

namespace {

__device__ __forceinline__ unsigned long long global_timer_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// Holds the stream until the host sets *release (mapped pinned memory) or timeout_ns passes.
__global__ void hold_stream(const volatile int* release, unsigned long long timeout_ns) {
  const unsigned long long t0 = global_timer_ns();
  while (*release == 0) {
    if (global_timer_ns() - t0 > timeout_ns) break;
    __nanosleep(1000);
  }
}

}  // namespace

void Timer::hold() {
  *release_host_ = 0;
  std::atomic_thread_fence(std::memory_order_seq_cst);
  hold_stream<<<1, 1, 0, stream_>>>(release_dev_, timeout_ns_);
  LAUNCH_CHECK();
  CUDA_CHECK(cudaEventRecord(held_, stream_));
}
void Timer::release() {
  std::atomic_thread_fence(std::memory_order_seq_cst);
  *release_host_ = 1;
  std::atomic_thread_fence(std::memory_order_seq_cst);
}

}  // namespace cuda_bench
