"""The synchronous Python API (shared/DESIGN.md section 3): `LLM().chat(messages, SamplingParams(...))`."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path
from typing import Iterator

from .engine.llm_engine import EngineConfig, LLMEngine
from .answers.grounding import declared_grounding_prompt, grounding_prompt
from .answers.ocr import OcrResult, ocr_messages, ocr_request, postprocess
from .answers.outputs import RequestOutput
from .sampling_params import SamplingParams, with_defaults
from .structured.tool_parser import parse_tool_calls
from .structured.tools import parse_tool_use

_ids = itertools.count()


class LLM:
    """One model on one device, with its own engine and caches (a new instance starts cold).

    `LLM()` loads the bundled demonstration model; `LLM("path/to/checkpoint")` any Qwen2-VL, Qwen2.5-VL
    or Qwen3-VL folder as saved by Hugging Face, or a Hub id such as `LLM("Qwen/Qwen2.5-VL-3B-Instruct")`
    (local Hub cache first, `revision` picks a branch/tag/commit; see qwenvl/hub.py), or llama.cpp's GGUF
    files: `LLM("model-Q4_K_M.gguf", mmproj="mmproj-model-f16.gguf")` or a folder holding one of each. `dtype` defaults to bfloat16, except
    on a CPU without fast bfloat16 matrix products (most laptops), where it is float32.
    `tensor_parallel_size=N` splits the language model over N processes (GPUs 0..N-1 on CUDA; see README);
    `shutdown()` ends them.
    """

    def __init__(self, model: str | Path | None = None, dtype: str | None = None, device: str = "auto",
                 revision: str | None = None, **engine_options):
        self.engine = LLMEngine(model, dtype=dtype, device=device, config=EngineConfig(**engine_options),
                                revision=revision)

    @property
    def family(self) -> str:
        return self.engine.cfg.model_type

    def chat(self, messages: list[dict], params: SamplingParams | None = None,
             chat_template_kwargs: dict | None = None, tools: list[dict] | None = None,
             tool_choice: str | dict | None = None) -> RequestOutput:
        """One conversation -> its finished output (text, token_ids, finish_reason, logprobs, boxes).
        `chat_template_kwargs` are template variables, e.g. {"enable_thinking": False} for Qwen3 Thinking.
        `tools` / `tool_choice` as in OpenAI's API: the calls the model makes are in `out.tool_calls`."""
        return self.generate([messages], params, chat_template_kwargs=chat_template_kwargs,
                             tools=tools, tool_choice=tool_choice)[0]

    def choices(self, messages: list[dict], params: SamplingParams | None = None, n: int = 2,
                **chat_options) -> list[RequestOutput]:
        """n answers to one conversation, batched (the prompt's prefix cache serves the later ones); choice i
        samples with seed + i (OpenAI's and DashScope's `n`). `chat_options` as for chat()."""
        params = params or SamplingParams()
        return self.generate([messages] * n, params.for_choices(n), **chat_options)

    def generate(self, conversations: list[list[dict]], params: SamplingParams | list[SamplingParams] | None = None,
                 chat_template_kwargs: dict | None = None, tools: list[dict] | None = None,
                 tool_choice: str | dict | None = None) -> list[RequestOutput]:
        """Many conversations batched through the engine; outputs in the order given.

        Every conversation is checked before any is queued, so a bad one raises without side effects.
        """
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]          # one conversation passed bare
        if params is None or isinstance(params, SamplingParams):
            params = [params or self.sampling_params()] * len(conversations)
        if len(params) != len(conversations):
            raise ValueError(f"{len(params)} SamplingParams for {len(conversations)} conversations")
        use = parse_tool_use(tools, tool_choice)
        if use is not None:
            params = [use.constrain(p) for p in params]
        declared = list(use.tools) if use is not None else None
        prompts = [self.engine.prepare(c, chat_template_kwargs, declared) for c in conversations]
        ids = [f"llm-{next(_ids)}" for _ in prompts]
        try:
            for rid, prompt, p in zip(ids, prompts, params):
                self.engine.add_request(rid, prompt, p)
            done: dict[str, RequestOutput] = {}
            while len(done) < len(ids):
                for out in self.engine.step():
                    if out.finished:
                        done[out.request_id] = out
        except BaseException:
            for rid in ids:                  # Ctrl-C or an error: never leave requests holding blocks
                self.engine.abort(rid)
            raise
        outs = [done[rid] for rid in ids]
        if use is not None and use.parses_calls:
            for out in outs:
                out.tool_calls = parse_tool_calls(out.text)[1]
        return outs

    def stream(self, messages: list[dict], params: SamplingParams | None = None,
               chat_template_kwargs: dict | None = None) -> Iterator[RequestOutput]:
        """One conversation's outputs as the engine steps: `out.delta_text` is the new text, the last output
        has `finish_reason` (and the boxes). Closing the iterator early, or Ctrl-C, aborts the request."""
        prompt = self.engine.prepare(messages, chat_template_kwargs)
        rid = f"llm-{next(_ids)}"
        self.engine.add_request(rid, prompt, params or self.sampling_params())
        finished = False
        try:
            while not finished:
                for out in self.engine.step():
                    if out.request_id == rid:
                        finished = out.finished
                        yield out
        finally:
            if not finished:
                self.engine.abort(rid)       # its KV blocks are free again

    def sampling_params(self, **given) -> SamplingParams:
        """SamplingParams of `given` (None = not given) over the checkpoint's generation_config.json defaults
        (temperature, top_p, top_k, repetition_penalty); what chat/generate use when `params` is None."""
        return SamplingParams(**with_defaults(given, self.engine.generation_defaults))

    def ground(self, image, description: str, params: SamplingParams | None = None) -> RequestOutput:
        """Localise `description` in `image` with the checkpoint's declared grounding prompt, else its family's
        own; see `out.boxes`."""
        prompt = declared_grounding_prompt(self.engine.model_dir, description) \
            or grounding_prompt(self.family, description)
        messages = [{"role": "user", "content": [{"image": image}, {"text": prompt}]}]
        return self.chat(messages, params or SamplingParams(temperature=0.0, max_tokens=256))

    def ocr(self, image, task: str = "text_recognition", result_schema: dict | None = None,
            params: SamplingParams | None = None) -> OcrResult:
        """One of DashScope's OCR tasks on `image` (see qwenvl/ocr.py): the answer in the task's shape."""
        req = ocr_request(task, self.family, result_schema)
        p = params or SamplingParams(temperature=0.0, max_tokens=1024)
        if req.structured is not None:
            p = dataclasses.replace(p, structured=req.structured)
        out = self.chat(ocr_messages(image, req.prompt), p)
        return postprocess(task, out.text, out.boxes)

    def stats(self) -> dict:
        return self.engine.stats()

    def shutdown(self) -> None:
        """End the worker processes of `tensor_parallel_size > 1` (they also end when the LLM is garbage
        collected or the interpreter exits); a no-op for one process."""
        self.engine.shutdown()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
