// Token score bounds from the key codes (core.summaries.code_bounds): the portable path, and the AVX-512 one
// that sets up each cell's terms as the walk reads its box (cell_pass) and bounds 16 tokens a pass from them.
#pragma once

#include <algorithm>
#include <cmath>

#include "box_bounds.h"
#include "row.h"
#include "scratch.h"
#include "vector_math.h"

namespace hsr {
namespace {   // (hsr_decode.cpp includes the stages; nothing here is seen by another file)

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

class CodeBounds : public RowInputs {
 public:
  CodeBounds(const RowInputs& row, BoxBounds& boxes) : RowInputs(row), boxes_(boxes) {}

  // both: both planes' bounds in the code pass; fine_only: those alone, into tb (softmax cuts once, on them)
  void set_both_planes(bool both, bool fine_only) {
    both_planes_ = both;
    fine_only_ = both && fine_only;
  }
#if HSR_AVX512
  // the walk's level-0 cells it kept, as entries of the stash cell_pass filled
  void keep_stash(const Scratch<i64>& entries) { stash_of_ = entries; }
#endif

  // The code pass: bounds [G, T] of every token of the kept cells (T = cells * cell_size) into tb, each capped by
  // its cell's box bounds cell_bounds [G, cells]; with both planes set also those of both planes into fine_ (fine
  // only: into tb, in place of the first plane's).
  void token_bounds(const Scratch<i64>& cells, const Bounds& cell_bounds, Bounds& tb) {
    const i64 cs = a_.cell_size, C = i64(cells.size()), T = C * cs;
    tb.resize(T, G_);
    if (!stashed()) dots_.resize(T * G_);
    if (both_planes_ && !fine_only_) fine_.resize(T, G_);
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
  }

  // The refinement's pass: tb [G, T] capped by the bounds of every plane of the picked cells (entries of cells).
  void refine_bounds(const Scratch<i64>& cells, const Scratch<i64>& picked, Bounds& tb) {
    if (fine_only_) return;                         // tb holds every plane's bounds already
    const i64 cs = a_.cell_size, T = tb.n;
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
  bool fine_only_ = false;       // and only those (softmax), into tb
  Bounds fine_;                   // [G, tokens] with both_planes_: the bounds from both planes

  // The per-cell, per-head terms of the bounds from the first `planes` planes of a job: centre = cell_part +
  // place * 2^e * dot, half width `width` (the weights' rounding included), rounding margin `margin`
  struct PlaneTerms {
    float place = 1;              // 2^u
    Scratch<float> cell_part, width, margin;
  };
  PlaneTerms terms_;              // the portable path's, of one cell
  Scratch<int32_t> weights_;  // [G, weight_stride()] the cell's integer code weights x (portable path)
  Scratch<int32_t> exponent_; // [G] their e
  Scratch<float> step_, half_, magnitude_, scaled_;
  Scratch<int32_t> value_;
  Scratch<int32_t> dots_;     // [G, tokens] integer code dot of each token over the planes read so far

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
    boxes_.box(block, slot, lo, hi);
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
  Scratch<float> stash_terms_;        // [P, G, STASH_TERMS] P: the walk's cells
  Scratch<int32_t> stash_words_;      // [P, G, 4, words_stride()] x as int16 pairs: word k of group r holds
                                          // channels 8k + r and 8k + 4 + r (the nibbles r of code bytes 4k, 4k + 1
                                          // and of 4k + 2, 4k + 3)
  Scratch<i64> stash_of_;             // [kept cells] each kept cell's entry in the stash
  Scratch<float> lanes_;              // cell_pass' per-cell channels: ranges, steps, finite steps, magnitudes

  // Box bounds of the cells nodes[0, P) (entries of b, as box_bounds) and their stash entries.
  __attribute__((noinline)) void cell_pass(const Scratch<i64>& nodes, Bounds& b) {
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
    stash_words_.resize(P * G_ * 4 * word_stride);   // every word is written (0 past the head size)
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
      boxes_.box(block, slot, lo, hi);
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
      if (!fine_only_) store_bounds(coarse[h], t, 0, up, down, tb, at);
      if (both_planes_) store_bounds(_mm512_add_epi32(_mm512_slli_epi32(coarse[h], 4), extra[h]), t, 1, up, down,
                                     fine_only_ ? tb : fine_, at);
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

 private:
  BoxBounds& boxes_;
};

}  // namespace
}  // namespace hsr
