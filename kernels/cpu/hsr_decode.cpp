// HSR paged decode on the CPU: the cell-tree query and the attention over the tokens it reports,
// one (sequence, KV head) row per OpenMP task.
//
// Twin: vllm_hsr.core.query.TreeQuery (selection) and vllm_hsr.core.decode.decode_candidates
// (attention); every rule and bound below is theirs (docs/design.md §2), and the numeric constants
// (margins, slacks, histogram) come in through HsrArgs from the same Python definitions.
// Plain C ABI (loaded with ctypes): no torch headers, so it builds in seconds.

#include <algorithm>
#include <functional>
#include <initializer_list>
#include <limits>
#include <type_traits>
#include <vector>

#include "common.h"

#if HSR_AVX512
#include <immintrin.h>
#endif

namespace {

using namespace hsr;
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
  double eps, bias, tree_budget_share, refine_share, scale;
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
};

double logaddexp(double a, double b) {
  if (a == NEG_INF) return b;
  if (b == NEG_INF) return a;
  const double m = std::max(a, b);
  return m + std::log(std::exp(a - m) + std::exp(b - m));
}

// exp(x) for x <= 0: a polynomial that vectorizes (libm's exp does not), relative error below 2e-7;
// inputs below -87 give a tiny positive value, never 0.
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);
  const float k = std::nearbyint(x * 1.44269504f);
  const float r = (x - k * 0.693145752f) - k * 1.42860677e-6f;     // Cody-Waite: ln 2 in two parts
  float p = 1.98412698e-4f;
  p = p * r + 1.38888889e-3f;
  p = p * r + 8.33333333e-3f;
  p = p * r + 4.16666667e-2f;
  p = p * r + 1.66666667e-1f;
  p = p * r + 0.5f;
  p = p * r * r + r + 1.0f;
  int32_t bits;
  std::memcpy(&bits, &p, 4);
  bits += int32_t(k) << 23;
  std::memcpy(&p, &bits, 4);
  return p;
}
constexpr double EXP_SLACK = 1.0 + 1e-5;   // covers exp_nonpositive and fp32 exponents and block sums

#if HSR_AVX512
// exp_nonpositive in 16 lanes (the same polynomial, with fused multiply-adds); NaN stays NaN, as in the scalar
// one (a vector max or min returns its second operand where either is NaN)
inline __m512 exp_nonpositive(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-87.0f), x);
  const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(1.42860677e-6f),
                                    _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693145752f), x));
  __m512 p = _mm512_set1_ps(1.98412698e-4f);
  for (const float c : {1.38888889e-3f, 8.33333333e-3f, 4.16666667e-2f, 1.66666667e-1f, 0.5f})
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_castsi512_ps(_mm512_add_epi32(_mm512_castps_si512(p), _mm512_slli_epi32(_mm512_cvtps_epi32(k), 23)));
}

// lanes whose byte flag (16 of them from `flags`, the first `count`) is nonzero
inline __mmask16 flag_mask(const uint8_t* flags, i64 count) {
  const __mmask16 in = count >= 16 ? __mmask16(0xffff) : __mmask16((1u << count) - 1);
  return _mm512_test_epi32_mask(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(in, flags)), _mm512_set1_epi32(0xff));
}
#endif

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

// The int16 lanes of the channel groups of 64 channels packed as packs_epi32(x0, x1) | packs_epi32(x2, x3)
// (x_m: channels 16m .. 16m + 15; packs interleaves them 4 at a time per 128-bit lane): lanes[0] holds groups 0
// then 1, lanes[1] groups 2 then 3 (group r, lane k: channel 4k + r), as indices for permutex2var_epi16
struct GroupLanes {
  alignas(64) int16_t lanes[2][32];
};
constexpr GroupLanes group_lanes() {
  GroupLanes t{};
  for (int r = 0; r < 4; ++r)
    for (int k = 0; k < 16; ++k) {
      const int channel = 4 * k + r, half = channel / 32, c = channel % 32;
      const int lane = c < 16 ? 8 * (c / 4) + c % 4 : 8 * ((c - 16) / 4) + 4 + c % 4;
      t.lanes[r / 2][16 * (r % 2) + k] = int16_t(32 * half + lane);
    }
  return t;
}
constexpr GroupLanes GROUP_LANES = group_lanes();

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
  std::vector<float> ub, lb;
  i64 n = 0;
  void resize(i64 count, i64 group) { n = count; ub.resize(count * group); lb.resize(count * group); }
};

class Row {
 public:
  Row(const HsrArgs& a, const Affine& key_layout, const Affine& value_layout, i64 row)
      : a_(a), key_layout_(key_layout), value_layout_(value_layout), b_(row / a.num_kv_heads),
        h_(row % a.num_kv_heads), row_(row), G_(a.num_q_heads / a.num_kv_heads), D_(a.head_dim),
        n_(a.seq_lens[b_]), table_(a.block_table + b_ * a.table_width), q_(G_ * D_), q_abs_(G_ * D_), q_pos_(G_ * D_),
        q_neg_(G_ * D_), q_abs_sum_(G_),
        skipped_(G_, NEG_INF), counters_(a.counters + row * NUM_COUNTERS) {
    const float* q = a.q + (b_ * a.num_q_heads + h_ * G_) * D_;
    for (i64 i = 0; i < G_ * D_; ++i) {
      q_[i] = q[i];
      q_abs_[i] = std::fabs(q[i]);
      q_pos_[i] = std::max(q[i], 0.0f);
      q_neg_[i] = std::min(q[i], 0.0f);
    }
    for (i64 g = 0; g < G_; ++g)
      for (i64 d = 0; d < D_; ++d) q_abs_sum_[g] += q_abs_[g * D_ + d];
    for (i64 c = 0; c < NUM_COUNTERS; ++c) counters_[c] = 0;
  }

  void run() {
    std::vector<i64> list;
    const bool dense = !select(list);
    if (dense) std::fill(skipped_.begin(), skipped_.end(), NEG_INF);
    const i64 count = dense ? n_ : i64(list.size());
    counters_[KEYS_READ] = count;
    counters_[OVERFLOW_ROWS] = dense;
    counters_[DENSE_KEYS] = n_;
    counters_[CELLS_READ] = dense ? (n_ + a_.cell_size - 1) / a_.cell_size : distinct_cells(list);
    if (a_.counts) a_.counts[row_] = count;
    if (a_.dense) a_.dense[row_] = dense;
    if (a_.tokens && !dense) std::copy(list.begin(), list.end(), a_.tokens + row_ * a_.token_capacity);
    if (a_.skipped) for (i64 g = 0; g < G_; ++g) a_.skipped[b_ * a_.num_q_heads + h_ * G_ + g] = float(skipped_[g]);
    if (dense) {
      list.resize(n_);
      for (i64 t = 0; t < n_; ++t) list[t] = t;
    }
    attend(list);
  }

 private:
  const HsrArgs& a_;
  const Affine &key_layout_, &value_layout_;
  const i64 b_, h_, row_, G_, D_, n_;
  const i64* table_;
  std::vector<float> q_, q_abs_, q_pos_, q_neg_, q_abs_sum_;   // [G, D]: q, |q|, max(q, 0), min(q, 0); [G] <1, |q|>
  std::vector<double> skipped_;   // [G] ln of the skipped mass bound
  i64* counters_;
  std::vector<i64> seeds_;        // ascending
  bool overflow_ = false;

  // -- tree shape ------------------------------------------------------------------------------
  // cell_size * fanout^level tokens, saturated: a span past every sequence only has to compare larger
  // (fanout^tree_levels may pass 2^63, where the twin's Python ints just grow)
  i64 span(i64 level) const {
    constexpr i64 SATURATED = std::numeric_limits<i64>::max() / 4;
    i64 s = a_.cell_size;
    for (i64 l = 0; l < level; ++l) {
      if (s > SATURATED / a_.fanout) return SATURATED;
      s *= a_.fanout;
    }
    return s;
  }
  i64 num_nodes(i64 level) const { return n_ / span(level); }
  i64 max_tokens() const { return a_.table_width * a_.block_size; }
  i64 top_level() const {
    i64 top = 0;
    for (i64 l = 1; l <= a_.tree_levels; ++l) if (span(l) <= max_tokens()) top = l;
    return top;
  }
  i64 node_width() const { return std::max<i64>(1, a_.capacity / a_.cell_size); }
  bool over_width(size_t kept) {
    if (a_.capacity > 0 && i64(kept) > node_width()) overflow_ = true;
    return overflow_;
  }

  // Nodes of `level` to look at: the children of the kept parents, then the level's tail.
  std::vector<i64> frontier(i64 level, const std::vector<i64>& kept) const {
    std::vector<i64> nodes;
    const i64 first = level == top_level() ? 0 : num_nodes(level + 1) * a_.fanout;
    nodes.reserve(kept.size() * a_.fanout + a_.fanout);
    for (i64 parent : kept)
      for (i64 c = 0; c < a_.fanout; ++c) nodes.push_back(parent * a_.fanout + c);
    for (i64 node = first, end = num_nodes(level); node < end; ++node) nodes.push_back(node);
    return nodes;
  }

  // -- summary reads ---------------------------------------------------------------------------
  // Locality of the requests for a walked cell's codes and a kept token's K and V rows: prefetcht1, into L2
  // (with the caches cold, as between layers, a few % faster per call than into L1: the rows in use stay there)
  static constexpr int TO_L2 = 2;
  static constexpr i64 PREFETCH_CELLS = 4;   // how far ahead of code_bounds a cell's summaries are requested
  void locate(i64 level, i64 node, i64& block, i64& slot) const {
    const i64 s = span(level), last = (node + 1) * s - 1;
    block = table_[std::min(last / a_.block_size, a_.table_width - 1)];
    slot = a_.level_first_slot[level] + (last % a_.block_size) / s;
  }
  // element offset of this row's box (lo side) at (block, slot); hi is box_side_stride further
  i64 box_at(i64 block, i64 slot) const {
    return block * a_.box_block_stride + slot * a_.box_slot_stride + h_ * a_.box_head_stride;
  }
  // this row's codes of the cell at (block, slot), from plane `first`: one token every code_token_stride bytes
  const uint8_t* cell_codes(i64 block, i64 slot, i64 first) const {
    return a_.codes + block * a_.code_block_stride + h_ * a_.code_head_stride
           + slot * a_.cell_size * a_.code_token_stride + first * a_.plane_bytes;
  }

  // Ask for a cell's box (with_box) and the codes of planes [first, planes) of its tokens ahead of code_bounds:
  // cells lie in scattered blocks, where the hardware prefetcher cannot follow.
  void prefetch_cell(i64 cell, i64 first, i64 planes, bool with_box) const {
    i64 block, slot;
    if (with_box) prefetch_box(0, cell, block, slot);
    else locate(0, cell, block, slot);
    const uint8_t* codes = cell_codes(block, slot, first);
    for (i64 t = 0; t < a_.cell_size; ++t)
      for (i64 b = 0; b < (planes - first) * a_.plane_bytes; b += 64)
        __builtin_prefetch(codes + t * a_.code_token_stride + b);
  }
  // Ask for the box of node `node` of `level` (found at block, slot)
  void prefetch_box(i64 level, i64 node, i64& block, i64& slot) const {
    locate(level, node, block, slot);
    const i64 item = dtype_size(a_.box_dtype);
    const char* box = static_cast<const char*>(a_.boxes) + box_at(block, slot) * item;
    for (i64 b = 0; b < D_ * item; b += 64) {
      __builtin_prefetch(box + b);
      __builtin_prefetch(box + a_.box_side_stride * item + b);
    }
  }


  // lo, hi of a stored box as fp32: in place for fp32 boxes, converted into scratch otherwise
  void box(i64 block, i64 slot, const float*& lo, const float*& hi) {
    const i64 at = box_at(block, slot);
    if (a_.box_dtype == F32) {
      lo = static_cast<const float*>(a_.boxes) + at;
      hi = lo + a_.box_side_stride;
      return;
    }
    lo_.resize(D_);
    hi_.resize(D_);
    for (i64 d = 0; d < D_; ++d) {
      lo_[d] = load_float(a_.boxes, at + d, a_.box_dtype);
      hi_[d] = load_float(a_.boxes, at + a_.box_side_stride + d, a_.box_dtype);
    }
    lo = lo_.data();
    hi = hi_.data();
  }
  std::vector<float> lo_, hi_;

  float margin(float magnitude) const { return float(a_.scale * a_.margin_rel) * magnitude + float(a_.margin_abs); }
  static float finite_or(float bound, float value) { return std::isnan(bound) ? value : bound; }

  // Max and min of s*<q,k> over the box of node `node` of `level` (core.summaries.box_bounds), as entry i of b.
  void box_bounds(i64 level, i64 node, Bounds& b, i64 i) {
    i64 block, slot;
    locate(level, node, block, slot);
    const float *lo, *hi;
    box(block, slot, lo, hi);
    const float s = float(a_.scale);
    for (i64 g = 0; g < G_; ++g) {
      float upper, lower, magnitude;
      box_sums(g, lo, hi, upper, lower, magnitude);
      b.ub[g * b.n + i] = finite_or(s * upper + margin(magnitude), INF_F);
      b.lb[g * b.n + i] = finite_or(s * lower - margin(magnitude), -INF_F);
    }
  }

  // box_bounds' sums for head g: upper = max over the box of <q, k>, lower = its min, magnitude = <max(|lo|,
  // |hi|), |q|> (for the rounding margin)
  void box_sums(i64 g, const float* lo, const float* hi, float& upper, float& lower, float& magnitude) const {
    const float* q = &q_[g * D_];
    const float* qa = &q_abs_[g * D_];
    i64 d = 0;
    upper = lower = magnitude = 0;
#if HSR_AVX512
    __m512 up = _mm512_setzero_ps(), down = _mm512_setzero_ps(), mag = _mm512_setzero_ps();
    for (; d + 16 <= D_; d += 16) {
      const __m512 qv = _mm512_loadu_ps(q + d), l = _mm512_loadu_ps(lo + d), h = _mm512_loadu_ps(hi + d);
      const __m512 pos = _mm512_max_ps(qv, _mm512_setzero_ps()), neg = _mm512_min_ps(qv, _mm512_setzero_ps());
      up = _mm512_add_ps(up, _mm512_fmadd_ps(h, pos, _mm512_mul_ps(l, neg)));
      down = _mm512_add_ps(down, _mm512_fmadd_ps(l, pos, _mm512_mul_ps(h, neg)));
      mag = _mm512_fmadd_ps(_mm512_max_ps(_mm512_abs_ps(h), _mm512_abs_ps(l)), _mm512_loadu_ps(qa + d), mag);
    }
    upper = _mm512_reduce_add_ps(up);
    lower = _mm512_reduce_add_ps(down);
    magnitude = _mm512_reduce_add_ps(mag);
#endif
    for (; d < D_; ++d) {
      const float pos = std::max(q[d], 0.0f), neg = std::min(q[d], 0.0f);
      upper += hi[d] * pos + lo[d] * neg;
      lower += lo[d] * pos + hi[d] * neg;
      magnitude += std::max(std::fabs(lo[d]), std::fabs(hi[d])) * qa[d];
    }
  }

  // -- token code bounds (core.summaries.code_bounds) ----------------------------------------------------------
  // Per cell and query head the bounds need <lo, q>, <step, q>, the half widths against |q| and the integer code
  // weights x = rint(q * step / 2^e) (core.summaries.integer_weights): a token's known code value v dots them
  // exactly, in integers, so its bound centre is cell_part + 2^u * 2^e * <x, v> (u: the code bits not read) in
  // every implementation, and the weights' rounding widens each bound by (2^bits - 2^u) * 2^e * residual.

  // Bounds of the tokens of a complete cell from its first `planes` code planes, written to entries
  // [first, first + cell_size) of tb (the portable path; the vector one is cell_pass and stashed_bounds).
  // dots_ [G, tb.n] holds each token's integer dot over the first `read` planes and becomes the dot over
  // `planes` = read + 1 (shifted by a plane and the plane read here added), so a refinement reads only its new
  // plane.
  void code_bounds(i64 cell, i64 planes, i64 read, Bounds& tb, i64 first) {
    const uint8_t* codes = cell_terms(cell, planes) + read * a_.plane_bytes;
    const i64 stride = weight_stride(), plane_bits = a_.plane_bits;
    value_.resize(stride);
    const i64 per_byte = 8 / plane_bits, mask = (i64(1) << plane_bits) - 1;
    for (i64 t = 0; t < a_.cell_size; ++t) {
      const uint8_t* packed = codes + t * a_.code_token_stride;
      for (i64 d = 0; d < stride; ++d)
        value_[d] = int32_t((packed[d / per_byte] >> ((d % per_byte) * plane_bits)) & mask);
      for (i64 g = 0; g < G_; ++g) {
        const int32_t* x = &weights_[g * stride];
        int32_t dot = 0;
        for (i64 d = 0; d < stride; ++d) dot += x[d] * value_[d];
        const i64 at = g * tb.n + first + t;
        dot += read ? dots_[at] << plane_bits : 0;
        dots_[at] = dot;
        const float center = terms_.cell_part[g] + terms_.place * times_power_of_two(float(dot), exponent_[g]);
        const float width = terms_.width[g], margin = terms_.margin[g], s = float(a_.scale);
        tb.ub[at] = finite_or(s * (center + width) + margin, INF_F);
        tb.lb[at] = finite_or(s * (center - width) - margin, -INF_F);
      }
    }
  }

  bool both_planes_ = false;     // 8-bit codes on the vector path: both planes' bounds in one pass
  Bounds fine_;                   // [G, tokens] with both_planes_: the bounds from both planes

  // The per-cell, per-head terms of the bounds from the first `planes` planes of a job: centre = cell_part +
  // place * 2^e * dot, half width `width` (the weights' rounding included), rounding margin `margin`
  struct PlaneTerms {
    float place = 1;              // 2^u
    std::vector<float> cell_part, width, margin;
  };
  PlaneTerms terms_;              // the portable path's, of one cell
  std::vector<int32_t> weights_;  // [G, weight_stride()] the cell's integer code weights x (portable path)
  std::vector<int32_t> exponent_; // [G] their e
  std::vector<float> step_, half_, magnitude_, scaled_;
  std::vector<int32_t> value_;
  std::vector<int32_t> dots_;     // [G, tokens] integer code dot of each token over the planes read so far

  i64 weight_stride() const { return D_ + D_ % 2; }   // even: a byte of 4-bit codes is channels 2j and 2j + 1
  // stash words per (head, group): a word per 4 code bytes (8 channels), in blocks of 64 channels
  i64 words_stride() const { return 8 * ((D_ + 63) / 64); }
  // the vector path: cells summarised by the walk (cell_pass), their tokens bounded from the stash
  bool stashed() const { return a_.code_bits && vector_dots(); }
  bool vector_dots() const {
#if HSR_AVX512
    return a_.plane_bits == 4 && a_.cell_size % 16 == 0 && a_.plane_bytes % 4 == 0;   // 16 tokens per pass
#else
    return false;
#endif
  }

  // Reads the cell's box and sets up terms_ for bounds from its first `planes` planes and the integer weights
  // (portable path); returns the cell's codes from plane 0.
  const uint8_t* cell_terms(i64 cell, i64 planes) {
    i64 block, slot;
    locate(0, cell, block, slot);
    const float *lo, *hi;
    box(block, slot, lo, hi);
    const i64 bits = a_.code_bits;
    const i64 unknown = (i64(1) << (bits - planes * a_.plane_bits)) - 1;
    const float half_steps = float(0.5 + unknown / 2.0 + a_.step_slack), unknown_half = float(unknown / 2.0);
    const float rounding = float((i64(1) << bits) - (unknown + 1));
    terms_.place = float(unknown + 1);
    terms_.cell_part.resize(G_);
    terms_.width.resize(G_);
    terms_.margin.resize(G_);
    exponent_.resize(G_);
    const i64 stride = weight_stride();
    const float levels = float((i64(1) << bits) - 1);
    step_.assign(stride, 0.0f);                   // (a padding channel, when D is odd, weighs nothing)
    magnitude_.resize(D_);
    half_.resize(D_);
    for (i64 d = 0; d < D_; ++d) {
      const float step = (hi[d] - lo[d]) / levels;
      magnitude_[d] = std::max(std::fabs(lo[d]), std::fabs(hi[d]));
      half_[d] = step * half_steps + magnitude_[d] * float(a_.magnitude_slack) + float(a_.abs_slack);
      step_[d] = std::isfinite(step) ? step : 0.0f;  // a non-finite step weighs nothing in the dots
    }
    weights_.resize(G_ * stride);
    scaled_.resize(stride);
    for (i64 g = 0; g < G_; ++g) {
      const float* q = &q_[g * D_];
      const float* qa = &q_abs_[g * D_];
      float base = 0, steps = 0, wide = 0, mag = 0;
      for (i64 d = 0; d < D_; ++d) {
        base += lo[d] * q[d], steps += step_[d] * q[d];
        wide += half_[d] * qa[d], mag += (magnitude_[d] + half_[d]) * qa[d];
      }
      const float residual = integer_weights(g);
      terms_.cell_part[g] = base + unknown_half * steps;
      terms_.width[g] = wide + times_power_of_two(rounding * residual, exponent_[g]);
      terms_.margin[g] = margin(mag);
    }
    return cell_codes(block, slot, 0);
  }

  // The e of integer weights whose largest |w| is top (> 0, finite): the power of two that brings it into
  // [range / 4, range] (core.summaries.integer_weights); range_bits = floor(log2(range))
  int weight_exponent(float top, int range_bits) const {
    int exponent;
    float mantissa;
    uint32_t bits;
    std::memcpy(&bits, &top, 4);
    if (bits >= 0x00800000u) {        // normal: top = mantissa * 2^exponent, mantissa in [0.5, 1), from its bits
      exponent = int(bits >> 23) - 126;
      bits = (bits & 0x007fffffu) | 0x3f000000u;
      std::memcpy(&mantissa, &bits, 4);
    } else {
      mantissa = std::frexp(top, &exponent);
    }
    return exponent - range_bits - (mantissa * float(i64(1) << (range_bits + 1)) <= float(a_.code_weight_range));
  }
  // x * 2^e (as std::ldexp), by a multiply where 2^e is a normal float
  static float times_power_of_two(float x, int e) {
    if (e < -126 || e > 127) return std::ldexp(x, e);
    const uint32_t bits = uint32_t(e + 127) << 23;
    float power;
    std::memcpy(&power, &bits, 4);
    return x * power;
  }

  // Head g's integer weights x = rint(q * step / 2^e) into weights_ and e into exponent_ (the portable path's
  // core.summaries.integer_weights); returns the residual sum |q * step / 2^e - x|.
  float integer_weights(i64 g) {
    const float* q = &q_[g * D_];
    const i64 stride = weight_stride();
    int32_t* x = &weights_[g * stride];
    float top = 0;
    for (i64 d = 0; d < stride; ++d) {
      scaled_[d] = (d < D_ ? q[d] : 0.0f) * step_[d];
      top = std::max(top, std::fabs(scaled_[d]));       // NaN-free: q and the sanitised steps are finite
    }
    exponent_[g] = 0;
    std::fill(x, x + stride, 0);
    float residual = 0;
    if (!(top > 0) || !std::isfinite(top)) return top == 0 ? 0.0f : INF_F;
    const int exponent = weight_exponent(top, 31 - __builtin_clz(uint32_t(a_.code_weight_range)));
    exponent_[g] = exponent;
    for (i64 d = 0; d < stride; ++d) {
      const float y = std::ldexp(scaled_[d], -exponent);
      const float rounded = std::nearbyint(y);
      residual += std::fabs(y - rounded);
      x[d] = int32_t(rounded);
    }
    return residual;
  }

#if HSR_AVX512
  // -- the vector path (vector_dots()): cells summarised by the walk, their tokens bounded from the stash ------
  // The walk's pass over the cells (cell_pass) reads each box once: it gives the cell's box bounds and stashes,
  // per head, the terms its tokens' code bounds need (for the jobs of stash_jobs_: the first plane, and with
  // both_planes_ both) and the integer weights as bytes. The code pass then reads only the kept cells' codes.
  // (A cell the walk drops costs its terms, never a code read.)
  static constexpr i64 STASH_TERMS = 8;   // per cell and head: cell_part[2], width[2], margin[2], e, (pad)
  i64 stash_jobs_ = 1;
  float stash_place_[2] = {1, 1};         // per job: 2^u
  std::vector<float> stash_terms_;        // [P, G, STASH_TERMS] P: the walk's cells
  std::vector<int32_t> stash_words_;      // [P, G, 4, words_stride()] x as int16 pairs: word k of group r holds
                                          // channels 8k + r and 8k + 4 + r (the nibbles r of code bytes 4k, 4k + 1
                                          // and of 4k + 2, 4k + 3)
  std::vector<i64> stash_of_;             // [kept cells] each kept cell's entry in the stash
  std::vector<float> lanes_;              // cell_pass' per-cell channels: ranges, steps, finite steps, magnitudes

  // Box bounds of the cells nodes[0, P) (entries of b, as box_bounds) and their stash entries.
  __attribute__((noinline)) void cell_pass(const std::vector<i64>& nodes, Bounds& b) {
    const i64 P = i64(nodes.size()), word_stride = words_stride(), bits = a_.code_bits;
    const i64 jobs = both_planes_ ? 2 : 1;
    float half_steps[2], unknown_half[2], rounding[2];
    for (i64 j = 0; j < jobs; ++j) {
      const i64 unknown = (i64(1) << (bits - (j + 1) * a_.plane_bits)) - 1;
      half_steps[j] = float(0.5 + unknown / 2.0 + a_.step_slack);
      unknown_half[j] = float(unknown / 2.0);
      rounding[j] = float((i64(1) << bits) - (unknown + 1));
      stash_place_[j] = float(unknown + 1);
    }
    stash_jobs_ = jobs;
    stash_terms_.resize(P * G_ * STASH_TERMS);
    stash_words_.resize(P * G_ * 4 * word_stride);   // words past the plane are never written: they stay 0
    for (i64 i = 0, block, slot; i < P; ++i) {
      // the cell's codes too: the code pass reads nearly every cell the walk bounds (no box prunes on real keys),
      // and their wait overlaps the boxes' here (~15% of a top-k call at 7.5K)
      if (i + PREFETCH_CELLS < P) {
        prefetch_box(0, nodes[i + PREFETCH_CELLS], block, slot);
        const uint8_t* codes = cell_codes(block, slot, 0);
        for (i64 b = 0; b < a_.cell_size * a_.code_token_stride; b += 64) __builtin_prefetch(codes + b, 0, TO_L2);
      }
      locate(0, nodes[i], block, slot);
      const float *lo, *hi;
      box(block, slot, lo, hi);
      // the common head sizes (up to 64 and 128 channels) with their chunk counts known: unrolled, in registers
      if (D_ > 48 && D_ <= 64) summarise_cell<4>(lo, hi, i, b, jobs, half_steps, unknown_half, rounding);
      else if (D_ > 112 && D_ <= 128) summarise_cell<8>(lo, hi, i, b, jobs, half_steps, unknown_half, rounding);
      else summarise_cell<0>(lo, hi, i, b, jobs, half_steps, unknown_half, rounding);
    }
  }

  // cell_pass for one cell (entry i), in 16 lanes. Box bounds as base + <range, max(q, 0)> and base + <range,
  // min(q, 0)> (range = hi - lo, base = <lo, q>). The half widths enter only through their sums against |q|:
  // <half_j, |q|> = half_steps_j * <step, |q|> + magnitude_slack * <magnitude, |q|> + abs_slack * <1, |q|>, and
  // the margin's <magnitude + half_j, |q|> = <magnitude, |q|> + <half_j, |q|>, where <magnitude, |q|> is the box
  // bound's margin sum too. Heads go in pairs, whose 14 sums take one transposing reduction.
  // CHUNKS: the number of 16-channel chunks, ceil(D / 16), when fixed at compile time (0: D's)
  template <i64 CHUNKS>
  void summarise_cell(const float* lo, const float* hi, i64 i, Bounds& b, i64 jobs, const float* half_steps,
                      const float* unknown_half, const float* rounding) {
    const i64 chunks = CHUNKS ? CHUNKS : (D_ + 15) / 16, blocks = (chunks + 3) / 4, width = 64 * blocks;
    const i64 word_stride = words_stride();
    const __m512 inf = _mm512_set1_ps(INF_F), levels = _mm512_set1_ps(float((i64(1) << a_.code_bits) - 1));
    const bool steps_needed = unknown_half[0] != 0 || (jobs > 1 && unknown_half[1] != 0);
    // the cell's channels, once for all heads (lanes past D hold zeros: they weigh nothing)
    lanes_.resize(4 * width);
    float *range = lanes_.data(), *step = range + width, *finite = step + width, *magnitude = finite + width;
    for (i64 c = 0; c < chunks; ++c) {
      const i64 d = 16 * c;
      const __mmask16 in = D_ - d >= 16 ? __mmask16(0xffff) : __mmask16((1u << (D_ - d)) - 1);
      const __m512 l = _mm512_maskz_loadu_ps(in, lo + d), h = _mm512_maskz_loadu_ps(in, hi + d);
      const __m512 r = _mm512_sub_ps(h, l), st = _mm512_div_ps(r, levels);
      _mm512_storeu_ps(range + d, r);
      _mm512_storeu_ps(step + d, st);
      _mm512_storeu_ps(finite + d, _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(_mm512_abs_ps(st), inf, _CMP_LT_OQ), st));
      _mm512_storeu_ps(magnitude + d, _mm512_max_ps(_mm512_abs_ps(l), _mm512_abs_ps(h)));
    }
    const int range_bits = 31 - __builtin_clz(uint32_t(a_.code_weight_range));
    const float s = float(a_.scale);
    scaled_.resize(width);
    for (i64 g0 = 0; g0 < G_; g0 += 2) {
      const i64 pair = std::min<i64>(2, G_ - g0);
      // per head: the box's upper and lower sums' parts past base, <magnitude, |q|>, <lo, q>, <step, q>,
      // <step, |q|>, the residual
      __m512 sums[2][7];
      int exponent[2];
      float top[2];
      for (__m512& x : sums[1]) x = _mm512_setzero_ps();     // (an odd last head)
      for (i64 h = 0; h < pair; ++h) {
        const i64 g = g0 + h;
        const float *q = &q_[g * D_], *qa = &q_abs_[g * D_], *pos = &q_pos_[g * D_], *neg = &q_neg_[g * D_];
        __m512 largest = _mm512_setzero_ps(), sum[7];           // in registers: sums[h] is memory
        for (__m512& x : sum) x = _mm512_setzero_ps();
        for (i64 c = 0; c < chunks; ++c) {
          const i64 d = 16 * c;
          const __mmask16 in = D_ - d >= 16 ? __mmask16(0xffff) : __mmask16((1u << (D_ - d)) - 1);
          const __m512 qv = _mm512_maskz_loadu_ps(in, q + d), qav = _mm512_maskz_loadu_ps(in, qa + d);
          const __m512 r = _mm512_loadu_ps(range + d);
          sum[0] = _mm512_fmadd_ps(r, _mm512_maskz_loadu_ps(in, pos + d), sum[0]);
          sum[1] = _mm512_fmadd_ps(r, _mm512_maskz_loadu_ps(in, neg + d), sum[1]);
          sum[2] = _mm512_fmadd_ps(_mm512_loadu_ps(magnitude + d), qav, sum[2]);
          sum[3] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(in, lo + d), qv, sum[3]);
          const __m512 w = _mm512_mul_ps(qv, _mm512_loadu_ps(finite + d));
          if (steps_needed) sum[4] = _mm512_add_ps(sum[4], w);
          sum[5] = _mm512_fmadd_ps(_mm512_loadu_ps(step + d), qav, sum[5]);
          _mm512_storeu_ps(&scaled_[d], w);
          largest = _mm512_max_ps(largest, _mm512_abs_ps(w));
        }
        top[h] = _mm512_reduce_max_ps(largest);
        const bool usable = top[h] > 0 && top[h] < INF_F;
        exponent[h] = usable ? weight_exponent(top[h], range_bits) : 0;
        // x = rint(w / 2^e) (cvtps rounds to nearest even), 64 channels at a time; packed to int16 (packs'
        // lane order, which GROUP_LANES undoes) and split into the four channel groups: word k of group r holds
        // channels 8k + r and 8k + 4 + r, as the codes' 16-bit lanes split into nibbles pair them
        const __m512 down = _mm512_set1_ps(float(-exponent[h]));
        int32_t* words = &stash_words_[(i * G_ + g) * 4 * word_stride];
        for (i64 j = 0; j < blocks; ++j) {
          __m512i x[4];
          for (i64 k = 0; k < 4; ++k) {
            const i64 c = 4 * j + k;
            x[k] = _mm512_setzero_si512();
            if (!usable || c >= chunks) continue;         // 0 past D, and for unusable weights
            const __m512 y = _mm512_scalef_ps(_mm512_loadu_ps(&scaled_[16 * c]), down);
            x[k] = _mm512_cvtps_epi32(y);
            sum[6] = _mm512_add_ps(sum[6], _mm512_abs_ps(_mm512_sub_ps(y, _mm512_cvtepi32_ps(x[k]))));
          }
          const __m512i v0 = _mm512_packs_epi32(x[0], x[1]), v1 = _mm512_packs_epi32(x[2], x[3]);
          const __m512i groups01 = _mm512_permutex2var_epi16(v0, _mm512_load_si512(GROUP_LANES.lanes[0]), v1);
          const __m512i groups23 = _mm512_permutex2var_epi16(v0, _mm512_load_si512(GROUP_LANES.lanes[1]), v1);
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(&words[8 * j]), _mm512_castsi512_si256(groups01));
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(&words[word_stride + 8 * j]),
                              _mm512_extracti64x4_epi64(groups01, 1));
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(&words[2 * word_stride + 8 * j]),
                              _mm512_castsi512_si256(groups23));
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(&words[3 * word_stride + 8 * j]),
                              _mm512_extracti64x4_epi64(groups23, 1));
        }
        for (int k = 0; k < 7; ++k) sums[h][k] = sum[k];
      }
      float total[16];
      sum_lanes(&sums[0][0], total);          // sums[h][k] at total[7 * h + k]
      for (i64 h = 0; h < pair; ++h) {
        const i64 g = g0 + h;
        const float* t = &total[7 * h];
        const float box_margin = margin(t[2]);
        b.ub[g * b.n + i] = finite_or(s * (t[3] + t[0]) + box_margin, INF_F);
        b.lb[g * b.n + i] = finite_or(s * (t[3] + t[1]) - box_margin, -INF_F);
        const bool usable = top[h] > 0 && top[h] < INF_F;
        const float residual = usable ? t[6] : top[h] == 0 ? 0.0f : INF_F;
        float* terms = &stash_terms_[(i * G_ + g) * STASH_TERMS];
        for (i64 k = 0; k < jobs; ++k) {
          const float wide =
              half_steps[k] * t[5] + float(a_.magnitude_slack) * t[2] + float(a_.abs_slack) * q_abs_sum_[g];
          terms[k] = t[3] + unknown_half[k] * t[4];
          terms[2 + k] = wide + times_power_of_two(rounding[k] * residual, exponent[h]);
          terms[4 + k] = margin(t[2] + wide);
        }
        terms[6] = float(exponent[h]);
      }
    }
  }

  // out[k] = the sum of the lanes of v[k], k < 14 (out has room for 16): one transposing reduction
  static void sum_lanes(const __m512* v, float* out) {
    const __m512 zero = _mm512_setzero_ps();
    __m512 a[8], b[4];
    for (int k = 0; k < 8; ++k) {           // per 128-bit lane: [x0+x2, y0+y2, x1+x3, y1+y3] of v[2k], v[2k + 1]
      const __m512 x = 2 * k < 14 ? v[2 * k] : zero, y = 2 * k + 1 < 14 ? v[2 * k + 1] : zero;
      a[k] = _mm512_add_ps(_mm512_unpacklo_ps(x, y), _mm512_unpackhi_ps(x, y));
    }
    for (int k = 0; k < 4; ++k) {           // per 128-bit lane L: the sums over L of v[4k .. 4k + 3]
      const __m512d p = _mm512_castps_pd(a[2 * k]), q = _mm512_castps_pd(a[2 * k + 1]);
      b[k] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(p, q)), _mm512_castpd_ps(_mm512_unpackhi_pd(p, q)));
    }
    auto join = [](__m512 x, __m512 y) {    // 128-bit lanes (0 + 1, 2 + 3) of x, then of y
      return _mm512_add_ps(_mm512_shuffle_f32x4(x, y, 0x88), _mm512_shuffle_f32x4(x, y, 0xDD));
    };
    _mm512_storeu_ps(out, join(join(b[0], b[1]), join(b[2], b[3])));
  }

  // The vector code dots take up to MAX_HEADS query heads per pass over a cell's codes: each code byte is
  // split into its nibbles once for all of them.
  static constexpr i64 MAX_HEADS = 4;
  template <typename F>
  static void with_heads(i64 remaining, F&& f) {
    switch (std::min(remaining, MAX_HEADS)) {
      case 1: f(std::integral_constant<int, 1>()); break;
      case 2: f(std::integral_constant<int, 2>()); break;
      case 3: f(std::integral_constant<int, 3>()); break;
      default: f(std::integral_constant<int, 4>()); break;
    }
  }

  // The bounds of a kept cell's tokens (entries [first, first + cell_size) of tb; with both_planes_ also those
  // from both planes into fine_), from its stash entry `entry`, capped by the cell's box bounds (cell_ub,
  // cell_lb: [G] at the given stride); 16 tokens a pass, all with the cell's weights.
  void stashed_bounds(i64 cell, i64 entry, Bounds& tb, i64 first, const float* cell_ub, const float* cell_lb,
                      i64 cell_stride) {
    i64 block, slot;
    locate(0, cell, block, slot);
    const uint8_t* codes = cell_codes(block, slot, 0);
    for (i64 t = 0; t < a_.cell_size; t += 16)
      for (i64 g = 0; g < G_; g += MAX_HEADS)
        with_heads(G_ - g, [&](auto heads) {
          stashed_dots<heads()>(codes + t * a_.code_token_stride, entry, g, tb, first + t, cell_ub, cell_lb,
                                cell_stride);
        });
  }

  template <int HEADS>
  void stashed_dots(const uint8_t* codes, i64 entry, i64 g, Bounds& tb, i64 first, const float* cell_ub,
                    const float* cell_lb, i64 cell_stride) {
    const int32_t* words = &stash_words_[(entry * G_ + g) * 4 * words_stride()];
    const float* terms = &stash_terms_[(entry * G_ + g) * STASH_TERMS];
    __m512i coarse[HEADS], extra[HEADS];
    plane_dots<HEADS>(codes, words, coarse);
    if (both_planes_) plane_dots<HEADS>(codes + a_.plane_bytes, words, extra);
    for (int h = 0; h < HEADS; ++h) {
      const i64 at = (g + h) * tb.n + first;
      const float* t = terms + h * STASH_TERMS;
      const float up = cell_ub[(g + h) * cell_stride], down = cell_lb[(g + h) * cell_stride];
      store_bounds(coarse[h], t, 0, up, down, tb, at);
      if (both_planes_) store_bounds(_mm512_add_epi32(_mm512_slli_epi32(coarse[h], 4), extra[h]), t, 1, up, down,
                                     fine_, at);
    }
  }

  // Code nibbles times weights, both int16, summed in pairs into the int32 lanes of acc
  static __m512i dot_pairs(__m512i acc, __m512i codes, __m512i weights) {
#if defined(__AVX512VNNI__)
    return _mm512_dpwssd_epi32(acc, codes, weights);
#else
    return _mm512_add_epi32(acc, _mm512_madd_epi16(codes, weights));
#endif
  }

  // The nibble groups of 16-bit code lanes (4 channels each): group r holds nibble r of every lane
  static void nibble_groups(__m512i codes, __m512i* group) {
    const __m512i nibble = _mm512_set1_epi16(15);
    group[0] = _mm512_and_si512(codes, nibble);
    group[1] = _mm512_and_si512(_mm512_srli_epi16(codes, 4), nibble);
    group[2] = _mm512_and_si512(_mm512_srli_epi16(codes, 8), nibble);
    group[3] = _mm512_srli_epi16(codes, 12);
  }

  // dot[h] = the 16 tokens' integer code dots of one plane (codes: its first byte of token 0) for head h of
  // the weight words `words` (heads words_stride() * 4 apart). A plane of at most 64 bytes is read a token row
  // at a time (two rows per vector up to 32 bytes), dotted with the weights in place and each token's lanes
  // summed by a transposing reduction; wider planes gather 4 bytes of all 16 tokens at a time.
  template <int HEADS>
  void plane_dots(const uint8_t* codes, const int32_t* words, __m512i* dot) const {
    if (a_.plane_bytes <= 32) return row_dots<HEADS, 8>(codes, words, dot);
    if (a_.plane_bytes <= 64) return row_dots<HEADS, 16>(codes, words, dot);
    gathered_dots<HEADS>(codes, words, dot);
  }

  // plane_dots from token rows: WORDS = 8 (rows of up to 32 bytes, two tokens per vector) or 16 (up to 64)
  template <int HEADS, int WORDS>
  void row_dots(const uint8_t* codes, const int32_t* words, __m512i* dot) const {
    constexpr int VECTORS = WORDS;        // 16 tokens, 16 / WORDS of them per vector
    const i64 stride = a_.code_token_stride, word_stride = words_stride();
    const uint64_t row_mask = a_.plane_bytes >= 64 ? ~uint64_t(0) : (uint64_t(1) << a_.plane_bytes) - 1;
    __m512i weights[HEADS][4];
    for (int h = 0; h < HEADS; ++h)
      for (int r = 0; r < 4; ++r) {
        const int32_t* at = &words[(h * 4 + r) * word_stride];
        weights[h][r] = WORDS == 8
            ? _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(at)))
            : _mm512_loadu_si512(at);
      }
    __m512i partial[HEADS][VECTORS];
    for (int v = 0; v < VECTORS; ++v) {
      __m512i row;
      if (WORDS == 8) {     // tokens (v, v + 4), then (v + 4, v + 8): the reduction then leaves tokens in order
        const i64 first = v < 4 ? v : v + 4;
        row = _mm512_inserti64x4(
            _mm512_castsi256_si512(_mm256_maskz_loadu_epi8(__mmask32(row_mask), codes + first * stride)),
            _mm256_maskz_loadu_epi8(__mmask32(row_mask), codes + (first + 4) * stride), 1);
      } else {
        row = _mm512_maskz_loadu_epi8(__mmask64(row_mask), codes + v * stride);
      }
      __m512i group[4];
      nibble_groups(row, group);
      for (int h = 0; h < HEADS; ++h) {
        const __m512i even = dot_pairs(dot_pairs(_mm512_setzero_si512(), group[0], weights[h][0]), group[2],
                                       weights[h][2]);
        partial[h][v] = dot_pairs(dot_pairs(even, group[1], weights[h][1]), group[3], weights[h][3]);
      }
    }
    for (int h = 0; h < HEADS; ++h) dot[h] = sum_rows<VECTORS>(partial[h]);
  }

  // The transposing reduction of row_dots: 8 vectors of two tokens (tokens v, v + 4 and v + 4, v + 8 in 8 lanes
  // each) or 16 of one token (16 lanes each) -> the 16 tokens' sums, in token order
  template <int VECTORS>
  static __m512i sum_rows(const __m512i* v) {
    __m512i a[VECTORS / 2], b[VECTORS / 4];
    for (int i = 0; i < VECTORS / 2; ++i) {   // per 128-bit lane: halves of 4-word sums of v[2i], v[2i + 1]
      const __m512i x = v[2 * i], y = v[2 * i + 1];
      a[i] = _mm512_add_epi32(_mm512_unpacklo_epi32(x, y), _mm512_unpackhi_epi32(x, y));
    }
    for (int i = 0; i < VECTORS / 4; ++i) {   // per 128-bit lane L: the 4-word sums of v[4i .. 4i + 3] at L
      const __m512i x = a[2 * i], y = a[2 * i + 1];
      b[i] = _mm512_add_epi32(_mm512_unpacklo_epi64(x, y), _mm512_unpackhi_epi64(x, y));
    }
    auto join = [](__m512i x, __m512i y) {    // lanes (0 + 1, 2 + 3) of x, then of y
      return _mm512_add_epi32(_mm512_shuffle_i32x4(x, y, 0x88), _mm512_shuffle_i32x4(x, y, 0xDD));
    };
    if (VECTORS == 8) return join(b[0], b[1]);
    return join(join(b[0], b[1]), join(b[2], b[3]));
  }

  // plane_dots by gathers: each brings 4 code bytes of all 16 tokens
  template <int HEADS>
  void gathered_dots(const uint8_t* codes, const int32_t* words, __m512i* dot) const {
    const __m512i index = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                             _mm512_set1_epi32(int32_t(a_.code_token_stride)));
    const i64 per_token = a_.plane_bytes / 4, word_stride = words_stride();
    __m512i acc[HEADS][2];              // two sums per head: shorter dependency chains
    for (int h = 0; h < HEADS; ++h) acc[h][0] = acc[h][1] = _mm512_setzero_si512();
    for (i64 k = 0; k < per_token; ++k) {
      __m512i group[4];
      nibble_groups(_mm512_i32gather_epi32(index, codes + 4 * k, 1), group);
      for (int h = 0; h < HEADS; ++h) {
        const int32_t* at = &words[h * 4 * word_stride + k];
        for (int r = 0; r < 4; ++r)
          acc[h][r % 2] = dot_pairs(acc[h][r % 2], group[r], _mm512_set1_epi32(at[r * word_stride]));
      }
    }
    for (int h = 0; h < HEADS; ++h) dot[h] = _mm512_add_epi32(acc[h][0], acc[h][1]);
  }

  // ub, lb of 16 tokens at entries [at, at + 16) of b from their integer code dots and the stashed terms of
  // job j, capped by the cell's box bounds (up, down)
  void store_bounds(__m512i dot, const float* terms, i64 j, float up, float down, Bounds& b, i64 at) const {
    const __m512 s = _mm512_set1_ps(float(a_.scale)), inf = _mm512_set1_ps(INF_F);
    const __m512 value = _mm512_scalef_ps(_mm512_cvtepi32_ps(dot), _mm512_set1_ps(terms[6]));
    const __m512 center = _mm512_fmadd_ps(_mm512_set1_ps(stash_place_[j]), value, _mm512_set1_ps(terms[j]));
    const __m512 width = _mm512_set1_ps(terms[2 + j]), margin_j = _mm512_set1_ps(terms[4 + j]);
    const __m512 upper = _mm512_fmadd_ps(s, _mm512_add_ps(center, width), margin_j);
    const __m512 lower = _mm512_fmsub_ps(s, _mm512_sub_ps(center, width), margin_j);
    const __m512 ub = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(upper, upper, _CMP_UNORD_Q), upper, inf);
    const __m512 lb = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(lower, lower, _CMP_UNORD_Q), lower,
                                           _mm512_sub_ps(_mm512_setzero_ps(), inf));
    _mm512_storeu_ps(&b.ub[at], _mm512_min_ps(ub, _mm512_set1_ps(up)));
    _mm512_storeu_ps(&b.lb[at], _mm512_max_ps(lb, _mm512_set1_ps(down)));
  }
#endif

  // -- selection rules (core.selection); every [G, P] array is head-major --------------------------
  // The certified greedy skip: log_mass [G, P]; log_gain [G, P] or null; log_spent [G] or null.
  template <typename T>
  std::vector<uint8_t> greedy_skip(const Terms<T>& log_mass, const std::vector<double>& log_budget,
                                   const std::vector<uint8_t>& valid, const Terms<float>* log_gain,
                                   const std::vector<double>* log_spent, std::vector<double>& spent) {
    const i64 P = i64(valid.size()), bins = a_.hist_bins;
    std::vector<uint8_t> skip(P, 1);
    std::vector<double> hist(bins), gain_hist(log_gain ? bins : 0);
    HeadMasses& m = head_masses_;
    m.resize(P, G_, log_gain != nullptr);
    spent.assign(G_, 0.0);
    for (i64 g = 0; g < G_; ++g) {
      double ref = log_budget[g];
      if (log_gain) ref = logaddexp(log_budget[g], log_sum_exp(log_gain->row(g, P), valid));
      float* mass = &m.mass[g * P];
      const Terms<float> gain_row = log_gain ? log_gain->row(g, P) : Terms<float>{};
      relative_masses(log_mass.row(g, P), log_gain ? &gain_row : nullptr, valid.data(), P, ref, m, mass);
      if (log_gain) histograms<2>(m.bin.data(), mass, m.gain.data(), P, hist.data(), gain_hist.data());
      else histograms<1>(m.bin.data(), mass, nullptr, P, hist.data(), nullptr);
      double base = 1.0, gains = 0.0;
      if (log_gain) {
        const bool finite = std::isfinite(ref);
        base = finite ? std::exp(log_budget[g] - ref) : 0.0;
        if (log_spent) base -= finite ? std::exp((*log_spent)[g] - ref) : 0.0;
        for (double x : gain_hist) gains += x;
      }
      i64 allowed = 0;
      double cumulative = 0.0, gain_cumulative = 0.0;
      for (i64 k = 0; k < bins; ++k) {
        cumulative += hist[k];
        double allowance = 1.0;
        if (log_gain) {
          gain_cumulative += gain_hist[k];
          allowance = base + gains - gain_cumulative;
        }
        // the left side only grows and the right only shrinks (in fp64 too): the bins allowed are a prefix
        if (!(cumulative <= (1.0 - a_.budget_slack) * allowance)) break;
        ++allowed;
      }
      // a node is skipped only if every head of the group may skip it
      const int32_t* __restrict bin = m.bin.data();
      const uint8_t* __restrict fits = m.fits.data();
      uint8_t* __restrict out = skip.data();
      for (i64 p = 0; p < P; ++p) out[p] &= fits[p] & uint8_t(bin[p] < allowed);
    }
    for (i64 p = 0; p < P; ++p) skip[p] &= valid[p];
    for (i64 g = 0; g < G_; ++g) {      // once the group's decision is known (a skipped node fits: its mass)
      const uint8_t* __restrict skipped = skip.data();
      const float* __restrict mass = &m.mass[g * P];
      double total = 0.0;               // in a register, branch-free: the sum vectorizes
      for (i64 p = 0; p < P; ++p) total += skipped[p] ? double(mass[p]) : 0.0;
      spent[g] = total;
    }
    return skip;
  }

  // hist[k] = the sum of x[p] over the p < P with bin[p] == k, in fp64, and with WIDTH 2 y's into y_hist in the
  // same pass (a bin's two sums side by side). Four partial histograms (node p adds to p % 4's; the last P % 4 to
  // the first), so that runs of nodes in one bin do not wait on each other's sums.
  template <i64 WIDTH>
  void histograms(const int32_t* bin, const float* x, const float* y, i64 P, double* hist, double* y_hist) {
    const i64 bins = a_.hist_bins, stride = bins * WIDTH;
    partial_hist_.assign(4 * stride, 0.0);
    double* __restrict part = partial_hist_.data();
    const auto add = [&](i64 k, i64 p) {
      double* sums = part + k * stride + bin[p] * WIDTH;
      sums[0] += double(x[p]);
      if constexpr (WIDTH == 2) sums[1] += double(y[p]);
    };
    i64 p = 0;
    for (; p + 4 <= P; p += 4)
      for (i64 k = 0; k < 4; ++k) add(k, p + k);
    for (; p < P; ++p) add(0, p);
    for (i64 w = 0; w < WIDTH; ++w) {
      const double* at = part + w;
      double* out = w ? y_hist : hist;
      for (i64 b = 0; b < bins; ++b, at += WIDTH)
        out[b] = (at[0] + at[stride]) + (at[2 * stride] + at[3 * stride]);
    }
  }
  std::vector<double> partial_hist_;

  // greedy_skip's per-node quantities for one head, against its reference ref: [P] each (mass: every head's)
  struct HeadMasses {
    std::vector<int32_t> bin;     // histogram bin of the relative log-mass
    std::vector<uint8_t> fits;    // relative log-mass <= 0 (masses that may be skipped)
    std::vector<float> mass;      // [G, P]: relative mass where it fits, else 0
    std::vector<float> gain;      // relative gain (valid nodes, finite ref), else 0
    void resize(i64 P, i64 G, bool gains) {
      bin.resize(P + 16);
      fits.resize(P + 16);
      mass.resize(G * P + 16);
      gain.resize(gains ? P + 16 : 0);
    }
  };
  HeadMasses head_masses_;

  // For p < P: rel = log_mass - ref (-inf where invalid), its bin floor((rel + range) * bins / range) clamped
  // to [0, bins) (NaN: 0), fits = rel <= 0, mass = exp(rel) where it fits (0 for -inf), and with log_gain the
  // gain exp(min(log_gain - ref, 0)) of valid nodes when ref is finite. 16 nodes a pass: for fp64 terms (the
  // nodes above the tokens) the sums and floors are the scalar ones', for fp32 terms (the tokens) fp32's; the
  // exponentials are the same fp32 polynomial (relative error ~1e-6, far inside budget_slack).
  template <typename T>
  void relative_masses(const Terms<T>& log_mass, const Terms<float>* log_gain, const uint8_t* valid, i64 P, double ref,
                       HeadMasses& m, float* mass) const {
    const double per_nat = double(a_.hist_bins) / a_.hist_range, top_bin = double(a_.hist_bins - 1);
    const bool gains = log_gain && std::isfinite(ref);
    i64 p = 0;
#if HSR_AVX512
    if constexpr (std::is_same_v<T, float>) {
      // fp32 terms (the tokens' bounds): rel = x - (ref - shift) in fp32 lanes, 16 a pass; its error, an ulp of
      // the bounds (~1e-6 nats), is far inside budget_slack, and moves a node on a bin's edge as a near-tie would
      const __m512 mass_ref = _mm512_set1_ps(float(ref - log_mass.shift)),
                   gain_ref = _mm512_set1_ps(gains ? float(ref - log_gain->shift) : 0.0f),
                   range = _mm512_set1_ps(float(a_.hist_range)), scale = _mm512_set1_ps(float(per_nat)),
                   zero = _mm512_setzero_ps(), top = _mm512_set1_ps(float(top_bin)), minus_inf = _mm512_set1_ps(-INF_F);
      for (; p + 16 <= P; p += 16) {
        const __mmask16 in = flag_mask(valid + p, 16);
        const __m512 rel = _mm512_mask_sub_ps(minus_inf, in, _mm512_loadu_ps(log_mass.x + p), mass_ref);
        __m512 where = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_add_ps(rel, range), scale),
                                            _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
        where = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(where, where, _CMP_UNORD_Q), where, zero);
        where = _mm512_min_ps(_mm512_max_ps(where, zero), top);
        _mm512_storeu_si512(&m.bin[p], _mm512_cvtps_epi32(where));
        const __mmask16 fit = _mm512_cmp_ps_mask(rel, zero, _CMP_LE_OQ);
        const __mmask16 counted = fit & _mm512_cmp_ps_mask(rel, minus_inf, _CMP_NEQ_UQ);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(&m.fits[p]), _mm_maskz_set1_epi8(fit, 1));
        _mm512_storeu_ps(mass + p, _mm512_maskz_mov_ps(counted, exp_nonpositive(rel)));
        if (gains) {    // min(0, x): x where x is NaN, as std::min(x, 0.0)
          const __m512 x = _mm512_min_ps(zero, _mm512_sub_ps(_mm512_loadu_ps(log_gain->x + p), gain_ref));
          const __mmask16 real = in & _mm512_cmp_ps_mask(x, minus_inf, _CMP_NEQ_UQ);
          _mm512_storeu_ps(&m.gain[p], _mm512_maskz_mov_ps(real, exp_nonpositive(x)));
        }
      }
    }
    const __m512d ref_v = _mm512_set1_pd(ref), range = _mm512_set1_pd(a_.hist_range),
                  scale = _mm512_set1_pd(per_nat), zero = _mm512_setzero_pd(), top = _mm512_set1_pd(top_bin),
                  minus_inf = _mm512_set1_pd(NEG_INF);
    for (; p + 16 <= P; p += 16) {
      const __mmask16 in = flag_mask(valid + p, 16);
      __m256 rel32[2], gain32[2];
      __mmask8 fits[2], finite[2];
      for (int half = 0; half < 2; ++half) {
        const i64 at = p + 8 * half;
        const __mmask8 lanes = __mmask8(in >> (8 * half));
        const __m512d rel = _mm512_mask_sub_pd(minus_inf, lanes, log_mass.load8(at), ref_v);
        __m512d where = _mm512_roundscale_pd(_mm512_mul_pd(_mm512_add_pd(rel, range), scale),
                                             _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
        where = _mm512_mask_blend_pd(_mm512_cmp_pd_mask(where, where, _CMP_UNORD_Q), where, zero);
        where = _mm512_min_pd(_mm512_max_pd(where, zero), top);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(&m.bin[at]), _mm512_cvtpd_epi32(where));
        fits[half] = _mm512_cmp_pd_mask(rel, zero, _CMP_LE_OQ);
        finite[half] = fits[half] & _mm512_cmp_pd_mask(rel, minus_inf, _CMP_NEQ_UQ);
        rel32[half] = _mm512_cvtpd_ps(rel);
        if (gains)    // min(0, x): x where x is NaN, as std::min(x, 0.0)
          gain32[half] = _mm512_cvtpd_ps(_mm512_min_pd(zero, _mm512_sub_pd(log_gain->load8(at), ref_v)));
      }
      const __mmask16 fit = __mmask16(fits[0] | (fits[1] << 8)), counted = __mmask16(finite[0] | (finite[1] << 8));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(&m.fits[p]), _mm_maskz_set1_epi8(fit, 1));
      const __m512 rel = _mm512_insertf32x8(_mm512_castps256_ps512(rel32[0]), rel32[1], 1);
      _mm512_storeu_ps(mass + p, _mm512_maskz_mov_ps(counted, exp_nonpositive(rel)));
      if (gains) {
        const __m512 x = _mm512_insertf32x8(_mm512_castps256_ps512(gain32[0]), gain32[1], 1);
        // relative_mass: 0 for -inf
        const __mmask16 real = in & _mm512_cmp_ps_mask(x, _mm512_set1_ps(-INF_F), _CMP_NEQ_UQ);
        _mm512_storeu_ps(&m.gain[p], _mm512_maskz_mov_ps(real, exp_nonpositive(x)));
      }
    }
#endif
    for (; p < P; ++p) {
      const double rel = valid[p] ? log_mass.at(p) - ref : NEG_INF;
      const double where = std::floor((rel + a_.hist_range) * per_nat);
      m.bin[p] = std::isnan(where) ? 0 : int32_t(std::min<double>(std::max<double>(where, 0.0), top_bin));
      m.fits[p] = rel <= 0;
      mass[p] = rel <= 0 ? float(relative_mass(rel)) : 0.0f;
      if (log_gain) m.gain[p] = gains && valid[p] ? float(relative_mass(std::min(log_gain->at(p) - ref, 0.0))) : 0.0f;
    }
    if (log_gain && !gains) std::fill(m.gain.begin(), m.gain.begin() + P, 0.0f);
  }

  // exp(x) for x <= 0 in fp32 (0 for -inf)
  static double relative_mass(double x) { return x == NEG_INF ? 0.0 : double(exp_nonpositive(float(x))); }

  // ln of the sum of exp(x[p]) over the valid p (-inf if none): one exp per term, relative to the largest x
  // (the shift cancels), in fp32 (sum_exp_below). A NaN term is passed over for the maximum and makes the sum
  // NaN; all terms NaN give -inf, a +inf term +inf (as the scalar rule)
  static double log_sum_exp(const Terms<float>& x, const std::vector<uint8_t>& valid) {
    const i64 P = i64(valid.size());
    const float top = flagged_max(x.x, valid.data(), P);
    if (!std::isfinite(top)) return top;
    return x.shift + double(top) + std::log(sum_exp_below(x.x, valid.data(), P, top));
  }

  // The largest v such that the weights of the values >= v sum to at least `budget` (unit weights: the
  // budget-th largest value; weight 0 leaves a value out), -inf if they never do. With token counts as
  // weights it is core.selection.topk_floor: a score that at least `budget` tokens are known to reach. A radix
  // select on order-preserving integer keys, 11 bits at a time: each pass sums the survivors' weights into 2048
  // bins and keeps the bin that holds the answer (no sort: a sort or nth_element was a tenth of the query at 16K
  // tokens).
  template <typename Weight>
  static float kth_largest(const std::vector<float>& values, const std::vector<Weight>& weights, i64 budget) {
    static thread_local std::vector<uint32_t> keys;
    static thread_local std::vector<i64> kept_weights;
    keys.resize(values.size());
    kept_weights.resize(values.size());
    uint32_t* __restrict key = keys.data();
    i64* __restrict weight = kept_weights.data();
    const float* __restrict value = values.data();
    const Weight* __restrict given = weights.data();
    size_t n = 0;
    i64 total = 0;
    for (size_t i = 0; i < values.size(); ++i) {
      key[n] = ordered_key(value[i]);
      weight[n] = i64(given[i]);
      total += i64(given[i]);
      n += given[i] != 0;
    }
    if (total < budget || budget < 1) return -INF_F;
    i64 rank = budget;                        // weight still to cover, from the top of the survivors
    uint32_t prefix = 0;
    for (const int shift : {21, 10, 0}) {      // digits of 11, 11 and 10 bits
      const uint32_t bins = shift ? 2048u : 1024u;
      i64 sum[2048] = {};
      for (size_t i = 0; i < n; ++i) sum[(key[i] >> shift) & (bins - 1)] += weight[i];
      uint32_t bin = bins - 1;
      for (; sum[bin] < rank; --bin) rank -= sum[bin];
      size_t kept = 0;
      for (size_t i = 0; i < n; ++i) {
        key[kept] = key[i];
        weight[kept] = weight[i];
        kept += ((key[i] >> shift) & (bins - 1)) == bin;
      }
      n = kept;
      prefix |= bin << shift;
    }
    return key_value(prefix);
  }
  // kth_largest(values, flags, budget) (unit weights) where budget is a small share of the values: the same
  // value, found among the flagged values >= L only, where L comes from a strided sample (its rank there past
  // the answer's expected rank, so L most likely lies below the answer) and is checked: once at least `budget`
  // values reach L, so does the answer. A lower L is tried if it did not, then every value.
  float kth_of_many(const std::vector<float>& values, const std::vector<uint8_t>& flags, i64 budget) {
    constexpr i64 STRIDE = 16;
    const i64 n = i64(values.size());
    if (budget < 4 * STRIDE || n < 8 * budget) return kth_largest(values, flags, budget);
    sample_.clear();
    for (i64 t = 0; t < n; t += STRIDE) if (flags[t]) sample_.push_back(values[t]);
    const i64 expected = budget / STRIDE;              // the answer's expected rank in the sample
    for (const i64 rank : {expected * 5 / 4 + 8, expected * 2 + 16, expected * 4 + 32}) {
      if (rank < 1 || rank > i64(sample_.size())) break;
      std::nth_element(sample_.begin(), sample_.begin() + rank - 1, sample_.end(), std::greater<float>());
      const float floor = sample_[rank - 1];
      candidates_.resize(n + 16);
      const i64 count = values_reaching(values.data(), flags.data(), n, floor, candidates_.data());
      if (count >= budget) {
        candidates_.resize(count);
        return kth_largest(candidates_, std::vector<uint8_t>(count, 1), budget);
      }
    }
    return kth_largest(values, flags, budget);
  }
  std::vector<float> sample_, candidates_;

  // the flagged values[t] >= floor, in order, into out (room for n + 16); returns their count
  static i64 values_reaching(const float* values, const uint8_t* flags, i64 n, float floor, float* out) {
    i64 count = 0, t = 0;
#if HSR_AVX512
    const __m512 f = _mm512_set1_ps(floor);
    for (; t < n; t += 16) {
      const __mmask16 in = flag_mask(flags + t, n - t);
      const __m512 v = _mm512_maskz_loadu_ps(in, values + t);
      const __mmask16 reach = _mm512_mask_cmp_ps_mask(in, v, f, _CMP_GE_OQ);
      _mm512_storeu_ps(out + count, _mm512_maskz_compress_ps(reach, v));   // (a register compress: the store
      count += __builtin_popcount(reach);                                   //  form is slow on some cores)
    }
#endif
    for (; t < n; ++t) {
      out[count] = values[t];
      count += flags[t] && values[t] >= floor;
    }
    return count;
  }

  // float <-> uint32 whose unsigned order is the floats' order (-inf lowest, +inf highest)
  static uint32_t ordered_key(float x) {
    uint32_t bits;
    std::memcpy(&bits, &x, 4);
    return bits & 0x80000000u ? ~bits : bits | 0x80000000u;
  }
  static float key_value(uint32_t key) {
    const uint32_t bits = key & 0x80000000u ? key & 0x7fffffffu : ~key;
    float x;
    std::memcpy(&x, &bits, 4);
    return x;
  }

  // Add n * exp(ub) of the dropped entries (counts null: n = 1) to each head's skipped mass; returns the
  // ln added [G]. ub: [G, P]. Each head's sum runs from its largest term, so every exponent is <= 0; the
  // token sums are branch-free (`dropped` is as unpredictable as a coin) in fp32 blocks.
  // (not inlined: inlined into walk, with the rest that walk inlines, it crashes GCC 12.2's loop vectorizer)
  __attribute__((noinline)) std::vector<double> record_skipped(const std::vector<uint8_t>& dropped, const std::vector<i64>* counts,
                                     const std::vector<float>& ub) {
    const i64 P = i64(dropped.size());
    std::vector<double> added(G_, NEG_INF);
    for (i64 g = 0; g < G_; ++g) {
      const float* x = &ub[g * P];
      double top = NEG_INF;
      if (counts) {
        for (i64 p = 0; p < P; ++p)
          if (dropped[p]) top = std::max(top, double(x[p]) + std::log(double((*counts)[p])));
      } else {
        top = flagged_max(x, dropped.data(), P);
      }
      if (!std::isfinite(top)) { added[g] = top; continue; }
      double sum = 0;
      if (counts) {
        for (i64 p = 0; p < P; ++p)
          if (dropped[p]) sum += double((*counts)[p]) * std::exp(double(x[p]) - top);
      } else {
        sum = sum_exp_below(x, dropped.data(), P, float(top)) * EXP_SLACK;
      }
      added[g] = top + std::log(sum);
    }
    for (i64 g = 0; g < G_; ++g) skipped_[g] = logaddexp(skipped_[g], added[g]);
    return added;
  }

  // max of x[p] over the flagged p < n, NaN passed over (as std::max passes it), -inf if none
  static float flagged_max(const float* x, const uint8_t* flags, i64 n) {
    i64 p = 0;
    float top = -INF_F;
#if HSR_AVX512
    __m512 lanes = _mm512_set1_ps(-INF_F);
    for (; p < n; p += 16) {
      const __m512 v = _mm512_maskz_loadu_ps(flag_mask(flags + p, n - p), x + p);
      lanes = _mm512_mask_max_ps(lanes, flag_mask(flags + p, n - p) & _mm512_cmp_ps_mask(v, v, _CMP_ORD_Q), lanes, v);
    }
    top = _mm512_reduce_max_ps(lanes);
#endif
    for (; p < n; ++p) if (flags[p]) top = std::max(top, x[p]);
    return top;
  }

  // sum of exp(x[p] - top) over the flagged p < n, every x[p] <= top: fp32 terms summed in fp32 blocks of 256
  // (16 per lane) and the blocks in fp64
  static double sum_exp_below(const float* x, const uint8_t* flags, i64 n, float top) {
    double sum = 0;
    i64 p = 0;
#if HSR_AVX512
    const __m512 top_v = _mm512_set1_ps(top), zero = _mm512_setzero_ps();
    constexpr i64 VECTOR_BLOCK = 256;
    for (; p < n; p += VECTOR_BLOCK) {
      __m512 block = zero;
      for (i64 i = p; i < std::min(p + VECTOR_BLOCK, n); i += 16) {
        const __mmask16 in = flag_mask(flags + i, n - i);
        const __m512 e = exp_nonpositive(_mm512_min_ps(zero, _mm512_sub_ps(_mm512_maskz_loadu_ps(in, x + i), top_v)));
        block = _mm512_mask_add_ps(block, in, block, e);
      }
      sum += _mm512_reduce_add_pd(_mm512_add_pd(_mm512_cvtps_pd(_mm512_castps512_ps256(block)),
                                                _mm512_cvtps_pd(_mm512_extractf32x8_ps(block, 1))));
    }
#endif
    constexpr i64 BLOCK = 16;
    for (; p < n; p += BLOCK) {
      float block = 0;
      for (i64 i = p; i < std::min(p + BLOCK, n); ++i)
        block += flags[i] ? exp_nonpositive(std::min(x[i] - top, 0.0f)) : 0.0f;   // (an unflagged NaN stays out)
      sum += block;
    }
    return sum;
  }

  // out[p] = max over the group of x [G, P]
  void group_max(const std::vector<float>& x, std::vector<float>& out) const {
    const i64 P = i64(x.size()) / G_;
    out.assign(x.begin(), x.begin() + P);
    for (i64 g = 1; g < G_; ++g)
      for (i64 p = 0; p < P; ++p) out[p] = std::max(out[p], x[g * P + p]);
  }

  // valid[p] &= some head's ub[p] > bias (relu mode: the others weigh exactly nothing)
  void keep_above_bias(const std::vector<float>& ub, std::vector<uint8_t>& valid) const {
    std::vector<float> best;
    group_max(ub, best);
    // in fp32, as torch compares
    for (size_t p = 0; p < valid.size(); ++p) valid[p] &= uint8_t(best[p] > float(a_.bias));
  }

  // -- seeds -----------------------------------------------------------------------------------
  std::vector<i64> seed_cells() {
    std::vector<i64> beam;
    Bounds b;
    std::vector<float> best_ub;
    for (i64 level = top_level(); level >= 0; --level) {
      std::vector<i64> nodes = frontier(level, beam);
      b.resize(i64(nodes.size()), G_);
      for (i64 i = 0, block, slot; i < i64(nodes.size()); ++i) {
        if (i + PREFETCH_CELLS < i64(nodes.size())) prefetch_box(level, nodes[i + PREFETCH_CELLS], block, slot);
        box_bounds(level, nodes[i], b, i);
      }
      counters_[SUMMARY_NODES_READ] += i64(nodes.size());
      group_max(b.ub, best_ub);
      std::vector<std::pair<float, i64>> best(nodes.size());
      for (size_t i = 0; i < nodes.size(); ++i) best[i] = {best_ub[i], nodes[i]};
      const size_t k = std::min<size_t>(a_.seed_cells, nodes.size());
      std::partial_sort(best.begin(), best.begin() + k, best.end(),
                        [](const auto& x, const auto& y) { return x.first > y.first; });
      beam.clear();
      for (size_t i = 0; i < k; ++i) beam.push_back(best[i].second);
      std::sort(beam.begin(), beam.end());
    }
    return beam;
  }

  void make_seeds() {
    const i64 cs = a_.cell_size;
    for (i64 t = n_ / cs * cs; t < n_; ++t) seeds_.push_back(t);             // the partial cell
    if (a_.mode != RELU) {
      for (i64 t = 0; t < std::min(a_.sink_tokens, n_); ++t) seeds_.push_back(t);
      for (i64 t = std::max<i64>(n_ - a_.window_tokens, 0); t < n_; ++t) seeds_.push_back(t);
    }
    if (a_.mode == SOFTMAX && a_.seed_cells > 0)
      for (i64 cell : seed_cells())
        for (i64 t = cell * cs; t < std::min((cell + 1) * cs, n_); ++t) seeds_.push_back(t);
    std::sort(seeds_.begin(), seeds_.end());
    seeds_.erase(std::unique(seeds_.begin(), seeds_.end()), seeds_.end());
  }

  // ln(eps * sum over seeded keys of exp(score)) per head (-inf: skip nothing)
  std::vector<double> log_budget() {
    std::vector<double> budget(G_, NEG_INF);
    if (a_.mode != SOFTMAX || a_.eps == 0 || seeds_.empty()) return budget;
    counters_[SEED_KEYS_READ] += i64(seeds_.size());
    const i64 n = i64(seeds_.size());
    std::vector<float> scores(n * G_), head(n);
    scores_of(seeds_.data(), n, scores.data());
    const std::vector<uint8_t> every(n, 1);
    for (i64 g = 0; g < G_; ++g) {
      for (i64 i = 0; i < n; ++i) head[i] = scores[i * G_ + g];
      budget[g] = log_sum_exp(Terms<float>{head.data()}, every) + std::log(a_.eps);
    }
    return budget;
  }

  // -- the query (TreeQuery.run); false: the row overflowed its capacity and is read densely ------
  bool select(std::vector<i64>& list) {
    make_seeds();
    const std::vector<double> budget = log_budget();
    const bool refined = a_.code_bits && a_.code_bits / a_.plane_bits > 1;
    // 8-bit codes on the vector path: the second plane's bounds come with the first, for the refinement to pick
    // from
    both_planes_ = refined && a_.code_bits / a_.plane_bits == 2 && stashed();
    std::vector<i64> cells;
    Bounds cell_bounds;
    const std::vector<double> token_budget = walk(budget, cells, cell_bounds);
    if (overflow_) return false;

    const i64 cs = a_.cell_size, C = i64(cells.size()), T = C * cs;
    Bounds tb;
    tb.resize(T, G_);
    if (!stashed()) dots_.resize(T * G_);
    if (both_planes_) fine_.resize(T, G_);
    for (i64 c = 0; c < C; ++c) {
      if (a_.code_bits && c + PREFETCH_CELLS < C)
        prefetch_cell(cells[c + PREFETCH_CELLS], 0, both_planes_ ? 2 : 1, !stashed());
#if HSR_AVX512
      if (stashed()) {
        stashed_bounds(cells[c], stash_of_[c], tb, c * cs, &cell_bounds.ub[c], &cell_bounds.lb[c], C);
        continue;
      }
#endif
      if (a_.code_bits) code_bounds(cells[c], 1, 0, tb, c * cs);
      for (i64 g = 0; g < G_; ++g) {
        float* ub = &tb.ub[g * T + c * cs];
        float* lb = &tb.lb[g * T + c * cs];
        const float cell_ub = cell_bounds.ub[g * C + c], cell_lb = cell_bounds.lb[g * C + c];
        for (i64 t = 0; t < cs; ++t) {
          ub[t] = a_.code_bits ? std::min(ub[t], cell_ub) : cell_ub;
          lb[t] = a_.code_bits ? std::max(lb[t], cell_lb) : cell_lb;
        }
      }
    }
    counters_[CODE_CELLS_READ] += a_.code_bits ? C : 0;
    std::vector<uint8_t> valid(T, 1);                  // the seeds are read already
    for (i64 token : seeds_) {
      const i64 c = std::lower_bound(cells.begin(), cells.end(), token / cs) - cells.begin();
      if (c < C && cells[c] == token / cs) valid[c * cs + token % cs] = 0;
    }

    std::vector<double> log_spent;
    if (refined && !refine(cells, valid, tb, token_budget, log_spent)) return false;
    std::vector<uint8_t> keep = keep_tokens(tb, valid, token_budget, refined ? &log_spent : nullptr);
    std::vector<uint8_t> dropped(T);
    const uint8_t* __restrict kept_flag = keep.data();
    {
      const uint8_t* __restrict in = valid.data();
      uint8_t* __restrict out = dropped.data();
      for (i64 t = 0; t < T; ++t) out[t] = in[t] & !kept_flag[t];
    }
    record_skipped(dropped, nullptr, tb.ub);

    std::vector<i64> kept(T + 16);
    i64 n = 0;
    for (i64 c = 0; c < C; ++c) n = flagged_positions(kept_flag + c * cs, cs, cells[c] * cs, kept.data() + n) - kept.data();
    list.resize(seeds_.size() + n);
    std::merge(seeds_.begin(), seeds_.end(), kept.begin(), kept.begin() + n, list.begin());
    return !(a_.capacity > 0 && i64(list.size()) > a_.capacity);
  }

  // The levels top-down; leaves the kept cells and their bounds, returns the token level's budget.
  std::vector<double> walk(const std::vector<double>& log_budget, std::vector<i64>& kept, Bounds& kept_bounds) {
    std::vector<double> spent(G_, 0.0), level_spent;
    const double share = a_.tree_budget_share / double(a_.tree_levels + 1);
    std::vector<double> level_budget(log_budget);
    for (i64 g = 0; g < G_; ++g) level_budget[g] += share > 0 ? std::log(share) : NEG_INF;
    kept.clear();
    Bounds b;
    for (i64 level = top_level(); level >= 0; --level) {
      const std::vector<i64> frontier_nodes = frontier(level, kept);
      const i64 s = span(level);
      std::vector<i64> nodes, counts;
      nodes.reserve(frontier_nodes.size());
      counts.reserve(frontier_nodes.size());
      // the frontier ascends and its spans are disjoint: one pass over the seeds counts those in each span
      auto seed = seeds_.begin();
      for (i64 node : frontier_nodes) {
        const i64 start = node * s, end = std::min((node + 1) * s, n_);
        while (seed != seeds_.end() && *seed < start) ++seed;
        const auto first_seed = seed;
        while (seed != seeds_.end() && *seed < end) ++seed;
        const i64 count = end - start - i64(seed - first_seed);
        if (count > 0) { nodes.push_back(node); counts.push_back(count); }
      }
      const i64 P = i64(nodes.size());
      b.resize(P, G_);
#if HSR_AVX512
      if (level == 0 && stashed()) cell_pass(nodes, b);
      else
#endif
      for (i64 i = 0, block, slot; i < P; ++i) {
        if (i + PREFETCH_CELLS < P) prefetch_box(level, nodes[i + PREFETCH_CELLS], block, slot);
        box_bounds(level, nodes[i], b, i);
      }
      counters_[SUMMARY_NODES_READ] += P;
      std::vector<uint8_t> keep(P, 1);
      if (a_.mode == RELU) {
        keep_above_bias(b.ub, keep);
      } else if (a_.mode == SOFTMAX) {
        std::vector<double> log_mass(P * G_);
        for (i64 g = 0; g < G_; ++g)
          for (i64 i = 0; i < P; ++i) log_mass[g * P + i] = std::log(double(counts[i])) + double(b.ub[g * P + i]);
        std::vector<uint8_t> skip = greedy_skip<double>(Terms<double>{log_mass.data(), 0.0}, level_budget, keep, nullptr, nullptr,
                                                level_spent);
        for (i64 g = 0; g < G_; ++g) spent[g] += level_spent[g] * share;
        for (i64 i = 0; i < P; ++i) keep[i] = !skip[i];
      } else {
        std::vector<float> lower, upper;
        group_max(b.lb, lower);
        group_max(b.ub, upper);
        const float floor = kth_largest(lower, counts, a_.budget_tokens);
        for (i64 i = 0; i < P; ++i) keep[i] = upper[i] >= floor;
      }
      std::vector<uint8_t> dropped(P);
      for (i64 i = 0; i < P; ++i) dropped[i] = !keep[i];
      record_skipped(dropped, &counts, b.ub);
      std::vector<i64> index;
      for (i64 i = 0; i < P; ++i) if (keep[i]) index.push_back(i);
      kept.clear();
      for (i64 i : index) kept.push_back(nodes[i]);
#if HSR_AVX512
      if (level == 0) stash_of_ = index;
#endif
      kept_bounds.resize(i64(index.size()), G_);
      for (i64 g = 0; g < G_; ++g)
        for (size_t j = 0; j < index.size(); ++j) {
          kept_bounds.ub[g * kept_bounds.n + j] = b.ub[g * P + index[j]];
          kept_bounds.lb[g * kept_bounds.n + j] = b.lb[g * P + index[j]];
        }
      if (over_width(kept.size())) break;
    }
    std::vector<double> remaining(log_budget);
    for (i64 g = 0; g < G_; ++g) remaining[g] += std::log1p(-std::min(spent[g], 1.0));
    return remaining;
  }

  // ln of what reading a token adds to the softmax budget: eps * exp(its lower bound), plus `shift`
  Terms<float> gains(const Bounds& tb, double shift) const { return {tb.lb.data(), std::log(a_.eps) + shift}; }

  // First-plane cut, then every plane of the cells that still hold a candidate (TreeQuery.refine).
  bool refine(const std::vector<i64>& cells, std::vector<uint8_t>& valid, Bounds& tb,
              const std::vector<double>& budget, std::vector<double>& log_spent) {
    const i64 cs = a_.cell_size, T = i64(valid.size());
    if (a_.mode == RELU) {
      keep_above_bias(tb.ub, valid);
    } else if (a_.mode == SOFTMAX) {
      const double share = std::log(a_.refine_share);
      std::vector<double> shared(budget), spent;
      for (double& x : shared) x += share;
      const Terms<float> gain = gains(tb, share);
      std::vector<uint8_t> skip = greedy_skip(Terms<float>{tb.ub.data()}, shared, valid, a_.eps > 0 ? &gain : nullptr,
                                              nullptr, spent);
      log_spent = record_skipped(skip, nullptr, tb.ub);
      for (i64 t = 0; t < T; ++t) valid[t] &= !skip[t];
    } else {
      std::vector<float> lower, upper;
      group_max(tb.lb, lower);
      group_max(tb.ub, upper);
      const float floor = kth_of_many(lower, valid, a_.budget_tokens);
      std::vector<uint8_t> cut(T);
      const float* __restrict up = upper.data();
      uint8_t* __restrict in = valid.data();
      uint8_t* __restrict out = cut.data();
      for (i64 t = 0; t < T; ++t) {
        const uint8_t reach = up[t] >= floor;
        out[t] = in[t] & !reach;
        in[t] &= reach;
      }
      record_skipped(cut, nullptr, tb.ub);          // unread: the certificate counts them
    }
    std::vector<i64> picked;
    for (i64 c = 0; c < i64(cells.size()); ++c) {
      uint8_t any = 0;
      for (i64 t = c * cs; t < (c + 1) * cs; ++t) any |= valid[t];
      if (any) picked.push_back(c);
    }
    if (over_width(picked.size())) return false;
    counters_[REFINED_CELLS] += i64(picked.size());
    Bounds& fine = fine_;                           // the picked cells' bounds from every plane
    if (!both_planes_) fine.resize(T, G_);
    const i64 planes = a_.code_bits / a_.plane_bits;
    for (size_t i = 0; i < picked.size(); ++i) {
      const i64 c = picked[i];
      if (!both_planes_ && i + PREFETCH_CELLS < picked.size())
        prefetch_cell(cells[picked[i + PREFETCH_CELLS]], 1, planes, true);
      if (!both_planes_) code_bounds(cells[c], planes, 1, fine, c * cs);
      for (i64 g = 0; g < G_; ++g)
        for (i64 i = g * T + c * cs; i < g * T + (c + 1) * cs; ++i) {
          tb.ub[i] = std::min(tb.ub[i], fine.ub[i]);
          tb.lb[i] = std::max(tb.lb[i], fine.lb[i]);
        }
    }
    return true;
  }

  std::vector<uint8_t> keep_tokens(const Bounds& tb, const std::vector<uint8_t>& valid,
                                   const std::vector<double>& budget, const std::vector<double>* log_spent) {
    const i64 T = i64(valid.size());
    std::vector<uint8_t> keep(valid);
    if (a_.mode == RELU) {
      keep_above_bias(tb.ub, keep);
    } else if (a_.mode == SOFTMAX) {
      std::vector<double> spent;
      const Terms<float> gain = gains(tb, 0.0);
      std::vector<uint8_t> skip = greedy_skip(Terms<float>{tb.ub.data()}, budget, valid, a_.eps > 0 ? &gain : nullptr,
                                              a_.eps > 0 ? log_spent : nullptr, spent);
      for (i64 t = 0; t < T; ++t) keep[t] &= !skip[t];
    } else {
      std::vector<float> upper;
      group_max(tb.ub, upper);
      // the budget best: those above the budget-th largest, then its ties in token order
      const float kth = kth_of_many(upper, valid, a_.budget_tokens);
      // raw pointers: a byte store may alias the vectors' own pointers, which kept these loops scalar
      const uint8_t* __restrict in = valid.data();
      const float* __restrict up = upper.data();
      uint8_t* __restrict out = keep.data();
      i64 above = 0;
      for (i64 t = 0; t < T; ++t) {
        out[t] = in[t] & uint8_t(up[t] > kth);
        above += out[t];
      }
      i64 t = 0, ties = a_.budget_tokens - above;
#if HSR_AVX512
      // 16 tokens a step: ties are few, and which tokens are valid or kept is unpredictable
      for (const __m512 k = _mm512_set1_ps(kth); t + 16 <= T && ties > 0; t += 16) {
        __mmask16 tie = flag_mask(in + t, 16) & ~flag_mask(out + t, 16) &
                        _mm512_cmp_ps_mask(_mm512_loadu_ps(up + t), k, _CMP_EQ_OQ);
        for (; tie && ties > 0; tie &= tie - 1, --ties) out[t + __builtin_ctz(tie)] = 1;
      }
#endif
      for (; t < T && ties > 0; ++t)
        if (in[t] && !out[t] && up[t] == kth) out[t] = 1, --ties;
    }
    return keep;
  }

  // first + p for the flagged p < n, ascending, written from out (room for n + 8); returns the end written
  static i64* flagged_positions(const uint8_t* flags, i64 n, i64 first, i64* out) {
    i64 p = 0;
#if HSR_AVX512
    const __m512i step = _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7);
    for (; p + 8 <= n; p += 8) {
      const __mmask8 flagged = __mmask8(flag_mask(flags + p, 8));
      _mm512_storeu_si512(out, _mm512_maskz_compress_epi64(flagged, _mm512_add_epi64(step, _mm512_set1_epi64(first + p))));
      out += __builtin_popcount(flagged);
    }
#endif
    for (; p < n; ++p) {
      *out = first + p;
      out += flags[p] != 0;
    }
    return out;
  }

  i64 distinct_cells(const std::vector<i64>& list) const {
    i64 cells = 0, last = -1;
    for (i64 t : list) {
      if (t / a_.cell_size != last) ++cells;
      last = t / a_.cell_size;
    }
    return cells;
  }

  // -- attention over the reported tokens (core.decode.decode_candidates) ------------------------
  static constexpr i64 CHUNK = 256;   // tokens gathered at a time
  static constexpr i64 MAX_GROUP = 8; // query heads scored at once from one key read
  static constexpr i64 PREFETCH_RUNS = 2;   // blocks of keys requested ahead of the one being scored

  // K or V (offsets: the layout's key or value table) of tokens[0, count) into dst [count, D], read through
  // the offset table: any layout, packed ones included.
  template <typename T, float (*TO_FLOAT)(T)>
  void gather_as(const i64* tokens, i64 count, const i64* offsets, float* dst) const {
    for (i64 i = 0; i < count; ++i) {
      const T* page = static_cast<const T*>(a_.cache) + page_at(tokens[i]);
      const i64* at = offsets + (tokens[i] % a_.block_size) * D_;
      for (i64 d = 0; d < D_; ++d) dst[i * D_ + d] = TO_FLOAT(page[at[d]]);
    }
  }
  static float identity(float x) { return x; }
  void gather(const i64* tokens, i64 count, const i64* offsets, float* dst) const {
    if (a_.cache_dtype == F32) gather_as<float, identity>(tokens, count, offsets, dst);
    else if (a_.cache_dtype == BF16) gather_as<uint16_t, bf16_to_float>(tokens, count, offsets, dst);
    else gather_as<uint16_t, half_to_float>(tokens, count, offsets, dst);
  }
  // Ask for every cache line of the keys of tokens[begin, end) (one block's) ahead of their scores.
  void prefetch_keys(const i64* tokens, i64 begin, i64 end) const {
    const Affine& key = key_layout_;
    const float* page = fp32_page(tokens[begin]) + key.base;
    i64 line = -1;                            // each line once: 16 fp32 tokens of a channel share one
    for (i64 k = begin; k < end; ++k) {
      const i64 at = (tokens[k] % a_.block_size) * key.token;
      if (key.token == 1 && at / 16 == line) continue;
      line = at / 16;
      for (i64 d = 0; d < D_; ++d) __builtin_prefetch(page + d * key.channel + at);
    }
  }

  // visit(i, row) for each token i < count with its K or V row (offsets: the key or value table), gathered
  // CHUNK tokens at a time
  template <typename Visit>
  void in_chunks(const i64* tokens, i64 count, const i64* offsets, Visit visit) {
    rows_.resize(CHUNK * D_);
    for (i64 i = 0; i < count; i += CHUNK) {
      const i64 n = std::min(CHUNK, count - i);
      gather(tokens + i, n, offsets, rows_.data());
      for (i64 k = 0; k < n; ++k) visit(i + k, &rows_[k * D_]);
    }
  }
  // element offset of this row's KV head in the page holding `token`
  i64 page_at(i64 token) const { return table_[token / a_.block_size] * a_.block_stride + h_ * a_.head_stride; }
  const float* fp32_page(i64 token) const { return static_cast<const float*>(a_.cache) + page_at(token); }

  static constexpr i64 PREFETCH_ROWS = 16;  // tokens ahead whose contiguous K or V row is requested
  static void prefetch_row(const void* row, i64 bytes) {
    for (i64 b = 0; b < bytes; b += 64) __builtin_prefetch(static_cast<const char*>(row) + b, 0, TO_L2);
  }
  i64 item_size() const { return dtype_size(a_.cache_dtype); }

  // Exact scores [count, G] of tokens[0, count) (ascending). Keys of complete cells come from the key copy
  // when there is one (each key one contiguous row, whatever the cache's layout); the rest from the cache.
  // with_values: also request the tokens' value rows ahead, for an accumulate_values that follows (a token's
  // key and value then travel at once, which halves the waits on this memory-latency-bound read).
  void scores_of(const i64* tokens, i64 count, float* scores, bool with_values = false) {
    const i64 copied = a_.key_rows ? std::lower_bound(tokens, tokens + count, n_ / a_.cell_size * a_.cell_size) - tokens
                                   : 0;
    if (copied) {
      const char* copy = static_cast<const char*>(a_.key_rows) + h_ * a_.key_rows_head_stride * item_size();
      scores_from_rows(tokens, copied, scores, [&](i64 token) {
        return copy + (table_[token / a_.block_size] * a_.key_rows_block_stride + (token % a_.block_size) * D_) *
                      item_size();
      }, with_values);
    }
    cache_scores(tokens + copied, count - copied, scores + copied * G_, with_values);
  }

  // scores_of for keys whose channels are contiguous at row_of(token) (bytes, cache dtype), requested ahead
  template <typename RowOf>
  void scores_from_rows(const i64* tokens, i64 count, float* scores, RowOf row_of, bool with_values) {
    const float s = float(a_.scale);
    const i64 bytes = D_ * item_size();
    with_values = with_values && value_rows();
    for (i64 i = 0; i < std::min(PREFETCH_ROWS, count); ++i) {
      prefetch_row(row_of(tokens[i]), bytes);
      if (with_values) prefetch_row(value_row(tokens[i]), D_ * 4);
    }
    key_.resize(D_);
    for (i64 i = 0; i < count; ++i) {
      if (i + PREFETCH_ROWS < count) {
        prefetch_row(row_of(tokens[i + PREFETCH_ROWS]), bytes);
        if (with_values) prefetch_row(value_row(tokens[i + PREFETCH_ROWS]), D_ * 4);
      }
      const float* k = as_floats(row_of(tokens[i]), key_.data());
      for (i64 g = 0; g < G_; ++g) scores[i * G_ + g] = dot(&q_[g * D_], k) * s;
    }
  }
  // a row of D cache-dtype values as fp32: in place for fp32, converted into scratch otherwise
  const float* as_floats(const char* row, float* scratch) const {
    if (a_.cache_dtype == F32) return reinterpret_cast<const float*>(row);
    for (i64 d = 0; d < D_; ++d) scratch[d] = load_float(row, d, a_.cache_dtype);
    return scratch;
  }
  std::vector<float> key_;

  // scores_of from the cache. An fp32 cache with an affine K layout is read in place: channel-contiguous keys
  // as rows; keys whose channels are strided (CPU_ATTN's K, stored transposed per block) touch one cache line
  // per channel, so while one block's tokens are scored the lines of the next block's are requested. Other
  // layouts go through the offset table.
  void cache_scores(const i64* tokens, i64 count, float* scores, bool with_values) {
    const Affine& key = key_layout_;
    const float s = float(a_.scale);
    if (a_.cache_dtype == F32 && key.affine && key.channel == 1) {
      scores_from_rows(tokens, count, scores, [&](i64 token) {
        return reinterpret_cast<const char*>(fp32_page(token) + key.base + (token % a_.block_size) * key.token);
      }, with_values);
      return;
    }
    if (a_.cache_dtype == F32 && key.affine) {
      std::vector<i64> runs;                  // where each block's tokens start, then count
      for (i64 i = 0; i < count; ++i)
        if (i == 0 || tokens[i] / a_.block_size != tokens[i - 1] / a_.block_size) runs.push_back(i);
      runs.push_back(count);
      const i64 num_runs = i64(runs.size()) - 1;
      for (i64 r = 0; r < std::min(PREFETCH_RUNS, num_runs); ++r) prefetch_keys(tokens, runs[r], runs[r + 1]);
      float acc[MAX_GROUP];
      const i64 group = std::min<i64>(G_, MAX_GROUP);
      for (i64 r = 0; r < num_runs; ++r) {
        if (r + PREFETCH_RUNS < num_runs) prefetch_keys(tokens, runs[r + PREFETCH_RUNS], runs[r + PREFETCH_RUNS + 1]);
        for (i64 i = runs[r]; i < runs[r + 1]; ++i) {
          const float* k = fp32_page(tokens[i]) + key.base + (tokens[i] % a_.block_size) * key.token;
          for (i64 g0 = 0; g0 < G_; g0 += group) {
            const i64 heads = std::min(group, G_ - g0);
            for (i64 g = 0; g < heads; ++g) acc[g] = 0;
            for (i64 d = 0; d < D_; ++d) {
              const float x = k[d * key.channel];
              for (i64 g = 0; g < heads; ++g) acc[g] += q_[(g0 + g) * D_ + d] * x;
            }
            for (i64 g = 0; g < heads; ++g) scores[i * G_ + g0 + g] = acc[g] * s;
          }
        }
      }
      return;
    }
    in_chunks(tokens, count, a_.key_offsets, [&](i64 i, const float* key) {
      for (i64 g = 0; g < G_; ++g) scores[i * G_ + g] = dot(&q_[g * D_], key) * s;
    });
  }
  float dot(const float* x, const float* y) const {
    float sum = 0;
    for (i64 d = 0; d < D_; ++d) sum += x[d] * y[d];
    return sum;
  }

  // an fp32 cache whose values are plain rows (then read in place, one row per token)
  bool value_rows() const { return a_.cache_dtype == F32 && value_layout_.affine && value_layout_.channel == 1; }
  const float* value_row(i64 token) const {
    return fp32_page(token) + value_layout_.base + (token % a_.block_size) * value_layout_.token;
  }

  // acc[g] += weights[i, g] * V[tokens[i]] for i < count
  void accumulate_values(const i64* tokens, i64 count, const float* weights, float* acc) {
    const Affine& value = value_layout_;
    if (a_.cache_dtype == F32 && value.affine) {
      auto row_of = [&](i64 token) { return fp32_page(token) + value.base + (token % a_.block_size) * value.token; };
      const bool rows = value_rows();           // then requested ahead
#if HSR_AVX512
      if (rows && D_ % 16 == 0 && G_ <= MAX_GROUP) {
        with_group(G_, [&](auto group) { sum_rows_in_registers<group()>(tokens, count, weights, acc, row_of); });
        return;
      }
#endif
      for (i64 i = 0; rows && i < std::min(PREFETCH_ROWS, count); ++i) prefetch_row(row_of(tokens[i]), D_ * 4);
      for (i64 i = 0; i < count; ++i) {
        if (rows && i + PREFETCH_ROWS < count) prefetch_row(row_of(tokens[i + PREFETCH_ROWS]), D_ * 4);
        const float* v = row_of(tokens[i]);
        for (i64 g = 0; g < G_; ++g) {
          const float w = weights[i * G_ + g];
          float* out = &acc[g * D_];
          if (value.channel == 1) for (i64 d = 0; d < D_; ++d) out[d] += w * v[d];
          else for (i64 d = 0; d < D_; ++d) out[d] += w * v[d * value.channel];
        }
      }
      return;
    }
    in_chunks(tokens, count, a_.value_offsets, [&](i64 i, const float* value) {
      for (i64 g = 0; g < G_; ++g) {
        const float w = weights[i * G_ + g];
        float* out = &acc[g * D_];
        for (i64 d = 0; d < D_; ++d) out[d] += w * value[d];
      }
    });
  }
  std::vector<float> rows_;

#if HSR_AVX512
  static_assert(MAX_GROUP == 8, "with_group dispatches groups of 1 to 8 heads");
  template <typename F>
  static void with_group(i64 group, F&& f) {
    switch (group) {
      case 1: f(std::integral_constant<int, 1>()); break;
      case 2: f(std::integral_constant<int, 2>()); break;
      case 3: f(std::integral_constant<int, 3>()); break;
      case 4: f(std::integral_constant<int, 4>()); break;
      case 5: f(std::integral_constant<int, 5>()); break;
      case 6: f(std::integral_constant<int, 6>()); break;
      case 7: f(std::integral_constant<int, 7>()); break;
      default: f(std::integral_constant<int, 8>()); break;
    }
  }
  // accumulate_values for G heads over contiguous fp32 value rows (row_of(token)), D a multiple of 16: 16
  // channels at a time, every head's sums in registers across the tokens (not reloaded and stored per token)
  template <int G, typename RowOf>
  void sum_rows_in_registers(const i64* tokens, i64 count, const float* weights, float* acc, RowOf row_of) const {
    for (i64 i = 0; i < std::min(PREFETCH_ROWS, count); ++i) prefetch_row(row_of(tokens[i]), D_ * 4);
    for (i64 c = 0; c < D_; c += 16) {
      __m512 sum[G];
      for (int g = 0; g < G; ++g) sum[g] = _mm512_loadu_ps(&acc[g * D_ + c]);
      for (i64 i = 0; i < count; ++i) {
        if (c == 0 && i + PREFETCH_ROWS < count) prefetch_row(row_of(tokens[i + PREFETCH_ROWS]), D_ * 4);
        const __m512 v = _mm512_loadu_ps(row_of(tokens[i]) + c);
        for (int g = 0; g < G; ++g) sum[g] = _mm512_fmadd_ps(_mm512_set1_ps(weights[i * G + g]), v, sum[g]);
      }
      for (int g = 0; g < G; ++g) _mm512_storeu_ps(&acc[g * D_ + c], sum[g]);
    }
  }
#endif

  // x [L, G] scores -> exp(x - m[g]) (every x <= m[g]); norm[g] += their sum over the L tokens
  void softmax_weights(float* x, i64 L, const float* m, float* norm) const {
    i64 i = 0;
#if HSR_AVX512
    // 16 entries a pass: the pass that starts at entry i holds head (i + j) % G in lane j, so it takes the
    // maxima and sums of its phase i % G (the phases cycle as i steps by 16); groups past 16 heads: below
    constexpr i64 MAX_PHASES = 16;
    const __m512 zero = _mm512_setzero_ps();
    __m512 tops[MAX_PHASES], sums[MAX_PHASES];
    for (i64 k = 0; k < std::min(G_, MAX_PHASES); ++k) {
      sums[k] = zero;
      float pattern[16];
      for (int j = 0; j < 16; ++j) pattern[j] = m[(k + j) % G_];
      tops[k] = _mm512_loadu_ps(pattern);
    }
    for (i64 phase = 0; G_ <= MAX_PHASES && i < L * G_; i += 16, phase = (phase + 16) % G_) {
      const __mmask16 in = L * G_ - i >= 16 ? __mmask16(0xffff) : __mmask16((1u << (L * G_ - i)) - 1);
      const __m512 w = exp_nonpositive(_mm512_min_ps(zero, _mm512_sub_ps(_mm512_maskz_loadu_ps(in, x + i), tops[phase])));
      _mm512_mask_storeu_ps(x + i, in, w);
      sums[phase] = _mm512_mask_add_ps(sums[phase], in, sums[phase], w);
    }
    for (i64 k = 0; k < G_ && G_ <= MAX_PHASES; ++k) {
      float lanes[16];
      _mm512_storeu_ps(lanes, sums[k]);
      for (int j = 0; j < 16; ++j) norm[(k + j) % G_] += lanes[j];
    }
#endif
    for (; i < L * G_; ++i) {
      x[i] = exp_nonpositive(std::min(x[i] - m[i % G_], 0.0f));
      norm[i % G_] += x[i];
    }
  }

  void attend(const std::vector<i64>& list) {
    const i64 L = i64(list.size());
    std::vector<float> scores(L * G_), m(G_, -INF_F), acc(G_ * D_, 0.0f), norm(G_, 0.0f);
    scores_of(list.data(), L, scores.data(), true);
    for (i64 i = 0; i < L; ++i)
      for (i64 g = 0; g < G_; ++g) m[g] = std::max(m[g], scores[i * G_ + g]);
    const bool relu = a_.mode == RELU;
    std::vector<i64> weighted;           // tokens with a nonzero weight: only their values are read
    std::vector<float> weights;          // [weighted, G]
    if (relu) {
      for (i64 i = 0; i < L; ++i) {
        bool any = false;
        for (i64 g = 0; g < G_; ++g) {
          const float r = std::max(scores[i * G_ + g] - float(a_.bias), 0.0f);
          float w = 1.0f;
          for (i64 k = 0; k < a_.alpha; ++k) w *= r;
          scores[i * G_ + g] = w;
          norm[g] += w;
          any = any || w != 0;
        }
        if (!any) continue;
        weighted.push_back(list[i]);
        weights.insert(weights.end(), &scores[i * G_], &scores[i * G_] + G_);
      }
    } else {                             // exp_nonpositive is never 0: every listed token is weighted
      // a head with no finite score at all: any reference works. A +inf (or NaN) maximum stays, so that
      // its weights, and the output, come out NaN as a dense softmax's would, instead of finite and wrong.
      for (float& x : m) x = x == -INF_F ? 0.0f : x;
      softmax_weights(scores.data(), L, m.data(), norm.data());
      weighted = list;
      weights.swap(scores);
    }
    accumulate_values(weighted.data(), i64(weighted.size()), weights.data(), acc.data());
    for (i64 g = 0; g < G_; ++g) {
      const i64 head = b_ * a_.num_q_heads + h_ * G_ + g;
      const float divisor = norm[g] > 0 ? norm[g] : 1.0f;
      for (i64 d = 0; d < D_; ++d) a_.out[head * D_ + d] = acc[g * D_ + d] / divisor;
      float bound = 0.0f;
      const float skipped = float(skipped_[g]);
      if (!relu && skipped != -INF_F) {
        bound = std::exp(skipped - m[g] - std::log(norm[g])) * (1.0f + 1e-5f);
        bound = std::max(bound, CERTIFICATE_FLOOR);
      }
      a_.error_bound[head] = bound;
    }
  }
};

}  // namespace

extern "C" {

int hsr_args_size() { return int(sizeof(HsrArgs)); }
int hsr_num_counters() { return int(NUM_COUNTERS); }

void hsr_decode(const HsrArgs* args) {
  const i64 rows = args->batch * args->num_kv_heads;
  const Affine key = Affine::of(args->key_offsets, args->block_size, args->head_dim);
  const Affine value = Affine::of(args->value_offsets, args->block_size, args->head_dim);
#pragma omp parallel for schedule(dynamic, 1) num_threads(args->num_threads)
  for (i64 row = 0; row < rows; ++row) Row(*args, key, value, row).run();
  for (i64 c = 0; c < NUM_COUNTERS; ++c) {
    args->totals[c] = 0;
    for (i64 row = 0; row < rows; ++row) args->totals[c] += args->counters[row * NUM_COUNTERS + c];
  }
}

}  // extern "C"
