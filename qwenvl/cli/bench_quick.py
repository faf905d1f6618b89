"""`qwenvl bench`: a quick measurement of the loaded model through the engine (the full benchmarks that
compare against transformers live in bench/)."""

from __future__ import annotations

import time

import numpy as np
from PIL import Image

from ..sampling_params import SamplingParams


def _image(seed: int, size: int = 448) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def run_quick_bench(llm, requests: int = 8, max_tokens: int = 32) -> dict:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    conv = lambda i: [{"role": "user", "content": [{"image": _image(i)}, {"text": "Describe the image."}]}]  # noqa: E731
    started = time.perf_counter()
    first = llm.chat(conv(0), SamplingParams(temperature=0.0, max_tokens=1))
    ttft_cold = time.perf_counter() - started
    started = time.perf_counter()
    llm.chat(conv(0), SamplingParams(temperature=0.0, max_tokens=1))
    ttft_warm = time.perf_counter() - started
    started = time.perf_counter()
    outs = llm.generate([conv(i + 1) for i in range(requests)], params)
    batch_s = time.perf_counter() - started
    started = time.perf_counter()
    single = llm.chat(conv(0), params)
    single_s = time.perf_counter() - started
    return {
        "model": llm.engine.model_name, "dtype": str(llm.engine.dtype), "device": str(llm.engine.device),
        "prompt_tokens": first.prompt_tokens, "image_tokens": first.image_tokens,
        "ttft_cold_s": round(ttft_cold, 4), "ttft_same_image_again_s": round(ttft_warm, 4),
        "batch_requests": requests, "batch_output_tokens_per_s": round(sum(len(o.token_ids) for o in outs) / batch_s, 1),
        "single_request_tokens_per_s": round(len(single.token_ids) / single_s, 1),
        "stats": llm.stats(),
    }
