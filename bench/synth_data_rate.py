"""Images/s one data worker draws and encodes, per synthetic task and for a training mix.

    python bench/synth_data_rate.py --seconds 3
    python bench/synth_data_rate.py --task read --task read --task count --task ground --task color

Runs in this process on one thread, the way a DataLoader worker does (`SyntheticConversations[i]`: draw
the scene, follow-up questions, encode to compact uint8 patches, the per-token vision labels), so the
number is one core's worth. A GPU run is fed by `workers` such cores: divide the rate the GPU consumes
by this number for the workers it needs. Noisy on a shared machine: run it on a quiet one for the record.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from qwenvl.models.registry import config_from_dir  # noqa: E402
from qwenvl.inputs import PreprocessorConfig  # noqa: E402
from qwenvl.tokenizer import Tokenizer  # noqa: E402
from qwenvl.training.packing import Encoder  # noqa: E402
from qwenvl.training.sft import SyntheticConversations  # noqa: E402

SHAPE_AND_READ = ("count", "color", "ground", "read")


def rate(data: SyntheticConversations, seconds: float, warmup: int = 3) -> dict:
    """Items/s of `data[i]` over about `seconds` of this process's CPU time (after a few warm-up items: fonts
    load on first use), by the wall clock and by CPU time: on a shared machine the CPU-time rate is what
    one core of its own would give, the wall-clock rate what this core gave while others ran too."""
    for i in range(warmup):
        data[i]
    t0, c0, n = time.perf_counter(), time.process_time(), 0
    while time.process_time() - c0 < seconds:
        data[warmup + n]
        n += 1
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"images": n, "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
            "images_per_s": round(n / wall, 1), "images_per_cpu_s": round(n / cpu, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwenvl/assets/bundled")
    ap.add_argument("--seconds", type=float, default=3.0, help="per task")
    ap.add_argument("--followups", type=int, default=3)
    ap.add_argument("--task", action="append", default=[], help="the mix to time as well (repeatable)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    encoder = Encoder(Tokenizer.from_dir(args.model), config_from_dir(args.model),
                      PreprocessorConfig.from_dir(args.model))
    report = {}
    mixes = [[t] for t in SHAPE_AND_READ] + ([args.task] if args.task else [])
    for tasks in mixes:
        data = SyntheticConversations(encoder, 0, "train", tasks, followups=args.followups, vision_labels=True)
        report["+".join(tasks)] = rate(data, args.seconds)
        print("+".join(tasks), json.dumps(report["+".join(tasks)]), flush=True)


if __name__ == "__main__":
    main()
