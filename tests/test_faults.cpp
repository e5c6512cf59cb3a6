// Fault injection under mpirun: one rank misbehaves, and every other rank must get
// SYNCBN_ERROR_TIMEOUT within the deadline plus 2 s with its state untouched, then
// SYNCBN_ERROR_COMM_BROKEN at once from every later call, and nobody hangs.
//
//   mpirun -n P test_faults SCENARIO [--timeout SECONDS]   (P >= 2; default deadline 3 s)
//
// Scenarios (the faulty rank is the last one, F = P - 1; the others are "waiting ranks"):
//   leave_early  F leaves the training loop after step 0 (uneven data at the end of an epoch),
//                destroys its plan and communicator and finalizes. Every rank exits 0.
//   stop         F stops itself with SIGSTOP inside step 1, before its forward call; rank 0
//                sends SIGCONT once the waiting ranks have timed out. F's own calls then end
//                (a success matched against its peers' abandoned messages, or a timeout) and
//                nothing crashes. Every rank exits 0.
//   eval         F evaluates (forward_inference with running statistics, no collective) for
//                longer than the deadline while the others train, then exits. Every rank exits 0.
//   kill         F raises SIGKILL inside step 1. The job must end within a few seconds, by
//                Open MPI's abort or syncbn's deadline (mpirun exits non-zero).
//   abort        as leave_early; then every kind of call on the broken communicator fails fast
//                with SYNCBN_ERROR_COMM_BROKEN, and rank 0 calls syncbn_comm_abort, which ends
//                the job (mpirun exits non-zero, every rank killed).
// Exit status 0 when every check on this rank held; 1 otherwise. tests/run_fault.sh checks the
// job's exit status, its wall time and its markers.
#include <mpi.h>
#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "syncbn/syncbn.h"
#include "syncbn/syncbn_mpi.h"

namespace {

int g_rank = 0, g_size = 1, g_failures = 0;

void expect(bool ok, const std::string& what) {
  if (!ok) {
    ++g_failures;
    std::fprintf(stderr, "[rank %d] CHECK FAILED: %s\n", g_rank, what.c_str());
  }
}

double now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

void say(const std::string& text) {
  std::printf("[rank %d] %s\n", g_rank, text.c_str());
  std::fflush(stdout);
}

bool contains(const char* text, const std::string& part) {
  return std::string(text).find(part) != std::string::npos;
}

constexpr int kC = 8;
constexpr char kPlanName[] = "stem.bn1";

// One layer on one rank: its parameters, statistics and a fresh random batch per step.
struct Layer {
  syncbn_comm_t comm = nullptr;
  syncbn_plan_t plan = nullptr;
  std::vector<float> weight, bias, running_mean, running_var, save_mean, save_invstd;
  std::vector<float> dweight, dbias;
  int64_t num_batches_tracked = 0;
  std::mt19937 rng;
  std::int64_t n = 0;
  std::vector<float> x, y, dy, dx;

  Layer(double timeout) : rng(1234u + static_cast<unsigned>(g_rank)) {
    expect(syncbn_comm_create_mpi(MPI_COMM_WORLD, &comm) == SYNCBN_SUCCESS, "syncbn_comm_create_mpi");
    expect(syncbn_comm_set_timeout(comm, timeout) == SYNCBN_SUCCESS, "syncbn_comm_set_timeout");
    syncbn_config_t config;
    syncbn_config_init(&config, kC, SYNCBN_FLOAT32);
    expect(syncbn_plan_create(comm, &config, &plan) == SYNCBN_SUCCESS, "syncbn_plan_create");
    syncbn_plan_set_name(plan, kPlanName);
    std::uniform_real_distribution<float> u(0.5f, 1.5f);
    for (auto* v : {&weight, &bias, &running_mean, &running_var, &save_mean, &save_invstd,
                    &dweight, &dbias}) {
      v->resize(kC);
      for (float& e : *v) e = u(rng);
    }
  }
  ~Layer() { release(); }
  void release() {
    syncbn_plan_destroy(plan);
    syncbn_comm_destroy(comm);
    plan = nullptr;
    comm = nullptr;
  }

  void new_batch() {
    n = 2 + g_rank;  // uneven per-rank batches
    std::normal_distribution<float> g(0.3f, 2.0f);
    x.resize(static_cast<std::size_t>(n * kC * 3));
    dy.resize(x.size());
    for (float& e : x) e = g(rng);
    for (float& e : dy) e = g(rng);
    y.assign(x.size(), -1.0f);
    dx.assign(x.size(), -1.0f);
  }
  syncbn_status_t forward() {
    const std::int64_t shape[3] = {n, kC, 3};
    return syncbn_forward_training(plan, 3, shape, x.data(), weight.data(), bias.data(), y.data(),
                                   save_mean.data(), save_invstd.data(), running_mean.data(),
                                   running_var.data(), &num_batches_tracked, nullptr);
  }
  syncbn_status_t backward() {
    const std::int64_t shape[3] = {n, kC, 3};
    return syncbn_backward(plan, 3, shape, x.data(), dy.data(), weight.data(), save_mean.data(),
                           save_invstd.data(), dx.data(), dweight.data(), dbias.data(), nullptr);
  }
  syncbn_status_t inference() {
    const std::int64_t shape[3] = {n, kC, 3};
    return syncbn_forward_inference(plan, 3, shape, x.data(), weight.data(), bias.data(),
                                    running_mean.data(), running_var.data(), y.data(), nullptr);
  }
  // A successful training step.
  void step(int k) {
    new_batch();
    const syncbn_status_t f = forward();
    expect(f == SYNCBN_SUCCESS, "step " + std::to_string(k) + " forward: " + syncbn_last_error());
    const syncbn_status_t b = backward();
    expect(b == SYNCBN_SUCCESS, "step " + std::to_string(k) + " backward: " + syncbn_last_error());
  }
};

// What a failed call must leave as it was.
struct Snapshot {
  std::vector<float> running_mean, running_var, save_mean, save_invstd, y;
  int64_t num_batches_tracked;
  explicit Snapshot(const Layer& l)
      : running_mean(l.running_mean), running_var(l.running_var), save_mean(l.save_mean),
        save_invstd(l.save_invstd), y(l.y), num_batches_tracked(l.num_batches_tracked) {}
  static bool same(const std::vector<float>& a, const std::vector<float>& b) {
    return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
  }
  bool unchanged(const Layer& l) const {
    return same(running_mean, l.running_mean) && same(running_var, l.running_var) &&
           same(save_mean, l.save_mean) && same(save_invstd, l.save_invstd) && same(y, l.y) &&
           num_batches_tracked == l.num_batches_tracked;
  }
};

// A waiting rank's step 1: the forward times out within the deadline plus 2 s, with a message
// naming the plan, the operation, the call number and the deadline, and nothing written.
void expect_timeout(Layer& layer, double timeout) {
  layer.new_batch();
  const Snapshot before(layer);
  const double t0 = now();
  const syncbn_status_t s = layer.forward();
  const double waited = now() - t0;
  const std::string message = syncbn_last_error();
  say("forward_training returned " + std::string(syncbn_status_string(s)) + " after " +
      std::to_string(waited) + " s: " + message);
  expect(s == SYNCBN_ERROR_TIMEOUT, "status SYNCBN_ERROR_TIMEOUT");
  expect(waited >= timeout - 0.05 && waited <= timeout + 2.0,
         "the timeout arrived after " + std::to_string(waited) + " s, deadline " +
             std::to_string(timeout) + " s");
  expect(contains(message.c_str(), std::string("plan '") + kPlanName + "'"), "message names the plan");
  expect(contains(message.c_str(), "forward_training call #2"), "message names the call");
  expect(contains(message.c_str(), "did not complete within"), "message gives the deadline");
  expect(contains(message.c_str(), "broken"), "message says the communicator is broken");
  expect(before.unchanged(layer), "running statistics, saved statistics and y untouched");
}

// After a timeout: every kind of call fails at once with SYNCBN_ERROR_COMM_BROKEN.
void expect_broken(Layer& layer) {
  const Snapshot before(layer);
  const double t0 = now();
  struct Call {
    const char* name;
    syncbn_status_t status;
  };
  syncbn_plan_t second = nullptr, rejected = nullptr;
  syncbn_comm_t sub = nullptr;
  syncbn_config_t config;
  syncbn_config_init(&config, kC, SYNCBN_FLOAT32);
  const Call calls[] = {
      {"forward_training", layer.forward()},
      {"backward", layer.backward()},
      {"forward_inference", layer.inference()},
      {"plan_reject_call", syncbn_plan_reject_call(layer.plan, SYNCBN_CALL_FORWARD_TRAINING, "x",
                                                   SYNCBN_PROBLEM_DTYPE, nullptr, nullptr)},
      {"plan_create", syncbn_plan_create(layer.comm, &config, &second)},
      {"comm_split", syncbn_comm_split(layer.comm, 1, &sub)},
  };
  const double took = now() - t0;
  for (const Call& c : calls) {
    expect(c.status == SYNCBN_ERROR_COMM_BROKEN,
           std::string(c.name) + " on the broken communicator returned " +
               syncbn_status_string(c.status));
  }
  expect(second == nullptr && sub == nullptr && rejected == nullptr, "nothing created");
  expect(contains(syncbn_last_error(), "broken"), "the message says broken");
  expect(took < 0.5, "broken-communicator calls fail at once (took " + std::to_string(took) + " s)");
  expect(before.unchanged(layer), "nothing written by the failed calls");
  say("after the timeout, " + std::to_string(sizeof calls / sizeof calls[0]) +
      " calls failed fast with SYNCBN_ERROR_COMM_BROKEN in " + std::to_string(took) + " s: " +
      syncbn_last_error());
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  MPI_Comm_rank(MPI_COMM_WORLD, &g_rank);
  MPI_Comm_size(MPI_COMM_WORLD, &g_size);
  const std::string scenario = argc > 1 ? argv[1] : "";
  double timeout = 3.0;
  for (int i = 2; i + 1 < argc; ++i) {
    if (std::strcmp(argv[i], "--timeout") == 0) timeout = std::atof(argv[i + 1]);
  }
  const bool known = scenario == "leave_early" || scenario == "stop" || scenario == "eval" ||
                     scenario == "kill" || scenario == "abort";
  if (!known || g_size < 2) {
    if (g_rank == 0) {
      std::fprintf(stderr, "usage: mpirun -n P (>= 2) %s leave_early|stop|eval|kill|abort "
                           "[--timeout SECONDS]\n", argv[0]);
    }
    MPI_Finalize();
    return 2;
  }
  const int faulty = g_size - 1;
  const bool is_faulty = g_rank == faulty;
  std::vector<int> pids(static_cast<std::size_t>(g_size));
  const int pid = static_cast<int>(getpid());
  // tests/run_fault.sh watches the ranks themselves (the launcher can hang after they ended).
  if (const char* dir = std::getenv("SYNCBN_FAULT_PIDDIR")) {
    const std::string path = std::string(dir) + "/rank." + std::to_string(g_rank);
    if (std::FILE* f = std::fopen(path.c_str(), "w")) {
      std::fprintf(f, "%d\n", pid);
      std::fclose(f);
    }
  }
  MPI_Allgather(&pid, 1, MPI_INT, pids.data(), 1, MPI_INT, MPI_COMM_WORLD);
  // The ranks that wait for the faulty one, among themselves (plain MPI, not syncbn's duplicate).
  MPI_Comm waiting = MPI_COMM_NULL;
  MPI_Comm_split(MPI_COMM_WORLD, is_faulty ? 1 : 0, g_rank, &waiting);

  {
    Layer layer(timeout);
    layer.step(0);  // every rank: one good step (calls #0 and #1)
    if (is_faulty) {
      if (scenario == "leave_early" || scenario == "abort") {
        say("leaving the training loop after step 0");
      } else if (scenario == "eval") {
        say("evaluating while the others train");
        const double t0 = now();
        int calls = 0;
        while (now() - t0 < timeout + 1.5) {
          layer.new_batch();
          expect(layer.inference() == SYNCBN_SUCCESS, std::string("inference: ") + syncbn_last_error());
          ++calls;
          std::this_thread::sleep_for(std::chrono::milliseconds(10));
        }
        say("evaluated " + std::to_string(calls) + " batches, leaving");
      } else if (scenario == "stop") {
        say("stopping inside step 1 (SIGSTOP)");
        raise(SIGSTOP);
        say("continued (SIGCONT)");
        layer.new_batch();
        const syncbn_status_t s = layer.forward();
        say(std::string("forward_training after SIGCONT returned ") + syncbn_status_string(s) +
            (s == SYNCBN_SUCCESS ? "" : std::string(": ") + syncbn_last_error()));
        expect(s == SYNCBN_SUCCESS || s == SYNCBN_ERROR_TIMEOUT, "SUCCESS or TIMEOUT after SIGCONT");
        const syncbn_status_t again = layer.forward();  // the peers are gone from the collective
        say(std::string("the next forward_training returned ") + syncbn_status_string(again));
        expect(again == SYNCBN_ERROR_TIMEOUT || again == SYNCBN_ERROR_COMM_BROKEN,
               "the next call times out (or the communicator is already broken)");
      } else if (scenario == "kill") {
        say("SIGKILL now, inside step 1");
        raise(SIGKILL);
      }
    } else {
      expect_timeout(layer, timeout);
      expect_broken(layer);
      if (scenario == "stop") {
        // Every waiting rank has timed out before the stopped rank runs again: a rank that
        // entered its call later than rank 0 is still within its deadline when rank 0's has
        // passed, and could complete the sum against the continued rank (and succeed).
        MPI_Barrier(waiting);
      }
      if (scenario == "stop" && g_rank == 0) {
        say("sending SIGCONT to rank " + std::to_string(faulty));
        kill(pids[static_cast<std::size_t>(faulty)], SIGCONT);
      }
      if (scenario == "abort" && g_rank == 0) {
        say("calling syncbn_comm_abort");
        syncbn_comm_abort(layer.comm);
        expect(false, "syncbn_comm_abort returned on an MPI communicator");
      }
    }
  }
  say(g_failures == 0 ? "all checks held, exiting" : std::to_string(g_failures) + " checks FAILED");
  MPI_Comm_free(&waiting);
  MPI_Finalize();
  return g_failures == 0 ? 0 : 1;
}
