// `moba bench comm`: the collectives training uses (all-reduce, reduce-scatter, all-gather of f32 tensors over
// the world group), each checked once for the right sums and then timed at several sizes, reported as JSON lines
// with algorithm and bus bandwidth. Bus bandwidth follows nccl-tests' convention (see bench_comm.cpp), so the
// figure compares across rank counts and with the link's peak.
#pragma once
#include <string>
#include <vector>

namespace moba {
namespace parallel { class MpiContext; }

int bench_comm(const std::vector<std::string>& args, parallel::MpiContext& mpi);

}  // namespace moba
