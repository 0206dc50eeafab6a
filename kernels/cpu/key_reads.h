// Exact reads of listed tokens: their K scores for a row's query heads and their weighted V sums, from the key
// copy or the cache, in any layout, with the rows requested ahead.
#pragma once

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "row.h"
#include "scratch.h"

namespace hsr {
namespace {   // (hsr_decode.cpp includes the stages; nothing here is seen by another file)

class KeyReads : public RowInputs {
 public:
  explicit KeyReads(const RowInputs& row) : RowInputs(row) {}

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
  Scratch<float> key_;

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
      Scratch<i64> runs;                  // where each block's tokens start, then count
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
  Scratch<float> rows_;

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
  // accumulate_values for G heads over contiguous fp32 value rows (row_of(token)), D a multiple of 16, every
  // head's sums in registers across the tokens (not reloaded and stored per token). Where all of a row's sums fit
  // (G x D / 16 of them, up to MAX_ROW_SUMS), each value row is read once, whole; otherwise 16 channels at a time,
  // one pass over the tokens per 16 channels.
  template <int G, typename RowOf>
  void sum_rows_in_registers(const i64* tokens, i64 count, const float* weights, float* acc, RowOf row_of) const {
    const i64 chunks = D_ / 16;
    if (G * chunks <= MAX_ROW_SUMS) {
      switch (chunks) {
        case 1: return sum_channels<G, 1>(tokens, count, weights, acc, row_of, 0, true);
        case 2: return sum_channels<G, 2>(tokens, count, weights, acc, row_of, 0, true);
        case 3: return sum_channels<G, 3>(tokens, count, weights, acc, row_of, 0, true);
        case 4: return sum_channels<G, 4>(tokens, count, weights, acc, row_of, 0, true);
        case 5: return sum_channels<G, 5>(tokens, count, weights, acc, row_of, 0, true);
        case 6: return sum_channels<G, 6>(tokens, count, weights, acc, row_of, 0, true);
        case 8: return sum_channels<G, 8>(tokens, count, weights, acc, row_of, 0, true);
        default: break;
      }
    }
    for (i64 c = 0; c < D_; c += 16) sum_channels<G, 1>(tokens, count, weights, acc, row_of, c, c == 0);
  }

  // Sums of zmm registers a pass over whole value rows may hold (of 32: the rest take the row and a weight)
  static constexpr i64 MAX_ROW_SUMS = 24;
  // One pass over the tokens summing channels [first, first + 16 x CHUNKS) of their value rows into acc, the
  // sums in registers; with `prefetch` the rows are requested ahead (a later pass over the same rows finds them
  // in cache). A whole row at once (CHUNKS = D / 16) has its lines arrive together, where a pass per 16 channels
  // waits on one line of every row in each pass (~10% of a certified softmax call at 7.5K tokens and 8 rows, ~2%
  // of a top-k one). Either way, the same sums in the same order.
  template <int G, int CHUNKS, typename RowOf>
  void sum_channels(const i64* tokens, i64 count, const float* weights, float* acc, RowOf row_of, i64 first,
                    bool prefetch) const {
    if constexpr (G * CHUNKS <= MAX_ROW_SUMS) {
      __m512 sum[G][CHUNKS];
      for (int g = 0; g < G; ++g)
        for (int c = 0; c < CHUNKS; ++c) sum[g][c] = _mm512_loadu_ps(&acc[g * D_ + first + 16 * c]);
      if (prefetch)
        for (i64 i = 0; i < std::min(PREFETCH_ROWS, count); ++i) prefetch_row(row_of(tokens[i]), D_ * 4);
      for (i64 i = 0; i < count; ++i) {
        if (prefetch && i + PREFETCH_ROWS < count) prefetch_row(row_of(tokens[i + PREFETCH_ROWS]), D_ * 4);
        const float* row = row_of(tokens[i]) + first;
        __m512 v[CHUNKS];
        for (int c = 0; c < CHUNKS; ++c) v[c] = _mm512_loadu_ps(row + 16 * c);
        for (int g = 0; g < G; ++g) {
          const __m512 w = _mm512_set1_ps(weights[i * G + g]);
          for (int c = 0; c < CHUNKS; ++c) sum[g][c] = _mm512_fmadd_ps(w, v[c], sum[g][c]);
        }
      }
      for (int g = 0; g < G; ++g)
        for (int c = 0; c < CHUNKS; ++c) _mm512_storeu_ps(&acc[g * D_ + first + 16 * c], sum[g][c]);
    }
  }
#endif
};

}  // namespace
}  // namespace hsr
