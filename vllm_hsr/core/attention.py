"""Dense-interface HSR attention for one sequence: the reference every kernel is checked against.

`sparse_attention` walks the cell tree of each KV head top-down, selects by the
mode's rule (DESIGN.md §2), reads full keys and values only for the reported
tokens, and returns the certificate. `dense_attention` is the same math over
every key. The paged decode path (ops.hsr_decode) reuses `attend_kv_head` with
a paged token reader and a tree gathered from per-block summaries.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Protocol

import torch

from vllm_hsr.config import HSRConfig
from vllm_hsr.core.selection import greedy_skip, remaining_log_budget, topk_floor
from vllm_hsr.core.summaries import box_bounds, code_bounds
from vllm_hsr.core.tree import CellTree, DenseCellTree


CERTIFICATE_FLOOR = 2.0 ** -126   # the smallest normal fp32: GPUs may flush subnormals to zero


@dataclasses.dataclass
class HSRStats:
    """What one sparse call read. Counts are summed over KV heads."""

    keys_read: int = 0            # tokens whose full key and value were loaded
    cells_read: int = 0           # cells with at least one such token
    summary_nodes_read: int = 0   # box summaries evaluated (cells and above)
    code_cells_read: int = 0      # cells whose token codes were loaded
    bytes_read: int = 0           # keys + values + summaries + codes
    dense_bytes: int = 0          # keys + values of a dense read
    dense_keys: int = 0           # keys a dense read loads
    seed_keys_read: int = 0       # keys read (without values) to seed the softmax budget
    overflow_rows: int = 0        # (sequence, KV head) rows read densely: their candidate list overflowed
    error_bound: torch.Tensor | None = None  # [num_q_heads] ([batch, num_q_heads] from hsr_decode): relative
                                             # dropped mass, 0 in relu mode
    tokens_read: list[torch.Tensor] = dataclasses.field(default_factory=list)  # per KV head, sorted


    @property
    def bytes_read_fraction(self) -> float:
        return self.bytes_read / self.dense_bytes if self.dense_bytes else 0.0

    def set_bytes(self, summary_bytes: int, cfg: HSRConfig, head_dim: int, kv_itemsize: int,
                  dense_tokens: int) -> None:
        """Fill bytes_read / dense_bytes from the counters. summary_bytes: one box (lo and hi)."""
        code_bytes = cfg.cell_size * -(-head_dim * cfg.code_bits // 8)
        token_bytes = head_dim * kv_itemsize
        self.bytes_read = (self.keys_read * token_bytes + self.summary_nodes_read * summary_bytes
                           + self.code_cells_read * code_bytes + self.seed_keys_read * token_bytes // 2)
        self.dense_bytes = dense_tokens * token_bytes
        self.dense_keys = dense_tokens

    def add(self, other: HSRStats) -> None:
        for f in dataclasses.fields(self):
            if f.type == "int":
                setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        self.tokens_read += other.tokens_read


class TokenReader(Protocol):
    """Loads full keys and values of one KV head at sequence positions."""

    def __call__(self, kv_head: int, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens: [n] int64 -> keys, values: [n, head_dim]"""


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 2 or k.dim() != 3 or v.shape != k.shape:
        raise ValueError(
            "expected q [num_q_heads, head_dim] and k, v [num_tokens, num_kv_heads, head_dim]; "
            f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[0] == 0:
        raise ValueError("attention over an empty sequence (k and v have 0 tokens)")
    if q.shape[1] != k.shape[2]:
        raise ValueError(f"head_dim differs: q has {q.shape[1]}, k has {k.shape[2]}")
    if q.shape[0] % k.shape[1]:
        raise ValueError(f"num_q_heads={q.shape[0]} is not a multiple of num_kv_heads={k.shape[1]}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if not torch.isfinite(t).all():
            raise ValueError(f"{name} contains non-finite values (NaN or inf)")


def attend(scores: torch.Tensor, values: torch.Tensor,
           cfg: HSRConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weighted sum of values by the mode's weights.

    scores: [n, G] fp32 (n may be 0); values: [n, D]
    returns out [G, D] fp32, running max m [G], normaliser z [G] (sum of exp(x - m))
    """
    values = values.float()
    if cfg.mode == "relu":
        weights = torch.relu(scores - cfg.bias) ** cfg.alpha
        norm = weights.sum(0)
        out = (weights.T @ values) / torch.where(norm > 0, norm, torch.ones_like(norm)).unsqueeze(1)
        return out, torch.zeros_like(norm), norm
    if scores.shape[0] == 0:
        empty = torch.zeros(scores.shape[1], device=scores.device)
        return torch.zeros(scores.shape[1], values.shape[1], device=scores.device), empty - math.inf, empty
    m = scores.amax(0)
    p = torch.exp(scores - m)
    z = p.sum(0)
    return (p.T @ values) / z.unsqueeze(1), m, z


def _scores(q_group: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    return (keys.float() @ q_group.T) * scale                           # [n, G]


class HeadWalk:
    """Selection state of one (sequence, KV head): bounds, budget, skipped masses, counters."""

    def __init__(self, tree: CellTree, kv_head: int, q_group: torch.Tensor, scale: float,
                 cfg: HSRConfig, read: TokenReader):
        self.tree, self.kv_head, self.q, self.scale, self.cfg, self.read = (
            tree, kv_head, q_group, scale, cfg, read)
        self.stats = HSRStats()
        self.skipped_log_mass: list[torch.Tensor] = []   # [*, G] fp64, absolute ln(n) + ub

    def node_bounds(self, level: int, nodes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.stats.summary_nodes_read += nodes.numel()
        lo, hi = self.tree.boxes(level, nodes, self.kv_head)
        return box_bounds(self.q, lo, hi, self.scale)

    def frontier(self, level: int, kept_parents: torch.Tensor) -> torch.Tensor:
        """Nodes of `level` to look at: children of the kept parents, then the level's tail."""
        tree = self.tree
        kids = tree.children(level + 1, kept_parents) if level + 1 < tree.num_levels else kept_parents
        return torch.cat([kids, tree.tail(level)])

    def token_bounds(self, cells: torch.Tensor, cell_ub: torch.Tensor,
                     cell_lb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Tightest bounds of every valid token of `cells`: codes where present, else the cell box.

        cell_ub, cell_lb: [c, G]; returns tokens [t], ub [t, G], lb [t, G]
        """
        tree, size = self.tree, self.tree.cell_size
        tokens = cells.unsqueeze(1) * size + torch.arange(size, device=cells.device)   # [c, T]
        ub = cell_ub.unsqueeze(1).expand(-1, size, -1).clone()                        # [c, T, G]
        lb = cell_lb.unsqueeze(1).expand(-1, size, -1).clone()
        coded = cells < tree.num_coded_cells()
        if coded.any():
            self.stats.code_cells_read += int(coded.sum())
            lo, hi = tree.boxes(0, cells[coded], self.kv_head)
            code_ub, code_lb = code_bounds(self.q, lo, hi, tree.codes(cells[coded], self.kv_head),
                                           tree.code_bits, self.scale)
            ub[coded] = torch.minimum(code_ub, ub[coded])
            lb[coded] = torch.maximum(code_lb, lb[coded])
        valid = tokens < tree.num_tokens
        return tokens[valid], ub[valid], lb[valid]

    def skip(self, keep: torch.Tensor, ub: torch.Tensor, counts: torch.Tensor) -> None:
        """Record the nodes not kept for the certificate."""
        dropped = ~keep
        if dropped.any():
            self.skipped_log_mass.append(
                counts[dropped].double().log().unsqueeze(1) + ub[dropped].double())

    def seed_cells(self) -> torch.Tensor:
        """Cells with the highest upper bound (max over the group), by a beam down the tree."""
        beam = torch.empty(0, dtype=torch.long)
        for level in range(self.tree.num_levels - 1, -1, -1):
            nodes = self.frontier(level, beam)
            ub = self.node_bounds(level, nodes)[0].amax(1)
            beam = nodes[ub.topk(min(self.cfg.seed_cells, nodes.numel())).indices]
        return beam

    def seeds(self) -> torch.Tensor:
        """Tokens read before selecting: sink, window and (softmax) the seed cells."""
        n, cfg = self.tree.num_tokens, self.cfg
        parts = [torch.arange(min(cfg.sink_tokens, n)), torch.arange(max(0, n - cfg.window_tokens), n)]
        if cfg.mode == "softmax" and cfg.seed_cells:
            cells = self.seed_cells()
            tokens = (cells.unsqueeze(1) * self.tree.cell_size + torch.arange(self.tree.cell_size)).flatten()
            parts.append(tokens[tokens < n])
        return torch.cat(parts).unique()

    def select(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Walk the tree; returns the tokens to read (sorted) and the skipped mass.

        skipped: [G] fp64, ln of the sum over skipped nodes of n * exp(ub) (-inf if none)
        """
        cfg, tree = self.cfg, self.tree
        seeded = self.seeds() if cfg.mode != "relu" else torch.empty(0, dtype=torch.long)
        is_seed = torch.zeros(tree.num_tokens, dtype=torch.long)
        is_seed[seeded] = 1
        seeds_before = torch.cat([is_seed.new_zeros(1), is_seed.cumsum(0)])   # [N + 1]

        log_budget = torch.full((self.q.shape[0],), -math.inf, dtype=torch.float64)
        if cfg.mode == "softmax" and seeded.numel() and cfg.eps > 0:
            seed_k, _ = self.read(self.kv_head, seeded)
            self.stats.seed_keys_read += seeded.numel()
            seed_scores = _scores(self.q, seed_k, self.scale).double()
            log_budget = math.log(cfg.eps) + torch.logsumexp(seed_scores, dim=0)
        spent = torch.zeros_like(log_budget)
        share = cfg.tree_budget_share / tree.num_levels
        level_share = math.log(share) if share else -math.inf

        kept = torch.empty(0, dtype=torch.long)
        for level in range(tree.num_levels - 1, -1, -1):
            nodes = self.frontier(level, kept)
            start, end = tree.node_token_ranges(level, nodes)
            counts = (end - start) - (seeds_before[end] - seeds_before[start])
            nodes, counts = nodes[counts > 0], counts[counts > 0]
            ub, lb = self.node_bounds(level, nodes)
            if cfg.mode == "relu":
                keep = (ub > cfg.bias).any(1)
            elif cfg.mode == "softmax":
                log_mass = counts.double().log().unsqueeze(1) + ub.double()
                skip, level_spent = greedy_skip(log_mass, log_budget + level_share)
                spent += level_spent * share
                keep = ~skip
            else:
                keep = ub.amax(1) >= topk_floor(lb.amax(1), counts, cfg.budget_tokens)
            self.skip(keep, ub, counts)
            kept = nodes[keep]
        tokens, ub, lb = self.token_bounds(kept, ub[keep], lb[keep])

        unseeded = is_seed[tokens] == 0
        tokens, ub, lb = tokens[unseeded], ub[unseeded], lb[unseeded]
        if cfg.mode == "relu":
            keep = (ub > cfg.bias).any(1)
        elif cfg.mode == "softmax":
            keep = ~greedy_skip(ub.double(), remaining_log_budget(log_budget, spent),
                                log_gain=kept_gain(lb, cfg.eps))[0]
        else:
            keep = torch.zeros_like(tokens, dtype=torch.bool)
            keep[ub.amax(1).topk(min(cfg.budget_tokens, tokens.numel())).indices] = True
        self.skip(keep, ub, torch.ones_like(tokens))
        read = torch.cat([seeded, tokens[keep]]).sort().values
        self.stats.tokens_read.append(read)
        self.stats.keys_read += read.numel()
        self.stats.cells_read += (read // tree.cell_size).unique().numel()
        if cfg.mode == "relu" or not self.skipped_log_mass:
            return read, log_budget.new_full(log_budget.shape, -math.inf)
        return read, torch.logsumexp(torch.cat(self.skipped_log_mass), dim=0)


def kept_gain(lb: torch.Tensor, eps: float) -> torch.Tensor | None:
    """ln of what reading a token adds to the softmax budget: eps * exp(its lower bound) (None if eps = 0)."""
    return lb.double() + math.log(eps) if eps > 0 else None


def certificate(skipped: torch.Tensor, m: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """error_bound = sum over skipped nodes of n * exp(ub - m) / z (0 where nothing was skipped).

    skipped: [...] fp64 ln of the skipped mass bound; m, z: the kept scores' max and normaliser
    """
    bound = torch.exp(skipped - m.double() - z.double().log()) * (1 + 1e-5)
    return round_up_certificate(bound.float(), skipped)


def round_up_certificate(bound: torch.Tensor, skipped: torch.Tensor) -> torch.Tensor:
    """0 where nothing was skipped; elsewhere at least FLT_MIN, so fp32 underflow never
    turns a positive dropped mass into a certificate of 0."""
    floor = torch.full_like(bound, CERTIFICATE_FLOOR)
    return torch.where(torch.isneginf(skipped), torch.zeros_like(bound), torch.maximum(bound, floor))


def attend_kv_head(tree: CellTree, kv_head: int, q_group: torch.Tensor, scale: float, cfg: HSRConfig,
                   read: TokenReader) -> tuple[torch.Tensor, torch.Tensor, HSRStats]:
    """HSR attention of the query heads of one KV head.

    q_group: [G, D] fp32 -> out [G, D] fp32, error_bound [G], stats
    """
    walk = HeadWalk(tree, kv_head, q_group, scale, cfg, read)
    tokens, skipped = walk.select()
    keys, values = read(kv_head, tokens)
    out, m, z = attend(_scores(q_group, keys, scale), values, cfg)
    bound = torch.zeros_like(m) if cfg.mode == "relu" else certificate(skipped, m, z)
    return out, bound, walk.stats


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     cfg: HSRConfig) -> tuple[torch.Tensor, HSRStats]:
    """HSR attention of one decode query over one sequence.

    q: [num_q_heads, head_dim]; k, v: [num_tokens, num_kv_heads, head_dim]
    returns out [num_q_heads, head_dim] in q's dtype, and HSRStats
    """
    check_inputs(q, k, v)
    num_tokens, num_kv_heads, head_dim = k.shape
    group = q.shape[0] // num_kv_heads
    scale = cfg.resolved_scale(head_dim)
    tree = DenseCellTree(k, cfg)

    def read(kv_head: int, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return k[tokens, kv_head], v[tokens, kv_head]

    q32 = q.float().view(num_kv_heads, group, head_dim)
    outs, bounds, stats = [], [], HSRStats()
    for kv_head in range(num_kv_heads):
        out, bound, head_stats = attend_kv_head(tree, kv_head, q32[kv_head], scale, cfg, read)
        outs.append(out)
        bounds.append(bound)
        stats.add(head_stats)
    summary_bytes = 2 * head_dim * tree.levels[0][0].element_size()
    stats.set_bytes(summary_bytes, cfg, head_dim, k.element_size() + v.element_size(), num_tokens * num_kv_heads)
    stats.error_bound = torch.cat(bounds)
    return torch.cat(outs).to(q.dtype), stats


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: HSRConfig) -> torch.Tensor:
    """Dense ReLU^alpha (relu mode) or softmax attention (other modes) over every key.

    q: [num_q_heads, head_dim]; k, v: [num_tokens, num_kv_heads, head_dim] -> [num_q_heads, head_dim]
    """
    check_inputs(q, k, v)
    num_kv_heads, head_dim = k.shape[1], k.shape[2]
    scale = cfg.resolved_scale(head_dim)
    q32 = q.float().view(num_kv_heads, -1, head_dim)
    outs = [attend(_scores(q32[h], k[:, h], scale), v[:, h], cfg)[0] for h in range(num_kv_heads)]
    return torch.cat(outs).to(q.dtype)
