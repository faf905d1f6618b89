"""Tiny, complete, random checkpoint folders for every family, made with transformers' own classes.

A folder holds what a downloaded checkpoint holds: `config.json` + safetensors from `save_pretrained`
of a randomly initialised transformers model, a real byte-level BPE `tokenizer.json` whose Qwen special
tokens sit at the ids the config names, the family's chat template and `preprocessor_config.json`.
The dims are small enough that a forward pass takes milliseconds on one CPU core.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from qwenvl.training.tokenizer_train import default_chat_template, save_tokenizer, train_tokenizer

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")
BPE_VOCAB = 400

# A fixed corpus, English and Chinese, so every run trains the same tokenizer.
CORPUS = [
    "Describe this image. What is in the picture? The cat sits on the red mat near the window.",
    "A chart shows sales rising from 2019 to 2024; the blue bar is the tallest one.",
    "Detect the dog and output its bounding box in JSON. The box is at the top left corner.",
    "The quick brown fox jumps over the lazy dog. How many people are standing in the photo?",
    "Read the text in the document and answer the question: what is the total amount?",
    "这是一张图片。图中有一只猫坐在红色的垫子上。请描述这张图片的内容。",
    "图表显示销售额从二零一九年到二零二四年持续增长，蓝色的柱子最高。",
    "请找出图中的狗，并输出它的边界框坐标。视频里有几个人在跑步？",
    "你好，我是一个视觉语言模型，可以回答关于图像和视频的问题。",
] * 4

# Per-family image normalisation, as the real preprocessor configs have it.
_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
_PROCESSOR_CLASS = {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor",
                    "qwen3_vl": "Qwen3VLProcessor", "qwen3_vl_moe": "Qwen3VLProcessor"}
# MoE text fields of the tiny qwen3_vl_moe: 3 layers, layer 1 dense (mlp_only_layers), 8 experts, top-2.
# hidden 64 == 2 * moe_intermediate 32, so gate_up_proj is square per expert: the file layout cannot be
# guessed from shapes and must come from the config, as the loader does.
MOE_TEXT = dict(num_hidden_layers=3, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                decoder_sparse_step=1, mlp_only_layers=[1])


def _special_ids(ids: dict[str, int]) -> dict:
    return {
        "image_token_id": ids["<|image_pad|>"], "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"], "vision_end_token_id": ids["<|vision_end|>"],
    }


def _text_kwargs(vocab: int, ids: dict[str, int], qwen3: bool) -> dict:
    return dict(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=4096,
        hidden_act="silu", eos_token_id=ids["<|im_end|>"], bos_token_id=ids["<|endoftext|>"],
        pad_token_id=None,
        # head_dim 16 -> 8 rotary frequencies split over (t, h, w)
        rope_parameters={"rope_type": "default", "rope_theta": 5e6 if qwen3 else 1e6,
                         "mrope_section": [4, 2, 2] if qwen3 else [2, 3, 3],
                         **({"mrope_interleaved": True} if qwen3 else {})},
        **({"head_dim": 16, "attention_bias": False} if qwen3 else {}),
    )


def _hf_config(family: str, vocab: int, ids: dict[str, int], text_overrides: dict | None = None,
               vision_overrides: dict | None = None):
    common = _special_ids(ids)

    def text(qwen3: bool, moe: dict | None = None) -> dict:
        return {**_text_kwargs(vocab, ids, qwen3), **(moe or {}), **(text_overrides or {})}

    def vis(vision: dict) -> dict:
        return {**vision, **(vision_overrides or {})}

    if family == "qwen2_vl":
        from transformers import Qwen2VLConfig
        vision = dict(depth=2, embed_dim=32, hidden_size=64, mlp_ratio=4, num_heads=2, in_channels=3,
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2, hidden_act="quick_gelu")
        return Qwen2VLConfig(text_config=text(False), vision_config=vis(vision), **common)
    if family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig
        # window_size 112 px = 4 merged tokens a side; block 1 and 3 see the whole image.
        vision = dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=2, in_channels=3,
                      out_hidden_size=64, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                      hidden_act="silu", window_size=112, fullatt_block_indexes=[1, 3], tokens_per_second=2)
        return Qwen2_5_VLConfig(text_config=text(False), vision_config=vis(vision), **common)
    if family == "qwen3_vl":
        from transformers import Qwen3VLConfig
        vision = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, in_channels=3,
                      out_hidden_size=64, patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                      hidden_act="gelu_pytorch_tanh", num_position_embeddings=64,
                      deepstack_visual_indexes=[0, 1])
        return Qwen3VLConfig(text_config=text(True), vision_config=vis(vision), **common)
    if family == "qwen3_vl_moe":
        from transformers import Qwen3VLMoeConfig
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, in_channels=3,
                      out_hidden_size=64, patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                      hidden_act="gelu_pytorch_tanh", num_position_embeddings=64, deepstack_visual_indexes=[0])
        return Qwen3VLMoeConfig(text_config=text(True, MOE_TEXT),
                                vision_config=vis(vision), **common)
    raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


def _hf_model_class(family: str):
    import transformers
    return {"qwen2_vl": transformers.Qwen2VLForConditionalGeneration,
            "qwen2_5_vl": transformers.Qwen2_5_VLForConditionalGeneration,
            "qwen3_vl": transformers.Qwen3VLForConditionalGeneration,
            "qwen3_vl_moe": transformers.Qwen3VLMoeForConditionalGeneration}[family]


def _write_preprocessor(out: Path, family: str) -> None:
    qwen3 = family.startswith("qwen3")
    patch = 16 if qwen3 else 14
    factor = patch * 2
    min_px, max_px = 4 * factor * factor, 256 * factor * factor
    cfg = {
        "min_pixels": min_px, "max_pixels": max_px,
        "size": {"shortest_edge": min_px, "longest_edge": max_px},
        "patch_size": patch, "temporal_patch_size": 2, "merge_size": 2,
        "image_mean": [0.5, 0.5, 0.5] if qwen3 else _CLIP_MEAN,
        "image_std": [0.5, 0.5, 0.5] if qwen3 else _CLIP_STD,
        "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "do_convert_rgb": True,
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": _PROCESSOR_CLASS[family],
    }
    (out / "preprocessor_config.json").write_text(json.dumps(cfg, indent=2))
    video = {**cfg, "video_processor_type": "Qwen3VLVideoProcessor" if qwen3 else "Qwen2VLVideoProcessor",
             "do_sample_frames": False}
    video.pop("image_processor_type")
    (out / "video_preprocessor_config.json").write_text(json.dumps(video, indent=2))


def _flatten_config(out: Path, family: str) -> None:
    """Rewrite config.json in the layout the original Hub files have (before transformers 4.52)."""
    path = out / "config.json"
    cur = json.loads(path.read_text())
    text = cur.pop("text_config")
    vis = cur.pop("vision_config")
    rope = dict(text.pop("rope_parameters"))
    theta = rope.pop("rope_theta")
    rope.pop("rope_type", None)
    for k in ("model_type", "layer_types", "dtype", "torch_dtype", "use_sliding_window", "sliding_window",
              "max_window_layers"):
        text.pop(k, None)
    if family.startswith("qwen3"):
        # Qwen3-VL's Hub files are nested already, but with rope_scaling + rope_theta in text_config.
        text["rope_scaling"] = {"mrope_interleaved": True, "mrope_section": rope["mrope_section"],
                                "rope_type": "default"}
        text["rope_theta"] = theta
        text["model_type"] = f"{family}_text"
        if family == "qwen3_vl_moe":
            # The Hub's MoE files say num_experts and store experts [E, in, out].
            text["num_experts"] = text.pop("num_local_experts")
            _transpose_experts(out)
        vis.pop("rope_parameters", None)
        flat = {**cur, "text_config": text, "vision_config": vis}
    else:
        vis.pop("rope_parameters", None)
        vis.pop("model_type", None)
        if family == "qwen2_vl":
            # The original Qwen2-VL vision_config spells the channel count in_chans and repeats the patch size.
            vis["in_chans"] = vis.pop("in_channels")
            vis["spatial_patch_size"] = vis["patch_size"]
        else:
            vis["in_chans"] = vis.pop("in_channels")
        flat = {**cur, **text, "rope_theta": theta,
                "rope_scaling": {"type": "mrope", "mrope_section": rope["mrope_section"]},
                "use_sliding_window": False, "sliding_window": 32768, "vision_config": vis}
    flat["model_type"] = family
    path.write_text(json.dumps(flat, indent=2))


def _transpose_experts(out: Path) -> None:
    """Rewrite every safetensors file with fused expert tensors as [E, in, out] (the Hub's MoE layout)."""
    from safetensors.torch import load_file, save_file
    for f in out.glob("*.safetensors"):
        tensors = load_file(f)
        for k, t in tensors.items():
            if k.endswith((".experts.gate_up_proj", ".experts.down_proj")):
                tensors[k] = t.transpose(1, 2).contiguous()
        save_file(tensors, f, metadata={"format": "pt"})


def make_checkpoint(tmp_dir: str | Path, family: str, layout: str = "current", sharded: bool = False,
                    seed: int = 0, text_overrides: dict | None = None, name: str | None = None,
                    vision_overrides: dict | None = None) -> Path:
    """Build a complete tiny checkpoint folder under `tmp_dir` and return its path.

    layout: "current" (what transformers 5.x writes) or "flat" (the original Hub config.json layout).
    sharded: split the weights over several safetensors files with an index, as large checkpoints are.
    text_overrides: text_config values to change (e.g. num_key_value_heads), in a folder called `name`;
    vision_overrides the same for vision_config (e.g. depth).
    """
    if layout not in ("current", "flat"):
        raise ValueError(f"layout must be 'current' or 'flat', not {layout!r}")
    out = Path(tmp_dir) / (name or f"{family}-{layout}{'-sharded' if sharded else ''}-{seed}")
    out.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(CORPUS, BPE_VOCAB)
    ids = save_tokenizer(tok, out, default_chat_template(family))
    config = _hf_config(family, tok.get_vocab_size(), ids, text_overrides, vision_overrides)
    torch.manual_seed(seed)
    model = _hf_model_class(family)(config).eval()
    with torch.no_grad():
        # transformers zero-initialises biases and sets norm weights to one; perturb every tensor so
        # that parity tests exercise biases, norm weights and sharper logits too.
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(out, max_shard_size="100KB" if sharded else "10GB")
    _write_preprocessor(out, family)
    if layout == "flat":
        _flatten_config(out, family)
    return out


def load_hf_model(model_dir: str | Path, dtype: torch.dtype = torch.float32):
    """The transformers reference model for a tiny checkpoint (eager attention: the exact reference)."""
    family = json.loads((Path(model_dir) / "config.json").read_text())["model_type"]
    return _hf_model_class(family).from_pretrained(model_dir, dtype=dtype, attn_implementation="eager").eval()
