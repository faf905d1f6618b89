"""Decode cost of sparsity: a Qwen3-VL-30B-A3B-shaped MoE (random bf16) against its dense twin, whose MLP is
as wide as the k active experts together (same attention, widths, vocabulary). Targets: MoE batch-1 decode
>= 0.6x the twin's in bf16 (issue 25), >= 0.9x in int4 (issue 36: every expert through the int4 kernel), i.e.
sparsity costs routing, not reading every expert.

    .venv/bin/python bench/moe_vs_dense.py --layers 4                      # bf16; ~5 GiB of checkpoints in /tmp
    .venv/bin/python bench/moe_vs_dense.py --layers 4 --quantization int4  # both quantised to int4 at load
    .venv/bin/python bench/moe_vs_dense.py --layers 2 --quantization int4 --rounds 3 --keep   # alternate rounds

Both load in bf16 (or quantised at load) and decode the same number of greedy steps after a 16-token prompt;
the MoE model reads 8 of 128 experts per token, so both read about the same bytes per token.

`--rounds N` loads both models once, fused as the engine loads them, and times them in N alternating rounds
(medians) of decode steps through a paged KV pool, as the engine decodes: both through the compiled decode
stack (layers/decode_stack.py). The MoE is also timed through its layers' own forwards (QWENVL_DECODE_STACK=off:
"moe, layers") and, with int4, through the grouped path (a call per chosen expert, no stack), so the stack's
and the pair kernel's gains are measured in one process. `--keep` leaves the checkpoints in --dir and reuses
them next time.
"""

from __future__ import annotations

import argparse
import shutil
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from moe_load import run  # noqa: E402


def _decode_ms(model, cfg, steps: int) -> tuple[float, list[int]]:
    """ms per greedy decode step after a 16-token prompt, and the tokens (both paths must agree), through a paged
    KV pool as the engine decodes (so the compiled decode stack and the decode-attention kernel run where they
    would there)."""
    from qwenvl.layers.paged_attention import PagedAttention, PagedKVPool
    text = cfg.text
    block = 16
    table = list(range((16 + steps) // block + 1))
    pool = PagedKVPool(text.num_hidden_layers, len(table), block, text.num_key_value_heads, text.head_dim,
                       dtype=next(model.parameters()).dtype)
    ids = torch.arange(16)
    with torch.inference_mode():
        hidden = model(ids, ids.expand(3, 16), PagedAttention(pool, [table], [16], [16]), None, [])
        tok, toks = int(model.compute_logits(hidden[-1:]).argmax()), []
        t = time.perf_counter()
        for i in range(steps):
            attn = PagedAttention(pool, [table], [17 + i], [1])
            hidden = model(torch.tensor([tok]), torch.full((3, 1), 16 + i), attn, None, [])
            tok = int(model.compute_logits(hidden).argmax())
            toks.append(tok)
    return 1e3 * (time.perf_counter() - t) / steps, toks


def _without_stack(fn):
    """fn() with QWENVL_DECODE_STACK=off: every layer's own forward."""
    os.environ["QWENVL_DECODE_STACK"] = "off"
    try:
        return fn()
    finally:
        del os.environ["QWENVL_DECODE_STACK"]


def alternate(moe_dir: Path, dense_dir: Path, steps: int, rounds: int, quantization: str) -> None:
    """Both models in memory, N alternating rounds; int4 MoE with the pair kernel and the grouped path."""
    import statistics
    import qwenvl.layers.quantized_moe as quantized_moe
    from qwenvl.checkpoints.loader import load_model
    from qwenvl.checkpoints.quantize import LoadQuantizer
    quantizer = (lambda: LoadQuantizer(quantization)) if quantization else (lambda: None)
    moe, moe_cfg = load_model(moe_dir, dtype="bfloat16", quantizer=quantizer(), fuse=True)
    dense, dense_cfg = load_model(dense_dir, dtype="bfloat16", quantizer=quantizer(), fuse=True)
    pair_limit = quantized_moe.PAIR_KERNEL_MAX_PAIRS
    sides = {"dense twin": lambda: _decode_ms(dense, dense_cfg, steps)}
    sides["moe"] = lambda: _decode_ms(moe, moe_cfg, steps)
    sides["moe, layers"] = lambda: _without_stack(lambda: _decode_ms(moe, moe_cfg, steps))
    if quantization == "int4":
        def grouped():
            quantized_moe.PAIR_KERNEL_MAX_PAIRS = 0            # every expert through its own layer call
            try:
                return _without_stack(lambda: _decode_ms(moe, moe_cfg, steps))
            finally:
                quantized_moe.PAIR_KERNEL_MAX_PAIRS = pair_limit
        sides["moe, grouped path"] = grouped
    ms: dict[str, list[float]] = {name: [] for name in sides}
    tokens: dict[str, list[int]] = {}
    for r in range(rounds):
        for name in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
            t, tokens[name] = sides[name]()
            ms[name].append(t)
    for name, values in ms.items():
        print(f"{name:>18}: {statistics.median(values):7.2f} ms/step  rounds: {', '.join(f'{v:.1f}' for v in values)}")
    dense_ms = statistics.median(ms["dense twin"])
    target = 0.9 if quantization == "int4" else 0.6
    for name in [n for n in ms if n != "dense twin"]:
        ratio = dense_ms / statistics.median(ms[name])
        print(f"{name} / dense-twin decode, {quantization or 'bf16'}: {ratio:.2f}x (target >= {target}: "
              f"{'met' if ratio >= target else 'below target'}); threads {torch.get_num_threads()}")
    if "moe, grouped path" in tokens:
        print("pair kernel and grouped path: same greedy tokens" if tokens["moe"] == tokens["moe, grouped path"]
              else "pair kernel and grouped path: the greedy tokens differ (sums in another order: near ties)")


def build(out: Path, layers: int, dense: bool) -> None:
    cmd = [sys.executable, str(Path(__file__).with_name("moe_load.py")), "--build-only", "--layers", str(layers),
           "--dir", str(out)] + (["--dense-twin"] if dense else [])
    subprocess.run(cmd, check=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/qwenvl_moe_vs_dense"))
    ap.add_argument("--quantization", default="", choices=("", "int8", "int4"), help="quantise both at load")
    ap.add_argument("--rounds", type=int, default=0, help="both models loaded once, N alternating rounds")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints in --dir and reuse them")
    args = ap.parse_args()
    if args.rounds:
        paths = {dense: args.dir / ("dense_twin" if dense else "moe") for dense in (False, True)}
        for dense, path in paths.items():
            if not (args.keep and (path / "model.safetensors.index.json").exists()):
                build(path, args.layers, dense)
        try:
            alternate(paths[False], paths[True], args.steps, args.rounds, args.quantization)
        finally:
            if not args.keep:
                shutil.rmtree(args.dir, ignore_errors=True)
        return
    results = {}
    try:
        for name, dense in (("moe", False), ("dense twin", True)):
            path = args.dir / name.replace(" ", "_")
            t0 = time.perf_counter()
            build(path, args.layers, dense)
            print(f"built {name}: {args.layers} layers in {time.perf_counter() - t0:.0f} s", flush=True)
            results[name] = run(path, args.steps, quantization=args.quantization)
            shutil.rmtree(path, ignore_errors=True)
            r = results[name]
            print(f"{name:>10}: decode {r['tok_s']:.2f} tok/s, model {r['model_gib']:.2f} GiB, load {r['load_s']:.1f} s",
                  flush=True)
    finally:
        shutil.rmtree(args.dir, ignore_errors=True)
    ratio = results["moe"]["tok_s"] / results["dense twin"]["tok_s"]
    target = 0.9 if args.quantization == "int4" else 0.6
    print(f"MoE / dense-twin decode, {args.quantization or 'bf16'}: {ratio:.2f}x (target >= {target}: "
          f"{'met' if ratio >= target else 'below target'}); threads {torch.get_num_threads()}")


if __name__ == "__main__":
    main()
