"""`qwenvl serve`'s latency options where the command line leaves them out: how many prompt tokens a step
that decodes may run (`--max-prefill-tokens-while-decoding`) and how much vision tower (`--vision-rows-per-step`,
images then encoded ahead, a slice per step), chosen by the model's size.

Why: a step that decodes and also prefills a prompt chunk or encodes an image makes every running stream wait
for it. Capping that work keeps tokens flowing under load, at some throughput; the right cap depends on what a
step costs. Measured with bench/vs_llama_server.py on this project's 2-core VM (bench/README.md, 2026-12-07):
  * a 2B-width model (int8, 16 clients with images): no caps gave 6.3x llama-server's tokens/s but one gap
    between tokens 86x the median (an image's prefill stalling every stream); 256 / 8192: 4.8x, gaps 16x;
    64 / 1024: 2.9x, the 99th-percentile gap 3.0x the median, time to first token still under half
    llama-server's. Decoding is a weight read there, and 64 prompt tokens cost about one such read.
  * the bundled model (a few MB, every step mostly fixed cost): 64 / 1024 cut 32-client requests/s from
    2.35-2.39x llama-server's to 1.73-1.85x, and time to first token rose above llama-server's; 256 / 8192 kept
    the gaps short enough (its steps take a few ms) at full throughput.
So a model under openmp.SMALL_MODEL_BYTES of weights (the same line as its one-thread rule) gets 256 / 8192, any
other (or one not measured here: a Hub id, an Ollama name) 64 / 1024. `qwenvl.LLM` (offline batches) keeps
neither cap: there, throughput is what counts. 0 on the command line turns a cap off.
"""

from __future__ import annotations

from . import openmp

SMALL_MODEL_CAPS = (256, 8192)      # (prompt tokens, vision rows x blocks) a decoding step may run
MODEL_CAPS = (64, 1024)


def latency_caps(model: str | None) -> tuple[int, int]:
    """(prefill tokens, vision rows) for `model` (a local folder or GGUF file, a Hub id; None: the bundled one)."""
    size = openmp.local_weight_bytes(model)
    return SMALL_MODEL_CAPS if size is not None and size < openmp.SMALL_MODEL_BYTES else MODEL_CAPS


def fill_latency_options(args, model: str | None) -> None:
    """Set args.max_prefill_tokens_while_decoding / vision_rows_per_step where the user gave neither value."""
    prefill, rows = latency_caps(model)
    if getattr(args, "max_prefill_tokens_while_decoding", None) is None:
        args.max_prefill_tokens_while_decoding = prefill
    if getattr(args, "vision_rows_per_step", None) is None:
        args.vision_rows_per_step = rows
