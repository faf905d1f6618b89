"""qwenvl's own CPU kernels for quantised decode (C++ SIMD, csrc/), and the switch between them and PyTorch's.

    available()  whether the kernels run here (compiled on first use, see build.py)
    isa()        "avx512" (AVX-512 VNNI) or "avx2" (AVX2 + FMA), None when they do not run
    int4_matmul(x, packed, params, group_size, out_features)   the int4 decode product (int4_layout.py)
    quantize_activations(x, block)                             its activation quantisation, for tests
    int8_matmul(x, tiles, scales, bias, out_features)          the int8 decode product (int8_layout.py)
    bf16_isa(), bf16_matmul(x, weight, bias)                   the bf16 decode product over nn.Linear's weight
    decode_ops_isa(), add_rms_norm, rotary_, silu_mul, paged_decode_attention
                                                               the element-wise rest of a decode step
    q4_k_to_tiles(blocks, in_features)                         a GGUF Q4_K tensor into the int4 tile layout
    q6_k_dequantize(blocks, in_features)                       a GGUF Q6_K tensor's float32 values
    q6_k_to_int4_tiles(blocks, in_features, group_size, dtype) a GGUF Q6_K tensor requantised to int4 tiles

QWENVL_KERNELS picks: "auto" (default: the best ISA this CPU has), "avx512", "avx2" (the AVX2 build even on
an AVX-512 CPU, so both are tested on one machine) or "off" (PyTorch's kernels, as without a compiler).
Where the kernels cannot run (no compiler, a failed build, a CPU without AVX2) one warning names the cause
and the callers keep PyTorch's path. reference.py holds the same arithmetic in plain PyTorch.

This package imports only torch and the standard library (a lower layer, beside qwenvl/layers).
"""

from __future__ import annotations

import os
import threading
import warnings
from contextlib import contextmanager

import torch

from . import build

MODE_ENV = "QWENVL_KERNELS"
MODES = ("auto", "avx512", "avx2", "off")


def mode() -> str:
    """QWENVL_KERNELS, checked: one of MODES ("auto" when unset)."""
    value = _env(MODE_ENV) or "auto"
    if value not in MODES:
        raise ValueError(f"{MODE_ENV}={value!r}: use one of {', '.join(MODES)}")
    return value


def isa() -> str | None:
    """The instruction set the kernels run with under the current QWENVL_KERNELS, or None (off, unavailable)."""
    runner = _runner()
    return None if runner is None else runner[1]


def available() -> bool:
    return _runner() is not None


# QWENVL_KERNELS's value -> (the compiled module, its ISA) or None: a decode step asks hundreds of times,
# so the answer is one dictionary lookup after the first (the variable is read each time: tests change it)
_resolved: dict[str, tuple[object, str] | None] = {}


def _runner() -> tuple[object, str] | None:
    value = _env(MODE_ENV)
    try:
        return _resolved[value]
    except KeyError:
        chosen = _isa_for(mode())
        runner = _resolved[value] = None if chosen is None else (build.load()[0], chosen)
        return runner


# Per thread: the environment as read once for a model step (settings_read_once), else None (read each call).
_step = threading.local()


def _env(name: str) -> str:
    snapshot = getattr(_step, "snapshot", None)
    return snapshot[name] if snapshot is not None else os.environ.get(name, "")


@contextmanager
def settings_read_once():
    """Within, on this thread: QWENVL_KERNELS and QWENVL_DECODE_OPS as they were on entry. A decode step asks for
    the kernels' choice ~80 times (every product, norm, rotary and attention call) and each environment read
    costs ~1 us, ~3% of a bundled-model token (issue 37); the engine's runner wraps each step in this, so a
    change to the variables (tests make them) still takes effect from the next step. Nests; the outermost read
    wins."""
    if getattr(_step, "snapshot", None) is not None:
        yield
        return
    _step.snapshot = {name: os.environ.get(name, "") for name in (MODE_ENV, DECODE_OPS_ENV, DECODE_STACK_ENV)}
    try:
        yield
    finally:
        _step.snapshot = None


def _forget() -> None:
    """Drop the cached choice (tests that hide the compiled module)."""
    _resolved.clear()
    _bf16_resolved.clear()
    _step_settings.clear()


def _isa_for(requested: str) -> str | None:
    if requested == "off":
        return None
    module = _module()
    if module is None:
        return None
    for candidate in (("avx512", "avx2") if requested == "auto" else (requested,)):
        if module.cpu_supports(candidate):
            return candidate
    _warn_once(f"this CPU lacks {'AVX2 + FMA' if requested == 'auto' else requested}")
    return None


def _module():
    module, cause = build.load()
    if module is None:
        _warn_once(cause)
    return module


_warned: set[str] = set()


def _warn_once(cause: str) -> None:
    if cause not in _warned:
        _warned.add(cause)
        warnings.warn(f"qwenvl: CPU kernels unavailable ({cause}); using PyTorch's kernels instead",
                      RuntimeWarning, stacklevel=4)


def _checked_runner(isa_name: str | None) -> tuple[object, str]:
    runner = _runner()
    if runner is None:
        raise RuntimeError("qwenvl kernels are not available here (see the warning, or QWENVL_KERNELS)")
    return runner if isa_name is None else (runner[0], isa_name)


# Activation passes per dtype (reference.py): one int8 pass for bfloat16, as llama.cpp quantises its
# activations once per product; float32 takes three, finer than its own rounding relative to a group's
# largest input (2^-8 / 254^2 ~ 6e-8), so a float32 model keeps float32 answers (at ~3x the arithmetic).
ACTIVATION_PASSES = {torch.bfloat16: 1, torch.float32: 3}


def int4_matmul(x: torch.Tensor, packed: torch.Tensor, params: torch.Tensor, group_size: int,
                out_features: int, isa_name: str | None = None) -> torch.Tensor:
    """x [R, K] (float32 or bfloat16, contiguous) @ W.T -> [R, out_features] in x's dtype, W in the int4 tile
    layout (int4_layout.py): packed uint8 [N_pad, K/2], params [N_pad/16, K/G, 2, 16] (scale, min) float32 or
    bfloat16, or Q4_K's super-blocks uint8 [N_pad/16, K/256, 320] (group_size 32). Each row of x is quantised to int8 per group on its own (ACTIVATION_PASSES), so rows do not
    affect each other. 1 to 16 rows. `isa_name` forces "avx512" or "avx2" (tests); by default isa()'s."""
    module, chosen = _checked_runner(isa_name)
    return module.int4_matmul(x, packed, params, group_size, out_features, ACTIVATION_PASSES.get(x.dtype, 1), chosen)


def int4_matmul_pairs(x: torch.Tensor, rows: list[int], packed: list[torch.Tensor], params: list[torch.Tensor],
                      group_size: int, out_features: int, isa_name: str | None = None) -> torch.Tensor:
    """y[p] = x[rows[p]] @ W_p.T for P int4 weights of one shape (int4_matmul's operands, one pair each), in one
    call and one parallel pass: y [P, out_features] in x's dtype, each row int4_matmul(x[rows[p]], W_p)'s bit for
    bit. x [R, K] contiguous, R any; a MoE layer's chosen experts at decode."""
    module, chosen = _checked_runner(isa_name)
    return module.int4_matmul_pairs(x, rows, packed, params, group_size, out_features,
                                    ACTIVATION_PASSES.get(x.dtype, 1), chosen)


def quantize_activations(x: torch.Tensor, block: int, passes: int = 1, isa_name: str | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kernels' activation quantisation of x [R, K]: (a int8 [R P, K], d [R P, K/block], xs [R P, K/block]),
    row r's pass p at r P + p."""
    module, chosen = _checked_runner(isa_name)
    return tuple(module.quantize_activations(x, block, passes, chosen))


def int8_matmul(x: torch.Tensor, tiles: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
                out_features: int, isa_name: str | None = None) -> torch.Tensor:
    """x [R, K] (float32 or bfloat16) @ (q * scale).T + bias -> [R, out_features] in x's dtype, q in the int8
    tile layout (int8_layout.py): tiles int8 [N_pad/16, K_pad/4, 16, 4], scales float32 [N_pad], bias
    float32 [out_features] or None. Each row of x is quantised to int8 per block of 32 on its own
    (ACTIVATION_PASSES), so rows do not affect each other. 1 to 16 rows."""
    module, chosen = _checked_runner(isa_name)
    return module.int8_matmul(x, tiles, scales, bias, out_features, ACTIVATION_PASSES.get(x.dtype, 1), chosen)


def int8_rows_to_bf16(tiles: torch.Tensor, r0: int, r1: int, out: torch.Tensor) -> torch.Tensor:
    """Rows r0:r1 of the int8 tiles (int8_layout.py) written into out bfloat16 [r1 - r0, K] (exact); returns out.
    Prefill's GEMM operand: PyTorch's copy of the permuted view is ~3x slower than a plain cast."""
    module, _ = _checked_runner(None)
    module.int8_rows_to_bf16(tiles, r0, r1, out)
    return out


def q4_k_to_tiles(blocks: torch.Tensor, in_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A GGUF Q4_K tensor's bytes, uint8 [rows, in/256 * 144] (contiguous), -> the int4 tile layout with Q4_K's
    super-block parameters: (packed uint8 [N_pad, in/2], params uint8 [N_pad/16, in/256, 320]), the bytes
    int4_layout.pack_codes and pack_super_blocks give for the same fields, in one pass."""
    from . import int4_layout, weight_memory
    module, _ = _checked_runner(None)
    tiles = int4_layout.padded_rows(blocks.shape[0]) // int4_layout.TILE_N
    packed = weight_memory.empty((tiles * int4_layout.TILE_N, in_features // 2), torch.uint8)   # 2 MiB pages
    params = weight_memory.empty((tiles, in_features // int4_layout.SUPER_K, int4_layout.SUPER_BYTES), torch.uint8)
    module.q4_k_to_tiles(blocks, in_features, packed, params)
    return packed, params


def q6_k_dequantize(blocks: torch.Tensor, in_features: int) -> torch.Tensor:
    """A GGUF Q6_K tensor's bytes, uint8 [rows, in/256 * 210] (contiguous), -> its values float32 [rows, in]:
    gguf.quants.dequantize's to the bit, on torch's threads."""
    module, _ = _checked_runner(None)
    return module.q6_k_dequantize(blocks, in_features)


def q6_k_to_int4_tiles(blocks: torch.Tensor, in_features: int, group_size: int, dtype: torch.dtype
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """A GGUF Q6_K tensor's bytes, uint8 [rows, in/256 * 210] (contiguous), -> the int4 tile layout of its
    values in groups of `group_size` for a `dtype` model (bfloat16 or float32): (packed uint8 [N_pad, in/2],
    params [N_pad/16, in/G, 2, 16] in `dtype`), the bytes `Int4Linear.from_weight(values.to(dtype), G)` gives
    (qwenvl's own int4 quantiser), in one pass without a float copy of the tensor."""
    from . import int4_layout, weight_memory
    if dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"q6_k_to_int4_tiles: a {dtype} model is not supported (bfloat16 or float32)")
    module, _ = _checked_runner(None)
    tiles = int4_layout.padded_rows(blocks.shape[0]) // int4_layout.TILE_N
    packed = weight_memory.empty((tiles * int4_layout.TILE_N, in_features // 2), torch.uint8)   # 2 MiB pages
    params = weight_memory.empty((tiles, in_features // group_size, 2, int4_layout.TILE_N), dtype)
    module.q6_k_to_int4_tiles(blocks, in_features, group_size, packed, params)
    return packed, params


def bf16_isa() -> str | None:
    """The build the bf16 product runs with: "avx512" where isa() is and the CPU has AVX512_BF16, else
    "avx2" (an AVX-512 CPU without BF16 runs the AVX2 build), None where the kernels do not run."""
    value = _env(MODE_ENV)
    try:
        return _bf16_resolved[value]
    except KeyError:
        runner = _runner()
        chosen = None if runner is None else runner[1]
        if chosen == "avx512" and not runner[0].cpu_supports("avx512bf16"):
            chosen = "avx2"
        _bf16_resolved[value] = chosen
        return chosen


_bf16_resolved: dict[str, str | None] = {}      # as _resolved, for bf16_isa()


def bf16_matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                isa_name: str | None = None) -> torch.Tensor:
    """x [R, K] @ weight.T + bias, all bfloat16 (weight [N, K] as nn.Linear holds it), accumulated in
    float32 and rounded to bfloat16 once: F.linear's arithmetic in another order. 1 to 16 rows."""
    module, _ = _checked_runner(None)
    return module.bf16_matmul(x, weight, bias, isa_name or bf16_isa())


# ---- the element-wise parts of a decode step (csrc/decode_ops_kernel.hpp; reference.py's decode ops).
# Each runs under isa()'s build; callers check decode_ops_isa() first and keep PyTorch's path where it is
# None. QWENVL_DECODE_OPS=off turns these off alone (the products keep the kernels): the A/B switch of
# bench/decode_overhead.py.

DECODE_OPS_ENV = "QWENVL_DECODE_OPS"


def decode_ops_isa() -> str | None:
    """isa(), or None where QWENVL_DECODE_OPS=off. The layers ask once per op and hand the answer to the op
    (isa_name): a decode step makes ~140 of these calls, and each environment read costs ~0.5-2 us."""
    if _env(DECODE_OPS_ENV) == "off":
        return None
    return isa()


def _decode_runner(isa_name: str | None) -> tuple[object, str]:
    """The compiled module and the ISA to run: isa_name as given (the caller asked decode_ops_isa() or
    names a build, as tests do) without reading the environment again, else isa()'s."""
    if isa_name is None:
        return _checked_runner(None)
    module = build.load()[0]
    if module is None:
        raise RuntimeError("qwenvl kernels are not available here (see the warning, or QWENVL_KERNELS)")
    return module, isa_name


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float,
                 isa_name: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, weight * rmsnorm(s)) for s = x + delta (x itself when delta is None), x/delta [R, D], weight [D],
    all one dtype (float32 or bfloat16): the residual add and RMSNorm of a decoder layer in one call."""
    module, chosen = _decode_runner(isa_name)
    s, y = module.add_rms_norm(x, delta, weight, eps, chosen)
    return s, y


def rotary_(x: torch.Tensor, heads: int, head_dim: int, cos: torch.Tensor, sin: torch.Tensor,
            isa_name: str | None = None) -> torch.Tensor:
    """Rotary in place over the first `heads` heads of each row of x [R, >= heads * head_dim] (rows may be
    strided, e.g. the fused q/k/v output), cos/sin float32 [R, >= head_dim / 2] (the first halves); returns x."""
    module, chosen = _decode_runner(isa_name)
    module.rotary_(x, heads, head_dim, cos, sin, chosen)
    return x


def silu_mul(gate_up: torch.Tensor, isa_name: str | None = None) -> torch.Tensor:
    """gate_up [R, 2I] (gate then up, rows may be strided) -> silu(gate) * up [R, I]."""
    module, chosen = _decode_runner(isa_name)
    return module.silu_mul(gate_up, chosen)


def paged_decode_attention(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_pool: torch.Tensor,
                           v_pool: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
                           block_size: int, scale: float, isa_name: str | None = None) -> torch.Tensor:
    """One decode query per sequence over the paged pool: writes k_new/v_new [B, Hkv, Dh] into the slot of
    token context_lens[b] - 1, then returns softmax(scale q k^T) v [B, Hq, Dh] over each sequence's
    context_lens[b] keys, float32 inside. Pools [slots, Hkv, Dh] in q's dtype; block_tables int32
    [B, blocks], context_lens int32 [B]; head_dim a multiple of 16."""
    module, chosen = _decode_runner(isa_name)
    return module.paged_decode_attention(q, k_new, v_new, k_pool, v_pool, block_tables, context_lens,
                                         block_size, scale, chosen)


# ---- a decoder's whole decode step in one call (csrc/decode_stack.cpp): the ops above, composed in C++.

def decode_stack(heads: int, kv_heads: int, head_dim: int) -> object:
    """An empty compiled DecodeStack (layers/decode_stack.py fills it: add_layer, then set_dense_mlp /
    set_moe_pairs / set_moe_float per layer, over the layers' own tensors, held, not copied). Its `max_rows` is
    the most sequences a step may have."""
    module, _ = _checked_runner(None)
    return module.DecodeStack(heads, kv_heads, head_dim)


DECODE_STACK_ENV = "QWENVL_DECODE_STACK"     # "off": every step through the layers' own calls (A/B, bench)


def decode_step_settings(bf16_kernel_rows: int, dtype: torch.dtype) -> object | None:
    """The ISAs a DecodeStack step runs with, as the layers' own calls would choose them this step, or None
    where the products' or the decode ops' kernels do not run (the layers' PyTorch paths then) or
    QWENVL_DECODE_STACK=off."""
    if _env(DECODE_STACK_ENV) == "off":
        return None
    chosen, ops = isa(), decode_ops_isa()
    if chosen is None or ops is None:
        return None
    key = (chosen, bf16_isa() or "", ops, ACTIVATION_PASSES.get(dtype, 1), bf16_kernel_rows)
    settings = _step_settings.get(key)
    if settings is None:
        settings = _step_settings[key] = build.load()[0].DecodeStepSettings(*key)
    return settings


_step_settings: dict[tuple, object] = {}     # decode_step_settings' objects, one per distinct choice
