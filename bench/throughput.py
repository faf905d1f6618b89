"""Engine throughput, decode roofline, time to first token and peak memory: qwenvl against transformers.

    .venv/bin/python bench/throughput.py                        # Qwen2-VL-2B dims, 16 requests, 32 output tokens
    .venv/bin/python bench/throughput.py --requests 4 --max-tokens 8 --text-layers 4 --vision-depth 4  # quick look

A random-weight model with Qwen2-VL-2B dimensions (LM hidden 1536, 28 layers, 12 heads, 2 KV heads,
intermediate 8960, vocab 151936, tied embeddings; ViT 32 layers, width 1280) is built once with
transformers' own class and saved in bfloat16 under runs/ (a small BPE tokenizer; embedding rows past its
vocabulary are never looked up, but the lm_head over all 151936 rows is computed as in the real model).

Each side runs in its own child process, one after the other (so that its peak RSS is its own and the
other model's memory and threads stay out of its timings); the parent prints the report:
  1. throughput: N requests (images of mixed sizes around 448x448 plus a question, greedy, a fixed output
     length with ignore_eos) through qwenvl (`LLM.generate`) and through transformers' batched `generate`
     (one call, left padding); output tokens/s of each and the ratio;
  2. batch-1 decode tokens/s against the roofline: LM weight bytes read per token (decoder layers, final
     norm, lm_head) / memory bandwidth measured by the parent with a 1 GiB tensor copy (read+write);
  3. time to first token (preprocessing included) for a cold image and for a second turn on the same image;
  4. peak RSS (ru_maxrss) of each child.
Each child first runs one small request, so one-time costs stay off the clock.
Both sides compute in --dtype: by default what qwenvl picks on this CPU (bfloat16 where its products are
fast, float32 elsewhere); `--dtype bfloat16` forces it, to see what the automatic choice saves.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

QUESTIONS = ["Describe this image.", "What is in the picture?", "What colours do you see in this image?",
             "Is there any text in the image? Read it."]
# Sizes around 448x448 (width, height); smart_resize keeps them (multiples of 28): 192..324 image tokens.
SIZES = [(448, 448), (392, 504), (504, 392), (420, 476), (476, 420), (448, 392), (392, 448), (504, 448)]
CORPUS = [
    "Describe this image. What is in the picture? The cat sits on the red mat near the window.",
    "A chart shows sales rising from 2019 to 2024; the blue bar is the tallest one.",
    "What colours do you see in this image? Is there any text in the image? Read it.",
    "The quick brown fox jumps over the lazy dog. How many people are standing in the photo?",
] * 4
MAX_PIXELS = 1003520          # Qwen2-VL's 28*28*1280
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


# --------------------------------------------------------------------------- checkpoint
def checkpoint_dir(a) -> Path:
    if a.dir:
        return Path(a.dir)
    dims = (a.hidden, a.text_layers, a.heads, a.kv_heads, a.intermediate, a.vocab, a.vision_depth, a.vision_width)
    name = "2b" if dims == (1536, 28, 12, 2, 8960, 151936, 32, 1280) else "_".join(map(str, dims))
    return ROOT / "runs" / f"bench_qwen2vl_{name}"


def build_checkpoint(out: Path, a) -> None:
    """Random Qwen2-VL weights of the given dims, saved by transformers in bfloat16, plus tokenizer files."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    from qwenvl.training.tokenizer_train import default_chat_template, save_tokenizer, train_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(CORPUS, 400)
    ids = save_tokenizer(tok, out, default_chat_template("qwen2_vl"))
    head_dim = a.hidden // a.heads
    half = head_dim // 2
    section = [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]    # 2B: [16, 24, 24]
    text = dict(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
                num_hidden_layers=a.text_layers, num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
                rms_norm_eps=1e-6, max_position_embeddings=32768, hidden_act="silu",
                eos_token_id=ids["<|im_end|>"], bos_token_id=ids["<|endoftext|>"], pad_token_id=None,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": section})
    vision = dict(depth=a.vision_depth, embed_dim=a.vision_width, hidden_size=a.hidden, mlp_ratio=4,
                  num_heads=a.vision_width // 80, in_channels=3, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2, hidden_act="quick_gelu")
    cfg = Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True,
                        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    with torch.device("meta"):
        model = Qwen2VLForConditionalGeneration(cfg)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and name.endswith("weight") and ("norm" in name or "ln_q" in name):
                p.copy_(1 + 0.05 * torch.randn_like(p))       # norm gains near one
            else:
                p.normal_(0, 0.02)                              # matrices and biases
    model.tie_weights()
    model.save_pretrained(out)
    pre = {"min_pixels": 56 * 56, "max_pixels": MAX_PIXELS, "patch_size": 14, "temporal_patch_size": 2,
           "merge_size": 2, "image_mean": CLIP_MEAN, "image_std": CLIP_STD, "do_resize": True,
           "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True,
           "size": {"shortest_edge": 56 * 56, "longest_edge": MAX_PIXELS},
           "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2VLProcessor"}
    (out / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
    (out / "BENCH_COMPLETE").write_text("built by bench/throughput.py\n")


# --------------------------------------------------------------------------- workload
def make_image(seed: int, size: tuple[int, int]) -> Image.Image:
    """Smooth random colour fields with noise: something like a photo, never a cache hit by accident."""
    rng = np.random.default_rng(seed)
    w, h = size
    small = rng.integers(0, 256, (h // 32 + 1, w // 32 + 1, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((w, h), Image.BILINEAR)
    arr = np.asarray(img).astype(np.int16) + rng.integers(-12, 13, (h, w, 3))
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


def workload(n: int, seed0: int = 1000) -> list[tuple[Image.Image, str]]:
    return [(make_image(seed0 + i, SIZES[i % len(SIZES)]), QUESTIONS[i % len(QUESTIONS)]) for i in range(n)]


def conversation(image, question) -> list[dict]:
    return [{"role": "user", "content": [{"image": image}, {"text": question}]}]


def compute_dtype(a) -> torch.dtype:
    """The dtype both sides compute in: --dtype, or what qwenvl picks by itself for this CPU."""
    from qwenvl.engine.llm_engine import resolve_dtype
    return resolve_dtype(a.dtype, "cpu")


# --------------------------------------------------------------------------- qwenvl side
def load_qwenvl(model_dir: Path, a):
    from qwenvl import LLM
    return LLM(str(model_dir), dtype=compute_dtype(a), kv_cache_gb=a.kv_cache_gb)


def run_qwenvl(llm, items, max_tokens: int) -> tuple[float, list[list[int]]]:
    from qwenvl import SamplingParams
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    t0 = time.perf_counter()
    outs = llm.generate([conversation(im, q) for im, q in items], params)
    dt = time.perf_counter() - t0
    return dt, [list(o.token_ids) for o in outs]


def stream_request(llm, messages, max_tokens: int) -> tuple[float, list[float], object]:
    """One request through the engine step by step -> (time to first token, token times, final output)."""
    from qwenvl import SamplingParams
    eng = llm.engine
    t0 = time.perf_counter()                    # image preprocessing counts, as in transformers' timing
    prompt = eng.prepare(messages)
    rid = f"bench-{time.monotonic_ns()}"
    eng.add_request(rid, prompt, SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True))
    times, final = [], None
    while final is None:
        for out in eng.step():
            if out.request_id != rid:
                continue
            if len(out.token_ids) > len(times):
                times.append(time.perf_counter() - t0)
            if out.finished:
                final = out
    return times[0], times, final


# --------------------------------------------------------------------------- transformers side
class HFSide:
    def __init__(self, model_dir: Path, dtype: torch.dtype):
        from transformers import AutoImageProcessor, AutoTokenizer, Qwen2VLForConditionalGeneration
        self.model = Qwen2VLForConditionalGeneration.from_pretrained(model_dir, dtype=dtype).eval()
        self.ip = AutoImageProcessor.from_pretrained(model_dir)
        self.tok = AutoTokenizer.from_pretrained(model_dir)
        self.tok.padding_side = "left"
        self.image_pad = self.tok.convert_tokens_to_ids("<|image_pad|>")

    def inputs(self, items) -> dict:
        """Processor work as transformers' Qwen2VLProcessor does it (it needs torchvision, absent here):
        image processor, chat template, each image pad expanded to its token count, left-padded batch."""
        texts, images = [], []
        merge2 = self.ip.merge_size ** 2
        out = self.ip(images=[im for im, _ in items], return_tensors="pt")
        for (im, q), thw in zip(items, out["image_grid_thw"]):
            msg = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}]
            t = self.tok.apply_chat_template(msg, add_generation_prompt=True, tokenize=False)
            texts.append(t.replace("<|image_pad|>", "<|image_pad|>" * int(thw.prod() // merge2), 1))
        enc = self.tok(texts, padding=True, return_tensors="pt", add_special_tokens=False)
        types = (enc["input_ids"] == self.image_pad).int()
        return dict(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], mm_token_type_ids=types,
                    pixel_values=out["pixel_values"], image_grid_thw=out["image_grid_thw"])

    @torch.inference_mode()
    def generate(self, items, max_tokens: int) -> tuple[float, list[list[int]]]:
        t0 = time.perf_counter()
        kw = self.inputs(items)
        out = self.model.generate(**kw, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
                                  pad_token_id=self.tok.pad_token_id)
        dt = time.perf_counter() - t0
        n = kw["input_ids"].shape[1]
        return dt, [row[n:].tolist() for row in out]


# --------------------------------------------------------------------------- measurements
def copy_bandwidth(gib: float = 1.0, repeats: int = 7) -> float:
    """Bytes/s of a large tensor copy, counting the read and the write (median of `repeats`)."""
    n = int(gib * (1 << 30))
    src = torch.ones(n, dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    del src, dst
    return 2 * n / statistics.median(times)


def decode_weight_bytes(model) -> int:
    """Bytes a decode step must read: every LM decoder tensor (float or quantised), the final norm and the
    output head (the embedding lookup reads one row; a tied float head IS the embedding matrix, a
    quantised one is its own copy)."""
    read = ("model.language_model.layers.", "model.language_model.norm.", "lm_head.", "output_head.")
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    n = sum(t.numel() * t.element_size() for name, t in tensors if name.startswith(read))
    # int8 layers in fbgemm's layout (qwenvl/layers/int8_vnni.py) hold their weights outside the buffers
    n += sum(getattr(m, "packed_weight_bytes", 0) for name, m in model.named_modules()
             if name.startswith(read) or name in ("lm_head", "output_head"))
    heads = {name.split(".")[0] for name, _ in tensors if name.startswith(("lm_head.", "output_head."))}
    if not heads:
        n += sum(t.numel() * t.element_size() for name, t in tensors
                 if name == "model.language_model.embed_tokens.weight")
    return n


def matmul_peak_flops(dtype: torch.dtype, repeats: int = 5) -> float:
    """FLOP/s of the best of a few GEMMs at the model's prefill shapes ([1024, 1536] x [1536, 8960] and a
    ViT-like [1024, 1280] x [1280, 5120]), in the compute dtype."""
    best = 0.0
    for m, k, n in ((1024, 1536, 8960), (1024, 1280, 5120)):
        x, w = torch.randn(m, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
        torch.nn.functional.linear(x, w)
        for _ in range(repeats):
            t0 = time.perf_counter()
            torch.nn.functional.linear(x, w)
            best = max(best, 2 * m * k * n / (time.perf_counter() - t0))
    return best


def prompt_flops(model, n_patches: int, n_tokens: int) -> float:
    """Model FLOPs of one image prompt's prefill: 2 x weights x rows for every linear (vision blocks over
    the patches, the merger over the merged tokens, the LM over the prompt, the head over one row) plus
    the attention products (4 x N^2 x width per layer, full attention, causal halved in the LM)."""
    cfg = model.cfg
    flops = 0.0
    for name, m in model.named_modules():
        if not hasattr(m, "in_features") or not name.startswith(("model.", "lm_head", "output_head")):
            continue
        rows = (n_patches // 4 if ".merger." in name else n_patches) if name.startswith("model.visual.") \
            else (n_tokens if name.startswith("model.language_model.") else 1)
        flops += 2.0 * m.in_features * m.out_features * rows
    if cfg.text.tie_word_embeddings and "output_head" not in dict(model.named_children()):
        flops += 2.0 * cfg.text.hidden_size * cfg.text.vocab_size
    flops += 4.0 * n_patches ** 2 * cfg.vision.width * cfg.vision.depth
    flops += 2.0 * n_tokens ** 2 * cfg.text.num_attention_heads * cfg.text.head_dim * cfg.text.num_hidden_layers
    return flops


def maxrss_mb() -> float:
    """This process's peak resident set, MiB: VmHWM, the high-water mark of its own address space.

    Not ru_maxrss: Linux carries ru_maxrss across exec, so a child started by a parent holding 2.3 GB (this
    bench's bandwidth buffers) reported at least that much; the int4+vision child read 2306 MiB that way and
    1981 MiB by VmHWM, the same run's memory."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def side_qwenvl(model_dir: Path, a) -> dict:
    r = {}
    t0 = time.perf_counter()
    llm = load_qwenvl(model_dir, a)
    r["load_s"] = time.perf_counter() - t0
    run_qwenvl(llm, workload(1, seed0=1), 2)             # first-call costs off the clock (one small request)
    r["run_s"], r["tokens"] = run_qwenvl(llm, workload(a.requests), a.max_tokens)
    r["weight_bytes"] = decode_weight_bytes(llm.engine.model)
    _, times, _ = stream_request(llm, conversation(*workload(1, seed0=7)[0]), a.decode_tokens + 1)
    r["decode_steps"] = [t1 - t0 for t0, t1 in zip(times, times[1:])]
    # time to first token: a cold image, then a second turn on the same image
    image, q = make_image(4242, (448, 448)), "Describe this image."
    r["ttft_cold"], _, first = stream_request(llm, conversation(image, q), 8)
    r["ttft_flops"] = prompt_flops(llm.engine.model, (448 // 14) ** 2, first.prompt_tokens)
    turn2 = conversation(image, q) + [{"role": "assistant", "content": first.text or "It is a picture."},
                                      {"role": "user", "content": "And what is in the top left corner?"}]
    enc0 = llm.stats()["encoder_cache_misses"], llm.engine.runner.num_encoded_items
    r["ttft_turn2"], _, second = stream_request(llm, turn2, 1)
    r["turn2_prompt_tokens"], r["turn2_cached_tokens"] = second.prompt_tokens, second.cached_tokens
    r["turn2_images_encoded"] = llm.engine.runner.num_encoded_items - enc0[1]
    r["maxrss_mb"] = maxrss_mb()
    return r


def side_quantized(model_dir: Path, a, mode: str) -> dict:
    """A weight-only quantised copy of the same model: batch-1 decode, cold TTFT, load time, peak RSS."""
    from qwenvl import LLM
    from qwenvl.layers.int8_vnni import int8_layout
    r = {"mode": mode, "int8_layout": int8_layout()}
    quantization, _, vision = mode.partition("+")
    t0 = time.perf_counter()
    llm = LLM(str(model_dir), dtype=compute_dtype(a), kv_cache_gb=a.kv_cache_gb, quantization=quantization,
              quantize_vision=vision == "vision")
    r["load_s"] = time.perf_counter() - t0
    run_qwenvl(llm, workload(1, seed0=1), 2)
    r["weight_bytes"] = decode_weight_bytes(llm.engine.model)
    _, times, _ = stream_request(llm, conversation(*workload(1, seed0=7)[0]), a.decode_tokens + 1)
    r["decode_steps"] = [t1 - t0 for t0, t1 in zip(times, times[1:])]
    r["ttft_cold"], _, _ = stream_request(llm, conversation(make_image(4242, (448, 448)), "Describe this image."), 2)
    r["maxrss_mb"] = maxrss_mb()
    return r


def side_hf(model_dir: Path, a) -> dict:
    r = {}
    t0 = time.perf_counter()
    hf = HFSide(model_dir, compute_dtype(a))
    r["load_s"] = time.perf_counter() - t0
    hf.generate(workload(1, seed0=1), 2)
    r["run_s"], r["tokens"] = hf.generate(workload(a.requests), a.max_tokens)
    if not a.skip_hf_single:
        one = workload(1, seed0=7)
        r["ttft_cold"], _ = hf.generate(one, 1)
        t_all, _ = hf.generate(one, a.decode_tokens + 1)
        r["decode_tps"] = a.decode_tokens / (t_all - r["ttft_cold"])
    r["maxrss_mb"] = maxrss_mb()
    return r


def verdict(ok: bool) -> str:
    return "met" if ok else "below target"


def report_quantized(bf16: dict, quant: list[dict], bandwidth: float, peak: float) -> None:
    """Section 5: int8 / int4 against bf16 (the throughput child's own decode, TTFT and RSS)."""
    print("\n5. weight-only quantisation (same model, each mode in its own child process)")
    layouts = {r["int8_layout"] for r in quant}
    print(f"   (int8 layers in the {'/'.join(sorted(layouts))} layout; '+vision': the vision tower quantised too)")
    print("   mode          decode tok/s  x bf16  roofline%  GB/token  TTFT cold  peak RSS MiB  x bf16  load s")
    rows = [dict(bf16, mode="bf16")] + quant
    base_tps = 1 / statistics.median(bf16["decode_steps"])
    for r in rows:
        tps = 1 / statistics.median(r["decode_steps"])
        r["tps"], r["roof"] = tps, tps * r["weight_bytes"] / bandwidth
        print(f"   {r['mode']:12s} {tps:12.2f} {tps / base_tps:7.2f} {100 * r['roof']:9.0f}% {r['weight_bytes'] / 1e9:9.2f} "
              f"{r['ttft_cold']:9.2f} s {r['maxrss_mb']:12.0f} {r['maxrss_mb'] / bf16['maxrss_mb']:7.2f} {r['load_s']:7.1f}")
    by = {r["mode"]: r for r in rows}
    if "int8" in by:
        i8 = by["int8"]
        print(f"   int8 decode {100 * i8['roof']:.0f}% of the read roofline; target >= 65%: {verdict(i8['roof'] >= 0.65)}")
    if "int4" in by:
        i4 = by["int4"]
        if "int8" in by:
            print(f"   int4 decode {i4['tps'] / by['int8']['tps']:.2f}x int8; target >= 1.3x: "
                  f"{verdict(i4['tps'] >= 1.3 * by['int8']['tps'])}")
    for mode, target in (("int8", 0.6), ("int8+vision", 0.6), ("int4", 0.4), ("int4+vision", 0.4)):
        if mode in by:
            ratio = by[mode]["maxrss_mb"] / bf16["maxrss_mb"]
            print(f"   {mode} peak RSS {ratio:.2f}x bf16; target <= {target}x: {verdict(ratio <= target)}")
    frac = bf16["ttft_flops"] / bf16["ttft_cold"] / peak
    print(f"\n6. prefill + vision of one 448x448 image prompt (bf16): {bf16['ttft_flops'] / 1e12:.2f} TFLOP in "
          f"{bf16['ttft_cold']:.2f} s = {bf16['ttft_flops'] / bf16['ttft_cold'] / 1e12:.2f} TFLOP/s; matmul peak "
          f"measured here {peak / 1e12:.2f} TFLOP/s -> {100 * frac:.0f}%; target >= 65%: {verdict(frac >= 0.65)}")


def run_child(side: str, a) -> dict:
    cmd = [sys.executable, __file__, "--child", side] + [x for x in sys.argv[1:] if x != "--rebuild"]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"the {side} child failed:\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def report(a, q: dict, h: dict | None, wall: float) -> None:
    n_out = sum(len(t) for t in q["tokens"])
    q_tps = n_out / q["run_s"]
    print(f"\n1. throughput: {a.requests} requests (images {', '.join(f'{w}x{h_}' for w, h_ in SIZES[:min(a.requests, len(SIZES))])}"
          f"{' ...' if a.requests > len(SIZES) else ''}), {a.max_tokens} output tokens each, greedy, ignore_eos")
    print(f"   qwenvl        {q_tps:7.2f} output tok/s  ({q['run_s']:.1f} s; LLM.generate, continuous batching)")
    if h:
        h_tps = sum(len(t) for t in h["tokens"]) / h["run_s"]
        print(f"   transformers  {h_tps:7.2f} output tok/s  ({h['run_s']:.1f} s; one batched generate, left padding)")
        print(f"   ratio         {q_tps / h_tps:7.2f}x   target >= 3x: {verdict(q_tps / h_tps >= 3)}")
        first = sum(x[:1] == y[:1] for x, y in zip(q["tokens"], h["tokens"]))
        same = sum(x == y for x, y in zip(q["tokens"], h["tokens"]))
        print(f"   greedy agreement with transformers: first token {first}/{a.requests}, every token {same}/{a.requests}"
              f" (random bf16 weights: near-ties flip)")
    steps = q["decode_steps"]
    d_tps = 1 / statistics.median(steps)
    roof = q["bandwidth"] / q["weight_bytes"]
    print(f"\n2. batch-1 decode: qwenvl {d_tps:.2f} tok/s (median of {len(steps)} steps)"
          + (f"; transformers {h['decode_tps']:.2f} tok/s" if h and "decode_tps" in h else ""))
    print(f"   roofline {roof:.2f} tok/s = {q['bandwidth'] / 1e9:.1f} GB/s (1 GiB tensor copy, read+write) / "
          f"{q['weight_bytes'] / 1e9:.2f} GB of weights per token")
    print(f"   {100 * d_tps / roof:.0f}% of the roofline; target >= 70%: {verdict(d_tps >= 0.7 * roof)}")
    ratio = q["ttft_cold"] / q["ttft_turn2"]
    print(f"\n3. time to first token: cold image {q['ttft_cold']:.2f} s"
          + (f" (transformers {h['ttft_cold']:.2f} s)" if h and "ttft_cold" in h else "")
          + f"; second turn on the same image {q['ttft_turn2']:.3f} s = 1/{ratio:.1f}; target <= 1/10: "
          f"{verdict(ratio >= 10)}")
    print(f"   second turn: {q['turn2_prompt_tokens']} prompt tokens, {q['turn2_cached_tokens']} from the prefix "
          f"cache, {q['turn2_images_encoded']} images through the vision tower")
    print(f"\n4. peak RSS (ru_maxrss of each side's own process: load, the throughput run"
          f"{', decode and TTFT runs' if True else ''})")
    print(f"   qwenvl        {q['maxrss_mb']:7.0f} MiB")
    if h:
        print(f"   transformers  {h['maxrss_mb']:7.0f} MiB")
        print(f"   qwenvl / transformers = {q['maxrss_mb'] / h['maxrss_mb']:.2f}; target <= 1: "
              f"{verdict(q['maxrss_mb'] <= h['maxrss_mb'])}")
    print(f"\n(load: qwenvl {q['load_s']:.1f} s" + (f", transformers {h['load_s']:.1f} s" if h else "")
          + f"; bench wall time {wall:.0f} s)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default=None, help="checkpoint cache folder (default runs/bench_qwen2vl_<dims>)")
    p.add_argument("--rebuild", action="store_true", help="rebuild the random checkpoint")
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=32, help="output tokens per request (ignore_eos)")
    p.add_argument("--decode-tokens", type=int, default=32, help="tokens for the batch-1 decode measurement")
    p.add_argument("--kv-cache-gb", type=float, default=0.2,
                   help="qwenvl's KV pool, reserved up front (0.2 GB = 7,488 tokens at 2B dims; the run needs ~6,100)")
    p.add_argument("--skip-hf", action="store_true", help="qwenvl only (no ratio)")
    p.add_argument("--skip-hf-single", action="store_true", help="no transformers batch-1 decode / cold TTFT")
    p.add_argument("--hidden", type=int, default=1536)
    p.add_argument("--text-layers", type=int, default=28)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=8960)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--vision-depth", type=int, default=32)
    p.add_argument("--vision-width", type=int, default=1280)
    p.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float32"),
                   help="both sides compute in this; auto = qwenvl's default (float32 on a CPU without fast bfloat16)")
    p.add_argument("--quantization", default="int8,int4,int8+vision,int4+vision",
                   help="quantised modes measured after bf16, comma-separated ('' for none); '+vision' quantises "
                        "the vision tower too (--quantize-vision)")
    p.add_argument("--child", choices=("qwenvl", "hf", "int8", "int4", "int8+vision", "int4+vision"),
                   help=argparse.SUPPRESS)
    a = p.parse_args()
    model_dir = checkpoint_dir(a)
    if a.child:
        r = side_qwenvl(model_dir, a) if a.child == "qwenvl" else side_hf(model_dir, a) if a.child == "hf" \
            else side_quantized(model_dir, a, a.child)
        print(json.dumps(r))
        return

    if a.rebuild or not (model_dir / "BENCH_COMPLETE").exists():
        t0 = time.perf_counter()
        print(f"building the random checkpoint in {model_dir} ...", flush=True)
        build_checkpoint(model_dir, a)
        print(f"  built in {time.perf_counter() - t0:.0f} s", flush=True)
    dtype = str(compute_dtype(a)).removeprefix("torch.")
    print(f"model {model_dir.name}: {dtype}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs", flush=True)
    started = time.perf_counter()
    # Each side in its own child process, one after the other: its peak RSS is its own, and neither
    # model's memory or threads disturb the other's timings.
    bandwidth = copy_bandwidth()          # here, not in a child: its 2 GiB would count in the child's peak RSS
    q = run_child("qwenvl", a)
    q["bandwidth"] = bandwidth
    print(f"qwenvl done ({q['run_s']:.0f} s throughput run)", flush=True)
    quant = [run_child(mode, a) for mode in filter(None, a.quantization.split(","))]
    h = None if a.skip_hf else run_child("hf", a)
    peak = matmul_peak_flops(compute_dtype(a))
    report(a, q, h, time.perf_counter() - started)
    report_quantized(q, quant, bandwidth, peak)


if __name__ == "__main__":
    main()
