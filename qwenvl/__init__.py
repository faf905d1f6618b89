"""qwenvl: an open implementation of the Qwen-VL system.

    from qwenvl import LLM, SamplingParams
    out = LLM().chat([{"role": "user", "content": [{"image": "examples/shapes.png"}, {"text": "What color is the circle?"}]}])
"""

from .sampling_params import SamplingParams


def __getattr__(name):
    # Importing qwenvl stays cheap (no torch) until the model is actually used.
    if name == "LLM":
        from .llm import LLM
        return LLM
    if name == "RequestOutput":
        from .outputs import RequestOutput
        return RequestOutput
    raise AttributeError(f"module 'qwenvl' has no attribute {name!r}")


__all__ = ["LLM", "RequestOutput", "SamplingParams"]
