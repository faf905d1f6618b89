// The Python face of the compiled kernels (module qwenvl_kernels_<hash>, loaded by qwenvl/kernels/build.py):
// checks tensors, picks the ISA namespace, quantises the activations, runs the tiles on torch's threads.
// Compiled for the baseline x86-64 target: it calls AVX2/AVX-512 code only after checking the CPU.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <string>
#include <vector>

#include "kernels.hpp"
#include "torch_ops.hpp"

namespace {

using qwenvl_kernels::ActivationBlocks;
using qwenvl_kernels::Bf16MatmulArgs;
using qwenvl_kernels::Int4MatmulArgs;
using qwenvl_kernels::Int8MatmulArgs;

constexpr int64_t kTileN = 16, kBlockK = 32;

bool cpu_supports(const std::string& feature) {
  __builtin_cpu_init();
  if (feature == "avx2") return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (feature == "avx512")      // what the int4 and int8 kernels' AVX-512 build needs
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512vnni");
  if (feature == "avx512bf16") return __builtin_cpu_supports("avx512bf16");
  TORCH_CHECK(false, "qwenvl kernels: unknown CPU feature '", feature, "' (avx2, avx512, avx512bf16)");
}

enum class Isa { kAvx2, kAvx512 };

Isa checked_isa(const std::string& isa) {
  TORCH_CHECK(isa == "avx2" || isa == "avx512", "qwenvl kernels: isa '", isa, "' is not one of avx2, avx512");
  TORCH_CHECK(cpu_supports(isa), "qwenvl kernels: this CPU lacks ", isa);
  return isa == "avx512" ? Isa::kAvx512 : Isa::kAvx2;
}

void check_activations(const torch::Tensor& x, int64_t block) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.is_contiguous(),
              "qwenvl kernels: x must be a contiguous 2-D CPU tensor, got ", x.sizes(), " on ", x.device());
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 || x.scalar_type() == torch::kBFloat16,
              "qwenvl kernels: x must be float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(block > 0 && block % kBlockK == 0 && x.size(1) % block == 0, "qwenvl kernels: block ", block,
              " must be a multiple of 32 dividing the row length ", x.size(1));
}

// Quantised activations in per-thread buffers reused across calls (a decode step makes hundreds of calls).
struct Scratch {
  std::vector<int8_t> a;
  std::vector<float> d, xs;
};

ActivationBlocks quantize(Isa isa, const torch::Tensor& x, int64_t block, int64_t passes, Scratch& s) {
  TORCH_CHECK(passes >= 1 && passes <= qwenvl_kernels::kMaxPasses, "qwenvl kernels: passes ", passes,
              " is not in 1..", qwenvl_kernels::kMaxPasses);
  const int64_t rows = x.size(0), K = x.size(1), blocks = K / block;
  s.a.resize(rows * passes * K);
  s.d.resize(rows * passes * blocks);
  s.xs.resize(rows * passes * blocks);
  const bool bf16 = x.scalar_type() == torch::kBFloat16;
  auto fn = isa == Isa::kAvx512 ? qwenvl_avx512::quantize_activation_blocks : qwenvl_avx2::quantize_activation_blocks;
  fn(x.data_ptr(), bf16, rows, K, block, passes, s.a.data(), s.d.data(), s.xs.data());
  return {s.a.data(), s.d.data(), s.xs.data(), passes};
}

// (a int8 [rows * passes, K], d float32 [rows * passes, K/block], xs likewise): what int4_matmul uses, for tests.
std::vector<torch::Tensor> quantize_activations(const torch::Tensor& x, int64_t block, int64_t passes,
                                                const std::string& isa) {
  check_activations(x, block);
  Scratch s;
  quantize(checked_isa(isa), x, block, passes, s);
  const int64_t rows = x.size(0) * passes, K = x.size(1), blocks = K / block;
  auto a = torch::from_blob(s.a.data(), {rows, K}, torch::kInt8).clone();
  auto d = torch::from_blob(s.d.data(), {rows, blocks}, torch::kFloat32).clone();
  auto xs = torch::from_blob(s.xs.data(), {rows, blocks}, torch::kFloat32).clone();
  return {a, d, xs};
}

// The form of an int4 weight's group parameters (kernels.hpp), checked against its packed bytes: packed uint8
// [N_pad, K / 2], params float32/bfloat16 [N_pad / 16, K / G, 2, 16] or Q4_K's uint8 super-blocks.
qwenvl_kernels::Int4Params checked_int4_weight(const torch::Tensor& packed, const torch::Tensor& params,
                                               int64_t group_size, int64_t K, int64_t out_features) {
  using qwenvl_kernels::Int4Params;
  using qwenvl_kernels::kSuperBytes;
  using qwenvl_kernels::kSuperK;
  const int64_t tiles = (out_features + kTileN - 1) / kTileN, groups = K / group_size;
  TORCH_CHECK(packed.scalar_type() == torch::kUInt8 && packed.is_contiguous() && packed.dim() == 2 &&
                  packed.size(0) == tiles * kTileN && packed.size(1) == K / 2,
              "qwenvl int4_matmul: packed must be contiguous uint8 [", tiles * kTileN, ", ", K / 2, "], got ",
              packed.scalar_type(), " ", packed.sizes());
  if (params.scalar_type() == torch::kUInt8) {          // Q4_K's super-block form (kernels.hpp)
    TORCH_CHECK(group_size == kBlockK && K % kSuperK == 0 && params.is_contiguous() && params.dim() == 3 &&
                    params.size(0) == tiles && params.size(1) == K / kSuperK && params.size(2) == kSuperBytes,
                "qwenvl int4_matmul: super-block params need group size 32, K a multiple of 256 and contiguous "
                "uint8 [", tiles, ", ", K / kSuperK, ", ", kSuperBytes, "], got group ", group_size, " ",
                params.sizes());
    return Int4Params::kSuperBlocks;
  }
  TORCH_CHECK((params.scalar_type() == torch::kFloat32 || params.scalar_type() == torch::kBFloat16) &&
                  params.is_contiguous() && params.dim() == 4 && params.size(0) == tiles &&
                  params.size(1) == groups && params.size(2) == 2 && params.size(3) == kTileN,
              "qwenvl int4_matmul: params must be contiguous float32/bfloat16 [", tiles, ", ", groups,
              ", 2, 16] or uint8 super-blocks, got ", params.scalar_type(), " ", params.sizes());
  return params.scalar_type() == torch::kBFloat16 ? Int4Params::kBfloat16 : Int4Params::kFloat32;
}

// Output tiles per parallel task: ~64 KB of weights at least, so small products stay on the calling thread.
int64_t int4_tile_grain(int64_t K) { return std::max<int64_t>(1, (64 << 10) / (K * kTileN / 2)); }

// y [rows, N] = x [rows, K] @ W.T in x's dtype, W [N, K] in the int4 tile layout (see kernels.hpp).
torch::Tensor int4_matmul(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& params,
                          int64_t group_size, int64_t out_features, int64_t passes, const std::string& isa_name) {
  const Isa isa = checked_isa(isa_name);
  check_activations(x, group_size);
  const int64_t rows = x.size(0), K = x.size(1);
  const int64_t tiles = (out_features + kTileN - 1) / kTileN;
  TORCH_CHECK(rows >= 1 && rows <= 16, "qwenvl int4_matmul: x has ", rows, " rows; the kernel takes 1 to 16");
  const qwenvl_kernels::Int4Params form = checked_int4_weight(packed, params, group_size, K, out_features);
  thread_local Scratch scratch;
  auto y = torch::empty({rows, out_features}, x.options());
  Int4MatmulArgs args{quantize(isa, x, group_size, passes, scratch),
                      packed.data_ptr<uint8_t>(),
                      params.data_ptr(),
                      form,
                      y.data_ptr(),
                      x.scalar_type() == torch::kBFloat16,
                      rows, K, group_size, out_features};
  auto fn = isa == Isa::kAvx512 ? qwenvl_avx512::int4_matmul_tiles : qwenvl_avx2::int4_matmul_tiles;
  // Each tile is computed whole by one thread, in a fixed order: the result does not depend on the number
  // of threads.
  at::parallel_for(0, tiles, int4_tile_grain(K), [&](int64_t begin, int64_t end) { fn(args, begin, end); });
  return y;
}

// Several int4 weights of one shape, each against one row of x: y[p] = x[rows[p]] @ W_p.T, y [P, N] in x's
// dtype. A MoE layer's chosen experts at decode: x's rows are quantised once, and every (pair, tile) is a
// task of one parallel pass, where a call per expert made 2k passes a layer, each a thread wake-up for a
// product of a few hundred kilobytes. Each y[p] is int4_matmul(x[rows[p]], W_p)'s, bit for bit (rows are
// quantised on their own; a tile is computed whole by one thread).
torch::Tensor int4_matmul_pairs(const torch::Tensor& x, const std::vector<int64_t>& rows,
                                const std::vector<torch::Tensor>& packed, const std::vector<torch::Tensor>& params,
                                int64_t group_size, int64_t out_features, int64_t passes,
                                const std::string& isa_name) {
  const Isa isa = checked_isa(isa_name);
  check_activations(x, group_size);
  const int64_t pairs = static_cast<int64_t>(rows.size()), K = x.size(1), groups = K / group_size;
  const int64_t tiles = (out_features + kTileN - 1) / kTileN;
  TORCH_CHECK(pairs >= 1 && packed.size() == rows.size() && params.size() == rows.size(),
              "qwenvl int4_matmul_pairs: ", rows.size(), " rows, ", packed.size(), " packed and ", params.size(),
              " params: one of each per pair, at least one pair");
  thread_local Scratch scratch;
  const ActivationBlocks a = quantize(isa, x, group_size, passes, scratch);
  auto y = torch::empty({pairs, out_features}, x.options());
  const bool y_bf16 = x.scalar_type() == torch::kBFloat16;
  char* y_bytes = static_cast<char*>(y.data_ptr());
  std::vector<Int4MatmulArgs> args;
  args.reserve(pairs);
  for (int64_t p = 0; p < pairs; ++p) {
    const int64_t r = rows[p];
    TORCH_CHECK(r >= 0 && r < x.size(0), "qwenvl int4_matmul_pairs: pair ", p, " names row ", r, " of x's ",
                x.size(0));
    const qwenvl_kernels::Int4Params form = checked_int4_weight(packed[p], params[p], group_size, K, out_features);
    const ActivationBlocks row{a.a + r * passes * K, a.d + r * passes * groups, a.xs + r * passes * groups, passes};
    args.push_back({row, packed[p].data_ptr<uint8_t>(), params[p].data_ptr(), form,
                    y_bytes + p * out_features * y.element_size(), y_bf16, 1, K, group_size, out_features});
  }
  auto fn = isa == Isa::kAvx512 ? qwenvl_avx512::int4_matmul_tiles : qwenvl_avx2::int4_matmul_tiles;
  at::parallel_for(0, pairs * tiles, int4_tile_grain(K), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end;) {              // a task may span the end of one pair and the next
      const int64_t p = i / tiles, t0 = i % tiles, t1 = std::min(tiles, t0 + (end - i));
      fn(args[p], t0, t1);
      i += t1 - t0;
    }
  });
  return y;
}

// y [rows, N] = x [rows, K] @ (q * scale).T (+ bias) in x's dtype, q in the int8 tile layout (kernels.hpp).
// A row length that is not a multiple of 32 is padded with zeros here (the tiles are padded alike).
torch::Tensor int8_matmul(const torch::Tensor& x, const torch::Tensor& tiles, const torch::Tensor& scales,
                          const c10::optional<torch::Tensor>& bias, int64_t out_features, int64_t passes,
                          const std::string& isa_name) {
  const Isa isa = checked_isa(isa_name);
  TORCH_CHECK(x.dim() == 2, "qwenvl int8_matmul: x must be 2-D, got ", x.sizes());
  const int64_t rows = x.size(0), k = x.size(1), k_pad = (k + kBlockK - 1) / kBlockK * kBlockK;
  const int64_t tiles_n = (out_features + kTileN - 1) / kTileN;
  TORCH_CHECK(rows >= 1 && rows <= 16, "qwenvl int8_matmul: x has ", rows, " rows; the kernel takes 1 to 16");
  TORCH_CHECK(tiles.scalar_type() == torch::kInt8 && tiles.is_contiguous() && tiles.dim() == 4 &&
                  tiles.size(0) == tiles_n && tiles.size(1) == k_pad / 4 && tiles.size(2) == kTileN &&
                  tiles.size(3) == 4,
              "qwenvl int8_matmul: tiles must be contiguous int8 [", tiles_n, ", ", k_pad / 4, ", 16, 4], got ",
              tiles.scalar_type(), " ", tiles.sizes());
  TORCH_CHECK(scales.scalar_type() == torch::kFloat32 && scales.is_contiguous() && scales.dim() == 1 &&
                  scales.size(0) == tiles_n * kTileN,
              "qwenvl int8_matmul: scales must be contiguous float32 [", tiles_n * kTileN, "], got ",
              scales.scalar_type(), " ", scales.sizes());
  TORCH_CHECK(!bias || (bias->scalar_type() == torch::kFloat32 && bias->is_contiguous() &&
                        bias->numel() == out_features),
              "qwenvl int8_matmul: bias must be contiguous float32 [", out_features, "]");
  const torch::Tensor xp = k == k_pad ? x.contiguous()
                                      : torch::constant_pad_nd(x, {0, k_pad - k}, 0).contiguous();
  check_activations(xp, kBlockK);
  thread_local Scratch scratch;
  thread_local std::vector<int32_t> block_sums;
  const ActivationBlocks a = quantize(isa, xp, kBlockK, passes, scratch);
  block_sums.resize(rows * passes * (k_pad / kBlockK));
  (isa == Isa::kAvx512 ? qwenvl_avx512::activation_block_sums : qwenvl_avx2::activation_block_sums)(
      a.a, rows * passes, k_pad, block_sums.data());
  auto y = torch::empty({rows, out_features}, x.options());
  Int8MatmulArgs args{a, block_sums.data(), tiles.data_ptr<int8_t>(), scales.data_ptr<float>(),
                      bias ? bias->data_ptr<float>() : nullptr, y.data_ptr(),
                      x.scalar_type() == torch::kBFloat16, rows, k_pad, out_features};
  auto fn = isa == Isa::kAvx512 ? qwenvl_avx512::int8_matmul_tiles : qwenvl_avx2::int8_matmul_tiles;
  // one tile whole per thread, in a fixed order (the thread count does not change the bytes); a grain of
  // ~64 KB of weights keeps small products on the calling thread
  const int64_t grain = std::max<int64_t>(1, (64 << 10) / (k_pad * kTileN));
  at::parallel_for(0, tiles_n, grain, [&](int64_t begin, int64_t end) { fn(args, begin, end); });
  return y;
}

// y [rows, N] = x [rows, K] @ W.T (+ bias), all bfloat16, W [N, K] as nn.Linear holds it (rows contiguous).
// isa "avx512" needs AVX512_BF16 (cpu_supports("avx512bf16")); "avx2" runs anywhere with AVX2 + FMA.
torch::Tensor bf16_matmul(const torch::Tensor& x, const torch::Tensor& weight, const c10::optional<torch::Tensor>& bias,
                          const std::string& isa_name) {
  const Isa isa = checked_isa(isa_name);
  TORCH_CHECK(isa != Isa::kAvx512 || cpu_supports("avx512bf16"), "qwenvl bf16_matmul: this CPU lacks AVX512_BF16");
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.stride(1) == 1 && x.scalar_type() == torch::kBFloat16,
              "qwenvl bf16_matmul: x must be a 2-D bfloat16 CPU tensor with contiguous rows, got ",
              x.scalar_type(), " ", x.sizes());
  TORCH_CHECK(x.size(0) >= 1 && x.size(0) <= 16, "qwenvl bf16_matmul: x has ", x.size(0), " rows; the kernel takes 1 to 16");
  TORCH_CHECK(weight.device().is_cpu() && weight.dim() == 2 && weight.stride(1) == 1 &&
                  weight.scalar_type() == torch::kBFloat16 && weight.size(1) == x.size(1),
              "qwenvl bf16_matmul: weight must be a bfloat16 [N, ", x.size(1), "] CPU tensor with contiguous rows, got ",
              weight.scalar_type(), " ", weight.sizes());
  TORCH_CHECK(!bias || (bias->scalar_type() == torch::kBFloat16 && bias->is_contiguous() &&
                        bias->numel() == weight.size(0)),
              "qwenvl bf16_matmul: bias must be contiguous bfloat16 [", weight.size(0), "]");
  const int64_t rows = x.size(0), k = x.size(1), n = weight.size(0);
  auto y = torch::empty({rows, n}, x.options());
  Bf16MatmulArgs args{reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()),
                      reinterpret_cast<const uint16_t*>(weight.data_ptr<at::BFloat16>()),
                      bias ? reinterpret_cast<const uint16_t*>(bias->data_ptr<at::BFloat16>()) : nullptr,
                      reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>()), x.stride(0), weight.stride(0),
                      rows, k, n};
  auto fn = isa == Isa::kAvx512 ? qwenvl_avx512bf16::bf16_matmul_rows : qwenvl_avx2::bf16_matmul_rows;
  // chunks of 16 outputs, each whole on one thread; ~64 KB of weights per task at least
  constexpr int64_t kChunk = 16;
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  const int64_t grain = std::max<int64_t>(1, (64 << 10) / (k * kChunk * 2));
  at::parallel_for(0, chunks, grain, [&](int64_t begin, int64_t end) {
    fn(args, begin * kChunk, std::min(n, end * kChunk));
  });
  return y;
}

// Rows r0:r1 of the int8 tiles [T, K_pad/4, 16, 4] into out bfloat16 [r1 - r0, K] (prefill's scratch).
void int8_rows_to_bf16(const torch::Tensor& tiles, int64_t r0, int64_t r1, torch::Tensor out) {
  TORCH_CHECK(tiles.device().is_cpu() && tiles.dim() == 4 && tiles.is_contiguous() &&
              tiles.scalar_type() == torch::kInt8 && tiles.size(2) == kTileN && tiles.size(3) == 4,
              "qwenvl kernels: tiles must be contiguous int8 [T, K/4, 16, 4], got ", tiles.sizes());
  TORCH_CHECK(out.device().is_cpu() && out.dim() == 2 && out.is_contiguous() &&
              out.scalar_type() == torch::kBFloat16, "qwenvl kernels: out must be a contiguous bfloat16 matrix");
  const int64_t K = out.size(1), k4_blocks = tiles.size(1);
  TORCH_CHECK(0 <= r0 && r0 <= r1 && r1 <= tiles.size(0) * kTileN && out.size(0) == r1 - r0 && K <= 4 * k4_blocks,
              "qwenvl kernels: rows ", r0, ":", r1, " into out ", out.sizes(), " do not fit tiles ", tiles.sizes());
  const int8_t* t = tiles.data_ptr<int8_t>();
  uint16_t* o = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  at::parallel_for(r0 / kTileN, (r1 + kTileN - 1) / kTileN, 1, [&](int64_t begin, int64_t end) {
    qwenvl_kernels::int8_tiles_to_bf16_rows(t, k4_blocks, begin, end, r0, r1, K, o);
  });
}

// A Q4_K tensor's blocks uint8 [rows, K / 256 * 144] into packed uint8 [N_pad, K / 2] and params uint8
// [N_pad / 16, K / 256, 320] (allocated by the caller, on 2 MiB pages): the int4 tile layout with super-block
// parameters (int4_layout.py).
void q4_k_to_tiles(const torch::Tensor& blocks, int64_t in_features, torch::Tensor packed, torch::Tensor params) {
  using qwenvl_kernels::kSuperBytes;
  using qwenvl_kernels::kSuperK;
  const int64_t K = in_features;
  TORCH_CHECK(K > 0 && K % kSuperK == 0, "qwenvl q4_k_to_tiles: in_features ", K, " is not a multiple of 256");
  TORCH_CHECK(blocks.device().is_cpu() && blocks.scalar_type() == torch::kUInt8 && blocks.dim() == 2 &&
                  blocks.is_contiguous() && blocks.size(1) == K / kSuperK * 144,
              "qwenvl q4_k_to_tiles: blocks must be contiguous uint8 [rows, ", K / kSuperK * 144, "], got ",
              blocks.scalar_type(), " ", blocks.sizes());
  const int64_t rows = blocks.size(0), tiles = (rows + kTileN - 1) / kTileN;
  TORCH_CHECK(packed.scalar_type() == torch::kUInt8 && packed.is_contiguous() && packed.dim() == 2 &&
                  packed.size(0) == tiles * kTileN && packed.size(1) == K / 2 &&
                  params.scalar_type() == torch::kUInt8 && params.is_contiguous() && params.dim() == 3 &&
                  params.size(0) == tiles && params.size(1) == K / kSuperK && params.size(2) == kSuperBytes,
              "qwenvl q4_k_to_tiles: outputs must be contiguous uint8 [", tiles * kTileN, ", ", K / 2, "] and [",
              tiles, ", ", K / kSuperK, ", ", kSuperBytes, "], got ", packed.sizes(), " and ", params.sizes());
  const uint8_t* b = blocks.data_ptr<uint8_t>();
  uint8_t* pk = packed.data_ptr<uint8_t>();
  uint8_t* pr = params.data_ptr<uint8_t>();
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    qwenvl_kernels::q4_k_to_tiles(b, rows, K, begin, end, pk, pr);
  });
}

void check_q6_k_blocks(const torch::Tensor& blocks, int64_t K, const char* op) {
  using qwenvl_kernels::kQ6KBytes;
  using qwenvl_kernels::kSuperK;
  TORCH_CHECK(K > 0 && K % kSuperK == 0, "qwenvl ", op, ": in_features ", K, " is not a multiple of 256");
  TORCH_CHECK(blocks.device().is_cpu() && blocks.scalar_type() == torch::kUInt8 && blocks.dim() == 2 &&
                  blocks.is_contiguous() && blocks.size(1) == K / kSuperK * kQ6KBytes,
              "qwenvl ", op, ": blocks must be contiguous uint8 [rows, ", K / kSuperK * kQ6KBytes, "], got ",
              blocks.scalar_type(), " ", blocks.sizes());
}

// A Q6_K tensor's blocks uint8 [rows, K / 256 * 210] -> its values float32 [rows, K] (gguf's to the bit).
torch::Tensor q6_k_dequantize(const torch::Tensor& blocks, int64_t in_features) {
  const int64_t K = in_features;
  check_q6_k_blocks(blocks, K, "q6_k_dequantize");
  const int64_t rows = blocks.size(0);
  auto out = torch::empty({rows, K}, torch::kFloat32);
  const uint8_t* b = blocks.data_ptr<uint8_t>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    qwenvl_kernels::q6_k_rows(b, K, begin, end, o + begin * K);
  });
  return out;
}

// A Q6_K tensor's blocks into packed uint8 [N_pad, K / 2] and params [N_pad / 16, K / G, 2, 16] bfloat16 or
// float32 (allocated by the caller): the int4 tile layout of its values quantised in groups of G, bfloat16
// params meaning a bfloat16 model (the values rounded to bfloat16 first).
void q6_k_to_int4_tiles(const torch::Tensor& blocks, int64_t in_features, int64_t group_size, torch::Tensor packed,
                        torch::Tensor params) {
  const int64_t K = in_features, G = group_size;
  check_q6_k_blocks(blocks, K, "q6_k_to_int4_tiles");
  TORCH_CHECK(G > 0 && G % kBlockK == 0 && K % G == 0, "qwenvl q6_k_to_int4_tiles: group size ", G,
              " must be a multiple of 32 dividing ", K);
  const int64_t rows = blocks.size(0), tiles = (rows + kTileN - 1) / kTileN;
  const bool bf16 = params.scalar_type() == torch::kBFloat16;
  TORCH_CHECK(packed.scalar_type() == torch::kUInt8 && packed.is_contiguous() && packed.dim() == 2 &&
                  packed.size(0) == tiles * kTileN && packed.size(1) == K / 2 &&
                  (bf16 || params.scalar_type() == torch::kFloat32) && params.is_contiguous() &&
                  params.dim() == 4 && params.size(0) == tiles && params.size(1) == K / G && params.size(2) == 2 &&
                  params.size(3) == kTileN,
              "qwenvl q6_k_to_int4_tiles: outputs must be contiguous uint8 [", tiles * kTileN, ", ", K / 2,
              "] and bfloat16 or float32 [", tiles, ", ", K / G, ", 2, 16], got ", packed.sizes(), " and ",
              params.scalar_type(), " ", params.sizes());
  const uint8_t* b = blocks.data_ptr<uint8_t>();
  uint8_t* pk = packed.data_ptr<uint8_t>();
  void* pr = params.data_ptr();
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    qwenvl_kernels::q6_k_to_int4_tiles(b, rows, K, G, bf16, begin, end, pk, pr);
  });
}

}  // namespace

// The ops other translation units compose (torch_ops.hpp): the functions above.
namespace qwenvl_ops {
torch::Tensor int8_matmul(const torch::Tensor& x, const torch::Tensor& tiles, const torch::Tensor& scales,
                          const c10::optional<torch::Tensor>& bias, int64_t out_features, int64_t passes,
                          const std::string& isa) {
  return ::int8_matmul(x, tiles, scales, bias, out_features, passes, isa);
}
torch::Tensor int4_matmul(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& params,
                          int64_t group_size, int64_t out_features, int64_t passes, const std::string& isa) {
  return ::int4_matmul(x, packed, params, group_size, out_features, passes, isa);
}
torch::Tensor int4_matmul_pairs(const torch::Tensor& x, const std::vector<int64_t>& rows,
                               const std::vector<torch::Tensor>& packed, const std::vector<torch::Tensor>& params,
                               int64_t group_size, int64_t out_features, int64_t passes, const std::string& isa) {
  return ::int4_matmul_pairs(x, rows, packed, params, group_size, out_features, passes, isa);
}
torch::Tensor bf16_matmul(const torch::Tensor& x, const torch::Tensor& weight, const c10::optional<torch::Tensor>& bias,
                          const std::string& isa) {
  return ::bf16_matmul(x, weight, bias, isa);
}
}  // namespace qwenvl_ops

void register_decode_ops(pybind11::module& m);     // decode_ops_bindings.cpp
void register_decode_stack(pybind11::module& m);   // decode_stack.cpp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "qwenvl's CPU kernels for quantised decode (qwenvl/kernels)";
  m.def("cpu_supports", &cpu_supports, "whether this CPU has a feature set: avx2, avx512, avx512bf16");
  m.def("quantize_activations", &quantize_activations, "x, block, passes, isa -> (a int8, d, xs)",
        py::call_guard<py::gil_scoped_release>());
  m.def("int4_matmul", &int4_matmul, "x, packed, params, group_size, out_features, passes, isa -> y",
        py::call_guard<py::gil_scoped_release>());
  m.def("int4_matmul_pairs", &int4_matmul_pairs,
        "x, rows, packed list, params list, group_size, out_features, passes, isa -> y[p] = x[rows[p]] @ W_p.T",
        py::call_guard<py::gil_scoped_release>());
  m.def("int8_matmul", &int8_matmul, "x, tiles, scales, bias, out_features, passes, isa -> y",
        py::call_guard<py::gil_scoped_release>());
  m.def("int8_rows_to_bf16", &int8_rows_to_bf16, "tiles, r0, r1, out: rows r0:r1 as bfloat16 into out",
        py::call_guard<py::gil_scoped_release>());
  m.def("q4_k_to_tiles", &q4_k_to_tiles, "blocks, in_features, packed, params: the tile layout into them",
        py::call_guard<py::gil_scoped_release>());
  m.def("q6_k_dequantize", &q6_k_dequantize, "blocks, in_features -> float32 values",
        py::call_guard<py::gil_scoped_release>());
  m.def("q6_k_to_int4_tiles", &q6_k_to_int4_tiles, "blocks, in_features, group_size, packed, params: int4 tiles",
        py::call_guard<py::gil_scoped_release>());
  m.def("bf16_matmul", &bf16_matmul, "x, weight, bias, isa -> y", py::call_guard<py::gil_scoped_release>());
  register_decode_ops(m);
  register_decode_stack(m);
}
