"""Streaming load of a Qwen3-VL-30B-A3B-shaped MoE checkpoint (random weights) with int4 quantisation.

Builds the checkpoint layer by layer in a child process (one shard per layer, never the whole model in
memory), then loads it here with quantization="int4" and decodes a few tokens. Prints load time, peak RSS
of the loading process (ru_maxrss, measured before decoding), the model's in-memory size, decode tok/s,
and a linear extrapolation to all 48 layers. The checkpoint is deleted at the end.

    .venv/bin/python bench/moe_load.py --layers 12 --dir /tmp/moe30b   # ~15 GB on disk, needs ~18 GiB free
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

HIDDEN, EXPERTS, TOP_K, MOE_I, HEADS, KV, HEAD_DIM, VOCAB, FULL_LAYERS = 2048, 128, 8, 768, 32, 4, 128, 151936, 48


DENSE_3B = dict(hidden_size=2048, intermediate_size=11008, num_attention_heads=16, num_key_value_heads=2)  # 36 layers


def _config(layers: int, dense_twin: bool = False, dense_3b: bool = False) -> dict:
    """The 30B-A3B shape; dense_twin: the same model with a dense MLP as wide as the k active experts together
    (the decode cost sparsity should approach: bench/moe_vs_dense.py)."""
    dense_twin = dense_twin or dense_3b
    moe = {} if dense_twin else dict(moe_intermediate_size=MOE_I, num_local_experts=EXPERTS,
                                     num_experts_per_tok=TOP_K, decoder_sparse_step=1, mlp_only_layers=[])
    text = dict(model_type="qwen3_vl_text" if dense_twin else "qwen3_vl_moe_text", vocab_size=VOCAB,
                hidden_size=HIDDEN, intermediate_size=TOP_K * MOE_I if dense_twin else 6144,
                num_hidden_layers=layers, num_attention_heads=HEADS, num_key_value_heads=KV, head_dim=HEAD_DIM,
                **moe, rms_norm_eps=1e-6, max_position_embeddings=4096,
                hidden_act="silu", attention_bias=False, tie_word_embeddings=False,
                rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [24, 20, 20],
                                 "mrope_interleaved": True})
    if dense_3b:          # a ~3B dense model of the same family, the speed the MoE's 3B active should reach
        text.update(DENSE_3B)
    # A one-block vision tower: this bench is about the language model's load path.
    vision = dict(depth=1, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=HIDDEN,
                  patch_size=16, spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
                  hidden_act="gelu_pytorch_tanh", num_position_embeddings=2304, deepstack_visual_indexes=[0])
    return dict(model_type="qwen3_vl" if dense_twin else "qwen3_vl_moe", text_config=text, vision_config=vision, image_token_id=151655,
                video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
                tie_word_embeddings=False)


def build(out: Path, layers: int, dense_twin: bool = False, dense_3b: bool = False) -> None:
    """Write the checkpoint: each shard's tensors are generated, saved and dropped before the next."""
    from safetensors.torch import save_file
    from qwenvl.models.registry import config_from_hf
    from qwenvl.models import build_model
    out.mkdir(parents=True, exist_ok=True)
    cfg_raw = _config(layers, dense_twin, dense_3b)
    (out / "config.json").write_text(json.dumps(cfg_raw))
    with torch.device("meta"):
        shapes = {k: (tuple(v.shape), v.dtype) for k, v in build_model(config_from_hf(cfg_raw)).state_dict().items()}
    groups: dict[str, list[str]] = {}
    for key in shapes:
        part = key.split(".layers.")[1].split(".")[0] if ".language_model.layers." in key else "rest"
        groups.setdefault(part, []).append(key)
    weight_map = {}
    g = torch.Generator().manual_seed(0)
    for part, keys in groups.items():
        name = f"model-{part}.safetensors"
        tensors = {k: (torch.randn(shapes[k][0], generator=g, dtype=torch.float32) * 0.02).to(torch.bfloat16)
                   for k in keys}
        save_file(tensors, out / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in keys})
        del tensors
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def run(ckpt: Path, steps: int, quantization: str) -> dict:
    from qwenvl.layers.attention import ContiguousKVCache
    from qwenvl.checkpoints.loader import load_model
    from qwenvl.checkpoints.quantize import LoadQuantizer
    t0 = time.perf_counter()
    model, cfg = load_model(ckpt, dtype="bfloat16", quantizer=LoadQuantizer(quantization) if quantization else None)
    load_s = time.perf_counter() - t0
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    size_gib = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers())) / 2**30
    cache = ContiguousKVCache(cfg.text.num_hidden_layers)
    ids = torch.arange(16)
    with torch.inference_mode():
        hidden = model(ids, ids.expand(3, 16), cache, None, [])
        tok = int(model.compute_logits(hidden[-1:]).argmax())
        t1 = time.perf_counter()
        for i in range(steps):
            hidden = model(torch.tensor([tok]), torch.full((3, 1), 16 + i), cache, None, [])
            tok = int(model.compute_logits(hidden).argmax())
        decode_s = time.perf_counter() - t1
    return dict(load_s=load_s, peak_rss_gib=peak_gib, model_gib=size_gib, tok_s=steps / decode_s)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/qwenvl_moe_bench"))
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--quantization", default="int4")
    ap.add_argument("--build-only", action="store_true")
    ap.add_argument("--dense-twin", action="store_true", help="with --build-only: the dense twin")
    ap.add_argument("--dense-3b", action="store_true",
                    help="a ~3B dense model (hidden 2048, MLP 11008, 16/2 heads; use --layers 36) instead of the MoE")
    args = ap.parse_args()
    if args.build_only:
        build(args.dir, args.layers, args.dense_twin, args.dense_3b)
        return
    try:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--build-only", "--layers", str(args.layers), "--dir", str(args.dir)]
                       + (["--dense-3b"] if args.dense_3b else []), check=True)
        disk_gib = sum(f.stat().st_size for f in args.dir.iterdir()) / 2**30
        print(f"built {args.layers} layers: {disk_gib:.1f} GiB on disk in {time.perf_counter() - t0:.0f} s")
        r = run(args.dir, args.steps, args.quantization)
    finally:
        shutil.rmtree(args.dir, ignore_errors=True)
    print(f"{args.quantization or 'bf16'} load {r['load_s']:.1f} s, peak RSS {r['peak_rss_gib']:.2f} GiB, "
          f"model in memory {r['model_gib']:.2f} GiB (peak/model {r['peak_rss_gib'] / r['model_gib']:.2f}x), "
          f"decode {r['tok_s']:.2f} tok/s")
    if args.dense_3b:
        return
    per_layer_s = 1 / r["tok_s"] / args.layers          # upper bound: counts head/embedding time as layer time
    print(f"extrapolated to {FULL_LAYERS} layers: load ~{r['load_s'] * FULL_LAYERS / args.layers:.0f} s, "
          f"decode >= {1 / (per_layer_s * FULL_LAYERS):.2f} tok/s")


if __name__ == "__main__":
    main()
