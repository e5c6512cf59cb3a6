// libFuzzer target over the C API (include/syncbn/syncbn.h) in one process: the self
// communicator, and custom communicators (syncbn_comm_create_custom) whose allreduce stands for
// a group of identical ranks, fails, reports a timeout or corrupts the sums, as the input says.
// Built with SYNCBN_FUZZ=ON (cmake/Sanitize.cmake), run by tests/run_fuzz.sh.
//
// The input is a program: a sequence of operations, each an opcode byte and its operands, read
// from the front (a byte past the end reads as 0, so every input is a valid program). The
// encoding is spelled out next to each operation below and mirrored by tests/fuzz/make_corpus.py,
// which writes the seed corpus: change both together.
//
// Invariants (violation: __builtin_trap(), which libFuzzer reports as a crash, with the input):
//   - every status is one of the syncbn_status_t values of the header, and
//     syncbn_status_string() names it;
//   - after every failure syncbn_last_error() is non-NULL and non-empty;
//   - a failed syncbn_forward_training leaves y, save_mean, save_invstd, running_mean,
//     running_var and num_batches_tracked bitwise as they were; a failed syncbn_backward leaves
//     dx, dweight and dbias so;
//   - inputs are never written (x, weight, bias, dy, save_* of backward, running_* of inference),
//     unless the call was given the same buffer as an output (y = x, dx = dy, in place);
//   - a successful training call with track_running_stats adds one to num_batches_tracked;
//     without it, running statistics and num_batches_tracked are left alone;
//   - documented statuses where the header fixes them: NULL handles and out pointers are
//     SYNCBN_ERROR_INVALID_ARGUMENT, syncbn_plan_reject_call never succeeds, a CPU plan's
//     syncbn_plan_get_async_error reports SYNCBN_SUCCESS, calls on plans of a broken
//     communicator return SYNCBN_ERROR_COMM_BROKEN, syncbn_comm_set_timeout /
//     syncbn_comm_get_timeout round-trip, syncbn_plan_get_config returns what was created;
//   - the custom communicator's allreduce is called with host memory, a NULL stream and a count
//     of at least the guard slots, and its release callback exactly once per successfully
//     created communicator (by the end of the input, when every handle has been destroyed),
//     never for one whose creation failed.
// ASan, UBSan and LSan check everything else (bounds, use after free, leaks, overflow).
//
// Buffers are sized exactly from the call's shape when it is a valid small shape (at most
// kMaxElements elements), so that ASan sees any access beyond them; any other shape gets NULL
// data pointers, which the library must reject before touching them.
//
// Plans of more than kMaxFeatures channels that are still valid (up to (INT_MAX - 64) / 2) are not
// made: their scratch is gigabytes, which libFuzzer's malloc limit reports as out-of-memory.
// num_features values above the library's limit, zero and negative ones are made.
#include <algorithm>
#include <cfloat>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "syncbn/syncbn.h"

extern "C" {  // enum_calls.c
int fuzz_config_init(syncbn_config_t* config, int64_t num_features, int dtype);
int fuzz_plan_reject_call(syncbn_plan_t plan, int call, const char* argument, int problem,
                          const char* detail, void* stream);
}

namespace {

// ---- invariants ----------------------------------------------------------------------------

#define FUZZ_CHECK(cond)                                                                   \
  do {                                                                                     \
    if (!(cond)) {                                                                         \
      std::fprintf(stderr, "fuzz_c_api: invariant violated at %s:%d: %s (last error: %s)\n", \
                   __FILE__, __LINE__, #cond, last_error_text());                          \
      __builtin_trap();                                                                    \
    }                                                                                      \
  } while (0)

const char* last_error_text() {
  const char* e = syncbn_last_error();
  return e != nullptr ? e : "(null)";
}

// The statuses syncbn.h documents. The header's enum ends at SYNCBN_ERROR_COMM_BROKEN = 10 (with
// SYNCBN_ERROR_TIMEOUT = 9); a code appended there must be appended here too.
bool documented_status(int s) {
  switch (s) {
    case SYNCBN_SUCCESS:
    case SYNCBN_ERROR_INVALID_ARGUMENT:
    case SYNCBN_ERROR_CONFIG_MISMATCH:
    case SYNCBN_ERROR_CALL_MISMATCH:
    case SYNCBN_ERROR_BATCH_TOO_SMALL:
    case SYNCBN_ERROR_NOT_SUPPORTED:
    case SYNCBN_ERROR_COMM:
    case SYNCBN_ERROR_OUT_OF_MEMORY:
    case SYNCBN_ERROR_INTERNAL:
    case SYNCBN_ERROR_TIMEOUT:
    case SYNCBN_ERROR_COMM_BROKEN:
      return true;
    default:
      return false;
  }
}

// A plain loop, not strcmp: libFuzzer would take the strings compared for its dictionary.
bool starts_with(const char* text, const char* prefix) {
  for (; *prefix != '\0'; ++text, ++prefix) {
    if (*text != *prefix) return false;
  }
  return true;
}

// SYNCBN_FUZZ_TRACE=1 in the environment: each operation and each status on stderr (to read
// what a seed or a crash input does).
bool trace() {
  static const bool on = std::getenv("SYNCBN_FUZZ_TRACE") != nullptr;
  return on;
}

// Every status a call returns goes through here (as an int: no enum load of an unknown value).
syncbn_status_t checked(int s) {
  if (trace()) std::fprintf(stderr, "  -> %d %s\n", s, s != 0 ? last_error_text() : "");
  FUZZ_CHECK(documented_status(s));
  const auto status = static_cast<syncbn_status_t>(s);
  const char* name = syncbn_status_string(status);
  FUZZ_CHECK(name != nullptr && starts_with(name, "SYNCBN_"));
  FUZZ_CHECK(!starts_with(name, "SYNCBN_ERROR_UNKNOWN"));
  if (status != SYNCBN_SUCCESS) {
    const char* message = syncbn_last_error();
    FUZZ_CHECK(message != nullptr);
    FUZZ_CHECK(message[0] != '\0');
  }
  return status;
}

// Enumerations get arbitrary int values (the header documents the rejection of unknown ones):
// written into the config's fields through memcpy, and passed by value through the C functions
// of enum_calls.c, so that this harness never makes or loads an enum object holding a value
// outside its enumerators (undefined in C++; the library, which reads them, is checked by UBSan).
static_assert(sizeof(syncbn_dtype_t) == sizeof(int) && sizeof(syncbn_layout_t) == sizeof(int) &&
                  sizeof(syncbn_device_t) == sizeof(int) && sizeof(syncbn_call_t) == sizeof(int) &&
                  sizeof(syncbn_problem_t) == sizeof(int),
              "the C enums are int-sized");
template <class E>
void set_enum(E* field, int v) {
  std::memcpy(field, &v, sizeof v);
}
template <class E>
int int_of(const E& e) {
  int v = 0;
  std::memcpy(&v, &e, sizeof v);
  return v;
}

// ---- the input -----------------------------------------------------------------------------

class Reader {
 public:
  Reader(const std::uint8_t* data, std::size_t size) : p_(data), n_(size) {}
  bool empty() const { return n_ == 0; }
  std::uint8_t u8() {
    if (n_ == 0) return 0;
    --n_;
    return *p_++;
  }
  std::uint16_t u16() { return static_cast<std::uint16_t>(u8() | (u8() << 8)); }
  std::uint32_t u32() { return u16() | (static_cast<std::uint32_t>(u16()) << 16); }
  std::uint64_t u64() { return u32() | (static_cast<std::uint64_t>(u32()) << 32); }
  std::int32_t i32() { return static_cast<std::int32_t>(u32()); }
  std::int64_t i64() { return static_cast<std::int64_t>(u64()); }
  double f64() {
    const std::uint64_t b = u64();
    double d;
    std::memcpy(&d, &b, sizeof d);
    return d;
  }

 private:
  const std::uint8_t* p_;
  std::size_t n_;
};

constexpr std::int64_t kLibraryMaxFeatures = (INT_MAX - 64) / 2;  // syncbn_plan_create's limit
constexpr std::int64_t kMaxFeatures = 65536;                      // the largest valid C made here
constexpr std::int64_t kMaxElements = 4096;                       // data buffers up to this
constexpr int kCommSlots = 4;
constexpr int kPlanSlots = 4;
constexpr int kMaxOps = 96;

// A count-like value (num_features, a dimension). Selector u8 % 12, then:
//   0: u8   1: 1 + u8 % 8   2: 0   3: -1 - u8   4: INT64_MIN   5: INT64_MAX
//   6: kLibraryMaxFeatures + 1 + u8   7: 2^32   8: i64 (raw)   9: 3037000500 (~sqrt(INT64_MAX))
//   10: 4096 + u16   11: the context's value (C, for a dimension; else 4)
std::int64_t count_like(Reader& in, std::int64_t context) {
  switch (in.u8() % 12) {
    case 0: return in.u8();
    case 1: return 1 + in.u8() % 8;
    case 2: return 0;
    case 3: return -1 - static_cast<std::int64_t>(in.u8());
    case 4: return INT64_MIN;
    case 5: return INT64_MAX;
    case 6: return kLibraryMaxFeatures + 1 + in.u8();
    case 7: return std::int64_t{1} << 32;
    case 8: return in.i64();
    case 9: return 3037000500LL;
    case 10: return 4096 + static_cast<std::int64_t>(in.u16());
    default: return context;
  }
}

// num_features: count_like, with valid values above kMaxFeatures moved past the library's limit.
std::int64_t num_features(Reader& in) {
  std::int64_t v = count_like(in, 4);
  if (v > kMaxFeatures && v <= kLibraryMaxFeatures) v = kLibraryMaxFeatures + 1 + (v & 0xff);
  return v;
}

// A double. Selector u8 % 20: a table of specials, or (19) 8 raw bytes.
double special_double(Reader& in) {
  static const double table[] = {0.0,     -0.0,    1e-5,    1e-3,    0.1,     0.5,    1.0,
                                 1.5,     -1.0,    NAN,     -NAN,    INFINITY, -INFINITY,
                                 DBL_MIN, 4.9e-324, DBL_MAX, 1e-300,  2.0,      600.0};
  const unsigned k = in.u8() % 20;
  if (k < sizeof table / sizeof table[0]) return table[k];
  return in.f64();
}

// An enum value: selector u8; below 200: u8 % span (the valid values and a few past them);
// else a raw i32.
int enum_value(Reader& in, int span, int /*bits*/) {
  const std::uint8_t k = in.u8();
  return k < 200 ? k % span : in.i32();
}

// ---- communicators ------------------------------------------------------------------------------

struct CustomState;

// What the harness knows of one communicator object (handles share it with their plans).
struct CommObj {
  bool broken = false;
  int size = 1;
  CustomState* custom = nullptr;  // NULL: the self communicator
};

// A custom communicator's user data. Owned by the harness until the end of the input.
struct CustomState {
  Reader* in = nullptr;
  int rank = 0;
  int size = 1;
  int releases = 0;
  bool created = false;        // syncbn_comm_create_custom succeeded with this user data
  bool has_release = false;
  // Set by the allreduce during the current syncbn call (reset before each call).
  bool failed = false;         // returned an error (other than a timeout)
  bool timed_out = false;      // returned SYNCBN_ERROR_TIMEOUT
  bool tampered = false;       // corrupted the sums
  int calls = 0;               // allreduces in the current syncbn call
  std::size_t last_count = 0;  // the count of the last one
  std::vector<std::unique_ptr<CustomState>>* all = nullptr;
};

// allreduce: one selector byte per call, u8 % 8:
//   0, 1, 2: the group of `size` identical ranks (the sum is size times the buffer)
//   3: returns SYNCBN_ERROR_TIMEOUT   4: returns 1 + u8 (a transport error; 9 is a timeout)
//   5: the sum, then slot u16 % count replaced by special_double
//   6: the sum, then every slot multiplied by special_double   7: leaves the buffer as it is
int fuzz_allreduce(double* buffer, std::size_t count, syncbn_device_t device, void* stream,
                   void* user_data) {
  auto* st = static_cast<CustomState*>(user_data);
  FUZZ_CHECK(st != nullptr && st->created);
  FUZZ_CHECK(buffer != nullptr && count >= 1);
  FUZZ_CHECK(int_of(device) == SYNCBN_DEVICE_CPU && stream == nullptr);
  ++st->calls;
  st->last_count = count;
  volatile double touch = 0;
  for (std::size_t i = 0; i < count; ++i) touch = touch + buffer[i];  // ASan: all count readable
  Reader& in = *st->in;
  unsigned mode = in.u8() % 8;
  switch (mode) {
    case 3: st->timed_out = true; return SYNCBN_ERROR_TIMEOUT;
    case 4: {
      const int code = 1 + in.u8();  // 9 is SYNCBN_ERROR_TIMEOUT: a timeout, not an error
      (code == SYNCBN_ERROR_TIMEOUT ? st->timed_out : st->failed) = true;
      return code;
    }
    case 5: {
      for (std::size_t i = 0; i < count; ++i) buffer[i] *= st->size;
      buffer[in.u16() % count] = special_double(in);
      st->tampered = true;
      return 0;
    }
    case 6: {
      const double f = special_double(in);
      for (std::size_t i = 0; i < count; ++i) buffer[i] *= f;
      st->tampered = true;
      return 0;
    }
    case 7:
      if (st->size != 1) st->tampered = true;
      return 0;
    default:
      for (std::size_t i = 0; i < count; ++i) buffer[i] *= st->size;
      return 0;
  }
}

void fuzz_release(void* user_data) {
  auto* st = static_cast<CustomState*>(user_data);
  FUZZ_CHECK(st != nullptr && st->created && st->has_release);
  ++st->releases;
  FUZZ_CHECK(st->releases == 1);
}

CustomState* new_state(std::vector<std::unique_ptr<CustomState>>& all, Reader* in) {
  all.push_back(std::make_unique<CustomState>());
  CustomState* st = all.back().get();
  st->in = in;
  st->all = &all;
  return st;
}

// split: selector u8 % 5:
//   0, 1: a custom communicator of group_size ranks (rank parent % group_size), returns 0
//   2: returns 3, stores nothing   3: stores a communicator and returns 4
//   4: stores a communicator of the wrong size (group_size + 1), returns 0
int fuzz_split(int group_size, void* user_data, syncbn_comm_t* sub) {
  auto* st = static_cast<CustomState*>(user_data);
  FUZZ_CHECK(st != nullptr && st->created && sub != nullptr);
  FUZZ_CHECK(group_size >= 1 && st->size % group_size == 0);
  const unsigned mode = st->in->u8() % 5;
  if (mode == 2) return 3;
  CustomState* child = new_state(*st->all, st->in);
  child->size = mode == 4 ? (group_size < INT_MAX ? group_size + 1 : group_size - 1) : group_size;
  child->rank = st->rank % group_size;
  child->has_release = true;
  child->created = true;  // before the call: a successful creation may not fail afterwards
  const syncbn_status_t s = checked(syncbn_comm_create_custom(
      child->rank, child->size, fuzz_allreduce, fuzz_split, fuzz_release, child, sub));
  FUZZ_CHECK(s == SYNCBN_SUCCESS);
  return mode == 3 ? 4 : 0;
}

// ---- plans and buffers ------------------------------------------------------------------------

struct PlanSlot {
  syncbn_plan_t handle = nullptr;
  syncbn_config_t config{};
  std::shared_ptr<CommObj> comm;
};

struct CommSlot {
  syncbn_comm_t handle = nullptr;
  std::shared_ptr<CommObj> obj;
};

// A heap buffer of exactly `bytes` bytes (malloc(0) for none), with a copy to compare against.
struct Buffer {
  std::vector<unsigned char> before;
  unsigned char* data = nullptr;
  std::size_t bytes = 0;
  Buffer() = default;
  explicit Buffer(std::size_t n) : data(static_cast<unsigned char*>(std::malloc(n ? n : 1))), bytes(n) {}
  ~Buffer() { std::free(data); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  void snapshot() { before.assign(data, data + bytes); }
  bool unchanged() const { return bytes == 0 || std::memcmp(before.data(), data, bytes) == 0; }
};

// Fills a buffer of `count` values of `elem` bytes (4: float, 8: double). Selector u8 % 6:
//   0: zeros  1: small integers  2: uniform in [-1, 1)  3: one value of special_double
//   4: specials mixed in (NaN, inf, 1e38, denormals)  5: raw bytes from a u32 seed
void fill(Buffer& b, std::size_t count, std::size_t elem, Reader& in) {
  const unsigned mode = in.u8() % 6;
  std::uint64_t state = in.u32() | 1;
  auto next = [&state] {
    state ^= state << 13;
    state ^= state >> 7;
    state ^= state << 17;
    return state;
  };
  const double special = mode == 3 ? special_double(in) : 0.0;
  static const double mixed[] = {NAN, INFINITY, -INFINITY, 1e38, -1e38, 1e-40, 3.0, -2.5};
  for (std::size_t i = 0; i < count; ++i) {
    double v = 0.0;
    switch (mode) {
      case 0: v = 0.0; break;
      case 1: v = static_cast<double>(static_cast<int>(next() % 17) - 8); break;
      case 2: v = static_cast<double>(next() >> 11) / 9007199254740992.0 * 2.0 - 1.0; break;
      case 3: v = special; break;
      case 4: v = (next() % 4 == 0) ? mixed[next() % 8] : static_cast<double>(next() % 100) / 7.0; break;
      default: {
        const std::uint64_t r = next();
        std::memcpy(b.data + i * elem, &r, elem);
        continue;
      }
    }
    if (elem == 4) {
      const float f = static_cast<float>(v);
      std::memcpy(b.data + i * elem, &f, 4);
    } else {
      std::memcpy(b.data + i * elem, &v, 8);
    }
  }
}

// The element count of a shape, if it is one the library should accept the form of (ndim in
// [2, 5], non-negative dims, no int64 overflow) and at most kMaxElements; else -1.
std::int64_t small_count(int ndim, const std::int64_t* shape) {
  if (shape == nullptr || ndim < 2 || ndim > 5) return -1;
  std::int64_t n = 1;
  bool zero = false;
  for (int d = 0; d < ndim; ++d) {
    if (shape[d] < 0) return -1;
    if (shape[d] == 0) zero = true;
  }
  if (zero) return 0;
  for (int d = 0; d < ndim; ++d) {
    if (__builtin_mul_overflow(n, shape[d], &n) || n > kMaxElements) return -1;
  }
  return n;
}

constexpr const char* kOpNames[19] = {
    "config_init", "config_edit", "plan_create", "plan_destroy", "comm_create_self",
    "comm_create_custom", "comm_destroy", "comm_split", "comm_query", "set_timeout", "comm_abort",
    "get_config", "forward_training", "forward_inference", "backward", "reject_call",
    "plan_set_name", "get_async_error", "full_step"};

struct Harness {
  explicit Harness(Reader& input) : in(input) {}
  Reader& in;
  syncbn_config_t cfg{};
  CommSlot comms[kCommSlots];
  PlanSlot plans[kPlanSlots];
  std::vector<std::unique_ptr<CustomState>> states;
  int dummy_stream = 0;

  // Before a syncbn call: forget what the custom allreduces did in the last one.
  void reset_custom() {
    for (auto& st : states) {
      st->failed = st->timed_out = st->tampered = false;
      st->calls = 0;
    }
  }
  // After a collective on obj: a timeout, or a transport error, breaks the communicator.
  void note_collective(const std::shared_ptr<CommObj>& obj, syncbn_status_t s) {
    if (obj == nullptr) return;
    if (s == SYNCBN_ERROR_TIMEOUT) obj->broken = true;
    if (obj->custom != nullptr && obj->custom->timed_out) {
      FUZZ_CHECK(s == SYNCBN_ERROR_TIMEOUT);
      obj->broken = true;
    } else if (obj->custom != nullptr && obj->custom->failed) {
      FUZZ_CHECK(s == SYNCBN_ERROR_COMM);
      obj->broken = true;
    }
  }
  bool clean(const std::shared_ptr<CommObj>& obj) const {
    return obj->custom == nullptr ||
           !(obj->custom->failed || obj->custom->timed_out || obj->custom->tampered);
  }

  // A comm slot, or (index kCommSlots) the NULL handle. Selector u8 % (kCommSlots + 1).
  int comm_index() { return in.u8() % (kCommSlots + 1); }
  int plan_index() { return in.u8() % (kPlanSlots + 1); }

  void destroy_plan(int i) {
    if (plans[i].handle == nullptr) return;
    FUZZ_CHECK(checked(syncbn_plan_destroy(plans[i].handle)) == SYNCBN_SUCCESS);
    plans[i] = PlanSlot{};
  }
  void destroy_comm(int i) {
    if (comms[i].handle == nullptr) return;
    FUZZ_CHECK(checked(syncbn_comm_destroy(comms[i].handle)) == SYNCBN_SUCCESS);
    comms[i] = CommSlot{};
  }

  void run() {
    for (int op = 0; op < kMaxOps && !in.empty(); ++op) {
      const unsigned code = in.u8() % 19;
      if (trace()) std::fprintf(stderr, "op %d: %s\n", op, kOpNames[code]);
      step(code);
    }
    teardown();
  }

  void teardown() {
    for (int i = 0; i < kPlanSlots; ++i) destroy_plan(i);
    for (int i = 0; i < kCommSlots; ++i) destroy_comm(i);
    for (const auto& st : states) {
      FUZZ_CHECK(st->releases == ((st->created && st->has_release) ? 1 : 0));
    }
  }

  void step(unsigned op) {
    switch (op) {
      case 0: return config_init();
      case 1: return config_edit();
      case 2: return plan_create();
      case 3: return destroy_plan(in.u8() % kPlanSlots);
      case 4: return comm_create_self();
      case 5: return comm_create_custom();
      case 6: {  // comm destroy: slot, or the NULL handle (accepted)
        const int c = comm_index();
        if (c == kCommSlots) {
          FUZZ_CHECK(checked(syncbn_comm_destroy(nullptr)) == SYNCBN_SUCCESS);
          FUZZ_CHECK(checked(syncbn_plan_destroy(nullptr)) == SYNCBN_SUCCESS);
        } else {
          destroy_comm(c);
        }
        return;
      }
      case 7: return comm_split();
      case 8: return comm_query();
      case 9: return set_timeout();
      case 10: return comm_abort();
      case 11: return get_config();
      case 12: return forward(true);
      case 13: return forward(false);
      case 14: return backward();
      case 15: return reject_call();
      case 16: return set_name();
      case 17: return async_error();
      default: return full_step();
    }
  }

  // 0: u8 flags (bit 0: NULL config), num_features, enum_value(dtype, 6)
  void config_init() {
    const std::uint8_t flags = in.u8();
    const std::int64_t nf = num_features(in);
    const int dtype = enum_value(in, 6, 2);
    if (flags & 1) {
      FUZZ_CHECK(checked(fuzz_config_init(nullptr, nf, dtype)) ==
                 SYNCBN_ERROR_INVALID_ARGUMENT);
      return;
    }
    FUZZ_CHECK(checked(fuzz_config_init(&cfg, nf, dtype)) ==
               SYNCBN_SUCCESS);
    FUZZ_CHECK(cfg.num_features == nf && int_of(cfg.dtype) == dtype);
    FUZZ_CHECK(int_of(cfg.layout) == SYNCBN_CHANNELS_FIRST && int_of(cfg.device) == SYNCBN_DEVICE_CPU);
    FUZZ_CHECK(cfg.eps == 1e-5 && cfg.momentum == 0.1 && cfg.affine == 1 &&
               cfg.track_running_stats == 1 && cfg.global_param_grads == 0 &&
               int_of(cfg.activation) == SYNCBN_ACTIVATION_NONE);
  }

  // 1: u8 field % 10, then the value: 0 num_features, 1 dtype enum_value(6), 2 layout
  //    enum_value(3), 3 device enum_value(3), 4 eps special_double, 5 momentum special_double,
  //    6 affine, 7 track_running_stats, 8 global_param_grads (u8 % 4: 0, 1, 2, i32),
  //    9 activation enum_value(4)
  void config_edit() {
    auto flag = [this]() -> int {
      const unsigned k = in.u8() % 4;
      return k < 3 ? static_cast<int>(k) : in.i32();
    };
    switch (in.u8() % 10) {
      case 0: cfg.num_features = num_features(in); break;
      case 1: set_enum(&cfg.dtype, enum_value(in, 6, 2)); break;
      case 2: set_enum(&cfg.layout, enum_value(in, 3, 1)); break;
      case 3: set_enum(&cfg.device, enum_value(in, 3, 1)); break;
      case 4: cfg.eps = special_double(in); break;
      case 5: cfg.momentum = special_double(in); break;
      case 6: cfg.affine = flag(); break;
      case 7: cfg.track_running_stats = flag(); break;
      case 8: cfg.global_param_grads = flag(); break;
      default: set_enum(&cfg.activation, enum_value(in, 4, 1)); break;
    }
  }

  // 2: comm_index, u8 flags (bit 0: NULL config, bit 1: NULL plan out), u8 plan slot
  void plan_create() {
    const int c = comm_index();
    const std::uint8_t flags = in.u8();
    const int p = in.u8() % kPlanSlots;
    destroy_plan(p);
    syncbn_comm_t comm = c == kCommSlots ? nullptr : comms[c].handle;
    std::shared_ptr<CommObj> obj = c == kCommSlots ? nullptr : comms[c].obj;
    const syncbn_config_t requested = cfg;
    syncbn_plan_t plan = nullptr;
    reset_custom();
    const syncbn_status_t s = checked(syncbn_plan_create(comm, (flags & 1) ? nullptr : &requested,
                                                         (flags & 2) ? nullptr : &plan));
    if (comm == nullptr) {
      FUZZ_CHECK(s == SYNCBN_ERROR_INVALID_ARGUMENT);
      return;
    }
    const bool was_broken = obj->broken;
    note_collective(obj, s);
    if (was_broken) FUZZ_CHECK(s == SYNCBN_ERROR_COMM_BROKEN);
    // One allreduce, bad arguments or not; none on a broken communicator.
    if (obj->custom != nullptr) FUZZ_CHECK(obj->custom->calls == (was_broken ? 0 : 1));
    if (clean(obj) && !was_broken && (flags & 3)) FUZZ_CHECK(s == SYNCBN_ERROR_INVALID_ARGUMENT);
    if (s != SYNCBN_SUCCESS) return;
    FUZZ_CHECK(plan != nullptr && !(flags & 3));
    // What the header requires of a valid configuration.
    FUZZ_CHECK(requested.num_features > 0 && requested.num_features <= kLibraryMaxFeatures);
    FUZZ_CHECK(int_of(requested.dtype) == SYNCBN_FLOAT32 || int_of(requested.dtype) == SYNCBN_FLOAT64);
    FUZZ_CHECK(int_of(requested.layout) == SYNCBN_CHANNELS_FIRST ||
               int_of(requested.layout) == SYNCBN_CHANNELS_LAST);
    FUZZ_CHECK(int_of(requested.device) == SYNCBN_DEVICE_CPU);  // no CUDA in this build
    FUZZ_CHECK(requested.eps > 0 && std::isfinite(requested.eps));
    FUZZ_CHECK(std::isnan(requested.momentum) ||
               (requested.momentum >= 0 && requested.momentum <= 1));
    plans[p].handle = plan;
    plans[p].config = requested;
    plans[p].comm = obj;
    check_config(plans[p]);
  }

  void check_config(const PlanSlot& slot) {
    syncbn_config_t got;
    std::memset(&got, 0xab, sizeof got);
    FUZZ_CHECK(checked(syncbn_plan_get_config(slot.handle, &got)) == SYNCBN_SUCCESS);
    const syncbn_config_t& want = slot.config;
    FUZZ_CHECK(got.num_features == want.num_features);
    FUZZ_CHECK(int_of(got.dtype) == int_of(want.dtype) && int_of(got.layout) == int_of(want.layout) &&
               int_of(got.device) == int_of(want.device));
    FUZZ_CHECK(std::memcmp(&got.eps, &want.eps, sizeof got.eps) == 0);
    FUZZ_CHECK(std::isnan(want.momentum) ? std::isnan(got.momentum) : got.momentum == want.momentum);
    FUZZ_CHECK(got.affine == (want.affine != 0) &&
               got.track_running_stats == (want.track_running_stats != 0) &&
               got.global_param_grads == (want.global_param_grads != 0));
  }

  // 4: u8 flags (bit 0: NULL out), u8 comm slot
  void comm_create_self() {
    const std::uint8_t flags = in.u8();
    const int c = in.u8() % kCommSlots;
    if (flags & 1) {
      FUZZ_CHECK(checked(syncbn_comm_create_self(nullptr)) == SYNCBN_ERROR_INVALID_ARGUMENT);
      return;
    }
    destroy_comm(c);
    syncbn_comm_t comm = nullptr;
    FUZZ_CHECK(checked(syncbn_comm_create_self(&comm)) == SYNCBN_SUCCESS && comm != nullptr);
    comms[c].handle = comm;
    comms[c].obj = std::make_shared<CommObj>();
  }

  // 5: size (u8 % 8: 1, 2, 3, 4, 8, 0, -1, i32), rank (u8 % 6: 0, size - 1, 1, -1, size, i32),
  //    u8 flags (bit 0: NULL allreduce, 1: NULL split, 2: NULL release, 3: NULL out), u8 slot
  void comm_create_custom() {
    static const int sizes[] = {1, 2, 3, 4, 8, 0, -1};
    const unsigned ks = in.u8() % 8;
    const int size = ks < 7 ? sizes[ks] : in.i32();
    const unsigned kr = in.u8() % 6;
    const int last = size > INT_MIN ? size - 1 : INT_MAX;  // no overflow of our own
    const int rank = kr == 0 ? 0 : kr == 1 ? last : kr == 2 ? 1 : kr == 3 ? -1 : kr == 4 ? size : in.i32();
    const std::uint8_t flags = in.u8();
    const int c = in.u8() % kCommSlots;
    CustomState* st = new_state(states, &in);
    st->rank = rank;
    st->size = size;
    st->has_release = !(flags & 4);
    const bool valid = !(flags & 1) && !(flags & 8) && size >= 1 && rank >= 0 && rank < size;
    st->created = valid;  // the callbacks may only ever see a successfully created one
    if (!(flags & 8)) destroy_comm(c);
    syncbn_comm_t comm = nullptr;
    const syncbn_status_t s = checked(syncbn_comm_create_custom(
        rank, size, (flags & 1) ? nullptr : fuzz_allreduce, (flags & 2) ? nullptr : fuzz_split,
        (flags & 4) ? nullptr : fuzz_release, st, (flags & 8) ? nullptr : &comm));
    FUZZ_CHECK(s == (valid ? SYNCBN_SUCCESS : SYNCBN_ERROR_INVALID_ARGUMENT));
    if (s != SYNCBN_SUCCESS) return;
    FUZZ_CHECK(comm != nullptr);
    comms[c].handle = comm;
    comms[c].obj = std::make_shared<CommObj>();
    comms[c].obj->size = size;
    comms[c].obj->custom = st;
  }

  // 7: comm_index (parent), group_size (u8 % 6: 1, size, 2, 0, -1, i32), u8 flags (bit 0: NULL
  //    sub), u8 target slot
  void comm_split() {
    const int c = comm_index();
    const unsigned kg = in.u8() % 6;
    std::shared_ptr<CommObj> parent = c == kCommSlots ? nullptr : comms[c].obj;
    const int psize = parent ? parent->size : 1;
    const int group = kg == 0 ? 1 : kg == 1 ? psize : kg == 2 ? 2 : kg == 3 ? 0 : kg == 4 ? -1 : in.i32();
    const std::uint8_t flags = in.u8();
    const int t = in.u8() % kCommSlots;
    syncbn_comm_t sub = nullptr;
    reset_custom();
    const std::size_t states_before = states.size();
    const syncbn_status_t s = checked(syncbn_comm_split(c == kCommSlots ? nullptr : comms[c].handle,
                                                        group, (flags & 1) ? nullptr : &sub));
    if (c == kCommSlots || comms[c].handle == nullptr) {
      FUZZ_CHECK(s == SYNCBN_ERROR_INVALID_ARGUMENT);
      return;
    }
    const bool was_broken = parent->broken;
    note_collective(parent, s);
    if (was_broken) FUZZ_CHECK(s == SYNCBN_ERROR_COMM_BROKEN);
    const bool bad = (flags & 1) || group < 1 || psize % group != 0;
    if (!was_broken && clean(parent) && bad) FUZZ_CHECK(s == SYNCBN_ERROR_INVALID_ARGUMENT);
    if (s != SYNCBN_SUCCESS) return;
    FUZZ_CHECK(!bad && sub != nullptr);
    int r = -1, n = -1;
    FUZZ_CHECK(checked(syncbn_comm_size(sub, &n)) == SYNCBN_SUCCESS && n == group);
    FUZZ_CHECK(checked(syncbn_comm_rank(sub, &r)) == SYNCBN_SUCCESS && r >= 0 && r < n);
    double parent_timeout = -1, sub_timeout = -2;
    FUZZ_CHECK(checked(syncbn_comm_get_timeout(comms[c].handle, &parent_timeout)) == SYNCBN_SUCCESS);
    FUZZ_CHECK(checked(syncbn_comm_get_timeout(sub, &sub_timeout)) == SYNCBN_SUCCESS);
    FUZZ_CHECK(parent_timeout == sub_timeout);  // subgroups inherit the deadline
    auto obj = std::make_shared<CommObj>();
    obj->size = group;
    if (parent->custom != nullptr) {
      // The split function's child, made during this call.
      FUZZ_CHECK(states.size() == states_before + 1);
      obj->custom = states.back().get();
      FUZZ_CHECK(obj->custom->created && obj->custom->size == group);
    }
    destroy_comm(t);
    comms[t].handle = sub;
    comms[t].obj = obj;
  }

  // 8: comm_index, u8 flags (bit 0: NULL rank out, bit 1: NULL size out)
  void comm_query() {
    const int c = comm_index();
    const std::uint8_t flags = in.u8();
    syncbn_comm_t comm = c == kCommSlots ? nullptr : comms[c].handle;
    int r = -7, n = -7;
    const syncbn_status_t sr = checked(syncbn_comm_rank(comm, (flags & 1) ? nullptr : &r));
    const syncbn_status_t sn = checked(syncbn_comm_size(comm, (flags & 2) ? nullptr : &n));
    if (comm == nullptr) {
      FUZZ_CHECK(sr == SYNCBN_ERROR_INVALID_ARGUMENT && sn == SYNCBN_ERROR_INVALID_ARGUMENT);
      return;
    }
    FUZZ_CHECK(sr == ((flags & 1) ? SYNCBN_ERROR_INVALID_ARGUMENT : SYNCBN_SUCCESS));
    FUZZ_CHECK(sn == ((flags & 2) ? SYNCBN_ERROR_INVALID_ARGUMENT : SYNCBN_SUCCESS));
    const CommObj& obj = *comms[c].obj;
    if (!(flags & 2)) FUZZ_CHECK(n == obj.size);
    if (!(flags & 1)) {
      FUZZ_CHECK(r >= 0 && r < obj.size);
      if (obj.custom != nullptr) FUZZ_CHECK(r == obj.custom->rank);
    }
  }

  // 9: comm_index, special_double seconds, u8 flags (bit 0: get with a NULL out)
  void set_timeout() {
    const int c = comm_index();
    const double seconds = special_double(in);
    const std::uint8_t flags = in.u8();
    syncbn_comm_t comm = c == kCommSlots ? nullptr : comms[c].handle;
    double before = -1;
    if (comm != nullptr) {
      FUZZ_CHECK(checked(syncbn_comm_get_timeout(comm, &before)) == SYNCBN_SUCCESS);
      FUZZ_CHECK(before >= 0 && std::isfinite(before));
    }
    const syncbn_status_t s = checked(syncbn_comm_set_timeout(comm, seconds));
    const bool valid = comm != nullptr && seconds >= 0 && std::isfinite(seconds);
    FUZZ_CHECK(s == (valid ? SYNCBN_SUCCESS : SYNCBN_ERROR_INVALID_ARGUMENT));
    double after = -1;
    const syncbn_status_t g = checked(syncbn_comm_get_timeout(comm, (flags & 1) ? nullptr : &after));
    if (comm == nullptr || (flags & 1)) {
      FUZZ_CHECK(g == SYNCBN_ERROR_INVALID_ARGUMENT);
      return;
    }
    FUZZ_CHECK(g == SYNCBN_SUCCESS);
    FUZZ_CHECK(after == (valid ? seconds : before));
  }

  // 10: comm_index
  void comm_abort() {
    const int c = comm_index();
    syncbn_comm_t comm = c == kCommSlots ? nullptr : comms[c].handle;
    const syncbn_status_t s = checked(syncbn_comm_abort(comm));
    if (comm == nullptr) {
      FUZZ_CHECK(s == SYNCBN_ERROR_INVALID_ARGUMENT);
      return;
    }
    FUZZ_CHECK(s == SYNCBN_SUCCESS);  // self and custom communicators return
    comms[c].obj->broken = true;
  }

  // 11: plan_index, u8 flags (bit 0: NULL out)
  void get_config() {
    const int p = plan_index();
    const std::uint8_t flags = in.u8();
    syncbn_plan_t plan = p == kPlanSlots ? nullptr : plans[p].handle;
    if (plan != nullptr && !(flags & 1)) return check_config(plans[p]);
    syncbn_config_t got;
    FUZZ_CHECK(checked(syncbn_plan_get_config(plan, (flags & 1) ? nullptr : &got)) ==
               SYNCBN_ERROR_INVALID_ARGUMENT);
  }

  // 16: plan_index, u8 name choice % 6: NULL, "", "layer3.bn2", 300 x 'n', "%s%n\n", 255 x 'm'
  void set_name() {
    const int p = plan_index();
    const unsigned k = in.u8() % 6;
    static const std::string long_name(300, 'n'), max_name(255, 'm');
    const char* names[] = {nullptr, "", "layer3.bn2", long_name.c_str(), "%s%n\n", max_name.c_str()};
    syncbn_plan_t plan = p == kPlanSlots ? nullptr : plans[p].handle;
    const syncbn_status_t s = checked(syncbn_plan_set_name(plan, names[k]));
    FUZZ_CHECK(s == (plan == nullptr ? SYNCBN_ERROR_INVALID_ARGUMENT : SYNCBN_SUCCESS));
  }

  // 17: plan_index, u8 flags (bit 0: non-NULL stream, bit 1: NULL out)
  void async_error() {
    const int p = plan_index();
    const std::uint8_t flags = in.u8();
    syncbn_plan_t plan = p == kPlanSlots ? nullptr : plans[p].handle;
    syncbn_status_t e = SYNCBN_ERROR_INTERNAL;
    const syncbn_status_t s = checked(syncbn_plan_get_async_error(
        plan, (flags & 1) ? &dummy_stream : nullptr, (flags & 2) ? nullptr : &e));
    if (plan == nullptr || (flags & 2)) {
      FUZZ_CHECK(s == SYNCBN_ERROR_INVALID_ARGUMENT);
      return;
    }
    if (s == SYNCBN_SUCCESS) FUZZ_CHECK(e == SYNCBN_SUCCESS);  // a CPU plan
  }

  // ---- the batch-norm calls ------------------------------------------------------------------

  // The shape of a call: ndim (u8 % 12: -1, 0, 1, 2, 3, 4, 5, 6, 100, 2, 4, i32), u8 flags
  // (bit 0: NULL shape), then for ndim in [1, 6] one count_like(C) per dimension (the rest of
  // a longer shape is 1). The array holds exactly max(ndim, 0) values.
  struct Shape {
    int ndim = 0;
    std::unique_ptr<std::int64_t[]> dims;  // exactly max(ndim, 0) values (new[0] for none)
    bool null = false;
    const std::int64_t* ptr() const { return null ? nullptr : dims.get(); }
    void assign(const std::vector<std::int64_t>& v) {
      ndim = static_cast<int>(v.size());
      dims.reset(new std::int64_t[v.size()]);
      std::copy(v.begin(), v.end(), dims.get());
    }
  };
  Shape shape(std::int64_t C) {
    static const int ndims[] = {-1, 0, 1, 2, 3, 4, 5, 6, 100, 2, 4};
    Shape sh;
    const unsigned k = in.u8() % 12;
    sh.ndim = k < 11 ? ndims[k] : in.i32();
    sh.null = in.u8() & 1;
    const std::size_t n = sh.ndim > 0 && sh.ndim <= 100 ? static_cast<std::size_t>(sh.ndim) : 0;
    sh.dims.reset(new std::int64_t[n]);
    for (std::size_t d = 0; d < n; ++d) sh.dims[d] = d < 6 ? count_like(in, C) : 1;
    return sh;
  }

  // A pointer argument: u8 % 4 == 0: NULL, else the buffer (if there is one).
  bool wants(std::uint8_t k) { return k % 4 != 0; }

  struct Call {
    PlanSlot* slot = nullptr;
    syncbn_plan_t plan = nullptr;
    std::int64_t C = 4;          // parameter arrays are C values
    std::size_t elem = 4;        // bytes of a data value / parameter
    bool f64 = false;
    Shape sh;
    std::int64_t count = -1;     // data elements, -1: no data buffers
  };

  Call begin_call() {
    Call call;
    const int p = plan_index();
    call.slot = p == kPlanSlots ? nullptr : &plans[p];
    call.plan = call.slot ? call.slot->handle : nullptr;
    if (call.plan != nullptr) {
      call.C = call.slot->config.num_features;
      call.f64 = int_of(call.slot->config.dtype) == SYNCBN_FLOAT64;
      call.elem = call.f64 ? 8 : 4;
    }
    call.sh = shape(call.C);
    call.count = small_count(call.sh.ndim, call.sh.ptr());
    return call;
  }

  std::unique_ptr<Buffer> data_buffer(const Call& call) {
    if (call.count < 0) return nullptr;
    auto b = std::make_unique<Buffer>(static_cast<std::size_t>(call.count) * call.elem);
    fill(*b, static_cast<std::size_t>(call.count), call.elem, in);
    b->snapshot();
    return b;
  }
  std::unique_ptr<Buffer> param_buffer(const Call& call) {
    auto b = std::make_unique<Buffer>(static_cast<std::size_t>(call.C) * call.elem);
    fill(*b, static_cast<std::size_t>(call.C), call.elem, in);
    b->snapshot();
    return b;
  }
  static void* ptr(const std::unique_ptr<Buffer>& b) { return b ? b->data : nullptr; }

  // Checks that follow any plan call: NULL plan, broken communicator, stream on a CPU plan.
  void common_status(const Call& call, syncbn_status_t s, bool stream, bool collective,
                     bool may_refine = false) {
    if (call.plan == nullptr) {
      FUZZ_CHECK(s == SYNCBN_ERROR_INVALID_ARGUMENT);
      return;
    }
    const std::shared_ptr<CommObj>& obj = call.slot->comm;
    if (obj->broken) {
      FUZZ_CHECK(s == SYNCBN_ERROR_COMM_BROKEN);  // at once: no allreduce
      if (obj->custom != nullptr) FUZZ_CHECK(obj->custom->calls == 0);
      return;
    }
    if (obj->custom != nullptr) {
      // Training and backward: one allreduce of 2C + 18 doubles, whatever the arguments (a rank
      // that rejects its own still takes part). Inference: none.
      // A forward training call whose verdict passed may redo its sums around a refined shift
      // (core/finalize.hpp): a second allreduce of the same length.
      FUZZ_CHECK(obj->custom->calls == (collective ? 1 : 0) ||
                 (collective && may_refine && obj->custom->calls == 2));
      if (collective) {
        FUZZ_CHECK(obj->custom->last_count ==
                   2 * static_cast<std::size_t>(call.slot->config.num_features) + 18);
      }
    }
    if (collective) note_collective(obj, s);
    if (stream) FUZZ_CHECK(s != SYNCBN_SUCCESS);
  }

  // 12 / 13: forward training / inference. begin_call (plan_index, shape), then the buffers in
  // order, each a u8 choice (NULL if % 4 == 0) and, when made, its fill: x, y (u8: % 4 == 3:
  // y = x), weight, bias, save_mean, save_invstd (training), running_mean, running_var,
  // num_batches_tracked (training; u8 choice, then the value: u8 % 7: 0, 1, u8, -1, INT64_MAX,
  // INT64_MAX - 1, i64), then u8 flags (bit 0: non-NULL stream; bit 1: the named-argument call,
  // then z as a buffer; bit 2: with args NULL; bit 3: with the named call, the relu mask, a
  // buffer of the data type: at least one byte per element).
  void forward(bool training) {
    Call call = begin_call();
    auto x = wants(in.u8()) ? data_buffer(call) : nullptr;
    const std::uint8_t ky = in.u8();
    const bool in_place = ky % 4 == 3 && x != nullptr;
    auto y = (!in_place && wants(ky)) ? data_buffer(call) : nullptr;
    auto weight = wants(in.u8()) ? param_buffer(call) : nullptr;
    auto bias = wants(in.u8()) ? param_buffer(call) : nullptr;
    std::unique_ptr<Buffer> save_mean, save_invstd;
    if (training) {
      if (wants(in.u8())) save_mean = param_buffer(call);
      if (wants(in.u8())) save_invstd = param_buffer(call);
    }
    auto running_mean = wants(in.u8()) ? param_buffer(call) : nullptr;
    auto running_var = wants(in.u8()) ? param_buffer(call) : nullptr;
    std::int64_t nbt_value = 0;
    bool have_nbt = false;
    if (training && wants(in.u8())) {
      have_nbt = true;
      static const std::int64_t values[] = {0, 1, -1, INT64_MAX, INT64_MAX - 1};
      const unsigned k = in.u8() % 7;
      nbt_value = k == 2 ? in.u8() : k == 6 ? in.i64() : values[k < 2 ? k : k - 1];
    }
    std::int64_t nbt = nbt_value;
    const std::uint8_t flags = in.u8();
    const bool stream = flags & 1;
    const bool named = flags & 2;       // the _ex call, with z
    const bool null_args = flags & 4;   // ... and args NULL
    auto z = named && wants(in.u8()) ? data_buffer(call) : nullptr;
    auto mask = named && (flags & 8) ? data_buffer(call) : nullptr;
    void* const y_ptr = in_place ? ptr(x) : ptr(y);

    reset_custom();
    syncbn_status_t s;
    if (named) {
      syncbn_forward_args_t a{};
      a.ndim = call.sh.ndim;
      a.shape = call.sh.ptr();
      a.x = ptr(x);
      a.z = ptr(z);
      a.weight = ptr(weight);
      a.bias = ptr(bias);
      a.y = y_ptr;
      a.save_mean = ptr(save_mean);
      a.save_invstd = ptr(save_invstd);
      a.running_mean = ptr(running_mean);
      a.running_var = ptr(running_var);
      a.num_batches_tracked = have_nbt ? &nbt : nullptr;
      a.stream = stream ? &dummy_stream : nullptr;
      a.mask = ptr(mask);
      const syncbn_forward_args_t* pa = null_args ? nullptr : &a;
      s = checked(training ? syncbn_forward_training_ex(call.plan, pa)
                           : syncbn_forward_inference_ex(call.plan, pa));
      if (null_args) FUZZ_CHECK(s != SYNCBN_SUCCESS);
      FUZZ_CHECK(!z || z->unchanged());
    } else if (training) {
      s = checked(syncbn_forward_training(call.plan, call.sh.ndim, call.sh.ptr(), ptr(x),
                                          ptr(weight), ptr(bias), y_ptr, ptr(save_mean),
                                          ptr(save_invstd), ptr(running_mean), ptr(running_var),
                                          have_nbt ? &nbt : nullptr,
                                          stream ? &dummy_stream : nullptr));
    } else {
      s = checked(syncbn_forward_inference(call.plan, call.sh.ndim, call.sh.ptr(), ptr(x),
                                           ptr(weight), ptr(bias), ptr(running_mean),
                                           ptr(running_var), y_ptr,
                                           stream ? &dummy_stream : nullptr));
    }
    common_status(call, s, stream && !(named && null_args), training, training);

    auto same = [](const std::unique_ptr<Buffer>& b) { return !b || b->unchanged(); };
    // Inputs: never written (x only through y = x on success).
    FUZZ_CHECK(same(weight) && same(bias));
    if (!in_place || s != SYNCBN_SUCCESS) FUZZ_CHECK(same(x));
    const bool track = call.plan != nullptr && call.slot->config.track_running_stats != 0;
    if (!training) {
      FUZZ_CHECK(same(running_mean) && same(running_var));
      return;
    }
    if (s != SYNCBN_SUCCESS) {
      FUZZ_CHECK(same(y) && same(mask) && same(save_mean) && same(save_invstd));
      FUZZ_CHECK(same(running_mean) && same(running_var));
      FUZZ_CHECK(nbt == nbt_value);
      return;
    }
    FUZZ_CHECK(call.plan != nullptr && !stream);
    if (track) {
      FUZZ_CHECK(nbt_value >= 0 || !have_nbt);
      if (have_nbt) FUZZ_CHECK(nbt == nbt_value + 1);
    } else {
      FUZZ_CHECK(same(running_mean) && same(running_var) && nbt == nbt_value);
    }
  }

  // 14: backward. begin_call, then x, dy, weight, save_mean, save_invstd, dx (u8: % 4 == 3:
  // dx = dy), dweight, dbias as for forward, then u8 flags (bit 0: non-NULL stream; bit 1: the
  // named-argument call, then y and dz as buffers; bit 2: with args NULL; bit 3: with the named
  // call, the relu mask, a buffer of the data type: at least one byte per element).
  void backward() {
    Call call = begin_call();
    auto x = wants(in.u8()) ? data_buffer(call) : nullptr;
    auto dy = wants(in.u8()) ? data_buffer(call) : nullptr;
    auto weight = wants(in.u8()) ? param_buffer(call) : nullptr;
    auto save_mean = wants(in.u8()) ? param_buffer(call) : nullptr;
    auto save_invstd = wants(in.u8()) ? param_buffer(call) : nullptr;
    const std::uint8_t kdx = in.u8();
    const bool in_place = kdx % 4 == 3 && dy != nullptr;
    auto dx = (!in_place && wants(kdx)) ? data_buffer(call) : nullptr;
    auto dweight = wants(in.u8()) ? param_buffer(call) : nullptr;
    auto dbias = wants(in.u8()) ? param_buffer(call) : nullptr;
    const std::uint8_t flags = in.u8();
    const bool stream = flags & 1;
    const bool named = flags & 2;      // the _ex call, with y and dz
    const bool null_args = flags & 4;  // ... and args NULL
    auto y = named && wants(in.u8()) ? data_buffer(call) : nullptr;
    auto dz = named && wants(in.u8()) ? data_buffer(call) : nullptr;
    auto mask = named && (flags & 8) ? data_buffer(call) : nullptr;

    reset_custom();
    syncbn_status_t s;
    if (named) {
      syncbn_backward_args_t a{};
      a.ndim = call.sh.ndim;
      a.shape = call.sh.ptr();
      a.x = ptr(x);
      a.y = ptr(y);
      a.dy = ptr(dy);
      a.weight = ptr(weight);
      a.save_mean = ptr(save_mean);
      a.save_invstd = ptr(save_invstd);
      a.dx = in_place ? ptr(dy) : ptr(dx);
      a.dz = ptr(dz);
      a.mask = ptr(mask);
      a.dweight = ptr(dweight);
      a.dbias = ptr(dbias);
      a.stream = stream ? &dummy_stream : nullptr;
      s = checked(syncbn_backward_ex(call.plan, null_args ? nullptr : &a));
      if (null_args) FUZZ_CHECK(s != SYNCBN_SUCCESS);
    } else {
      s = checked(syncbn_backward(call.plan, call.sh.ndim, call.sh.ptr(), ptr(x), ptr(dy),
                                  ptr(weight), ptr(save_mean), ptr(save_invstd),
                                  in_place ? ptr(dy) : ptr(dx), ptr(dweight), ptr(dbias),
                                  stream ? &dummy_stream : nullptr));
    }
    common_status(call, s, stream && !(named && null_args), true);

    auto same = [](const std::unique_ptr<Buffer>& b) { return !b || b->unchanged(); };
    FUZZ_CHECK(same(x) && same(weight) && same(save_mean) && same(save_invstd) && same(y) &&
               same(mask));
    if (!in_place || s != SYNCBN_SUCCESS) FUZZ_CHECK(same(dy));
    if (s != SYNCBN_SUCCESS) {
      FUZZ_CHECK(same(dx) && same(dweight) && same(dbias) && same(dz));
      return;
    }
    FUZZ_CHECK(call.plan != nullptr && !stream);
    if (call.slot->config.affine == 0) FUZZ_CHECK(same(dweight) && same(dbias));  // ignored
  }

  // 15: reject_call. plan_index, call enum_value(5), argument (u8 % 6: NULL, "x", "weight",
  // "num_batches_tracked", "no such name", ""), problem enum_value(7), detail (u8 % 3: NULL,
  // "detail", 300 x 'd'), u8 flags (bit 0: non-NULL stream)
  void reject_call() {
    const int p = plan_index();
    const int call_value = enum_value(in, 5, 2);
    static const char* const arguments[] = {nullptr, "x", "weight", "num_batches_tracked",
                                            "no such name", ""};
    const char* argument = arguments[in.u8() % 6];
    const int problem = enum_value(in, 7, 3);
    static const std::string long_detail(300, 'd');
    const unsigned kd = in.u8() % 3;
    const char* detail = kd == 0 ? nullptr : kd == 1 ? "detail" : long_detail.c_str();
    const bool stream = in.u8() & 1;
    PlanSlot* slot = p == kPlanSlots ? nullptr : &plans[p];
    syncbn_plan_t plan = slot ? slot->handle : nullptr;
    reset_custom();
    const syncbn_status_t s = checked(fuzz_plan_reject_call(
        plan, call_value, argument, problem, detail, stream ? &dummy_stream : nullptr));
    FUZZ_CHECK(s != SYNCBN_SUCCESS);
    const bool valid_call = call_value >= SYNCBN_CALL_FORWARD_TRAINING &&
                            call_value <= SYNCBN_CALL_BACKWARD;
    if (plan == nullptr || !valid_call) {
      FUZZ_CHECK(s == SYNCBN_ERROR_INVALID_ARGUMENT);
      return;
    }
    const bool collective = call_value != SYNCBN_CALL_FORWARD_INFERENCE;
    const CustomState* cs = slot->comm->custom;
    if (slot->comm->broken) {
      FUZZ_CHECK(s == SYNCBN_ERROR_COMM_BROKEN);
      if (cs != nullptr) FUZZ_CHECK(cs->calls == 0);
      return;
    }
    if (cs != nullptr) {
      FUZZ_CHECK(cs->calls == (collective ? 1 : 0));
      if (collective) {
        FUZZ_CHECK(cs->last_count == 2 * static_cast<std::size_t>(slot->config.num_features) + 18);
      }
    }
    if (collective) note_collective(slot->comm, s);
    if (!collective || clean(slot->comm)) FUZZ_CHECK(s == SYNCBN_ERROR_INVALID_ARGUMENT);
  }

  // 18: a well-formed training step on a plan: plan_index, u8 N (% 5), u8 spatial (% 4: a
  // 1-, 2- or 3-d spatial shape of small sizes, or none), the fills of x, weight, bias, dy, then
  // forward training (with every buffer) and backward (with every buffer). A slot without a
  // plan does nothing.
  void full_step() {
    const int p = in.u8() % kPlanSlots;
    const std::uint8_t kn = in.u8();
    const std::uint8_t ks = in.u8();
    PlanSlot& slot = plans[p];
    if (slot.handle == nullptr) return;
    Call call;
    call.slot = &slot;
    call.plan = slot.handle;
    call.C = slot.config.num_features;
    call.f64 = int_of(slot.config.dtype) == SYNCBN_FLOAT64;
    call.elem = call.f64 ? 8 : 4;
    const bool last = int_of(slot.config.layout) == SYNCBN_CHANNELS_LAST;
    const std::int64_t N = kn % 5;
    std::vector<std::int64_t> dims{N};
    if (!last) dims.push_back(call.C);
    for (unsigned d = 0; d < ks % 4; ++d) dims.push_back(1 + (ks >> (2 + 2 * d)) % 3);
    if (last) dims.push_back(call.C);
    call.sh.assign(dims);
    call.count = small_count(call.sh.ndim, call.sh.ptr());
    if (call.count < 0) return;  // C too large for data buffers
    auto x = data_buffer(call);
    auto y = data_buffer(call);
    auto weight = param_buffer(call);
    auto bias = param_buffer(call);
    auto dy = data_buffer(call);
    Buffer save_mean(static_cast<std::size_t>(call.C) * call.elem);
    Buffer save_invstd(static_cast<std::size_t>(call.C) * call.elem);
    Buffer running_mean(static_cast<std::size_t>(call.C) * call.elem);
    Buffer running_var(static_cast<std::size_t>(call.C) * call.elem);
    Buffer dx(call.count * call.elem), dweight(call.C * call.elem), dbias(call.C * call.elem);
    for (Buffer* b : {&save_mean, &save_invstd, &running_mean, &running_var, &dx, &dweight, &dbias}) {
      std::memset(b->data, 0, b->bytes);
      b->snapshot();
    }
    std::int64_t nbt = 0;
    reset_custom();
    const syncbn_status_t s = checked(syncbn_forward_training(
        slot.handle, call.sh.ndim, call.sh.ptr(), x->data, weight->data, bias->data, y->data,
        save_mean.data, save_invstd.data, running_mean.data, running_var.data, &nbt, nullptr));
    common_status(call, s, false, true, true);
    FUZZ_CHECK(x->unchanged() && weight->unchanged() && bias->unchanged());
    if (s != SYNCBN_SUCCESS) {
      FUZZ_CHECK(y->unchanged() && save_mean.unchanged() && save_invstd.unchanged() &&
                 running_mean.unchanged() && running_var.unchanged() && nbt == 0);
      return;
    }
    FUZZ_CHECK(nbt == (slot.config.track_running_stats ? 1 : 0));
    save_mean.snapshot();
    save_invstd.snapshot();
    reset_custom();
    const syncbn_status_t b = checked(syncbn_backward(
        slot.handle, call.sh.ndim, call.sh.ptr(), x->data, dy->data, weight->data, save_mean.data,
        save_invstd.data, dx.data, dweight.data, dbias.data, nullptr));
    common_status(call, b, false, true);
    FUZZ_CHECK(x->unchanged() && dy->unchanged() && weight->unchanged() && save_mean.unchanged() &&
               save_invstd.unchanged());
    if (b != SYNCBN_SUCCESS) FUZZ_CHECK(dx.unchanged() && dweight.unchanged() && dbias.unchanged());
  }
};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  Reader in(data, size);
  Harness h(in);
  h.run();
  return 0;
}
