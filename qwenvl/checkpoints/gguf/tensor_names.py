"""llama.cpp's tensor names -> ours, and the converter's reshapes undone.

From the converter's source (conversion/qwenvl.py, qwen3vl.py and gguf-py's tensor_mapping.py):
  * language model: `token_embd`, `output`, `output_norm`, `blk.N.{attn_norm, ffn_norm, attn_q/k/v,
    attn_output, attn_q_norm, attn_k_norm, ffn_gate/up/down}`; MoE: `ffn_gate_inp` (router) and the experts
    stacked `ffn_{gate,up,down}_exps` [E, out, in] (gate and up split out of the fused gate_up);
  * projector: the Conv3d patch embedding split into two Conv2d halves (`v.patch_embd.weight` is temporal
    index 0, `.weight.1` index 1); Qwen2/2.5-VL's fused `qkv` split into `attn_q/k/v` (Qwen3-VL keeps
    `attn_qkv`); the merger `mm.0` / `mm.2` after `v.post_ln`; DeepStack mergers `v.deepstack.<block>`
    numbered by the ViT block they tap (ours by their position in deepstack_visual_indexes).
No tensor is permuted (Qwen's rotary is the NeoX half-split in llama.cpp too), so a name and, for the
split ones, a concatenation restore each of our tensors exactly.
"""

from __future__ import annotations

import re

LM = "model.language_model."
VIS = "model.visual."

_LM_LAYER = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    "ffn_gate_inp": "mlp.gate",
}
_LM_TOP = {"token_embd.weight": LM + "embed_tokens.weight", "output_norm.weight": LM + "norm.weight",
           "output.weight": "lm_head.weight"}

# The ViT MLP's two (or three) linears and the merger, per family: llama.cpp's name -> ours.
_VIT_MLP = {
    "qwen2_vl": {"ffn_up": "mlp.fc1", "ffn_down": "mlp.fc2"},
    "qwen2_5_vl": {"ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"},
    "qwen3_vl": {"ffn_up": "mlp.linear_fc1", "ffn_down": "mlp.linear_fc2"},
}
_MERGER = {
    "qwen2_vl": {"v.post_ln": "merger.ln_q", "mm.0": "merger.mlp.0", "mm.2": "merger.mlp.2"},
    "qwen3_vl": {"v.post_ln": "merger.norm", "mm.0": "merger.linear_fc1", "mm.2": "merger.linear_fc2"},
}
_DEEPSTACK = {"norm": "norm", "fc1": "linear_fc1", "fc2": "linear_fc2"}
_BLOCK = re.compile(r"^(v\.)?blk\.(\d+)\.([a-z_0-9]+)\.(weight|bias)$")
_EXPERTS = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down)_exps\.weight$")
_DEEPSTACK_NAME = re.compile(r"^v\.deepstack\.(\d+)\.(norm|fc1|fc2)\.(weight|bias)$")


def _family_key(family: str) -> str:
    return "qwen3_vl" if family.startswith("qwen3") else family


def lm_name(name: str) -> str | None:
    """Our key for a language-model tensor, or None (the caller reports it). Expert stacks are parts."""
    if name in _LM_TOP:
        return _LM_TOP[name]
    m = _BLOCK.match(name)
    if m and not m.group(1) and m.group(3) in _LM_LAYER:
        return f"{LM}layers.{m.group(2)}.{_LM_LAYER[m.group(3)]}.{m.group(4)}"
    return None


def expert_part(name: str) -> tuple[int, str] | None:
    """(layer, "gate" | "up" | "down") for a stacked expert tensor, else None."""
    m = _EXPERTS.match(name)
    return (int(m.group(1)), m.group(2)) if m else None


def vision_name(name: str, family: str, deepstack_indexes: tuple[int, ...]) -> tuple[str, int | None] | None:
    """(our key, part) for a projector tensor: part is the index this tensor takes in our key's
    concatenation (q/k/v -> 0/1/2 along the rows; patch-embedding halves -> 0/1 along time), None when the
    tensor is our key whole. None for a name we do not know."""
    fam = _family_key(family)
    if name.startswith("v.patch_embd.weight"):
        return VIS + "patch_embed.proj.weight", 1 if name.endswith(".1") else 0
    if name == "v.patch_embd.bias":
        return VIS + "patch_embed.proj.bias", None
    if name == "v.position_embd.weight":
        return VIS + "pos_embed.weight", None
    m = _DEEPSTACK_NAME.match(name)
    if m:
        block = int(m.group(1))
        if block not in deepstack_indexes:
            return None
        ours = f"deepstack_merger_list.{deepstack_indexes.index(block)}.{_DEEPSTACK[m.group(2)]}"
        return f"{VIS}{ours}.{m.group(3)}", None
    head, _, suffix = name.rpartition(".")
    merger = _MERGER.get(fam, _MERGER["qwen2_vl"])
    if head in merger:
        return f"{VIS}{merger[head]}.{suffix}", None
    m = _BLOCK.match(name)
    if not (m and m.group(1)):
        return None
    prefix, part, kind = f"{VIS}blocks.{m.group(2)}.", m.group(3), m.group(4)
    if part in ("attn_q", "attn_k", "attn_v"):
        return f"{prefix}attn.qkv.{kind}", "qkv".index(part[-1])
    simple = {"attn_qkv": "attn.qkv", "attn_out": "attn.proj", "ln1": "norm1", "ln2": "norm2", **_VIT_MLP[fam]}
    return (f"{prefix}{simple[part]}.{kind}", None) if part in simple else None
