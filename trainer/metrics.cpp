#include "trainer/metrics.h"

#include <cmath>
#include <cstdio>
#include <filesystem>

#include "common/error.h"

namespace moba {

MetricsLog::MetricsLog(const std::string& path, int64_t resume_step) {
  if (resume_step >= 0 && std::filesystem::exists(path)) {
    std::ifstream in(path);
    std::vector<std::string> keep;
    for (std::string line; std::getline(in, line);) {
      size_t at = line.find("\"step\": ");
      if (at == std::string::npos) continue;
      long long step = std::atoll(line.c_str() + at + 8);
      if (step <= resume_step) keep.push_back(line);
    }
    in.close();
    std::ofstream rewrite(path, std::ios::trunc);
    for (const std::string& l : keep) rewrite << l << "\n";
  }
  out_.open(path, std::ios::app);
  MOBA_CHECK(out_.good(), cat("cannot open ", path, " for writing"), "check the run directory's permissions");
}

void MetricsLog::write(const std::vector<std::pair<std::string, std::string>>& fields) {
  std::string line = "{";
  for (size_t i = 0; i < fields.size(); ++i)
    line += (i ? ", " : "") + json_string(fields[i].first) + ": " + fields[i].second;
  out_ << line << "}\n";
  out_.flush();
}

std::string json_number(double v) {
  if (!std::isfinite(v)) return "null";
  char buf[64];
  for (int precision = 6; precision <= 17; ++precision) {  // shortest form that reads back exactly
    std::snprintf(buf, sizeof buf, "%.*g", precision, v);
    if (std::strtod(buf, nullptr) == v) break;
  }
  return buf;
}

std::string json_string(const std::string& s) {
  std::string out = "\"";
  for (char c : s) {
    if (c == '"' || c == '\\') out += '\\', out += c;
    else if (c == '\n') out += "\\n";
    else if (static_cast<unsigned char>(c) < 0x20) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\u%04x", c);
      out += buf;
    } else out += c;
  }
  return out + "\"";
}

}  // namespace moba
