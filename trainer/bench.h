// `moba bench attention ...` and `moba bench train --recipe R`: medians of timed runs after warm-up (CUDA
// events on the GPU), printed as JSON lines with date, commit, device and command, optionally appended to a
// file under bench/results/. FLOP conventions are stated in the records (see README "Performance").
#pragma once
#include <string>
#include <vector>

namespace moba {
namespace parallel { class MpiContext; }

int bench_command(const std::vector<std::string>& args, parallel::MpiContext& mpi);

}  // namespace moba
