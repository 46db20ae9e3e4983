// `moba check-vectors FILE.h5`: runs MoBA routing, forward and backward on every case of a test-vector file
// (../shared/data/moba-vectors.h5 layout, see ../shared/data/README.md) and compares with the stored results.
// Invariant: numeric errors are measured over the file's own (expected) selection, so a rare near-tie flip in the
// routing shows up in the selection agreement only; errors over our own selection are reported beside them.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "common/hdf5_io.h"
#include "kernels/backend.h"

namespace moba {

// Default acceptance thresholds for the fp32 CPU backend (relative L2 against the float64 results, which are
// stored as float32). Measured on moba-vectors.h5 (all 7 cases): o <= 3.5e-7, lse <= 6.2e-8, dq <= 4.4e-7,
// dk/dv <= 1.4e-6 (gqa_8q_2kv, the longest sums); the defaults leave ~6x headroom for summation-order changes.
struct VectorTolerances {
  double o = 2e-6;
  double lse = 1e-6;
  double grad = 1e-5;
  double min_selection_agreement = 0.999;
};

// Relative L2 errors ||ours - expected|| / ||expected|| of one forward + backward.
struct AttentionErrors {
  double o = 0, lse = 0, dq = 0, dk = 0, dv = 0;
};

struct VectorCaseResult {
  std::string name;
  int64_t tokens = 0;
  int segments = 0, heads = 0, kv_heads = 0, head_dim = 0, block_size = 0, top_k = 0;
  int64_t rows = 0, rows_agreeing = 0;  // (t, h) rows; those whose selected set equals the expected one
  double selection_agreement = 0;       // rows_agreeing / rows
  AttentionErrors over_expected;        // computed over the file's selected_blocks
  AttentionErrors over_own;             // computed over moba_select_blocks' selection
};

// Case groups of a vector file (every child of the root), sorted.
std::vector<std::string> vector_case_names(const h5::File& file);
// Runs one case on `be` (the CPU backend, or CUDA). Throws moba::Error naming the file and case when a dataset or
// attribute is missing or its shape disagrees with the attributes.
VectorCaseResult check_vector_case(Backend& be, const h5::File& file, const std::string& case_name);
// Empty when the case passes, otherwise one line per exceeded tolerance.
std::vector<std::string> vector_case_failures(const VectorCaseResult& result, const VectorTolerances& tolerances);

// `moba check-vectors FILE.h5 [--backend cpu|cuda] [--cases a,b] [--tol-o X] [--tol-lse X] [--tol-grad X]
// [--min-selection-agreement X]`. args exclude the subcommand name. Returns 0 when every case passes (or for
// --help), 1 when a tolerance is exceeded, 2 when the backend is unavailable; throws moba::Error on bad input.
int check_vectors_command(const std::vector<std::string>& args);

}  // namespace moba
