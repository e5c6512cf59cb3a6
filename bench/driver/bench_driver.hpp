// The benches' shared driver, in the style of nccl-tests: the common command-line options
// (CLI11), the parsers of shape / dtype / layout lists, the monotonic clock and the median / min
// of timed rounds (bench_stats.hpp, which needs nothing but the standard library), the text table (a header with units, aligned columns, "# " footer lines) and
// the CSV and JSON writers, which take one schema (each column named once) for both files.
// Host C++ only and free of MPI: the MPI reductions are in bench_mpi.hpp, and the CUDA bench
// keeps CUDA in its .cu files, so that this compiles with the host compiler alone.
//
// Conventions every bench follows: -n / --iters timed rounds, -w / --warmup untimed ones before
// them; times are the median of the timed rounds; only one process (rank 0) prints and writes
// files; a value that was not measured is NaN, printed "n/a" in the table, written as the
// writer's na text in the CSV (empty unless the bench says otherwise) and null in the JSON.
#ifndef SYNCBN_BENCH_DRIVER_HPP
#define SYNCBN_BENCH_DRIVER_HPP

#include <CLI/CLI.hpp>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <limits>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "bench_stats.hpp"  // kNaN, now_seconds, median, minimum, sample_seconds

namespace bench {

// ---- options ------------------------------------------------------------------------------------

struct CommonOptions {
  int iters = 20;
  int warmup = 3;
  std::string csv, json;
};

// Adds -n/--iters, -w/--warmup, --csv FILE and (with_json) --json FILE, with o's values as the
// defaults shown by --help.
void add_common_options(CLI::App& app, CommonOptions& o, bool with_json = true);

// A 4-d shape "NxCxHxW" (positive sizes); throws CLI::ValidationError(flag, ...) otherwise.
struct Shape4 {
  int64_t n = 0, c = 0, h = 0, w = 0;
  int64_t count() const { return n * c * h * w; }
  std::string name() const;  // "NxCxHxW"
};
Shape4 parse_nchw(const std::string& s, const std::string& flag = "--shape");

// The distinct batch-norm input shapes (C x H x W) of ResNet-50 (torchvision, 224 x 224 input),
// at batch N: the default shape list of syncbn_bench and fused_bench.
std::vector<Shape4> resnet50_shapes(int64_t batch);

// A per-sample shape "CxHxW" (positive sizes); throws CLI::ValidationError(flag, ...) otherwise.
struct Shape3 {
  int64_t c = 0, h = 0, w = 0;
  std::string name() const;  // "CxHxW"
};
Shape3 parse_chw(const std::string& s, const std::string& flag = "--shapes");

// Canonical dtype and layout names, with the aliases the benches accept:
//   f32 (fp32, float32), f64 (fp64, float64), bf16 (bfloat16), f16 (fp16, float16);
//   nchw (channels_first), nhwc (channels_last).
// Returns "" for anything else.
std::string canonical_dtype(const std::string& s);
std::string canonical_layout(const std::string& s);

// ---- values, records, schema --------------------------------------------------------------------

// One cell of a table row or a CSV / JSON record.
struct Value {
  enum Kind { Number, Integer, Text } kind = Number;
  double number = kNaN;
  int64_t integer = 0;
  std::string text;
};
inline Value num(double v) { return {Value::Number, v, 0, {}}; }
inline Value integer(int64_t v) { return {Value::Integer, kNaN, v, {}}; }
inline Value text(std::string s) { return {Value::Text, kNaN, 0, std::move(s)}; }

using Record = std::vector<Value>;
using Schema = std::vector<std::string>;  // the keys (CSV header, JSON keys), in order

// A schema built from (key, getter) pairs, so that each column is named in one place:
//   const bench::Fields<Row> fields = {{"shape", [](const Row& r) { return text(...); }}, ...};
//   csv.write(bench::record_of(fields, row));
template <class Row>
struct Field {
  std::string key;
  Value (*get)(const Row&);
};
template <class Row>
using Fields = std::vector<Field<Row>>;
template <class Row>
Schema schema_of(const Fields<Row>& f) {
  Schema s;
  for (const auto& x : f) s.push_back(x.key);
  return s;
}
template <class Row>
Record record_of(const Fields<Row>& f, const Row& r) {
  Record out;
  for (const auto& x : f) out.push_back(x.get(r));
  return out;
}

// Numbers as %.6g (NaN: na; infinities "inf", "-inf"), integers as integers, text as it is.
std::string format_value(const Value& v, const std::string& na);

// ---- CSV and JSON -------------------------------------------------------------------------------

// A CSV file: the header at open, one line per write, flushed (a run cut short keeps its rows).
// Text cells have commas, quotes and line breaks replaced by ';'.
class CsvWriter {
 public:
  CsvWriter() = default;
  // Throws std::runtime_error if path cannot be written.
  CsvWriter(const std::string& path, Schema schema, std::string na = "");
  bool is_open() const { return out_ != nullptr; }
  void write(const Record& r);

 private:
  std::unique_ptr<std::ofstream> out_;
  Schema schema_;
  std::string na_;
};

// Every record as a CSV file at once (see CsvWriter).
void write_csv(const std::string& path, const Schema& schema, const std::vector<Record>& rows,
               const std::string& na = "");

// {"meta": {key: value, ...}, "results": [{schema key: value, ...}, ...]}; NaN and infinities
// are null, and so is a Text meta value that is empty. Throws std::runtime_error if path cannot be written.
void write_json(const std::string& path, const std::vector<std::pair<std::string, Value>>& meta,
                const Schema& schema, const std::vector<Record>& rows);

std::string json_string(const std::string& s);  // quoted and escaped

// ---- the table ----------------------------------------------------------------------------------

// A column of the text table. Numbers print with precision decimals, fewer (then %g) if they do
// not fit width; scientific prints %.<precision>e. NaN prints "n/a". Text is padded to width.
struct Column {
  std::string name;         // header line 1
  std::string unit;         // header line 2, "(us)"
  int width = 8;
  int precision = 2;
  std::string group;        // a label over consecutive columns of the same group, "" for none
  int gap = 1;              // spaces before the column (the first column: after the prefix)
  bool left = false;        // left-aligned (text)
  bool scientific = false;  // %e
  bool bar = false;         // a " |" before the gap: the column starts a new section

  Column(std::string name_, std::string unit_, int width_, int precision_,
         std::string group_ = "", int gap_ = 1)
      : name(std::move(name_)),
        unit(std::move(unit_)),
        width(width_),
        precision(precision_),
        group(std::move(group_)),
        gap(gap_) {}
  Column& align_left() {
    left = true;
    return *this;
  }
  Column& sci() {
    scientific = true;
    return *this;
  }
  Column& after_bar() {
    bar = true;
    return *this;
  }
};

class Table {
 public:
  explicit Table(std::vector<Column> columns) : cols_(std::move(columns)) {}
  // The header, to stdout: a group line (if any column has a group), the names, the units
  // (if any column has one). Every line starts "# ".
  void print_header() const;
  // A row, starting "  ", flushed.
  void print_row(const Record& r) const;
  std::string format_row(const Record& r) const;

 private:
  std::vector<Column> cols_;
};

// A right-aligned cell of at most width characters (see Column).
std::string cell(double v, int width, int precision);

// Footer lines, printed as "# " + line.
void print_footer(const std::vector<std::string>& lines);

// ---- machine ------------------------------------------------------------------------------------

std::string utc_now();    // "2026-12-03T09:50:30Z"
std::string host_name();  // gethostname, "unknown" on failure
std::string cpu_model();  // /proc/cpuinfo's first "model name", "unknown" without one

// The last-level cache: the highest data or unified level in sysfs (cpu0); else glibc's
// sysconf(_SC_LEVEL3_CACHE_SIZE) (on some VMs that one is the L3 size times the thread count).
struct Llc {
  int64_t bytes = 0;
  std::string source = "unknown";  // "sysfs L3", "sysconf L3", ...
};
Llc last_level_cache();

}  // namespace bench

#endif  // SYNCBN_BENCH_DRIVER_HPP
