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

class ConfigError(ValueError):
    """A config.json we cannot read; the message names the file and the field."""


def require(d: dict, key: str, where: str, source: str):
    """d[key], or a ConfigError naming the file and the field (`where` is its path prefix)."""
    if key not in d:
        raise ConfigError(f"{source}: missing field {where}{key}")
    return d[key]


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
    model_type: str                  # a family of models/registry.py
    text: TextConfig
    vision: VisionConfig
    image_token_id: int
    video_token_id: int
    vision_start_token_id: int
    vision_end_token_id: int
    eos_token_ids: tuple[int, ...] = field(default=())
    # How the family's videos enter the prompt (from its models/<family>/family.py)
    video_timestamps: bool = False          # `<t seconds>` text before each temporal patch (Qwen3-VL)
    video_time_in_positions: bool = False   # the M-RoPE time axis counts real seconds (Qwen2.5-VL)

    @property
    def family(self) -> str:
        return self.model_type

    @classmethod
    def from_hf(cls, raw: dict, family, source: str = "config.json") -> "ModelConfig":
        """Read a `config.json` dict of any layout for `family` (a models/family.py Family: the registry looks
        it up from `model_type` in `registry.config_from_hf`, so this module needs no family of its own)."""
        # Nested text_config wins; the original flat files keep every text field at the root.
        text_raw = {**raw, **raw.get("text_config", {})}
        text = _read_text(raw, text_raw, family, source)
        vision = family.read_vision(raw.get("vision_config", {}), text.hidden_size, source)
        eos = text_raw.get("eos_token_id", raw.get("eos_token_id"))
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        return cls(
            model_type=family.model_type, text=text, vision=vision,
            image_token_id=require(raw, "image_token_id", "", source),
            video_token_id=require(raw, "video_token_id", "", source),
            vision_start_token_id=require(raw, "vision_start_token_id", "", source),
            vision_end_token_id=raw.get("vision_end_token_id", raw["vision_start_token_id"] + 1),
            eos_token_ids=eos_ids, video_timestamps=family.video_timestamps,
            video_time_in_positions=family.video_time_in_positions,
        )


def read_config_json(model_dir: str | Path) -> tuple[dict, str]:
    """(the parsed config.json of a checkpoint folder, its path for error messages)."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{path}: not found; a checkpoint folder must hold config.json")
    try:
        return json.loads(path.read_text(encoding="utf-8")), str(path)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None


def _read_text(raw: dict, text_raw: dict, family, source: str) -> TextConfig:
    def need(key):
        return require(text_raw, key, "text_config.", source)

    rope = text_raw.get("rope_parameters") or text_raw.get("rope_scaling") or {}
    if "mrope_section" not in rope:
        raise ConfigError(f"{source}: no mrope_section in rope_scaling/rope_parameters")
    rope_theta = rope.get("rope_theta", text_raw.get("rope_theta", 10000.0))
    hidden, heads = need("hidden_size"), need("num_attention_heads")
    defaults = family.text_defaults
    tie = raw.get("tie_word_embeddings", raw.get("text_config", {}).get("tie_word_embeddings", False))
    return TextConfig(
        vocab_size=need("vocab_size"), hidden_size=hidden, intermediate_size=need("intermediate_size"),
        num_hidden_layers=need("num_hidden_layers"), num_attention_heads=heads,
        num_key_value_heads=text_raw.get("num_key_value_heads", heads),
        head_dim=text_raw.get("head_dim") or hidden // heads,
        rms_norm_eps=text_raw.get("rms_norm_eps", 1e-6),
        rope_theta=float(rope_theta),
        mrope_section=tuple(rope["mrope_section"]),
        mrope_interleaved=bool(rope.get("mrope_interleaved", defaults.mrope_interleaved)),
        max_position_embeddings=text_raw.get("max_position_embeddings", 32768),
        hidden_act=text_raw.get("hidden_act", "silu"),
        attention_bias=bool(text_raw.get("attention_bias", defaults.attention_bias)),
        qk_norm=defaults.qk_norm,
        tie_word_embeddings=bool(tie),
        **(family.read_text_extra(text_raw, source) if family.read_text_extra else {}),
    )
