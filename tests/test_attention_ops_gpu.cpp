// The attention op-test harness (tests/support/attention_cases.h) on the CUDA backend: every case of the table
// against the float64 reference within kBaselineFactor x the bf16 baseline's error, query subsets within the same
// noise; then the kernel settings that change the code path: query chunks of a small entry budget, the deterministic
// backward (MoBA and dense), and the mma.sync dK/dV kernel forced on sm_90.
#include <gtest/gtest.h>

#include "tests/support/attention_cases.h"
#include "tests/support/test_util.h"

namespace moba {
namespace {

const test::AttentionCase& find_case(const std::string& name) {
  for (const test::AttentionCase& c : test::attention_cases())
    if (c.name == name) return c;
  throw std::runtime_error("no attention case " + name);
}

TEST(AttentionOpsGpu, EveryCaseMatchesTheReference) {
  MOBA_REQUIRE_GPU();
  const std::unique_ptr<Backend> gpu = make_backend("cuda");
  for (const test::AttentionCase& c : test::attention_cases()) test::check_attention_case(*gpu, c);
}

TEST(AttentionOpsGpu, KernelSettingsMatchTheReference) {
  MOBA_REQUIRE_GPU();
  const std::unique_ptr<Backend> gpu = make_backend("cuda");
  AttentionKernelSettings chunks;  // 1 MiB: the forward partials and dQ parts in 64-row chunks
  chunks.entry_budget_bytes = int64_t{1} << 20;
  AttentionKernelSettings deterministic;
  deterministic.deterministic = true;
  AttentionKernelSettings mma;
  mma.moba_dkv_kernel = AttentionKernelSettings::MobaDkvKernel::mma_sync;
  AttentionKernelSettings deterministic_chunks = chunks;
  deterministic_chunks.deterministic = true;
  for (const char* name : {"moba_packed_empty_documents", "moba_gqa_g4", "moba_k40_b16_many_blocks",
                           "cp_moba_mqa_b128_k4"}) {
    SCOPED_TRACE(name);
    for (const AttentionKernelSettings& s : {chunks, deterministic, mma, deterministic_chunks})
      test::check_attention_case(*gpu, find_case(name), s);
  }
  // The dense backward's deterministic dQ (causal_dq_ordered): head dims 32 and 128 (padded 64 and 128), GQA,
  // documents packed and short, query subsets of context-parallel ranks.
  for (const char* name : {"dense_d32", "dense_long_packed_gqa", "dense_80_short_documents_d128",
                           "cp_dense_gqa4_d128"}) {
    SCOPED_TRACE(name);
    test::check_attention_case(*gpu, find_case(name), deterministic);
  }
}

}  // namespace
}  // namespace moba
