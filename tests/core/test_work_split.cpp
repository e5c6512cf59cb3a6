// src/cpu/work_split.hpp in one process: the static shares of n items over nt threads cover each
// item once, in order, and differ by at most one; a layout's work items cover every element of
// the tensor exactly once, each with its own channel, for 1 to 64 threads.
#include <gtest/gtest.h>

#include <cstdint>
#include <string>
#include <vector>

#include "cpu/work_split.hpp"

namespace {

namespace ws = syncbn::cpu::SYNCBN_CPU_ISA;
using syncbn::core::Geometry;

TEST(WorkSplit, SharesCoverEveryItemOnceAndBalance) {
  for (const std::int64_t n : {0, 1, 2, 3, 7, 31, 64, 97, 1000, 65537}) {
    for (int nt = 1; nt <= 64; ++nt) {
      SCOPED_TRACE("n = " + std::to_string(n) + ", threads = " + std::to_string(nt));
      std::int64_t expected_lo = 0, smallest = n, largest = 0;
      for (int t = 0; t < nt; ++t) {
        std::int64_t lo = -1, hi = -1;
        ws::share(n, t, nt, lo, hi);
        ASSERT_EQ(lo, expected_lo) << "thread " << t << " does not start where the last ended";
        ASSERT_LE(lo, hi);
        expected_lo = hi;
        smallest = std::min(smallest, hi - lo);
        largest = std::max(largest, hi - lo);
      }
      EXPECT_EQ(expected_lo, n) << "the shares do not end at n";
      EXPECT_LE(largest - smallest, 1);
    }
  }
}

// Every element of g visited by the threads' items, and the channel each item reports.
void check_cover(const Geometry& g, int nt) {
  const std::int64_t numel = g.outer * g.channels * g.inner;
  std::vector<int> seen(static_cast<std::size_t>(numel), 0);
  for (int t = 0; t < nt; ++t) {
    ws::for_share(g, t, nt, [&](std::int64_t begin, std::int64_t end, std::int64_t c) {
      ASSERT_LE(0, begin);
      ASSERT_LT(begin, end);
      ASSERT_LE(end, numel);
      if (g.inner == 1) {  // whole rows of C channels
        EXPECT_EQ(c, -1);
        EXPECT_EQ(begin % g.channels, 0);
        EXPECT_EQ(end % g.channels, 0);
      } else {  // a piece of one (n, c) row
        EXPECT_EQ(begin / g.inner, (end - 1) / g.inner) << "an item crosses rows";
        EXPECT_EQ(c, begin / g.inner % g.channels);
        EXPECT_LE(end - begin, ws::kChunk);
      }
      for (std::int64_t i = begin; i < end; ++i) ++seen[static_cast<std::size_t>(i)];
    });
  }
  for (std::int64_t i = 0; i < numel; ++i) {
    ASSERT_EQ(seen[static_cast<std::size_t>(i)], 1) << "element " << i;
  }
}

TEST(WorkSplit, LayoutItemsCoverEveryElementOnce) {
  const std::vector<Geometry> shapes = {
      {0, 3, 1},     {0, 3, 49},     {1, 1, 1},       {5, 3, 1},
      {2, 3, 49},    {3, 7, 196},    {1, 2, 40000},   {2, 5, 2 * ws::kChunk + 1},
      {4, 64, 1},    {1, 1, ws::kChunk}, {13, 1, 17}, {2, 3, ws::kChunk - 1}};
  for (const Geometry& g : shapes) {
    for (const int nt : {1, 2, 3, 7, 16, 64}) {
      SCOPED_TRACE("outer " + std::to_string(g.outer) + ", C " + std::to_string(g.channels) +
                   ", inner " + std::to_string(g.inner) + ", threads " + std::to_string(nt));
      check_cover(g, nt);
      if (::testing::Test::HasFatalFailure()) return;
    }
  }
}

}  // namespace
