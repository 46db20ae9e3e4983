// Backend selection by name.
#include "kernels/backend.h"

#include "common/error.h"

namespace moba {

AttentionScratch allocate_attention_scratch(Backend& be, const AttentionScratchShape& shape) {
  const AttentionScratchSizes sizes = be.attention_scratch_sizes(shape);
  auto bytes = [&](size_t n, DType dtype) {
    return n == 0 ? Tensor() : be.allocate(dtype, {static_cast<int64_t>((n + dtype_size(dtype) - 1) / dtype_size(dtype))});
  };
  AttentionScratch s;
  s.row_stats = bytes(sizes.row_stats, DType::f32);
  s.partials = bytes(sizes.partials, DType::f32);
  s.block_means = bytes(sizes.block_means, DType::bf16);
  s.dispatch = bytes(sizes.dispatch, DType::i32);
  s.chunk_dispatch = bytes(sizes.chunk_dispatch, DType::i32);
  s.query_index = bytes(sizes.query_index, DType::i32);
  return s;
}

void release_attention_scratch(Backend& be, AttentionScratch& s) {
  for (Tensor* t : {&s.row_stats, &s.partials, &s.block_means, &s.dispatch, &s.chunk_dispatch, &s.query_index})
    if (t->data) be.release(*t);
}

std::unique_ptr<Backend> make_backend(const std::string& name, int device, BackendSettings settings) {
  if (name == "cpu") {
    MOBA_CHECK(settings.profile == OpProfile::off, "per-op profiling times CUDA events: backend 'cpu' has none",
               "profile on backend: cuda, or leave --profile-ops off");
    return make_cpu_backend();
  }
  if (name == "cuda") {
#if MOBA_HAVE_CUDA
    return make_cuda_backend(device, settings);
#else
    throw Error("backend 'cuda' is not available: this binary was built without CUDA",
                "install the CUDA toolkit and rebuild (./scripts/build.sh), or use backend: cpu");
#endif
  }
  throw Error(cat("unknown backend '", name, "'"), "allowed: cpu, cuda");
}

#if !MOBA_HAVE_CUDA
int gpu_count() { return 0; }
#endif

}  // namespace moba
