#include "comm/communicator.hpp"

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <utility>
#include <vector>

#include "core/error.hpp"

namespace syncbn::comm {

double default_timeout_seconds() {
  if (const char* env = std::getenv("SYNCBN_TIMEOUT_S")) {
    char* end = nullptr;
    const double v = std::strtod(env, &end);
    if (end != env && *end == '\0' && std::isfinite(v) && v >= 0.0) return v;
  }
  return kDefaultTimeoutSeconds;
}

double now_seconds() {
  using clock = std::chrono::steady_clock;
  return std::chrono::duration<double>(clock::now().time_since_epoch()).count();
}

void keep_forever(std::shared_ptr<void> memory) {
  static std::mutex mutex;
  static auto* kept = new std::vector<std::shared_ptr<void>>();
  const std::lock_guard<std::mutex> lock(mutex);
  kept->push_back(std::move(memory));
}

std::string format_seconds(double seconds) {
  char text[32];
  std::snprintf(text, sizeof text, "%.3g s", seconds);
  return text;
}

void Communicator::check_usable() const {
  if (broken()) {
    core::fail(SYNCBN_ERROR_COMM_BROKEN,
               "the communicator is broken (" + broken_ +
                   "): every collective on it and its plans fails; destroy them and the "
                   "communicator, or end the job with syncbn_comm_abort");
  }
}

template <class F>
void Communicator::collective(F&& body, bool comm_failure_breaks) {
  check_usable();
  try {
    body();
  } catch (const core::Failure& f) {
    if (f.status() == SYNCBN_ERROR_TIMEOUT ||
        (comm_failure_breaks && f.status() == SYNCBN_ERROR_COMM)) {
      broken_ = std::string(f.status() == SYNCBN_ERROR_TIMEOUT ? "a collective timed out: "
                                                               : "the transport failed: ") +
                f.what();
    }
    throw;
  }
}

void Communicator::allreduce_sum(double* buffer, std::size_t count) {
  collective([&] { allreduce_host(buffer, count, timeout_); });
}

void Communicator::sum_device_memory(double* buffer, std::size_t count, void* stream) {
  collective([&] { allreduce_device(buffer, count, stream, timeout_); });
}

void Communicator::wait_stream(void* stream) {
  collective([&] { wait_device_stream(stream, timeout_); });
}

std::shared_ptr<Communicator> Communicator::split_consecutive(int group_size) {
  std::shared_ptr<Communicator> sub;
  // A split the backend fails on one rank is agreed on by the allreduce after it
  // (core/split.cpp): it does not break the parent, only a timeout does.
  collective([&] { sub = split(group_size, timeout_); }, false);
  sub->set_timeout_seconds(timeout_.seconds);  // subgroups inherit the deadline
  return sub;
}

void Communicator::abort() {
  if (!broken()) broken_ = "syncbn_comm_abort was called";
  abort_backend();
}

void Communicator::allreduce_device(double*, std::size_t, void*, Deadline) {
  core::fail(SYNCBN_ERROR_INTERNAL, "this communicator cannot sum device buffers");
}

void Communicator::wait_device_stream(void*, Deadline) {
  core::fail(SYNCBN_ERROR_INTERNAL, "this communicator does not wait on streams");
}

namespace {

class SelfCommunicator final : public Communicator {
 public:
  int rank() const override { return 0; }
  int size() const override { return 1; }
  DeviceBuffers device_buffers() const override { return DeviceBuffers::identity; }

 protected:
  void allreduce_host(double*, std::size_t, Deadline) override {}
  std::shared_ptr<Communicator> split(int, Deadline) override {
    return std::make_shared<SelfCommunicator>();
  }
};

}  // namespace

std::shared_ptr<Communicator> make_self_communicator() {
  return std::make_shared<SelfCommunicator>();
}

}  // namespace syncbn::comm
