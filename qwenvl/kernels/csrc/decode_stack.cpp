// A dense decoder's decode step in one call from Python: every layer of Qwen2 / Qwen2.5-VL's language model
// (RMSNorm, fused q/k/v, rotary, paged attention, o, residual + RMSNorm, fused gate/up, silu * up, down,
// residual) for a step whose sequences each add one token.
//
// Why: at decode a layer is ~10 kernel calls, and from Python each costs its call, its checks and the module
// code around it, ~15 us on these machines: ~6 ms of a 2B-width token (28 layers) and most of a small model's
// (issues 36 and 37). Here the same ops (torch_ops.hpp: the functions Python calls) run in the same order on
// the same tensors, so the step's bytes are the Python path's; only the interpreter between them is gone.
// The Python side (qwenvl/layers/decode_stack.py) decides when a step may take this path.
#include <torch/extension.h>

#include <string>
#include <tuple>
#include <vector>

#include "torch_ops.hpp"

namespace {

// What a step's call needs besides the activations: the ISAs chosen for this step (kernels/__init__.py).
struct StepSettings {
  std::string isa;            // int4 / int8 products ("avx512" or "avx2")
  std::string bf16_isa;       // bf16 products; "" where qwenvl's bf16 kernel does not run (at::linear instead)
  std::string ops_isa;        // norms, rotary, silu * up, attention
  int64_t passes;             // activation passes of the int4 / int8 products for x's dtype
  int64_t bf16_kernel_rows;   // the bf16 kernel runs up to this many rows, at::linear beyond
};

// One linear's decode product in the form its Python layer hands over (decode_product() in qwenvl/layers).
//   "int8":   weight = tiles, params = scales, bias float32 (the kernel adds it)      Int8Linear
//   "int4":   weight = packed, params = group params, bias added in x's dtype after    Int4Linear
//   "bf16":   weight [N, K] bfloat16, bias bfloat16; the bf16 kernel or at::linear     Bf16DecodeLinear
//   "linear": weight, bias; at::linear                                                  nn.Linear
using ProductSpec = std::tuple<std::string, torch::Tensor, c10::optional<torch::Tensor>, c10::optional<torch::Tensor>,
                               int64_t, int64_t>;     // kind, weight, params, bias, out_features, group_size

constexpr int64_t kKernelRows = 16;     // the int4 / int8 kernels take 1 to 16 rows a call

struct Product {
  enum class Kind { kInt8, kInt4, kBf16, kLinear } kind;
  torch::Tensor weight;
  c10::optional<torch::Tensor> params, bias;
  int64_t out_features, group_size;

  explicit Product(const ProductSpec& spec)
      : weight(std::get<1>(spec)), params(std::get<2>(spec)), bias(std::get<3>(spec)),
        out_features(std::get<4>(spec)), group_size(std::get<5>(spec)) {
    const std::string& name = std::get<0>(spec);
    if (name == "int8") kind = Kind::kInt8;
    else if (name == "int4") kind = Kind::kInt4;
    else if (name == "bf16") kind = Kind::kBf16;
    else if (name == "linear") kind = Kind::kLinear;
    else TORCH_CHECK(false, "qwenvl DecodeStack: unknown product kind '", name, "' (int8, int4, bf16, linear)");
    TORCH_CHECK((kind != Kind::kInt8 && kind != Kind::kInt4) || params,
                "qwenvl DecodeStack: an ", name, " product needs its params");
  }

  // The rows a call takes on this path: Int8Linear runs up to 32 rows as 16-row calls, Int4Linear's kernel
  // takes 16 (beyond, both layers leave the kernels).
  int64_t max_rows() const {
    return kind == Kind::kInt8 ? 2 * kKernelRows : kind == Kind::kInt4 ? kKernelRows : INT64_MAX;
  }

  torch::Tensor run(const torch::Tensor& x, const StepSettings& s) const {
    const int64_t rows = x.size(0);
    switch (kind) {
      case Kind::kInt8: {
        if (rows <= kKernelRows) return qwenvl_ops::int8_matmul(x, weight, *params, bias, out_features, s.passes, s.isa);
        std::vector<torch::Tensor> parts;     // as Int8Linear.forward: 16-row calls, concatenated
        for (const auto& part : x.split(kKernelRows))
          parts.push_back(qwenvl_ops::int8_matmul(part, weight, *params, bias, out_features, s.passes, s.isa));
        return torch::cat(parts);
      }
      case Kind::kInt4: {
        auto y = qwenvl_ops::int4_matmul(x, weight, *params, group_size, out_features, s.passes, s.isa);
        return bias ? y.add_(bias->to(y.scalar_type())) : y;
      }
      case Kind::kBf16:
        if (!s.bf16_isa.empty() && rows <= s.bf16_kernel_rows && x.scalar_type() == torch::kBFloat16)
          return qwenvl_ops::bf16_matmul(x, weight, bias, s.bf16_isa);
        return at::linear(x, weight, bias);
      case Kind::kLinear:
        return at::linear(x, weight, bias);
    }
    TORCH_CHECK(false, "qwenvl DecodeStack: unreachable");
  }
};

using LayerSpec = std::tuple<torch::Tensor, torch::Tensor, double, ProductSpec, ProductSpec, ProductSpec, ProductSpec>;

struct Layer {
  torch::Tensor input_norm, post_attention_norm;
  double eps;
  Product qkv, o, gate_up, down;

  explicit Layer(const LayerSpec& spec)
      : input_norm(std::get<0>(spec)), post_attention_norm(std::get<1>(spec)), eps(std::get<2>(spec)),
        qkv(std::get<3>(spec)), o(std::get<4>(spec)), gate_up(std::get<5>(spec)), down(std::get<6>(spec)) {}
};

class DecodeStack {
 public:
  DecodeStack(const std::vector<LayerSpec>& layers, int64_t heads, int64_t kv_heads, int64_t head_dim)
      : heads_(heads), kv_heads_(kv_heads), head_dim_(head_dim) {
    TORCH_CHECK(!layers.empty() && heads > 0 && kv_heads > 0 && heads % kv_heads == 0 && head_dim > 0,
                "qwenvl DecodeStack: ", layers.size(), " layers of ", heads, " heads over ", kv_heads,
                " kv heads of ", head_dim);
    for (const auto& spec : layers) layers_.emplace_back(spec);
    for (const auto& layer : layers_) {
      TORCH_CHECK(layer.qkv.out_features == (heads + 2 * kv_heads) * head_dim && layer.o.out_features == layer.input_norm.size(0),
                  "qwenvl DecodeStack: a layer's q/k/v or o product does not match its heads");
      for (const Product* p : {&layer.qkv, &layer.o, &layer.gate_up, &layer.down})
        max_rows_ = std::min(max_rows_, p->max_rows());
    }
  }

  int64_t max_rows() const { return max_rows_; }
  int64_t num_layers() const { return static_cast<int64_t>(layers_.size()); }

  // x [B, D]: the step's one new token per sequence (embeddings), cos / sin float32 [B, Dh/2] (the rotary
  // tables' first halves), the pools [slots, Hkv, Dh] of every layer, the step's block tables and context
  // lengths (PagedAttention's kernel tables) -> the last layer's output [B, D] (before the final norm).
  torch::Tensor forward(torch::Tensor x, const torch::Tensor& cos, const torch::Tensor& sin,
                        const std::vector<torch::Tensor>& k_pools, const std::vector<torch::Tensor>& v_pools,
                        const torch::Tensor& block_tables, const torch::Tensor& context_lens, int64_t block_size,
                        double scale, const StepSettings& s) const {
    const int64_t n = x.size(0), hq = heads_, hkv = kv_heads_, dh = head_dim_;
    TORCH_CHECK(x.dim() == 2 && n >= 1 && n <= max_rows_, "qwenvl DecodeStack: x ", x.sizes(), " is not [1..",
                max_rows_, ", D]");
    TORCH_CHECK(k_pools.size() == layers_.size() && v_pools.size() == layers_.size(), "qwenvl DecodeStack: ",
                k_pools.size(), " k pools and ", v_pools.size(), " v pools for ", layers_.size(), " layers");
    for (size_t i = 0; i < layers_.size(); ++i) {
      const Layer& layer = layers_[i];
      // attention: DecoderLayer.forward's self_attn(input_layernorm(x)) (qwenvl/models/qwen2_vl/text.py)
      auto h = qwenvl_ops::add_rms_norm(x, c10::nullopt, layer.input_norm, layer.eps, s.ops_isa)[1];
      auto qkv = layer.qkv.run(h, s);                                               // [B, (Hq + 2 Hkv) Dh]
      qwenvl_ops::rotary_(qkv, hq + hkv, dh, cos, sin, s.ops_isa);                  // q and k, in place
      auto q = qkv.narrow(1, 0, hq * dh).view({n, hq, dh});
      auto k = qkv.narrow(1, hq * dh, hkv * dh).view({n, hkv, dh});
      auto v = qkv.narrow(1, (hq + hkv) * dh, hkv * dh).view({n, hkv, dh});
      auto attended = qwenvl_ops::paged_decode_attention(q, k, v, k_pools[i].view({-1, hkv, dh}),
                                                         v_pools[i].view({-1, hkv, dh}), block_tables, context_lens,
                                                         block_size, scale, s.ops_isa);
      auto o = layer.o.run(attended.view({n, hq * dh}), s);
      // post_attention_layernorm.add_forward, then x + mlp(h)
      auto normed = qwenvl_ops::add_rms_norm(x, o, layer.post_attention_norm, layer.eps, s.ops_isa);
      auto gate_up = layer.gate_up.run(normed[1], s);
      auto down = layer.down.run(qwenvl_ops::silu_mul(gate_up, s.ops_isa), s);
      x = normed[0] + down;
    }
    return x;
  }

 private:
  std::vector<Layer> layers_;
  int64_t heads_, kv_heads_, head_dim_;
  int64_t max_rows_ = INT64_MAX;
};

}  // namespace

void register_decode_stack(pybind11::module& m) {
  pybind11::class_<StepSettings>(m, "DecodeStepSettings")
      .def(pybind11::init<std::string, std::string, std::string, int64_t, int64_t>());
  pybind11::class_<DecodeStack>(m, "DecodeStack")
      .def(pybind11::init<const std::vector<LayerSpec>&, int64_t, int64_t, int64_t>(),
           "layers [(input_norm, post_attention_norm, eps, qkv, o, gate_up, down)], heads, kv_heads, head_dim")
      .def_property_readonly("max_rows", &DecodeStack::max_rows)
      .def_property_readonly("num_layers", &DecodeStack::num_layers)
      .def("forward", &DecodeStack::forward,
           "x, cos, sin, k_pools, v_pools, block_tables, context_lens, block_size, scale, settings -> x",
           pybind11::call_guard<pybind11::gil_scoped_release>());
}
