// The cell-tree query of a row (TreeQuery.run): the walk, the code pass over the kept cells, the refinement and
// the cut by the mode's rule; it leaves the list of tokens to read and the certificate of the rest.
#pragma once

#include <algorithm>
#include <cmath>

#include "certificate.h"
#include "code_bounds.h"
#include "row.h"
#include "scratch.h"
#include "selection_rules.h"
#include "walk.h"

namespace hsr {
namespace {   // (hsr_decode.cpp includes the stages; nothing here is seen by another file)

class Query : public RowInputs {
 public:
  Query(const RowInputs& row, Walk& walk, CodeBounds& codes, SelectionRules& rules, Certificate& certificate)
      : RowInputs(row), walk_(walk), codes_(codes), rules_(rules), certificate_(certificate) {}

  // The query (TreeQuery.run): the tokens to read, ascending, into list; false: the row overflowed its capacity
  // and is read whole.
  bool select(Scratch<i64>& list) {
    const Scratch<double> budget = walk_.seed();
    const bool refined = a_.code_bits && a_.code_bits / a_.plane_bits > 1;
    // 8-bit codes on the vector path: the second plane's bounds come with the first, for the refinement to pick
    // from (softmax, which cuts once on them: in place of the first's)
    codes_.set_both_planes(refined && a_.code_bits / a_.plane_bits == 2 && codes_.stashed(), a_.mode == SOFTMAX);
    Scratch<i64> cells;
    Bounds cell_bounds;
    const Scratch<double> token_budget = walk_.descend(budget, cells, cell_bounds);
    if (walk_.overflow()) return false;

    const i64 cs = a_.cell_size, C = i64(cells.size()), T = C * cs;
    Bounds tb;
    codes_.token_bounds(cells, cell_bounds, tb);
    const Scratch<i64>& seeds = walk_.seeds();
    Scratch<uint8_t> valid(T, 1);                  // the seeds are read already
    for (i64 token : seeds) {
      const i64 c = std::lower_bound(cells.begin(), cells.end(), token / cs) - cells.begin();
      if (c < C && cells[c] == token / cs) valid[c * cs + token % cs] = 0;
    }

    if (refined && !refine(cells, valid, tb)) return false;
    Scratch<uint8_t> keep = keep_tokens(tb, valid, token_budget);
    Scratch<uint8_t> dropped(T);
    const uint8_t* __restrict kept_flag = keep.data();
    {
      const uint8_t* __restrict in = valid.data();
      uint8_t* __restrict out = dropped.data();
      for (i64 t = 0; t < T; ++t) out[t] = in[t] & !kept_flag[t];
    }
    certificate_.record(dropped, nullptr, tb.ub);

    Scratch<i64> kept(T + 16);
    i64 n = 0;
    for (i64 c = 0; c < C; ++c) n = flagged_positions(kept_flag + c * cs, cs, cells[c] * cs, kept.data() + n) - kept.data();
    list.resize(seeds.size() + n);
    std::merge(seeds.begin(), seeds.end(), kept.begin(), kept.begin() + n, list.begin());
    return !(a_.capacity > 0 && i64(list.size()) > a_.capacity);
  }

 private:
  Walk& walk_;
  CodeBounds& codes_;
  SelectionRules& rules_;
  Certificate& certificate_;

  // ln of what reading a token adds to the softmax budget: eps * exp(its lower bound)
  Terms<float> gains(const Bounds& tb) const { return {tb.lb.data(), std::log(a_.eps)}; }

  // Relu and topk: a first-plane cut; then every plane of the cells that still hold a candidate (softmax: every
  // cell; TreeQuery.refine says why).
  bool refine(const Scratch<i64>& cells, Scratch<uint8_t>& valid, Bounds& tb) {
    const i64 cs = a_.cell_size, T = i64(valid.size());
    if (a_.mode == RELU) {
      rules_.keep_above_bias(tb.ub, valid);
    } else if (a_.mode == TOPK) {
      Scratch<float> lower, upper;
      rules_.group_max(tb.lb, lower);
      rules_.group_max(tb.ub, upper);
      const float floor = rules_.kth_of_many(lower, valid, a_.budget_tokens);
      Scratch<uint8_t> cut(T);
      const float* __restrict up = upper.data();
      uint8_t* __restrict in = valid.data();
      uint8_t* __restrict out = cut.data();
      for (i64 t = 0; t < T; ++t) {
        const uint8_t reach = up[t] >= floor;
        out[t] = in[t] & !reach;
        in[t] &= reach;
      }
      certificate_.record(cut, nullptr, tb.ub);          // unread: the certificate counts them
    }
    Scratch<i64> picked;
    for (i64 c = 0; c < i64(cells.size()); ++c) {
      uint8_t any = 0;
      for (i64 t = c * cs; t < (c + 1) * cs; ++t) any |= valid[t];
      if (any) picked.push_back(c);
    }
    if (too_wide(picked.size())) return false;
    counters_[REFINED_CELLS] += i64(picked.size());
    codes_.refine_bounds(cells, picked, tb);
    return true;
  }

  Scratch<uint8_t> keep_tokens(const Bounds& tb, const Scratch<uint8_t>& valid, const Scratch<double>& budget) {
    const i64 T = i64(valid.size());
    Scratch<uint8_t> keep(valid);
    if (a_.mode == RELU) {
      rules_.keep_above_bias(tb.ub, keep);
    } else if (a_.mode == SOFTMAX) {
      const Terms<float> gain = gains(tb);
      Scratch<uint8_t> skip = rules_.greedy_skip(Terms<float>{tb.ub.data()}, budget, valid,
                                                     a_.eps > 0 ? &gain : nullptr);
      for (i64 t = 0; t < T; ++t) keep[t] &= !skip[t];
    } else {
      Scratch<float> upper;
      rules_.group_max(tb.ub, upper);
      // the budget best: those above the budget-th largest, then its ties in token order
      const float kth = rules_.kth_of_many(upper, valid, a_.budget_tokens);
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
};

}  // namespace
}  // namespace hsr
