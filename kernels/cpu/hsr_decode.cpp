// HSR paged decode on the CPU: the cell-tree query and the attention over the tokens it reports,
// one (sequence, KV head) row per OpenMP task.
//
// The row's stages, each in its file with its own state: the walk (walk.h) reads boxes (box_bounds.h) and sets up
// the code bounds' terms (code_bounds.h) on its way down; the query (query.h) bounds the kept cells' tokens from
// their codes and keeps those the mode's rule needs (selection_rules.h), recording what it drops
// (certificate.h); the attention (attend.h) reads the kept tokens' keys and values (key_reads.h).
//
// Twin: vllm_hsr.core.query.TreeQuery (selection) and vllm_hsr.core.decode.decode_candidates
// (attention); every rule and bound below is theirs (docs/design.md §2), and the numeric constants
// (margins, slacks, histogram) come in through HsrArgs from the same Python definitions.
// Plain C ABI (loaded with ctypes): no torch headers, so it builds in seconds.

#include <algorithm>
#include <cmath>

#include "attend.h"
#include "box_bounds.h"
#include "certificate.h"
#include "code_bounds.h"
#include "decode_args.h"
#include "key_reads.h"
#include "query.h"
#include "row.h"
#include "scratch.h"
#include "selection_rules.h"
#include "walk.h"

namespace {

using namespace hsr;

// One (sequence, KV head) row: its inputs, then its stages, which share them (constructed in this order).
// (QueryTerms first: the inputs point into it)
class Row : private QueryTerms, public RowInputs {
 public:
  Row(const HsrArgs& a, const Affine& key_layout, const Affine& value_layout, i64 row)
      : QueryTerms(a, row), RowInputs(a, key_layout, value_layout, row, *this), boxes_(*this), codes_(*this, boxes_),
        rules_(*this), certificate_(*this), keys_(*this), walk_(*this, boxes_, codes_, rules_, certificate_, keys_),
        query_(*this, walk_, codes_, rules_, certificate_), attend_(*this, keys_, certificate_) {
    for (i64 c = 0; c < NUM_COUNTERS; ++c) counters_[c] = 0;
  }
  Row(const Row&) = delete;              // the inputs point into this row's terms, the stages at each other
  Row& operator=(const Row&) = delete;

  void run() {
    Scratch<i64> list;
    const bool dense = !query_.select(list);
    if (dense) certificate_.clear();
    const i64 count = dense ? n_ : i64(list.size());
    counters_[KEYS_READ] = count;
    counters_[OVERFLOW_ROWS] = dense;
    counters_[DENSE_KEYS] = n_;
    counters_[CELLS_READ] = dense ? (n_ + a_.cell_size - 1) / a_.cell_size : distinct_cells(list);
    if (a_.counts) a_.counts[row_] = count;
    if (a_.dense) a_.dense[row_] = dense;
    if (a_.tokens && !dense) std::copy(list.begin(), list.end(), a_.tokens + row_ * a_.token_capacity);
    if (a_.skipped)
      for (i64 g = 0; g < G_; ++g) a_.skipped[b_ * a_.num_q_heads + h_ * G_ + g] = float(certificate_.skipped(g));
    if (dense) {
      list.resize(n_);
      for (i64 t = 0; t < n_; ++t) list[t] = t;
    }
    attend_.attend(list);
  }

 private:
  BoxBounds boxes_;
  CodeBounds codes_;
  SelectionRules rules_;
  Certificate certificate_;
  KeyReads keys_;
  Walk walk_;
  Query query_;
  Attend attend_;

  i64 distinct_cells(const Scratch<i64>& list) const {
    i64 cells = 0, last = -1;
    for (i64 t : list) {
      if (t / a_.cell_size != last) ++cells;
      last = t / a_.cell_size;
    }
    return cells;
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
  for (i64 c = 0; c < NUM_COUNTERS; ++c) {
    args->totals[c] = 0;
    for (i64 row = 0; row < rows; ++row) args->totals[c] += args->counters[row * NUM_COUNTERS + c];
  }
  // what a step's statistics keep of the bounds: a layer call then needs no tensor of them on the host
  double largest = 0;
  for (i64 head = 0; head < args->batch * args->num_q_heads; ++head) {
    const double bound = args->error_bound[head];
    largest = std::isnan(bound) || std::isnan(largest) ? bound + largest : std::max(largest, bound);
  }
  *args->max_error_bound = largest;
}

}  // extern "C"
