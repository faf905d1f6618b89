"""Writing a Qwen2-VL config.json: the family's own layout, for new models that training creates."""

from __future__ import annotations


def qwen2_vl_config(dims, vocab_size: int, special_ids: dict[str, int]) -> dict:
    """A `config.json` in the original flat Hub layout of Qwen2-VL for a model of `dims` (training/checkpoint.py
    SmallModelDims: widths, depths, heads), the reverse of models/qwen2_vl/family.py's reading."""
    head_dim = dims.hidden_size // dims.num_attention_heads
    half = head_dim // 2                  # M-RoPE sections split the half rotary dim into t, h, w
    t = half // 4
    h = (half - t) // 2
    return {
        "architectures": ["Qwen2VLForConditionalGeneration"],
        "model_type": "qwen2_vl",
        "hidden_size": dims.hidden_size,
        "intermediate_size": dims.intermediate_size,
        "num_hidden_layers": dims.num_hidden_layers,
        "num_attention_heads": dims.num_attention_heads,
        "num_key_value_heads": dims.num_key_value_heads,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "rope_scaling": {"type": "mrope", "mrope_section": [t, h, half - t - h]},
        "max_position_embeddings": 4096,
        "vocab_size": vocab_size,
        "tie_word_embeddings": True,
        "attention_dropout": 0.0,
        "use_sliding_window": False,
        "sliding_window": 4096,
        "max_window_layers": dims.num_hidden_layers,
        "initializer_range": 0.02,
        "torch_dtype": "bfloat16",
        "bos_token_id": special_ids["<|endoftext|>"],
        "eos_token_id": special_ids["<|im_end|>"],
        "pad_token_id": special_ids["<|endoftext|>"],
        "vision_start_token_id": special_ids["<|vision_start|>"],
        "vision_end_token_id": special_ids["<|vision_end|>"],
        "vision_token_id": special_ids["<|vision_pad|>"],
        "image_token_id": special_ids["<|image_pad|>"],
        "video_token_id": special_ids["<|video_pad|>"],
        "vision_config": {
            "depth": dims.vision_depth,
            "embed_dim": dims.vision_width,
            "num_heads": dims.vision_heads,
            "mlp_ratio": 4,
            "hidden_size": dims.hidden_size,
            "hidden_act": "quick_gelu",
            "in_chans": 3,
            "in_channels": 3,
            "patch_size": 14,
            "spatial_patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
    }
