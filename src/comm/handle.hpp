// The C API's communicator handle (syncbn_comm_t): a reference to a backend. Here rather than in
// core/c_api.cpp so that backends which receive handles from their caller (the custom
// communicator's split function) can take them over.
#ifndef SYNCBN_COMM_HANDLE_HPP
#define SYNCBN_COMM_HANDLE_HPP

#include <memory>

#include "comm/communicator.hpp"

struct syncbn_comm_s {
  std::shared_ptr<syncbn::comm::Communicator> impl;
};

#endif  // SYNCBN_COMM_HANDLE_HPP
