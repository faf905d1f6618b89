"""Load time: a Q4_K_M GGUF pair of the bench model against qwenvl's own int4 load of the same checkpoint.

    .venv/bin/python bench/gguf_load.py                          # the 2B-width model (throughput.py's)
    .venv/bin/python bench/gguf_load.py --text-layers 6 --vision-depth 4 --rounds 3   # a quicker, smaller one
    .venv/bin/python bench/gguf_load.py --llamacpp-home /work/llamacpp   # Q4_K_M by llama-quantize from there
    .venv/bin/python bench/gguf_load.py --dir CHECKPOINT --gguf Q4_K_M.gguf --mmproj mmproj.gguf [--skip-load]
    ... --q6k-python      each round also loads the GGUF with Q6_K through gguf's numpy dequantisation and
                          the Python int4 quantiser (the path before csrc/q6_k.cpp, and where the kernels do not run)

Targets (issue 39): the GGUF loads in at most 1.2x the time of `LLM(folder, quantization="int4")`'s model load
and decodes at its speed (batch-1 decode through the engine, after the load timing).
Both sides build the whole model (tower included) in bfloat16 through the same post-load steps (fusing,
layouts); the tokenizer, KV pool and engine are left out, as they are the same for both.

The GGUF side: the checkpoint is converted to BF16 by llama.cpp's converter (cached under
runs/gguf_load/), then to Q4_K_M by `llama-quantize` when one is built (--llamacpp-home), else by
bench/gguf_rewrite.py with llama-quantize's Q4_K_M choices approximated: Q4_K for every matrix, Q5_0 where
llama.cpp puts Q6_K (the token table / tied head, half of the ffn_down and attn_v layers), since the `gguf`
package quantises no K-type but our own Q4_K. Rounds alternate the two loads in one process (the machine's
speed drifts); the best of each is reported with the ratio.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402


def _module(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def q4_k_m_like(layers: int):
    """llama-quantize's Q4_K_M rule, approximated with the types we can write (see the docstring)."""
    def type_for(name: str, shape: tuple) -> str | None:
        if len(shape) != 2:
            return None
        if name in ("token_embd.weight", "output.weight"):
            return "Q5_0"
        if name.endswith(("ffn_down.weight", "attn_v.weight")):
            layer = int(name.split(".")[1])
            # llama.cpp's use_more_bits: the first and last eighth of the layers, and every third between
            if layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2:
                return "Q5_0"
        return "Q4_K"
    return type_for


def q4_k_m_file(bf16: Path, out: Path, layers: int, llamacpp_home: str | None) -> Path:
    if out.exists():
        return out
    part = out.with_suffix(".part")
    quantize = next(Path(llamacpp_home).glob("build/**/bin/llama-quantize"), None) if llamacpp_home else None
    if quantize is not None:
        subprocess.run([str(quantize), str(bf16), str(part), "Q4_K_M"], check=True, capture_output=True)
    else:
        _module("gguf_rewrite").rewrite(bf16, part, q4_k_m_like(layers))
    part.rename(out)
    return out


def load_int4(folder: Path):
    from qwenvl.checkpoints.loader import load_model
    from qwenvl.checkpoints.quantize import LoadQuantizer
    return load_model(folder, torch.bfloat16, "cpu", quantizer=LoadQuantizer("int4"), fuse=True)[0]


def load_gguf(lm: Path, mmproj: Path):
    from qwenvl.checkpoints.gguf import load_gguf_model, open_pair
    return load_gguf_model(open_pair(lm, mmproj), torch.bfloat16, torch.device("cpu"), fuse=True)[0]


def load_gguf_q6k_python(lm: Path, mmproj: Path):
    """load_gguf with the Q6_K tensors through gguf's numpy values and Int4Linear.from_weight (the reference)."""
    from qwenvl.checkpoints.gguf import weights
    saved = weights._q6_k_values_in_cpp, weights._q6_k_direct
    weights._q6_k_values_in_cpp, weights._q6_k_direct = (lambda: False), (lambda dtype: False)
    try:
        return load_gguf(lm, mmproj)
    finally:
        weights._q6_k_values_in_cpp, weights._q6_k_direct = saved


def timed(fn, *args) -> float:
    gc.collect()
    t0 = time.perf_counter()
    model = fn(*args)
    seconds = time.perf_counter() - t0
    del model
    gc.collect()
    return seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=1536)
    p.add_argument("--text-layers", type=int, default=28)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=8960)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--vision-depth", type=int, default=32)
    p.add_argument("--vision-width", type=int, default=1280)
    p.add_argument("--dir", default=None, help="checkpoint folder (default: throughput.py's, built if missing)")
    p.add_argument("--llamacpp-home", default=None, help="a llama.cpp build with llama-quantize (else gguf_rewrite)")
    p.add_argument("--gguf", default=None, help="an existing Q4_K_M language-model GGUF of --dir (skips converting)")
    p.add_argument("--mmproj", default=None, help="its projector GGUF (with --gguf)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--decode-tokens", type=int, default=32, help="batch-1 decode tokens timed per run (0: skip)")
    p.add_argument("--skip-load", action="store_true", help="only the decode comparison")
    p.add_argument("--q6k-python", action="store_true",
                   help="each round also a GGUF load with Q6_K through gguf's numpy values and the Python quantiser")
    p.add_argument("--bf16-groups", action="store_true",
                   help="decode also with the GGUF's Q4_K layers as bfloat16 groups of 32 (the form before Q4_K's "
                        "super-blocks), swapped into the same model between runs")
    a = p.parse_args()
    from throughput import build_checkpoint, checkpoint_dir
    folder = checkpoint_dir(a)
    if not (folder / "BENCH_COMPLETE").exists():
        print(f"building {folder} ...", file=sys.stderr)
        build_checkpoint(folder, a)
    if a.gguf:
        lm, mmproj = Path(a.gguf), Path(a.mmproj)
    else:
        vs = _module("vs_llamacpp")
        out = ROOT / "runs" / "gguf_load" / folder.name
        out.mkdir(parents=True, exist_ok=True)
        lm_bf16, mmproj = out / f"{folder.name}-bf16.gguf", out / f"mmproj-{folder.name}-bf16.gguf"
        if not (lm_bf16.exists() and mmproj.exists()):
            print("converting to BF16 GGUF ...", file=sys.stderr)
            tree = vs.source_tree(Path.home() / ".cache" / "qwenvl" / "llama-cpp-python", None)
            vs.convert_pair(tree, folder, out, "bf16")
        lm = q4_k_m_file(lm_bf16, out / f"{folder.name}-Q4_K_M.gguf", a.text_layers, a.llamacpp_home)
    print(f"threads {torch.get_num_threads()}; {lm.name}: {lm.stat().st_size / 2**20:.0f} MiB", file=sys.stderr)
    ours, gguf, python_q6k = [], [], []
    for r in range(0 if a.skip_load else a.rounds):
        ours.append(timed(load_int4, folder))
        gguf.append(timed(load_gguf, lm, mmproj))
        line = f"round {r + 1}: int4 load {ours[-1]:.2f} s, Q4_K_M GGUF load {gguf[-1]:.2f} s"
        if a.q6k_python:
            python_q6k.append(timed(load_gguf_q6k_python, lm, mmproj))
            line += f", GGUF load with Python Q6_K {python_q6k[-1]:.2f} s"
        print(line, file=sys.stderr)
    print(f"| {folder.name}, best of {a.rounds} | qwenvl int4 from bf16 safetensors | Q4_K_M GGUF + mmproj | ratio |")
    if ours:
        print(f"| load | {min(ours):.2f} s | {min(gguf):.2f} s | {min(gguf) / min(ours):.2f}x |")
    if python_q6k:
        print(f"| load, Q6_K through numpy + Python int4 | {min(ours):.2f} s | {min(python_q6k):.2f} s | "
              f"{min(python_q6k) / min(ours):.2f}x |")
        print("per round (GGUF / int4, Python-Q6_K GGUF / int4): " + ", ".join(
            f"{g / o:.2f} / {p / o:.2f}" for o, g, p in zip(ours, gguf, python_q6k)))
    if a.decode_tokens:
        ours, gguf, *older = decode_rates(folder, lm, mmproj, a)
        print(f"| batch-1 decode | {max(ours):.2f} tok/s | {max(gguf):.2f} tok/s | {max(gguf) / max(ours):.2f}x |")
        print("decode rounds (int4, GGUF tok/s): " + ", ".join(f"{o:.2f} / {g:.2f}" for o, g in zip(ours, gguf)))
        if older:
            print(f"| batch-1 decode, Q4_K as bfloat16 groups of 32 | {max(ours):.2f} tok/s | {max(older[0]):.2f} "
                  f"tok/s | {max(older[0]) / max(ours):.2f}x |")
            print("rounds (bf16-group GGUF tok/s): " + ", ".join(f"{g:.2f}" for g in older[0]))


def decode_rates(folder: Path, lm: Path, mmproj: Path, a) -> tuple[list[float], list[float]]:
    """Batch-1 decode tokens/s of both models through the engine, alternating runs (after one off the clock).
    The GGUF's Q4_K layers have groups of 32 (the file's blocks, Q4_K's super-block parameters: 4.625 bits a
    weight), ours groups of 128 (4.25 bits): the bytes and the int4 kernel's cost per group are what this shows."""
    from qwenvl import LLM
    from throughput import stream_request
    llms = [LLM(str(folder), dtype="bfloat16", quantization="int4", kv_cache_gb=0.1),
            LLM(str(lm), mmproj=str(mmproj), dtype="bfloat16", kv_cache_gb=0.1)]
    short = [{"role": "user", "content": "Describe the picture."}]
    swaps = bf16_group_swaps(llms[1].engine.model) if a.bf16_groups else []
    sides = [(llms[0], False), (llms[1], False)] + ([(llms[1], True)] if swaps else [])
    rates: tuple[list[float], ...] = tuple([] for _ in sides)
    for r in range(a.rounds + 1):
        for side, (llm, swapped) in enumerate(sides):
            for parent, name, current, other in swaps:
                setattr(parent, name, other if swapped else current)
            _, times, _ = stream_request(llm, short, a.decode_tokens + 1)
            if r:
                rates[side].append(a.decode_tokens / (times[-1] - times[0]))
    for parent, name, current, _ in swaps:
        setattr(parent, name, current)
    return rates


def bf16_group_swaps(model) -> list[tuple]:
    """(parent, name, the Q4_K super-block layer, the same codes with its scales and mins rounded to bfloat16 per
    group of 32): the form the loader gave Q4_K in a bfloat16 model before the super-blocks (5 bits a weight)."""
    from qwenvl.kernels import int4_layout
    from qwenvl.layers.quantized_linear import LAYOUT_TILES, Int4Linear
    swaps = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, Int4Linear) and child.super_blocks:
                n, k = child.out_features, child.in_features
                scales, mins = int4_layout.unpack_params(child.group_params)
                q = int4_layout.unpack(child.packed, k)[:n]
                other = Int4Linear.from_scales_and_mins(q, scales[:n].to(torch.bfloat16), mins[:n].to(torch.bfloat16),
                                                        32, child.bias, layout=LAYOUT_TILES, dtype=torch.bfloat16)
                swaps.append((parent, name, child, other))
    return swaps


if __name__ == "__main__":
    main()
