// src/core: plans, packing and guard logic, the per-channel math shared by every backend, and
// the C API entry points. This part owns validation and error reporting; it never touches data
// elementwise (src/cpu does) and never talks to MPI directly (src/comm does).
//
// error.hpp: the internal error type and the per-thread last-error message of the C API.
#ifndef SYNCBN_CORE_ERROR_HPP
#define SYNCBN_CORE_ERROR_HPP

#include <stdexcept>
#include <string>

#include "syncbn/syncbn.h"

namespace syncbn::core {

// Thrown inside the library; every C entry point catches it and returns its status.
class Failure : public std::runtime_error {
 public:
  Failure(syncbn_status_t status, const std::string& message)
      : std::runtime_error(message), status_(status) {}
  syncbn_status_t status() const noexcept { return status_; }

 private:
  syncbn_status_t status_;
};

[[noreturn]] inline void fail(syncbn_status_t status, const std::string& message) {
  throw Failure(status, message);
}

// Runs body; a Failure it throws is thrown again with "<context>: " before its message.
template <class F>
void with_context(const std::string& context, F&& body) {
  try {
    body();
  } catch (const Failure& f) {
    fail(f.status(), context + ": " + f.what());
  }
}

// The C API's last-error message for this thread.
void set_last_error(const std::string& message);
void clear_last_error();
const char* last_error();

}  // namespace syncbn::core

#endif  // SYNCBN_CORE_ERROR_HPP
