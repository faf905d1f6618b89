"""Build the bundled demonstration model from nothing: tokenizer, new Qwen2-VL-architecture weights,
training on the synthetic tasks, export to a checkpoint folder (shards small enough to move around).

    python scripts/train_bundled_model.py --out runs/bundled --minutes 8 --device cuda --workers 14

Resumable: run it again with the same --out and it continues from train_state.pt.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qwenvl.training.checkpoint import SmallModelDims, write_new_checkpoint_dir  # noqa: E402
from qwenvl.training.corpus import build_tokenizer  # noqa: E402
from qwenvl.training.sft import TrainConfig, train  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--minutes", type=float, default=8.0)
    ap.add_argument("--steps", type=int, default=100000)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--workers", type=int, default=14)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--init-from", help="start from this checkpoint's weights instead of new ones")
    ap.add_argument("--small", action="store_true", help="a very small model, for a smoke run")
    args = ap.parse_args()

    out = Path(args.out)
    init = out / "init"
    if not (init / "config.json").exists():
        t = time.time()
        build_tokenizer(out / "tokenizer")
        dims = SmallModelDims(hidden_size=64, num_hidden_layers=2, intermediate_size=128, vision_width=32,
                              vision_depth=2, vision_heads=2) if args.small else SmallModelDims()
        write_new_checkpoint_dir(init, out / "tokenizer", dims)
        print(f"tokenizer and config written in {time.time() - t:.1f} s", flush=True)
    start = args.init_from or str(init)
    cfg = TrainConfig(model_dir=start, out_dir=str(out), from_scratch=not args.init_from, steps=args.steps,
                      batch_size=args.batch_size, lr=args.lr, warmup=args.warmup, eval_every=250,
                      eval_batches=4, save_every=500, seed=args.seed, device=args.device,
                      workers=args.workers, max_minutes=args.minutes, max_shard_mb=12)
    summary = train(cfg)
    print(json.dumps({k: v for k, v in summary.items() if k != "history"}), flush=True)
    print("loss every 10%:", [h["loss"] for h in summary["history"][:: max(1, len(summary["history"]) // 10)]])


if __name__ == "__main__":
    main()
