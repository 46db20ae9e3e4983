#include "trainer/bench_record.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <fstream>

#include "common/log.h"
#include "trainer/metrics.h"

namespace moba {

std::string today() {
  std::time_t t = std::time(nullptr);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%d", std::gmtime(&t));
  return buf;
}

std::string git_commit() {
  if (const char* env = std::getenv("MOBA_COMMIT"); env && *env) return env;
  FILE* p = popen("git rev-parse --short HEAD 2>/dev/null", "r");
  if (!p) return "unknown";
  char buf[64] = {0};
  if (!std::fgets(buf, sizeof buf, p)) buf[0] = 0;
  pclose(p);
  std::string s(buf);
  while (!s.empty() && (s.back() == '\n' || s.back() == '\r')) s.pop_back();
  return s.empty() ? "unknown" : s;
}

std::string command_line(const std::string& sub, const std::vector<std::string>& args) {
  std::string s = "moba bench " + sub;
  for (const std::string& a : args) s += " " + a;
  return s;
}

void emit(const std::vector<std::pair<std::string, std::string>>& fields, const std::string& out_path) {
  std::string line = "{";
  for (size_t i = 0; i < fields.size(); ++i) line += (i ? ", " : "") + json_string(fields[i].first) + ": " + fields[i].second;
  line += "}";
  std::printf("%s\n", line.c_str());
  std::fflush(stdout);
  if (!out_path.empty()) {
    std::ofstream out(out_path, std::ios::app);
    MOBA_CHECK(out.good(), cat("cannot append to ", out_path), "check the directory exists and is writable");
    out << line << "\n";
  }
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? NAN : v[v.size() / 2];
}

}  // namespace moba
