"""Synthetic long-context decode workloads for bench_decode.py (parameters documented here).

Each returns keys, values [num_tokens, num_kv_heads, head_dim] and one decode query
[num_q_heads, head_dim] (fp32). Random-weight models have near-uniform attention, so the
structure is written down instead, after what is reported of real LLM attention:

- attention sinks: the first few tokens draw a large share of attention in most heads
  (StreamingLLM, Xiao et al. 2023): SINK_TOKENS keys aligned with the query direction;
- locality and topics: attention concentrates on a small set of pages that changes
  slowly with position (Quest, Tang et al. 2024; H2O's heavy hitters, Zhang et al. 2023):
  the sequence is a run of segments (mean SEGMENT_TOKENS tokens), each drawing its keys
  around one of NUM_TOPICS cluster centres; the query attends to QUERY_TOPICS of them;
- repeated segments: long documents repeat passages; REPEAT_FRACTION of segments copy
  an earlier one;
- outlier channels: a few key channels carry large, nearly constant magnitudes (KIVI,
  Liu et al. 2024; "massive activations", Sun et al. 2024): OUTLIER_CHANNELS channels
  offset by OUTLIER_SCALE;
- rotary positions (RoFormer; Llama-3 uses base 500000): `rotary` applies RoPE to keys
  and query. Trained models keep semantic matching in the low-frequency channel pairs,
  whose rotation is slow over the context, and use high frequencies for positional
  patterns (Barbero et al. 2024, "Round and round we go"): here the topic content sits in
  the lowest SEMANTIC_PAIRS fraction of frequencies, the rest holds noise. RoPE spreads
  each cell's keys in the high-frequency pairs, the case where boxes prune little and
  the token codes must carry the selection.

`random` (isotropic Gaussian keys and query) is the worst case for any bounding box.
"""

from __future__ import annotations

import torch

SINK_TOKENS = 4
SINK_SCORE_BOOST = 0.7      # sink keys: this far along the query direction (score ~ 16 vs ~13 on topic)
NUM_TOPICS = 256
SEGMENT_TOKENS = 64
TOPIC_SPREAD = 1.0          # std of topic centres per channel
TOKEN_NOISE = 0.35          # std of a key around its topic centre
QUERY_TOPICS = 3
QUERY_GAIN = 2.0            # the query's length along its topics (sharpness of attention)
REPEAT_FRACTION = 0.1
OUTLIER_CHANNELS = 4
OUTLIER_SCALE = 6.0
ROPE_BASE = 500000.0
SEMANTIC_PAIRS = 0.25       # rotary: fraction of (lowest-frequency) channel pairs carrying the topic content

WORKLOADS = ("random", "structured", "rotary")


def _rope(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (i, i + D/2) by position * base^(-2i/D). x: [N, H, D]"""
    half = x.shape[-1] // 2
    freqs = ROPE_BASE ** (-torch.arange(half, dtype=torch.float64) * 2 / x.shape[-1])
    angle = (positions.double().unsqueeze(1) * freqs).float()                 # [N, D/2]
    cos, sin = angle.cos().unsqueeze(1), angle.sin().unsqueeze(1)
    a, b = x[..., :half], x[..., half:]
    return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)


def _structured(num_tokens: int, num_kv_heads: int, group: int, head_dim: int,
                gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    centres = TOPIC_SPREAD * torch.randn(NUM_TOPICS, num_kv_heads, head_dim, generator=gen)
    num_segments = -(-num_tokens // SEGMENT_TOKENS)
    topic_of_segment = torch.randint(NUM_TOPICS, (num_segments,), generator=gen)
    # geometric lengths (mean SEGMENT_TOKENS) from the seeded generator, so every run sees the same workload
    uniform = torch.rand(num_segments, generator=gen, dtype=torch.float64).clamp(min=1e-12)
    lengths = torch.floor(uniform.log() / torch.log1p(torch.tensor(-1.0 / SEGMENT_TOKENS))) + 1
    segment_of_token = torch.repeat_interleave(torch.arange(num_segments), lengths.long())[:num_tokens]
    if segment_of_token.numel() < num_tokens:
        pad = torch.full((num_tokens - segment_of_token.numel(),), num_segments - 1)
        segment_of_token = torch.cat([segment_of_token, pad])
    keys = centres[topic_of_segment[segment_of_token]]
    keys = keys + TOKEN_NOISE * torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen)
    # repeated passages: copy earlier stretches of keys verbatim
    for _ in range(int(REPEAT_FRACTION * num_segments)):
        length = SEGMENT_TOKENS
        src = int(torch.randint(0, max(1, num_tokens - 2 * length), (1,), generator=gen))
        dst = int(torch.randint(src + length, max(src + length + 1, num_tokens - length), (1,), generator=gen))
        keys[dst:dst + length] = keys[src:src + length]
    keys[..., :OUTLIER_CHANNELS] += OUTLIER_SCALE

    query_topics = topic_of_segment[torch.randint(num_segments, (QUERY_TOPICS,), generator=gen)]
    direction = centres[query_topics].mean(0)                                     # [Hkv, D]
    direction = direction / direction.norm(dim=-1, keepdim=True) * head_dim ** 0.5
    queries = QUERY_GAIN * direction.unsqueeze(1) + 0.3 * torch.randn(num_kv_heads, group, head_dim, generator=gen)
    queries[..., :OUTLIER_CHANNELS] = 0.1   # queries barely read the outlier channels
    keys[:SINK_TOKENS] = SINK_SCORE_BOOST * direction + OUTLIER_SCALE * (torch.arange(head_dim) < OUTLIER_CHANNELS)
    return keys, queries.flatten(0, 1), direction


def make_workload(name: str, num_tokens: int, num_kv_heads: int, num_q_heads: int, head_dim: int,
                  seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """returns keys, values [N, Hkv, D] and query [Hq, D], fp32"""
    gen = torch.Generator().manual_seed(seed)
    group = num_q_heads // num_kv_heads
    values = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen)
    if name == "random":
        keys = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen)
        return keys, values, torch.randn(num_q_heads, head_dim, generator=gen)
    keys, query, _ = _structured(num_tokens, num_kv_heads, group, head_dim, gen)
    if name == "rotary":
        # pair i rotates at base^(-2i/D): the high pairs (i near D/2) are the slow, semantic ones
        half = head_dim // 2
        fast = torch.arange(half) < int(half * (1 - SEMANTIC_PAIRS))
        fast = torch.cat([fast, fast])
        # the semantic pairs carry the whole score: 1/sqrt(fraction) on both sides keeps its scale
        gain = SEMANTIC_PAIRS ** -0.5
        keys[..., ~fast] *= gain
        query[..., ~fast] *= gain
        keys[..., fast] = TOKEN_NOISE * torch.randn(num_tokens, num_kv_heads, int(fast.sum()), generator=gen)
        query[..., fast] = 0.3 * torch.randn(query.shape[0], int(fast.sum()), generator=gen)
        keys = _rope(keys, torch.arange(num_tokens))
        query = _rope(query.unsqueeze(0), torch.tensor([num_tokens])).squeeze(0)
    elif name != "structured":
        raise ValueError(f"unknown workload {name!r}; known: {', '.join(WORKLOADS)}")
    return keys, values, query
