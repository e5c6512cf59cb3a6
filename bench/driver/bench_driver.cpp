// The shared driver's options, parsers, statistics, table and CSV / JSON writers
// (bench_driver.hpp says what each does).
#include "bench_driver.hpp"

#include <unistd.h>

#include <algorithm>
#include <cinttypes>
#include <cmath>
#include <cstdlib>
#include <ctime>
#include <sstream>
#include <stdexcept>

namespace bench {

// ---- options ------------------------------------------------------------------------------------

void add_common_options(CLI::App& app, CommonOptions& o, bool with_json) {
  app.add_option("-n,--iters", o.iters, "timed rounds (median reported)")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("-w,--warmup", o.warmup, "warm-up rounds")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  app.add_option("--csv", o.csv, "write the rows as CSV to this file");
  if (with_json) app.add_option("--json", o.json, "write meta and rows as JSON to this file");
}

std::string Shape4::name() const {
  return std::to_string(n) + "x" + std::to_string(c) + "x" + std::to_string(h) + "x" +
         std::to_string(w);
}

std::string Shape3::name() const {
  return std::to_string(c) + "x" + std::to_string(h) + "x" + std::to_string(w);
}

std::vector<Shape4> resnet50_shapes(int64_t batch) {
  const int64_t chw[][3] = {{64, 112, 112}, {64, 56, 56},  {256, 56, 56}, {128, 56, 56},
                            {128, 28, 28},  {512, 28, 28}, {256, 28, 28}, {256, 14, 14},
                            {1024, 14, 14}, {512, 14, 14}, {512, 7, 7},   {2048, 7, 7}};
  std::vector<Shape4> shapes;
  for (const auto& s : chw) shapes.push_back({batch, s[0], s[1], s[2]});
  return shapes;
}

Shape4 parse_nchw(const std::string& s, const std::string& flag) {
  Shape4 sh;
  char tail = 0;
  if (std::sscanf(s.c_str(), "%" SCNd64 "x%" SCNd64 "x%" SCNd64 "x%" SCNd64 "%c", &sh.n, &sh.c,
                  &sh.h, &sh.w, &tail) != 4 ||
      sh.n < 1 || sh.c < 1 || sh.h < 1 || sh.w < 1) {
    throw CLI::ValidationError(flag, "expected NxCxHxW with positive sizes, got '" + s + "'");
  }
  return sh;
}

Shape3 parse_chw(const std::string& s, const std::string& flag) {
  Shape3 sh;
  char tail = 0;
  if (std::sscanf(s.c_str(), "%" SCNd64 "x%" SCNd64 "x%" SCNd64 "%c", &sh.c, &sh.h, &sh.w,
                  &tail) != 3 ||
      sh.c < 1 || sh.h < 1 || sh.w < 1) {
    throw CLI::ValidationError(flag, "expected CxHxW (per sample), got '" + s + "'");
  }
  return sh;
}

std::string canonical_dtype(const std::string& d) {
  if (d == "f32" || d == "fp32" || d == "float32") return "f32";
  if (d == "f64" || d == "fp64" || d == "float64") return "f64";
  if (d == "bf16" || d == "bfloat16") return "bf16";
  if (d == "f16" || d == "fp16" || d == "float16") return "f16";
  return "";
}

std::string canonical_layout(const std::string& l) {
  if (l == "nchw" || l == "channels_first") return "nchw";
  if (l == "nhwc" || l == "channels_last") return "nhwc";
  return "";
}

// ---- values -------------------------------------------------------------------------------------

std::string format_value(const Value& v, const std::string& na) {
  switch (v.kind) {
    case Value::Integer:
      return std::to_string(v.integer);
    case Value::Text:
      return v.text;
    case Value::Number:
      break;
  }
  if (std::isnan(v.number)) return na;
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.6g", v.number);
  return buf;
}

// ---- CSV and JSON -------------------------------------------------------------------------------

namespace {

std::string csv_cell(const Value& v, const std::string& na) {
  std::string s = format_value(v, na);
  if (v.kind == Value::Text) {
    for (char& ch : s) {
      if (ch == ',' || ch == '"' || ch == '\n' || ch == '\r') ch = ';';
    }
  }
  return s;
}

std::string json_value(const Value& v) {
  if (v.kind == Value::Text) return json_string(v.text);
  if (v.kind == Value::Number && !std::isfinite(v.number)) return "null";
  return format_value(v, "null");
}

}  // namespace

CsvWriter::CsvWriter(const std::string& path, Schema schema, std::string na)
    : out_(new std::ofstream(path)), schema_(std::move(schema)), na_(std::move(na)) {
  if (!*out_) {
    out_.reset();
    throw std::runtime_error("cannot write " + path);
  }
  for (std::size_t i = 0; i < schema_.size(); ++i) *out_ << (i ? "," : "") << schema_[i];
  *out_ << "\n" << std::flush;
}

void CsvWriter::write(const Record& r) {
  if (!out_) return;
  if (r.size() != schema_.size()) {
    throw std::logic_error("CSV record of " + std::to_string(r.size()) + " values, schema of " +
                           std::to_string(schema_.size()));
  }
  for (std::size_t i = 0; i < r.size(); ++i) *out_ << (i ? "," : "") << csv_cell(r[i], na_);
  *out_ << "\n" << std::flush;
}

void write_csv(const std::string& path, const Schema& schema, const std::vector<Record>& rows,
               const std::string& na) {
  CsvWriter w(path, schema, na);
  for (const Record& r : rows) w.write(r);
}

std::string json_string(const std::string& s) {
  std::string out = "\"";
  for (const char ch : s) {
    if (ch == '"' || ch == '\\') {
      out += '\\';
      out += ch;
    } else if (static_cast<unsigned char>(ch) < 0x20) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\u%04x", static_cast<unsigned>(ch));
      out += buf;
    } else {
      out += ch;
    }
  }
  return out + "\"";
}

void write_json(const std::string& path, const std::vector<std::pair<std::string, Value>>& meta,
                const Schema& schema, const std::vector<Record>& rows) {
  std::ofstream out(path);
  if (!out) throw std::runtime_error("cannot write " + path);
  out << "{\n  \"meta\": {";
  for (std::size_t i = 0; i < meta.size(); ++i) {
    const Value& v = meta[i].second;
    out << (i ? ", " : "") << json_string(meta[i].first) << ": "
        << (v.kind == Value::Text && v.text.empty() ? std::string("null") : json_value(v));
  }
  out << "},\n  \"results\": [";
  for (std::size_t i = 0; i < rows.size(); ++i) {
    if (rows[i].size() != schema.size()) throw std::logic_error("JSON record does not fit schema");
    out << (i ? ",\n    {" : "\n    {");
    for (std::size_t k = 0; k < schema.size(); ++k) {
      out << (k ? ", " : "") << json_string(schema[k]) << ": " << json_value(rows[i][k]);
    }
    out << "}";
  }
  out << "\n  ]\n}\n";
}

// ---- the table ----------------------------------------------------------------------------------

std::string cell(double v, int width, int precision) {
  width = std::max(1, std::min(width, 48));
  precision = std::max(0, std::min(precision, 12));
  char buf[128];
  if (std::isnan(v)) {
    std::snprintf(buf, sizeof buf, "%*s", width, "n/a");
    return buf;
  }
  for (int p = precision; p >= 0; --p) {
    if (std::snprintf(buf, sizeof buf, "%*.*f", width, p, v) <= width) return buf;
  }
  std::snprintf(buf, sizeof buf, "%*.*g", width, std::max(width - 6, 1), v);
  return buf;
}

namespace {

std::string pad(const std::string& s, int width, bool left) {
  const int n = static_cast<int>(s.size());
  if (n >= width) return s;
  const std::string fill(static_cast<std::size_t>(width - n), ' ');
  return left ? s + fill : fill + s;
}

std::string format_cell(const Column& c, const Value& v) {
  if (v.kind != Value::Number) return pad(format_value(v, "n/a"), c.width, c.left);
  if (c.scientific && !std::isnan(v.number)) {
    char buf[64];
    std::snprintf(buf, sizeof buf, "%*.*e", c.width, c.precision, v.number);
    return buf;
  }
  return cell(v.number, c.width, c.precision);
}

// What precedes a column: " |" if it starts a section, then its gap.
std::string before(const Column& c) {
  return (c.bar ? " |" : "") + std::string(static_cast<std::size_t>(c.gap), ' ');
}

// A group label centered in a run of dashes of the given width.
std::string group_label(const std::string& label, int width) {
  std::string s = " " + label + " ";
  if (static_cast<int>(s.size()) >= width) return pad(label, width, true);
  const int dashes = width - static_cast<int>(s.size());
  return std::string(static_cast<std::size_t>(dashes / 2), '-') + s +
         std::string(static_cast<std::size_t>(dashes - dashes / 2), '-');
}

}  // namespace

void Table::print_header() const {
  bool groups = false, units = false;
  for (const Column& c : cols_) {
    groups = groups || !c.group.empty();
    units = units || !c.unit.empty();
  }
  if (groups) {
    std::string g = "#";
    for (std::size_t i = 0; i < cols_.size();) {
      std::size_t j = i + 1;
      int width = cols_[i].width;
      while (!cols_[i].group.empty() && j < cols_.size() && cols_[j].group == cols_[i].group) {
        width += static_cast<int>(before(cols_[j]).size()) + cols_[j].width;
        ++j;
      }
      g += before(cols_[i]);
      if (cols_[i].group.empty()) {
        g += std::string(static_cast<std::size_t>(width), ' ');
      } else if (j == i + 1) {  // one column: the label alone, right-aligned
        g += pad(cols_[i].group, width, false);
      } else {
        g += group_label(cols_[i].group, width);
      }
      i = j;
    }
    while (!g.empty() && g.back() == ' ') g.pop_back();
    std::printf("%s\n", g.c_str());
  }
  std::string names = "#", unit_line = "#";
  for (const Column& c : cols_) {
    names += before(c) + pad(c.name, c.width, c.left);
    unit_line += before(c) + pad(c.unit, c.width, c.left);
  }
  while (!names.empty() && names.back() == ' ') names.pop_back();
  while (!unit_line.empty() && unit_line.back() == ' ') unit_line.pop_back();
  std::printf("%s\n", names.c_str());
  if (units) std::printf("%s\n", unit_line.c_str());
  std::fflush(stdout);
}

std::string Table::format_row(const Record& r) const {
  std::string line = " ";
  for (std::size_t i = 0; i < cols_.size(); ++i) {
    line += before(cols_[i]);
    line += i < r.size() ? format_cell(cols_[i], r[i]) : pad("", cols_[i].width, false);
  }
  while (!line.empty() && line.back() == ' ') line.pop_back();
  return line;
}

void Table::print_row(const Record& r) const {
  std::printf("%s\n", format_row(r).c_str());
  std::fflush(stdout);
}

void print_footer(const std::vector<std::string>& lines) {
  for (const auto& l : lines) std::printf("# %s\n", l.c_str());
  std::fflush(stdout);
}

// ---- machine ------------------------------------------------------------------------------------

std::string utc_now() {
  const std::time_t t = std::time(nullptr);
  std::tm tm{};
  gmtime_r(&t, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

std::string host_name() {
  char buf[256] = {};
  if (gethostname(buf, sizeof buf - 1) != 0) return "unknown";
  return buf;
}

namespace {

int64_t parse_cache_size(const std::string& s) {  // "32768K", "32M", "1048576"
  char* end = nullptr;
  const double v = std::strtod(s.c_str(), &end);
  if (end == s.c_str()) return 0;
  const char unit = *end;
  const double scale = unit == 'K'   ? 1024.0
                       : unit == 'M' ? 1048576.0
                       : unit == 'G' ? 1073741824.0
                                     : 1.0;
  return static_cast<int64_t>(v * scale);
}

}  // namespace

Llc last_level_cache() {
  Llc llc;
  int best_level = 0;
  for (int i = 0; i < 16; ++i) {
    const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(i) + "/";
    std::ifstream flevel(dir + "level"), ftype(dir + "type"), fsize(dir + "size");
    int level = 0;
    std::string type, size;
    if (!(flevel >> level) || !(ftype >> type) || !(fsize >> size)) continue;
    if (type == "Instruction" || level < best_level) continue;
    const int64_t bytes = parse_cache_size(size);
    if (bytes > 0) {
      best_level = level;
      llc = {bytes, "sysfs L" + std::to_string(level)};
    }
  }
  if (llc.bytes > 0) return llc;
#ifdef _SC_LEVEL3_CACHE_SIZE
  const long l3 = sysconf(_SC_LEVEL3_CACHE_SIZE);
  if (l3 > 0) return {l3, "sysconf L3"};
#endif
#ifdef _SC_LEVEL2_CACHE_SIZE
  const long l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);
  if (l2 > 0) return {l2, "sysconf L2"};
#endif
  return llc;
}

std::string cpu_model() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("model name", 0) == 0) {
      const auto colon = line.find(':');
      if (colon != std::string::npos) {
        std::string m = line.substr(colon + 1);
        m.erase(0, m.find_first_not_of(" \t"));
        return m;
      }
    }
  }
  return "unknown";
}

}  // namespace bench
