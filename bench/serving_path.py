"""Where a decode step's time goes on the bundled model (issue 37's per-token serving path), without HTTP.

    .venv/bin/python bench/serving_path.py                      # int8, batch 1 and 32, 3 rounds
    .venv/bin/python bench/serving_path.py --batch 1,32 --quantization none --steps 200

`batch` text requests (ignore_eos, greedy, logprobs=0 as bench/vs_llama_server.py's clients ask) are decoded
together; once all are past prefill, `steps` engine steps are timed, and inside each step its parts, by
wrapping the engine's own methods on the instance:
  schedule     Scheduler.schedule
  inputs       ModelRunner.step minus the parts below (packing ids/positions, the PagedAttention object)
  forward      model.forward (the language model over the paged cache)
  logits       model.compute_logits
  sample       the sampler (logprobs, penalties, argmax / draw)
  postprocess  Scheduler.postprocess, which calls the engine's _decide: stop checks and detokenising
  outputs      building the RequestOutputs (LLMEngine._output)
  step         the whole LLMEngine.step
"other" = step - the parts. It runs the qwenvl that Python imports (the venv's editable install: this checkout), so
`PYTHONPATH=/path/to/other/checkout` measures another version of the engine with the same script. Medians over rounds of per-step means in microseconds. The machine these were
first taken on was shared (2 cores, other jobs): read the split, not the absolute numbers.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict

PARTS = ("schedule", "inputs", "forward", "logits", "sample", "postprocess", "outputs")


class PartClock:
    """Accumulates the time spent in wrapped callables, by name."""

    def __init__(self):
        self.total = defaultdict(float)

    def wrap(self, name: str, fn):
        total = self.total

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                total[name] += time.perf_counter() - t0
        return timed


def instrument(engine) -> PartClock:
    clock = PartClock()
    engine.scheduler.schedule = clock.wrap("schedule", engine.scheduler.schedule)
    engine.scheduler.postprocess = clock.wrap("postprocess", engine.scheduler.postprocess)
    engine._output = clock.wrap("outputs", engine._output)
    runner = engine.runner
    runner.step = clock.wrap("runner", runner.step)
    runner.sampler = clock.wrap("sample", runner.sampler)
    model = runner.model
    runner.model = _Proxy(model, forward=clock.wrap("forward", model.forward),
                          compute_logits=clock.wrap("logits", model.compute_logits))
    engine.step = clock.wrap("step", engine.step)
    return clock


class _Proxy:
    def __init__(self, model, **methods):
        self._model, self._methods = model, methods

    def __getattr__(self, name):
        return self._methods.get(name) or getattr(self._model, name)


def one_round(engine, clock: PartClock, batch: int, steps: int, round_no: int) -> dict:
    from qwenvl import SamplingParams
    params = SamplingParams(temperature=0, max_tokens=steps + 8, ignore_eos=True, logprobs=0)
    for i in range(batch):
        prompt = engine.prepare([{"role": "user", "content": f"Round {round_no}, request {i}: describe a red "
                                  "square on a white page with a small table and a chart."}])
        engine.add_request(f"r{round_no}-{i}", prompt, params)
    while any(s.num_uncomputed_tokens > 1 for s in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()
    engine.step()
    clock.total.clear()
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step()
    wall = time.perf_counter() - t0
    row = {name: 1e6 * clock.total[name] / steps for name in (*PARTS, "runner", "step")}
    row["inputs"] = row["runner"] - row["forward"] - row["logits"] - row["sample"]
    row["other"] = row["step"] - sum(row[p] for p in PARTS)
    row["wall"] = 1e6 * wall / steps
    for rid in list(engine._requests):
        engine.abort(rid)
    assert engine.block_manager.num_used_blocks == 0 or engine.config.enable_prefix_caching
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", default="1,32", help="comma list of batch sizes")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--quantization", default="int8", help="int8, int4 or none")
    p.add_argument("--dtype", default="bfloat16")
    a = p.parse_args()
    import torch
    from qwenvl.engine.llm_engine import EngineConfig, LLMEngine
    quant = None if a.quantization == "none" else a.quantization
    engine = LLMEngine(None, dtype=a.dtype, device="cpu", config=EngineConfig(kv_cache_gb=0.25, quantization=quant))
    clock = instrument(engine)
    batches = [int(b) for b in a.batch.split(",")]
    rows = defaultdict(list)
    for r in range(a.rounds):
        for b in batches:
            rows[b].append(one_round(engine, clock, b, a.steps, r))
    print(f"bundled model, {a.quantization}, {a.dtype}, torch threads {torch.get_num_threads()}; "
          f"median over {a.rounds} rounds of {a.steps} steps; us per step")
    cols = ("wall", "step", *PARTS, "other")
    print("| batch | " + " | ".join(cols) + " |")
    print("|---|" + "---|" * len(cols))
    for b in batches:
        med = {c: statistics.median(row[c] for row in rows[b]) for c in cols}
        print(f"| {b} | " + " | ".join(f"{med[c]:.0f}" for c in cols) + " |")


if __name__ == "__main__":
    main()
