// How every backend sees a tensor: (outer, C, inner) with C the channel dimension.
//   channels-first (N, C, *spatial): outer = N, inner = prod(spatial)
//   channels-last  (N, *spatial, C): outer = N * prod(spatial), inner = 1
// (channels-first with no spatial dims is the same memory as channels-last and uses the
// channels-last kernels). Element (o, c, i) is at ((o * C) + c) * inner + i.
#ifndef SYNCBN_CORE_GEOMETRY_HPP
#define SYNCBN_CORE_GEOMETRY_HPP

#include <cstdint>

namespace syncbn::core {

struct Geometry {
  std::int64_t outer = 0;
  std::int64_t channels = 0;
  std::int64_t inner = 1;
  std::int64_t count_per_channel() const { return outer * inner; }
};

}  // namespace syncbn::core

#endif  // SYNCBN_CORE_GEOMETRY_HPP
