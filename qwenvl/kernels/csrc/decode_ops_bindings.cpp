// The Python face of the element-wise decode ops (decode_ops_kernel.hpp): tensor checks, the ISA's
// namespace, torch's threads. Registered into the kernels' module by bindings.cpp (register_decode_ops).
// Baseline x86-64 code, like bindings.cpp: it calls AVX2 / AVX-512 code only for an ISA the caller checked.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <string>
#include <vector>

#include "decode_ops.hpp"
#include "torch_ops.hpp"

namespace {

using qwenvl_kernels::AddRmsNormArgs;
using qwenvl_kernels::PagedDecodeArgs;
using qwenvl_kernels::RotaryArgs;
using qwenvl_kernels::SiluMulArgs;

bool avx512(const std::string& isa) {
  TORCH_CHECK(isa == "avx2" || isa == "avx512", "qwenvl kernels: isa '", isa, "' is not one of avx2, avx512");
  __builtin_cpu_init();
  TORCH_CHECK(isa == "avx2" ? (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
                            : (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                               __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                               __builtin_cpu_supports("avx512vnni")),
              "qwenvl kernels: this CPU lacks ", isa);
  return isa == "avx512";
}

// A CPU float32 / bfloat16 tensor of `dtype` whose last dimension is contiguous.
void check_operand(const torch::Tensor& t, const char* what, torch::ScalarType dtype, int64_t dims) {
  TORCH_CHECK(t.device().is_cpu() && t.dim() == dims && t.stride(dims - 1) == 1,
              "qwenvl decode ops: ", what, " must be a ", dims, "-D CPU tensor with a contiguous last dimension, got ",
              t.sizes(), " strides ", t.strides(), " on ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, "qwenvl decode ops: ", what, " must be ", dtype, " (as x), got ",
              t.scalar_type());
}

void check_dtype(const torch::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 || x.scalar_type() == torch::kBFloat16,
              "qwenvl decode ops: tensors must be float32 or bfloat16, got ", x.scalar_type());
}

// Rows per task so that small calls (a decode step's one row) stay on the calling thread.
int64_t grain_rows(int64_t row_elements) { return std::max<int64_t>(1, (32 << 10) / std::max<int64_t>(1, row_elements)); }

// (sum, y): sum = x + delta, y = weight * rmsnorm(sum); without delta, (x, y) for y = weight * rmsnorm(x).
std::vector<torch::Tensor> add_rms_norm(const torch::Tensor& x, const c10::optional<torch::Tensor>& delta,
                                        const torch::Tensor& weight, double eps, const std::string& isa) {
  const bool wide = avx512(isa);
  check_dtype(x);
  check_operand(x, "x", x.scalar_type(), 2);
  const int64_t rows = x.size(0), D = x.size(1);
  check_operand(weight, "weight", x.scalar_type(), 1);
  TORCH_CHECK(weight.size(0) == D, "qwenvl add_rms_norm: weight has ", weight.size(0), " values for rows of ", D);
  if (delta) {
    check_operand(*delta, "delta", x.scalar_type(), 2);
    TORCH_CHECK(delta->sizes() == x.sizes(), "qwenvl add_rms_norm: delta ", delta->sizes(), " is not x's ", x.sizes());
  }
  auto y = torch::empty({rows, D}, x.options());
  auto sum = delta ? torch::empty({rows, D}, x.options()) : x;
  AddRmsNormArgs args{x.data_ptr(), delta ? delta->data_ptr() : nullptr, weight.data_ptr(),
                      delta ? sum.data_ptr() : nullptr, y.data_ptr(), x.scalar_type() == torch::kBFloat16,
                      rows, D, x.stride(0), delta ? delta->stride(0) : 0, static_cast<float>(eps)};
  auto fn = wide ? qwenvl_avx512::add_rms_norm_rows : qwenvl_avx2::add_rms_norm_rows;
  at::parallel_for(0, rows, grain_rows(D), [&](int64_t begin, int64_t end) { fn(args, begin, end); });
  return {sum, y};
}

// In place on x [rows, >= heads * head_dim]: rotary over its first `heads` heads (cos/sin: first halves).
void rotary_(torch::Tensor x, int64_t heads, int64_t head_dim, const torch::Tensor& cos, const torch::Tensor& sin,
             const std::string& isa) {
  const bool wide = avx512(isa);
  check_dtype(x);
  check_operand(x, "x", x.scalar_type(), 2);
  TORCH_CHECK(head_dim > 0 && head_dim % 2 == 0 && heads >= 0 && heads * head_dim <= x.size(1),
              "qwenvl rotary_: ", heads, " heads of ", head_dim, " do not fit rows of ", x.size(1));
  for (const auto* t : {&cos, &sin}) {
    check_operand(*t, "cos/sin", torch::kFloat32, 2);
    TORCH_CHECK(t->size(0) == x.size(0) && t->size(1) >= head_dim / 2, "qwenvl rotary_: tables ", t->sizes(),
                " for ", x.size(0), " rows of heads of ", head_dim);
  }
  TORCH_CHECK(cos.stride(0) == sin.stride(0), "qwenvl rotary_: cos and sin must share a row stride");
  RotaryArgs args{x.data_ptr(), x.scalar_type() == torch::kBFloat16, x.size(0), x.stride(0), heads, head_dim,
                  cos.data_ptr<float>(), sin.data_ptr<float>(), cos.stride(0)};
  auto fn = wide ? qwenvl_avx512::rotary_rows : qwenvl_avx2::rotary_rows;
  at::parallel_for(0, x.size(0), grain_rows(heads * head_dim), [&](int64_t begin, int64_t end) { fn(args, begin, end); });
}

// gate_up [rows, 2I] -> silu(gate) * up [rows, I].
torch::Tensor silu_mul(const torch::Tensor& gate_up, const std::string& isa) {
  const bool wide = avx512(isa);
  check_dtype(gate_up);
  check_operand(gate_up, "gate_up", gate_up.scalar_type(), 2);
  TORCH_CHECK(gate_up.size(1) % 2 == 0, "qwenvl silu_mul: gate_up's rows have an odd length ", gate_up.size(1));
  const int64_t rows = gate_up.size(0), I = gate_up.size(1) / 2;
  auto y = torch::empty({rows, I}, gate_up.options());
  SiluMulArgs args{gate_up.data_ptr(), y.data_ptr(), gate_up.scalar_type() == torch::kBFloat16, rows,
                   gate_up.stride(0), I};
  auto fn = wide ? qwenvl_avx512::silu_mul_rows : qwenvl_avx2::silu_mul_rows;
  at::parallel_for(0, rows, grain_rows(8 * I), [&](int64_t begin, int64_t end) { fn(args, begin, end); });
  return y;
}

// q [B, Hq, Dh], k_new/v_new [B, Hkv, Dh] (rows may be strided views of one qkv tensor), pools
// [slots, Hkv, Dh] (written: the step's k/v), block_tables int32 [B, max_blocks], context_lens int32 [B]
// -> out [B, Hq, Dh].
torch::Tensor paged_decode_attention(const torch::Tensor& q, const torch::Tensor& k_new, const torch::Tensor& v_new,
                                     torch::Tensor k_pool, torch::Tensor v_pool, const torch::Tensor& block_tables,
                                     const torch::Tensor& context_lens, int64_t block_size, double scale,
                                     const std::string& isa) {
  const bool wide = avx512(isa);
  check_dtype(q);
  const auto dtype = q.scalar_type();
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1 && q.stride(1) == q.size(2),
              "qwenvl paged_decode_attention: q must be [B, Hq, Dh] with contiguous heads, got ", q.sizes(), " strides ", q.strides());
  const int64_t B = q.size(0), Hq = q.size(1), Dh = q.size(2);
  for (const auto* t : {&k_new, &v_new}) {
    TORCH_CHECK(t->dim() == 3 && t->size(0) == B && t->stride(2) == 1 && t->stride(1) == Dh && t->size(2) == Dh &&
                    t->scalar_type() == dtype && t->device().is_cpu(),
                "qwenvl paged_decode_attention: k/v must be [", B, ", Hkv, ", Dh, "] ", dtype, " with contiguous heads, got ",
                t->scalar_type(), " ", t->sizes());
  }
  const int64_t Hkv = k_new.size(1);
  TORCH_CHECK(v_new.size(1) == Hkv && Hkv > 0 && Hq % Hkv == 0, "qwenvl paged_decode_attention: ", Hq,
              " query heads over ", Hkv, " kv heads");
  TORCH_CHECK(Dh % 16 == 0, "qwenvl paged_decode_attention: head_dim ", Dh, " is not a multiple of 16");
  for (const auto* t : {&k_pool, &v_pool}) {
    TORCH_CHECK(t->is_contiguous() && t->device().is_cpu() && t->scalar_type() == dtype && t->dim() == 3 &&
                    t->size(1) == Hkv && t->size(2) == Dh,
                "qwenvl paged_decode_attention: the pool must be contiguous ", dtype, " [slots, ", Hkv, ", ", Dh, "], got ",
                t->scalar_type(), " ", t->sizes());
  }
  TORCH_CHECK(k_pool.sizes() == v_pool.sizes(), "qwenvl paged_decode_attention: k and v pools differ in shape");
  TORCH_CHECK(block_tables.scalar_type() == torch::kInt32 && block_tables.is_contiguous() && block_tables.dim() == 2 &&
                  block_tables.size(0) == B,
              "qwenvl paged_decode_attention: block_tables must be contiguous int32 [", B, ", blocks]");
  TORCH_CHECK(context_lens.scalar_type() == torch::kInt32 && context_lens.is_contiguous() && context_lens.numel() == B,
              "qwenvl paged_decode_attention: context_lens must be contiguous int32 [", B, "]");
  TORCH_CHECK(block_size > 0, "qwenvl paged_decode_attention: block_size must be positive");
  const int32_t* lens = context_lens.data_ptr<int32_t>();
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const int64_t max_blocks = block_tables.size(1), slots = k_pool.size(0);
  int64_t longest = 1;
  for (int64_t b = 0; b < B; ++b) {     // every slot read or written must lie in the pool
    TORCH_CHECK(lens[b] >= 1 && (lens[b] + block_size - 1) / block_size <= max_blocks,
                "qwenvl paged_decode_attention: sequence ", b, " has context ", lens[b], " over ", max_blocks, " blocks");
    for (int64_t i = 0; i < (lens[b] + block_size - 1) / block_size; ++i)
      TORCH_CHECK(tables[b * max_blocks + i] >= 0 && (tables[b * max_blocks + i] + 1) * block_size <= slots,
                  "qwenvl paged_decode_attention: block ", tables[b * max_blocks + i], " is outside the pool");
    longest = std::max<int64_t>(longest, lens[b]);
  }
  auto out = torch::empty({B, Hq, Dh}, q.options());
  PagedDecodeArgs args{q.data_ptr(), k_new.data_ptr(), v_new.data_ptr(), k_pool.data_ptr(), v_pool.data_ptr(),
                       out.data_ptr(), dtype == torch::kBFloat16, tables, lens, B, Hq, Hkv, Dh, block_size,
                       max_blocks, q.stride(0), k_new.stride(0), v_new.stride(0), static_cast<float>(scale)};
  auto fn = wide ? qwenvl_avx512::decode_attention_tasks : qwenvl_avx2::decode_attention_tasks;
  const int64_t scratch = qwenvl_kernels::paged_decode_scratch(Hq / Hkv, Dh, longest);
  // one (sequence, kv head) per task, whole on one thread: the bytes do not depend on the thread count
  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buffer(scratch);
    fn(args, begin, end, buffer.data());
  });
  return out;
}

}  // namespace

// The ops other translation units compose (torch_ops.hpp): the functions above.
namespace qwenvl_ops {
std::vector<torch::Tensor> add_rms_norm(const torch::Tensor& x, const c10::optional<torch::Tensor>& delta,
                                        const torch::Tensor& weight, double eps, const std::string& isa) {
  return ::add_rms_norm(x, delta, weight, eps, isa);
}
void rotary_(torch::Tensor x, int64_t heads, int64_t head_dim, const torch::Tensor& cos, const torch::Tensor& sin,
             const std::string& isa) {
  ::rotary_(x, heads, head_dim, cos, sin, isa);
}
torch::Tensor silu_mul(const torch::Tensor& gate_up, const std::string& isa) { return ::silu_mul(gate_up, isa); }
torch::Tensor paged_decode_attention(const torch::Tensor& q, const torch::Tensor& k_new, const torch::Tensor& v_new,
                                     torch::Tensor k_pool, torch::Tensor v_pool, const torch::Tensor& block_tables,
                                     const torch::Tensor& context_lens, int64_t block_size, double scale,
                                     const std::string& isa) {
  return ::paged_decode_attention(q, k_new, v_new, k_pool, v_pool, block_tables, context_lens, block_size, scale, isa);
}
}  // namespace qwenvl_ops

void register_decode_ops(pybind11::module& m) {
  m.def("add_rms_norm", &add_rms_norm, "x, delta or None, weight, eps, isa -> (x + delta, weight * rmsnorm(x + delta))",
        py::call_guard<py::gil_scoped_release>());
  m.def("rotary_", &rotary_, "x, heads, head_dim, cos, sin, isa: rotary in place on x's first heads",
        py::call_guard<py::gil_scoped_release>());
  m.def("silu_mul", &silu_mul, "gate_up, isa -> silu(gate) * up", py::call_guard<py::gil_scoped_release>());
  m.def("paged_decode_attention", &paged_decode_attention,
        "q, k_new, v_new, k_pool, v_pool, block_tables, context_lens, block_size, scale, isa -> out",
        py::call_guard<py::gil_scoped_release>());
}
