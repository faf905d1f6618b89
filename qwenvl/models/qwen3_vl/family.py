"""Qwen3-VL and its mixture-of-experts variant as families: q/k norm, interleaved M-RoPE, no q/k/v bias,
timestamped videos; the MoE files add the expert fields in one of two layouts (see TextConfig)."""

from __future__ import annotations

from ..family import Family, TextDefaults, positive_int, read_windowed_vision

QWEN3_TEXT = TextDefaults(mrope_interleaved=True, attention_bias=False, qk_norm=True)


def read_moe_fields(text_raw: dict, source: str) -> dict:
    """The MoE fields of a qwen3_vl_moe text config: transformers 5.x writes `num_local_experts` and
    [E, out, in] experts, the Hub files `num_experts` and [E, in, out]."""
    local = "num_local_experts" in text_raw
    experts = positive_int({"num_experts": text_raw.get("num_local_experts", text_raw.get("num_experts"))},
                           "num_experts", source)
    return dict(num_experts=experts,
                num_experts_per_tok=positive_int(text_raw, "num_experts_per_tok", source),
                moe_intermediate_size=positive_int(text_raw, "moe_intermediate_size", source),
                decoder_sparse_step=positive_int(text_raw, "decoder_sparse_step", source, default=1),
                mlp_only_layers=tuple(text_raw.get("mlp_only_layers") or ()), experts_stored_in_out=not local)


FAMILY = Family(model_type="qwen3_vl", model_class="qwenvl.models.qwen3_vl.model:Qwen3VLModel",
                read_vision=read_windowed_vision, text_defaults=QWEN3_TEXT, video_timestamps=True)
MOE_FAMILY = Family(model_type="qwen3_vl_moe", model_class="qwenvl.models.qwen3_vl.model:Qwen3VLModel",
                    read_vision=read_windowed_vision, text_defaults=QWEN3_TEXT, read_text_extra=read_moe_fields,
                    video_timestamps=True)
