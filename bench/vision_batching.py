"""Does one vision tower call over several requests' images beat one call per image on a CPU? Measured, in
one process, alternating rounds: Qwen2-VL's tower at 2B widths (1280 wide, --depth blocks, random weights),
--images images of --size pixels each, batched into one `forward` against one `forward` per image.

    .venv/bin/python bench/vision_batching.py [--depth 4] [--images 4] [--size 448] [--dtype bfloat16]

It also says whether the float32 bits of an image's features depend on the company it is encoded in
(oneDNN/MKL may split a product's sum differently by row count when several threads run).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qwenvl.models.config import VisionConfig            # noqa: E402
from qwenvl.models.qwen2_vl.vision import VisionTransformer  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--size", type=int, default=448, help="square images of this many pixels a side")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    cfg = VisionConfig(depth=a.depth, width=1280, num_heads=16, intermediate_size=5120, out_hidden_size=1536)
    torch.manual_seed(0)
    dtype = getattr(torch, a.dtype)
    tower = VisionTransformer(cfg).to(dtype).eval()
    for p_ in tower.parameters():
        p_.data.normal_(0, 0.02)
    side = a.size // 14
    grid = torch.tensor([[1, side, side]] * a.images)
    pixels = torch.randn(a.images * side * side, 3 * 2 * 14 * 14).to(dtype)
    rows = side * side
    with torch.inference_mode():
        tower(pixels[:rows], grid[:1])                       # warm-up
        batched, single = [], []
        for _ in range(a.rounds):
            t0 = time.perf_counter()
            whole = tower(pixels, grid)
            batched.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            parts = [tower(pixels[i * rows:(i + 1) * rows], grid[i:i + 1]) for i in range(a.images)]
            single.append(time.perf_counter() - t0)
        same = torch.equal(whole, torch.cat(parts))
    b, s = sorted(batched)[len(batched) // 2], sorted(single)[len(single) // 2]
    print(f"{a.images} images of {a.size}x{a.size} ({rows} patches each), depth {a.depth}, {a.dtype}, "
          f"{torch.get_num_threads()} threads: one call {b * 1e3:.0f} ms, one per image {s * 1e3:.0f} ms "
          f"(batched / single {b / s:.2f}); same bits: {same}")


if __name__ == "__main__":
    main()
