// A decoder's decode step in one call from Python: every layer of a Qwen2 / 2.5 / 3-VL language model (RMSNorm,
// fused q/k/v, Qwen3's q/k norms, rotary, paged attention, o, residual + RMSNorm, the MLP: fused gate/up, silu *
// up, down, or Qwen3-VL-MoE's router and chosen experts, residual) for a step whose sequences each add one token.
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
// and the most rows the layer's forward runs this way (0: any), a limit the Python layer owns.
using ProductSpec = std::tuple<std::string, torch::Tensor, c10::optional<torch::Tensor>, c10::optional<torch::Tensor>,
                               int64_t, int64_t, int64_t>;  // kind, weight, params, bias, out_features, group, max rows

constexpr int64_t kKernelRows = 16;     // the int4 / int8 kernels take 1 to 16 rows a call

struct Product {
  enum class Kind { kInt8, kInt4, kBf16, kLinear } kind;
  torch::Tensor weight;
  c10::optional<torch::Tensor> params, bias;
  int64_t out_features, group_size, rows_limit;

  explicit Product(const ProductSpec& spec)
      : weight(std::get<1>(spec)), params(std::get<2>(spec)), bias(std::get<3>(spec)),
        out_features(std::get<4>(spec)), group_size(std::get<5>(spec)),
        rows_limit(std::get<6>(spec) > 0 ? std::get<6>(spec) : INT64_MAX) {
    const std::string& name = std::get<0>(spec);
    if (name == "int8") kind = Kind::kInt8;
    else if (name == "int4") kind = Kind::kInt4;
    else if (name == "bf16") kind = Kind::kBf16;
    else if (name == "linear") kind = Kind::kLinear;
    else TORCH_CHECK(false, "qwenvl DecodeStack: unknown product kind '", name, "' (int8, int4, bf16, linear)");
    TORCH_CHECK((kind != Kind::kInt8 && kind != Kind::kInt4) || params,
                "qwenvl DecodeStack: an ", name, " product needs its params");
    TORCH_CHECK(kind != Kind::kInt4 || rows_limit <= kKernelRows, "qwenvl DecodeStack: the int4 kernel takes ",
                kKernelRows, " rows a call, not ", rows_limit);
  }

  // The rows a call takes on this path (Int8Linear runs more than 16 as 16-row calls; beyond its limit a layer
  // leaves the kernels, and the step the stack).
  int64_t max_rows() const { return rows_limit; }

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

// Rotary as qwenvl/layers/rotary.py's `rotate` computes it (Qwen3's q/k, which are normed first, take this
// path there rather than the in-place kernel): the same ATen ops in the same order, so the same bytes.
torch::Tensor rotate(const torch::Tensor& x, const torch::Tensor& c, const torch::Tensor& s) {
  const int64_t half = x.size(-1) / 2;
  const auto xf = x.to(torch::kFloat32);
  const auto x1 = xf.narrow(-1, 0, half), x2 = xf.narrow(-1, half, half);
  auto r1 = (x1 * c).sub_(x2 * s);
  auto r2 = (x2 * c).add_(x1 * s);
  return torch::cat({r1, r2}, -1).to(x.scalar_type());
}

// RMSNorm.forward of a [..., D] tensor through the kernel (qwenvl/layers/norms.py).
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps, const StepSettings& s) {
  return qwenvl_ops::add_rms_norm(x.reshape({-1, x.size(-1)}), c10::nullopt, weight, eps, s.ops_isa)[1].view(x.sizes());
}

// A layer's MLP at decode: qwenvl/models' dense MLP (fused gate/up) or the Qwen3-VL-MoE block
// (qwenvl/layers/moe.py, quantized_moe.py), each as its module's decode path computes it.
struct Mlp {
  enum class Kind { kDense, kMoePairs, kMoeFloat } kind = Kind::kDense;
  std::vector<Product> products;            // dense: gate_up, down; MoE: the router
  int64_t top_k = 0;
  // kMoePairs: every expert's int4 gate/up and down (QuantizedExperts' pair kernel path)
  std::vector<torch::Tensor> gate_up_packed, gate_up_params, down_packed, down_params;
  int64_t gate_up_group = 0, down_group = 0, gate_up_out = 0, down_out = 0;
  // kMoeFloat: Experts' fused [E, 2I, H] and [E, H, I] weights (its gathered path)
  torch::Tensor gate_up_proj, down_proj;
  int64_t max_pairs = 0;                    // MoE: the (token, expert) pairs the experts' decode path takes

  int64_t max_rows() const {
    if (kind == Kind::kDense) return std::min(products[0].max_rows(), products[1].max_rows());
    return std::min(products[0].max_rows(), max_pairs / top_k);
  }

  torch::Tensor run(const torch::Tensor& h, const StepSettings& s) const {
    if (kind == Kind::kDense)
      return products[1].run(qwenvl_ops::silu_mul(products[0].run(h, s), s.ops_isa), s);
    // route(): softmax in float32, top-k, the k weights renormalised, in the logits' dtype
    const auto logits = products[0].run(h, s);
    const auto probs = at::softmax(logits, -1, torch::kFloat32);
    auto [top, ids] = at::topk(probs, top_k, -1);
    top = (top / top.sum(-1, true)).to(logits.scalar_type());
    return kind == Kind::kMoePairs ? by_pair(h, top, ids, s) : gathered(h, top, ids);
  }

  // QuantizedExperts._by_pair: all chosen gate/up products in one call, silu * up, all down products, the k
  // terms summed in float32.
  torch::Tensor by_pair(const torch::Tensor& x, const torch::Tensor& weights, const torch::Tensor& ids,
                        const StepSettings& s) const {
    const int64_t tokens = ids.size(0), k = ids.size(1), pairs = tokens * k;
    const auto flat = ids.reshape({-1}).contiguous();
    const int64_t* chosen = flat.data_ptr<int64_t>();
    std::vector<int64_t> rows(pairs), own(pairs);
    std::vector<torch::Tensor> gu_packed(pairs), gu_params(pairs), dn_packed(pairs), dn_params(pairs);
    for (int64_t p = 0; p < pairs; ++p) {
      const int64_t e = chosen[p];
      TORCH_CHECK(e >= 0 && e < static_cast<int64_t>(gate_up_packed.size()), "qwenvl DecodeStack: expert ", e);
      rows[p] = p / k;
      own[p] = p;
      gu_packed[p] = gate_up_packed[e];
      gu_params[p] = gate_up_params[e];
      dn_packed[p] = down_packed[e];
      dn_params[p] = down_params[e];
    }
    const auto gate_up = qwenvl_ops::int4_matmul_pairs(x, rows, gu_packed, gu_params, gate_up_group, gate_up_out,
                                                       s.passes, s.isa);
    const auto h = qwenvl_ops::silu_mul(gate_up, s.ops_isa);
    const auto y = qwenvl_ops::int4_matmul_pairs(h, own, dn_packed, dn_params, down_group, down_out, s.passes, s.isa);
    return (y.to(torch::kFloat32).view({tokens, k, -1}) * weights.to(torch::kFloat32).unsqueeze(-1))
        .sum(1)
        .to(x.scalar_type());
  }

  // Experts._gathered: each (token, expert) pair's two products on views of the fused weights, the k terms
  // summed in float32 in the router's order; a weight of 0 (another rank's expert) is skipped.
  torch::Tensor gathered(const torch::Tensor& x, const torch::Tensor& weights, const torch::Tensor& ids) const {
    const int64_t intermediate = down_proj.size(2);
    auto out = torch::zeros(x.sizes(), x.options().dtype(torch::kFloat32));
    const auto w = weights.to(torch::kFloat64).contiguous();
    const auto e = ids.contiguous();
    const double* wp = w.data_ptr<double>();
    const int64_t* ep = e.data_ptr<int64_t>();
    const int64_t k = ids.size(1);
    for (int64_t t = 0; t < ids.size(0); ++t) {
      const auto row = x.narrow(0, t, 1);
      for (int64_t j = 0; j < k; ++j) {
        const double weight = wp[t * k + j];
        if (weight == 0) continue;
        const auto gate_up = at::linear(row, gate_up_proj.select(0, ep[t * k + j]));
        const auto h = at::silu(gate_up.narrow(-1, 0, intermediate)) * gate_up.narrow(-1, intermediate, intermediate);
        out.narrow(0, t, 1).add_(at::linear(h, down_proj.select(0, ep[t * k + j])).to(torch::kFloat32) * weight);
      }
    }
    return out.to(x.scalar_type());
  }
};

struct Layer {
  torch::Tensor input_norm, post_attention_norm;
  double eps;
  std::vector<Product> products;                  // q/k/v, o
  c10::optional<torch::Tensor> q_norm, k_norm;    // Qwen3: RMSNorm over each head before rotary
  double qk_eps = 0;
  Mlp mlp;
};

class DecodeStack {
 public:
  DecodeStack(int64_t heads, int64_t kv_heads, int64_t head_dim)
      : heads_(heads), kv_heads_(kv_heads), head_dim_(head_dim) {
    TORCH_CHECK(heads > 0 && kv_heads > 0 && heads % kv_heads == 0 && head_dim > 0 && head_dim % 2 == 0,
                "qwenvl DecodeStack: ", heads, " heads over ", kv_heads, " kv heads of ", head_dim);
  }

  // A layer's attention half (its MLP follows with one of the set_* calls); returns its index.
  int64_t add_layer(const torch::Tensor& input_norm, const torch::Tensor& post_attention_norm, double eps,
                    const ProductSpec& qkv, const ProductSpec& o, const c10::optional<torch::Tensor>& q_norm,
                    const c10::optional<torch::Tensor>& k_norm, double qk_eps) {
    Layer layer{input_norm, post_attention_norm, eps, {Product(qkv), Product(o)}, q_norm, k_norm, qk_eps, {}};
    TORCH_CHECK(layer.products[0].out_features == (heads_ + 2 * kv_heads_) * head_dim_ &&
                    layer.products[1].out_features == input_norm.size(0),
                "qwenvl DecodeStack: a layer's q/k/v or o product does not match its heads");
    TORCH_CHECK(q_norm.has_value() == k_norm.has_value(), "qwenvl DecodeStack: q and k norms come together");
    layers_.push_back(std::move(layer));
    return static_cast<int64_t>(layers_.size()) - 1;
  }

  void set_dense_mlp(int64_t i, const ProductSpec& gate_up, const ProductSpec& down) {
    Mlp& mlp = layer(i).mlp;
    mlp.kind = Mlp::Kind::kDense;
    mlp.products = {Product(gate_up), Product(down)};
  }

  void set_moe_pairs(int64_t i, const ProductSpec& router, int64_t top_k, std::vector<torch::Tensor> gate_up_packed,
                     std::vector<torch::Tensor> gate_up_params, int64_t gate_up_group, int64_t gate_up_out,
                     std::vector<torch::Tensor> down_packed, std::vector<torch::Tensor> down_params,
                     int64_t down_group, int64_t down_out, int64_t max_pairs) {
    TORCH_CHECK(top_k >= 1 && !gate_up_packed.empty() && gate_up_params.size() == gate_up_packed.size() &&
                    down_packed.size() == gate_up_packed.size() && down_params.size() == gate_up_packed.size(),
                "qwenvl DecodeStack: a MoE layer needs top_k >= 1 and the packed and params of every expert");
    Mlp& mlp = layer(i).mlp;
    mlp.kind = Mlp::Kind::kMoePairs;
    mlp.products = {Product(router)};
    mlp.top_k = top_k;
    mlp.gate_up_packed = std::move(gate_up_packed);
    mlp.gate_up_params = std::move(gate_up_params);
    mlp.down_packed = std::move(down_packed);
    mlp.down_params = std::move(down_params);
    mlp.gate_up_group = gate_up_group;
    mlp.gate_up_out = gate_up_out;
    mlp.down_group = down_group;
    mlp.down_out = down_out;
    mlp.max_pairs = max_pairs;
  }

  void set_moe_float(int64_t i, const ProductSpec& router, int64_t top_k, const torch::Tensor& gate_up_proj,
                     const torch::Tensor& down_proj, int64_t max_pairs) {
    TORCH_CHECK(top_k >= 1 && gate_up_proj.dim() == 3 && down_proj.dim() == 3 &&
                    gate_up_proj.size(1) == 2 * down_proj.size(2),
                "qwenvl DecodeStack: a MoE layer's experts must be [E, 2I, H] and [E, H, I]");
    Mlp& mlp = layer(i).mlp;
    mlp.kind = Mlp::Kind::kMoeFloat;
    mlp.products = {Product(router)};
    mlp.top_k = top_k;
    mlp.gate_up_proj = gate_up_proj;
    mlp.down_proj = down_proj;
    mlp.max_pairs = max_pairs;
  }

  // The most sequences a step may have: what every product and MoE path takes (beyond, the layers' own
  // forwards leave the kernels, so the stack is not used).
  int64_t max_rows() const {
    int64_t rows = INT64_MAX;
    for (const auto& layer : layers_) {
      TORCH_CHECK(!layer.mlp.products.empty(), "qwenvl DecodeStack: a layer has no MLP");
      rows = std::min({rows, layer.products[0].max_rows(), layer.products[1].max_rows(), layer.mlp.max_rows()});
    }
    return layers_.empty() ? 0 : rows;
  }

  int64_t num_layers() const { return static_cast<int64_t>(layers_.size()); }

  // x [B, D]: the step's one new token per sequence (embeddings), cos / sin float32 [B, 1, Dh/2] (the rotary
  // tables' first halves, `rotary_halves`), the pools [blocks, block_size, Hkv, Dh] of every layer, the step's
  // block tables and context lengths (PagedAttention's kernel tables) -> the last layer's output [B, D]
  // (before the final norm).
  torch::Tensor forward(torch::Tensor x, const torch::Tensor& cos, const torch::Tensor& sin,
                        const std::vector<torch::Tensor>& k_pools, const std::vector<torch::Tensor>& v_pools,
                        const torch::Tensor& block_tables, const torch::Tensor& context_lens, int64_t block_size,
                        double scale, const StepSettings& s) const {
    const int64_t n = x.size(0), hq = heads_, hkv = kv_heads_, dh = head_dim_;
    TORCH_CHECK(x.dim() == 2 && n >= 1 && n <= max_rows(), "qwenvl DecodeStack: x ", x.sizes(), " is not [1..",
                max_rows(), ", D]");
    TORCH_CHECK(k_pools.size() == layers_.size() && v_pools.size() == layers_.size(), "qwenvl DecodeStack: ",
                k_pools.size(), " k pools and ", v_pools.size(), " v pools for ", layers_.size(), " layers");
    TORCH_CHECK(cos.dim() == 3 && sin.dim() == 3, "qwenvl DecodeStack: cos / sin must be [B, 1, Dh/2]");
    const auto cos2 = cos.flatten(1), sin2 = sin.flatten(1);
    for (size_t i = 0; i < layers_.size(); ++i) {
      const Layer& layer = layers_[i];
      // the attention half: DecoderLayer.forward's self_attn(input_layernorm(x)) (qwenvl/models/*/text.py)
      const auto h = rms_norm(x, layer.input_norm, layer.eps, s);
      auto qkv = layer.products[0].run(h, s);                                   // [B, (Hq + 2 Hkv) Dh]
      torch::Tensor q, k;
      const auto v = qkv.narrow(1, (hq + hkv) * dh, hkv * dh).view({n, hkv, dh});
      if (layer.q_norm) {      // Qwen3: q and k normed per head, then rotated by rotary.rotate
        q = rotate(rms_norm(qkv.narrow(1, 0, hq * dh).view({n, hq, dh}), *layer.q_norm, layer.qk_eps, s), cos, sin);
        k = rotate(rms_norm(qkv.narrow(1, hq * dh, hkv * dh).view({n, hkv, dh}), *layer.k_norm, layer.qk_eps, s),
                   cos, sin);
      } else {                 // Qwen2: q and k rotated in place in the fused output (rotary.rotate_heads)
        qwenvl_ops::rotary_(qkv, hq + hkv, dh, cos2, sin2, s.ops_isa);
        q = qkv.narrow(1, 0, hq * dh).view({n, hq, dh});
        k = qkv.narrow(1, hq * dh, hkv * dh).view({n, hkv, dh});
      }
      const auto attended = qwenvl_ops::paged_decode_attention(q, k, v, k_pools[i].view({-1, hkv, dh}),
                                                               v_pools[i].view({-1, hkv, dh}), block_tables,
                                                               context_lens, block_size, scale, s.ops_isa);
      const auto o = layer.products[1].run(attended.view({n, hq * dh}), s);
      // post_attention_layernorm.add_forward, then x + mlp(h)
      const auto normed = qwenvl_ops::add_rms_norm(x, o, layer.post_attention_norm, layer.eps, s.ops_isa);
      x = normed[0] + layer.mlp.run(normed[1], s);
    }
    return x;
  }

 private:
  Layer& layer(int64_t i) {
    TORCH_CHECK(i >= 0 && i < static_cast<int64_t>(layers_.size()), "qwenvl DecodeStack: no layer ", i);
    return layers_[i];
  }

  std::vector<Layer> layers_;
  int64_t heads_, kv_heads_, head_dim_;
};

}  // namespace

void register_decode_stack(pybind11::module& m) {
  pybind11::class_<StepSettings>(m, "DecodeStepSettings")
      .def(pybind11::init<std::string, std::string, std::string, int64_t, int64_t>());
  pybind11::class_<DecodeStack>(m, "DecodeStack")
      .def(pybind11::init<int64_t, int64_t, int64_t>(), "heads, kv_heads, head_dim")
      .def("add_layer", &DecodeStack::add_layer,
           "input_norm, post_attention_norm, eps, qkv, o, q_norm or None, k_norm or None, qk_eps -> layer index")
      .def("set_dense_mlp", &DecodeStack::set_dense_mlp, "layer, gate_up, down")
      .def("set_moe_pairs", &DecodeStack::set_moe_pairs,
           "layer, router, top_k, gate_up packed list, params list, group, out, down packed list, params list, group, out, "
           "max pairs")
      .def("set_moe_float", &DecodeStack::set_moe_float,
           "layer, router, top_k, gate_up_proj [E, 2I, H], down_proj [E, H, I], max pairs")
      .def_property_readonly("max_rows", &DecodeStack::max_rows)
      .def_property_readonly("num_layers", &DecodeStack::num_layers)
      .def("forward", &DecodeStack::forward,
           "x, cos, sin, k_pools, v_pools, block_tables, context_lens, block_size, scale, settings -> x",
           pybind11::call_guard<pybind11::gil_scoped_release>());
}
