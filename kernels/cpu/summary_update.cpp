// HSR cell summaries on the CPU: the box, token codes and key copy of every cell a KV write filled,
// one OpenMP task per (cell, KV head).
//
// Twin: vllm_hsr.core.paged.PagedSummaries._summarise_cells (core.summaries round_outward, quantize_keys,
// pack_codes); the results are bit for bit the twin's (tested). Boxes are stored in fp32 or bf16 (the
// launcher leaves fp16 boxes to the twin). Plain C ABI (loaded with ctypes).

#include <algorithm>
#include <limits>
#include <vector>

#include "common.h"

namespace {

using namespace hsr;

// Every field is 8 bytes wide, so the ctypes mirror (kernels/cpu_summary.py) needs no padding rules.
struct SummaryArgs {
  i64 num_cells, num_kv_heads, head_dim, cell_size;
  const i64* blocks;              // [num_cells] physical block of each filled cell
  const i64* first_offsets;       // [num_cells] in-block offset of its first token
  const void* cache;              // flat KV cache
  i64 cache_dtype, block_stride, head_stride;
  const i64* key_offsets;         // [block_size, head_dim]
  void* boxes;                    // [blocks, slots, 2 (lo, hi), kv_heads, head_dim] at these strides
  i64 box_dtype, box_block_stride, box_slot_stride, box_side_stride, box_head_stride;
  uint8_t* codes;                 // or null: block, kv head, token strides in bytes
  i64 code_block_stride, code_head_stride, code_token_stride, code_bits, plane_bits, plane_bytes;
  void* key_rows;                 // or null: key copy in the cache dtype, block and kv head strides
  i64 key_rows_block_stride, key_rows_head_stride;
  i64 num_threads;
};

// fp32 -> bf16, rounding to nearest even (NaN stays NaN), as torch converts
uint16_t float_to_bf16(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  if (std::isnan(x)) return uint16_t((bits >> 16) | 0x40);
  return uint16_t((bits + 0x7fff + ((bits >> 16) & 1)) >> 16);
}

// The bf16 next to h toward -inf (down) or +inf, as torch.nextafter steps a bf16 (c10::nextafter)
uint16_t bf16_step(uint16_t h, bool down) {
  constexpr uint16_t SIGN = 0x8000;
  const uint16_t to = down ? 0xff80 : 0x7f80;
  if (std::isnan(bf16_to_float(h)) || h == to) return h;
  if ((h & ~SIGN) == 0) return uint16_t((to & SIGN) | 1);
  const bool away = ((h ^ to) & SIGN) == 0 && (h & ~SIGN) < (to & ~SIGN);
  return uint16_t(away ? h + 1 : h - 1);
}

// A box corner in the box dtype, rounded outward (core.summaries.round_outward); returns its fp32 value
float store_corner(void* boxes, i64 at, i64 dtype, float value, bool lower) {
  if (dtype == F32) {
    static_cast<float*>(boxes)[at] = value;
    return value;
  }
  uint16_t h = float_to_bf16(value);
  if (lower ? bf16_to_float(h) > value : bf16_to_float(h) < value) h = bf16_step(h, lower);
  static_cast<uint16_t*>(boxes)[at] = h;
  return bf16_to_float(h);
}

void summarise(const SummaryArgs& a, i64 cell, i64 head) {
  const i64 D = a.head_dim, T = a.cell_size, block = a.blocks[cell], first = a.first_offsets[cell];
  const i64 item = dtype_size(a.cache_dtype);
  const i64 page = block * a.block_stride + head * a.head_stride;
  std::vector<float> keys(T * D), lo(D, std::numeric_limits<float>::infinity()),
      hi(D, -std::numeric_limits<float>::infinity());
  for (i64 t = 0; t < T; ++t)
    for (i64 d = 0; d < D; ++d) {
      const float k = load_float(a.cache, page + a.key_offsets[(first + t) * D + d], a.cache_dtype);
      keys[t * D + d] = k;
      if (std::isnan(k) || k < lo[d]) lo[d] = std::isnan(lo[d]) ? lo[d] : k;     // NaN wins, as in torch's amin
      if (std::isnan(k) || k > hi[d]) hi[d] = std::isnan(hi[d]) ? hi[d] : k;
    }
  const i64 box = block * a.box_block_stride + (first / T) * a.box_slot_stride + head * a.box_head_stride;
  for (i64 d = 0; d < D; ++d) {
    lo[d] = store_corner(a.boxes, box + d, a.box_dtype, lo[d], true);
    hi[d] = store_corner(a.boxes, box + a.box_side_stride + d, a.box_dtype, hi[d], false);
  }
  if (a.codes) {
    const i64 levels = (i64(1) << a.code_bits) - 1, planes = a.code_bits / a.plane_bits;
    const i64 per_byte = 8 / a.plane_bits, mask = (i64(1) << a.plane_bits) - 1;
    std::vector<float> step(D);       // per channel, once for the cell's tokens
    for (i64 d = 0; d < D; ++d) step[d] = (hi[d] - lo[d]) / float(levels);
    for (i64 t = 0; t < T; ++t) {
      uint8_t* packed = a.codes + block * a.code_block_stride + head * a.code_head_stride +
                        (first + t) * a.code_token_stride;
      std::fill(packed, packed + planes * a.plane_bytes, uint8_t(0));
      for (i64 d = 0; d < D; ++d) {
        float scaled = (keys[t * D + d] - lo[d]) / step[d];
        if (!std::isfinite(scaled)) scaled = 0.0f;    // a flat channel or an overflowed box encodes nothing
        const i64 code = i64(std::min(std::max(std::floor(scaled + 0.5f), 0.0f), float(levels)));
        for (i64 p = 0; p < planes; ++p) {
          const i64 value = (code >> (a.plane_bits * (planes - 1 - p))) & mask;
          packed[p * a.plane_bytes + d / per_byte] |= uint8_t(value << ((d % per_byte) * a.plane_bits));
        }
      }
    }
  }
  if (a.key_rows) {
    char* rows = static_cast<char*>(a.key_rows) +
                 (block * a.key_rows_block_stride + head * a.key_rows_head_stride + first * D) * item;
    const char* cache = static_cast<const char*>(a.cache);
    for (i64 t = 0; t < T; ++t)
      for (i64 d = 0; d < D; ++d)
        std::memcpy(rows + (t * D + d) * item, cache + (page + a.key_offsets[(first + t) * D + d]) * item, item);
  }
}

}  // namespace

extern "C" {

int hsr_summary_args_size() { return int(sizeof(SummaryArgs)); }

void hsr_summarise_cells(const SummaryArgs* args) {
  const i64 tasks = args->num_cells * args->num_kv_heads;
#pragma omp parallel for schedule(dynamic, 1) num_threads(args->num_threads) if (tasks > 1)
  for (i64 task = 0; task < tasks; ++task) summarise(*args, task / args->num_kv_heads, task % args->num_kv_heads);
}

}  // extern "C"
