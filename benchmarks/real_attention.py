"""Real attention: post-rotary queries, keys and values of every layer of the reference model on real text.

The model (vllm_hsr.real_model) runs one forward pass in transformers over a haystack of the
shipped text (vllm_hsr.corpus) with an attention function that computes SDPA as usual and keeps
each layer's keys and values [N, Hkv, D] and the queries of the last `num_queries` positions
[Q, Hq, D]: the decode queries at positions N - Q .. N - 1, each attending to the keys up to itself.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL_DIR = ROOT / ".real-model"
CAPTURE = "vllm_hsr_capture"


@dataclass
class LayerAttention:
    layer: int
    queries: torch.Tensor     # [Q, Hq, D] fp32, post-rotary, positions N - Q .. N - 1
    keys: torch.Tensor        # [N, Hkv, D] fp32, post-rotary
    values: torch.Tensor      # [N, Hkv, D] fp32
    scale: float

    @property
    def positions(self) -> torch.Tensor:
        """The queries' positions; query i attends to keys 0 .. positions[i]."""
        n, q = self.keys.shape[0], self.queries.shape[0]
        return torch.arange(n - q, n)


def load_model(model_dir: Path = DEFAULT_MODEL_DIR):
    """The reference model in transformers, float32, with its tokenizer (built if missing)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm_hsr.real_model import build_real_model
    path = build_real_model(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, tokenizer


def capture(model, input_ids: list[int], num_queries: int, layers: list[int] | None = None) -> list[LayerAttention]:
    """One forward pass over input_ids; the attention of `layers` (default all) as LayerAttention."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    wanted = set(range(model.config.num_hidden_layers) if layers is None else layers)
    captured: dict[int, LayerAttention] = {}

    def attention(module, query, key, value, attention_mask, **kwargs):
        if module.layer_idx in wanted:          # query [1, Hq, N, D]; key, value [1, Hkv, N, D]
            captured[module.layer_idx] = LayerAttention(
                module.layer_idx, query[0, :, -num_queries:].transpose(0, 1).float().clone(),
                key[0].transpose(0, 1).float().clone(), value[0].transpose(0, 1).float().clone(),
                float(kwargs.get("scaling") or module.scaling))
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(CAPTURE, attention)
    previous = model.config._attn_implementation
    model.set_attn_implementation(CAPTURE)
    try:
        with torch.inference_mode():
            model(torch.tensor([input_ids]), use_cache=False)
    finally:
        model.set_attn_implementation(previous)
    return [captured[i] for i in sorted(captured)]


# The layers bench_layer_call's real workload draws its rows from, in row order: 8 spread over the 30, starting
# in the middle so that a batch of one is a typical layer (layer 0, which the oracle reads almost whole, comes 6th).
SAMPLE_LAYERS = (12, 17, 21, 25, 29, 0, 4, 8)


@functools.cache
def decode_rows(max_context: int, model_dir: Path = DEFAULT_MODEL_DIR) -> tuple[LayerAttention, ...]:
    """SAMPLE_LAYERS' attention over one haystack of about max_context tokens (a needle at depth 0.5 and its
    question at the end), the query of every position kept. The model is causal, so keys 0 .. C-1 and the
    query at position C-1 are exactly a decode row of context C, for every C up to the haystack's length."""
    from vllm_hsr.corpus import Needle, needle_prompt
    model, tokenizer = load_model(model_dir)
    ids = tokenizer(needle_prompt(tokenizer, max_context, Needle("blue", 48213, 0.5)).prompt).input_ids
    by_layer = {attn.layer: attn for attn in capture(model, ids, len(ids), list(SAMPLE_LAYERS))}
    return tuple(by_layer[layer] for layer in SAMPLE_LAYERS)


def decode_row(row: int, context: int, max_context: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batch row `row` of the real workload at `context` tokens: layer SAMPLE_LAYERS[row % 8]'s keys, values
    [context, Hkv, D] and the query [Hq, D] at position context - 1."""
    layers = decode_rows(max_context)
    attn = layers[row % len(layers)]
    if context > attn.keys.shape[0]:
        raise ValueError(f"context {context} exceeds the captured haystack ({attn.keys.shape[0]} tokens)")
    return attn.keys[:context], attn.values[:context], attn.queries[context - 1]
