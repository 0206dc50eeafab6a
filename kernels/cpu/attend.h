// Attention over a row's listed tokens (core.decode.decode_candidates): exact scores, softmax or ReLU^alpha
// weights, the values' weighted sum, and each head's output and certificate.
#pragma once

#include <algorithm>
#include <cmath>

#include "certificate.h"
#include "key_reads.h"
#include "row.h"
#include "scratch.h"
#include "vector_math.h"

namespace hsr {
namespace {   // (hsr_decode.cpp includes the stages; nothing here is seen by another file)

class Attend : public RowInputs {
 public:
  Attend(const RowInputs& row, KeyReads& keys, const Certificate& certificate)
      : RowInputs(row), keys_(keys), certificate_(certificate) {}

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

  // Writes the row's heads' outputs and error bounds from the tokens of list (ascending).
  void attend(const Scratch<i64>& list) {
    const i64 L = i64(list.size());
    Scratch<float> scores(L * G_), m(G_, -INF_F), acc(G_ * D_, 0.0f), norm(G_, 0.0f);
    keys_.scores_of(list.data(), L, scores.data(), true);
    for (i64 i = 0; i < L; ++i)
      for (i64 g = 0; g < G_; ++g) m[g] = std::max(m[g], scores[i * G_ + g]);
    const bool relu = a_.mode == RELU;
    Scratch<i64> weighted;           // tokens with a nonzero weight: only their values are read
    Scratch<float> weights;          // [weighted, G]
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
    keys_.accumulate_values(weighted.data(), i64(weighted.size()), weights.data(), acc.data());
    for (i64 g = 0; g < G_; ++g) {
      const i64 head = b_ * a_.num_q_heads + h_ * G_ + g;
      const float divisor = norm[g] > 0 ? norm[g] : 1.0f;
      for (i64 d = 0; d < D_; ++d) a_.out[head * D_ + d] = acc[g * D_ + d] / divisor;
      float bound = 0.0f;
      const float skipped = float(certificate_.skipped(g));
      if (!relu && skipped != -INF_F) {
        bound = std::exp(skipped - m[g] - std::log(norm[g])) * (1.0f + 1e-5f);
        bound = std::max(bound, CERTIFICATE_FLOOR);
      }
      a_.error_bound[head] = bound;
    }
  }

 private:
  KeyReads& keys_;
  const Certificate& certificate_;
};

}  // namespace
}  // namespace hsr
