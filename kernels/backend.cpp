// Backend selection by name, and names of the enums shared by every backend.
#include "kernels/backend.h"

#include "common/error.h"

namespace moba {

const char* attention_mode_name(AttentionMode m) { return m == AttentionMode::moba ? "moba" : "full"; }

std::unique_ptr<Backend> make_backend(const std::string& name, int device) {
  if (name == "cpu") return make_cpu_backend();
  if (name == "cuda") {
#if MOBA_HAVE_CUDA
    return make_cuda_backend(device);
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
