"""HSRConfig: every HSR setting, its default, and its validation."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from typing import Any

from vllm_hsr import envs

MODES = ("relu", "softmax", "topk")
CODE_BITS = (0, 1, 2, 4, 8)  # widths that pack whole codes into a byte
SUMMARY_DTYPES = ("auto", "float32", "bfloat16", "float16")
KEY_COPY = ("auto", "on", "off")
# In vLLM, a cell_size left unset is the largest power of two up to ENGINE_CELL_SIZE that divides the KV block size
# (64 with CPU_ATTN's 128-token blocks, 16 with FLASH_ATTN's 16): codes are relative to their cell's box, so the query
# weights are set up once per cell, and 64-token cells cut that setup to a quarter of 16-token cells' with the same
# needles answered (benchmarks/results/README.md, "Cell size").
ENGINE_CELL_SIZE = 64
# dense_below_tokens="auto" in topk mode: base + per_kept x the tokens topk keeps (sink + window + budget), doubled
# with two code planes (8-bit codes, whose second plane is bounded too). Topk bounds every token, then reads the kept
# ones at random, so its call costs a fixed part that grows with what it keeps plus a cheaper per-token part than a
# dense read. On SmolLM2's real keys (benchmarks/bench_layer_call.py --workload real, 8 rows, one thread, the 2-core
# CPU) 4-bit topk passed CPU_ATTN, for budgets 256, 512 and 1024, at ~3.3K, ~4.3K and ~6.5K tokens with 16-token
# cells (about 2K + 4 x kept) and at ~2K, ~2.5-3K and ~4.5K with 64-token cells (about 1K + 3 x kept).
TOPK_DENSE = {16: (2048, 4), ENGINE_CELL_SIZE: (1024, 3)}    # cell size -> (base, per_kept); smaller cells: 16's
# dense_below_tokens="auto" in softmax mode: tokens x (1e-2 / eps) ** exponent. Certified softmax bounds every token
# and reads the ones its certificate needs, which fall as the context grows and as eps loosens: on SmolLM2's real
# keys (as above, 64-token cells) it passed CPU_ATTN at ~7K tokens with eps 1e-3, ~5-5.5K with 1e-2 and ~4.3K with
# 1e-1. eps 0 reads every key, so it never pays: every row stays dense.
SOFTMAX_DENSE = (5500, 0.13)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _invalid(name: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"HSRConfig.{name}={value!r} is invalid: {allowed}")


@dataclasses.dataclass(frozen=True)
class HSRConfig:
    """Settings of HSR sparse attention (docs/design.md §2).

    mode: "relu" (exact ReLU^alpha attention), "softmax" (certified: the dropped
        relative mass is at most eps) or "topk" (sink + window + budget_tokens
        best tokens by their tightest upper bound).
    eps: softmax error budget in [0, 1); 0 reads every key through the same path.
    alpha, bias: relu mode computes ReLU(s*<q,k> - bias)^alpha.
    budget_tokens: topk mode's number of selected tokens beyond sink and window.
    cell_size: tokens per cell (a power of two); cells never straddle KV blocks. In vLLM an unset
        cell_size follows the KV block size (ENGINE_CELL_SIZE: 64 on CPU_ATTN's 128-token blocks).
    fanout: children per node in the levels above cells.
    tree_levels: levels of union boxes above the cells (node spans
        cell_size * fanout**level tokens).
    code_bits: bits per channel of the per-token key codes (0 turns them off). 8-bit codes
        are stored as two 4-bit planes: the first is read for every surviving cell, the
        second only for cells that still hold a candidate after the first cut.
    sink_tokens, window_tokens: first / last tokens always read exactly
        (softmax and topk modes).
    seed_cells: cells with the highest upper bound read first in softmax mode,
        per KV head, so the heaviest key usually lands in the lower bound of Z.
    scale: score scale s; None means 1/sqrt(head_dim).
    summary_dtype: storage of cell boxes; "auto" follows the key dtype. Narrower
        dtypes are rounded outward, so a box never gets tighter than its keys.
    tree_budget_share: part of the softmax budget spent pruning above the finest
        level (split evenly among those levels); the finest level gets the rest.
    dense_below_tokens: vLLM backend only: decode rows with fewer cached tokens
        use the dense kernel (HSR cannot pay off on short contexts). "auto": in topk mode base +
        per_kept x the tokens topk keeps (sink + window + budget_tokens), twice that with 8-bit codes,
        with (base, per_kept) measured per cell size (TOPK_DENSE): 2,800 tokens with 64-token cells
        (vLLM on CPU_ATTN), 4,416 with 16; in softmax mode 5,500 x (1e-2 / eps) ** 0.13
        (SOFTMAX_DENSE: 7,419 at the default eps 1e-3; eps 0: every row dense); in relu mode 0, since
        the dense kernel computes softmax, and relu refuses any other value. See `min_sparse_tokens`.
    max_candidates: fixed length of each (sequence, KV head) candidate list in
        tokens; a row whose selection would not fit is read densely instead (no
        host sync, as CUDA graphs need). 0: on the CPU the lists are as wide as the batch's
        longest one (a host read per level, free there); elsewhere as wide as the block table
        addresses (no host read).
    key_copy: vLLM backend only: keep a token-major copy of every complete cell's keys
        in its KV page, so a kept token's exact key is one contiguous row. "auto" keeps
        one where the dense partner scatters a token's key over many cache lines
        (CPU_ATTN), "on" / "off" force it. It costs the key bytes once more.
    allow_relu_decode: vLLM only: mode="relu" is refused in the engine unless this is True, since vLLM's
        prefill (the dense backend) stays softmax: decode would weigh tokens unlike the model's training
        and unlike its own prefill (for experiments with ReLU^alpha decode only).
    """

    # The defaults are the setting that pays on the CPU (README, "Recommended settings"): topk keeping 512 tokens
    # beyond sink and window, bounded by 4-bit codes; it answered every needle dense answered on SmolLM2.
    mode: str = "topk"
    eps: float = 1e-3
    alpha: int = 2
    bias: float = 0.0
    budget_tokens: int = 512
    cell_size: int = 16
    fanout: int = 16
    tree_levels: int = 3
    code_bits: int = 4
    sink_tokens: int = 16
    window_tokens: int = 64
    seed_cells: int = 4
    scale: float | None = None
    summary_dtype: str = "auto"
    tree_budget_share: float = 0.25
    dense_below_tokens: int | str = "auto"
    max_candidates: int = 0
    key_copy: str = "auto"
    allow_relu_decode: bool = False

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise _invalid("mode", self.mode, f"allowed values are {', '.join(MODES)}")
        if not _is_number(self.eps) or not 0.0 <= self.eps < 1.0:
            raise _invalid("eps", self.eps, "must be a number in [0, 1)")
        if not _is_int(self.alpha) or self.alpha < 1:
            raise _invalid("alpha", self.alpha, "must be a positive integer")
        if not _is_number(self.bias) or not math.isfinite(self.bias):
            raise _invalid("bias", self.bias, "must be a finite number")
        if not _is_int(self.cell_size) or self.cell_size < 1 or self.cell_size & (self.cell_size - 1):
            raise _invalid("cell_size", self.cell_size, "must be a power of two (1, 2, 4, ..., 16, ...)")
        if not _is_int(self.budget_tokens) or self.budget_tokens < self.cell_size:
            raise _invalid(
                "budget_tokens", self.budget_tokens,
                f"must be an integer of at least one cell (cell_size={self.cell_size})")
        if not _is_int(self.fanout) or self.fanout < 2:
            raise _invalid("fanout", self.fanout, "must be an integer >= 2")
        if not _is_int(self.tree_levels) or not 0 <= self.tree_levels <= 8:
            raise _invalid("tree_levels", self.tree_levels, "must be an integer in [0, 8]")
        if not _is_int(self.code_bits) or self.code_bits not in CODE_BITS:
            raise _invalid("code_bits", self.code_bits, f"allowed values are {CODE_BITS}")
        for name in ("sink_tokens", "window_tokens", "seed_cells", "max_candidates"):
            value = getattr(self, name)
            if not _is_int(value) or value < 0:
                raise _invalid(name, value, "must be a non-negative integer")
        if self.dense_below_tokens != "auto" and (not _is_int(self.dense_below_tokens) or self.dense_below_tokens < 0):
            raise _invalid("dense_below_tokens", self.dense_below_tokens, 'must be a non-negative integer or "auto"')
        if self.scale is not None and (
                not _is_number(self.scale) or not math.isfinite(self.scale) or self.scale <= 0):
            raise _invalid("scale", self.scale, "must be None or a finite number > 0")
        if self.summary_dtype not in SUMMARY_DTYPES:
            raise _invalid("summary_dtype", self.summary_dtype,
                           f"allowed values are {', '.join(SUMMARY_DTYPES)}")
        if self.key_copy not in KEY_COPY:
            raise _invalid("key_copy", self.key_copy, f"allowed values are {', '.join(KEY_COPY)}")
        if not isinstance(self.allow_relu_decode, bool):
            raise _invalid("allow_relu_decode", self.allow_relu_decode, "must be true or false")
        if not _is_number(self.tree_budget_share) or not 0.0 <= self.tree_budget_share < 1.0:
            raise _invalid("tree_budget_share", self.tree_budget_share, "must be a number in [0, 1)")

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_mapping(cls, settings: Mapping[str, Any]) -> HSRConfig:
        """Build from a mapping (e.g. vLLM's additional_config["hsr"]); unknown keys raise."""
        unknown = sorted(set(settings) - set(cls.field_names()))
        if unknown:
            raise ValueError(
                f"unknown HSR setting(s) {', '.join(unknown)}; "
                f"known settings are {', '.join(cls.field_names())}")
        return cls(**settings)

    @classmethod
    def from_vllm(cls, additional_config: Mapping[str, Any] | None,
                  environ: Mapping[str, str] = os.environ, block_size: int | None = None) -> HSRConfig:
        """vLLM's additional_config["hsr"], overridden by HSR_<FIELD> environment variables (vllm_hsr.envs).
        block_size: the KV cache's, where known: an unset cell_size then follows it (engine_cell_size)."""
        given = (additional_config or {}).get("hsr") or {}
        if not isinstance(given, Mapping):
            raise ValueError(f'additional_config["hsr"] must be a JSON object of HSR settings, got {given!r}')
        overrides = envs.setting_overrides(cls.field_names(), environ)
        settings = {**given, **overrides}
        if block_size is not None and "cell_size" not in settings:
            settings["cell_size"] = engine_cell_size(block_size, settings.get("budget_tokens", cls.budget_tokens))
        try:
            return cls.from_mapping(settings)
        except (ValueError, TypeError) as error:
            if not overrides:
                raise
            names = ", ".join(f"{envs.PREFIX}{name.upper()}={environ_value!r}"
                              for name, environ_value in overrides.items())
            raise ValueError(f"{error} (environment overrides: {names})") from None

    def check_engine_use(self) -> None:
        """Raise where these settings must not run in a vLLM engine (see allow_relu_decode)."""
        if self.mode == "relu" and not self.allow_relu_decode:
            raise ValueError(
                'HSRConfig.mode="relu" is refused in vLLM: decode would compute ReLU^alpha attention while '
                "prefill (the dense backend) computes softmax, so a model trained with softmax attention would "
                'change its answers. Use mode "softmax" or "topk", or set allow_relu_decode=true to run it anyway')
        if self.mode == "relu" and self.dense_below_tokens not in ("auto", 0):
            raise ValueError(
                f'HSRConfig.dense_below_tokens={self.dense_below_tokens!r} is refused with mode="relu": the rows it '
                "sends to the dense backend would get softmax attention, not ReLU^alpha. Leave it \"auto\" (0 in relu "
                "mode: every decode row goes through HSR)")

    def copies_keys(self, partner_scatters_keys: bool) -> bool:
        """Whether the KV pages keep a key copy, given whether the dense partner's layout scatters a key."""
        return self.key_copy == "on" or (self.key_copy == "auto" and partner_scatters_keys)

    def min_sparse_tokens(self) -> int | float:
        """Cached tokens a decode row needs to go through HSR (dense_below_tokens, "auto" resolved; math.inf: none
        does)."""
        if self.dense_below_tokens != "auto":
            return self.dense_below_tokens
        if self.mode == "relu":
            return 0
        if self.mode == "softmax":
            tokens, exponent = SOFTMAX_DENSE
            threshold = tokens * (1e-2 / self.eps) ** exponent if self.eps > 0 else math.inf
            return round(threshold) if math.isfinite(threshold) else math.inf
        kept = self.sink_tokens + self.window_tokens + self.budget_tokens       # topk
        planes = 2 if self.code_bits > 4 else 1
        base, per_kept = TOPK_DENSE[ENGINE_CELL_SIZE if self.cell_size >= ENGINE_CELL_SIZE else 16]
        return planes * (base + per_kept * kept)

    def resolved_scale(self, head_dim: int) -> float:
        return self.scale if self.scale is not None else 1.0 / math.sqrt(head_dim)


def engine_cell_size(block_size: int, budget_tokens: Any) -> int:
    """The cell size vLLM uses when none is set: the largest power of two up to ENGINE_CELL_SIZE that divides
    block_size, and no larger than a (valid) budget_tokens, since topk keeps at least one cell."""
    size = math.gcd(ENGINE_CELL_SIZE, block_size) if block_size > 0 else 1
    if _is_int(budget_tokens) and budget_tokens > 0:
        while size > budget_tokens:
            size //= 2
    return size
