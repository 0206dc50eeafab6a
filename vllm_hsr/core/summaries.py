"""Cell boxes, per-token key codes, and the upper/lower score bounds they give.

Every bound here is valid in floating point: computed in fp32 from exactly
upcast inputs, then widened by a margin larger than the rounding error of the
bound itself plus that of an fp32 dense score (docs/design.md §2, "Bounds in floating
point").
"""

from __future__ import annotations

import torch

# Unit roundoff of fp32 and slack terms of the bounds (see box_bounds/code_bounds).
_U32 = 2.0 ** -24
_CODE_STEP_SLACK = 2.0 ** -12   # quantisation ties decided in fp32
_CODE_MAG_SLACK = 2.0 ** -18    # rounding of k - lo and of the reconstruction
_ABS_SLACK = 2.0 ** -120        # subnormal underflow, far below any score that matters


def round_outward(lo: torch.Tensor, hi: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Store fp32 box corners in `dtype`, rounding lo down and hi up."""
    lo_n, hi_n = lo.to(dtype), hi.to(dtype)
    if dtype == torch.float32:
        return lo_n, hi_n
    lo_n = torch.where(lo_n.float() > lo, torch.nextafter(lo_n, torch.full_like(lo_n, -torch.inf)), lo_n)
    hi_n = torch.where(hi_n.float() < hi, torch.nextafter(hi_n, torch.full_like(hi_n, torch.inf)), hi_n)
    return lo_n, hi_n


def cell_boxes(keys: torch.Tensor, num_valid: int, cell_size: int,
               dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes of consecutive cells over the first `num_valid` tokens.

    keys: [num_tokens, num_kv_heads, head_dim] (any float dtype)
    returns lo, hi: [num_cells, num_kv_heads, head_dim] in `dtype`
    """
    num_cells = -(-num_valid // cell_size)
    keys = keys[:num_valid].float()
    pad = num_cells * cell_size - num_valid
    lo = torch.nn.functional.pad(keys, (0, 0, 0, 0, 0, pad), value=torch.inf)
    hi = torch.nn.functional.pad(keys, (0, 0, 0, 0, 0, pad), value=-torch.inf)
    shape = (num_cells, cell_size) + tuple(keys.shape[1:])
    return round_outward(lo.view(shape).amin(1), hi.view(shape).amax(1), dtype)


def union_boxes(lo: torch.Tensor, hi: torch.Tensor, fanout: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Parent boxes of `fanout` consecutive nodes; min/max keep the stored dtype exact.

    lo, hi: [num_nodes, ...] -> [ceil(num_nodes / fanout), ...]
    """
    num_parents = -(-lo.shape[0] // fanout)
    pad = num_parents * fanout - lo.shape[0]
    rest = tuple(lo.shape[1:])
    lo_p = torch.cat([lo, lo.new_full((pad,) + rest, torch.inf)]).view((num_parents, fanout) + rest)
    hi_p = torch.cat([hi, hi.new_full((pad,) + rest, -torch.inf)]).view((num_parents, fanout) + rest)
    return lo_p.amin(1), hi_p.amax(1)


def code_step(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> torch.Tensor:
    """Quantisation step per channel of a cell box (fp32; inf when the box overflows)."""
    return (hi.float() - lo.float()) / float((1 << bits) - 1)


def quantize_keys(keys: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int) -> torch.Tensor:
    """Nearest code of each key channel on its cell's grid lo + code * step.

    keys: [num_cells, cell_size, ..., head_dim]; lo, hi: [num_cells, ..., head_dim]
    returns uint8 codes shaped like keys (unpacked)
    """
    lo32 = lo.float().unsqueeze(1)
    step = code_step(lo, hi, bits).unsqueeze(1)
    scaled = (keys.float() - lo32) / step
    # A flat channel (step 0) or an overflowed box (step inf) has nothing to encode.
    scaled = torch.where(torch.isfinite(scaled), scaled, torch.zeros_like(scaled))
    # round half up (floor(x + 0.5)), as the Triton kernel does
    return torch.floor(scaled + 0.5).clamp(0, (1 << bits) - 1).to(torch.uint8)


PLANE_BITS = 4   # wider codes are stored as 4-bit planes, most significant first


def code_planes(bits: int) -> tuple[int, int]:
    """(bits per plane, number of planes) of `bits`-bit codes: a plane can be read on its own."""
    plane_bits = min(bits, PLANE_BITS)
    return plane_bits, bits // plane_bits


def plane_bytes(head_dim: int, bits: int) -> int:
    """Bytes of one plane of one token's codes."""
    plane_bits, _ = code_planes(bits)
    return -(-head_dim * plane_bits // 8)


def _pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    per_byte = 8 // bits
    codes = torch.nn.functional.pad(codes, (0, -codes.shape[-1] % per_byte))
    codes = codes.view(*codes.shape[:-1], codes.shape[-1] // per_byte, per_byte)
    shifts = torch.arange(per_byte, dtype=torch.uint8, device=codes.device) * bits
    return (codes << shifts).sum(-1, dtype=torch.uint8) if per_byte > 1 else codes[..., 0]


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Planes of `code_planes(bits)`, each packing `8 // plane_bits` codes per byte (zero padded),
    most significant plane first. [..., D] -> [..., planes * plane_bytes]"""
    plane_bits, planes = code_planes(bits)
    mask = (1 << plane_bits) - 1
    return torch.cat([_pack((codes >> (plane_bits * (planes - 1 - p))) & mask, plane_bits) for p in range(planes)],
                     dim=-1)


def unpack_codes(packed: torch.Tensor, bits: int, head_dim: int) -> torch.Tensor:
    """Inverse of pack_codes. [..., planes * plane_bytes] uint8 -> [..., D] uint8"""
    plane_bits, planes = code_planes(bits)
    per_byte = 8 // plane_bits
    shifts = torch.arange(per_byte, dtype=torch.uint8, device=packed.device) * plane_bits
    codes = torch.zeros(*packed.shape[:-1], head_dim, dtype=torch.uint8, device=packed.device)
    for plane in packed.chunk(planes, dim=-1):
        values = ((plane.unsqueeze(-1) >> shifts) & ((1 << plane_bits) - 1)).flatten(-2)[..., :head_dim]
        codes = (codes << plane_bits) | values
    return codes


CODE_WEIGHT_LIMIT = 32512   # an integer code weight splits into two signed bytes: 256 * high + low


def code_weight_range(head_dim: int, bits: int) -> int:
    """The largest |integer code weight| (integer_weights): it splits into two signed bytes, and a token's
    dot over every plane, (2^bits - 1) * limit * head_dim at most, fits an int32."""
    return min(CODE_WEIGHT_LIMIT, (2 ** 31 - 1) // (((1 << bits) - 1) * (head_dim + head_dim % 2)))


def integer_weights(weights: torch.Tensor, limit: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Code weights as integers, so that a token's code dot is exact in any arithmetic: x = rint(w / 2^e) with
    the power of two 2^e that brings max |w| into [limit / 4, limit] (both scalings exact).

    weights: [..., D] fp32 -> x [..., D] float64 holding integers, exponent e [...] float64, residual [...]
    float64 = sum |w / 2^e - x| (exact terms; w = 2^e * x + 2^e * r with sum |r| = residual). Non-finite or
    all-zero weights give x = 0, e = 0 and residual inf (non-finite) or 0.
    """
    top = weights.abs().amax(-1)
    mantissa, exponent = torch.frexp(top)                   # top = mantissa * 2^exponent, mantissa in [0.5, 1)
    bits = limit.bit_length() - 1                           # 2^bits <= limit < 2^(bits + 1)
    exponent = (exponent - bits - (mantissa * 2.0 ** (bits + 1) <= limit).int()).double()
    usable = torch.isfinite(top) & (top > 0)
    exponent = torch.where(usable, exponent, torch.zeros_like(exponent))
    scaled = weights.double() * torch.exp2(-exponent).unsqueeze(-1)
    x = torch.where(usable.unsqueeze(-1), torch.round(scaled), torch.zeros_like(scaled))
    residual = torch.where(usable, (scaled - x).abs().sum(-1),
                           torch.where(top == 0, 0.0, torch.inf).double())
    return x, exponent, residual


def margin_terms(head_dim: int) -> tuple[float, float]:
    """(relative, absolute) rounding allowance: margin = scale * relative * <magnitude, |q|> + absolute."""
    return (4 * head_dim + 16) * _U32, head_dim * _ABS_SLACK


def code_slacks() -> tuple[float, float, float]:
    """A code box's half width = step * (0.5 + step slack) + magnitude * magnitude slack + absolute slack."""
    return _CODE_STEP_SLACK, _CODE_MAG_SLACK, _ABS_SLACK


def _margin(q_abs: torch.Tensor, magnitude: torch.Tensor, scale: float) -> torch.Tensor:
    """Rounding allowance: bound's own fp32 error plus an fp32 dense score's. [n, G]"""
    relative, absolute = margin_terms(q_abs.shape[-1])
    return scale * relative * (magnitude @ q_abs.mT) + absolute


def _finite_or(bound: torch.Tensor, value: float) -> torch.Tensor:
    # inf - inf inside a bound means the box overflowed: the bound is unbounded.
    return torch.where(torch.isnan(bound), torch.full_like(bound, value), bound)


def box_bounds(q: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
               scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Max and min of s*<q,k> over each box.

    q: [..., G, D] fp32; lo, hi: [..., n, D] any float dtype (leading dims broadcast)
    returns ub, lb: [..., n, G] fp32
    """
    lo32, hi32 = lo.float(), hi.float()
    q_pos, q_neg = q.clamp(min=0), q.clamp(max=0)
    upper = hi32 @ q_pos.mT + lo32 @ q_neg.mT
    lower = lo32 @ q_pos.mT + hi32 @ q_neg.mT
    margin = _margin(q.abs(), torch.maximum(lo32.abs(), hi32.abs()), scale)
    return (_finite_or(scale * upper + margin, torch.inf),
            _finite_or(scale * lower - margin, -torch.inf))


def _code_dot(packed: torch.Tensor, weights: torch.Tensor, bits: int, planes: int) -> torch.Tensor:
    """<weights, known code> of every token: the value of the first `planes` planes, as an integer,
    dotted with per-cell weights.

    packed: [..., c, T, bytes] (at least the planes read); weights: [..., c, G, D] -> [..., c, T, G] in weights'
    dtype (integer weights in float64: the dot is exact)
    4-bit planes are read a nibble at a time: a byte's low nibble is channel 2j, its high nibble
    channel 2j + 1, and plane p weighs 16**(planes - 1 - p); so all planes take two matmuls on the
    bytes (weights scaled by exact powers of two), with no unpacked copy of the codes.
    """
    plane_bits, _ = code_planes(bits)
    head_dim = weights.shape[-1]
    width = plane_bytes(head_dim, bits)
    packed = packed[..., :planes * width]
    if plane_bits != 4:
        return unpack_codes(packed, planes * plane_bits, head_dim).to(weights.dtype) @ weights.mT
    pad = torch.nn.functional.pad(weights, (0, 2 * width - head_dim)).unflatten(-1, (width, 2))  # [..., c, G, W, 2]
    place = torch.tensor([16.0 ** (planes - 1 - p) for p in range(planes)], dtype=weights.dtype, device=weights.device)
    scaled = (pad.unsqueeze(-3) * place.view(-1, 1, 1)).flatten(-3, -2)                     # [..., c, G, P*W, 2]
    even, odd = scaled[..., 0].mT.contiguous(), scaled[..., 1].mT.contiguous()               # [..., c, P*W, G]
    return (packed & 15).to(weights.dtype) @ even + (packed >> 4).to(weights.dtype) @ odd


def code_bounds(q: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, packed: torch.Tensor,
                bits: int, scale: float, planes: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Max and min of s*<q,k> over each token's code box, from the first `planes` planes of its
    code (None: all). Known high bits v of a code leave it in [v * 2^u, v * 2^u + 2^u - 1] (u
    unknown bits): a box of half width (2^u - 1/2) steps around lo + (v * 2^u + (2^u - 1)/2) * step,
    whose centre scores <q, lo> + (2^u - 1)/2 * <q, step> + 2^u * <q * step, v>. The last dot takes the
    per-cell integer weights x = rint(q * step / 2^e) (integer_weights): 2^e * <x, v> is exact in any
    arithmetic (every kernel computes the same value), and their rounding, at most (2^bits - 2^u) * 2^e *
    residual over any v, widens the box.

    q: [..., G, D] fp32; lo, hi: [..., c, D] (the cells' boxes); packed: [..., c, T, bytes] (pack_codes,
    at least the planes read) returns ub, lb: [..., c, T, G] fp32
    """
    plane_bits, num_planes = code_planes(bits)
    planes = num_planes if planes is None else planes
    unknown = (1 << (bits - planes * plane_bits)) - 1                  # 2^u - 1
    lo32, hi32 = lo.float(), hi.float()
    step = code_step(lo, hi, bits)                                      # [..., c, D]
    magnitude = torch.maximum(lo32.abs(), hi32.abs())                   # [..., c, D]
    step_slack, magnitude_slack, abs_slack = code_slacks()
    half = step * (0.5 + unknown / 2 + step_slack) + magnitude * magnitude_slack + abs_slack
    step = torch.where(torch.isfinite(step), step, torch.zeros_like(step))
    cell_part = lo32 @ q.mT + (unknown / 2) * (step @ q.mT)                               # [..., c, G]
    weights = q.unsqueeze(-3) * step.unsqueeze(-2)                                        # [..., c, G, D]
    x, exponent, residual = integer_weights(weights, code_weight_range(q.shape[-1], bits))  # [.., c, G, D], [.., c, G]
    power = torch.exp2(exponent)
    dot = (_code_dot(packed, x, bits, planes) * power.unsqueeze(-2)).float()               # [..., c, T, G]
    center = cell_part.unsqueeze(-2) + (unknown + 1) * dot
    q_abs = q.abs()
    rounding = (((1 << bits) - (unknown + 1)) * residual * power).float()                  # [..., c, G]
    width = (half @ q_abs.mT + rounding).unsqueeze(-2)                  # [..., c, 1, G]
    margin = _margin(q_abs, magnitude + half, scale).unsqueeze(-2)
    return (_finite_or(scale * (center + width) + margin, torch.inf),
            _finite_or(scale * (center - width) - margin, -torch.inf))
