// metrics.jsonl: one JSON object per line (training steps, validation, phase changes), appended and
// flushed as the run goes. On resume, lines after the resumed step are dropped so the file reads as if the
// run had never been interrupted.
#pragma once
#include <cstdint>
#include <fstream>
#include <string>
#include <utility>
#include <vector>

namespace moba {

class MetricsLog {
 public:
  // Opens <path> for appending; when resume_step >= 0 first removes lines whose "step" exceeds it.
  MetricsLog(const std::string& path, int64_t resume_step);
  // Writes {"k1": v1, ...}; values are already JSON (numbers or quoted strings).
  void write(const std::vector<std::pair<std::string, std::string>>& fields);

 private:
  std::ofstream out_;
};

std::string json_number(double v);       // shortest round-trip representation (%.17g trimmed); null for NaN
std::string json_string(const std::string& s);

}  // namespace moba
