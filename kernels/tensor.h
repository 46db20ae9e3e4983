// A device-agnostic, non-owning tensor view: pointer, element type, device and up to 4 dims (row-major).
// Rows (dim 0) may be strided (row_stride elements apart) so that q/k/v can be read out of a fused QKV
// buffer without copies. Memory is owned by arenas (see Backend::allocate); views never free.
#pragma once
#include <array>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <string>

namespace moba {

enum class DType : uint8_t { f32, bf16, i32, u8 };
enum class Device : uint8_t { cpu, cuda };

inline size_t dtype_size(DType t) {
  switch (t) {
    case DType::f32: return 4;
    case DType::bf16: return 2;
    case DType::i32: return 4;
    case DType::u8: return 1;
  }
  return 0;
}
const char* dtype_name(DType t);

struct Tensor {
  void* data = nullptr;
  DType dtype = DType::f32;
  Device device = Device::cpu;
  int ndim = 0;
  std::array<int64_t, 4> shape{1, 1, 1, 1};
  int64_t row_stride = 0;  // elements between consecutive dim-0 rows; 0 = contiguous

  Tensor() = default;
  Tensor(void* p, DType t, Device d, std::initializer_list<int64_t> dims) : data(p), dtype(t), device(d) {
    for (int64_t s : dims) shape[ndim++] = s;
  }

  int64_t numel() const {
    int64_t n = 1;
    for (int i = 0; i < ndim; ++i) n *= shape[i];
    return n;
  }
  int64_t rows() const { return ndim > 0 ? shape[0] : 1; }
  int64_t row_size() const { return ndim > 0 ? numel() / shape[0] : 1; }  // elements per dim-0 row
  int64_t stride0() const { return row_stride ? row_stride : row_size(); }
  bool contiguous() const { return row_stride == 0 || row_stride == row_size(); }
  size_t bytes() const { return static_cast<size_t>(numel()) * dtype_size(dtype); }

  template <typename T> T* as() const { return static_cast<T*>(data); }
  // Rows [begin, begin + count) along dim 0 (a view).
  Tensor slice_rows(int64_t begin, int64_t count) const;
  // The same memory with another (contiguous) shape; numel must match.
  Tensor reshape(std::initializer_list<int64_t> dims) const;
  // A view of `cols` columns starting at column `first` of a 2-D tensor, keeping the row stride.
  Tensor columns(int64_t first, int64_t cols) const;
  std::string describe() const;  // "f32[4, 256] on cpu"
};

}  // namespace moba
