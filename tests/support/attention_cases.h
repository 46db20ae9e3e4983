// The one op-test harness of the attention ops (kernels/attention.h): a table of cases (head dims, GQA/MQA, packed
// and empty documents, MoBA block sizes and top_k up to every block, ties, zigzag query subsets) that any backend
// runs against the float64 reference (kernels/cpu/attention.h). Tolerances are relative to a same-precision baseline
// (FlashAttention-3's criterion): a bf16 backend's error must stay within kBaselineFactor times the error of the
// reference itself with bf16 rounding at the points a bf16 kernel rounds (P, dS, the outputs), plus a small floor;
// an f32 backend's within fp32 rounding. Query subsets must give the whole sequence's rows (bit for bit on an f32
// backend) and partial dK/dV that sum to the whole.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "kernels/backend.h"

namespace moba::test {

struct AttentionCase {
  std::string name;
  std::vector<int32_t> cu_seqlens;  // documents of the key sequence
  int heads = 0, kv_heads = 0, head_dim = 0;
  int block_size = 0, top_k = 0;    // top_k 0: dense causal attention, else MoBA
  int cp_ranks = 0;                 // > 0: also every rank's zigzag query rows (2 * cp_ranks chunks must divide N)
  bool duplicate_blocks = false;    // every block of a document holds the same keys: all gate scores tie
  double min_agreement = 0.999;     // MoBA routing rows equal to the CPU router's (1.0 for the exact router)
  int64_t tokens() const { return cu_seqlens.back(); }
  // Multiply-adds of one forward (attended pairs x heads x head dim, an upper bound): the cost the CPU backend skips
  // cases by (kCpuCostLimit) so CI stays fast; the GPU runs every case.
  double cost() const;
};

inline constexpr double kBaselineFactor = 3.0;
inline constexpr double kCpuCostLimit = 3.1e8;

// Every case of the table.
const std::vector<AttentionCase>& attention_cases();

// Runs one case on `be` with gtest expectations (routing agreement, errors against the reference, query subsets) and
// prints one line of errors per part.
void check_attention_case(Backend& be, const AttentionCase& c, const AttentionKernelSettings& settings = {});

}  // namespace moba::test
