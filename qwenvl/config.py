"""Model configuration: one frozen dataclass per tower, read from any `config.json` layout in the wild.

Three layouts exist for the same checkpoints:
  * the original Hub files: text fields flat at the root, `rope_scaling: {"type": "mrope", ...}`;
  * transformers 4.52+: a nested `text_config` plus flat copies at the root;
  * transformers 5.x: nested `text_config` with `rope_parameters` instead of `rope_scaling`/`rope_theta`.
`tie_word_embeddings` may sit at the root or inside `text_config`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

SUPPORTED_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")


class ConfigError(ValueError):
    """A config.json we cannot read; the message names the file and the field."""


@dataclass(frozen=True)
class VisionConfig:
    depth: int
    width: int                      # ViT hidden size (Qwen2-VL: `embed_dim`)
    num_heads: int
    intermediate_size: int          # ViT MLP width (Qwen2-VL: width * mlp_ratio)
    out_hidden_size: int            # merger output = LLM width
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    in_channels: int = 3
    hidden_act: str = "quick_gelu"
    # Qwen2.5-VL window attention
    window_size: int = 0
    fullatt_block_indexes: tuple[int, ...] = ()
    tokens_per_second: float = 0.0
    # Qwen3-VL
    num_position_embeddings: int = 0
    deepstack_visual_indexes: tuple[int, ...] = ()


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    mrope_section: tuple[int, int, int]
    mrope_interleaved: bool          # Qwen3-VL interleaves t/h/w frequencies; Qwen2/2.5 use chunks
    max_position_embeddings: int
    hidden_act: str = "silu"
    attention_bias: bool = True      # qkv bias (Qwen2/2.5); Qwen3 has none but has q/k RMSNorm
    qk_norm: bool = False
    tie_word_embeddings: bool = False
    # Mixture of experts (qwen3_vl_moe); num_experts 0 means every layer is dense.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    # Expert tensors in the files: transformers 5.x writes [E, out, in] (and `num_local_experts`); the Hub
    # files hold [E, in, out] (and `num_experts`). The model keeps [E, out, in]; the loader transposes.
    experts_stored_in_out: bool = False

    def is_sparse_layer(self, layer_idx: int) -> bool:
        """Whether decoder layer `layer_idx` has the MoE block (the reference's rule)."""
        return (layer_idx not in self.mlp_only_layers and self.num_experts > 0
                and (layer_idx + 1) % self.decoder_sparse_step == 0)


@dataclass(frozen=True)
class ModelConfig:
    model_type: str                  # one of SUPPORTED_MODEL_TYPES
    text: TextConfig
    vision: VisionConfig
    image_token_id: int
    video_token_id: int
    vision_start_token_id: int
    vision_end_token_id: int
    eos_token_ids: tuple[int, ...] = field(default=())

    @property
    def family(self) -> str:
        return self.model_type

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "ModelConfig":
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise ConfigError(f"{path}: not found; a checkpoint folder must hold config.json")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_hf(raw, source=str(path))

    @classmethod
    def from_hf(cls, raw: dict, source: str = "config.json") -> "ModelConfig":
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"{source}: model_type {model_type!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        # Nested text_config wins; the original flat files keep every text field at the root.
        text_raw = {**raw, **raw.get("text_config", {})}
        vis_raw = raw.get("vision_config", {})

        def need(d: dict, key: str, where: str):
            if key not in d:
                raise ConfigError(f"{source}: missing field {where}{key}")
            return d[key]

        rope = text_raw.get("rope_parameters") or text_raw.get("rope_scaling") or {}
        if "mrope_section" not in rope:
            raise ConfigError(f"{source}: no mrope_section in rope_scaling/rope_parameters")
        rope_theta = rope.get("rope_theta", text_raw.get("rope_theta", 10000.0))
        hidden = need(text_raw, "hidden_size", "text_config.")
        heads = need(text_raw, "num_attention_heads", "text_config.")
        is_qwen3 = model_type in ("qwen3_vl", "qwen3_vl_moe")
        tie = raw.get("tie_word_embeddings", raw.get("text_config", {}).get("tie_word_embeddings", False))
        text = TextConfig(
            vocab_size=need(text_raw, "vocab_size", "text_config."),
            hidden_size=hidden,
            intermediate_size=need(text_raw, "intermediate_size", "text_config."),
            num_hidden_layers=need(text_raw, "num_hidden_layers", "text_config."),
            num_attention_heads=heads,
            num_key_value_heads=text_raw.get("num_key_value_heads", heads),
            head_dim=text_raw.get("head_dim") or hidden // heads,
            rms_norm_eps=text_raw.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            mrope_section=tuple(rope["mrope_section"]),
            mrope_interleaved=bool(rope.get("mrope_interleaved", is_qwen3)),
            max_position_embeddings=text_raw.get("max_position_embeddings", 32768),
            hidden_act=text_raw.get("hidden_act", "silu"),
            attention_bias=bool(text_raw.get("attention_bias", not is_qwen3)),
            qk_norm=is_qwen3,
            tie_word_embeddings=bool(tie),
            **(_moe_fields(text_raw, source) if model_type == "qwen3_vl_moe" else {}),
        )

        if model_type == "qwen2_vl":
            # Qwen2-VL: `embed_dim` is the ViT width and `hidden_size` is the LLM width.
            width = need(vis_raw, "embed_dim", "vision_config.")
            vision = VisionConfig(
                depth=need(vis_raw, "depth", "vision_config."), width=width,
                num_heads=need(vis_raw, "num_heads", "vision_config."),
                intermediate_size=int(width * vis_raw.get("mlp_ratio", 4)),
                out_hidden_size=vis_raw.get("hidden_size", hidden),
                patch_size=vis_raw.get("patch_size", vis_raw.get("spatial_patch_size", 14)),
                temporal_patch_size=vis_raw.get("temporal_patch_size", 2),
                spatial_merge_size=vis_raw.get("spatial_merge_size", 2),
                in_channels=vis_raw.get("in_chans", vis_raw.get("in_channels", 3)),
                hidden_act=vis_raw.get("hidden_act", "quick_gelu"),
            )
        else:
            vision = VisionConfig(
                depth=need(vis_raw, "depth", "vision_config."),
                width=need(vis_raw, "hidden_size", "vision_config."),
                num_heads=need(vis_raw, "num_heads", "vision_config."),
                intermediate_size=need(vis_raw, "intermediate_size", "vision_config."),
                out_hidden_size=need(vis_raw, "out_hidden_size", "vision_config."),
                patch_size=vis_raw.get("patch_size", 14),
                temporal_patch_size=vis_raw.get("temporal_patch_size", 2),
                spatial_merge_size=vis_raw.get("spatial_merge_size", 2),
                in_channels=vis_raw.get("in_chans", vis_raw.get("in_channels", 3)),
                hidden_act=vis_raw.get("hidden_act", "silu"),
                window_size=vis_raw.get("window_size", 0),
                fullatt_block_indexes=tuple(vis_raw.get("fullatt_block_indexes", ())),
                tokens_per_second=float(vis_raw.get("tokens_per_second", 0)),
                num_position_embeddings=vis_raw.get("num_position_embeddings", 0),
                deepstack_visual_indexes=tuple(vis_raw.get("deepstack_visual_indexes", ())),
            )

        eos = text_raw.get("eos_token_id", raw.get("eos_token_id"))
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        return cls(
            model_type=model_type, text=text, vision=vision,
            image_token_id=need(raw, "image_token_id", ""),
            video_token_id=need(raw, "video_token_id", ""),
            vision_start_token_id=need(raw, "vision_start_token_id", ""),
            vision_end_token_id=raw.get("vision_end_token_id", raw["vision_start_token_id"] + 1),
            eos_token_ids=eos_ids,
        )


def _moe_fields(text_raw: dict, source: str) -> dict:
    """The MoE fields of a qwen3_vl_moe text config, in either file layout (see TextConfig)."""
    local = "num_local_experts" in text_raw
    experts = text_raw.get("num_local_experts", text_raw.get("num_experts"))
    for key, value in (("num_experts", experts), ("num_experts_per_tok", text_raw.get("num_experts_per_tok")),
                       ("moe_intermediate_size", text_raw.get("moe_intermediate_size"))):
        if not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{source}: text_config.{key} must be a positive integer, got {value!r}")
    step = text_raw.get("decoder_sparse_step", 1)
    if not isinstance(step, int) or step <= 0:
        raise ConfigError(f"{source}: text_config.decoder_sparse_step must be a positive integer, got {step!r}")
    return dict(num_experts=experts, num_experts_per_tok=text_raw["num_experts_per_tok"],
                moe_intermediate_size=text_raw["moe_intermediate_size"], decoder_sparse_step=step,
                mlp_only_layers=tuple(text_raw.get("mlp_only_layers") or ()), experts_stored_in_out=not local)
