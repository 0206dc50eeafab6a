// The fp32 and fp64 math the decode stages share, scalar and in 16 AVX-512 lanes: exponentials, log-sums,
// flagged maxima and sums.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstring>
#include <initializer_list>

#include "decode_args.h"

namespace hsr {
namespace {   // (hsr_decode.cpp includes the stages; nothing here is seen by another file)

inline double logaddexp(double a, double b) {
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

// a bound that came out NaN (inf - inf) as `value`, the side it must err on
inline float finite_or(float bound, float value) { return std::isnan(bound) ? value : bound; }

// max of x[p] over the flagged p < n, NaN passed over (as std::max passes it), -inf if none
inline float flagged_max(const float* x, const uint8_t* flags, i64 n) {
  i64 p = 0;
  float top = -INF_F;
#if HSR_AVX512
  __m512 lanes = _mm512_set1_ps(-INF_F);
  for (; p < n; p += 16) {
    const __mmask16 in = flag_mask(flags + p, n - p);
    const __m512 v = _mm512_maskz_loadu_ps(in, x + p);
    lanes = _mm512_mask_max_ps(lanes, in & _mm512_cmp_ps_mask(v, v, _CMP_ORD_Q), lanes, v);
  }
  top = _mm512_reduce_max_ps(lanes);
#endif
  for (; p < n; ++p) if (flags[p]) top = std::max(top, x[p]);
  return top;
}

// sum of x[p] over the flagged p < n, in fp64 (16 lanes: two sums of 8)
inline double flagged_sum(const float* x, const uint8_t* flags, i64 n) {
  double sum = 0;
  i64 p = 0;
#if HSR_AVX512
  __m512d low = _mm512_setzero_pd(), high = _mm512_setzero_pd();
  for (; p < n; p += 16) {
    const __mmask16 in = flag_mask(flags + p, n - p);
    const __m512 v = _mm512_maskz_loadu_ps(in, x + p);
    low = _mm512_add_pd(low, _mm512_cvtps_pd(_mm512_castps512_ps256(v)));
    high = _mm512_add_pd(high, _mm512_cvtps_pd(_mm512_extractf32x8_ps(v, 1)));
  }
  sum = _mm512_reduce_add_pd(_mm512_add_pd(low, high));
#endif
  for (; p < n; ++p) sum += flags[p] ? double(x[p]) : 0.0;
  return sum;
}

// sum of exp(x[p] - top) over the flagged p < n, every x[p] <= top: fp32 terms summed in fp32 blocks of 256
// (16 per lane) and the blocks in fp64
inline double sum_exp_below(const float* x, const uint8_t* flags, i64 n, float top) {
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

}  // namespace
}  // namespace hsr
