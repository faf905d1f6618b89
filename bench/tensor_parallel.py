"""Tensor parallelism on this machine: batch-1 decode and batched throughput, one process against N.

    .venv/bin/python bench/tensor_parallel.py                       # Qwen2-VL-2B widths, 4 LM layers, N=2
    .venv/bin/python bench/tensor_parallel.py --text-layers 28 --tp 2 --device cuda   # the whole 2B, 2 GPUs

Builds (once, under runs/) a random-weight Qwen2-VL with bench/throughput.py's builder, then runs the same
greedy workload with tensor_parallel_size=1 and =N in this process, one after the other, and prints
ms/token at batch 1, output tokens/s for a batch of text+image requests, and the ratios. Also checks that
both produce the same tokens. On a CPU expect N>1 to be slower (shared cores and memory bandwidth, two
all_reduces per layer over loopback); the point of N>1 there is memory per process, not speed.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import build_checkpoint, checkpoint_dir, conversation, workload  # noqa: E402

from qwenvl import LLM, SamplingParams  # noqa: E402


def measure(model_dir: Path, tp: int, a) -> dict:
    llm = LLM(model_dir, dtype=a.dtype, device=a.device, tensor_parallel_size=tp, kv_cache_gb=0.25)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=a.max_tokens, ignore_eos=True)
        text = [{"role": "user", "content": "Tell me a story."}]
        llm.chat(text, SamplingParams(temperature=0.0, max_tokens=2))          # one-time costs off the clock
        t = time.perf_counter()
        one = llm.chat(text, params)
        ms_per_token = (time.perf_counter() - t) * 1000 / a.max_tokens
        convs = [conversation(img, q) for img, q in workload(a.requests)]
        t = time.perf_counter()
        outs = llm.generate(convs, params)
        tok_s = sum(len(o.token_ids) for o in outs) / (time.perf_counter() - t)
        return {"ms_per_token": ms_per_token, "tok_s": tok_s, "tokens": [one.token_ids] + [o.token_ids for o in outs]}
    finally:
        llm.shutdown()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default=None)
    p.add_argument("--requests", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--dir", default=None)
    p.add_argument("--hidden", type=int, default=1536)
    p.add_argument("--text-layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=8960)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--vision-depth", type=int, default=2)
    p.add_argument("--vision-width", type=int, default=1280)
    a = p.parse_args()
    model_dir = checkpoint_dir(a)
    if not (model_dir / "BENCH_COMPLETE").is_file():
        build_checkpoint(model_dir, a)
    threads = torch.get_num_threads()
    one = measure(model_dir, 1, a)
    torch.set_num_threads(threads)            # tp>1 on a CPU gives each rank 1/N of the threads
    many = measure(model_dir, a.tp, a)
    torch.set_num_threads(threads)
    print(f"{model_dir.name}: {a.text_layers} LM layers, {a.requests} requests x {a.max_tokens} tokens, "
          f"{threads} threads")
    print(f"batch-1 decode: tp=1 {one['ms_per_token']:.1f} ms/token, tp={a.tp} {many['ms_per_token']:.1f} ms/token "
          f"(ratio {many['ms_per_token'] / one['ms_per_token']:.2f}x)")
    print(f"batch throughput: tp=1 {one['tok_s']:.1f} tok/s, tp={a.tp} {many['tok_s']:.1f} tok/s "
          f"(ratio {many['tok_s'] / one['tok_s']:.2f}x)")
    same = one["tokens"] == many["tokens"]
    print(f"same tokens: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
