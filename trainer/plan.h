// `moba plan RECIPE [--set k=v]... [--write FILE]`: resolves a recipe without training, prints one JSON line
// with its size and cost (trainer/cost.h), and optionally writes the resolved recipe. Sweeps use it to size
// runs and to write one recipe per run; it never touches a run directory.
#pragma once
#include <string>
#include <vector>

namespace moba {

int plan_command(const std::vector<std::string>& args);

}  // namespace moba
