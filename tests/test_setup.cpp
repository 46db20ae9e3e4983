// trainer/setup.h: the memory check that runs before anything is allocated, against the memory this machine
// really has (the CPU backend's available_bytes() is MemAvailable lowered by the cgroup limit).
#include <gtest/gtest.h>

#include "common/error.h"
#include "common/host_memory.h"
#include "kernels/backend.h"
#include "trainer/setup.h"

namespace moba {
namespace {

TEST(MemoryCheck, ComparesThePlanOfEveryRankOnTheMachineWithWhatIsAvailable) {
  std::unique_ptr<Backend> cpu = make_cpu_backend();
  const size_t available = cpu->available_bytes();
  ASSERT_GT(available, size_t{0}) << "the CPU backend reports no memory available";
  EXPECT_LE(available, host_available_bytes() + (size_t{64} << 20));  // the same reading, taken a moment apart

  MemoryPlan plan;
  plan.backend = {{"weights", available / 5}, {"activations", available / 5}};
  plan.host = {{"batches", available / 5}};  // on the CPU backend host buffers count against the same memory
  EXPECT_NO_THROW(check_memory_fits("a job", plan, *cpu, "lower --size", 1));
  try {
    check_memory_fits("a job", plan, *cpu, "lower --size", 2);  // 2 ranks x 3/5 of the machine
    FAIL() << "two ranks of 3/5 of the memory each passed";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("a job needs "), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find(" MiB on each of 2 ranks but this machine has "), std::string::npos) << e.what();
    EXPECT_EQ(e.hint(), "lower --size, or run fewer ranks per machine; the plan above shows where the memory goes");
  }
  plan.host.push_back({"more batches", available / 2});
  EXPECT_THROW(check_memory_fits("a job", plan, *cpu, "lower --size", 1), Error);
}

}  // namespace
}  // namespace moba
