// The selection rules (core.selection) over [G, P] bounds of nodes or tokens: the certified greedy skip, the
// top-k floor, and the group's maxima.
#pragma once

#include <algorithm>
#include <cmath>

#include <cstring>
#include <functional>
#include <initializer_list>
#include <type_traits>

#include "row.h"
#include "scratch.h"
#include "vector_math.h"

namespace hsr {
namespace {   // (hsr_decode.cpp includes the stages; nothing here is seen by another file)

class SelectionRules : public RowInputs {
 public:
  explicit SelectionRules(const RowInputs& row) : RowInputs(row) {}

  // -- selection rules (core.selection); every [G, P] array is head-major --------------------------
  // The certified greedy skip: log_mass [G, P]; log_gain [G, P] or null. With spent given, also the mass it
  // skipped per head [G], relative to the head's budget plus gains (the walk's levels spend by it; the token
  // levels' spending is the certificate's).
  template <typename T>
  Scratch<uint8_t> greedy_skip(const Terms<T>& log_mass, const Scratch<double>& log_budget,
                                   const Scratch<uint8_t>& valid, const Terms<float>* log_gain,
                                   Scratch<double>* spent = nullptr) {
    const i64 P = i64(valid.size()), bins = a_.hist_bins;
    Scratch<uint8_t> skip(P, 1);
    Scratch<double> hist(bins, 0.0), gain_hist(log_gain ? bins : 0, 0.0);
    HeadMasses& m = head_masses_;
    m.resize(P, G_, log_gain != nullptr);
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
    // once the group's decision is known (a skipped node fits: its mass)
    if (spent) {
      spent->resize(G_);
      for (i64 g = 0; g < G_; ++g) (*spent)[g] = flagged_sum(&m.mass[g * P], skip.data(), P);
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
  Scratch<double> partial_hist_;

  // greedy_skip's per-node quantities for one head, against its reference ref: [P] each (mass: every head's)
  struct HeadMasses {
    Scratch<int32_t> bin;     // histogram bin of the relative log-mass
    Scratch<uint8_t> fits;    // relative log-mass <= 0 (masses that may be skipped)
    Scratch<float> mass;      // [G, P]: relative mass where it fits, else 0
    Scratch<float> gain;      // relative gain (valid nodes, finite ref), else 0
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
      // fp32 terms (the tokens' bounds): rel = x - (ref - shift) in fp32 lanes, 16 a pass, the reference in two
      // parts (so its size adds no error); the error left, an ulp of rel, is far inside budget_slack, and moves a
      // node on a bin's edge as a near-tie would
      const float mass_lo = low_part(ref - log_mass.shift), gain_lo = gains ? low_part(ref - log_gain->shift) : 0.0f;
      const __m512 mass_ref = _mm512_set1_ps(float(ref - log_mass.shift)), mass_ref_lo = _mm512_set1_ps(mass_lo),
                   gain_ref = _mm512_set1_ps(gains ? float(ref - log_gain->shift) : 0.0f),
                   gain_ref_lo = _mm512_set1_ps(gain_lo),
                   range = _mm512_set1_ps(float(a_.hist_range)), scale = _mm512_set1_ps(float(per_nat)),
                   zero = _mm512_setzero_ps(), top = _mm512_set1_ps(float(top_bin)), minus_inf = _mm512_set1_ps(-INF_F);
      for (; p + 16 <= P; p += 16) {
        const __mmask16 in = flag_mask(valid + p, 16);
        const __m512 rel =
            _mm512_sub_ps(_mm512_mask_sub_ps(minus_inf, in, _mm512_loadu_ps(log_mass.x + p), mass_ref), mass_ref_lo);
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
          const __m512 x = _mm512_min_ps(
              zero, _mm512_sub_ps(_mm512_sub_ps(_mm512_loadu_ps(log_gain->x + p), gain_ref), gain_ref_lo));
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

  // c - float(c): what fp32 leaves of c (0 where c is not finite)
  static float low_part(double c) { return std::isfinite(c) ? float(c - double(float(c))) : 0.0f; }

  // exp(x) for x <= 0 in fp32 (0 for -inf)
  static double relative_mass(double x) { return x == NEG_INF ? 0.0 : double(exp_nonpositive(float(x))); }

  // ln of the sum of exp(x[p]) over the valid p (-inf if none): one exp per term, relative to the largest x
  // (the shift cancels), in fp32 (sum_exp_below). A NaN term is passed over for the maximum and makes the sum
  // NaN; all terms NaN give -inf, a +inf term +inf (as the scalar rule)
  static double log_sum_exp(const Terms<float>& x, const Scratch<uint8_t>& valid) {
    const i64 P = i64(valid.size());
    const float top = flagged_max(x.x, valid.data(), P);
    if (!std::isfinite(top)) return top;
    return x.shift + double(top) + std::log(sum_exp_below(x.x, valid.data(), P, top));
  }

  // The largest v such that the weights of the values >= v sum to at least `budget` (unit weights: the
  // budget-th largest value; weight 0 leaves a value out), -inf if they never do. With token counts as
  // weights it is core.selection.topk_floor: a score that at least `budget` tokens are known to reach. A radix
  // select on order-preserving integer keys, a digit at a time: each pass sums the survivors' weights into a bin
  // per digit value and keeps the bin that holds the answer (no sort: a sort or nth_element was a tenth of the
  // query at 16K tokens).
  template <typename Weight>
  static float kth_largest(const Scratch<float>& values, const Scratch<Weight>& weights, i64 budget) {
    Scratch<uint32_t> keys(values.size());
    Scratch<i64> kept_weights(values.size());
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
    // digits of 11, 11 and 10 bits; for a few thousand values or fewer (the walk's cells, top-k's candidates)
    // four of 8 bits: 2048 bins cost more to clear and scan than so few values do to count
    static constexpr int WIDE[] = {21, 10, 0}, NARROW[] = {24, 16, 8, 0};
    const bool narrow = n <= 4096;
    const int* shifts = narrow ? NARROW : WIDE;
    for (int d = 0, digits = narrow ? 4 : 3; d < digits; ++d) {
      const int shift = shifts[d];
      const uint32_t bins = narrow ? 256u : shift ? 2048u : 1024u;
      i64 sum[2048];
      std::fill(sum, sum + bins, i64(0));
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
  float kth_of_many(const Scratch<float>& values, const Scratch<uint8_t>& flags, i64 budget) {
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
        return kth_largest(candidates_, Scratch<uint8_t>(count, 1), budget);
      }
    }
    return kth_largest(values, flags, budget);
  }
  Scratch<float> sample_, candidates_;

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

  // out[p] = max over the group of x [G, P]
  void group_max(const Scratch<float>& x, Scratch<float>& out) const {
    const i64 P = i64(x.size()) / G_;
    out.assign(x.begin(), x.begin() + P);
    for (i64 g = 1; g < G_; ++g)
      for (i64 p = 0; p < P; ++p) out[p] = std::max(out[p], x[g * P + p]);
  }

  // valid[p] &= some head's ub[p] > bias (relu mode: the others weigh exactly nothing)
  void keep_above_bias(const Scratch<float>& ub, Scratch<uint8_t>& valid) const {
    Scratch<float> best;
    group_max(ub, best);
    // in fp32, as torch compares
    for (size_t p = 0; p < valid.size(); ++p) valid[p] &= uint8_t(best[p] > float(a_.bias));
  }
};

}  // namespace
}  // namespace hsr
