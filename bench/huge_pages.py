"""2 MiB pages against 4 KiB pages for batch-1 decode, in one process (qwenvl/huge_pages.py).

    .venv/bin/python bench/huge_pages.py                       # int8 at Qwen2-VL-2B widths, 6 rounds
    .venv/bin/python bench/huge_pages.py --quantization none   # bf16

Two copies of the same model are loaded in this process: the first is collapsed into 2 MiB pages
(`collapse_resident_memory`, timed) before the second is loaded, so the second keeps 4 KiB pages. Then
both decode the same prompt in alternate rounds (this VM's speed drifts by 10-20% within minutes, which
separate processes would mistake for an effect) and the per-round ratio is printed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import throughput                                           # noqa: E402
from qwenvl import LLM, SamplingParams                      # noqa: E402
from qwenvl.checkpoints.huge_pages import collapse_resident_memory      # noqa: E402

PROMPT = [{"role": "user", "content": "Tell me a long story about a cat."}]


def anon_huge_mib() -> int:
    with open("/proc/self/smaps_rollup") as f:
        return int(f.read().split("AnonHugePages:")[1].split()[0]) >> 10


def decode_rate(llm: LLM, tokens: int) -> float:
    times = throughput.stream_request(llm, PROMPT, tokens)[1]
    return 1 / statistics.median([b - a for a, b in zip(times, times[1:])])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=str(ROOT / "runs" / "bench_qwen2vl_2b"),
                   help="a checkpoint folder (bench/throughput.py builds this one)")
    p.add_argument("--quantization", default="int8", choices=("none", "int8", "int4"))
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--tokens", type=int, default=33)
    a = p.parse_args()
    quantization = None if a.quantization == "none" else a.quantization
    llms = {}
    for name in ("2 MiB", "4 KiB"):
        llms[name] = LLM(a.checkpoint, dtype=torch.bfloat16, kv_cache_gb=0.1, quantization=quantization)
        llms[name].chat(PROMPT, SamplingParams(max_tokens=2))
        if name == "2 MiB":
            report = collapse_resident_memory()
            print(f"collapsed {report.collapsed_bytes >> 20} MiB into 2 MiB pages in {report.seconds:.1f} s"
                  f" ({report.refused_bytes >> 20} MiB refused{': ' + report.reason if report.reason else ''})")
    print(f"anonymous memory on 2 MiB pages: {anon_huge_mib()} MiB (the first copy)")
    rates = {name: [] for name in llms}
    for _ in range(a.rounds):
        for name, llm in llms.items():
            rates[name].append(decode_rate(llm, a.tokens))
    for name, r in rates.items():
        print(f"{a.quantization} decode on {name} pages, tok/s: " + " ".join(f"{x:.2f}" for x in r))
    ratios = [x / y for x, y in zip(rates["2 MiB"], rates["4 KiB"])]
    print("2 MiB / 4 KiB per round: " + " ".join(f"{x:.3f}" for x in ratios)
          + f"; median {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
