"""How much a model's answers depend on the image: held-out loss on the answer tokens with the real
image against the same conversation with a blank canvas of the same size, per task.

    python scripts/vision_reliance.py [--model DIR] [--n 16]

A model that has learned only the answer formats scores about the same on both; the gap is what it
reads from the pixels. Cheaper than a generation eval, so it can be watched during training.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from qwenvl.models.registry import config_from_dir  # noqa: E402
from qwenvl.engine.llm_engine import BUNDLED_MODEL_DIR  # noqa: E402
from qwenvl.inputs import PreprocessorConfig  # noqa: E402
from qwenvl.checkpoints.loader import load_model  # noqa: E402
from qwenvl.tokenizer import Tokenizer  # noqa: E402
from qwenvl.training.packing import Encoder, PixelUnpacker, pack, packed_loss  # noqa: E402
from qwenvl.synthetic import TASKS, make_sample, messages  # noqa: E402

BLANK = (235, 235, 235)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(BUNDLED_MODEL_DIR))
    ap.add_argument("--n", type=int, default=16, help="held-out items per task")
    args = ap.parse_args()
    d = args.model
    pre = PreprocessorConfig.from_dir(d)
    encoder, unpack = Encoder(Tokenizer.from_dir(d), config_from_dir(d), pre), PixelUnpacker(pre)
    model, _ = load_model(d, dtype=torch.float32)
    print("| task | loss, real image | loss, blank image | gap |\n| --- | --- | --- | --- |")
    for task in TASKS:
        samples = [make_sample(9, i, task=task, split="heldout") for i in range(args.n)]
        real = pack([encoder(messages(s)) for s in samples], unpack)
        for s in samples:
            s.image = Image.new("RGB", s.image.size, BLANK)
        blank = pack([encoder(messages(s)) for s in samples], unpack)
        with torch.no_grad():
            a, b = (float(packed_loss(model, batch, unpack)[0]) for batch in (real, blank))
        print(f"| {task} | {a:.3f} | {b:.3f} | {b - a:+.3f} |")


if __name__ == "__main__":
    main()
