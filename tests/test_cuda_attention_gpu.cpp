// The CUDA dense flash attention (kernels/cuda/flash_attention_*.cu) against the CPU reference backend on the
// same bf16-valued inputs: out, lse, dq, dk, dv by relative L2 error over head dims (the tensor-core sizes and
// padded ones), GQA groups and MQA, packed segments (empty, length 1, tiles straddling boundaries) and long
// sequences; plus BenchmarkDense, which only prints timings (fwd and fwd+bwd, CUDA events, medians).
// Invariant: the backward accumulates, so gradients start from random values and the increments are compared.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <functional>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "kernels/backend.h"
#include "kernels/cuda/attention.h"
#include "kernels/cuda/timing.h"
#include "tests/support/test_util.h"

namespace moba {
namespace {

// bf16 <-> f32 on the host for values bf16 represents exactly (test::round_to_bf16 first).
uint16_t bf16_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return static_cast<uint16_t>(u >> 16);
}
float bf16_value(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float x;
  std::memcpy(&x, &u, 4);
  return x;
}

// bf16 (GPU) vs f32 (CPU) differ in accumulation order and the rounding of P, dS and the outputs: ~3e-3 typical.
constexpr double kTolerance = 1e-2;
constexpr double kLseTolerance = 1e-4;  // lse is f32 end to end

struct Problem {
  std::vector<int32_t> cu_seqlens;  // (S + 1)
  int64_t N = 0;
  int H = 0, Hkv = 0, D = 0;
  float scale = 0;
  std::vector<float> q, dout, dq0;  // (N, H, D), bf16 values; dq0 = the gradient the backward adds to
  std::vector<float> k, v, dk0, dv0;  // (N, Hkv, D)
};

Problem make_problem(std::vector<int32_t> cu_seqlens, int H, int Hkv, int D, uint64_t seed) {
  Problem p;
  p.cu_seqlens = std::move(cu_seqlens);
  p.N = p.cu_seqlens.back();
  p.H = H;
  p.Hkv = Hkv;
  p.D = D;
  p.scale = 1.0f / std::sqrt(static_cast<float>(D));
  const size_t nq = static_cast<size_t>(p.N) * H * D, nkv = static_cast<size_t>(p.N) * Hkv * D;
  p.q = test::random_vector(nq, seed, -1.5f, 1.5f);
  p.k = test::random_vector(nkv, seed + 1, -1.5f, 1.5f);
  p.v = test::random_vector(nkv, seed + 2);
  p.dout = test::random_vector(nq, seed + 3);
  p.dq0 = test::random_vector(nq, seed + 4, -0.05f, 0.05f);
  p.dk0 = test::random_vector(nkv, seed + 5, -0.05f, 0.05f);
  p.dv0 = test::random_vector(nkv, seed + 6, -0.05f, 0.05f);
  for (auto* x : {&p.q, &p.k, &p.v, &p.dout, &p.dq0, &p.dk0, &p.dv0}) test::round_to_bf16(*x);
  return p;
}

struct Results {
  std::vector<float> out, lse, dq, dk, dv;  // dq, dk, dv: the increments over dq0, dk0, dv0
};

// Forward, then backward accumulating into dq0/dk0/dv0, on `be` in its activation dtype. Outputs start as NaN,
// so an element the kernels never write fails the comparison.
Results run_attention(Backend& be, const Problem& p) {
  const DType act = be.activation_dtype();
  std::vector<Tensor> owned;
  auto upload = [&](const std::vector<float>& host, DType dtype, std::initializer_list<int64_t> shape) {
    Tensor t = be.allocate(dtype, shape);
    if (dtype == DType::bf16) {
      std::vector<uint16_t> bits(host.size());
      for (size_t i = 0; i < host.size(); ++i) bits[i] = bf16_bits(host[i]);
      be.upload(t, bits.data());
    } else {
      be.upload(t, host.data());
    }
    owned.push_back(t);
    return t;
  };
  auto download = [&](const Tensor& t) {
    std::vector<float> host(static_cast<size_t>(t.numel()));
    if (t.dtype == DType::bf16) {
      std::vector<uint16_t> bits(host.size());
      be.download(bits.data(), t);
      for (size_t i = 0; i < host.size(); ++i) host[i] = bf16_value(bits[i]);
    } else {
      be.download(host.data(), t);
    }
    return host;
  };
  const int64_t N = p.N;
  const std::vector<float> nan_q(p.q.size(), NAN), nan_lse(static_cast<size_t>(N) * p.H, NAN);
  Tensor q = upload(p.q, act, {N, p.H, p.D}), k = upload(p.k, act, {N, p.Hkv, p.D});
  Tensor v = upload(p.v, act, {N, p.Hkv, p.D}), dout = upload(p.dout, act, {N, p.H, p.D});
  Tensor out = upload(nan_q, act, {N, p.H, p.D}), lse = upload(nan_lse, DType::f32, {N, p.H});
  Tensor dq = upload(p.dq0, act, {N, p.H, p.D}), dk = upload(p.dk0, act, {N, p.Hkv, p.D});
  Tensor dv = upload(p.dv0, act, {N, p.Hkv, p.D});
  Tensor cu = be.allocate(DType::i32, {static_cast<int64_t>(p.cu_seqlens.size())});
  be.upload(cu, p.cu_seqlens.data());
  owned.push_back(cu);

  AttentionCall call;
  call.q = q;
  call.k = k;
  call.v = v;
  call.cu_seqlens = cu;
  call.out = out;
  call.lse = lse;
  call.dout = dout;
  call.dq = dq;
  call.dk = dk;
  call.dv = dv;
  call.softmax_scale = p.scale;
  be.attention_forward(call);
  be.attention_backward(call);
  Results r{download(out), download(lse), download(dq), download(dk), download(dv)};
  for (size_t i = 0; i < r.dq.size(); ++i) r.dq[i] -= p.dq0[i];
  for (size_t i = 0; i < r.dk.size(); ++i) r.dk[i] -= p.dk0[i];
  for (size_t i = 0; i < r.dv.size(); ++i) r.dv[i] -= p.dv0[i];
  for (Tensor& t : owned) be.release(t);
  return r;
}

void expect_gpu_matches_cpu(const std::string& name, const Problem& p) {
  SCOPED_TRACE(name);
  auto cpu = make_cpu_backend();
  auto gpu = make_cuda_backend();
  const Results want = run_attention(*cpu, p), got = run_attention(*gpu, p);
  const double e_out = test::rel_l2(got.out.data(), want.out.data(), want.out.size());
  const double e_lse = test::rel_l2(got.lse.data(), want.lse.data(), want.lse.size());
  const double e_dq = test::rel_l2(got.dq.data(), want.dq.data(), want.dq.size());
  const double e_dk = test::rel_l2(got.dk.data(), want.dk.data(), want.dk.size());
  const double e_dv = test::rel_l2(got.dv.data(), want.dv.data(), want.dv.size());
  std::printf("[attention errors] %-34s N %6lld H %2d Hkv %2d D %3d | out %.2e lse %.2e dq %.2e dk %.2e dv %.2e\n",
              name.c_str(), static_cast<long long>(p.N), p.H, p.Hkv, p.D, e_out, e_lse, e_dq, e_dk, e_dv);
  EXPECT_LE(e_out, kTolerance);
  EXPECT_LE(e_lse, kLseTolerance);
  EXPECT_LE(e_dq, kTolerance);
  EXPECT_LE(e_dk, kTolerance);
  EXPECT_LE(e_dv, kTolerance);
}

// Segments of 37, 0, 1, 212 and 83 tokens: N = 333 is no multiple of any tile, tiles straddle boundaries.
const std::vector<int32_t> kPacked{0, 37, 37, 38, 250, 333};

TEST(CudaAttention, HeadDimsOfTheTensorCoreTiles) {
  MOBA_REQUIRE_GPU();
  for (int D : {16, 32, 64, 128})
    expect_gpu_matches_cpu("packed D " + std::to_string(D), make_problem(kPacked, 4, 2, D, 100 + D));
}

TEST(CudaAttention, PaddedHeadDims) {
  MOBA_REQUIRE_GPU();
  // 40 and 96 run in the 64 and 128 kernels with zero columns; 20 and 6 also take the unvectorised loads.
  for (int D : {6, 20, 40, 96})
    expect_gpu_matches_cpu("padded D " + std::to_string(D), make_problem(kPacked, 2, 1, D, 200 + D));
}

TEST(CudaAttention, GqaGroupsAndMqa) {
  MOBA_REQUIRE_GPU();
  const std::vector<int32_t> cu{0, 100, 100, 101, 517, 700};
  for (int Hkv : {8, 4, 2, 1})  // groups 1, 2, 4, 8; Hkv = 1 is MQA
    expect_gpu_matches_cpu("gqa group " + std::to_string(8 / Hkv), make_problem(cu, 8, Hkv, 64, 300 + Hkv));
  expect_gpu_matches_cpu("mqa D 128", make_problem(cu, 4, 1, 128, 310));
}

TEST(CudaAttention, ManyShortSegments) {
  MOBA_REQUIRE_GPU();
  std::vector<int32_t> cu{0};
  uint64_t state = 12345;
  for (int s = 0; s < 80; ++s) {
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    cu.push_back(cu.back() + static_cast<int32_t>((state >> 33) % 41));  // lengths 0..40, empties included
  }
  expect_gpu_matches_cpu("80 short segments D 32", make_problem(cu, 2, 1, 32, 400));
  expect_gpu_matches_cpu("80 short segments D 128", make_problem(cu, 4, 2, 128, 401));
}

TEST(CudaAttention, LongSequence) {
  MOBA_REQUIRE_GPU();
  expect_gpu_matches_cpu("long N 4096", make_problem({0, 4096}, 8, 8, 128, 500));
}

TEST(CudaAttention, LongPackedGqa) {
  MOBA_REQUIRE_GPU();
  expect_gpu_matches_cpu("long packed gqa", make_problem({0, 1000, 1000, 1001, 2900, 3000}, 8, 2, 128, 600));
}

// ---- benchmark: prints only ------------------------------------------------------------------------------------
#define BENCH_CUDA_CHECK(call)                                                      \
  do {                                                                              \
    cudaError_t bench_err = (call);                                                 \
    ASSERT_EQ(bench_err, cudaSuccess) << #call << ": " << cudaGetErrorString(bench_err); \
  } while (0)

double median(std::vector<double> x) {
  std::sort(x.begin(), x.end());
  return x[x.size() / 2];
}

// Random bf16 values in [-1, 1) from a 64-bit LCG (fast enough for hundreds of millions of values).
std::vector<uint16_t> random_bf16(size_t n, uint64_t seed) {
  std::vector<uint16_t> out(n);
  uint64_t s = seed * 0x9E3779B97F4A7C15ull + 1;
  for (size_t i = 0; i < n; ++i) {
    s = s * 6364136223846793005ull + 1442695040888963407ull;
    const float x = static_cast<float>(static_cast<int32_t>(s >> 40) - (1 << 23)) / static_cast<float>(1 << 23);
    out[i] = bf16_bits(x);
  }
  return out;
}

void benchmark_dense(int64_t N, int H, int Hkv, int D) {
  cuda::CudaContext ctx;
  cudaDeviceProp prop{};
  BENCH_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  ctx.sm_count = prop.multiProcessorCount;
  BENCH_CUDA_CHECK(cudaStreamCreateWithFlags(&ctx.stream, cudaStreamNonBlocking));
  const size_t nq = static_cast<size_t>(N) * H * D, nkv = static_cast<size_t>(N) * Hkv * D;
  std::vector<void*> buffers;
  auto device_bf16 = [&](size_t n, uint64_t seed) {
    void* p = nullptr;
    EXPECT_EQ(cudaMalloc(&p, n * 2), cudaSuccess);
    const std::vector<uint16_t> host = random_bf16(n, seed);
    EXPECT_EQ(cudaMemcpy(p, host.data(), n * 2, cudaMemcpyHostToDevice), cudaSuccess);
    buffers.push_back(p);
    return static_cast<cuda::bf16*>(p);
  };
  cuda::bf16 *q = device_bf16(nq, 1), *k = device_bf16(nkv, 2), *v = device_bf16(nkv, 3);
  cuda::bf16 *dout = device_bf16(nq, 4), *out = device_bf16(nq, 5), *dq = device_bf16(nq, 6);
  cuda::bf16 *dk = device_bf16(nkv, 7), *dv = device_bf16(nkv, 8);
  float* lse = nullptr;
  int32_t* cu = nullptr;
  BENCH_CUDA_CHECK(cudaMalloc(&lse, static_cast<size_t>(N) * H * 4));
  BENCH_CUDA_CHECK(cudaMalloc(&cu, 2 * sizeof(int32_t)));
  const int32_t cu_host[2] = {0, static_cast<int32_t>(N)};
  BENCH_CUDA_CHECK(cudaMemcpy(cu, cu_host, sizeof(cu_host), cudaMemcpyHostToDevice));
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));

  auto forward = [&] { cuda::flash_attention_forward(ctx, out, lse, q, k, v, cu, 1, N, H, Hkv, D, scale); };
  auto backward = [&] {
    cuda::flash_attention_backward(ctx, dq, dk, dv, dout, q, k, v, out, lse, cu, 1, N, H, Hkv, D, scale);
  };
  auto time_ms = [&](const std::function<void()>& fn, int reps) { return cuda::time_on_stream(ctx.stream, fn, 0, reps); };
  time_ms([&] { forward(); backward(); }, 3);  // warm-up: module load, scratch growth
  const std::vector<double> fwd = time_ms(forward, 15);
  const std::vector<double> bwd = time_ms(backward, 15);
  const std::vector<double> both = time_ms([&] { forward(); backward(); }, 15);
  BENCH_CUDA_CHECK(cudaStreamSynchronize(ctx.stream));

  const double pairs = static_cast<double>(N) * (N + 1) / 2;
  const double fwd_flops = 4.0 * D * H * pairs, bwd_flops = 2.5 * fwd_flops;
  const double f = median(fwd), b = median(bwd), fb = median(both);
  std::printf("[attention bench] %s N %lld H %d Hkv %d D %d | fwd %.3f ms (%.0f TFLOP/s, min %.3f) | bwd %.3f ms "
              "(%.0f TFLOP/s) | fwd+bwd %.3f ms (%.0f TFLOP/s, min %.3f)\n",
              prop.name, static_cast<long long>(N), H, Hkv, D, f, fwd_flops / f * 1e-9,
              *std::min_element(fwd.begin(), fwd.end()),
              b, bwd_flops / b * 1e-9, fb, (fwd_flops + bwd_flops) / fb * 1e-9,
              *std::min_element(both.begin(), both.end()));
  std::printf("{\"bench\": \"flash_attention_dense\", \"device\": \"%s\", \"N\": %lld, \"H\": %d, \"Hkv\": %d, "
              "\"D\": %d, \"fwd_ms\": %.4f, \"bwd_ms\": %.4f, \"fwd_bwd_ms\": %.4f}\n",
              prop.name, static_cast<long long>(N), H, Hkv, D, f, b, fb);

  for (void* p : buffers) cudaFree(p);
  cudaFree(lse);
  cudaFree(cu);
  for (void* p : ctx.scratch_ptr) cudaFree(p);
  cudaStreamDestroy(ctx.stream);
}

TEST(CudaAttention, BenchmarkDense) {
  MOBA_REQUIRE_GPU();
  benchmark_dense(32768, 16, 16, 128);  // the anchor: cuDNN 6.78 / 27.6 ms, PyTorch FA2 12.7 / 47.7 ms (H200)
  benchmark_dense(8192, 16, 16, 128);   // cuDNN 0.52 / 2.01 ms, FA2 1.04 / 3.64 ms
}

}  // namespace
}  // namespace moba
