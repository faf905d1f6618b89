"""A decoder's decode step as one compiled call (qwenvl/kernels/csrc/decode_stack.cpp).

Why: at decode every layer is ~10 kernel calls, each wrapped in its module's Python (the dispatch checks, the
call, the views), ~15 us apiece here: ~6 ms of a 2B-width token and most of a small model's (issues 36, 37).
The compiled stack makes the same calls in the same order on the same tensors, so a step's bytes are those of
the modules' own forwards; only the interpreter between the calls is gone.

When: a CPU step without gradients whose sequences each add one token, on a paged cache the decode-attention
kernel reads (PagedAttention.decode_kernel_operands), with qwenvl's kernels on, every layer offering its
decode spec (the models' DecoderLayer.decode_spec: fused q/k/v, norms in the activations' dtype, an MLP whose
module offers decode_mlp(): a fused dense one, or Qwen3-VL-MoE's block with int4 experts on the pair kernel or
float experts), every product a kernel layout or a plain linear (product_of below), and no more rows than the
products' kernels take. Anything else (prefill, a LoRA-wrapped or tensor-parallel layer, QWENVL_KERNELS=off)
keeps the modules' path, which stays the reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .. import kernels
from .activations import SILU_MUL_KERNEL_MAX_ROWS
from .bf16_linear import BF16_KERNEL_MAX_ROWS

_NORM_DTYPES = (torch.float32, torch.bfloat16)


def product_of(module: nn.Module | None) -> tuple | None:
    """A linear's decode product for the stack: the module's own `decode_product()` (the kernel layouts and
    Bf16DecodeLinear offer one), a plain nn.Linear's weight and bias, else None. A product is (kind, weight,
    params, bias, out_features, group_size, the most rows its forward runs this way or 0 for any)."""
    if module is None:
        return None
    offer = getattr(module, "decode_product", None)
    if offer is not None:
        return offer()
    if type(module) is nn.Linear:       # exactly: subclasses (tensor-parallel linears) do more in forward
        return ("linear", module.weight, None, module.bias, module.out_features, 0, 0)
    return None


def dense_mlp(gate_up: nn.Module | None, down: nn.Module) -> tuple | None:
    """A fused SwiGLU MLP's decode form (silu_mul between the products), or None."""
    products = (product_of(gate_up), product_of(down))
    return None if None in products else ("dense", *products)


@dataclass
class DecodeLayerSpec:
    """One decoder layer as the compiled stack runs it (csrc/decode_stack.cpp, DecodeStack.add_layer / set_*)."""
    input_norm: torch.Tensor            # the norms' weights
    post_attention_norm: torch.Tensor
    eps: float
    qkv: tuple                          # product_of(...) of the fused q/k/v and of o
    o: tuple
    mlp: tuple                          # a module's decode_mlp(): ("dense", ...), ("moe_pairs", ...), ("moe_float", ...)
    q_norm: torch.Tensor | None = None  # Qwen3's per-head norms (then rotary as rotary.rotate computes it)
    k_norm: torch.Tensor | None = None
    qk_eps: float = 0.0

    def norms(self) -> list[torch.Tensor]:
        return [t for t in (self.input_norm, self.post_attention_norm, self.q_norm, self.k_norm) if t is not None]


def layer_spec(input_norm: nn.Module, post_attention_norm: nn.Module, qkv: nn.Module | None, o: nn.Module,
               mlp: nn.Module, q_norm: nn.Module | None = None, k_norm: nn.Module | None = None
               ) -> DecodeLayerSpec | None:
    """A decoder layer's spec from its modules (RMSNorms, the fused q/k/v, o, the MLP), or None where one of them
    has no decode form (unfused projections, a wrapper) or the norms' eps differ where the stack shares one."""
    offer = getattr(mlp, "decode_mlp", None)
    mlp_form = None if offer is None else offer()
    qkv_form, o_form = product_of(qkv), product_of(o)
    if mlp_form is None or qkv_form is None or o_form is None or input_norm.eps != post_attention_norm.eps \
            or (q_norm is not None and (k_norm is None or q_norm.eps != k_norm.eps)):
        return None
    return DecodeLayerSpec(input_norm.weight, post_attention_norm.weight, input_norm.eps, qkv_form, o_form, mlp_form,
                           None if q_norm is None else q_norm.weight, None if k_norm is None else k_norm.weight,
                           0.0 if q_norm is None else q_norm.eps)


def modules_of(*parents: nn.Module) -> list[nn.Module]:
    """The parents and their children: what a layer's stack is made from (CompiledDecode keeps it while these
    are the same objects)."""
    return [m for parent in parents for m in (parent, *parent.children())]


class CompiledDecode:
    """A model's compiled decode stack, made on the first step that can take it and kept while the layers'
    modules (their decode_modules()) are the same objects: a module swapped in later, e.g. a LoRA wrapper, makes a
    new one (or none); the stack holds the modules' tensors, so weights updated in place need nothing, but a
    module's tensors re-bound after the first decode step (a new layout) go unseen."""

    def __init__(self) -> None:
        self._stack = None
        self._dtype: torch.dtype | None = None
        self._modules: list[nn.Module] = []
        self._refused: list[nn.Module] | None = None     # the modules of a stack that could not be made

    def __deepcopy__(self, memo) -> "CompiledDecode":
        return CompiledDecode()     # a copied model makes its own stack from its own tensors

    def __reduce__(self):
        return CompiledDecode, ()

    def run(self, layers: nn.ModuleList, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
            attn: object, heads: int, kv_heads: int, head_dim: int) -> torch.Tensor | None:
        """The decoder's output x[B, D] for this step (before the final norm), or None where the step must take
        the layers' own path. cos/sin: the step's rotary half tables ([B, 1, Dh/2], `rotary_halves`)."""
        if x.dim() != 2 or x.device.type != "cpu" or torch.is_grad_enabled() \
                or x.shape[0] > SILU_MUL_KERNEL_MAX_ROWS:
            return None
        operands = getattr(attn, "decode_kernel_operands", None)
        operands = None if operands is None else operands(x.dtype)
        if operands is None:
            return None
        settings = kernels.decode_step_settings(BF16_KERNEL_MAX_ROWS, x.dtype)
        if settings is None:
            return None
        stack = self._stack_for(layers, heads, kv_heads, head_dim)
        if stack is None or x.dtype != self._dtype or x.shape[0] > stack.max_rows:
            return None
        k_pools, v_pools, tables, lens, block_size, scale = operands
        return stack.forward(x, cos, sin, k_pools, v_pools, tables, lens, block_size, scale, settings)

    def _stack_for(self, layers: nn.ModuleList, heads: int, kv_heads: int, head_dim: int):
        modules = [m for layer in layers for m in layer.decode_modules()]
        if self._stack is not None and _same(modules, self._modules):
            return self._stack
        if self._refused is not None and _same(modules, self._refused):
            return None
        self._stack, self._modules, self._refused = None, [], None
        specs = [layer.decode_spec() for layer in layers]
        dtypes = {norm.dtype for spec in specs if spec is not None for norm in spec.norms()}
        if any(spec is None for spec in specs) or len(dtypes) != 1 or not dtypes <= set(_NORM_DTYPES):
            self._refused = modules
            return None
        self._stack = _compiled(specs, heads, kv_heads, head_dim)
        self._dtype, self._modules = dtypes.pop(), modules
        return self._stack


def _compiled(specs: list[DecodeLayerSpec], heads: int, kv_heads: int, head_dim: int):
    stack = kernels.decode_stack(heads, kv_heads, head_dim)
    for spec in specs:
        i = stack.add_layer(spec.input_norm, spec.post_attention_norm, spec.eps, spec.qkv, spec.o, spec.q_norm,
                            spec.k_norm, spec.qk_eps)
        kind, *parts = spec.mlp
        {"dense": stack.set_dense_mlp, "moe_pairs": stack.set_moe_pairs, "moe_float": stack.set_moe_float}[kind](i, *parts)
    return stack


def _same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))
