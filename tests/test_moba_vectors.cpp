// MoBA CPU kernels against the test vectors pinned to the official implementation (../shared/data/moba-vectors.h5):
// routing agreement and O/LSE/dQ/dK/dV errors per case, and the `moba check-vectors` command end to end.
// Invariant: the tolerances are check_vectors.h's defaults, the same numbers the command enforces.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>

#include "common/error.h"
#include "common/hdf5_io.h"
#include "kernels/check_vectors.h"
#include "tests/support/test_util.h"

namespace moba {
namespace {

const char* kVectorFile = "moba-vectors.h5";
const char* kExpectedCases[] = {"gqa_8q_2kv",         "k1_current_block_only", "k_above_block_count", "mqa_4q_1kv",
                                "n_less_than_block", "packed_docs",           "single_doc"};

TEST(MobaVectors, EveryCaseWithinFp32Tolerances) {
  const std::string path = test::shared_data(kVectorFile);
  MOBA_REQUIRE_SHARED(path);
  const h5::File file = h5::File::open_read(path);
  const std::vector<std::string> cases = vector_case_names(file);
  for (const char* name : kExpectedCases)
    EXPECT_NE(std::find(cases.begin(), cases.end(), name), cases.end()) << "missing case " << name;
  const VectorTolerances tol;
  const std::unique_ptr<Backend> cpu = make_cpu_backend();
  for (const std::string& name : cases) {
    SCOPED_TRACE(name);
    const VectorCaseResult r = check_vector_case(*cpu, file, name);
    std::printf("%-22s selection %.6f  o %.2e lse %.2e dq %.2e dk %.2e dv %.2e\n", name.c_str(),
                r.selection_agreement, r.over_expected.o, r.over_expected.lse, r.over_expected.dq,
                r.over_expected.dk, r.over_expected.dv);
    EXPECT_GE(r.selection_agreement, tol.min_selection_agreement);
    EXPECT_LE(r.over_expected.o, tol.o);
    EXPECT_LE(r.over_expected.lse, tol.lse);
    EXPECT_LE(r.over_expected.dq, tol.grad);
    EXPECT_LE(r.over_expected.dk, tol.grad);
    EXPECT_LE(r.over_expected.dv, tol.grad);
    EXPECT_TRUE(vector_case_failures(r, tol).empty());
  }
}

TEST(MobaVectors, CheckVectorsCommandPasses) {
  const std::string path = test::shared_data(kVectorFile);
  MOBA_REQUIRE_SHARED(path);
  EXPECT_EQ(check_vectors_command({path}), 0);
  EXPECT_EQ(check_vectors_command({path, "--cases", "single_doc,k1_current_block_only", "--backend=cpu"}), 0);
}

TEST(MobaVectors, CheckVectorsCommandFailsOnImpossibleTolerance) {
  const std::string path = test::shared_data(kVectorFile);
  MOBA_REQUIRE_SHARED(path);
  EXPECT_EQ(check_vectors_command({path, "--cases", "n_less_than_block", "--tol-grad", "1e-12"}), 1);
}

TEST(MobaVectors, CheckVectorsCommandErrors) {
  EXPECT_EQ(check_vectors_command({"--help"}), 0);
  if (test::gpu_available())  // with a GPU the backend starts and the missing file is the error
    EXPECT_THROW(check_vectors_command({"whatever.h5", "--backend", "cuda"}), Error);
  else  // without one, the command says the backend is unavailable (exit 2)
    EXPECT_EQ(check_vectors_command({"whatever.h5", "--backend", "cuda"}), 2);
  EXPECT_THROW(check_vectors_command({"whatever.h5", "--backend", "tpu"}), Error);
  EXPECT_THROW(check_vectors_command({"/nonexistent/moba-vectors.h5"}), Error);

  // A valid HDF5 file without the expected datasets.
  const std::string dir = test::scratch_dir("check_vectors");
  {
    h5::File bad = h5::File::create(dir + "/bad.h5");
    bad.create_group("single_doc");
    bad.write("single_doc/q", std::vector<float>(8, 0.0f));
  }
  try {
    check_vectors_command({dir + "/bad.h5"});
    ADD_FAILURE() << "expected moba::Error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("has no dataset 'k'"), std::string::npos) << e.what();
  }
  {
    h5::File empty = h5::File::create(dir + "/empty.h5");
  }
  EXPECT_THROW(check_vectors_command({dir + "/empty.h5"}), Error);

  const std::string path = test::shared_data(kVectorFile);
  MOBA_REQUIRE_SHARED(path);
  EXPECT_THROW(check_vectors_command({path, "--cases", "no_such_case"}), Error);
}

}  // namespace
}  // namespace moba
