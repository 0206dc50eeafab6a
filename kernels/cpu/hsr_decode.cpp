// HSR paged decode on the CPU: the cell-tree query and the attention over the tokens it reports,
// one (sequence, KV head) row per OpenMP task.
//
// Twin: vllm_hsr.core.query.TreeQuery (selection) and vllm_hsr.core.decode.decode_candidates
// (attention); every rule and bound below is theirs (DESIGN.md §2), and the numeric constants
// (margins, slacks, histogram) come in through HsrArgs from the same Python definitions.
// Plain C ABI (loaded with ctypes): no torch headers, so it builds in seconds.

#include <algorithm>
#include <initializer_list>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "common.h"

namespace {

using namespace hsr;
constexpr double NEG_INF = -std::numeric_limits<double>::infinity();
constexpr float INF_F = std::numeric_limits<float>::infinity();
constexpr float CERTIFICATE_FLOOR = 1.17549435e-38f;   // smallest normal fp32 (core.attention)

enum Mode : i64 { RELU = 0, SOFTMAX = 1, TOPK = 2 };
enum Counter : i64 {
  KEYS_READ, CELLS_READ, SUMMARY_NODES_READ, CODE_CELLS_READ, REFINED_CELLS, SEED_KEYS_READ,
  OVERFLOW_ROWS, NUM_COUNTERS
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
  float* out;                     // [batch, num_q_heads, head_dim]
  float* error_bound;             // [batch, num_q_heads]
  i64* counters;                  // [batch * num_kv_heads, NUM_COUNTERS]
  i64* tokens;                    // [batch * num_kv_heads, token_capacity] or null
  i64 token_capacity;
  i64* counts;                    // [batch * num_kv_heads] or null
  uint8_t* dense;                 // [batch * num_kv_heads] or null
  float* skipped;                 // [batch, num_q_heads] or null
  i64 num_threads;
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
        n_(a.seq_lens[b_]), table_(a.block_table + b_ * a.table_width), q_(G_ * D_), q_abs_(G_ * D_),
        skipped_(G_, NEG_INF), counters_(a.counters + row * NUM_COUNTERS) {
    const float* q = a.q + (b_ * a.num_q_heads + h_ * G_) * D_;
    for (i64 i = 0; i < G_ * D_; ++i) { q_[i] = q[i]; q_abs_[i] = std::fabs(q[i]); }
    for (i64 c = 0; c < NUM_COUNTERS; ++c) counters_[c] = 0;
  }

  void run() {
    std::vector<i64> list;
    const bool dense = !select(list);
    if (dense) std::fill(skipped_.begin(), skipped_.end(), NEG_INF);
    const i64 count = dense ? n_ : i64(list.size());
    counters_[KEYS_READ] = count;
    counters_[OVERFLOW_ROWS] = dense;
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
  std::vector<float> q_, q_abs_;
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

  // Ask for a cell's box and the codes of planes [first, planes) of its tokens ahead of code_bounds: cells lie
  // in scattered blocks, where the hardware prefetcher cannot follow.
  void prefetch_cell(i64 cell, i64 first, i64 planes) const {
    i64 block, slot;
    prefetch_box(0, cell, block, slot);
    const uint8_t* codes = cell_codes(block, slot, first);
    for (i64 t = 0; t < a_.cell_size; ++t)
      for (i64 b = 0; b < (planes - first) * a_.plane_bytes; b += 64) __builtin_prefetch(codes + t * a_.code_token_stride + b);
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
#if defined(__AVX512F__)
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

  // Bounds of the tokens of a complete cell from its first `planes` code planes (core.summaries.code_bounds),
  // written to entries [first, first + cell_size) of tb. dots_ [G, tb.n] holds each token's code dot over
  // the first `read` planes and gets the plane read here added (planes == read + 1), so a refinement reads only
  // its new plane.
  void code_bounds(i64 cell, i64 planes, i64 read, Bounds& tb, i64 first) {
    const uint8_t* codes = read_cell_box(cell) + read * a_.plane_bytes;
    PlaneTerms& terms = plane_terms_[0];
    plane_terms({{planes, read, &terms}});
#if defined(__AVX512F__)
    if (vector_dots()) {
      for (i64 g = 0; g < G_; g += MAX_HEADS)
        with_heads(G_ - g, [&](auto heads) { cell_dots_avx512<heads()>(codes, terms, g, tb, first, read); });
      return;
    }
#endif
    const float s = float(a_.scale);
    const i64 stride = weight_stride(), plane_bits = a_.plane_bits;
    value_.resize(stride);
    const i64 per_byte = 8 / plane_bits, mask = (i64(1) << plane_bits) - 1;
    for (i64 t = 0; t < a_.cell_size; ++t) {
      const uint8_t* packed = codes + t * a_.code_token_stride;
      for (i64 d = 0; d < stride; ++d) value_[d] = float((packed[d / per_byte] >> ((d % per_byte) * plane_bits)) & mask);
      for (i64 g = 0; g < G_; ++g) {
        const float* weights = &terms.weights[g * stride];
        float dot = 0;
        for (i64 d = 0; d < stride; ++d) dot += weights[d] * value_[d];
        const i64 at = g * tb.n + first + t;
        dot += read ? dots_[at] : 0.0f;
        dots_[at] = dot;
        const float center = terms.cell_part[g] + dot;
        tb.ub[at] = finite_or(s * (center + terms.width[g]) + terms.margin[g], INF_F);
        tb.lb[at] = finite_or(s * (center - terms.width[g]) - terms.margin[g], -INF_F);
      }
    }
  }

  // code_bounds(cell, 1, 0, tb, first), and into fine_ the bounds code_bounds(cell, 2, 1) would then give
  void code_bounds_both(i64 cell, Bounds& tb, i64 first) {
#if defined(__AVX512F__)
    const uint8_t* codes = read_cell_box(cell);
    plane_terms({{1, 0, &plane_terms_[0]}, {2, 1, &plane_terms_[1]}});
    for (i64 g = 0; g < G_; g += MAX_HEADS)
      with_heads(G_ - g, [&](auto heads) { cell_dots_both<heads()>(codes, g, tb, fine_, first); });
#endif
  }
  bool both_planes_ = false;
  Bounds fine_;

  // One code plane's per-cell terms: weights [G, weight_stride()] and, per head, the cell part, width and
  // margin of the bounds
  struct PlaneTerms {
    std::vector<float> weights, cell_part, width, margin;
  };
  PlaneTerms plane_terms_[2];
  // code_bounds' per-cell scratch: the box read (lo_, hi_ hold a converted one), steps, magnitudes
  const float *cell_lo_ = nullptr, *cell_hi_ = nullptr;
  std::vector<float> step_, half_, magnitude_, value_;
  std::vector<float> dots_;       // [G, tokens] code dot of each token over the planes read so far

  i64 weight_stride() const { return D_ + D_ % 2; }   // even: a byte of 4-bit codes is channels 2j and 2j + 1
  bool vector_dots() const {
#if defined(__AVX512F__)
    return a_.plane_bits == 4 && a_.cell_size == 16 && a_.plane_bytes % 4 == 0;
#else
    return false;
#endif
  }

  // The cell's box (cell_lo_, cell_hi_), steps and magnitudes; returns its codes from plane 0
  const uint8_t* read_cell_box(i64 cell) {
    i64 block, slot;
    locate(0, cell, block, slot);
    box(block, slot, cell_lo_, cell_hi_);
    const float levels = float((i64(1) << a_.code_bits) - 1);
    step_.resize(D_);
    magnitude_.resize(D_);
    for (i64 d = 0; d < D_; ++d) {
      const float st = (cell_hi_[d] - cell_lo_[d]) / levels;
      magnitude_[d] = std::max(std::fabs(cell_lo_[d]), std::fabs(cell_hi_[d]));
      step_[d] = st;              // kept unsanitised for the half widths; see plane_terms
    }
    return cell_codes(block, slot, 0);
  }

  // The terms of the bounds from the first `planes` planes when plane `read` is the one read (read_cell_box
  // first), for one or two such jobs at once. Plane p weighs 2^(plane_bits * (planes after it)) steps, as
  // core.summaries._code_dot does.
  struct PlaneJob {
    i64 planes, read;
    PlaneTerms* terms;
  };
  void plane_terms(std::initializer_list<PlaneJob> list) {
    const i64 bits = a_.code_bits, plane_bits = a_.plane_bits, total_planes = bits / plane_bits;
    const i64 stride = weight_stride(), jobs = i64(list.size());
    const PlaneJob* job = list.begin();
    float unknown_half[2], place[2];
    for (i64 j = 0; j < jobs; ++j) {
      const i64 unknown = (i64(1) << (bits - job[j].planes * plane_bits)) - 1;
      const float half_steps = float(0.5 + unknown / 2.0 + a_.step_slack);
      unknown_half[j] = float(unknown / 2.0);
      place[j] = float(i64(1) << (plane_bits * (total_planes - 1 - job[j].read)));
      halves_[j].resize(D_);
      for (i64 d = 0; d < D_; ++d)
        halves_[j][d] = step_[d] * half_steps + magnitude_[d] * float(a_.magnitude_slack) + float(a_.abs_slack);
      PlaneTerms& terms = *job[j].terms;
      terms.weights.resize(G_ * stride);
      terms.cell_part.resize(G_);
      terms.width.resize(G_);
      terms.margin.resize(G_);
    }
    for (i64 g = 0; g < G_; ++g) {
      float base, steps, wide[2], mag[2];
      head_terms(g, jobs, place, base, steps, wide, mag, job);
      for (i64 j = 0; j < jobs; ++j) {
        PlaneTerms& terms = *job[j].terms;
        if (stride > D_) terms.weights[g * stride + D_] = 0.0f;
        terms.cell_part[g] = base + unknown_half[j] * steps;
        terms.width[g] = wide[j];
        terms.margin[g] = margin(mag[j]);
      }
    }
  }
  std::vector<float> halves_[2];   // plane_terms' half widths per channel, one per job

  // One head's sums over the channels for plane_terms (and its weights): base = <lo, q>, steps = <step, q>,
  // and per job wide = <half, |q|>, mag = <magnitude + half, |q|>. A non-finite step weighs nothing in the
  // dots (its half width still makes the bounds infinite).
  void head_terms(i64 g, i64 jobs, const float* place, float& base, float& steps, float* wide, float* mag,
                  const PlaneJob* job) const {
    const float* q = &q_[g * D_];
    const float* qa = &q_abs_[g * D_];
    const float* lo = cell_lo_;
    const i64 stride = weight_stride();
    i64 d = 0;
#if defined(__AVX512F__)
    __m512 base_v = _mm512_setzero_ps(), steps_v = _mm512_setzero_ps(), wide_v[2], mag_v[2];
    for (i64 j = 0; j < 2; ++j) wide_v[j] = mag_v[j] = _mm512_setzero_ps();
    const __m512 inf = _mm512_set1_ps(INF_F);
    for (; d < D_; d += 16) {
      const __mmask16 in = D_ - d >= 16 ? __mmask16(0xffff) : __mmask16((1u << (D_ - d)) - 1);
      const __m512 qv = _mm512_maskz_loadu_ps(in, q + d), qav = _mm512_maskz_loadu_ps(in, qa + d);
      const __m512 step = _mm512_maskz_loadu_ps(in, &step_[d]), magnitude = _mm512_maskz_loadu_ps(in, &magnitude_[d]);
      const __m512 finite = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(_mm512_abs_ps(step), inf, _CMP_LT_OQ), step);
      base_v = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(in, lo + d), qv, base_v);
      steps_v = _mm512_fmadd_ps(finite, qv, steps_v);
      const __m512 weight = _mm512_mul_ps(qv, finite);
      for (i64 j = 0; j < jobs; ++j) {
        const __m512 half = _mm512_maskz_loadu_ps(in, &halves_[j][d]);
        wide_v[j] = _mm512_fmadd_ps(half, qav, wide_v[j]);
        mag_v[j] = _mm512_fmadd_ps(_mm512_add_ps(magnitude, half), qav, mag_v[j]);
        _mm512_mask_storeu_ps(&job[j].terms->weights[g * stride + d], in, _mm512_mul_ps(weight, _mm512_set1_ps(place[j])));
      }
    }
    base = _mm512_reduce_add_ps(base_v);
    steps = _mm512_reduce_add_ps(steps_v);
    for (i64 j = 0; j < jobs; ++j) wide[j] = _mm512_reduce_add_ps(wide_v[j]), mag[j] = _mm512_reduce_add_ps(mag_v[j]);
#else
    base = steps = 0;
    for (i64 j = 0; j < jobs; ++j) wide[j] = mag[j] = 0;
    for (; d < D_; ++d) {
      const float step = std::isfinite(step_[d]) ? step_[d] : 0.0f;
      base += lo[d] * q[d];
      steps += step * q[d];
      for (i64 j = 0; j < jobs; ++j) {
        wide[j] += halves_[j][d] * qa[d];
        mag[j] += (magnitude_[d] + halves_[j][d]) * qa[d];
        job[j].terms->weights[g * stride + d] = q[d] * step * place[j];
      }
    }
#endif
  }

#if defined(__AVX512F__)
  // The vector code dots take up to MAX_HEADS query heads per pass over a cell's codes: each gathered word is
  // unpacked and converted once for all of them (four heads' accumulators of both planes fit the registers).
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

  // code_bounds for 16-token cells and HEADS query heads from g: one lane per token, so no horizontal sums;
  // each gather brings 4 code bytes of all 16 tokens, whose nibbles are converted once for the heads.
  template <int HEADS>
  void cell_dots_avx512(const uint8_t* codes, const PlaneTerms& terms, i64 g, Bounds& tb, i64 first, i64 read) {
    __m512 acc[HEADS];
    plane_dots<HEADS>(codes, terms, g, acc);
    for (int h = 0; h < HEADS; ++h) {
      const i64 at = (g + h) * tb.n + first;
      __m512 dot = acc[h];
      if (read) dot = _mm512_add_ps(dot, _mm512_loadu_ps(&dots_[at]));
      _mm512_storeu_ps(&dots_[at], dot);
      store_bounds(dot, terms, g + h, tb, at);
    }
  }

  // Both planes of 8-bit codes at once (code_bounds(cell, 1, 0) into tb, and what code_bounds(cell, 2, 1)
  // would then give into fine): the box is read and the cell set up once, and the second plane's gathers hit
  // the cache lines the first one's brought (a token's planes share one).
  template <int HEADS>
  void cell_dots_both(const uint8_t* codes, i64 g, Bounds& tb, Bounds& fine, i64 first) {
    __m512 coarse[HEADS], extra[HEADS];
    plane_dots<HEADS>(codes, plane_terms_[0], g, coarse);
    plane_dots<HEADS>(codes + a_.plane_bytes, plane_terms_[1], g, extra);
    for (int h = 0; h < HEADS; ++h) {
      const i64 at = (g + h) * tb.n + first;
      _mm512_storeu_ps(&dots_[at], coarse[h]);
      store_bounds(coarse[h], plane_terms_[0], g + h, tb, at);
      store_bounds(_mm512_add_ps(extra[h], coarse[h]), plane_terms_[1], g + h, fine, at);
    }
  }

  // acc[h] = the 16 tokens' code dots of one plane (codes: its first byte of token 0) for head g + h
  template <int HEADS>
  void plane_dots(const uint8_t* codes, const PlaneTerms& terms, i64 g, __m512* acc) const {
    const __m512i index = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                             _mm512_set1_epi32(int32_t(a_.code_token_stride)));
    const __m512i nibble = _mm512_set1_epi32(15);
    const i64 stride = weight_stride();
    // even and odd channels in separate sums: one chain of dependent FMAs per head would wait on their latency
    __m512 odd[HEADS];
    for (int h = 0; h < HEADS; ++h) acc[h] = odd[h] = _mm512_setzero_ps();
    for (i64 k = 0; k < a_.plane_bytes; k += 4) {
      const __m512i word = _mm512_i32gather_epi32(index, codes + k, 1);
      for (int j = 0; j < 4; ++j) {
        const __m512 low = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(word, 8 * j), nibble));
        const __m512 high = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(word, 8 * j + 4), nibble));
        for (int h = 0; h < HEADS; ++h) {
          const float* weights = &terms.weights[(g + h) * stride + 2 * (k + j)];
          acc[h] = _mm512_fmadd_ps(low, _mm512_set1_ps(weights[0]), acc[h]);
          odd[h] = _mm512_fmadd_ps(high, _mm512_set1_ps(weights[1]), odd[h]);
        }
      }
    }
    for (int h = 0; h < HEADS; ++h) acc[h] = _mm512_add_ps(acc[h], odd[h]);
  }

  // ub, lb of 16 tokens at entries [at, at + 16) of b from their code dots
  void store_bounds(__m512 dot, const PlaneTerms& terms, i64 g, Bounds& b, i64 at) const {
    const __m512 s = _mm512_set1_ps(float(a_.scale)), inf = _mm512_set1_ps(INF_F);
    const __m512 center = _mm512_add_ps(_mm512_set1_ps(terms.cell_part[g]), dot);
    const __m512 width = _mm512_set1_ps(terms.width[g]), margin_g = _mm512_set1_ps(terms.margin[g]);
    const __m512 up = _mm512_fmadd_ps(s, _mm512_add_ps(center, width), margin_g);
    const __m512 down = _mm512_fmsub_ps(s, _mm512_sub_ps(center, width), margin_g);
    _mm512_storeu_ps(&b.ub[at], _mm512_mask_blend_ps(_mm512_cmp_ps_mask(up, up, _CMP_UNORD_Q), up, inf));
    _mm512_storeu_ps(&b.lb[at], _mm512_mask_blend_ps(_mm512_cmp_ps_mask(down, down, _CMP_UNORD_Q), down,
                                                     _mm512_sub_ps(_mm512_setzero_ps(), inf)));
  }
#endif

  // -- selection rules (core.selection); every [G, P] array is head-major --------------------------
  // The certified greedy skip: log_mass [G, P]; log_gain [G, P] or null; log_spent [G] or null.
  std::vector<uint8_t> greedy_skip(const std::vector<double>& log_mass, const std::vector<double>& log_budget,
                                   const std::vector<uint8_t>& valid, const std::vector<double>* log_gain,
                                   const std::vector<double>* log_spent, std::vector<double>& spent) const {
    const i64 P = i64(valid.size()), bins = a_.hist_bins;
    const double per_nat = double(bins) / a_.hist_range;
    std::vector<uint8_t> skip(P, 1);
    std::vector<double> hist(bins), gain_hist(log_gain ? bins : 0), rels(G_ * P);
    std::vector<int32_t> bin(P);
    spent.assign(G_, 0.0);
    for (i64 g = 0; g < G_; ++g) {
      double ref = log_budget[g];
      if (log_gain) ref = logaddexp(log_budget[g], log_sum_exp(&(*log_gain)[g * P], valid));
      std::fill(hist.begin(), hist.end(), 0.0);
      std::fill(gain_hist.begin(), gain_hist.end(), 0.0);
      double* rel = &rels[g * P];
      // The masses in fp32 (exp_nonpositive): their relative error, ~1e-6, is far inside budget_slack.
      for (i64 p = 0; p < P; ++p) {
        rel[p] = valid[p] ? log_mass[g * P + p] - ref : NEG_INF;
        const double where = std::floor((rel[p] + a_.hist_range) * per_nat);
        bin[p] = std::isnan(where) ? 0 : int32_t(std::min<double>(std::max<double>(where, 0.0), double(bins - 1)));
        if (rel[p] <= 0) hist[bin[p]] += relative_mass(rel[p]);
        if (log_gain && valid[p] && std::isfinite(ref))
          gain_hist[bin[p]] += relative_mass(std::min((*log_gain)[g * P + p] - ref, 0.0));
      }
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
        allowed += cumulative <= (1.0 - a_.budget_slack) * allowance;
      }
      // a node is skipped only if every head of the group may skip it
      for (i64 p = 0; p < P; ++p) skip[p] &= uint8_t(rel[p] <= 0 && bin[p] < allowed);
    }
    for (i64 p = 0; p < P; ++p) skip[p] &= valid[p];
    for (i64 g = 0; g < G_; ++g)        // once the group's decision is known
      for (i64 p = 0; p < P; ++p) if (skip[p]) spent[g] += relative_mass(rels[g * P + p]);
    return skip;
  }

  // exp(x) for x <= 0 in fp32 (0 for -inf)
  static double relative_mass(double x) { return x == NEG_INF ? 0.0 : double(exp_nonpositive(float(x))); }

  // ln of the sum of exp(x[p]) over the valid p (-inf if none): one exp per term, relative to the largest
  static double log_sum_exp(const double* x, const std::vector<uint8_t>& valid) {
    const i64 P = i64(valid.size());
    double top = NEG_INF;
    for (i64 p = 0; p < P; ++p) if (valid[p]) top = std::max(top, x[p]);
    if (!std::isfinite(top)) return top;
    double sum = 0;
    for (i64 p = 0; p < P; ++p) sum += valid[p] ? relative_mass(x[p] - top) : 0.0;
    return top + std::log(sum);
  }

  // The largest v such that the weights of the values >= v sum to at least `budget` (unit weights: the
  // budget-th largest value; weight 0 leaves a value out), -inf if they never do. With token counts as
  // weights it is core.selection.topk_floor: a score that at least `budget` tokens are known to reach. A radix select on
  // order-preserving integer keys, 11 bits at a time: each pass sums the survivors' weights into 2048 bins and
  // keeps the bin that holds the answer (no sort: a sort or nth_element was a tenth of the query at 16K tokens).
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
  std::vector<double> record_skipped(const std::vector<uint8_t>& dropped, const std::vector<i64>* counts,
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
        masked_.resize(P);
        for (i64 p = 0; p < P; ++p) masked_[p] = dropped[p] ? x[p] : -INF_F;
        top = max_of(masked_.data(), P);
      }
      if (!std::isfinite(top)) { added[g] = top; continue; }
      double sum = 0;
      if (counts) {
        for (i64 p = 0; p < P; ++p)
          if (dropped[p]) sum += double((*counts)[p]) * std::exp(double(x[p]) - top);
      } else {
        const float top_f = float(top);
        constexpr i64 BLOCK = 16;
        for (i64 p0 = 0; p0 < P; p0 += BLOCK) {
          float block = 0;
          for (i64 p = p0; p < std::min(p0 + BLOCK, P); ++p)
            block += float(dropped[p]) * exp_nonpositive(std::min(masked_[p] - top_f, 0.0f));
          sum += block;
        }
        sum *= EXP_SLACK;
      }
      added[g] = top + std::log(sum);
    }
    for (i64 g = 0; g < G_; ++g) skipped_[g] = logaddexp(skipped_[g], added[g]);
    return added;
  }

  std::vector<float> masked_;     // record_skipped's ub of the dropped tokens, -inf elsewhere

  // max of x[0, n) (no NaN), -inf if empty: in 16 lanes, as a vector max
  static float max_of(const float* x, i64 n) {
    float lanes[16];
    std::fill(lanes, lanes + 16, -INF_F);
    i64 p = 0;
    for (; p + 16 <= n; p += 16)
      for (int j = 0; j < 16; ++j) lanes[j] = std::max(lanes[j], x[p + j]);
    for (; p < n; ++p) lanes[0] = std::max(lanes[0], x[p]);
    return *std::max_element(lanes, lanes + 16);
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
    for (size_t p = 0; p < valid.size(); ++p) valid[p] &= uint8_t(best[p] > float(a_.bias));   // fp32, as torch compares
  }

  // -- seeds -----------------------------------------------------------------------------------
  std::vector<i64> seed_cells() {
    std::vector<i64> beam;
    Bounds b;
    std::vector<float> best_ub;
    for (i64 level = top_level(); level >= 0; --level) {
      std::vector<i64> nodes = frontier(level, beam);
      b.resize(i64(nodes.size()), G_);
      for (size_t i = 0; i < nodes.size(); ++i) box_bounds(level, nodes[i], b, i64(i));
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

  i64 seeds_in(i64 start, i64 end) const {
    return std::lower_bound(seeds_.begin(), seeds_.end(), end) - std::lower_bound(seeds_.begin(), seeds_.end(), start);
  }

  // ln(eps * sum over seeded keys of exp(score)) per head (-inf: skip nothing)
  std::vector<double> log_budget() {
    std::vector<double> budget(G_, NEG_INF);
    if (a_.mode != SOFTMAX || a_.eps == 0 || seeds_.empty()) return budget;
    counters_[SEED_KEYS_READ] += i64(seeds_.size());
    std::vector<float> scores(seeds_.size() * G_);
    scores_of(seeds_.data(), i64(seeds_.size()), scores.data());
    for (size_t i = 0; i < seeds_.size(); ++i)
      for (i64 g = 0; g < G_; ++g) budget[g] = logaddexp(budget[g], double(scores[i * G_ + g]));
    for (i64 g = 0; g < G_; ++g) budget[g] += std::log(a_.eps);
    return budget;
  }

  // -- the query (TreeQuery.run); false: the row overflowed its capacity and is read densely ------
  bool select(std::vector<i64>& list) {
    make_seeds();
    const std::vector<double> budget = log_budget();
    std::vector<i64> cells;
    Bounds cell_bounds;
    const std::vector<double> token_budget = walk(budget, cells, cell_bounds);
    if (overflow_) return false;

    const i64 cs = a_.cell_size, C = i64(cells.size()), T = C * cs;
    Bounds tb;
    tb.resize(T, G_);
    dots_.resize(T * G_);
    const bool refined = a_.code_bits && a_.code_bits / a_.plane_bits > 1;
    // 8-bit codes on the vector path: the second plane's bounds come with the first (cell_dots_both), for the
    // refinement to pick from
    both_planes_ = refined && a_.code_bits / a_.plane_bits == 2 && vector_dots();
    if (both_planes_) fine_.resize(T, G_);
    for (i64 c = 0; c < C; ++c) {
      if (a_.code_bits && c + PREFETCH_CELLS < C) prefetch_cell(cells[c + PREFETCH_CELLS], 0, both_planes_ ? 2 : 1);
      if (both_planes_) code_bounds_both(cells[c], tb, c * cs);
      else if (a_.code_bits) code_bounds(cells[c], 1, 0, tb, c * cs);
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

    std::vector<i64> kept(T);
    size_t n = 0;
    for (i64 c = 0; c < C; ++c)
      for (i64 t = c * cs, first = cells[c] * cs - t; t < (c + 1) * cs; ++t) {
        kept[n] = first + t;
        n += kept_flag[t];
      }
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
      for (i64 node : frontier_nodes) {
        const i64 start = node * s, end = std::min((node + 1) * s, n_);
        const i64 count = end - start - seeds_in(start, end);
        if (count > 0) { nodes.push_back(node); counts.push_back(count); }
      }
      const i64 P = i64(nodes.size());
      b.resize(P, G_);
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
        std::vector<uint8_t> skip = greedy_skip(log_mass, level_budget, keep, nullptr, nullptr, level_spent);
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
  std::vector<double> gains(const Bounds& tb, double shift) const {
    std::vector<double> gain(tb.lb.size());
    const double log_eps = std::log(a_.eps) + shift;
    for (size_t i = 0; i < gain.size(); ++i) gain[i] = double(tb.lb[i]) + log_eps;
    return gain;
  }

  // First-plane cut, then every plane of the cells that still hold a candidate (TreeQuery.refine).
  bool refine(const std::vector<i64>& cells, std::vector<uint8_t>& valid, Bounds& tb,
              const std::vector<double>& budget, std::vector<double>& log_spent) {
    const i64 cs = a_.cell_size, T = i64(valid.size());
    if (a_.mode == RELU) {
      keep_above_bias(tb.ub, valid);
    } else if (a_.mode == SOFTMAX) {
      const double share = std::log(a_.refine_share);
      std::vector<double> log_mass(tb.ub.begin(), tb.ub.end()), shared(budget), gain, spent;
      for (double& x : shared) x += share;
      if (a_.eps > 0) gain = gains(tb, share);
      std::vector<uint8_t> skip = greedy_skip(log_mass, shared, valid, a_.eps > 0 ? &gain : nullptr, nullptr, spent);
      log_spent = record_skipped(skip, nullptr, tb.ub);
      for (i64 t = 0; t < T; ++t) valid[t] &= !skip[t];
    } else {
      std::vector<float> lower, upper;
      group_max(tb.lb, lower);
      group_max(tb.ub, upper);
      const float floor = kth_largest(lower, valid, a_.budget_tokens);
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
        prefetch_cell(cells[picked[i + PREFETCH_CELLS]], 1, planes);
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
      std::vector<double> log_mass(tb.ub.begin(), tb.ub.end()), gain, spent;
      if (a_.eps > 0) gain = gains(tb, 0.0);
      std::vector<uint8_t> skip = greedy_skip(log_mass, budget, valid, a_.eps > 0 ? &gain : nullptr,
                                              a_.eps > 0 ? log_spent : nullptr, spent);
      for (i64 t = 0; t < T; ++t) keep[t] &= !skip[t];
    } else {
      std::vector<float> upper;
      group_max(tb.ub, upper);
      // the budget best: those above the budget-th largest, then its ties in token order
      const float kth = kth_largest(upper, valid, a_.budget_tokens);
      // raw pointers: a byte store may alias the vectors' own pointers, which kept these loops scalar
      const uint8_t* __restrict in = valid.data();
      const float* __restrict up = upper.data();
      uint8_t* __restrict out = keep.data();
      i64 above = 0;
      for (i64 t = 0; t < T; ++t) {
        out[t] = in[t] & uint8_t(up[t] > kth);
        above += out[t];
      }
      for (i64 t = 0, ties = a_.budget_tokens - above; t < T && ties > 0; ++t)
        if (in[t] && !out[t] && up[t] == kth) out[t] = 1, --ties;
    }
    return keep;
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

  static constexpr i64 PREFETCH_ROWS = 8;   // tokens ahead whose contiguous K or V row is requested
  static void prefetch_row(const void* row, i64 bytes) {
    for (i64 b = 0; b < bytes; b += 64) __builtin_prefetch(static_cast<const char*>(row) + b);
  }
  i64 item_size() const { return dtype_size(a_.cache_dtype); }

  // Exact scores [count, G] of tokens[0, count) (ascending). Keys of complete cells come from the key copy
  // when there is one (each key one contiguous row, whatever the cache's layout); the rest from the cache.
  void scores_of(const i64* tokens, i64 count, float* scores) {
    const i64 copied = a_.key_rows ? std::lower_bound(tokens, tokens + count, n_ / a_.cell_size * a_.cell_size) - tokens
                                   : 0;
    if (copied) {
      const char* copy = static_cast<const char*>(a_.key_rows) + h_ * a_.key_rows_head_stride * item_size();
      scores_from_rows(tokens, copied, scores, [&](i64 token) {
        return copy + (table_[token / a_.block_size] * a_.key_rows_block_stride + (token % a_.block_size) * D_) *
                      item_size();
      });
    }
    cache_scores(tokens + copied, count - copied, scores + copied * G_);
  }

  // scores_of for keys whose channels are contiguous at row_of(token) (bytes, cache dtype), requested ahead
  template <typename RowOf>
  void scores_from_rows(const i64* tokens, i64 count, float* scores, RowOf row_of) {
    const float s = float(a_.scale);
    const i64 bytes = D_ * item_size();
    for (i64 i = 0; i < std::min(PREFETCH_ROWS, count); ++i) prefetch_row(row_of(tokens[i]), bytes);
    key_.resize(D_);
    for (i64 i = 0; i < count; ++i) {
      if (i + PREFETCH_ROWS < count) prefetch_row(row_of(tokens[i + PREFETCH_ROWS]), bytes);
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
  void cache_scores(const i64* tokens, i64 count, float* scores) {
    const Affine& key = key_layout_;
    const float s = float(a_.scale);
    if (a_.cache_dtype == F32 && key.affine && key.channel == 1) {
      scores_from_rows(tokens, count, scores, [&](i64 token) {
        return reinterpret_cast<const char*>(fp32_page(token) + key.base + (token % a_.block_size) * key.token);
      });
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

  // acc[g] += weights[i, g] * V[tokens[i]] for i < count
  void accumulate_values(const i64* tokens, i64 count, const float* weights, float* acc) {
    const Affine& value = value_layout_;
    if (a_.cache_dtype == F32 && value.affine) {
      auto row_of = [&](i64 token) { return fp32_page(token) + value.base + (token % a_.block_size) * value.token; };
      const bool rows = value.channel == 1;     // then one row per token, requested ahead
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

  void attend(const std::vector<i64>& list) {
    const i64 L = i64(list.size());
    std::vector<float> scores(L * G_), m(G_, -INF_F), acc(G_ * D_, 0.0f), norm(G_, 0.0f);
    scores_of(list.data(), L, scores.data());
    for (i64 i = 0; i < L; ++i)
      for (i64 g = 0; g < G_; ++g) m[g] = std::max(m[g], scores[i * G_ + g]);
    const bool relu = a_.mode == RELU;
    std::vector<i64> weighted;           // tokens with a nonzero weight: only their values are read
    std::vector<float> weights;          // [weighted, G]
    for (i64 i = 0; i < L; ++i) {
      bool any = false;
      for (i64 g = 0; g < G_; ++g) {
        const float x = scores[i * G_ + g];
        float w;
        if (relu) {
          const float r = std::max(x - float(a_.bias), 0.0f);
          w = 1.0f;
          for (i64 k = 0; k < a_.alpha; ++k) w *= r;
        } else {
          w = std::exp(x - (std::isfinite(m[g]) ? m[g] : 0.0f));
        }
        scores[i * G_ + g] = w;
        norm[g] += w;
        any = any || w != 0;
      }
      if (!any) continue;
      weighted.push_back(list[i]);
      weights.insert(weights.end(), &scores[i * G_], &scores[i * G_] + G_);
    }
    accumulate_values(weighted.data(), i64(weighted.size()), weights.data(), acc.data());
    for (i64 g = 0; g < G_; ++g) {
      const i64 head = b_ * a_.num_q_heads + h_ * G_ + g;
      const float divisor = norm[g] > 0 ? norm[g] : 1.0f;
      for (i64 d = 0; d < D_; ++d) a_.out[head * D_ + d] = acc[g * D_ + d] / divisor;
      float bound = 0.0f;
      const float skipped = float(skipped_[g]);
      if (!relu && skipped != -INF_F) {
        const float m_safe = std::isfinite(m[g]) ? m[g] : 0.0f;
        bound = std::exp(skipped - m_safe - std::log(norm[g])) * (1.0f + 1e-5f);
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
}

}  // extern "C"
