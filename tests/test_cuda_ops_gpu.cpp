// The dense CUDA ops (kernels/cuda/ops.h, through the CUDA backend) against the CPU reference (kernels/cpu/ops.h)
// on identical bf16-exact inputs: every forward and backward, accumulate (+=) semantics from random starting
// gradients, strided RoPE rows, cross-entropy masks with zeros, matmul at odd and large shapes, the packed (16-byte)
// and scalar kernel paths; plus a matmul TFLOP/s line (CUDA events, median of 20; printed, not asserted).
//
// Tolerances, relative L2 error against the CPU's f32 result (every measured value is printed as "[ rel-L2 ]"):
//   kBf16: bf16 outputs. One round-to-nearest of each output gives ~2e-3 RMS relative error; we allow 1e-2.
//   kF32: f32 outputs computed from the same bf16 inputs (weight gradients, rstd, AdamW state, losses). Only the
//         summation order differs from the CPU (which sums some reductions in double): ~1e-6 expected, 1e-3 allowed.
// Measured on an H200 (2026-11-23): bf16 outputs 1.1e-3 to 2.2e-3; f32 outputs 1e-8 to 3e-6; losses 3e-8;
// sum_of_squares 3e-14. GEMMs of the 545M training step (MatmulTflops, 2026-11-23): 716-803 TFLOP/s forward,
// 711-813 dinp, 600-784 dweight (f32 +=).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "kernels/backend.h"
#include "kernels/cuda/ops.h"
#include "kernels/cuda/timing.h"
#include "tests/support/test_util.h"

namespace moba {
namespace {

using test::random_vector;
using Shape = std::initializer_list<int64_t>;

constexpr double kBf16 = 1e-2;
constexpr double kF32 = 1e-3;

// Random values in [lo, hi) rounded to bf16, so both backends start from exactly the same numbers.
std::vector<float> random_bf16(size_t n, uint64_t seed, float lo = -1.0f, float hi = 1.0f) {
  std::vector<float> v = random_vector(n, seed, lo, hi);
  test::round_to_bf16(v);
  return v;
}

std::vector<int32_t> random_ints(size_t n, uint64_t seed, int32_t below) {
  std::mt19937_64 rng(seed);
  std::vector<int32_t> v(n);
  for (int32_t& x : v) x = static_cast<int32_t>(rng() % static_cast<uint64_t>(below));
  return v;
}

// Prints the relative L2 error (and the largest elementwise error relative to max |want|) and checks the tolerance.
void expect_close(const std::vector<float>& got, const std::vector<float>& want, double tolerance,
                  const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  const double err = test::rel_l2(got.data(), want.data(), got.size());
  double max_diff = 0.0, max_want = 0.0;
  for (size_t i = 0; i < got.size(); ++i) {
    max_diff = std::max(max_diff, std::abs(static_cast<double>(got[i]) - want[i]));
    max_want = std::max(max_want, std::abs(static_cast<double>(want[i])));
  }
  std::printf("[ rel-L2   ] %-44s %.2e  (max elementwise %.2e, tolerance %.0e)\n", what.c_str(), err,
              max_diff / std::max(max_want, 1e-30), tolerance);
  EXPECT_LT(err, tolerance) << what;  // NaN fails too
}

// The CPU reference and the CUDA backend side by side; tensors made here are released at the end of the test.
class Backends {
 public:
  Backends() : cpu(make_cpu_backend()), gpu(make_cuda_backend()) {}
  ~Backends() {
    for (auto& [backend, t] : owned_) backend->release(t);
  }
  Backends(const Backends&) = delete;
  Backends& operator=(const Backends&) = delete;

  Tensor empty(Backend& b, DType dtype, Shape shape) {
    owned_.push_back({&b, b.allocate(dtype, shape)});
    return owned_.back().second;
  }
  // values as dtype (f32 or bf16; bf16 values must be bf16-exact) on backend b.
  Tensor floats(Backend& b, DType dtype, const std::vector<float>& values, Shape shape) {
    Tensor t = empty(b, dtype, shape);
    EXPECT_EQ(static_cast<size_t>(t.numel()), values.size());
    if (dtype == DType::f32) {
      b.upload(t, values.data());
    } else {
      std::vector<uint16_t> bits(values.size());
      size_t inexact = 0;
      for (size_t i = 0; i < values.size(); ++i) {
        uint32_t u;
        std::memcpy(&u, &values[i], 4);
        inexact += (u & 0xFFFFu) != 0;
        bits[i] = static_cast<uint16_t>(u >> 16);
      }
      EXPECT_EQ(inexact, 0u) << "values given as bf16 must be bf16-exact (round them with test::round_to_bf16)";
      b.upload(t, bits.data());
    }
    return t;
  }
  // An activation-typed tensor: f32 on the CPU, bf16 on the GPU.
  Tensor activation(Backend& b, const std::vector<float>& values, Shape shape) {
    return floats(b, b.activation_dtype(), values, shape);
  }
  template <typename T>
  Tensor ints(Backend& b, DType dtype, const std::vector<T>& values, Shape shape) {
    Tensor t = empty(b, dtype, shape);
    b.upload(t, values.data());
    return t;
  }
  // A contiguous f32 or bf16 tensor's values as f32.
  std::vector<float> read(Backend& b, const Tensor& t) {
    std::vector<float> out(static_cast<size_t>(t.numel()));
    if (t.dtype == DType::f32) {
      b.download(out.data(), t);
    } else {
      std::vector<uint16_t> bits(out.size());
      b.download(bits.data(), t);
      for (size_t i = 0; i < out.size(); ++i) {
        const uint32_t u = static_cast<uint32_t>(bits[i]) << 16;
        std::memcpy(&out[i], &u, 4);
      }
    }
    return out;
  }

  std::unique_ptr<Backend> cpu, gpu;

 private:
  std::vector<std::pair<Backend*, Tensor>> owned_;
};

// ---- embedding -----------------------------------------------------------------------------------------------

TEST(CudaOps, EmbeddingGathersAndScatterAdds) {
  MOBA_REQUIRE_GPU();
  Backends be;
  const int64_t N = 300;
  const int V = 97;          // many repeated ids among 300 tokens
  for (int C : {768, 35}) {  // 16-byte and 2-byte chunks
    const std::string tag = " C=" + std::to_string(C);
    const std::vector<int32_t> tokens = random_ints(N, 1, V);
    const std::vector<float> wte = random_bf16(static_cast<size_t>(V) * C, 2);
    const std::vector<float> dout = random_bf16(N * C, 3);
    const std::vector<float> dwte0 = random_vector(static_cast<size_t>(V) * C, 4);
    std::vector<float> out[2], dwte[2];
    for (int side = 0; side < 2; ++side) {
      Backend& b = side == 0 ? *be.cpu : *be.gpu;
      Tensor tok = be.ints(b, DType::i32, tokens, {N});
      Tensor w = be.activation(b, wte, {V, C});
      Tensor o = be.empty(b, b.activation_dtype(), {N, C});
      b.gather_rows(o, w, tok);
      Tensor dw = be.floats(b, DType::f32, dwte0, {V, C});
      b.embedding_backward(dw, be.activation(b, dout, {N, C}), tok);
      out[side] = be.read(b, o);
      dwte[side] = be.read(b, dw);
    }
    EXPECT_EQ(out[1], out[0]) << "gather_rows (the embedding lookup) is a copy" << tag;
    expect_close(dwte[1], dwte[0], kF32, "embedding_backward dwte (+=)" + tag);
  }
}

// Context parallelism reorders f32 key gradients and bf16 keys with the same op: rows of any width and dtype.
TEST(CudaOps, GatherRowsReordersF32Rows) {
  MOBA_REQUIRE_GPU();
  Backends be;
  const int64_t M = 257, N = 300;
  for (int C : {1024, 35}) {  // 16-byte chunks, and 4-byte rows that are not
    const std::vector<int32_t> rows = random_ints(N, 5, static_cast<int>(M));
    const std::vector<float> src = random_vector(static_cast<size_t>(M) * C, 6);
    std::vector<float> got[2];
    for (int side = 0; side < 2; ++side) {
      Backend& b = side == 0 ? *be.cpu : *be.gpu;
      Tensor o = be.empty(b, DType::f32, {N, C});
      b.gather_rows(o, be.floats(b, DType::f32, src, {M, C}), be.ints(b, DType::i32, rows, {N}));
      got[side] = be.read(b, o);
    }
    EXPECT_EQ(got[1], got[0]) << "C=" << C;
  }
}

// ---- rmsnorm -------------------------------------------------------------------------------------------------

TEST(CudaOps, RmsnormForwardAndBackward) {
  MOBA_REQUIRE_GPU();
  Backends be;
  const int64_t N = 257;
  const float eps = 1e-5f;
  for (int C : {1792, 100}) {
    const std::string tag = " C=" + std::to_string(C);
    const std::vector<float> inp = random_bf16(N * C, 10, -2.0f, 2.0f);
    const std::vector<float> weight = random_bf16(C, 11, 0.5f, 1.5f);
    const std::vector<float> dout = random_bf16(N * C, 12);
    const std::vector<float> dinp0 = random_bf16(N * C, 13);
    const std::vector<float> dweight0 = random_vector(C, 14);
    std::vector<float> out[2], rstd[2], dinp[2], dweight[2];
    std::vector<float> cpu_rstd;
    for (int side = 0; side < 2; ++side) {
      Backend& b = side == 0 ? *be.cpu : *be.gpu;
      Tensor x = be.activation(b, inp, {N, C}), w = be.activation(b, weight, {C});
      Tensor y = be.empty(b, b.activation_dtype(), {N, C}), r = be.empty(b, DType::f32, {N});
      b.rmsnorm_forward(y, r, x, w, eps);
      out[side] = be.read(b, y);
      rstd[side] = be.read(b, r);
      if (side == 0) cpu_rstd = rstd[0];
      // Backward from the same rstd on both sides, into random starting gradients.
      Tensor dx = be.activation(b, dinp0, {N, C});
      Tensor dw = be.floats(b, DType::f32, dweight0, {C});
      b.rmsnorm_backward(dx, dw, be.activation(b, dout, {N, C}), x, w, be.floats(b, DType::f32, cpu_rstd, {N}));
      dinp[side] = be.read(b, dx);
      dweight[side] = be.read(b, dw);
    }
    expect_close(out[1], out[0], kBf16, "rmsnorm_forward out" + tag);
    expect_close(rstd[1], rstd[0], kF32, "rmsnorm_forward rstd" + tag);
    expect_close(dinp[1], dinp[0], kBf16, "rmsnorm_backward dinp (+=)" + tag);
    expect_close(dweight[1], dweight[0], kF32, "rmsnorm_backward dweight (+=)" + tag);
  }
}

// ---- deterministic backward (BackendSettings::deterministic) -------------------------------------------------

// Bitwise equality of two f32 results (NaN-safe: compares the bits).
bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

// The ordered embedding backward: bitwise equal over two calls, equal to the CPU and to the atomic path to f32
// rounding, and bitwise equal to the CPU for every token whose sorted positions fit one 128-position piece (the same
// f32 adds in the same order). A hot token (80% of the positions: 19 pieces of one id, as the space byte of byte-level
// text) and N, C not multiples of any tile; 16-byte and scalar column paths.
TEST(CudaOps, DeterministicEmbeddingBackward) {
  MOBA_REQUIRE_GPU();
  const std::unique_ptr<Backend> ordered = make_cuda_backend(0, {OpProfile::off, true});
  Backends be;  // after `ordered`, so its tensors are released first
  const int64_t N = 3001;
  const int V = 300, kHot = 32;
  std::vector<int32_t> tokens = random_ints(N, 21, V);
  std::mt19937_64 rng(22);
  for (int32_t& t : tokens)
    if (rng() % 5 != 0) t = kHot;
  for (int C : {1000, 35}) {
    const std::string tag = " C=" + std::to_string(C);
    const std::vector<float> dout = random_bf16(N * C, 23);
    const std::vector<float> dwte0 = random_vector(static_cast<size_t>(V) * C, 24);
    auto run = [&](Backend& b) {
      Tensor dw = be.floats(b, DType::f32, dwte0, {V, C});
      b.embedding_backward(dw, be.activation(b, dout, {N, C}), be.ints(b, DType::i32, tokens, {N}));
      return be.read(b, dw);
    };
    const std::vector<float> cpu = run(*be.cpu), atomic = run(*be.gpu), first = run(*ordered), second = run(*ordered);
    EXPECT_TRUE(same_bits(first, second)) << "two deterministic embedding_backward calls differ" << tag;
    expect_close(first, cpu, kF32, "deterministic embedding_backward vs CPU" + tag);
    expect_close(first, atomic, kF32, "deterministic embedding_backward vs atomic" + tag);
    // Tokens whose run of sorted positions lies inside one piece: the CPU's exact sums.
    std::vector<int64_t> count(V, 0), run_begin(V, 0);
    for (int32_t t : tokens) ++count[static_cast<size_t>(t)];
    for (int v = 1; v < V; ++v) run_begin[v] = run_begin[v - 1] + count[v - 1];
    int checked = 0;
    for (int v = 0; v < V; ++v) {
      if (count[v] == 0 || run_begin[v] / 128 != (run_begin[v] + count[v] - 1) / 128) continue;
      const size_t row = static_cast<size_t>(v) * C;
      EXPECT_TRUE(std::memcmp(first.data() + row, cpu.data() + row, sizeof(float) * C) == 0) << "token " << v << tag;
      ++checked;
    }
    EXPECT_GT(checked, V / 2) << tag;
  }
}

// The ordered RMSNorm backward: dweight through per-block partial rows summed in block order. Bitwise equal over two
// calls; dinp equals the atomic path bitwise (only dweight's sums differ); both equal the CPU to rounding. N = 4501
// makes each warp take several rows (more than 4 blocks per SM of 8 rows), C = 6008 takes the column-owner form
// (per-warp rows past 160 KB of shared memory), C = 100 the scalar path.
TEST(CudaOps, DeterministicRmsnormBackward) {
  MOBA_REQUIRE_GPU();
  const std::unique_ptr<Backend> ordered = make_cuda_backend(0, {OpProfile::off, true});
  Backends be;
  const int64_t N = 4501;
  for (int C : {1792, 100, 6008}) {
    const std::string tag = " C=" + std::to_string(C);
    const std::vector<float> inp = random_bf16(N * C, 30, -2.0f, 2.0f);
    const std::vector<float> weight = random_bf16(C, 31, 0.5f, 1.5f);
    const std::vector<float> dout = random_bf16(N * C, 32);
    const std::vector<float> dinp0 = random_bf16(N * C, 33);
    const std::vector<float> dweight0 = random_vector(C, 34);
    std::vector<float> rstd;  // the CPU's, used by every side
    {
      Backend& b = *be.cpu;
      Tensor y = be.empty(b, DType::f32, {N, C}), r = be.empty(b, DType::f32, {N});
      b.rmsnorm_forward(y, r, be.activation(b, inp, {N, C}), be.activation(b, weight, {C}), 1e-5f);
      rstd = be.read(b, r);
    }
    struct Result {
      std::vector<float> dinp, dweight;
    };
    auto run = [&](Backend& b) {
      Tensor dx = be.activation(b, dinp0, {N, C}), dw = be.floats(b, DType::f32, dweight0, {C});
      b.rmsnorm_backward(dx, dw, be.activation(b, dout, {N, C}), be.activation(b, inp, {N, C}),
                         be.activation(b, weight, {C}), be.floats(b, DType::f32, rstd, {N}));
      return Result{be.read(b, dx), be.read(b, dw)};
    };
    const Result cpu = run(*be.cpu), atomic = run(*be.gpu), first = run(*ordered), second = run(*ordered);
    EXPECT_TRUE(same_bits(first.dweight, second.dweight)) << "two deterministic dweight sums differ" << tag;
    EXPECT_TRUE(same_bits(first.dinp, second.dinp)) << tag;
    EXPECT_TRUE(same_bits(first.dinp, atomic.dinp)) << "dinp does not depend on the dweight path" << tag;
    expect_close(first.dinp, cpu.dinp, kBf16, "deterministic rmsnorm_backward dinp vs CPU" + tag);
    expect_close(first.dweight, cpu.dweight, kF32, "deterministic rmsnorm_backward dweight vs CPU" + tag);
    expect_close(first.dweight, atomic.dweight, kF32, "deterministic rmsnorm_backward dweight vs atomic" + tag);
  }
}

// The residual add fused with the norm: against the CPU, and bitwise against add_inplace + rmsnorm_forward on the GPU.
TEST(CudaOps, ResidualRmsnormIsAddThenNorm) {
  MOBA_REQUIRE_GPU();
  Backends be;
  const int64_t N = 257;
  const float eps = 1e-5f;
  for (int C : {1792, 100}) {
    const std::string tag = " C=" + std::to_string(C);
    const std::vector<float> branch = random_bf16(N * C, 15, -2.0f, 2.0f), resid = random_bf16(N * C, 16, -2.0f, 2.0f);
    const std::vector<float> weight = random_bf16(C, 17, 0.5f, 1.5f);
    std::vector<float> sum[2], out[2], rstd[2];
    for (int side = 0; side < 2; ++side) {
      Backend& b = side == 0 ? *be.cpu : *be.gpu;
      Tensor x = be.activation(b, branch, {N, C}), r = be.activation(b, resid, {N, C}), w = be.activation(b, weight, {C});
      Tensor y = be.empty(b, b.activation_dtype(), {N, C}), rs = be.empty(b, DType::f32, {N});
      b.residual_rmsnorm_forward(x, y, rs, r, w, eps);
      sum[side] = be.read(b, x);
      out[side] = be.read(b, y);
      rstd[side] = be.read(b, rs);
    }
    expect_close(sum[1], sum[0], kBf16, "residual_rmsnorm_forward resid" + tag);
    expect_close(out[1], out[0], kBf16, "residual_rmsnorm_forward out" + tag);
    expect_close(rstd[1], rstd[0], kF32, "residual_rmsnorm_forward rstd" + tag);
    // Unfused on the GPU: the same bits.
    Backend& g = *be.gpu;
    Tensor x = be.activation(g, branch, {N, C}), r = be.activation(g, resid, {N, C}), w = be.activation(g, weight, {C});
    Tensor y = be.empty(g, DType::bf16, {N, C}), rs = be.empty(g, DType::f32, {N});
    g.add_inplace(x, r);
    g.rmsnorm_forward(y, rs, x, w, eps);
    EXPECT_EQ(be.read(g, x), sum[1]) << tag;
    EXPECT_EQ(be.read(g, y), out[1]) << tag;
    EXPECT_EQ(be.read(g, rs), rstd[1]) << tag;
  }
}

// ---- matmul --------------------------------------------------------------------------------------------------

// Forward, then backward into random starting gradients whose size matches the product's (so a lost += shows):
// on the GPU dinp and dweight come from two calls (each with the other skipped), on the CPU from one.
void check_matmul(Backends& be, int64_t N, int IC, int OC) {
  const std::string tag = " " + std::to_string(N) + "x" + std::to_string(IC) + "x" + std::to_string(OC);
  const std::vector<float> inp = random_bf16(N * IC, 20);
  const std::vector<float> weight = random_bf16(static_cast<size_t>(OC) * IC, 21);
  const std::vector<float> dout = random_bf16(N * OC, 22);
  // A sum of K products of U(-1, 1) values has RMS sqrt(K) / 3, as does U(-s, s) with s = sqrt(K / 3).
  const float s_inp = std::sqrt(OC / 3.0f), s_weight = std::sqrt(N / 3.0f);
  const std::vector<float> dinp0 = random_bf16(N * IC, 23, -s_inp, s_inp);
  const std::vector<float> dweight0 = random_vector(static_cast<size_t>(OC) * IC, 24, -s_weight, s_weight);
  std::vector<float> out[2], dinp[2], dweight[2];
  for (int side = 0; side < 2; ++side) {
    Backend& b = side == 0 ? *be.cpu : *be.gpu;
    Tensor x = be.activation(b, inp, {N, IC}), w = be.activation(b, weight, {OC, IC});
    Tensor dy = be.activation(b, dout, {N, OC});
    Tensor y = be.empty(b, b.activation_dtype(), {N, OC});
    b.matmul_forward(y, x, w);
    Tensor dx = be.activation(b, dinp0, {N, IC});
    Tensor dw = be.floats(b, DType::f32, dweight0, {OC, IC});
    if (side == 0) {
      b.matmul_backward(dx, dw, dy, x, w);
    } else {
      b.matmul_backward(dx, Tensor{}, dy, x, w);
      b.matmul_backward(Tensor{}, dw, dy, x, w);
    }
    out[side] = be.read(b, y);
    dinp[side] = be.read(b, dx);
    dweight[side] = be.read(b, dw);
  }
  expect_close(out[1], out[0], kBf16, "matmul_forward out" + tag);
  expect_close(dinp[1], dinp[0], kBf16, "matmul_backward dinp (+=)" + tag);
  expect_close(dweight[1], dweight[0], kF32, "matmul_backward dweight (+=)" + tag);
}

TEST(CudaOps, MatmulOddShapes) {
  MOBA_REQUIRE_GPU();
  Backends be;
  check_matmul(be, 37, 96, 200);
  check_matmul(be, 5, 8, 3);
  check_matmul(be, 300, 1000, 24);
}

TEST(CudaOps, MatmulLargeShape) {
  MOBA_REQUIRE_GPU();
  Backends be;
  check_matmul(be, 4096, 1792, 5376);
}

// ---- rope ----------------------------------------------------------------------------------------------------

TEST(CudaOps, RopeOnStridedRows) {
  MOBA_REQUIRE_GPU();
  Backends be;
  struct Case {
    int heads, D;
    int64_t row_stride, first_column;  // q/k read out of a wider (fused QKV-like) row
  };
  const int64_t N = 77;
  for (const Case& c : {Case{4, 64, 3 * 4 * 64, 4 * 64}, Case{3, 24, 3 * 3 * 24 + 5, 7}}) {
    const std::string tag = " heads=" + std::to_string(c.heads) + " D=" + std::to_string(c.D);
    const int64_t width = static_cast<int64_t>(c.heads) * c.D;
    const std::vector<int32_t> pos = random_ints(N, 30, 40000);  // large positions: angles far past 2 pi
    const std::vector<float> rows = random_bf16(N * c.row_stride, 31);
    const std::vector<float> dout = random_bf16(N * width, 32);
    const std::vector<float> drows0 = random_bf16(N * c.row_stride, 33);
    std::vector<float> out[2], drows[2];
    for (int side = 0; side < 2; ++side) {
      Backend& b = side == 0 ? *be.cpu : *be.gpu;
      Tensor p = be.ints(b, DType::i32, pos, {N});
      Tensor x = be.activation(b, rows, {N, c.row_stride}).columns(c.first_column, width);
      Tensor y = be.empty(b, b.activation_dtype(), {N, c.heads, c.D});
      b.rope_forward(y, x, p, 10000.0f);
      Tensor dbuffer = be.activation(b, drows0, {N, c.row_stride});
      b.rope_backward(dbuffer.columns(c.first_column, width), be.activation(b, dout, {N, c.heads, c.D}), p, 10000.0f);
      out[side] = be.read(b, y);
      drows[side] = be.read(b, dbuffer);
    }
    expect_close(out[1], out[0], kBf16, "rope_forward out" + tag);
    expect_close(drows[1], drows[0], kBf16, "rope_backward dinp (+=, strided)" + tag);
    for (int64_t t = 0; t < N; ++t)
      for (int64_t col = 0; col < c.row_stride; ++col)
        if (col < c.first_column || col >= c.first_column + width)
          ASSERT_EQ(drows[1][t * c.row_stride + col], drows0[t * c.row_stride + col])
              << "rope_backward wrote outside its columns at row " << t << " column " << col << tag;
  }
}

// ---- swiglu --------------------------------------------------------------------------------------------------

// The fused qkv split: q, k rotated and v moved out of the packed rows, and the backward overwriting every column of
// the packed gradient (stale values must not survive), against the CPU's composition of rope and copy.
TEST(CudaOps, QkvRopeSplitsAndJoins) {
  MOBA_REQUIRE_GPU();
  Backends be;
  const int64_t N = 77;
  for (const auto& [H, Hkv, D] : {std::tuple{4, 2, 128}, std::tuple{3, 1, 20}}) {
    const std::string tag = " H=" + std::to_string(H) + "/" + std::to_string(Hkv) + " D=" + std::to_string(D);
    const int64_t width = static_cast<int64_t>(H + 2 * Hkv) * D;
    const std::vector<int32_t> pos = random_ints(N, 34, 100000);
    const std::vector<float> qkv = random_bf16(N * width, 35);
    const std::vector<float> dq = random_bf16(N * H * D, 36), dk = random_bf16(N * Hkv * D, 37);
    const std::vector<float> dv = random_bf16(N * Hkv * D, 38), stale = random_bf16(N * width, 39, -50.0f, 50.0f);
    std::vector<float> q[2], k[2], v[2], dqkv[2];
    for (int side = 0; side < 2; ++side) {
      Backend& b = side == 0 ? *be.cpu : *be.gpu;
      const DType A = b.activation_dtype();
      Tensor p = be.ints(b, DType::i32, pos, {N});
      Tensor tq = be.empty(b, A, {N, H, D}), tk = be.empty(b, A, {N, Hkv, D}), tv = be.empty(b, A, {N, Hkv, D});
      b.qkv_rope_forward(tq, tk, tv, be.activation(b, qkv, {N, width}), p, 10000.0f);
      Tensor d = be.activation(b, stale, {N, width});
      b.qkv_rope_backward(d, be.activation(b, dq, {N, H, D}), be.activation(b, dk, {N, Hkv, D}),
                          be.activation(b, dv, {N, Hkv, D}), p, 10000.0f);
      q[side] = be.read(b, tq);
      k[side] = be.read(b, tk);
      v[side] = be.read(b, tv);
      dqkv[side] = be.read(b, d);
    }
    expect_close(q[1], q[0], kBf16, "qkv_rope_forward q" + tag);
    expect_close(k[1], k[0], kBf16, "qkv_rope_forward k" + tag);
    EXPECT_EQ(v[1], v[0]) << "v is moved, not computed" << tag;
    expect_close(dqkv[1], dqkv[0], kBf16, "qkv_rope_backward dqkv (overwrite)" + tag);
  }
}

TEST(CudaOps, SwigluForwardAndBackward) {
  MOBA_REQUIRE_GPU();
  Backends be;
  const int64_t N = 65;
  for (int F : {1024, 37}) {
    const std::string tag = " F=" + std::to_string(F);
    const std::vector<float> inp = random_bf16(N * 2 * F, 40, -4.0f, 4.0f);
    const std::vector<float> dout = random_bf16(N * F, 41);
    const std::vector<float> dinp0 = random_bf16(N * 2 * F, 42);
    std::vector<float> out[2], dinp[2];
    for (int side = 0; side < 2; ++side) {
      Backend& b = side == 0 ? *be.cpu : *be.gpu;
      Tensor x = be.activation(b, inp, {N, 2 * F});
      Tensor y = be.empty(b, b.activation_dtype(), {N, F});
      b.swiglu_forward(y, x);
      Tensor dx = be.activation(b, dinp0, {N, 2 * F});
      b.swiglu_backward(dx, be.activation(b, dout, {N, F}), x);
      out[side] = be.read(b, y);
      dinp[side] = be.read(b, dx);
    }
    expect_close(out[1], out[0], kBf16, "swiglu_forward out" + tag);
    expect_close(dinp[1], dinp[0], kBf16, "swiglu_backward dinp (+=)" + tag);
  }
}

// ---- elementwise ---------------------------------------------------------------------------------------------

TEST(CudaOps, AddScaleCopyConvert) {
  MOBA_REQUIRE_GPU();
  Backends be;
  for (int64_t n : {int64_t{1} << 20, int64_t{1000003}}) {
    const std::string tag = " n=" + std::to_string(n);
    const std::vector<float> a = random_bf16(n, 50), c = random_bf16(n, 51), x = random_vector(n, 52);
    std::vector<float> sum[2], scaled[2];
    for (int side = 0; side < 2; ++side) {
      Backend& b = side == 0 ? *be.cpu : *be.gpu;
      Tensor dst = be.activation(b, a, {n});
      b.add_inplace(dst, be.activation(b, c, {n}));
      sum[side] = be.read(b, dst);
      Tensor xs = be.floats(b, DType::f32, x, {n});
      b.scale(xs, 0.37f);
      scaled[side] = be.read(b, xs);
    }
    expect_close(sum[1], sum[0], kBf16, "add_inplace" + tag);
    EXPECT_EQ(scaled[1], scaled[0]) << "scale is one f32 multiply per element" << tag;

    // f32 -> bf16 rounds to nearest even (as test::round_to_bf16); bf16 -> f32 is exact; same dtype copies.
    Backend& g = *be.gpu;
    Tensor x32 = be.floats(g, DType::f32, x, {n}), x16 = be.empty(g, DType::bf16, {n});
    Tensor back = be.empty(g, DType::f32, {n}), copy = be.empty(g, DType::f32, {n});
    g.convert(x16, x32);
    g.convert(back, x16);
    g.convert(copy, x32);
    std::vector<float> rounded = x;
    test::round_to_bf16(rounded);
    EXPECT_EQ(be.read(g, x16), rounded) << "convert f32 -> bf16" << tag;
    EXPECT_EQ(be.read(g, back), rounded) << "convert bf16 -> f32" << tag;
    EXPECT_EQ(be.read(g, copy), x) << "convert f32 -> f32" << tag;
  }

  // Strided row copies between views of wider buffers, bf16 and i32.
  Backend& g = *be.gpu;
  const int64_t rows = 50, cols = 100;
  const std::vector<float> src_rows = random_bf16(rows * 130, 53);
  Tensor src = be.activation(g, src_rows, {rows, 130});
  Tensor dst = be.activation(g, random_bf16(rows * 120, 54), {rows, 120});
  g.copy(dst.columns(11, cols), src.columns(3, cols));
  const std::vector<float> got = be.read(g, dst);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t col = 0; col < cols; ++col)
      ASSERT_EQ(got[r * 120 + 11 + col], src_rows[r * 130 + 3 + col]) << "copy row " << r << " column " << col;
  const std::vector<int32_t> ids = random_ints(rows * cols, 55, 1 << 30);
  Tensor ids_src = be.ints(g, DType::i32, ids, {rows, cols}), ids_dst = be.empty(g, DType::i32, {rows, cols});
  g.copy(ids_dst, ids_src);
  std::vector<int32_t> ids_got(ids.size());
  g.download(ids_got.data(), ids_dst);
  EXPECT_EQ(ids_got, ids) << "contiguous i32 copy";
}

TEST(CudaOps, SumOfSquares) {
  MOBA_REQUIRE_GPU();
  Backends be;
  for (int64_t n : {int64_t{1} << 22, int64_t{3000001}, int64_t{5}}) {
    const std::vector<float> x = random_vector(n, 60);
    const double want = be.cpu->sum_of_squares(be.floats(*be.cpu, DType::f32, x, {n}));
    const double got = be.gpu->sum_of_squares(be.floats(*be.gpu, DType::f32, x, {n}));
    std::printf("[ rel-err  ] sum_of_squares n=%-10lld %.2e\n", static_cast<long long>(n), std::abs(got - want) / want);
    EXPECT_NEAR(got, want, 1e-9 * want) << "n=" << n;  // double accumulation on both sides
  }
}

// ---- cross-entropy -------------------------------------------------------------------------------------------

TEST(CudaOps, CrossEntropyWithMask) {
  MOBA_REQUIRE_GPU();
  Backends be;
  const int64_t N = 64;
  for (int V : {32000, 1003}) {
    for (bool masked : {true, false}) {
      const std::string tag = " V=" + std::to_string(V) + (masked ? " masked" : " no mask");
      const std::vector<float> logits = random_bf16(N * V, 70, -6.0f, 6.0f);
      const std::vector<int32_t> targets = random_ints(N, 71, V);
      std::vector<uint8_t> mask(N, 1);
      for (int64_t t = 0; t < N; t += 5) mask[t] = 0;  // zeros, including row 0
      // Starting gradients of the size of the softmax terms, so a lost += shows in the error.
      const float s = 2.0f / V;
      const std::vector<float> dlogits0 = random_bf16(N * V, 72, -s, s);
      const float grad_scale = 0.75f;
      std::vector<float> losses[2], dlogits[2];
      double total[2];
      for (int side = 0; side < 2; ++side) {
        Backend& b = side == 0 ? *be.cpu : *be.gpu;
        Tensor x = be.activation(b, logits, {N, V});
        Tensor tgt = be.ints(b, DType::i32, targets, {N});
        Tensor m = masked ? be.ints(b, DType::u8, mask, {N}) : Tensor{};
        Tensor l = be.floats(b, DType::f32, random_vector(N, 73), {N});  // every entry must be written
        total[side] = b.cross_entropy_forward(l, x, tgt, m);
        Tensor dx = be.activation(b, dlogits0, {N, V});
        b.cross_entropy_backward(dx, x, tgt, m, grad_scale);
        losses[side] = be.read(b, l);
        dlogits[side] = be.read(b, dx);
      }
      expect_close(losses[1], losses[0], kF32, "cross_entropy_forward losses" + tag);
      std::printf("[ rel-err  ] cross_entropy_forward total%-25s %.2e\n", tag.c_str(),
                  std::abs(total[1] - total[0]) / total[0]);
      EXPECT_NEAR(total[1], total[0], kF32 * total[0]) << tag;
      expect_close(dlogits[1], dlogits[0], kBf16, "cross_entropy_backward dlogits (+=)" + tag);
      for (int64_t t = 0; t < N; ++t) {
        if (!masked || mask[t]) continue;
        EXPECT_EQ(losses[1][t], 0.0f) << "masked row " << t << tag;
        for (int v = 0; v < V; ++v)
          ASSERT_EQ(dlogits[1][t * V + v], dlogits0[t * V + v]) << "masked row " << t << " got a gradient" << tag;
      }
    }
  }
}

// The fused loss head against the CPU's fused op, and bitwise against forward + backward into zeros on the GPU.
TEST(CudaOps, CrossEntropyFusedInPlace) {
  MOBA_REQUIRE_GPU();
  Backends be;
  const int64_t N = 64;
  for (int V : {32000, 1003}) {
    const std::string tag = " V=" + std::to_string(V);
    const std::vector<float> logits = random_bf16(N * V, 74, -6.0f, 6.0f);
    const std::vector<int32_t> targets = random_ints(N, 75, V);
    std::vector<uint8_t> mask(N, 1);
    for (int64_t t = 0; t < N; t += 5) mask[t] = 0;
    const float grad_scale = 0.75f;
    std::vector<float> losses[2], grads[2];
    for (int side = 0; side < 2; ++side) {
      Backend& b = side == 0 ? *be.cpu : *be.gpu;
      Tensor x = be.activation(b, logits, {N, V});
      Tensor tgt = be.ints(b, DType::i32, targets, {N}), m = be.ints(b, DType::u8, mask, {N});
      Tensor l = be.floats(b, DType::f32, random_vector(N, 76), {N});
      b.cross_entropy_fused(l, x, tgt, m, grad_scale);
      losses[side] = be.read(b, l);
      grads[side] = be.read(b, x);
    }
    expect_close(losses[1], losses[0], kF32, "cross_entropy_fused losses" + tag);
    expect_close(grads[1], grads[0], kBf16, "cross_entropy_fused dlogits" + tag);
    Backend& g = *be.gpu;
    Tensor x = be.activation(g, logits, {N, V}), dx = be.empty(g, DType::bf16, {N, V});
    Tensor tgt = be.ints(g, DType::i32, targets, {N}), m = be.ints(g, DType::u8, mask, {N});
    Tensor l = be.empty(g, DType::f32, {N});
    g.cross_entropy_forward(l, x, tgt, m);
    g.zero(dx);
    g.cross_entropy_backward(dx, x, tgt, m, grad_scale);
    EXPECT_EQ(be.read(g, l), losses[1]) << tag;
    EXPECT_EQ(be.read(g, dx), grads[1]) << tag;
    // grad_scale 0: losses only, the logits stay.
    Tensor y = be.activation(g, logits, {N, V});
    g.cross_entropy_fused(l, y, tgt, m, 0.0f);
    EXPECT_EQ(be.read(g, y), logits) << tag;
    EXPECT_EQ(be.read(g, l), losses[1]) << tag;
  }
}

// accumulate = false overwrites the input gradient: stale values in the buffer (here large random ones) must not
// leak into the result, which equals the CPU's accumulation into zeros.
TEST(CudaOps, BackwardOverwriteIgnoresStaleGradients) {
  MOBA_REQUIRE_GPU();
  Backends be;
  const int64_t N = 130;
  const int IC = 96, OC = 200, F = 104;
  const std::vector<float> inp = random_bf16(N * IC, 80), weight = random_bf16(OC * IC, 81), dout = random_bf16(N * OC, 82);
  const std::vector<float> gu = random_bf16(N * 2 * F, 83, -3.0f, 3.0f), dact = random_bf16(N * F, 84);
  const std::vector<float> stale_mm = random_bf16(N * IC, 85, -100.0f, 100.0f);
  const std::vector<float> stale_gu = random_bf16(N * 2 * F, 86, -100.0f, 100.0f);
  std::vector<float> dinp[2], dgu[2];
  for (int side = 0; side < 2; ++side) {
    Backend& b = side == 0 ? *be.cpu : *be.gpu;
    Tensor x = be.activation(b, inp, {N, IC}), w = be.activation(b, weight, {OC, IC}), dy = be.activation(b, dout, {N, OC});
    Tensor dx = be.activation(b, stale_mm, {N, IC});
    b.matmul_backward(dx, Tensor{}, dy, x, w, false);
    dinp[side] = be.read(b, dx);
    Tensor g = be.activation(b, gu, {N, 2 * F}), da = be.activation(b, dact, {N, F});
    Tensor dg = be.activation(b, stale_gu, {N, 2 * F});
    b.swiglu_backward(dg, da, g, false);
    dgu[side] = be.read(b, dg);
  }
  expect_close(dinp[1], dinp[0], kBf16, "matmul_backward dinp (overwrite)");
  expect_close(dgu[1], dgu[0], kBf16, "swiglu_backward dinp (overwrite)");
}

// ---- adamw ---------------------------------------------------------------------------------------------------

TEST(CudaOps, AdamwUpdatesMomentsWeightsAndWorkingCopy) {
  MOBA_REQUIRE_GPU();
  Backends be;
  for (int64_t n : {int64_t{1} << 20, int64_t{(1 << 20) + 3}}) {
    const std::string tag = " n=" + std::to_string(n);
    const std::vector<float> param0 = random_vector(n, 80);
    const std::vector<float> grad = random_vector(n, 81, -1e-2f, 1e-2f);
    const std::vector<float> m0 = random_vector(n, 82, -1e-3f, 1e-3f);
    const std::vector<float> v0 = random_vector(n, 83, 0.0f, 1e-4f);
    std::vector<float> param[2], m[2], v[2], working;
    for (int side = 0; side < 2; ++side) {
      Backend& b = side == 0 ? *be.cpu : *be.gpu;
      Tensor p = be.floats(b, DType::f32, param0, {n}), g = be.floats(b, DType::f32, grad, {n});
      Tensor mt = be.floats(b, DType::f32, m0, {n}), vt = be.floats(b, DType::f32, v0, {n});
      Tensor pw = side == 0 ? Tensor{} : be.empty(b, DType::bf16, {n});
      b.adamw_update(p, pw, g, mt, vt, 1e-3f, 0.9f, 0.95f, 1e-8f, 0.1f, 7, 0.5f);  // with a clipping factor
      param[side] = be.read(b, p);
      m[side] = be.read(b, mt);
      v[side] = be.read(b, vt);
      if (side == 1) working = be.read(b, pw);
    }
    // Compare the updates (param - param0): the weights themselves barely move.
    std::vector<float> update[2];
    for (int side = 0; side < 2; ++side) {
      update[side].resize(n);
      for (int64_t i = 0; i < n; ++i) update[side][i] = param[side][i] - param0[i];
    }
    expect_close(update[1], update[0], kF32, "adamw_update param update" + tag);
    expect_close(m[1], m[0], kF32, "adamw_update m" + tag);
    expect_close(v[1], v[0], kF32, "adamw_update v" + tag);
    std::vector<float> rounded = param[1];
    test::round_to_bf16(rounded);
    EXPECT_EQ(working, rounded) << "param_working is the updated master weights rounded to bf16" << tag;
  }
}

// ---- benchmark -----------------------------------------------------------------------------------------------

// Median milliseconds of `reps` runs of fn on ctx.stream (CUDA events), after `warmup` runs.
template <typename Fn>
double median_ms(const cuda::CudaContext& ctx, int warmup, int reps, Fn fn) {
  std::vector<double> ms = cuda::time_on_stream(ctx.stream, fn, warmup, reps);
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

// Benchmark line: matmul TFLOP/s at N=8192, IC=1792, OC=5376 (a d1792 model's MLP up-projection), random data.
// TFLOP/s of every GEMM shape of the 545M benchmark model's training step (16384-token micro-batch, LM head in
// 4096-row chunks): forward, dinp overwritten (beta 0) and dweight accumulated into f32. Printed, not asserted.
TEST(CudaOps, MatmulTflops) {
  MOBA_REQUIRE_GPU();
  Backends be;
  Backend& g = *be.gpu;
  // A context of our own, so that CUDA events can bracket the launches on its stream.
  cuda::CudaContext ctx;
  cudaDeviceProp prop{};
  MOBA_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  ctx.sm_count = prop.multiProcessorCount;
  MOBA_CUDA_CHECK(cudaStreamCreateWithFlags(&ctx.stream, cudaStreamNonBlocking));
  MOBA_CUBLAS_CHECK(cublasLtCreate(&ctx.lt));
  ctx.workspace_bytes = 32u << 20;
  MOBA_CUDA_CHECK(cudaMalloc(&ctx.workspace, ctx.workspace_bytes));
  struct GemmCase {
    int64_t N;
    int IC, OC;
    const char* what;
  };
  for (const GemmCase& gc : {GemmCase{16384, 1792, 5376, "qkv"}, GemmCase{16384, 1792, 1792, "wo"},
                             GemmCase{16384, 1792, 9728, "gate_up"}, GemmCase{16384, 4864, 1792, "down"},
                             GemmCase{4096, 1792, 32000, "head chunk"}, GemmCase{8192, 1792, 5376, "qkv 8K"}}) {
    const int64_t N = gc.N;
    const int IC = gc.IC, OC = gc.OC;
    Tensor x = be.activation(g, random_bf16(N * IC, 90), {N, IC});
    Tensor w = be.activation(g, random_bf16(static_cast<size_t>(OC) * IC, 91), {OC, IC});
    Tensor dy = be.activation(g, random_bf16(N * OC, 92), {N, OC});
    Tensor y = be.empty(g, DType::bf16, {N, OC}), dx = be.empty(g, DType::bf16, {N, IC});
    Tensor dw = be.empty(g, DType::f32, {OC, IC});
    g.synchronize();
    auto* xp = x.as<cuda::bf16>();
    auto* wp = w.as<cuda::bf16>();
    auto* dyp = dy.as<cuda::bf16>();
    const double forward =
        median_ms(ctx, 5, 20, [&] { cuda::matmul_forward(ctx, y.as<cuda::bf16>(), xp, wp, N, IC, OC); });
    const double dinp = median_ms(
        ctx, 5, 20, [&] { cuda::matmul_backward(ctx, dx.as<cuda::bf16>(), nullptr, dyp, xp, wp, N, IC, OC, false); });
    const double dweight =
        median_ms(ctx, 5, 20, [&] { cuda::matmul_backward(ctx, nullptr, dw.as<float>(), dyp, xp, wp, N, IC, OC); });
    const double flops = 2.0 * N * IC * OC;
    std::printf(
        "[ bench    ] matmul %-10s N=%lld IC=%d OC=%d on %s (median of 20): forward %.3f ms = %.0f TFLOP/s, "
        "dinp %.0f TFLOP/s, dweight (f32 +=) %.0f TFLOP/s\n",
        gc.what, static_cast<long long>(N), IC, OC, prop.name, forward, flops / forward / 1e9, flops / dinp / 1e9,
        flops / dweight / 1e9);
  }
  cudaFree(ctx.workspace);
  cublasLtDestroy(ctx.lt);
  cudaStreamDestroy(ctx.stream);
}

}  // namespace
}  // namespace moba
