// Output memory of the CPU kernels. A freshly allocated output (torch.empty_like of a large
// tensor: glibc maps it anew every time) is first written by the elementwise pass, and on Linux
// every 4 KiB page of it then faults and is zeroed one at a time: for a 100 MB output that costs
// more than the pass itself. Advising the range as transparent huge pages first (madvise
// MADV_HUGEPAGE, honoured where THP is "always" or "madvise") makes it 512 times fewer faults.
#ifndef SYNCBN_CPU_MEMORY_HPP
#define SYNCBN_CPU_MEMORY_HPP

#include <cstddef>

#include "core/geometry.hpp"

namespace syncbn::cpu {

// Outputs smaller than this are left alone (the hint costs a system call).
constexpr std::size_t kHugePageOutputBytes = std::size_t{4} << 20;

// Called before a kernel writes bytes at data: advises the 2 MiB-aligned part of the range as
// huge pages. A hint, never an error; a no-op off Linux, below kHugePageOutputBytes, and with
// SYNCBN_CPU_HUGEPAGES=0 in the environment.
void prepare_output(void* data, std::size_t bytes);

// Outputs at least this many bytes are written with non-temporal (streaming) stores by the
// elementwise passes: past the last-level cache, an ordinary store first reads the line it
// writes, a third of a pass's traffic, and the output would not stay in the cache anyway.
// The size of the last-level cache (sysfs, else sysconf, else 32 MiB), or
// SYNCBN_CPU_STREAM_BYTES from the environment, a whole number of bytes (0: always; a huge
// value: never; anything else is ignored).
std::size_t stream_output_bytes();

// Bytes of a dense tensor of T with geometry g.
template <class T>
std::size_t tensor_bytes(const core::Geometry& g) {
  return static_cast<std::size_t>(g.outer) * static_cast<std::size_t>(g.channels) *
         static_cast<std::size_t>(g.inner) * sizeof(T);
}

}  // namespace syncbn::cpu

#endif  // SYNCBN_CPU_MEMORY_HPP
