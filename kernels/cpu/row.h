// A (sequence, KV head) row of the batch: its arguments, its query heads' terms, its counters, and where its
// tree's nodes, boxes and codes lie. Each stage of the row's decode derives from RowInputs (a few words, copied).
#pragma once

#include <algorithm>
#include <cmath>

#include "decode_args.h"
#include "scratch.h"

namespace hsr {
namespace {   // (hsr_decode.cpp includes the stages; nothing here is seen by another file)

// The row's G query heads as the bounds use them: [G, D] q, |q|, max(q, 0), min(q, 0); [G] <1, |q|>
struct QueryTerms {
  Scratch<float> q, abs, pos, neg, abs_sum;

  QueryTerms(const HsrArgs& a, i64 row) {
    const i64 G = a.num_q_heads / a.num_kv_heads, D = a.head_dim;
    const float* x = a.q + ((row / a.num_kv_heads) * a.num_q_heads + (row % a.num_kv_heads) * G) * D;
    q.assign(x, x + G * D);
    abs.resize(G * D), pos.resize(G * D), neg.resize(G * D), abs_sum.assign(G, 0.0f);
    for (i64 i = 0; i < G * D; ++i) {
      abs[i] = std::fabs(x[i]);
      pos[i] = std::max(x[i], 0.0f);
      neg[i] = std::min(x[i], 0.0f);
    }
    for (i64 g = 0; g < G; ++g)
      for (i64 d = 0; d < D; ++d) abs_sum[g] += abs[g * D + d];
  }
};

struct RowInputs {
  RowInputs(const HsrArgs& a, const Affine& key_layout, const Affine& value_layout, i64 row, const QueryTerms& q)
      : a_(a), key_layout_(key_layout), value_layout_(value_layout), b_(row / a.num_kv_heads),
        h_(row % a.num_kv_heads), row_(row), G_(a.num_q_heads / a.num_kv_heads), D_(a.head_dim),
        n_(a.seq_lens[b_]), table_(a.block_table + b_ * a.table_width), q_(q.q.data()), q_abs_(q.abs.data()),
        q_pos_(q.pos.data()), q_neg_(q.neg.data()), q_abs_sum_(q.abs_sum.data()),
        counters_(a.counters + row * NUM_COUNTERS) {}

  const HsrArgs& a_;
  const Affine &key_layout_, &value_layout_;
  const i64 b_, h_, row_, G_, D_, n_;
  const i64* table_;
  const float *q_, *q_abs_, *q_pos_, *q_neg_, *q_abs_sum_;   // QueryTerms'
  i64* counters_;                                              // [NUM_COUNTERS] this row's

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
  // more kept nodes than a row's candidate capacity holds (capacity 0: no limit)
  bool too_wide(size_t kept) const { return a_.capacity > 0 && i64(kept) > node_width(); }

  // Nodes of `level` to look at: the children of the kept parents, then the level's tail.
  Scratch<i64> frontier(i64 level, const Scratch<i64>& kept) const {
    Scratch<i64> nodes;
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

  // the rounding allowance of a bound whose terms weigh `magnitude` (core.summaries.margin_terms)
  float margin(float magnitude) const { return float(a_.scale * a_.margin_rel) * magnitude + float(a_.margin_abs); }
};

}  // namespace
}  // namespace hsr
