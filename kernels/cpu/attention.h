// CPU reference attention (fp32): dense causal attention and MoBA, forward and backward, over packed documents, for
// query rows standing anywhere in the key sequence. Semantics: kernels/attention.h and ../shared/docs/moba-spec.md.
// Layout: q (Nq, H, D), k and v (Nk, Hkv, D), out (Nq, H, D), lse (Nq, H) natural log; documents
// [cu_seqlens[s], cu_seqlens[s+1]) of the key rows never attend to each other; positions restart at each document.
// GQA/MQA: query head h reads key/value head h / (H / Hkv); K and V are never expanded.
// Invariants: every output row is computed alone, in one fixed order, from the same key rows whatever other query
// rows the call holds, so a query subset gives the whole sequence's rows bit for bit, for any thread count. Backward
// functions ACCUMULATE (+=) into dq, dk, dv.
#pragma once
#include <cstdint>
#include <vector>

#include "kernels/attention_views.h"

namespace moba::cpu {

// The raw f32 view of one AttentionCall (kernels/attention_views.h).
using AttentionArgs = AttentionViews<float, float>;

// ---- dense causal attention: out, lse; backward: dq, dk, dv += ------------------------------------------------
void attention_full_forward(const AttentionArgs& a);
void attention_full_backward(const AttentionArgs& a);

// ---- MoBA ----------------------------------------------------------------------------------------------------
// Routing: for each query row and head, the chosen block indices relative to the document start, ascending, the
// current block last, -1 padded when fewer blocks exist. Block means of the complete key blocks are accumulated in
// fp32 and rounded to bf16 (round-to-nearest-even) before the fp32 gate, as the official code does; ties go to the
// lower block index. Throws moba::Error if q holds a NaN or Inf.
void moba_select_blocks(const AttentionArgs& a);
// Attention over the union of the selected past blocks and the causal part of the current block.
void moba_attention_forward(const AttentionArgs& a);
void moba_attention_backward(const AttentionArgs& a);

// ---- explicit-mask reference (tests only; float64) ---------------------------------------------------------------
// Query row i (key row t) sees key row j iff j <= t in t's document and, when a.selected is non-null (MoBA), j's block
// is among the row's selected blocks; no code is shared with the kernels. a.out, a.lse and the gradients of `a` are
// not touched; gradients only when a.dout is non-null. `baseline`, when non-null, receives a same-precision baseline
// for a bf16 backend (FlashAttention-3's test criterion): P and dS rounded to bf16 before the products that use
// them, Delta from the bf16-rounded output, and out, dq, dk, dv rounded to bf16 at the end.
struct ReferenceResults {
  std::vector<double> out, lse, dq, dk, dv;  // (Nq, H, D), (Nq, H), (Nq, H, D), (Nk, Hkv, D) x 2
};
ReferenceResults attention_masked_reference(const AttentionArgs& a, ReferenceResults* baseline = nullptr);

}  // namespace moba::cpu
