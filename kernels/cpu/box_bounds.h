// Boxes of cells and tree nodes, read as fp32, and the score bounds they give (core.summaries.box_bounds).
#pragma once

#include <algorithm>
#include <cmath>

#include "row.h"
#include "scratch.h"
#include "vector_math.h"

namespace hsr {
namespace {   // (hsr_decode.cpp includes the stages; nothing here is seen by another file)

class BoxBounds : public RowInputs {
 public:
  explicit BoxBounds(const RowInputs& row) : RowInputs(row) {}

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

 private:
  Scratch<float> lo_, hi_;
};

}  // namespace
}  // namespace hsr
