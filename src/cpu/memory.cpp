#include "cpu/memory.hpp"

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>
#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
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

// The largest cache of level 3 or more that cpu0's sysfs lists ("32768K"), in bytes; 0 if none.
std::size_t sysfs_llc_bytes() {
  std::size_t best = 0;
  for (int index = 0; index < 16; ++index) {
    const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index);
    std::ifstream level_file(dir + "/level"), size_file(dir + "/size");
    int level = 0;
    std::string size;
    if (!(level_file >> level) || !(size_file >> size) || level < 3) continue;
    char* end = nullptr;
    std::size_t bytes = std::strtoull(size.c_str(), &end, 10);
    if (end != nullptr && (*end == 'K' || *end == 'k')) bytes <<= 10;
    if (end != nullptr && (*end == 'M' || *end == 'm')) bytes <<= 20;
    if (bytes > best) best = bytes;
  }
  return best;
}

std::size_t llc_bytes() {
  std::size_t bytes = sysfs_llc_bytes();
#if defined(__linux__) && defined(_SC_LEVEL3_CACHE_SIZE)
  if (bytes == 0) {
    const long l3 = sysconf(_SC_LEVEL3_CACHE_SIZE);
    if (l3 > 0) bytes = static_cast<std::size_t>(l3);
  }
#endif
  return bytes != 0 ? bytes : std::size_t{32} << 20;
}

}  // namespace

std::size_t stream_output_bytes() {
  // Read at every call (tests change it); a value that is not a whole number is ignored.
  const char* env = std::getenv("SYNCBN_CPU_STREAM_BYTES");
  if (env != nullptr && *env >= '0' && *env <= '9') {
    char* end = nullptr;
    const unsigned long long n = std::strtoull(env, &end, 10);
    if (end != nullptr && *end == '\0') return static_cast<std::size_t>(n);
  }
  static const std::size_t bytes = llc_bytes();
  return bytes;
}

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
