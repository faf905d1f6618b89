"""What the image tokens hold: accuracy of a training run's probe heads (patch_labels.py) on the image
tokens of held-out shape scenes, out of the vision tower and inside the language model.

    python scripts/probe_accuracy.py --run runs/m4 [--n 64]

Reads the run's exported model (final/) and the probe heads saved beside it in train_state.pt. Compare
with `qwenvl eval tasks`: when a head reads, say, the same-kind count off the tokens far better than the
model answers "How many ...?", the language model is what falls short, not the vision tower.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from qwenvl.models.registry import config_from_dir  # noqa: E402
from qwenvl.inputs import PreprocessorConfig  # noqa: E402
from qwenvl.checkpoints.loader import load_model  # noqa: E402
from qwenvl.tokenizer import Tokenizer  # noqa: E402
from qwenvl.training.packing import Encoder, PackedCausalAttention, PixelUnpacker, forward_tapped, pack  # noqa: E402
from qwenvl.training.patch_labels import (BACKGROUND, EDGE_SCALE, LM_PROBE_LAYER, POSITION_SCALE,  # noqa: E402
                                          VisionProbe, sample_labels, shape_boxes, token_places)
from qwenvl.synthetic import make_sample, messages  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a training run's --out folder (final/ and train_state.pt)")
    ap.add_argument("--n", type=int, default=64, help="held-out scenes per shape task")
    args = ap.parse_args()
    run = Path(args.run)
    d = run / "final"
    pre = PreprocessorConfig.from_dir(d)
    encoder, unpack = Encoder(Tokenizer.from_dir(d), config_from_dir(d), pre), PixelUnpacker(pre)
    model, model_cfg = load_model(d, dtype=torch.float32)
    state = torch.load(run / "train_state.pt", map_location="cpu", weights_only=False)
    probe = VisionProbe(model_cfg.text.hidden_size)
    # A run from before the language-model heads has only the vision-side ones: report those (and one from
    # before the character head has none of it: it is not read here).
    missing = probe.load_state_dict(state["probe"], strict=False).missing_keys
    lm_heads = not any(k.startswith(("place.", "box.")) for k in missing)
    grid = 1000 / POSITION_SCALE   # position head outputs (tenths of the image) -> 0..1000 grid units
    hits: dict[str, list[float]] = defaultdict(list)
    for task in ("count", "color", "ground"):
        for i in range(args.n):
            sample = make_sample(9, i, task=task, split="heldout")
            example = encoder(messages(sample))
            labels = sample_labels(sample, example.grid_thw, pre)
            with torch.no_grad():
                vision, _ = model.encode_vision(unpack(example.pixel_values), example.grid_thw)
                shape = labels[:, 0] != BACKGROUND
                x, y = vision[shape], labels[shape]
                hits["colour"] += (probe.colour(x).argmax(1) == y[:, 0]).tolist()
                hits["kind"] += (probe.kind(x).argmax(1) == y[:, 1]).tolist()
                hits["same-kind count"] += (probe.count(x).argmax(1) == y[:, 6]).tolist()
                edge_error = (probe.edges(x) - y[:, 2:6].float() / EDGE_SCALE).abs()
                hits["edge distance L1 (tokens, mean per edge)"] += edge_error.mean(1).tolist()
                hits["edge distances all within half a token"] += (edge_error.max(1).values < 0.5).tolist()
                hits["background tokens called background"] += \
                    (probe.colour(vision[~shape]).argmax(1) == BACKGROUND).tolist()
                if not lm_heads:
                    continue
                batch = pack([example], unpack)
                _, rows = forward_tapped(model, batch, PackedCausalAttention(batch.segment_ids), vision, [],
                                         LM_PROBE_LAYER)
                places = token_places(example.grid_thw, pre.merge_size)
                hits["LM: token place L1 (grid units)"] += \
                    ((probe.place(rows) * grid - places[:, :2] * 1000).abs().mean(1)).tolist()
                box_error = (probe.box(rows[shape]) * grid - shape_boxes(y, places[shape]) * 1000).abs()
                hits["LM: shape box L1 (grid units, mean per edge)"] += box_error.mean(1).tolist()
    print(f"| head, on the shape tokens of {3 * args.n} held-out scenes (places: all tokens) | value |\n"
          "| --- | --- |")
    for name, values in hits.items():
        mean = sum(float(v) for v in values) / max(1, len(values))
        print(f"| {name} | {mean:.1f} |" if "L1" in name else f"| {name} | {mean:.1%} |")


if __name__ == "__main__":
    main()
