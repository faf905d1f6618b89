"""Batch-1 decode step time under different GOMP_SPINCOUNT values (issue 37): how long libgomp's idle worker
threads spin before they sleep. `qwenvl serve` sets 10000 when the user has not (qwenvl/cli/openmp.py);
this measures what that costs or saves on a model whose step is all weight products.

    .venv/bin/python bench/gomp_spin.py --model /work/main/runs/bench_qwen2vl_2b --quant int8
    .venv/bin/python bench/gomp_spin.py --model bundled --quant int8 --steps 200

libgomp reads the variable once, when it is loaded, so every (value, round) is its own process; the values
alternate in order round by round. Each process loads the model, decodes one greedy request (`--steps` engine
steps after 4 warm-up steps, a 60-token prompt) and prints its median step time. "unset" is libgomp's own
default spinning. Medians over rounds, in ms.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def child(model: str, quant: str, steps: int) -> None:
    from qwenvl.engine.llm_engine import EngineConfig, LLMEngine
    from qwenvl.sampling_params import SamplingParams
    engine = LLMEngine(None if model == "bundled" else model, dtype="bfloat16", device="cpu",
                       config=EngineConfig(kv_cache_gb=0.25, quantization=None if quant == "bf16" else quant))
    prompt = engine.prepare([{"role": "user", "content": " ".join(["describe the chart and the table"] * 10)}])
    engine.add_request("r", prompt, SamplingParams(temperature=0, max_tokens=steps + 8, ignore_eos=True))
    times = []
    for i in range(steps + 5):
        t0 = time.perf_counter()
        engine.step()
        if i >= 5:
            times.append(time.perf_counter() - t0)
    print(json.dumps({"median_ms": 1e3 * statistics.median(times)}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="bundled", help="bundled or a checkpoint folder")
    p.add_argument("--quant", default="int8", help="bf16, int8 or int4")
    p.add_argument("--values", default="unset,10000", help="comma list of GOMP_SPINCOUNT values (unset: none)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        child(a.model, a.quant, a.steps)
        return
    values = a.values.split(",")
    results: dict[str, list[float]] = {v: [] for v in values}
    for r in range(a.rounds):
        for v in (values if r % 2 == 0 else values[::-1]):
            env = dict(os.environ)
            env.pop("GOMP_SPINCOUNT", None)
            if v != "unset":
                env["GOMP_SPINCOUNT"] = v
            out = subprocess.run([sys.executable, __file__, "--child", "--model", a.model, "--quant", a.quant,
                                  "--steps", str(a.steps)], env=env, capture_output=True, text=True, check=True)
            ms = json.loads(out.stdout.strip().splitlines()[-1])["median_ms"]
            results[v].append(ms)
            print(f"round {r} GOMP_SPINCOUNT={v}: {ms:.2f} ms a step", file=sys.stderr, flush=True)
    print(f"{a.model} {a.quant}, batch-1 decode step, median over {a.rounds} rounds (ms):")
    for v, ms in results.items():
        print(f"  GOMP_SPINCOUNT={v}: {statistics.median(ms):.2f}  (rounds: {', '.join(f'{x:.2f}' for x in ms)})")


if __name__ == "__main__":
    main()
