// The kernels' torch-level ops (bindings.cpp, decode_ops_bindings.cpp: tensor checks, the ISA's namespace,
// torch's threads) for other translation units of the module that compose them (decode_stack.cpp). The same
// functions Python calls, so a composition gives the bytes the same calls from Python give.
#pragma once
#include <torch/extension.h>

#include <string>
#include <vector>

namespace qwenvl_ops {

torch::Tensor int8_matmul(const torch::Tensor& x, const torch::Tensor& tiles, const torch::Tensor& scales,
                          const c10::optional<torch::Tensor>& bias, int64_t out_features, int64_t passes,
                          const std::string& isa);
torch::Tensor int4_matmul(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& params,
                          int64_t group_size, int64_t out_features, int64_t passes, const std::string& isa);
torch::Tensor int4_matmul_pairs(const torch::Tensor& x, const std::vector<int64_t>& rows,
                               const std::vector<torch::Tensor>& packed, const std::vector<torch::Tensor>& params,
                               int64_t group_size, int64_t out_features, int64_t passes, const std::string& isa);
torch::Tensor bf16_matmul(const torch::Tensor& x, const torch::Tensor& weight, const c10::optional<torch::Tensor>& bias,
                          const std::string& isa);
std::vector<torch::Tensor> add_rms_norm(const torch::Tensor& x, const c10::optional<torch::Tensor>& delta,
                                        const torch::Tensor& weight, double eps, const std::string& isa);
void rotary_(torch::Tensor x, int64_t heads, int64_t head_dim, const torch::Tensor& cos, const torch::Tensor& sin,
             const std::string& isa);
torch::Tensor silu_mul(const torch::Tensor& gate_up, const std::string& isa);
torch::Tensor paged_decode_attention(const torch::Tensor& q, const torch::Tensor& k_new, const torch::Tensor& v_new,
                                     torch::Tensor k_pool, torch::Tensor v_pool, const torch::Tensor& block_tables,
                                     const torch::Tensor& context_lens, int64_t block_size, double scale,
                                     const std::string& isa);

}  // namespace qwenvl_ops
