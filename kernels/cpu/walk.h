// The query's descent: the softmax seeds and their budget, then the tree's levels top-down to the kept cells
// (TreeQuery's walk).
#pragma once

#include <algorithm>
#include <cmath>

#include "box_bounds.h"
#include "certificate.h"
#include "code_bounds.h"
#include "key_reads.h"
#include "row.h"
#include "scratch.h"
#include "selection_rules.h"

namespace hsr {
namespace {   // (hsr_decode.cpp includes the stages; nothing here is seen by another file)

class Walk : public RowInputs {
 public:
  Walk(const RowInputs& row, BoxBounds& boxes, CodeBounds& codes, SelectionRules& rules, Certificate& certificate,
       KeyReads& keys)
      : RowInputs(row), boxes_(boxes), codes_(codes), rules_(rules), certificate_(certificate), keys_(keys) {}

  // The seeds (read exactly, before the walk), and the softmax budget they give: ln(eps * their mass) per head
  Scratch<double> seed() {
    make_seeds();
    return log_budget();
  }
  const Scratch<i64>& seeds() const { return seeds_; }      // ascending
  bool overflow() const { return overflow_; }   // a level kept more nodes than the row's capacity: read it whole

  // The levels top-down; leaves the kept cells and their bounds, returns the token level's budget.
  Scratch<double> descend(const Scratch<double>& log_budget, Scratch<i64>& kept, Bounds& kept_bounds) {
    Scratch<double> spent(G_, 0.0), level_spent;
    const double share = a_.tree_budget_share / double(a_.tree_levels + 1);
    Scratch<double> level_budget(log_budget);
    for (i64 g = 0; g < G_; ++g) level_budget[g] += share > 0 ? std::log(share) : NEG_INF;
    kept.clear();
    Bounds b;
    for (i64 level = top_level(); level >= 0; --level) {
      const Scratch<i64> frontier_nodes = frontier(level, kept);
      const i64 s = span(level);
      Scratch<i64> nodes, counts;
      nodes.reserve(frontier_nodes.size());
      counts.reserve(frontier_nodes.size());
      // the frontier ascends and its spans are disjoint: one pass over the seeds counts those in each span
      auto seed = seeds_.begin();
      for (i64 node : frontier_nodes) {
        const i64 start = node * s, end = std::min((node + 1) * s, n_);
        while (seed != seeds_.end() && *seed < start) ++seed;
        const auto first_seed = seed;
        while (seed != seeds_.end() && *seed < end) ++seed;
        const i64 count = end - start - i64(seed - first_seed);
        if (count > 0) { nodes.push_back(node); counts.push_back(count); }
      }
      const i64 P = i64(nodes.size());
      b.resize(P, G_);
#if HSR_AVX512
      if (level == 0 && codes_.stashed()) codes_.cell_pass(nodes, b);
      else
#endif
      for (i64 i = 0, block, slot; i < P; ++i) {
        if (i + PREFETCH_CELLS < P) prefetch_box(level, nodes[i + PREFETCH_CELLS], block, slot);
        boxes_.box_bounds(level, nodes[i], b, i);
      }
      counters_[SUMMARY_NODES_READ] += P;
      Scratch<uint8_t> keep(P, 1);
      if (a_.mode == RELU) {
        rules_.keep_above_bias(b.ub, keep);
      } else if (a_.mode == SOFTMAX) {
        Scratch<double> log_mass(P * G_);
        for (i64 g = 0; g < G_; ++g)
          for (i64 i = 0; i < P; ++i) log_mass[g * P + i] = std::log(double(counts[i])) + double(b.ub[g * P + i]);
        Scratch<uint8_t> skip = rules_.greedy_skip<double>(Terms<double>{log_mass.data(), 0.0}, level_budget,
                                                               keep, nullptr, &level_spent);
        for (i64 g = 0; g < G_; ++g) spent[g] += level_spent[g] * share;
        for (i64 i = 0; i < P; ++i) keep[i] = !skip[i];
      } else {
        Scratch<float> lower, upper;
        rules_.group_max(b.lb, lower);
        rules_.group_max(b.ub, upper);
        const float floor = SelectionRules::kth_largest(lower, counts, a_.budget_tokens);
        for (i64 i = 0; i < P; ++i) keep[i] = upper[i] >= floor;
      }
      Scratch<uint8_t> dropped(P);
      for (i64 i = 0; i < P; ++i) dropped[i] = !keep[i];
      certificate_.record(dropped, &counts, b.ub);
      Scratch<i64> index;
      for (i64 i = 0; i < P; ++i) if (keep[i]) index.push_back(i);
      kept.clear();
      for (i64 i : index) kept.push_back(nodes[i]);
#if HSR_AVX512
      if (level == 0) codes_.keep_stash(index);
#endif
      kept_bounds.resize(i64(index.size()), G_);
      for (i64 g = 0; g < G_; ++g)
        for (size_t j = 0; j < index.size(); ++j) {
          kept_bounds.ub[g * kept_bounds.n + j] = b.ub[g * P + index[j]];
          kept_bounds.lb[g * kept_bounds.n + j] = b.lb[g * P + index[j]];
        }
      if (over_width(kept.size())) break;
    }
    Scratch<double> remaining(log_budget);
    for (i64 g = 0; g < G_; ++g) remaining[g] += std::log1p(-std::min(spent[g], 1.0));
    return remaining;
  }

 private:
  BoxBounds& boxes_;
  CodeBounds& codes_;
  SelectionRules& rules_;
  Certificate& certificate_;
  KeyReads& keys_;
  Scratch<i64> seeds_;
  bool overflow_ = false;

  bool over_width(size_t kept) {
    overflow_ = overflow_ || too_wide(kept);
    return overflow_;
  }

  Scratch<i64> seed_cells() {
    Scratch<i64> beam;
    Bounds b;
    Scratch<float> best_ub;
    for (i64 level = top_level(); level >= 0; --level) {
      Scratch<i64> nodes = frontier(level, beam);
      b.resize(i64(nodes.size()), G_);
      for (i64 i = 0, block, slot; i < i64(nodes.size()); ++i) {
        if (i + PREFETCH_CELLS < i64(nodes.size())) prefetch_box(level, nodes[i + PREFETCH_CELLS], block, slot);
        boxes_.box_bounds(level, nodes[i], b, i);
      }
      counters_[SUMMARY_NODES_READ] += i64(nodes.size());
      rules_.group_max(b.ub, best_ub);
      Scratch<std::pair<float, i64>> best(nodes.size());
      for (size_t i = 0; i < nodes.size(); ++i) best[i] = {best_ub[i], nodes[i]};
      const size_t k = std::min<size_t>(a_.seed_cells, nodes.size());
      std::partial_sort(best.begin(), best.begin() + k, best.end(),
                        [](const auto& x, const auto& y) { return x.first > y.first; });
      beam.clear();
      for (size_t i = 0; i < k; ++i) beam.push_back(best[i].second);
      std::sort(beam.begin(), beam.end());
    }
    return beam;
  }

  void make_seeds() {
    const i64 cs = a_.cell_size;
    for (i64 t = n_ / cs * cs; t < n_; ++t) seeds_.push_back(t);             // the partial cell
    if (a_.mode != RELU) {
      for (i64 t = 0; t < std::min(a_.sink_tokens, n_); ++t) seeds_.push_back(t);
      for (i64 t = std::max<i64>(n_ - a_.window_tokens, 0); t < n_; ++t) seeds_.push_back(t);
    }
    if (a_.mode == SOFTMAX && a_.seed_cells > 0)
      for (i64 cell : seed_cells())
        for (i64 t = cell * cs; t < std::min((cell + 1) * cs, n_); ++t) seeds_.push_back(t);
    std::sort(seeds_.begin(), seeds_.end());
    seeds_.erase(std::unique(seeds_.begin(), seeds_.end()), seeds_.end());
  }

  // ln(eps * sum over seeded keys of exp(score)) per head (-inf: skip nothing)
  Scratch<double> log_budget() {
    Scratch<double> budget(G_, NEG_INF);
    if (a_.mode != SOFTMAX || a_.eps == 0 || seeds_.empty()) return budget;
    counters_[SEED_KEYS_READ] += i64(seeds_.size());
    const i64 n = i64(seeds_.size());
    Scratch<float> scores(n * G_), head(n);
    keys_.scores_of(seeds_.data(), n, scores.data());
    const Scratch<uint8_t> every(n, 1);
    for (i64 g = 0; g < G_; ++g) {
      for (i64 i = 0; i < n; ++i) head[i] = scores[i * G_ + g];
      budget[g] = SelectionRules::log_sum_exp(Terms<float>{head.data()}, every) + std::log(a_.eps);
    }
    return budget;
  }
};

}  // namespace
}  // namespace hsr
