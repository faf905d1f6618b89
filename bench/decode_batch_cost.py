"""What a decode step of B sequences costs against a step of one, through the engine (issue 36's target: a
step of 8 <= 1.4x a step of 1, the weights read once for all rows).

    .venv/bin/python bench/decode_batch_cost.py [--model runs/bench_qwen2vl_2b] [--quant int8 int4 bf16]
                                                [--batch 8] [--steps 20] [--rounds 3]

Per quantisation (each in its own process, one model in memory at a time), alternating rounds: B requests of
the same text prompt are prefilled, then `steps` engine steps that decode all B are timed; the same with one
request; the order swaps every round and every request is aborted after its phase (its KV blocks freed). The
products are timed by wrapping qwenvl.kernels' matmul functions, so the split says whether the rows cost in the
weight products or in the rest of the step (attention over B contexts, per-sequence Python). Prints medians.
With the compiled decode stack (layers/decode_stack.py, the default) the layers' products are made from C++,
where no wrapper sees them: "products" is then the output head's alone; QWENVL_DECODE_STACK=off gives the
per-product split of the layers' own path.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_overhead import PRODUCTS, time_calls  # noqa: E402


def _start(engine, batch: int, steps: int, tag: str) -> list[str]:
    """`batch` requests added and stepped until each has its first token: the timed steps only decode."""
    from qwenvl import SamplingParams
    ids = [f"{tag}-{i}" for i in range(batch)]
    for rid in ids:
        engine.add_request(rid, engine.prepare([{"role": "user", "content": "Describe a quiet harbour at dawn."}]),
                           SamplingParams(temperature=0.0, max_tokens=steps + 64, ignore_eos=True))
    started: set[str] = set()
    while len(started) < batch:
        started.update(out.request_id for out in engine.step() if out.token_ids)
    engine.step()
    return ids


def measure(model: str, quant: str, batch: int, steps: int, rounds: int) -> None:
    from qwenvl import LLM
    spent: dict = {}
    time_calls(spent, PRODUCTS, "products")
    kw = {} if quant == "bf16" else {"quantization": quant}
    llm = LLM(model, dtype=torch.bfloat16, kv_cache_gb=0.5, **kw)
    engine = llm.engine
    results: dict[int, list[tuple[float, float]]] = {1: [], batch: []}
    for r in range(rounds):
        for b in ((1, batch) if r % 2 == 0 else (batch, 1)):
            ids = _start(engine, b, steps, f"r{r}b{b}")
            spent.clear()
            t = time.perf_counter()
            for _ in range(steps):
                engine.step()
            step_ms = 1e3 * (time.perf_counter() - t) / steps
            results[b].append((step_ms, 1e3 * spent.get("products", 0.0) / steps))
            for rid in ids:
                engine.abort(rid)
    one, many = (statistics.median(s for s, _ in results[b]) for b in (1, batch))
    for b in (1, batch):
        step = statistics.median(s for s, _ in results[b])
        prod = statistics.median(p for _, p in results[b])
        print(f"{quant:5s} batch {b:2d}: {step:7.2f} ms/step  products {prod:6.2f}  rest {step - prod:6.2f}"
              f"  rounds: {', '.join(f'{s:.1f}' for s, _ in results[b])}", flush=True)
    print(f"{quant:5s} a step of {batch} / a step of 1: {many / one:.2f}x (target <= 1.4x)", flush=True)
    llm.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="runs/bench_qwen2vl_2b")
    ap.add_argument("--quant", nargs="+", default=["int8", "int4", "bf16"], choices=["bf16", "int8", "int4"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--one", help=argparse.SUPPRESS)           # internal: this process measures one model
    args = ap.parse_args()
    if args.one:
        measure(args.model, args.one, args.batch, args.steps, args.rounds)
        return
    print(f"threads {torch.get_num_threads()}; medians of {args.rounds} alternating rounds of {args.steps} steps")
    for quant in args.quant:
        subprocess.run([sys.executable, __file__, "--one", quant, "--model", args.model, "--batch", str(args.batch),
                        "--steps", str(args.steps), "--rounds", str(args.rounds)], check=True)


if __name__ == "__main__":
    main()
