// The attention op-test harness (tests/support/attention_cases.h) on the CPU reference backend: every case of the
// table cheap enough for CI (AttentionCase::cost below kCpuCostLimit) against the float64 reference, query subsets
// bit for bit. The CUDA backend runs the whole table in test_attention_ops_gpu.cpp.
#include <gtest/gtest.h>

#include "tests/support/attention_cases.h"

namespace moba {
namespace {

TEST(AttentionOps, CpuBackendMatchesTheReference) {
  const std::unique_ptr<Backend> cpu = make_cpu_backend();
  int ran = 0;
  for (const test::AttentionCase& c : test::attention_cases()) {
    if (c.cost() > test::kCpuCostLimit) continue;
    test::check_attention_case(*cpu, c);
    ++ran;
  }
  std::printf("%d of %zu cases on the CPU backend\n", ran, test::attention_cases().size());
  EXPECT_GE(ran, 20);
}

}  // namespace
}  // namespace moba
