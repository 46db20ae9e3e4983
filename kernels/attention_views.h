// The raw pointer view of one AttentionCall (kernels/attention.h) that a backend's attention kernels take across
// the host/device line: plain fields, no Tensor. One definition for every backend: the CPU reference views f32
// activations and f32 dK/dV (cpu::AttentionArgs), CUDA bf16 activations and dK/dV of either dtype
// (cuda::AttentionArgs, which adds its kernel settings and scratch).
#pragma once
#include <cstdint>

#include "kernels/attention.h"

namespace moba {

// Element: the activation type (q, k, v, out, dout, dq); KeyGrad: dk/dv's element (void where the dtype varies).
template <typename Element, typename KeyGrad>
struct AttentionViews {
  int64_t n_queries = 0, n_keys = 0;     // Nq, Nk
  int n_heads = 0, n_kv_heads = 0;       // H, Hkv (divides H)
  int head_dim = 0;                      // D
  const Element* q = nullptr;            // (Nq, H, D)
  const Element* k = nullptr;            // (Nk, Hkv, D)
  const Element* v = nullptr;            // (Nk, Hkv, D)
  const int32_t* cu_seqlens = nullptr;   // (S + 1) documents of the key rows, 0 .. Nk
  int n_segments = 0;                    // S
  const int32_t* q_rows = nullptr;       // (Nq) strictly ascending key row of each query row; nullptr: row i at i
  int block_size = 0, top_k = 0;         // MoBA (top_k counts the current block)
  int32_t* selected = nullptr;           // MoBA (Nq, H, top_k): written by routing, read by forward and backward
  float softmax_scale = 0;
  Element* out = nullptr;                // (Nq, H, D)
  float* lse = nullptr;                  // (Nq, H) natural log
  const Element* dout = nullptr;         // (Nq, H, D)
  Element* dq = nullptr;                 // (Nq, H, D) +=
  KeyGrad* dk = nullptr;                 // (Nk, Hkv, D) +=
  KeyGrad* dv = nullptr;                 // (Nk, Hkv, D) +=

  // The key row query row i stands at.
  int64_t key_row(int64_t i) const { return q_rows ? q_rows[i] : i; }
};

// The view of a call its backend has checked (check_attention_call); tensors the call leaves empty stay nullptr,
// and block_size, top_k and selected only for MoBA.
template <typename Element, typename KeyGrad>
AttentionViews<Element, KeyGrad> attention_views(const AttentionCall& c) {
  AttentionViews<Element, KeyGrad> a;
  a.n_queries = c.n_queries();
  a.n_keys = c.n_keys();
  a.n_heads = c.n_heads();
  a.n_kv_heads = c.n_kv_heads();
  a.head_dim = c.head_dim();
  a.q = c.q.as<Element>();
  a.k = c.k.as<Element>();
  a.v = c.v.as<Element>();
  a.cu_seqlens = c.cu_seqlens.as<int32_t>();
  a.n_segments = c.n_segments();
  a.q_rows = c.q_rows.as<int32_t>();
  if (c.mode == AttentionMode::moba) {
    a.block_size = c.block_size;
    a.top_k = c.top_k;
    a.selected = c.selected.as<int32_t>();
  }
  a.softmax_scale = c.softmax_scale;
  a.out = c.out.as<Element>();
  a.lse = c.lse.as<float>();
  a.dout = c.dout.as<Element>();
  a.dq = c.dq.as<Element>();
  a.dk = c.dk.as<KeyGrad>();
  a.dv = c.dv.as<KeyGrad>();
  return a;
}

}  // namespace moba
