"""EngineInfo: the typed facts a front end may read about a loaded engine.

Front ends (server, web demo, eval) read this instead of reaching into the engine's attributes,
so the engine's internals can change without breaking them, and a new fact (a context length for
`/v1/models`, a model family) is added here once.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class EngineInfo:
    model_name: str
    max_model_len: int | None
    device: str
    dtype: str                              # "float32", "bfloat16", ... (no "torch." prefix)
    pixel_factor: int = 28                  # one vision token covers factor x factor pixels
    default_max_pixels: int | None = None   # the checkpoint's own preprocessor limit
    tokenizer: object | None = None         # for logprob token strings; None on test doubles
    family: str = "qwen2_vl"                # model_type: which prompt and box formats the model speaks
    # the checkpoint's sampling defaults (generation_config.json) for fields a request leaves out;
    # merge them with qwenvl.sampling_params.with_defaults
    generation_defaults: dict = field(default_factory=dict)


def engine_info(engine) -> EngineInfo:
    """The facts of an LLMEngine, read in this one place."""
    pre = engine.preprocessor
    return EngineInfo(model_name=engine.model_name, max_model_len=engine.max_model_len,
                      device=str(engine.device), dtype=str(engine.dtype).replace("torch.", ""),
                      pixel_factor=pre.factor, default_max_pixels=pre.max_pixels, tokenizer=engine.tokenizer,
                      family=engine.cfg.model_type, generation_defaults=dict(engine.generation_defaults))
