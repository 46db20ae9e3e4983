#include "kernels/tensor.h"

#include "common/error.h"

namespace moba {

const char* dtype_name(DType t) {
  switch (t) {
    case DType::f32: return "f32";
    case DType::bf16: return "bf16";
    case DType::i32: return "i32";
    case DType::u8: return "u8";
  }
  return "?";
}

Tensor Tensor::slice_rows(int64_t begin, int64_t count) const {
  MOBA_ASSERT(begin >= 0 && count >= 0 && begin + count <= rows());
  Tensor t = *this;
  t.data = static_cast<char*>(data) + static_cast<size_t>(begin * stride0()) * dtype_size(dtype);
  t.shape[0] = count;
  return t;
}

Tensor Tensor::reshape(std::initializer_list<int64_t> dims) const {
  MOBA_ASSERT(contiguous());
  Tensor t(data, dtype, device, dims);
  MOBA_ASSERT(t.numel() == numel());
  return t;
}

Tensor Tensor::columns(int64_t first, int64_t cols) const {
  MOBA_ASSERT(ndim == 2 && first >= 0 && first + cols <= shape[1]);
  Tensor t = *this;
  t.data = static_cast<char*>(data) + static_cast<size_t>(first) * dtype_size(dtype);
  t.shape[1] = cols;
  t.row_stride = stride0();
  return t;
}

std::string Tensor::describe() const {
  std::string s = std::string(dtype_name(dtype)) + "[";
  for (int i = 0; i < ndim; ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "] on " + (device == Device::cpu ? "cpu" : "cuda");
}

}  // namespace moba
