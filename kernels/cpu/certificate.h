// The certificate's ledger: per query head, ln of what the tokens and nodes a row drops can weigh at most.
#pragma once

#include <algorithm>
#include <cmath>

#include "row.h"
#include "scratch.h"
#include "vector_math.h"

namespace hsr {
namespace {   // (hsr_decode.cpp includes the stages; nothing here is seen by another file)

class Certificate : public RowInputs {
 public:
  explicit Certificate(const RowInputs& row) : RowInputs(row), skipped_(G_, NEG_INF) {}

  // Add n * exp(ub) of the dropped entries (counts null: n = 1) to each head's skipped mass. ub: [G, P]. Each
  // head's sum runs from its largest term, so every exponent is <= 0; the token sums are branch-free (`dropped`
  // is as unpredictable as a coin) in fp32 blocks.
  // (not inlined: inlined into the walk, with the rest that walk inlines, it crashes GCC 12.2's loop vectorizer)
  __attribute__((noinline)) void record(const Scratch<uint8_t>& dropped, const Scratch<i64>* counts,
                                        const Scratch<float>& ub) {
    const i64 P = i64(dropped.size());
    Scratch<double> added(G_, NEG_INF);
    for (i64 g = 0; g < G_; ++g) {
      const float* x = &ub[g * P];
      double top = NEG_INF;
      if (counts) {
        for (i64 p = 0; p < P; ++p)
          if (dropped[p]) top = std::max(top, double(x[p]) + std::log(double((*counts)[p])));
      } else {
        top = flagged_max(x, dropped.data(), P);
      }
      // no term to pass over NaN for the maximum: a dropped entry with a NaN bound makes the mass NaN, as it would
      // the twin's log-sum-exp, never -inf (nothing dropped)
      if (top == NEG_INF && dropped_nan(x, dropped)) top = std::numeric_limits<double>::quiet_NaN();
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
  }

  // whether a dropped entry's bound is NaN
  static bool dropped_nan(const float* x, const Scratch<uint8_t>& dropped) {
    for (size_t p = 0; p < dropped.size(); ++p)
      if (dropped[p] && std::isnan(x[p])) return true;
    return false;
  }

  // the row is read whole: nothing was dropped
  void clear() { std::fill(skipped_.begin(), skipped_.end(), NEG_INF); }
  // ln of head g's dropped mass bound (-inf: none)
  double skipped(i64 g) const { return skipped_[g]; }

 private:
  Scratch<double> skipped_;   // [G]
};

}  // namespace
}  // namespace hsr
