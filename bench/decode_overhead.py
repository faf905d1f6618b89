"""The part of a batch-1 decode step that is not the weight product, three ways in one process, alternating
rounds: the layers' PyTorch ops ("layers": QWENVL_DECODE_STACK=off QWENVL_DECODE_OPS=off), qwenvl's element-wise
decode kernels called from the layers ("ops": residual add + RMSNorm, rotary, silu * up, paged decode attention:
csrc/decode_ops_kernel.hpp; QWENVL_DECODE_STACK=off), and the whole step's layers in one compiled call ("stack":
csrc/decode_stack.cpp, the default).

    .venv/bin/python bench/decode_overhead.py [--model runs/bench_qwen2vl_2b] [--quant bf16 int8 int4]
                                              [--steps 30] [--rounds 3] [--bundled]

Per quantisation (each in its own process, so one model is in memory at a time): one request decodes
greedily; each round times `steps` engine steps in each mode, the order rotating every round. The weight
products are timed by wrapping qwenvl.kernels' matmul functions (as the lead's decode_step_split.py does), so
"rest" = step - products (the decode kernels' own calls are timed the same way). The stack makes the same
product calls from C++, where no wrapper sees them: its "rest" is its step less the "ops" mode's products.
Prints the medians over rounds. `--bundled` does the same on the bundled model (LLM() with no argument; no
products are wrapped there: bf16 products at its widths are tiny). Read the modes against each other (one
process, alternating rounds), not against numbers taken on another day.
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
    total_steps = len(("layers", "ops", "stack")) * rounds * (steps + 1) + 16
    eng.add_request("bench", eng.prepare(messages),
                    SamplingParams(temperature=0.0, max_tokens=total_steps, ignore_eos=True))
    for _ in range(6):                                  # the prefill and a few warm decode steps
        eng.step()
    modes = {"layers": {"QWENVL_DECODE_STACK": "off", "QWENVL_DECODE_OPS": "off"},
             "ops": {"QWENVL_DECODE_STACK": "off", "QWENVL_DECODE_OPS": ""},
             "stack": {"QWENVL_DECODE_STACK": "", "QWENVL_DECODE_OPS": ""}}
    order = list(modes)
    results = {mode: [] for mode in modes}
    for r in range(rounds):
        for mode in order[r % 3:] + order[:r % 3]:
            os.environ.update(modes[mode])
            eng.step()                                  # one untimed step after the switch
            spent.clear()
            t = time.perf_counter()
            for _ in range(steps):
                eng.step()
            step_ms = 1e3 * (time.perf_counter() - t) / steps
            products_ms = 1e3 * spent.get("products", 0.0) / steps
            results[mode].append((step_ms, products_ms, 1e3 * spent.get("ops", 0.0) / steps))
    name = "bundled" if model is None else quant
    ops_products = statistics.median(p for _, p, _ in results["ops"])
    for mode in modes:
        step = statistics.median(s for s, _, _ in results[mode])
        prod = ops_products if mode == "stack" else statistics.median(p for _, p, _ in results[mode])
        rest = step - prod if mode == "stack" else statistics.median(s - p for s, p, _ in results[mode])
        ops = statistics.median(o for _, _, o in results[mode])
        print(f"{name:8s} {mode:6s}: {step:7.2f} ms/step  products {prod:6.2f}  rest {rest:6.2f}"
              f" (of which decode kernels called from Python {ops:5.2f})"
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
