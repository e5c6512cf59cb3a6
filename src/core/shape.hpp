// A call's tensor shape as the C API received it, and its mapping onto the (outer, C, inner)
// view every backend works on (core/geometry.hpp), with the checks that mapping needs.
#ifndef SYNCBN_CORE_SHAPE_HPP
#define SYNCBN_CORE_SHAPE_HPP

#include <cstdint>

#include "core/geometry.hpp"
#include "core/guard.hpp"
#include "syncbn/syncbn.h"

namespace syncbn::core {

struct TensorShape {
  int ndim = 0;
  const std::int64_t* dims = nullptr;
};

// The geometry of a tensor of the given shape for a plan of num_features channels in layout:
//   channels-first (N, C, *spatial): outer = N, inner = prod(spatial);
//   channels-last  (N, *spatial, C): outer = N * prod(spatial), inner = 1;
//   2-D (N, C) in either layout: outer = N, inner = 1.
// Returns this rank's error, g = {0, num_features, 1} then: ndim outside 2..5 (Arg::ndim), dims
// NULL (Arg::shape), a negative extent, a channel extent other than num_features, or an element
// count that overflows int64 (Arg::shape, the detail naming the dimension where there is one).
ArgError map_shape(const TensorShape& shape, std::int64_t num_features, syncbn_layout_t layout,
                   Geometry* g);

}  // namespace syncbn::core

#endif  // SYNCBN_CORE_SHAPE_HPP
