#include "cpu/memory.hpp"

#include <cstdint>
#include <cstdlib>
#include <cstring>
#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace syncbn::cpu {
namespace {

constexpr std::size_t kHugePage = std::size_t{1} << 21;  // 2 MiB, x86-64 and arm64 with 4 KiB pages

bool enabled() {
  static const bool on = [] {
    const char* env = std::getenv("SYNCBN_CPU_HUGEPAGES");
    return env == nullptr || std::strcmp(env, "0") != 0;
  }();
  return on;
}

}  // namespace

void prepare_output(void* data, std::size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (data == nullptr || bytes < kHugePageOutputBytes || !enabled()) return;
  const auto begin = reinterpret_cast<std::uintptr_t>(data);
  const std::uintptr_t first = (begin + kHugePage - 1) & ~(kHugePage - 1);
  const std::uintptr_t last = (begin + bytes) & ~(kHugePage - 1);
  if (last > first) {
    // A hint only: an error (no THP in this kernel, a range that is not anonymous memory)
    // changes nothing, and the write goes ahead on ordinary pages.
    madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
  }
#else
  (void)data;
  (void)bytes;
#endif
}

}  // namespace syncbn::cpu
