"""Can a new vision tower learn a lone shape's colour when its tokens are pooled by max, or by mean?

    python scripts/vision_pooling_probe.py --model DIR [--steps 60] [--pool max|mean]

DIR is a checkpoint folder (weights are not read: the tower starts from new ones). The tower + merger is
trained with a linear 8-colour head on the pooled merged tokens, on colour scenes with one shape and no
distractor. A language model at initialisation attends to the image tokens almost uniformly, like the mean
pool; this shows why a from-scratch model is slow to start looking (see patch_labels.py).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from qwenvl.models.registry import config_from_dir  # noqa: E402
from qwenvl.inputs import PreprocessorConfig  # noqa: E402
from qwenvl.models import build_model  # noqa: E402
from qwenvl.tokenizer import Tokenizer  # noqa: E402
from qwenvl.training.checkpoint import init_weights  # noqa: E402
from qwenvl.training.packing import Encoder, PixelUnpacker, pack  # noqa: E402
from qwenvl.synthetic.scenes import SHAPES, build_scene  # noqa: E402
from qwenvl.synthetic.style import COLORS  # noqa: E402


def lone_shape(index: int) -> tuple[list[dict], int]:
    """A scene with one shape, as a conversation, and the index of its colour in COLORS."""
    rng = random.Random(f"pooling-probe/{index}")
    colour = rng.randrange(len(COLORS))
    image, _ = build_scene(rng, [(rng.choice(SHAPES), COLORS[colour])])
    return [{"role": "user", "content": [{"image": image}, {"text": "What color is the shape?"}]},
            {"role": "assistant", "content": COLORS[colour]}], colour


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--pool", choices=("max", "mean"), default="max")
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg, pre = config_from_dir(args.model), PreprocessorConfig.from_dir(args.model)
    encoder, unpack = Encoder(Tokenizer.from_dir(args.model), cfg, pre), PixelUnpacker(pre)
    model = build_model(cfg)
    init_weights(model)
    head = torch.nn.Linear(cfg.text.hidden_size, len(COLORS))
    opt = torch.optim.AdamW(list(model.parameters()) + list(head.parameters()), lr=1e-3)
    started, index = time.time(), 0
    for step in range(args.steps):
        convs, colours = zip(*(lone_shape(index + j) for j in range(args.batch_size)))
        index += args.batch_size
        batch = pack([encoder(c) for c in convs])
        target = torch.tensor(colours)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            tokens, _ = model.encode_vision(unpack(batch.pixel_values), batch.grid_thw)
        per_image = tokens.float().split((batch.grid_thw.prod(-1) // pre.merge_size ** 2).tolist())
        pooled = torch.stack([t.max(0).values if args.pool == "max" else t.mean(0) for t in per_image])
        logits = head(pooled)
        loss = F.cross_entropy(logits, target)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step % 10 == 0 or step == args.steps - 1:
            acc = (logits.argmax(-1) == target).float().mean().item()
            print(f"step {step}: loss {loss.item():.3f}, batch accuracy {acc:.2f} ({time.time() - started:.0f} s)",
                  flush=True)


if __name__ == "__main__":
    main()
