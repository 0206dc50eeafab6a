"""Selection rules: the certified greedy skip (a histogram of bounds) and the top-k cut."""

from __future__ import annotations

import math

import torch

HIST_BINS = 512
HIST_RANGE = 32.0        # nats below the budget covered by the bins; lower masses share bin 0
BUDGET_SLACK = 1e-4      # fill at most (1 - slack) of a budget, so rounding never overshoots eps


def greedy_skip(log_mass: torch.Tensor, log_budget: torch.Tensor, valid: torch.Tensor | None = None,
                log_gain: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Skip the largest set of lowest-mass nodes whose summed mass fits every head's budget.

    Nodes are ordered by a histogram of their log-mass (no sort), so a skipped set
    is always a prefix of whole bins; a node is skipped only if every query head
    of its KV group may skip it, which keeps each head within its own budget.
    With `log_gain` the budget also grows by each kept node's gain (eps times a lower
    bound of its share of Z, for the finest level only): bins are skipped while
    skipped(<= b) <= budget + gain(> b), whose left side grows and right side shrinks
    with b. A head's kept set contains its nodes above its last skipped bin, so
    every gain it counts is really kept.
    log_mass: [..., P, G] fp64, ln(tokens) + upper bound; log_budget: [..., G] fp64;
    valid: [..., P] bool (padding: never skipped, never counted) or None;
    log_gain: [..., P, G] fp64 or None
    returns skip: [..., P] bool, spent: [..., G] fp64 (skipped mass / budget; with gains: / (budget + all gains))
    """
    ref = log_budget                                                     # [..., G]: masses are relative to it
    if log_gain is not None:
        if valid is not None:
            log_gain = torch.where(valid.unsqueeze(-1), log_gain, torch.full_like(log_gain, -math.inf))
        ref = torch.logaddexp(log_budget, torch.logsumexp(log_gain, dim=-2))
    rel = log_mass - ref.unsqueeze(-2)
    if valid is not None:
        rel = torch.where(valid.unsqueeze(-1), rel, torch.full_like(rel, -torch.inf))
    fits = rel <= 0  # False for a -inf budget (eps = 0), so nothing is skipped
    # a NaN mass (a non-finite key in the node) goes to bin 0 and, not fitting, is never skipped
    bins = ((rel + HIST_RANGE) * (HIST_BINS / HIST_RANGE)).floor().nan_to_num(nan=0.0).clamp(0, HIST_BINS - 1).long()
    mass = torch.where(fits, rel.exp(), torch.zeros_like(rel))
    hist = torch.zeros(*rel.shape[:-2], rel.shape[-1], HIST_BINS, dtype=rel.dtype, device=rel.device)
    hist.scatter_add_(-1, bins.mT, mass.mT)                              # [..., G, BINS]
    allowance = torch.full_like(hist, 1.0)
    if log_gain is not None:
        finite = torch.isfinite(ref)
        base = torch.where(finite, torch.exp(log_budget - ref), torch.zeros_like(ref))
        gain = torch.where(finite.unsqueeze(-2), torch.exp(log_gain - ref.unsqueeze(-2)), torch.zeros_like(rel))
        gain_hist = torch.zeros_like(hist).scatter_add_(-1, bins.mT, gain.mT)
        allowance = (base + gain_hist.sum(-1)).unsqueeze(-1) - gain_hist.cumsum(-1)
    allowed_bins = (hist.cumsum(-1) <= (1.0 - BUDGET_SLACK) * allowance).sum(-1)      # [..., G]
    skip = (fits & (bins < allowed_bins.unsqueeze(-2))).all(-1)
    if valid is not None:
        skip &= valid
    spent = torch.where(skip.unsqueeze(-1), mass, torch.zeros_like(mass)).sum(-2)
    return skip, spent


def kept_gain(lb: torch.Tensor, eps: float) -> torch.Tensor | None:
    """ln of what reading a token adds to the softmax budget: eps * exp(its lower bound) (None if eps = 0)."""
    return lb.double() + math.log(eps) if eps > 0 else None


def remaining_log_budget(log_budget: torch.Tensor, spent: torch.Tensor) -> torch.Tensor:
    """ln of what is left of a budget after spending the fraction `spent` of it."""
    return log_budget + torch.log1p(-spent.clamp(max=1.0))


def topk_floor(lower: torch.Tensor, counts: torch.Tensor, budget: int) -> torch.Tensor:
    """A score that at least `budget` tokens are known to reach (-inf if fewer exist).

    A node whose upper bound is below it cannot hold one of the `budget` best tokens.
    lower: [..., P] lower bound per node; counts: [..., P] tokens per node (0 for padding)
    returns [...]
    """
    if lower.shape[-1] == 0:
        return lower.new_full(lower.shape[:-1], -math.inf)
    lower, order = lower.sort(dim=-1, descending=True)
    reached = counts.gather(-1, order).cumsum(-1)
    index = torch.searchsorted(reached, torch.full_like(reached[..., :1], budget))       # [..., 1]
    floor = lower.gather(-1, index.clamp(max=lower.shape[-1] - 1)).squeeze(-1)
    return torch.where(reached[..., -1] >= budget, floor, torch.full_like(floor, -math.inf))
