// Linear-layer matmuls through cuBLASLt: bf16 operands, f32 accumulation (CUBLAS_COMPUTE_32F). A row-major (R, C)
// matrix is a column-major (C, R) one, so each row-major product maps to one column-major GEMM (as in llm.c).
// Invariant: one cached plan (descriptors + heuristic algorithm) per (product, shape, pointer alignment);
// backward products accumulate (beta = 1) into dinp (bf16) and dweight (f32).
#include <mutex>
#include <unordered_map>

#include "kernels/cuda/ops.h"

namespace moba::cuda {
namespace {

enum class Product : int { forward, backward_input, backward_weight };

// D (m, n), column-major with leading dimension m, = op(A) (m, k) @ op(B) (k, n) [+ D].
struct GemmShape {
  Product product;
  int64_t m, n, k;
  bool transpose_a, transpose_b;
  int64_t lda, ldb;
  cudaDataType_t d_type;
};

// Largest power of two (at most 256) dividing the address: cuBLASLt assumes 256-byte alignment unless told.
int alignment_of(const void* p) {
  const auto address = reinterpret_cast<uintptr_t>(p);
  int align = 256;
  while (align > 1 && (address & (align - 1)) != 0) align /= 2;
  return align;
}

struct PlanKey {
  int product;
  int64_t m, n, k;
  int align_a, align_b, align_d;
  bool operator==(const PlanKey&) const = default;
};
struct PlanKeyHash {
  size_t operator()(const PlanKey& key) const {
    size_t h = static_cast<size_t>(key.product);
    for (int64_t v : {key.m, key.n, key.k, int64_t{key.align_a}, int64_t{key.align_b}, int64_t{key.align_d}})
      h = h * 1000003u ^ static_cast<size_t>(v);
    return h;
  }
};

// Descriptors and the algorithm picked by the heuristic for one GEMM; lives until the process ends.
struct Plan {
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, d = nullptr;  // d also describes C (C == D)
  cublasLtMatmulAlgo_t algo{};
  Plan() = default;
  Plan(const Plan&) = delete;
  Plan& operator=(const Plan&) = delete;
  ~Plan() {
    if (d) cublasLtMatrixLayoutDestroy(d);
    if (b) cublasLtMatrixLayoutDestroy(b);
    if (a) cublasLtMatrixLayoutDestroy(a);
    if (desc) cublasLtMatmulDescDestroy(desc);
  }
};

std::unique_ptr<Plan> make_plan(const CudaContext& ctx, const GemmShape& s, const PlanKey& key) {
  auto plan = std::make_unique<Plan>();
  MOBA_CUBLAS_CHECK(cublasLtMatmulDescCreate(&plan->desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  const cublasOperation_t op_a = s.transpose_a ? CUBLAS_OP_T : CUBLAS_OP_N;
  const cublasOperation_t op_b = s.transpose_b ? CUBLAS_OP_T : CUBLAS_OP_N;
  MOBA_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_TRANSA, &op_a, sizeof(op_a)));
  MOBA_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_TRANSB, &op_b, sizeof(op_b)));
  // Layouts describe the matrices as stored (before op): A is (k, m) when transposed, B is (n, k).
  MOBA_CUBLAS_CHECK(
      cublasLtMatrixLayoutCreate(&plan->a, CUDA_R_16BF, s.transpose_a ? s.k : s.m, s.transpose_a ? s.m : s.k, s.lda));
  MOBA_CUBLAS_CHECK(
      cublasLtMatrixLayoutCreate(&plan->b, CUDA_R_16BF, s.transpose_b ? s.n : s.k, s.transpose_b ? s.k : s.n, s.ldb));
  MOBA_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&plan->d, s.d_type, s.m, s.n, s.m));

  cublasLtMatmulPreference_t preference = nullptr;
  MOBA_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&preference));
  const uint64_t workspace_bytes = ctx.workspace_bytes;
  const uint32_t align_a = key.align_a, align_b = key.align_b, align_d = key.align_d;
  MOBA_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(preference, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                         &workspace_bytes, sizeof(workspace_bytes)));
  MOBA_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(preference, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
                                                         &align_a, sizeof(align_a)));
  MOBA_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(preference, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                                                         &align_b, sizeof(align_b)));
  MOBA_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(preference, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
                                                         &align_d, sizeof(align_d)));
  MOBA_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(preference, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
                                                         &align_d, sizeof(align_d)));
  cublasLtMatmulHeuristicResult_t heuristic{};
  int found = 0;
  const cublasStatus_t status = cublasLtMatmulAlgoGetHeuristic(ctx.lt, plan->desc, plan->a, plan->b, plan->d, plan->d,
                                                               preference, 1, &heuristic, &found);
  cublasLtMatmulPreferenceDestroy(preference);
  MOBA_CUBLAS_CHECK(status);
  MOBA_CHECK(found > 0,
             cat("cuBLASLt found no algorithm for the matmul (m=", s.m, ", n=", s.n, ", k=", s.k, ", alignments ",
                 key.align_a, "/", key.align_b, "/", key.align_d, " bytes)"),
             "this is a bug in the GEMM setup (shapes, layouts or alignment)");
  plan->algo = heuristic.algo;
  return plan;
}

// Runs D = op(A) @ op(B) + beta * D on ctx.stream with a cached plan.
void gemm(const CudaContext& ctx, const GemmShape& s, void* d, const bf16* a, const bf16* b, float beta) {
  static std::mutex mutex;
  static std::unordered_map<PlanKey, std::unique_ptr<Plan>, PlanKeyHash> plans;
  const PlanKey key{static_cast<int>(s.product), s.m, s.n, s.k, alignment_of(a), alignment_of(b), alignment_of(d)};
  const Plan* plan;
  {
    std::lock_guard<std::mutex> lock(mutex);
    std::unique_ptr<Plan>& slot = plans[key];
    if (!slot) slot = make_plan(ctx, s, key);
    plan = slot.get();
  }
  const float alpha = 1.0f;
  MOBA_CUBLAS_CHECK(cublasLtMatmul(ctx.lt, plan->desc, &alpha, a, plan->a, b, plan->b, &beta, d, plan->d, d, plan->d,
                                   &plan->algo, ctx.workspace, ctx.workspace_bytes, ctx.stream));
}

}  // namespace

// out (N, OC) = inp (N, IC) @ weight (OC, IC)^T.  Column-major: out^T (OC, N) = W^T(stored (IC, OC))^T @ inp^T (IC, N).
void matmul_forward(const CudaContext& ctx, bf16* out, const bf16* inp, const bf16* weight, int64_t N, int IC, int OC) {
  if (N == 0 || OC == 0) return;
  const GemmShape s{Product::forward, OC, N, IC, /*transpose_a=*/true, /*transpose_b=*/false, IC, IC, CUDA_R_16BF};
  gemm(ctx, s, out, weight, inp, /*beta=*/0.0f);
}

// dinp (N, IC) += dout (N, OC) @ weight (OC, IC):  dinp^T (IC, N) += W^T (stored (IC, OC)) @ dout^T (OC, N).
// dweight (OC, IC) += dout^T @ inp:                 dweight^T (IC, OC) += inp^T (IC, N) @ dout (stored (OC, N))^T.
void matmul_backward(const CudaContext& ctx, bf16* dinp, float* dweight, const bf16* dout, const bf16* inp,
                     const bf16* weight, int64_t N, int IC, int OC, bool accumulate) {
  if (N == 0) return;
  if (dinp != nullptr) {
    const GemmShape s{Product::backward_input, IC, N, OC, false, false, IC, OC, CUDA_R_16BF};
    gemm(ctx, s, dinp, weight, dout, /*beta=*/accumulate ? 1.0f : 0.0f);  // beta 0: dinp is not read
  }
  if (dweight != nullptr) {
    const GemmShape s{Product::backward_weight, IC, OC, N, false, true, IC, OC, CUDA_R_32F};
    gemm(ctx, s, dweight, inp, dout, /*beta=*/1.0f);
  }
}

}  // namespace moba::cuda
