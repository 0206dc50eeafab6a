// HSR decode's argument block (mirrored by kernels/cpu_decode.py), its counters and modes, and the value types
// its stages pass each other: offset tables, selection terms, bounds.
#pragma once

#include <limits>

#include "common.h"
#include "scratch.h"

#if HSR_AVX512
#include <immintrin.h>
#endif

namespace hsr {
namespace {   // (hsr_decode.cpp includes the stages; nothing here is seen by another file)

constexpr double NEG_INF = -std::numeric_limits<double>::infinity();
constexpr float INF_F = std::numeric_limits<float>::infinity();
constexpr float CERTIFICATE_FLOOR = 1.17549435e-38f;   // smallest normal fp32 (core.attention)

enum Mode : i64 { RELU = 0, SOFTMAX = 1, TOPK = 2 };
enum Counter : i64 {
  KEYS_READ, CELLS_READ, SUMMARY_NODES_READ, CODE_CELLS_READ, REFINED_CELLS, SEED_KEYS_READ,
  OVERFLOW_ROWS, DENSE_KEYS, NUM_COUNTERS
};

// Every field is 8 bytes wide, so the ctypes mirror (kernels/cpu_decode.py) needs no padding rules.
struct HsrArgs {
  i64 batch, num_q_heads, num_kv_heads, head_dim;
  const float* q;                 // [batch, num_q_heads, head_dim]
  const i64* block_table;         // [batch, table_width]
  i64 table_width;
  const i64* seq_lens;            // [batch]
  const void* cache;              // flat KV cache
  i64 cache_dtype, block_stride, head_stride, block_size;
  const i64* key_offsets;         // [block_size, head_dim]
  const i64* value_offsets;       // [block_size, head_dim]
  const void* boxes;              // [blocks, slots, 2 (lo, hi), kv_heads, head_dim] at these strides
  i64 box_dtype, box_block_stride, box_slot_stride, box_side_stride, box_head_stride;
  const i64* level_first_slot;    // [tree_levels + 1]
  const uint8_t* codes;           // token codes: block, kv head, token strides in bytes
  i64 code_block_stride, code_head_stride, code_token_stride, code_bits, plane_bits, plane_bytes;
  const void* key_rows;           // key copy of complete cells, cache dtype: block, kv head strides; or null
  i64 key_rows_block_stride, key_rows_head_stride;
  i64 mode, alpha, budget_tokens, cell_size, fanout, tree_levels, sink_tokens, window_tokens, seed_cells,
      capacity;
  double eps, bias, tree_budget_share, scale;
  double margin_rel, margin_abs, step_slack, magnitude_slack, abs_slack;
  i64 hist_bins;
  double hist_range, budget_slack;
  i64 code_weight_range;          // the largest |integer code weight| (core.summaries.code_weight_range)
  float* out;                     // [batch, num_q_heads, head_dim]
  float* error_bound;             // [batch, num_q_heads]
  i64* counters;                  // [batch * num_kv_heads, NUM_COUNTERS]
  i64* tokens;                    // [batch * num_kv_heads, token_capacity] or null
  i64 token_capacity;
  i64* counts;                    // [batch * num_kv_heads] or null
  uint8_t* dense;                 // [batch * num_kv_heads] or null
  float* skipped;                 // [batch, num_q_heads] or null
  i64 num_threads;
  i64* totals;                    // [NUM_COUNTERS] the counters summed over rows
  double* max_error_bound;        // the largest error bound of the call (NaN if one is)
};

// An offset table [block_size, head_dim] that is base + token * token_stride + channel * channel_stride.
struct Affine {
  bool affine = false;
  i64 base = 0, token = 0, channel = 0;

  static Affine of(const i64* offsets, i64 block_size, i64 head_dim) {
    Affine a;
    a.base = offsets[0];
    a.token = block_size > 1 ? offsets[head_dim] - a.base : 0;
    a.channel = head_dim > 1 ? offsets[1] - a.base : 0;
    for (i64 t = 0; t < block_size; ++t)
      for (i64 d = 0; d < head_dim; ++d)
        if (offsets[t * head_dim + d] != a.base + t * a.token + d * a.channel) return a;
    a.affine = true;
    return a;
  }
};

// The fp64 terms x[i] + shift of an fp32 or fp64 array (the selection rules' log-masses and log-gains, read
// where they lie instead of copied out in fp64)
template <typename T>
struct Terms {
  const T* x = nullptr;
  double shift = 0.0;
  double at(i64 i) const { return double(x[i]) + shift; }
  Terms row(i64 g, i64 n) const { return {x + g * n, shift}; }     // head g's n terms of a [G, n] array
#if HSR_AVX512
  __m512d load8(i64 i) const { return _mm512_add_pd(fp64x8(x + i), _mm512_set1_pd(shift)); }   // at(i .. i + 7)
  static __m512d fp64x8(const float* v) { return _mm512_cvtps_pd(_mm256_loadu_ps(v)); }
  static __m512d fp64x8(const double* v) { return _mm512_loadu_pd(v); }
#endif
};

// Upper and lower bounds of n nodes or tokens for every query head of a group, head-major: [G, n].
struct Bounds {
  Scratch<float> ub, lb;
  i64 n = 0;
  void resize(i64 count, i64 group) { n = count; ub.resize(count * group); lb.resize(count * group); }
};

}  // namespace
}  // namespace hsr
