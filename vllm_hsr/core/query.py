"""The cell-tree query of a decode batch: every (sequence, KV head) row walked at once.

Seeds first (sink, window, a beam of the highest-bound cells), then the levels
top-down, each keeping the children of the kept parents plus the level's tail, then
the tokens of the kept cells by their code bounds. Every step works on padded
[rows, width] node lists with a validity mask and runs on the tensors' device without
a host sync off the CPU (and on it when `capacity` is given); the only places that touch summary memory are
`RowBounds.box` and `RowBounds.code`, whose Triton twins are kernels/tree_query.py.

Fixed capacity: with `capacity` tokens per row, every node list is cut to a fixed
width; a row whose list would not fit is flagged `dense` (read it whole, nothing
skipped) instead of being written past its end. capacity=None cuts each list to the
batch's widest row on the CPU (one host read per level, free there) and keeps its full
width elsewhere (static_widths).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from vllm_hsr.config import HSRConfig
from vllm_hsr.core.attention import HSRStats
from vllm_hsr.core.paged import PagedKVLayout, PagedSummaries
from vllm_hsr.core.selection import greedy_skip, kept_gain, remaining_log_budget, topk_floor
from vllm_hsr.core.summaries import box_bounds, code_bounds, code_planes

CODE_CHUNK_CELLS = 1024   # cells per code-bound chunk on the torch path: bounds the [R, c, T, ...] temporaries


@dataclasses.dataclass
class Candidates:
    """What the query hands the decode: per row (sequence, KV head) the tokens to read."""

    tokens: torch.Tensor    # [B, Hkv, cap] int64 sequence positions, ascending; first counts valid
    counts: torch.Tensor    # [B, Hkv] int32
    dense: torch.Tensor     # [B, Hkv] bool: a list overflowed, so read all seq_len tokens
    skipped: torch.Tensor   # [B, Hq] fp32 ln of the skipped mass bound (-inf: nothing skipped)
    counters: dict[str, torch.Tensor]   # HSRStats counters, on the device until stats() reads them

    def stats(self, host: bool = True) -> HSRStats:
        """The counters as HSRStats: host ints (a sync: the query itself has none with a fixed
        capacity), or with host=False the 0-dim device tensors themselves."""
        return HSRStats(**{name: int(value) if host else value for name, value in self.counters.items()})

    def token_lists(self, seq_lens: torch.Tensor) -> list[torch.Tensor]:
        """The tokens each (sequence, KV head) reads, in row order (a host sync)."""
        lens = seq_lens.long().unsqueeze(1).expand_as(self.counts).flatten().tolist()
        return [torch.arange(n) if dense else tokens[:count].cpu()
                for tokens, count, dense, n in zip(self.tokens.flatten(0, 1), self.counts.flatten().tolist(),
                                                   self.dense.flatten().tolist(), lens)]


@dataclasses.dataclass
class TreeRows:
    """The rows of a decode batch and what their bounds need."""

    q: torch.Tensor           # [R, G, D] fp32
    tables: torch.Tensor      # [R, max_blocks] block-table row of each row's sequence
    kv_heads: torch.Tensor    # [R] int64
    num_tokens: torch.Tensor  # [R] int64
    summaries: PagedSummaries
    scale: float

    @classmethod
    def from_batch(cls, q: torch.Tensor, summaries: PagedSummaries, block_table: torch.Tensor,
                   seq_lens: torch.Tensor, scale: float) -> TreeRows:
        batch, num_q_heads, head_dim = q.shape
        num_kv_heads = summaries.boxes.shape[3]
        device = q.device
        seq = torch.arange(batch, device=device).repeat_interleave(num_kv_heads)
        return cls(q.float().reshape(batch * num_kv_heads, num_q_heads // num_kv_heads, head_dim),
                   block_table.long()[seq], torch.arange(num_kv_heads, device=device).repeat(batch),
                   seq_lens.to(device).long()[seq], summaries, scale)

    @property
    def max_tokens(self) -> int:
        """Tokens a block-table row can address: the static bound of every list width."""
        return self.tables.shape[1] * self.summaries.block_size


def cell_tokens(cells: torch.Tensor, cell_size: int) -> torch.Tensor:
    """The sequence positions of cells: [..., C] -> [..., C, cell_size]"""
    return cells.unsqueeze(-1) * cell_size + torch.arange(cell_size, device=cells.device)


class RowBounds:
    """Upper and lower score bounds of tree nodes from the paged summaries (the torch twin
    of kernels/tree_query.py). Padding entries must hold a node id that exists (e.g. 0)."""

    def __init__(self, rows: TreeRows):
        self.rows = rows

    def box(self, level: int, nodes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """nodes: [R, F] of `level` -> ub, lb: [R, F, G] fp32"""
        rows, summaries = self.rows, self.rows.summaries
        blocks, slots = summaries.locate(level, nodes, rows.tables.unsqueeze(1).expand(-1, nodes.shape[1], -1))
        lo, hi = summaries.box_corners(blocks, slots, rows.kv_heads.unsqueeze(1))            # [R, F, D]
        return box_bounds(rows.q, lo, hi, rows.scale)

    def code(self, cells: torch.Tensor, planes: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Token bounds from the first `planes` code planes (None: all) of complete cells.
        cells: [R, C] -> ub, lb: [R, C, T, G] fp32"""
        rows, summaries = self.rows, self.rows.summaries
        blocks, slots = summaries.locate(0, cells, rows.tables.unsqueeze(1).expand(-1, cells.shape[1], -1))
        kv_heads = rows.kv_heads.unsqueeze(1)
        packed = summaries.cell_codes(blocks, slots, kv_heads, planes)                       # [R, C, T, bytes]
        lo, hi = summaries.box_corners(blocks, slots, kv_heads)                              # [R, C, D]
        return code_bounds(rows.q, lo, hi, packed, summaries.cfg.code_bits, rows.scale, planes)


def static_widths(device: torch.device) -> bool:
    """Whether lists keep their full width F on `device`: on an accelerator, reading the widest
    row's count back would wait for the device in every layer; on the CPU it is free and keeps
    the tensors small. Either way the extra columns are invalid entries, never read."""
    return device.type != "cpu"


def _compact(keep: torch.Tensor, width: int | None, *columns: torch.Tensor):
    """Move each row's kept entries to the front, in order, and cut to `width` (None: the
    widest row's count, or F where static_widths). columns: [R, F, ...] -> ([R, width, ...] ...,
    valid [R, width], overflow [R])"""
    kept = keep.sum(1)
    if width is None:
        width = keep.shape[1] if static_widths(keep.device) or not keep.numel() else int(kept.max())
    width = min(width, keep.shape[1])
    order = torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices[:, :width]
    out = [c.gather(1, order.view(*order.shape, *([1] * (c.dim() - 2))).expand(-1, -1, *c.shape[2:]))
           for c in columns]
    return (*out, keep.gather(1, order), kept > width)


def _update_rows(bounds: torch.Tensor, index: torch.Tensor, valid: torch.Tensor, new: torch.Tensor,
                 tighter) -> torch.Tensor:
    """bounds [R, P, ...] with entries index[r, i] (where valid) replaced by tighter(old, new[r, i])."""
    spot = torch.where(valid, index, torch.full_like(index, bounds.shape[1]))               # padding: a spare column
    spot = spot.view(*spot.shape, *([1] * (new.dim() - 2))).expand_as(new)
    padded = torch.cat([bounds, bounds[:, :1]], 1)
    return padded.scatter(1, spot, tighter(padded.gather(1, spot), new))[:, :-1]


class TreeQuery:
    """One decode batch's query: seeds, level walk, token selection (docs/design.md §2, modes)."""

    def __init__(self, rows: TreeRows, cfg: HSRConfig, bounds: RowBounds, flat_cache: torch.Tensor,
                 layout: PagedKVLayout, capacity: int | None = None):
        self.rows, self.cfg, self.bounds = rows, cfg, bounds
        self.flat_cache, self.layout, self.capacity = flat_cache, layout, capacity
        self.device = rows.q.device
        num_rows = rows.q.shape[0]
        self.overflow = torch.zeros(num_rows, dtype=torch.bool, device=self.device)
        self.skipped = torch.full((num_rows, rows.q.shape[1]), -math.inf, dtype=torch.float64, device=self.device)
        self.counters = {name: torch.zeros((), dtype=torch.long, device=self.device)
                         for name in ("summary_nodes_read", "code_cells_read", "refined_cells", "seed_keys_read")}

    # -- tree shape ---------------------------------------------------------------------------
    def span(self, level: int) -> int:
        return self.cfg.cell_size * self.cfg.fanout ** level

    def num_nodes(self, level: int) -> torch.Tensor:
        """Complete nodes of `level` per row: only they have summaries (the partial cell is a seed)."""
        return self.rows.num_tokens // self.span(level)

    @property
    def top_level(self) -> int:
        """The highest level a row can have a complete node on (static: from the table width); the
        walks start there, since the levels above hold no node and keep nothing."""
        return max([0] + [level for level in range(1, self.cfg.tree_levels + 1)
                          if self.span(level) <= self.rows.max_tokens])

    def node_width(self) -> int | None:
        return None if self.capacity is None else max(1, self.capacity // self.cfg.cell_size)

    def frontier(self, level: int, kept: torch.Tensor, kept_valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Nodes of `level` to look at: children of the kept parents, then the level's tail. -> [R, F] x2"""
        top = self.cfg.tree_levels
        fanout = self.cfg.fanout
        if level == top:
            first = torch.zeros_like(self.rows.num_tokens)
            width = -(-self.rows.max_tokens // self.span(level))
        else:
            first = self.num_nodes(level + 1) * fanout
            width = fanout
        tail = first.unsqueeze(1) + torch.arange(width, device=self.device)                   # [R, width]
        tail_valid = tail < self.num_nodes(level).unsqueeze(1)
        kids = (kept.unsqueeze(2) * fanout + torch.arange(fanout, device=self.device)).flatten(1)
        kids_valid = kept_valid.unsqueeze(2).expand(-1, -1, fanout).flatten(1)
        nodes = torch.cat([kids, tail], 1)
        valid = torch.cat([kids_valid, tail_valid], 1)
        return torch.where(valid, nodes, torch.zeros_like(nodes)), valid

    def box_bounds(self, level: int, nodes: torch.Tensor, valid: torch.Tensor):
        self.counters["summary_nodes_read"] += valid.sum()
        return self.bounds.box(level, nodes)

    # -- seeds --------------------------------------------------------------------------------
    def seed_cells(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Cells with the highest upper bound (max over the group), by a beam down the tree."""
        beam = torch.zeros(self.rows.q.shape[0], 0, dtype=torch.long, device=self.device)
        beam_valid = torch.zeros_like(beam, dtype=torch.bool)
        for level in range(self.top_level, -1, -1):
            nodes, valid = self.frontier(level, beam, beam_valid)
            ub = self.box_bounds(level, nodes, valid)[0].amax(-1)
            ub = torch.where(valid, ub, torch.full_like(ub, -math.inf))
            best = ub.topk(min(self.cfg.seed_cells, nodes.shape[1]), dim=1).indices
            beam, beam_valid = nodes.gather(1, best), valid.gather(1, best)
        return beam, beam_valid

    def seeds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens read before selecting: the partial last cell (it has no summary), and outside relu
        mode the sink, the window and (softmax) the seed cells.
        -> ascending unique tokens [R, K] (padding: max_tokens) and valid [R, K]"""
        cfg, n = self.cfg, self.rows.num_tokens.unsqueeze(1)
        partial = n // cfg.cell_size * cfg.cell_size + torch.arange(cfg.cell_size - 1, device=self.device)
        parts = [(partial, partial < n)]
        if cfg.mode != "relu":
            sink = torch.arange(cfg.sink_tokens, device=self.device).expand(n.shape[0], -1)
            window = n - cfg.window_tokens + torch.arange(cfg.window_tokens, device=self.device)
            parts += [(sink, sink < n), (window, window >= 0)]
        if cfg.mode == "softmax" and cfg.seed_cells:
            cells, cells_valid = self.seed_cells()
            tokens = cell_tokens(cells, cfg.cell_size).flatten(1)
            parts.append((tokens, cells_valid.repeat_interleave(cfg.cell_size, 1) & (tokens < n)))
        pad = self.rows.max_tokens
        tokens = torch.cat([torch.where(v, t, torch.full_like(t, pad)) for t, v in parts], 1).sort(1).values
        duplicate = torch.zeros_like(tokens, dtype=torch.bool)
        duplicate[:, 1:] = tokens[:, 1:] == tokens[:, :-1]
        tokens = torch.where(duplicate, torch.full_like(tokens, pad), tokens).sort(1).values
        return tokens, tokens < pad

    def log_budget(self, seeds: torch.Tensor, seeds_valid: torch.Tensor) -> torch.Tensor:
        """ln(eps * sum over seeded keys of exp(score)) per query head: [R, G] fp64 (-inf: skip nothing)"""
        cfg, rows = self.cfg, self.rows
        if cfg.mode != "softmax" or cfg.eps == 0 or seeds.shape[1] == 0:
            return torch.full(rows.q.shape[:2], -math.inf, dtype=torch.float64, device=self.device)
        self.counters["seed_keys_read"] += seeds_valid.sum()
        safe = torch.where(seeds_valid, seeds, torch.zeros_like(seeds))
        keys, _ = self.layout.gather_rows(self.flat_cache, rows.tables, rows.kv_heads, safe, values=False)
        scores = (keys.float() @ rows.q.mT * rows.scale).double()                             # [R, K, G]
        scores = torch.where(seeds_valid.unsqueeze(2), scores, torch.full_like(scores, -math.inf))
        return math.log(cfg.eps) + torch.logsumexp(scores, dim=1)

    # -- selection ----------------------------------------------------------------------------
    def record_skipped(self, dropped: torch.Tensor, counts: torch.Tensor, ub: torch.Tensor) -> None:
        """Add n * exp(ub) of the dropped nodes to each head's skipped mass [R, G].
        dropped, counts: [R, P]; ub: [R, P, G]"""
        log_mass = counts.double().clamp(min=1).log().unsqueeze(2) + ub.double()
        log_mass = torch.where(dropped.unsqueeze(2), log_mass, torch.full_like(log_mass, -math.inf))
        self.skipped = torch.logaddexp(self.skipped, torch.logsumexp(log_mass, dim=1))

    def keep_nodes(self, counts, ub, lb, valid, log_budget, spent, level_share, share):
        cfg = self.cfg
        if cfg.mode == "relu":
            keep = (ub > cfg.bias).any(-1)
        elif cfg.mode == "softmax":
            log_mass = counts.double().clamp(min=1).log().unsqueeze(2) + ub.double()
            skip, level_spent = greedy_skip(log_mass, log_budget + level_share, valid)
            spent += level_spent * share
            keep = ~skip
        else:
            lower = torch.where(valid, lb.amax(-1), torch.full_like(lb[..., 0], -math.inf))
            floor = topk_floor(lower, torch.where(valid, counts, torch.zeros_like(counts)), cfg.budget_tokens)
            keep = ub.amax(-1) >= floor.unsqueeze(1)
        return keep & valid

    def walk(self, seeds: torch.Tensor, log_budget: torch.Tensor):
        """The levels top-down. -> kept cells [R, C], valid, and their ub, lb [R, C, G]"""
        cfg = self.cfg
        num_rows = seeds.shape[0]
        spent = torch.zeros_like(log_budget)
        share = cfg.tree_budget_share / (cfg.tree_levels + 1)
        level_share = math.log(share) if share else -math.inf
        n = self.rows.num_tokens.unsqueeze(1)
        kept = torch.zeros(num_rows, 0, dtype=torch.long, device=self.device)
        kept_valid = torch.zeros_like(kept, dtype=torch.bool)
        for level in range(self.top_level, -1, -1):
            nodes, valid = self.frontier(level, kept, kept_valid)
            span = self.span(level)
            start, end = nodes * span, torch.minimum((nodes + 1) * span, n)
            seeded = (torch.searchsorted(seeds, end, right=False) - torch.searchsorted(seeds, start, right=False))
            counts = torch.where(valid, end - start - seeded, torch.zeros_like(start))
            valid = valid & (counts > 0)
            ub, lb = self.box_bounds(level, nodes, valid)
            keep = self.keep_nodes(counts, ub, lb, valid, log_budget, spent, level_share, share)
            self.record_skipped(valid & ~keep, counts, ub)
            kept, ub, lb, kept_valid, overflow = _compact(keep, self.node_width(), nodes, ub, lb)
            self.overflow |= overflow
        return kept, kept_valid, ub, lb, remaining_log_budget(log_budget, spent)

    def token_bounds(self, cells, cells_valid, cell_ub, cell_lb):
        """Bounds of the tokens of the kept (complete) cells: the first code plane where codes are on,
        else the cell box. -> tokens [R, C*T], valid, coded, ub, lb [R, C*T, G]"""
        size = self.cfg.cell_size
        tokens = cell_tokens(cells, size)                                                      # [R, C, T]
        ub = cell_ub.unsqueeze(2).expand(-1, -1, size, -1)
        lb = cell_lb.unsqueeze(2).expand(-1, -1, size, -1)
        coded = cells_valid if self.cfg.code_bits else torch.zeros_like(cells_valid)
        if self.cfg.code_bits:
            self.counters["code_cells_read"] += coded.sum()
            code_ub, code_lb = self.code_bounds(cells, 1)
            use = coded.view(*coded.shape, 1, 1)
            ub = torch.where(use, torch.minimum(code_ub, ub), ub)
            lb = torch.where(use, torch.maximum(code_lb, lb), lb)
        valid = cells_valid.unsqueeze(2).expand(-1, -1, size)
        coded = coded.unsqueeze(2).expand(-1, -1, size)
        return tokens.flatten(1), valid.flatten(1), coded.flatten(1), ub.flatten(1, 2), lb.flatten(1, 2)

    def code_bounds(self, cells: torch.Tensor, planes: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """bounds.code in chunks of cells (bounded temporaries). cells: [R, C] -> ub, lb [R, C, T, G]"""
        chunks = [self.bounds.code(cells[:, i:i + CODE_CHUNK_CELLS], planes)
                  for i in range(0, cells.shape[1], CODE_CHUNK_CELLS)]
        if not chunks:
            empty = torch.zeros(cells.shape[0], 0, self.cfg.cell_size, self.rows.q.shape[1], device=self.device)
            return empty, empty
        return torch.cat([c[0] for c in chunks], 1), torch.cat([c[1] for c in chunks], 1)

    def refine(self, cells, tokens, valid, coded, ub, lb):
        """Codes of more than one plane: in relu and topk mode a cut with the first plane's bounds, then every
        plane of the cells that still hold a coded candidate. Softmax makes no first cut: on SmolLM2's keys
        it left a candidate in nearly every cell (at eps 1e-2 and 7.5K tokens, 39.2% of the dense bytes read
        with it, 39.1% without) while it spent half the token budget, which made the final cut read 23.9% of
        the tokens instead of 22.6%. -> valid, ub, lb"""
        cfg = self.cfg
        if cfg.mode == "relu":
            valid = valid & (ub > cfg.bias).any(-1)          # exact: these tokens weigh nothing
        elif cfg.mode == "topk":                             # cannot reach the budget_tokens best
            lower = torch.where(valid, lb.amax(-1), torch.full_like(lb[..., 0], -math.inf))
            floor = topk_floor(lower, valid.long(), cfg.budget_tokens)
            reach = ub.amax(-1) >= floor.unsqueeze(1)
            self.record_skipped(valid & ~reach, torch.ones_like(tokens), ub)   # unread: the certificate counts them
            valid = valid & reach
        size = cfg.cell_size
        refine = (valid & coded).view(*cells.shape, size)                                     # [R, C, T]
        cell_index = torch.arange(cells.shape[1], device=self.device).expand_as(cells)
        picked, index, picked_valid, overflow = _compact(refine.any(-1), self.node_width(), cells, cell_index)
        self.overflow |= overflow
        self.counters["refined_cells"] += picked_valid.sum()
        fine_ub, fine_lb = self.code_bounds(picked, None)                                     # [R, C', T, G]
        group = ub.shape[-1]
        ub = _update_rows(ub.view(*refine.shape, group), index, picked_valid, fine_ub, torch.minimum)
        lb = _update_rows(lb.view(*refine.shape, group), index, picked_valid, fine_lb, torch.maximum)
        return valid, ub.flatten(1, 2), lb.flatten(1, 2)

    def keep_tokens(self, ub: torch.Tensor, lb: torch.Tensor, valid: torch.Tensor, log_budget: torch.Tensor
                    ) -> torch.Tensor:
        cfg = self.cfg
        if cfg.mode == "relu":
            return (ub > cfg.bias).any(-1) & valid
        if cfg.mode == "softmax":
            return ~greedy_skip(ub.double(), log_budget, valid, kept_gain(lb, cfg.eps))[0] & valid
        # the budget best: above the budget-th largest bound, then its ties in token order (a rule, so that
        # every implementation keeps the same tokens where coarse codes tie)
        best = torch.where(valid, ub.amax(-1), torch.full_like(ub[..., 0], -math.inf))
        budget = min(cfg.budget_tokens, best.shape[1])
        kth = best.topk(budget, dim=1).values[:, -1:]
        above, tie = best > kth, best == kth
        return (above | (tie & (tie.cumsum(1) <= budget - above.sum(1, keepdim=True)))) & valid

    def run(self) -> Candidates:
        rows, cfg = self.rows, self.cfg
        seeds, seeds_valid = self.seeds()
        log_budget = self.log_budget(seeds, seeds_valid)
        cells, cells_valid, cell_ub, cell_lb, token_budget = self.walk(seeds, log_budget)
        tokens, valid, coded, ub, lb = self.token_bounds(cells, cells_valid, cell_ub, cell_lb)
        seeded = torch.searchsorted(seeds, tokens).clamp(max=max(seeds.shape[1] - 1, 0))
        if seeds.shape[1]:
            valid = valid & (seeds.gather(1, seeded) != tokens)
        if cfg.code_bits and code_planes(cfg.code_bits)[1] > 1:
            valid, ub, lb = self.refine(cells, tokens, valid, coded, ub, lb)
        keep = self.keep_tokens(ub, lb, valid, token_budget)
        self.record_skipped(valid & ~keep, torch.ones_like(tokens), ub)

        pad = rows.max_tokens
        chosen = torch.cat([torch.where(seeds_valid, seeds, torch.full_like(seeds, pad)),
                            torch.where(keep, tokens, torch.full_like(tokens, pad))], 1)
        read = torch.cat([seeds_valid, keep], 1)
        listed, listed_valid, overflow = _compact(read, self.capacity, chosen)
        listed = torch.where(listed_valid, listed, torch.full_like(listed, pad)).sort(1).values
        self.overflow |= overflow
        return self.candidates(torch.where(listed < pad, listed, torch.zeros_like(listed)), listed_valid.sum(1))

    def candidates(self, tokens: torch.Tensor, counts: torch.Tensor) -> Candidates:
        """Package the lists; overflowed rows become dense reads with nothing skipped."""
        rows, dense = self.rows, self.overflow
        batch = rows.q.shape[0] // rows.summaries.boxes.shape[3]
        counts = torch.where(dense, rows.num_tokens, counts)
        skipped = torch.where(dense.unsqueeze(1), torch.full_like(self.skipped, -math.inf), self.skipped)
        cell_of = tokens // self.cfg.cell_size
        cells = torch.ones_like(cell_of)            # 1 where a listed token starts a new cell
        cells[:, 1:] = (cell_of[:, 1:] != cell_of[:, :-1]).long()
        in_list = torch.arange(tokens.shape[1], device=self.device) < counts.unsqueeze(1)
        counters = dict(self.counters, keys_read=counts.sum(), overflow_rows=dense.sum(),
                        cells_read=torch.where(dense, -(-rows.num_tokens // self.cfg.cell_size),
                                               (cells * in_list).sum(1)).sum())
        num_kv_heads = rows.summaries.boxes.shape[3]
        return Candidates(tokens.view(batch, num_kv_heads, tokens.shape[1]),
                          counts.view(batch, num_kv_heads).to(torch.int32), dense.view(batch, num_kv_heads),
                          skipped.float().view(batch, -1), counters)
