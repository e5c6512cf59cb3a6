// src/core/shape.cpp in one process: every layout, rank 2 to 5 and extent (0 included) maps onto
// (outer, C, inner) as the layouts define it, and every malformed shape is refused with the
// argument and problem the C API reports.
#include <gtest/gtest.h>

#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "core/shape.hpp"

namespace {

using syncbn::core::Arg;
using syncbn::core::ArgError;
using syncbn::core::Geometry;
using syncbn::core::map_shape;
using syncbn::core::Problem;
using syncbn::core::TensorShape;

ArgError mapped(const std::vector<std::int64_t>& dims, std::int64_t C, syncbn_layout_t layout,
                Geometry* g) {
  return map_shape(TensorShape{static_cast<int>(dims.size()), dims.data()}, C, layout, g);
}

std::string text(const std::vector<std::int64_t>& dims) {
  std::string s;
  for (std::int64_t d : dims) s += (s.empty() ? "" : "x") + std::to_string(d);
  return s;
}

TEST(Shape, EveryLayoutRankAndExtent) {
  const std::vector<std::int64_t> extents = {0, 1, 2, 3, 7};
  for (const std::int64_t C : {1, 3, 64}) {
    for (int spatial_rank = 0; spatial_rank <= 3; ++spatial_rank) {
      // Every combination of N and spatial extents from `extents`.
      const int dims_varied = 1 + spatial_rank;
      int combos = 1;
      for (int i = 0; i < dims_varied; ++i) combos *= static_cast<int>(extents.size());
      for (int k = 0; k < combos; ++k) {
        std::vector<std::int64_t> v;
        for (int i = 0, r = k; i < dims_varied; ++i, r /= static_cast<int>(extents.size())) {
          v.push_back(extents[static_cast<std::size_t>(r) % extents.size()]);
        }
        const std::int64_t N = v[0];
        std::int64_t spatial = 1;
        for (int i = 1; i < dims_varied; ++i) spatial *= v[static_cast<std::size_t>(i)];
        for (const syncbn_layout_t layout : {SYNCBN_CHANNELS_FIRST, SYNCBN_CHANNELS_LAST}) {
          std::vector<std::int64_t> dims;
          if (layout == SYNCBN_CHANNELS_FIRST) {
            dims = {N, C};
            dims.insert(dims.end(), v.begin() + 1, v.end());
          } else {
            dims = v;
            dims.push_back(C);
          }
          SCOPED_TRACE(text(dims) + (layout == SYNCBN_CHANNELS_LAST ? " channels-last"
                                                                     : " channels-first"));
          Geometry g;
          const ArgError err = mapped(dims, C, layout, &g);
          ASSERT_FALSE(err) << err.detail;
          EXPECT_EQ(g.channels, C);
          EXPECT_EQ(g.count_per_channel(), N * spatial);
          if (layout == SYNCBN_CHANNELS_FIRST && spatial_rank > 0) {
            EXPECT_EQ(g.outer, N);
            EXPECT_EQ(g.inner, spatial);
          } else {  // channels-last, or (N, C): rows of C contiguous channels
            EXPECT_EQ(g.outer, N * spatial);
            EXPECT_EQ(g.inner, 1);
          }
          // The element count of the view is the tensor's.
          EXPECT_EQ(g.outer * g.channels * g.inner, N * C * spatial);
        }
      }
    }
  }
}

struct Refused {
  std::vector<std::int64_t> dims;
  syncbn_layout_t layout;
  Arg arg;
  Problem problem;
  const char* detail;  // a part of the detail, or "" for none
};

TEST(Shape, MalformedShapesAreRefused) {
  constexpr std::int64_t kMax = std::numeric_limits<std::int64_t>::max();
  const std::int64_t C = 3;
  const std::vector<Refused> cases = {
      {{3}, SYNCBN_CHANNELS_FIRST, Arg::ndim, Problem::ndim_range, "ndim = 1"},
      {{1, 3, 1, 1, 1, 1}, SYNCBN_CHANNELS_FIRST, Arg::ndim, Problem::ndim_range, "ndim = 6"},
      {{2, 4, 5}, SYNCBN_CHANNELS_FIRST, Arg::shape, Problem::channels, "shape[1] = 4"},
      {{2, 5, 4}, SYNCBN_CHANNELS_LAST, Arg::shape, Problem::channels, "shape[2] = 4"},
      {{2, 3, 5}, SYNCBN_CHANNELS_LAST, Arg::shape, Problem::channels, "num_features = 3"},
      {{-1, 3}, SYNCBN_CHANNELS_FIRST, Arg::shape, Problem::negative, "shape[0] = -1"},
      {{2, 3, 4, -5}, SYNCBN_CHANNELS_FIRST, Arg::shape, Problem::negative, "shape[3] = -5"},
      {{2, -5, 3}, SYNCBN_CHANNELS_LAST, Arg::shape, Problem::negative, "shape[1] = -5"},
      {{1, 3, kMax / 2, 3}, SYNCBN_CHANNELS_FIRST, Arg::shape, Problem::overflow, ""},
      {{kMax / 2, 3, 2}, SYNCBN_CHANNELS_FIRST, Arg::shape, Problem::overflow, ""},
      {{kMax / 4, 2, 3}, SYNCBN_CHANNELS_LAST, Arg::shape, Problem::overflow, ""},
  };
  for (const Refused& r : cases) {
    SCOPED_TRACE(text(r.dims));
    Geometry g{5, 5, 5};
    const ArgError err = mapped(r.dims, C, r.layout, &g);
    EXPECT_TRUE(err);
    EXPECT_EQ(err.arg, r.arg);
    EXPECT_EQ(err.problem, r.problem);
    EXPECT_NE(err.detail.find(r.detail), std::string::npos) << err.detail;
    EXPECT_EQ(g.count_per_channel(), 0) << "a refused shape maps onto nothing";
    EXPECT_EQ(g.channels, C);
  }
  Geometry g;
  const ArgError null_dims = map_shape(TensorShape{4, nullptr}, C, SYNCBN_CHANNELS_FIRST, &g);
  EXPECT_EQ(null_dims.arg, Arg::shape);
  // Large but representable: no overflow reported.
  EXPECT_FALSE(mapped({kMax / 3 / 8, 3, 8}, C, SYNCBN_CHANNELS_FIRST, &g));
  EXPECT_EQ(g.count_per_channel(), kMax / 3 / 8 * 8);
}

}  // namespace
