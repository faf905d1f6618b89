"""Where batch-1 bf16 decode time goes: a torch.profiler table of engine steps, and the bf16
matrix-vector kernel's bandwidth set against plain reads, measured in the same run.

    .venv/bin/python bench/profile_decode.py [--dir runs/bench_qwen2vl_...] [--steps 30]

Decode reads every weight once per token, so its time is (bytes / bandwidth the matmul kernel reaches)
+ everything else (Python per step, small kernels, sampling). The profiler table shows the second
part (everything that is not aten::mm / aten::addmm); section 2 shows the first: how fast the bf16
matrix-vector product on the widest Qwen2-VL-2B matrix reads its weight, next to a tensor sum (a
read-only pass) and a copy. When the kernel reads far slower than the sum, no engine-side change can
bring decode near the read roofline; only a different kernel (or fewer bytes: int8/int4) can.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import throughput  # noqa: E402  (the bench's workload, checkpoint and request helpers)


def timed(fn, repeats: int) -> float:
    """Seconds per call of fn, after one warm-up call."""
    fn()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


def profile_steps(model_dir: Path, steps: int) -> None:
    """Profile `steps` batch-1 greedy decode steps of one image request through the engine."""
    from qwenvl import LLM, SamplingParams
    llm = LLM(str(model_dir), dtype=torch.bfloat16, kv_cache_gb=0.1)
    eng = llm.engine
    messages = throughput.conversation(*throughput.workload(1, seed0=7)[0])
    throughput.stream_request(llm, messages, 4)                # first-call costs off the profile
    eng.add_request("profiled", eng.prepare(messages),
                    SamplingParams(temperature=0.0, max_tokens=steps + 8, ignore_eos=True))
    for _ in range(5):                                         # prefill + a few decode steps
        eng.step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            eng.step()
        per_step = (time.perf_counter() - t0) / steps
    table = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in table)
    matmul = sum(e.self_cpu_time_total for e in table if e.key in ("aten::mm", "aten::addmm"))
    print(f"1. {steps} decode steps: {1e3 * per_step:.1f} ms/step; matmuls {100 * matmul / total:.0f}% of "
          f"the profiled self CPU time, the rest {100 * (1 - matmul / total):.0f}%")
    print(table.table(sort_by="self_cpu_time_total", row_limit=15))


def kernel_bandwidth(out_features: int, in_features: int, repeats: int = 20) -> None:
    """bf16 [1, K] x [N, K]^T bandwidth against a read-only pass and a copy of a 512 MiB tensor."""
    big = torch.ones(256 * 2**20, dtype=torch.bfloat16)        # 512 MiB, far beyond any cache
    dst = torch.empty_like(big)
    read = big.numel() * 2 / timed(big.sum, 5)
    copy = 2 * big.numel() * 2 / timed(lambda: dst.copy_(big), 5)
    del big, dst
    x = torch.randn(1, in_features, dtype=torch.bfloat16)
    w = torch.randn(out_features, in_features, dtype=torch.bfloat16)
    gate_up = torch.randn(2 * out_features, in_features, dtype=torch.bfloat16)
    mv = w.numel() * 2 / timed(lambda: F.linear(x, w), repeats)
    fused = gate_up.numel() * 2 / timed(lambda: F.linear(x, gate_up), repeats)
    print(f"2. bandwidth: read-only sum {read / 1e9:.1f} GB/s, copy (read+write) {copy / 1e9:.1f} GB/s")
    print(f"   bf16 linear [1,{in_features}]x[{out_features},{in_features}]^T reads {mv / 1e9:.1f} GB/s "
          f"= {100 * mv / read:.0f}% of the read-only pass; fused [{2 * out_features},{in_features}] "
          f"{fused / 1e9:.1f} GB/s ({fused / mv:.2f}x)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default=None, help="a bench checkpoint (default: the smallest runs/bench_qwen2vl_*)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--hidden", type=int, default=1536)
    p.add_argument("--intermediate", type=int, default=8960)
    a = p.parse_args()
    found = sorted((throughput.ROOT / "runs").glob("bench_qwen2vl_*/BENCH_COMPLETE"))
    if a.dir is None and not found:
        sys.exit("no bench checkpoint: run bench/throughput.py first (it builds one), or pass --dir")
    model_dir = Path(a.dir) if a.dir else found[0].parent
    print(f"checkpoint {model_dir.name}; torch {torch.__version__}, {torch.get_num_threads()} threads "
          f"(timings on a shared machine are noisy)")
    profile_steps(model_dir, a.steps)
    kernel_bandwidth(a.intermediate, a.hidden)


if __name__ == "__main__":
    main()
