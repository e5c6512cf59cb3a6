#include "core/shape.hpp"

#include <limits>
#include <string>

namespace syncbn::core {

ArgError map_shape(const TensorShape& shape, std::int64_t num_features, syncbn_layout_t layout,
                   Geometry* g) {
  *g = Geometry{0, num_features, 1};
  ArgError err;
  require(err, shape.ndim >= 2 && shape.ndim <= 5, Arg::ndim, Problem::ndim_range);
  require(err, shape.dims != nullptr, Arg::shape);
  if (err) {
    if (err.arg == Arg::ndim) err.detail = "ndim = " + std::to_string(shape.ndim);
    return err;
  }
  const int channel_dim = layout == SYNCBN_CHANNELS_LAST ? shape.ndim - 1 : 1;
  std::int64_t spatial = 1;
  for (int d = 0; d < shape.ndim; ++d) {
    const std::int64_t n = shape.dims[d];
    if (n < 0) {
      return {Arg::shape, Problem::negative,
              "shape[" + std::to_string(d) + "] = " + std::to_string(n)};
    }
    if (d == channel_dim) {
      if (n != num_features) {
        return {Arg::shape, Problem::channels,
                "shape[" + std::to_string(d) + "] = " + std::to_string(n) +
                    ", num_features = " + std::to_string(num_features)};
      }
    } else if (d != 0) {
      if (n != 0 && spatial > std::numeric_limits<std::int64_t>::max() / n) {
        return {Arg::shape, Problem::overflow, {}};
      }
      spatial *= n;
    }
  }
  const std::int64_t N = shape.dims[0];
  const std::int64_t C = num_features;
  if (spatial != 0 && N > std::numeric_limits<std::int64_t>::max() / C / spatial) {
    return {Arg::shape, Problem::overflow, {}};
  }
  if (layout == SYNCBN_CHANNELS_LAST || shape.ndim == 2) {
    *g = Geometry{N * spatial, C, 1};
  } else {
    *g = Geometry{N, C, spatial};
  }
  return err;
}

}  // namespace syncbn::core
