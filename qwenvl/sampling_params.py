"""Per-request sampling parameters, shaped like vLLM's so users coming from it feel at home."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from .structured.spec import StructuredOutput


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0          # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0                    # 0 (or -1) means no top-k cut
    max_tokens: int = 256
    seed: int | None = None           # a seeded request samples the same alone and in any batch
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False          # keep generating past eos (benchmarks: both sides make max_tokens tokens)
    min_tokens: int = 0               # eos, stop_token_ids and stop strings cannot end generation before this many
    logprobs: int | None = None       # top-k logprobs per generated token (0 = only the chosen one)
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    # Grammar-constrained output: StructuredOutput.json_object(), .json_schema(schema) or .tool_call(tools,
    # name). Generation may end (eos) only where the grammar is complete; the schema is checked when the
    # request is added (InvalidStructuredOutputError, a ValueError).
    structured: StructuredOutput | None = None

    def __post_init__(self):
        # Accept lists and a single string for convenience, store tuples (the dataclass is frozen).
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop or ()))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids or ()))
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)
        problems = [f"{name} must be a finite number, got {getattr(self, name)}"
                    for name in ("temperature", "top_p", "repetition_penalty", "presence_penalty")
                    if not math.isfinite(getattr(self, name))]
        if self.temperature < 0:
            problems.append(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            problems.append(f"top_k must be >= 0 (or -1 for none), got {self.top_k}")
        if self.max_tokens < 1:
            problems.append(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            problems.append(f"min_tokens must be in 0..max_tokens ({self.max_tokens}), got {self.min_tokens}")
        if self.repetition_penalty <= 0:
            problems.append(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            problems.append(f"logprobs must be in 0..20, got {self.logprobs}")
        if self.structured is not None and not isinstance(self.structured, StructuredOutput):
            problems.append(f"structured must be a StructuredOutput, got {type(self.structured).__name__}")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def for_choices(self, n: int) -> list["SamplingParams"]:
        """Params for n choices of one prompt: choice i samples with seed + i, so a seeded request gives n
        different, reproducible choices (unseeded ones differ anyway)."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if n == 1 or self.seed is None:
            return [self] * n
        return [dataclasses.replace(self, seed=self.seed + i) for i in range(n)]

# The sampling fields a checkpoint's generation_config.json may set for requests that leave them out (vLLM's
# "generation config" defaults; max_tokens stays the request's own).
CHECKPOINT_SAMPLING_KEYS = ("temperature", "top_p", "top_k", "repetition_penalty")


def checkpoint_sampling_defaults(model_dir) -> dict:
    """{field: value} from `model_dir`/generation_config.json for the keys above; {} when the file is absent.

    `"do_sample": false` means greedy decoding, as transformers' generate() reads it, so temperature becomes 0.
    A value SamplingParams refuses is a ValueError naming the file, at load rather than on every request.
    """
    path = Path(model_dir) / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not readable JSON ({e})") from None
    defaults = {k: config[k] for k in CHECKPOINT_SAMPLING_KEYS
                if isinstance(config.get(k), (int, float)) and not isinstance(config.get(k), bool)}
    if "top_k" in defaults:
        defaults["top_k"] = int(defaults["top_k"])
    if config.get("do_sample") is False:
        defaults["temperature"] = 0.0
    try:
        SamplingParams(**defaults)
    except ValueError as e:
        raise ValueError(f"{path}: sampling defaults SamplingParams refuses: {e}") from None
    return defaults


def with_defaults(given: dict, defaults: dict | None) -> dict:
    """SamplingParams keyword arguments: the request's values (None = not given) over the checkpoint's
    defaults (checkpoint_sampling_defaults / EngineInfo.generation_defaults). The one place front ends merge them."""
    return {**(defaults or {}), **{k: v for k, v in given.items() if v is not None}}
