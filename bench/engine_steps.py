"""Where serving time goes inside the engine under concurrent image chat, and what scheduler settings do to
it: the profile behind issue 37's engine changes, measured without HTTP.

    .venv/bin/python bench/engine_steps.py                                   # bench/throughput.py's model, 4+4 layers
    .venv/bin/python bench/engine_steps.py --model bundled --clients 8 --requests 32
    .venv/bin/python bench/engine_steps.py --configs "max_num_batched_tokens=2048;max_num_batched_tokens=256"

`--clients` requests are kept in flight (closed loop: a finished one is replaced by the next of the seeded
workload of bench/serving_workload.py, images as PIL images, `ignore_eos`). Every engine step is timed, and
inside it the vision tower and the language model forward. Per configuration (a `;`-separated list of
EngineConfig overrides, each its own LLMEngine, run in alternating rounds with a fresh image pool per round so
no cache carries over):
  * steps by kind: decode only / with a prefill chunk / with a vision encode: count, mean and max ms;
  * inter-token latency (the time between a request's consecutive tokens) p50 / p99 / max, and p99/p50;
  * time to first token p50 / p99, output tokens/s, and the share of wall time in the vision tower,
    the forward and the rest (scheduling, sampling, detokenisation: Python).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import serving_workload as wl  # noqa: E402


class StepClock:
    """Wraps one engine's model.encode_vision (and its stages) and model.forward to time them inside steps."""

    def __init__(self, engine):
        self.engine = engine
        self.vision_s = self.forward_s = 0.0
        model = engine.runner.model
        encode, forward = model.encode_vision, model.forward

        def timed_encode(*args):
            t0 = time.perf_counter()
            try:
                return encode(*args)
            finally:
                self.vision_s += time.perf_counter() - t0

        def timed_forward(*args):
            t0 = time.perf_counter()
            try:
                return forward(*args)
            finally:
                self.forward_s += time.perf_counter() - t0
        def timed_stages(*args):
            stages = model.encode_vision_stages(*args)
            while True:                      # time every slice of a tower run spread over steps
                t0 = time.perf_counter()
                try:
                    rows = next(stages)
                except StopIteration as done:
                    self.vision_s += time.perf_counter() - t0
                    return done.value
                self.vision_s += time.perf_counter() - t0
                yield rows
        methods = dict(encode_vision=timed_encode, forward=timed_forward)
        if hasattr(model, "encode_vision_stages"):
            methods["encode_vision_stages"] = timed_stages
        engine.runner.model = _Proxy(model, **methods)


class _Proxy:
    """The model with some methods replaced; everything else passes through."""

    def __init__(self, model, **methods):
        self._model, self._methods = model, methods

    def __getattr__(self, name):
        return self._methods.get(name) or getattr(self._model, name)


def run_round(engine, clock: StepClock, prompts: list, workload: list[wl.BenchRequest], clients: int) -> dict:
    from qwenvl import SamplingParams
    pending = list(range(len(workload)))
    sent: dict[str, float] = {}
    last: dict[str, float] = {}
    ttft, itl = [], []
    steps: dict[str, list[float]] = defaultdict(list)
    vision0, forward0 = clock.vision_s, clock.forward_s
    out_tokens = 0
    t_start = time.perf_counter()
    while pending or engine.has_unfinished():
        while pending and len(sent) < clients:
            i = pending.pop(0)
            rid = f"r{i}-{time.monotonic_ns()}"
            engine.add_request(rid, prompts[i], SamplingParams(temperature=0, max_tokens=workload[i].max_tokens,
                                                               ignore_eos=True))
            sent[rid] = time.perf_counter()
        plan_kinds = _kinds(engine)
        v0 = clock.vision_s
        t0 = time.perf_counter()
        outs = engine.step()
        now = time.perf_counter()
        kind = "vision" if clock.vision_s > v0 else plan_kinds
        steps[kind].append(now - t0)
        for out in outs:
            rid = out.request_id
            if rid in last:
                itl.append(now - last[rid])
            elif rid in sent:
                ttft.append(now - sent[rid])
            last[rid] = now
            if out.finished:
                out_tokens += len(out.token_ids)
                sent.pop(rid, None)
                last.pop(rid, None)
    wall = time.perf_counter() - t_start
    vision, forward = clock.vision_s - vision0, clock.forward_s - forward0
    p = wl.percentile
    row = {"wall_s": wall, "out_tok_per_s": out_tokens / wall,
           "ttft_p50_ms": 1e3 * p(ttft, 50), "ttft_p99_ms": 1e3 * p(ttft, 99),
           "itl_p50_ms": 1e3 * p(itl, 50), "itl_p99_ms": 1e3 * p(itl, 99), "itl_max_ms": 1e3 * max(itl, default=0),
           "vision_share": vision / wall, "forward_share": forward / wall, "other_share": 1 - (vision + forward) / wall,
           "kv_blocks_after": engine.block_manager.num_used_blocks}
    for kind, ts in steps.items():
        row[f"steps_{kind}"] = (len(ts), 1e3 * sum(ts) / len(ts), 1e3 * max(ts))
    return row


def _kinds(engine) -> str:
    """What the next step holds, judged before it runs: 'decode' when every running request decodes and none
    waits, else 'prefill'. (A step that runs the vision tower is counted as 'vision' afterwards.)"""
    s = engine.scheduler
    if s.waiting or any(q.num_uncomputed_tokens > 1 for q in s.running):
        return "prefill"
    return "decode"


def parse_configs(text: str) -> list[dict]:
    """"a=1,b=2;c=3" -> [{"a": 1, "b": 2}, {"c": 3}]; values are ints, floats, None, True/False."""
    out = []
    for part in text.split(";"):
        cfg = {}
        for item in filter(None, (x.strip() for x in part.split(","))):
            key, _, value = item.partition("=")
            cfg[key.strip()] = _value(value.strip())
        out.append(cfg)
    return out


def _value(v: str):
    if v in ("None", "True", "False"):
        return {"None": None, "True": True, "False": False}[v]
    for kind in (int, float):
        try:
            return kind(v)
        except ValueError:
            pass
    return v


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="2b", help="bundled, 2b (throughput.py's widths) or a checkpoint folder")
    p.add_argument("--text-layers", type=int, default=4)
    p.add_argument("--vision-depth", type=int, default=4)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--requests", type=int, default=12, help="requests per round")
    p.add_argument("--rounds", type=int, default=2, help="alternations of the configurations")
    p.add_argument("--max-pixels", type=int, default=None, help="cap every image (a busy machine: smaller images)")
    p.add_argument("--max-tokens", default="16,64,256", help="the workload's max_tokens choices")
    p.add_argument("--configs", default="", help="';'-separated EngineConfig overrides, e.g. "
                                                 "'max_num_batched_tokens=2048;max_num_batched_tokens=256'")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    from qwenvl.engine.llm_engine import EngineConfig, LLMEngine
    if a.model == "bundled":
        model_dir = None
    elif a.model == "2b":
        from vs_llama_server import bench_checkpoint
        model_dir = bench_checkpoint(a)
    else:
        model_dir = a.model
    configs = parse_configs(a.configs)
    engines = []
    for cfg in configs:
        engine = LLMEngine(model_dir, dtype=a.dtype, device="cpu", config=EngineConfig(kv_cache_gb=1.0, **cfg))
        engines.append((cfg, engine, StepClock(engine)))
    choices = tuple(int(x) for x in a.max_tokens.split(","))
    rows = defaultdict(list)
    for r in range(a.rounds):
        workload = wl.make_workload(a.requests, a.seed + r, max_tokens_choices=choices)
        pool = wl.image_pool(1000 + a.seed + r)         # fresh images each round: no cache carries over
        for cfg, engine, clock in engines:
            prompts = [engine.prepare(_pil_messages(q, workload, pool, a.max_pixels)) for q in workload]
            row = run_round(engine, clock, prompts, workload, a.clients)
            rows[str(cfg)].append(row)
            print(f"round {r + 1} {cfg or 'default'}: {_line(row)}", flush=True)
    print(f"\n{a.model} ({a.text_layers} text / {a.vision_depth} vision layers where built), {a.clients} clients, "
          f"{a.requests} requests x {a.rounds} rounds; medians over rounds where noted")
    for cfg, rs in rows.items():
        med = {k: sorted(x[k] for x in rs)[len(rs) // 2] for k in rs[0] if not k.startswith("steps_")}
        print(f"  {cfg}: {_line(med)}")
        for k in sorted(rs[-1]):
            if k.startswith("steps_"):
                n, mean, mx = rs[-1][k]
                print(f"      last round {k[6:]:8s} steps: {n:4d}, mean {mean:7.1f} ms, max {mx:7.1f} ms")


def _line(row: dict) -> str:
    return (f"{row['out_tok_per_s']:.1f} out tok/s, TTFT p50/p99 {row['ttft_p50_ms']:.0f}/{row['ttft_p99_ms']:.0f} ms, "
            f"ITL p50/p99/max {row['itl_p50_ms']:.0f}/{row['itl_p99_ms']:.0f}/{row['itl_max_ms']:.0f} ms "
            f"(p99/p50 {row['itl_p99_ms'] / row['itl_p50_ms']:.1f}), time: vision {100 * row['vision_share']:.0f}%, "
            f"forward {100 * row['forward_share']:.0f}%, other {100 * row['other_share']:.0f}%; "
            f"KV after {row['kv_blocks_after']}")


def _pil_messages(req: wl.BenchRequest, workload, pool, max_pixels) -> list[dict]:
    """The workload's messages with the pool's PIL images (the engine takes them as they are)."""
    extra = {"max_pixels": max_pixels} if max_pixels else {}
    first = workload[req.earlier] if req.earlier is not None else req
    user = [{"image": pool[j], **extra} for j in first.images] + [{"text": first.question}]
    if req.earlier is None:
        return [{"role": "user", "content": user}]
    return [{"role": "user", "content": user}, {"role": "assistant", "content": wl.ASSISTANT_ANSWER},
            {"role": "user", "content": req.question}]


if __name__ == "__main__":
    main()
