// tests/mpi_helpers.hpp: what the MPI tests share besides the reference: the world's rank and
// size, an MPI communicator of the tests' own over a consecutive group of ranks (for checks,
// separate from the library's duplicated one), cross-rank comparisons, custom communicators over
// MPI, and MpiRanks, the Ranks policy of the scenario runner (scenarios.hpp).
//
// Rule for every MPI test: the sequence of collective calls (library or MPI) must not depend on
// any check's outcome, so checks between collectives use EXPECT_*, never ASSERT_*, and library
// calls use the C API (the C++ API throws, which would leave a rank's peers waiting).
#ifndef SYNCBN_TESTS_MPI_HELPERS_HPP
#define SYNCBN_TESTS_MPI_HELPERS_HPP

#include <gtest/gtest.h>
#include <mpi.h>

#include <cstring>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "reference.hpp"
#include "syncbn/syncbn.h"
#include "syncbn/syncbn_mpi.h"

namespace syncbn_test {

inline int world_rank() {
  int r = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &r);
  return r;
}
inline int world_size() {
  int s = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &s);
  return s;
}
inline std::string rank_tag() { return "rank " + std::to_string(world_rank()); }

// The consecutive group of group_size world ranks that holds this rank, as an MPI communicator
// of the tests' own (ranks [g k, (g + 1) k), like syncbn_comm_split).
class TestGroup {
 public:
  explicit TestGroup(int group_size) : size_(group_size) {
    const int r = world_rank();
    first_ = r / group_size * group_size;
    MPI_Comm_split(MPI_COMM_WORLD, r / group_size, r, &comm_);
  }
  ~TestGroup() { MPI_Comm_free(&comm_); }
  TestGroup(const TestGroup&) = delete;
  TestGroup& operator=(const TestGroup&) = delete;

  MPI_Comm comm() const { return comm_; }
  int size() const { return size_; }
  int first_world_rank() const { return first_; }  // world rank of the group's rank 0

 private:
  MPI_Comm comm_ = MPI_COMM_NULL;
  int size_ = 1, first_ = 0;
};

// COLLECTIVE over comm: v equals, byte for byte, the copy of comm's rank 0.
template <class T>
::testing::AssertionResult same_as_rank0(const std::string& what, const std::vector<T>& v,
                                         MPI_Comm comm) {
  std::vector<T> root = v;
  const int bytes = static_cast<int>(v.size() * sizeof(T));
  MPI_Bcast(root.data(), bytes, MPI_BYTE, 0, comm);
  if (bytes == 0 || std::memcmp(root.data(), v.data(), static_cast<size_t>(bytes)) == 0)
    return ::testing::AssertionSuccess();
  size_t i = 0;
  while (std::memcmp(&root[i], &v[i], sizeof(T)) == 0) ++i;
  std::ostringstream os;
  os.precision(17);
  os << what << " differs bitwise from the group's first rank, first at [" << i << "]: " << v[i]
     << " here vs " << root[i];
  return ::testing::AssertionFailure() << os.str();
}

// COLLECTIVE over comm: the elementwise sum over ranks, in double.
template <class T>
std::vector<double> sum_over_ranks(const std::vector<T>& v, MPI_Comm comm) {
  std::vector<double> d(v.begin(), v.end());
  MPI_Allreduce(MPI_IN_PLACE, d.data(), static_cast<int>(d.size()), MPI_DOUBLE, MPI_SUM, comm);
  return d;
}

// ---- a custom communicator over MPI (syncbn_comm_create_custom) ------------------------------

// The caller's side of a custom communicator: an MPI communicator of its own (a duplicate, freed
// on release), MPI_Allreduce as the allreduce, MPI_Comm_split as the split.
struct MpiCallbacks {
  MPI_Comm comm = MPI_COMM_NULL;

  static int allreduce(double* buffer, size_t count, syncbn_device_t device, void*, void* self) {
    if (device != SYNCBN_DEVICE_CPU) return 2;  // these tests run CPU plans only
    return MPI_Allreduce(MPI_IN_PLACE, buffer, static_cast<int>(count), MPI_DOUBLE, MPI_SUM,
                         static_cast<MpiCallbacks*>(self)->comm);
  }
  static int split(int group_size, void* self, syncbn_comm_t* sub) {
    MPI_Comm parent = static_cast<MpiCallbacks*>(self)->comm;
    int rank = 0;
    MPI_Comm_rank(parent, &rank);
    MPI_Comm group = MPI_COMM_NULL;
    if (const int e = MPI_Comm_split(parent, rank / group_size, rank, &group)) return e;
    return create(group, sub) == SYNCBN_SUCCESS ? 0 : 3;
  }
  static void release(void* self) {
    auto* cb = static_cast<MpiCallbacks*>(self);
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (!finalized) MPI_Comm_free(&cb->comm);
    delete cb;
  }
  // Takes ownership of comm.
  static syncbn_status_t create(MPI_Comm comm, syncbn_comm_t* out) {
    auto* cb = new MpiCallbacks{comm};
    int rank = 0, size = 0;
    MPI_Comm_rank(comm, &rank);
    MPI_Comm_size(comm, &size);
    const syncbn_status_t s =
        syncbn_comm_create_custom(rank, size, &allreduce, &split, &release, cb, out);
    if (s != SYNCBN_SUCCESS) release(cb);
    return s;
  }
};

// How a test reaches MPI: syncbn's MPI communicator, or a custom one whose callbacks call MPI.
enum class CommKind { mpi, custom };
inline const char* comm_kind_name(CommKind k) { return k == CommKind::mpi ? "mpi" : "custom"; }

// COLLECTIVE: a library communicator over MPI_COMM_WORLD (null, with a failed expectation, if
// the library refuses).
inline CommHandle world_comm(CommKind kind = CommKind::mpi) {
  syncbn_comm_t c = nullptr;
  syncbn_status_t s = SYNCBN_SUCCESS;
  if (kind == CommKind::mpi) {
    s = syncbn_comm_create_mpi(MPI_COMM_WORLD, &c);
  } else {
    MPI_Comm dup = MPI_COMM_NULL;
    MPI_Comm_dup(MPI_COMM_WORLD, &dup);
    s = MpiCallbacks::create(dup, &c);
  }
  EXPECT_EQ(s, SYNCBN_SUCCESS) << rank_tag() << ": " << comm_kind_name(kind)
                               << " communicator: " << syncbn_last_error();
  return CommHandle(s == SYNCBN_SUCCESS ? c : nullptr);
}

// The message of the last error, checked to name the given words.
inline ::testing::AssertionResult message_names(const std::vector<std::string>& words) {
  return last_error_names(rank_tag(), words);
}

// ---- the Ranks policy of the scenario runner (scenarios.hpp) ---------------------------------

// MPI processes as the ranks: the world's rank and size, and the tests' own MPI communicator over
// a consecutive group (TestGroup) for the cross-rank checks.
struct MpiRanks {
  int rank() const { return world_rank(); }
  int size() const { return world_size(); }
  std::string tag() const { return rank_tag(); }
  // One process, one rank: what make() returns is this rank's alone.
  template <class D, class Make>
  std::shared_ptr<D> share(Make&& make) const {
    return make();
  }

  // COLLECTIVE (construction and every check): the consecutive group of k world ranks holding
  // this rank.
  class Group {
   public:
    Group(const MpiRanks&, int k) : group_(k) {}
    int first() const { return group_.first_world_rank(); }
    template <class T>
    ::testing::AssertionResult same_as_rank0(const std::string& what,
                                             const std::vector<T>& v) const {
      return syncbn_test::same_as_rank0(what, v, group_.comm());
    }
    template <class T>
    std::vector<double> sum(const std::vector<T>& v) const {
      return sum_over_ranks(v, group_.comm());
    }

   private:
    TestGroup group_;
  };
};

}  // namespace syncbn_test

#endif  // SYNCBN_TESTS_MPI_HELPERS_HPP
