"""What an engine version answers, as one digest: run it under two checkouts and compare (issue 37's "outputs
identical before/after" check for per-token path changes).

    .venv/bin/python bench/same_outputs.py                                       # this checkout
    PYTHONPATH=/path/to/other/checkout .venv/bin/python bench/same_outputs.py   # another version of qwenvl

The bundled model, int8, one thread. Two engines: the defaults, and a small KV pool with chunked prefill under
decodes and vision slices (so requests are preempted and recomputed). Each runs 6 text requests (greedy, seeded
sampling, top-k/top-p with a repetition penalty, stop strings, min_tokens, logprobs) and 6 requests with two
generated images each. Per request: token ids, text, finish reason, prompt / image tokens, logprobs; per engine:
the KV blocks in use afterwards and the preemptions. Prints the qwenvl it imported, those counts and a SHA-256 of
everything (`--out FILE` writes the JSON too); equal digests: the same outputs, bit for bit.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))      # serving_workload only; qwenvl as Python finds it

import serving_workload as wl  # noqa: E402

CONFIGS = {"defaults": {},
           "small pool, slices": {"max_prefill_tokens_while_decoding": 64, "vision_rows_per_step": 512,
                                  "num_kv_blocks": 40}}


def requests(pool) -> list[tuple[list[dict], dict]]:
    text = [
        dict(temperature=0, max_tokens=40, ignore_eos=True, logprobs=0),
        dict(temperature=0.8, seed=3, max_tokens=30, logprobs=2),
        dict(temperature=0, max_tokens=25, stop=["e"]),
        dict(temperature=1.0, top_k=20, top_p=0.9, seed=11, max_tokens=33, repetition_penalty=1.2),
        dict(temperature=0, max_tokens=50, min_tokens=10),
        dict(temperature=0.7, seed=5, max_tokens=20, ignore_eos=True),
    ]
    out = [([{"role": "user", "content": f"Question {i}: what is on the page?"}], p) for i, p in enumerate(text)]
    for i in range(6):
        content = [{"image": pool[i], "max_pixels": 200000}, {"image": pool[i + 1], "max_pixels": 100000},
                   {"text": f"describe {i}"}]
        out.append(([{"role": "user", "content": content}],
                    dict(temperature=0 if i % 2 else 0.9, seed=i, max_tokens=30 + 7 * i, ignore_eos=True, logprobs=1)))
    return out


def run(config: dict, pool) -> dict:
    from qwenvl import SamplingParams
    from qwenvl.engine.llm_engine import EngineConfig, LLMEngine
    engine = LLMEngine(None, dtype="bfloat16", device="cpu", config=EngineConfig(quantization="int8", **config))
    for i, (messages, params) in enumerate(requests(pool)):
        engine.add_request(f"r{i}", engine.prepare(messages), SamplingParams(**params))
    answers = {}
    while engine.has_unfinished():
        for o in engine.step():
            if o.finished:
                answers[o.request_id] = [o.token_ids, o.text, o.finish_reason, o.prompt_tokens, o.image_tokens,
                                         o.logprobs]
    return {"answers": answers, "kv_blocks_after": engine.block_manager.num_used_blocks,
            "preemptions": engine.scheduler.num_preemptions}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="also write the outputs as JSON here")
    a = p.parse_args()
    import qwenvl
    pool = wl.image_pool(3)
    result = {name: run(config, pool) for name, config in CONFIGS.items()}
    text = json.dumps(result, sort_keys=True)
    if a.out:
        Path(a.out).write_text(text)
    print(f"qwenvl from {Path(qwenvl.__file__).parent}")
    for name, r in result.items():
        print(f"  {name}: {len(r['answers'])} requests answered, KV blocks after {r['kv_blocks_after']}, "
              f"preemptions {r['preemptions']}")
    print(f"sha256 {hashlib.sha256(text.encode()).hexdigest()}")


if __name__ == "__main__":
    main()
