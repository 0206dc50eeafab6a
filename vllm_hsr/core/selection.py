"""Selection rules: the certified greedy skip (a histogram of bounds) and the top-k cut."""

from __future__ import annotations

import math

import torch

HIST_BINS = 512
HIST_RANGE = 32.0        # nats below the budget covered by the bins; lower masses share bin 0
BUDGET_SLACK = 1e-4      # fill at most (1 - slack) of a budget, so rounding never overshoots eps


def greedy_skip(log_mass: torch.Tensor, log_budget: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Skip the largest set of lowest-mass nodes whose summed mass fits every head's budget.

    Nodes are ordered by a histogram of their log-mass (no sort), so a skipped set
    is always a prefix of whole bins; a node is skipped only if every query head
    of its KV group may skip it, which keeps each head within its own budget.
    log_mass: [P, G] fp64, ln(tokens) + upper bound; log_budget: [G] fp64
    returns skip: [P] bool, spent: [G] fp64 (skipped mass / budget)
    """
    rel = log_mass - log_budget
    fits = rel <= 0  # False for a -inf budget (eps = 0), so nothing is skipped
    bins = ((rel + HIST_RANGE) * (HIST_BINS / HIST_RANGE)).floor().clamp(0, HIST_BINS - 1).long()
    mass = torch.where(fits, rel.exp(), torch.zeros_like(rel))
    hist = torch.zeros(rel.shape[1], HIST_BINS, dtype=rel.dtype, device=rel.device)
    hist.scatter_add_(1, bins.T, mass.T)
    allowed_bins = (hist.cumsum(1) <= 1.0 - BUDGET_SLACK).sum(1)        # [G]
    skip = (fits & (bins < allowed_bins)).all(1)
    spent = torch.where(skip.unsqueeze(1), mass, torch.zeros_like(mass)).sum(0)
    return skip, spent


def remaining_log_budget(log_budget: torch.Tensor, spent: torch.Tensor) -> torch.Tensor:
    """ln of what is left of a budget after spending the fraction `spent` of it."""
    return log_budget + torch.log1p(-spent.clamp(max=1.0))


def topk_floor(lower: torch.Tensor, counts: torch.Tensor, budget: int) -> float:
    """A score that at least `budget` tokens are known to reach (-inf if fewer exist).

    A node whose upper bound is below it cannot hold one of the `budget` best tokens.
    lower: [P] lower bound per node; counts: [P] tokens per node
    """
    if int(counts.sum()) < budget:
        return -math.inf
    order = lower.argsort(descending=True)
    reached = torch.searchsorted(counts[order].cumsum(0), budget)
    return float(lower[order[reached]])
