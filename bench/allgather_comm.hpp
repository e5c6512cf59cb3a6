// The allgather exchange of PyTorch's SyncBatchNorm and Apex, as a baseline strategy for the
// benches, and a syncbn communicator that uses it.
//
//   AllgatherExchange  MPI_Allgather of every rank's count doubles (P x count received), then on
//                      every rank the sum of the P contributions in rank order (the combine), so
//                      that every rank holds the same sums: what an MPI_Allreduce(SUM) returns,
//                      at O(P count) traffic and work per rank instead of O(count).
//                      bench/exchange_bench times it against MPI_Allreduce.
//   ExchangeComm       a custom communicator (syncbn_comm_create_custom) over a duplicate of an
//                      MPI communicator. Its allreduce callback is, per call, either the
//                      allgather exchange or a plain blocking MPI_Allreduce(SUM, in place): the
//                      bench sets which before each syncbn call (set_allgather), so that e.g.
//                      only a forward's exchange is an allgather, as in PyTorch and Apex, whose
//                      backward is an allreduce. Optionally it logs when each call entered and
//                      left the exchange (steady clock, seconds). syncbn_bench's allgather
//                      mode and its logged view of the sync exchange run on it.
// The callback has no deadline (it blocks in MPI, as an MPI communicator with
// syncbn_comm_set_timeout 0 does). Host buffers only (CPU plans).
#ifndef SYNCBN_BENCH_ALLGATHER_COMM_HPP
#define SYNCBN_BENCH_ALLGATHER_COMM_HPP

#include <mpi.h>

#include <cstddef>
#include <memory>
#include <vector>

#include "syncbn/syncbn.hpp"

namespace bench {

class AllgatherExchange {
 public:
  explicit AllgatherExchange(MPI_Comm comm);
  // out[i] = sum over ranks r = 0, 1, ... of rank r's mine[i], i < count. out may be mine.
  // combine_seconds, if not null, receives the time of the sum alone. Returns an MPI error code.
  // Collective over comm.
  int exchange(const double* mine, double* out, int count, double* combine_seconds = nullptr);
  int size() const { return size_; }

 private:
  MPI_Comm comm_;
  int size_ = 1;
  std::vector<double> gathered_;  // P x count, reused across calls
};

// The enter and leave times (steady clock, seconds) of each exchange a communicator made.
struct ExchangeLog {
  std::vector<double> enter, leave;
};

class ExchangeComm {
 public:
  // Collective over world (MPI_Comm_dup).
  explicit ExchangeComm(MPI_Comm world);
  ~ExchangeComm();
  ExchangeComm(const ExchangeComm&) = delete;
  ExchangeComm& operator=(const ExchangeComm&) = delete;

  // The syncbn communicator. This object must outlive it and every plan made on it.
  const syncbn::Communicator& communicator() const { return comm_; }
  // The following exchanges: the allgather exchange (true) or MPI_Allreduce (false, initially).
  void set_allgather(bool on) { allgather_ = on; }
  // Log the following exchanges into log (nullptr: stop logging).
  void set_log(ExchangeLog* log) { log_ = log; }
  // Exchanges made as allgathers so far.
  long allgather_calls() const { return allgather_calls_; }

 private:
  static int allreduce(double* buffer, std::size_t count, syncbn_device_t device, void* stream,
                       void* self);

  MPI_Comm mpi_ = MPI_COMM_NULL;
  std::unique_ptr<AllgatherExchange> gather_;
  bool allgather_ = false;
  ExchangeLog* log_ = nullptr;
  long allgather_calls_ = 0;
  syncbn::Communicator comm_;
};

}  // namespace bench

#endif  // SYNCBN_BENCH_ALLGATHER_COMM_HPP
