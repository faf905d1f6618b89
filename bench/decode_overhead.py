"""The part of a batch-1 decode step that is not the weight product, with qwenvl's element-wise decode
kernels (residual add + RMSNorm, rotary, silu * up, paged decode attention: csrc/decode_ops_kernel.hpp) on
and off, in one process, alternating rounds.

    .venv/bin/python bench/decode_overhead.py [--model runs/bench_qwen2vl_2b] [--quant bf16 int8 int4]
                                              [--steps 30] [--rounds 3] [--bundled]

Per quantisation (each in its own process, so one model is in memory at a time): one request decodes
greedily; each round times `steps` engine steps with QWENVL_DECODE_OPS unset (the kernels) and then =off
(PyTorch's ops), swapping the order every round. The weight products are timed by wrapping qwenvl.kernels'
matmul functions (as the lead's decode_step_split.py does), so "rest" = step - products (the decode kernels' own calls are timed the same way). Prints the medians
over rounds. `--bundled` does the same on the bundled model (LLM() with no argument; no products are
wrapped there: bf16 products at its widths are tiny). The machine is shared while this is measured here:
the numbers are noisy; the A/B in one process with alternating rounds is what to read.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

PRODUCTS = ("int4_matmul", "int8_matmul", "bf16_matmul")
DECODE_OPS = ("add_rms_norm", "rotary_", "silu_mul", "paged_decode_attention")


def time_calls(spent: dict, names: tuple[str, ...], key: str) -> None:
    """Time every call of qwenvl.kernels' `names` into spent[key] (seconds)."""
    import qwenvl.kernels as K
    for name in names:
        fn = getattr(K, name)

        def timed(*a, _fn=fn, **k):
            t = time.perf_counter()
            try:
                return _fn(*a, **k)
            finally:
                spent[key] = spent.get(key, 0.0) + time.perf_counter() - t
        setattr(K, name, timed)


def measure(model: str | None, quant: str, steps: int, rounds: int) -> None:
    import throughput
    from qwenvl import LLM, SamplingParams
    spent: dict = {}
    if model is not None:
        time_calls(spent, PRODUCTS, "products")
    time_calls(spent, DECODE_OPS, "ops")
    kw = {} if quant == "bf16" else {"quantization": quant}
    llm = LLM(model, dtype=torch.bfloat16, kv_cache_gb=0.2, **kw) if model else LLM()
    eng = llm.engine
    messages = throughput.conversation(*throughput.workload(1, seed0=7)[0])
    total_steps = 2 * rounds * steps + 16
    eng.add_request("bench", eng.prepare(messages),
                    SamplingParams(temperature=0.0, max_tokens=total_steps, ignore_eos=True))
    for _ in range(6):                                  # the prefill and a few warm decode steps
        eng.step()
    results = {"on": [], "off": []}
    for r in range(rounds):
        for mode in (("on", "off") if r % 2 == 0 else ("off", "on")):
            os.environ["QWENVL_DECODE_OPS"] = "off" if mode == "off" else ""
            eng.step()                                  # one untimed step after the switch
            spent.clear()
            t = time.perf_counter()
            for _ in range(steps):
                eng.step()
            step_ms = 1e3 * (time.perf_counter() - t) / steps
            products_ms = 1e3 * spent.get("products", 0.0) / steps
            results[mode].append((step_ms, products_ms, 1e3 * spent.get("ops", 0.0) / steps))
    name = "bundled" if model is None else quant
    for mode in ("off", "on"):
        step = statistics.median(s for s, _, _ in results[mode])
        prod = statistics.median(p for _, p, _ in results[mode])
        rest = statistics.median(s - p for s, p, _ in results[mode])
        ops = statistics.median(o for _, _, o in results[mode])
        print(f"{name:8s} decode ops {mode:3s}: {step:7.2f} ms/step  products {prod:6.2f}  rest {rest:6.2f}"
              f" (of which the decode kernels {ops:5.2f})"
              f"  rounds: {', '.join(f'{s:.1f}' for s, _, _ in results[mode])}", flush=True)
    llm.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="runs/bench_qwen2vl_2b")
    ap.add_argument("--quant", nargs="+", default=["bf16", "int8", "int4"], choices=["bf16", "int8", "int4"])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--bundled", action="store_true", help="also the bundled model (LLM())")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's); 1 steadies a shared machine")
    ap.add_argument("--one", help=argparse.SUPPRESS)           # internal: this process measures one model
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.one:
        measure(None if args.one == "bundled" else args.model, args.one if args.one != "bundled" else "bf16",
                args.steps, args.rounds)
        return
    print(f"threads {torch.get_num_threads()}; medians of {args.rounds} alternating rounds of {args.steps} steps")
    for one in [*args.quant, *(["bundled"] if args.bundled else [])]:
        subprocess.run([sys.executable, __file__, "--one", one, "--model", args.model, "--steps", str(args.steps),
                        "--rounds", str(args.rounds), *(["--threads", str(args.threads)] if args.threads else [])],
                       check=True)


if __name__ == "__main__":
    main()
