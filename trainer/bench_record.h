// What every `moba bench` JSON line carries (date, commit, command) and how it is written: printed, and appended
// to --out when given. Shared by the attention, train and comm benchmarks.
#pragma once
#include <string>
#include <utility>
#include <vector>

namespace moba {

std::string today();  // UTC, YYYY-MM-DD
// The commit measured: $MOBA_COMMIT when set (the GPU machine's copy of the tree has no .git), else git's.
std::string git_commit();
// "moba bench SUB ARGS..." as typed.
std::string command_line(const std::string& sub, const std::vector<std::string>& args);
// One JSON line of (key, already-encoded value) pairs on stdout, appended to out_path too when not empty.
void emit(const std::vector<std::pair<std::string, std::string>>& fields, const std::string& out_path);
double median(std::vector<double> v);

}  // namespace moba
