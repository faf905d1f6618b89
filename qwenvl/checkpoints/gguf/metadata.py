"""GGUF metadata -> the config.json our families read (transformers 5.x layout), so ModelConfig.from_hf
stays the one place that turns a config into a model.

Facts from llama.cpp's converter (conversion/qwenvl.py, qwen3vl.py, base.py) that shape this:
  * the language model's keys sit under the architecture name (`qwen2vl.embedding_length`, ...);
    `rope.dimension_sections` holds the M-RoPE sections padded with a 0 to four;
  * the projector's `clip.vision.feed_forward_length` is not the ViT MLP width for Qwen2-VL (the converter
    writes the LLM width there), so MLP widths come from the tensors' shapes;
  * Qwen2.5-VL stores only the window pattern (`n_wa_pattern`: full attention every n-th block), not the
    window size or tokens_per_second; every released Qwen2.5-VL uses 112 px windows and 2 tokens a second;
  * Qwen3-VL's DeepStack layers are a per-block boolean list; its position table's rows are a tensor shape.
Token ids the config names (image pad, vision start/end) are looked up by their text in the file's vocabulary.
"""

from __future__ import annotations

import numpy as np

from .files import GGUFError, GGUFPair, field

QWEN2_5_WINDOW_SIZE = 112          # px; Qwen2.5-VL's config.json value in every released size
QWEN2_5_TOKENS_PER_SECOND = 2
_VISION_ACT = {"qwen2_vl": "quick_gelu", "qwen2_5_vl": "silu", "qwen3_vl": "gelu_pytorch_tanh",
               "qwen3_vl_moe": "gelu_pytorch_tanh"}
_SPECIAL = {"image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
            "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>"}


def tensor_shapes(reader) -> dict[str, tuple[int, ...]]:
    """{name: shape in PyTorch order ([out, in] for a matrix)}; GGUF lists dimensions innermost first."""
    return {t.name: tuple(int(d) for d in reversed(t.shape.tolist())) for t in reader.tensors}


def hf_config(pair: GGUFPair, token_ids: dict[str, int]) -> dict:
    """The config.json dict of this pair; `token_ids` maps token text -> id (the file's vocabulary)."""
    arch = field(pair.lm, "general.architecture")
    return {"model_type": pair.family, "text_config": _text(pair, arch),
            "vision_config": _vision(pair), **_special_ids(pair, token_ids)}


def _float32(value) -> float:
    """A float32 metadata value as the decimal it was written from (1e-06, not 9.999999974752427e-07):
    the shortest text that reads back to the same float32."""
    return float(str(np.float32(value)))


def _need(reader, key: str, path):
    value = field(reader, key)
    if value is None:
        raise GGUFError(f"{path}: metadata key {key} is missing (not a file written by llama.cpp's converter?)")
    return value


def _text(pair: GGUFPair, arch: str) -> dict:
    lm, path = pair.lm, pair.model_path
    shapes = tensor_shapes(lm)
    if "token_embd.weight" not in shapes:
        raise GGUFError(f"{path}: no token_embd.weight tensor")
    hidden = _need(lm, f"{arch}.embedding_length", path)
    heads = _need(lm, f"{arch}.attention.head_count", path)
    sections = list(_need(lm, f"{arch}.rope.dimension_sections", path))
    qwen3 = arch.startswith("qwen3")
    text = {
        "vocab_size": shapes["token_embd.weight"][0], "hidden_size": hidden,
        "intermediate_size": _need(lm, f"{arch}.feed_forward_length", path),
        "num_hidden_layers": _need(lm, f"{arch}.block_count", path), "num_attention_heads": heads,
        "num_key_value_heads": field(lm, f"{arch}.attention.head_count_kv", heads),
        "head_dim": field(lm, f"{arch}.attention.key_length", hidden // heads),
        "rms_norm_eps": _float32(_need(lm, f"{arch}.attention.layer_norm_rms_epsilon", path)),
        "max_position_embeddings": field(lm, f"{arch}.context_length", 32768),
        "hidden_act": "silu",
        "attention_bias": "blk.0.attn_q.bias" in shapes,
        "tie_word_embeddings": "output.weight" not in shapes,
        "rope_parameters": {"rope_type": "default",
                            "rope_theta": _float32(_need(lm, f"{arch}.rope.freq_base", path)),
                            "mrope_section": [int(s) for s in sections[:3]],
                            **({"mrope_interleaved": True} if qwen3 else {})},
    }
    if arch == "qwen3vlmoe":
        text.update(num_experts=_need(lm, f"{arch}.expert_count", path),
                    num_experts_per_tok=_need(lm, f"{arch}.expert_used_count", path),
                    moe_intermediate_size=_need(lm, f"{arch}.expert_feed_forward_length", path),
                    decoder_sparse_step=1,
                    mlp_only_layers=[i for i in range(text["num_hidden_layers"])
                                     if f"blk.{i}.ffn_gate_inp.weight" not in shapes])
    return text


def _vision(pair: GGUFPair) -> dict:
    proj, path, family = pair.mmproj, pair.mmproj_path, pair.family
    shapes = tensor_shapes(proj)
    if not shapes:
        raise GGUFError(f"{path}: the projector file holds no tensors (a converter that did not recognise the "
                        "checkpoint's vision key names writes such a file; convert from the Hub's files)")
    width = _need(proj, "clip.vision.embedding_length", path)
    depth = _need(proj, "clip.vision.block_count", path)
    if "v.patch_embd.weight.1" not in shapes:
        raise GGUFError(f"{path}: no v.patch_embd.weight.1: qwenvl needs the two temporal halves of the patch "
                        "embedding that llama.cpp's converter writes for Qwen-VL")
    mlp = shapes.get("v.blk.0.ffn_up.weight")
    if mlp is None:
        raise GGUFError(f"{path}: no v.blk.0.ffn_up.weight tensor")
    vision = {
        "depth": depth, "num_heads": _need(proj, "clip.vision.attention.head_count", path),
        "patch_size": _need(proj, "clip.vision.patch_size", path), "temporal_patch_size": 2,
        "spatial_merge_size": field(proj, "clip.vision.spatial_merge_size", 2), "in_channels": 3,
        "hidden_act": _VISION_ACT[family],
    }
    out_width = _need(proj, "clip.vision.projection_dim", path)
    if family == "qwen2_vl":          # config.json's own names: embed_dim is the ViT width, hidden_size the LLM's
        return {**vision, "embed_dim": width, "hidden_size": out_width, "mlp_ratio": mlp[0] / width}
    vision.update(hidden_size=width, intermediate_size=mlp[0], out_hidden_size=out_width)
    if family == "qwen2_5_vl":
        n = _need(proj, "clip.vision.n_wa_pattern", path)
        vision.update(window_size=QWEN2_5_WINDOW_SIZE, tokens_per_second=QWEN2_5_TOKENS_PER_SECOND,
                      fullatt_block_indexes=list(range(n - 1, depth, n)))
    else:
        if "v.position_embd.weight" not in shapes:
            raise GGUFError(f"{path}: no v.position_embd.weight tensor (Qwen3-VL's position table)")
        flags = field(proj, "clip.vision.is_deepstack_layers", [])
        vision.update(num_position_embeddings=shapes["v.position_embd.weight"][0],
                      deepstack_visual_indexes=[i for i, on in enumerate(flags) if on])
    return vision


def _special_ids(pair: GGUFPair, token_ids: dict[str, int]) -> dict:
    out = {}
    for key, text in _SPECIAL.items():
        if text not in token_ids:
            raise GGUFError(f"{pair.model_path}: the vocabulary has no {text} token, which Qwen-VL prompts need")
        out[key] = token_ids[text]
    return out
