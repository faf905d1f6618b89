"""Build the bundled demonstration model: tokenizer, new (or given) Qwen2-VL-architecture weights,
training on the synthetic tasks, export to a checkpoint folder (shards small enough to move around).

    # the shipped model: this machine's 2 CPU cores, shape tasks only, per-token labels on the image tokens
    # (--vision-probe, qwenvl/training/patch_labels.py). Phase 1, new weights, colour and kind labels (the box
    # labels did not exist yet); stopped after step 1000 (37 min) of a 3100-step schedule and that step's
    # train_state.pt exported to runs/m1-step1000 (--sitting-minutes 37 stops about there and writes final/)
    python scripts/train_bundled_model.py --out runs/m1 --device cpu --workers 1 --batch-size 32 \
        --lr 2e-3 --warmup 100 --minutes 0 --steps 3100 --measure-seconds 0 --followups 2 --max-pixels 160000 \
        --task count --task color --task ground --vision-probe 1.0 \
        --dim hidden_size=128 --dim num_hidden_layers=4 --dim intermediate_size=512 \
        --dim vision_width=64 --dim vision_depth=4 --dim vision_heads=2
    # phase 2, from those weights, the labels now with each shape's box; the schedule fitted to 65 minutes
    python scripts/train_bundled_model.py --out runs/m2 --init-from runs/m1-step1000 --device cpu --workers 1 \
        --batch-size 32 --lr 1.5e-3 --warmup 50 --minutes 65 --measure-seconds 0 --followups 2 \
        --max-pixels 160000 --task count --task color --task ground --vision-probe 1.0
    # phase 3, on an AVX2-only CPU (so float32: bfloat16 autocast turns itself off there), from the model
    # phase 2 shipped (qwenvl/assets/bundled as of b7f24d9), new probe heads, fresh images (--seed 7), 85
    # minutes: 1652 steps at 10.4 images/s
    python scripts/train_bundled_model.py --out runs/m3 --init-from qwenvl/assets/bundled --device cpu \
        --workers 1 --batch-size 32 --lr 1e-3 --warmup 100 --minutes 85 --measure-seconds 0 --followups 3 \
        --seed 7 --max-pixels 160000 --task count --task color --task ground --vision-probe 1.0
    # phase 4, same CPU, from phase 3's model, the labels now also with each shape's same-kind count and
    # box digits, 40/40/20% counting/grounding/colour, fresh images (--seed 11), 105 minutes: 1921 steps
    python scripts/train_bundled_model.py --out runs/m4 --init-from qwenvl/assets/bundled --device cpu \
        --workers 1 --batch-size 32 --lr 1e-3 --warmup 100 --minutes 105 --measure-seconds 0 --followups 3 \
        --seed 11 --max-pixels 160000 --task count --task ground --task count --task ground --task color \
        --vision-probe 1.0
    # phase 5, a CPU with fast bfloat16 again (17.5 images/s), from phase 4's model (as of a46260f), the
    # box labels now the distances from each shape token to its shape's edges (the 0..1000-grid box and its
    # digits are gone), fresh images (--seed 17), 110 minutes
    python scripts/train_bundled_model.py --out runs/m5 --init-from qwenvl/assets/bundled --device cpu \
        --workers 1 --batch-size 32 --lr 1e-3 --warmup 100 --minutes 110 --measure-seconds 0 --followups 3 \
        --seed 17 --max-pixels 160000 --task count --task ground --task count --task ground --task color \
        --vision-probe 1.0
    # phase 6, an AVX2-only CPU again (float32; --workers 0: on 2 cores one data worker beside two compute
    # threads made a step take 27 s instead of 4.2; train() now gives the compute pool only the cores the
    # workers leave), from phase 5's model (as of de69281) with the M-RoPE rotary pairs
    # re-split 1/2/13 between time, height and width (was 4/6/6: width had only frequencies <= 1.8e-4 rad per
    # token column, so the language model could not tell columns apart); first 30 minutes to settle into
    # the new split (run before the language-model position heads existed; --vision-probe now trains them
    # too), then 95 with them (each image token's place and its shape's box, read after decoder layer 1),
    # fresh images (--seed 23, then 29)
    python scripts/train_bundled_model.py --out runs/p1 --init-from qwenvl/assets/bundled --mrope-section 1,2,13 \
        --device cpu --workers 0 --batch-size 32 --lr 1e-3 --warmup 60 --minutes 30 --measure-seconds 0 \
        --followups 3 --seed 23 --max-pixels 160000 --task ground --task ground --task count --task color \
        --vision-probe 1.0
    python scripts/train_bundled_model.py --out runs/m6 --init-from runs/p1/final --device cpu --workers 0 \
        --batch-size 32 --lr 1e-3 --warmup 60 --minutes 95 --measure-seconds 0 --followups 3 --seed 29 \
        --max-pixels 160000 --task ground --task count --task ground --task count --task color --vision-probe 1.0
    # phase 7, a CPU with fast bfloat16 again (14.1 images/s with --workers 0), from phase 6's model (as of
    # cef3e86), new probe heads, fresh images (--seed 31), 110 minutes fitted 2699 steps (ran 102)
    python scripts/train_bundled_model.py --out runs/m7 --init-from qwenvl/assets/bundled --device cpu --workers 0 \
        --batch-size 32 --lr 1e-3 --warmup 60 --minutes 110 --measure-seconds 0 --followups 3 --seed 31 \
        --max-pixels 160000 --task ground --task count --task ground --task count --task color --vision-probe 1.0
    # (a continuation of phase 7 for 38 minutes at --lr 3e-4, --seed 37, scored within the noise of it and
    # was not shipped)
    # phase 9, the same recipe again from phase 7's model (as of a7e0e9c), new probe heads, fresh images
    # (--seed 41), 112 minutes fitted 3555 steps (ran 3049, 97.6k images, 14.5 images/s); then the same
    # command with --sitting-minutes 18 added resumed it and ran the schedule's last 506 steps (17 minutes)
    python scripts/train_bundled_model.py --out runs/m9 --init-from qwenvl/assets/bundled --device cpu --workers 0 \
        --batch-size 32 --lr 1e-3 --warmup 60 --minutes 112 --measure-seconds 0 --followups 3 --seed 41 \
        --max-pixels 160000 --task ground --task count --task ground --task count --task color --vision-probe 1.0
    # phase 10, the same recipe from phase 9's model (as of b2d6388), new probe heads, fresh images (--seed 43),
    # the mix moved towards grounding (50/40/10% grounding/counting/colour) and a fixed 2100-step schedule
    # (--minutes 0 --steps 2100: no time fit, so the learning rate always reaches zero, which is where
    # phase 9's counting rose; --sitting-minutes only as a guard; about 2.9 s a step on this machine)
    python scripts/train_bundled_model.py --out runs/m10 --init-from qwenvl/assets/bundled --device cpu --workers 0 \
        --batch-size 32 --lr 1e-3 --warmup 60 --minutes 0 --steps 2100 --sitting-minutes 115 --measure-seconds 0 \
        --followups 3 --seed 43 --max-pixels 160000 --task ground --task count --task ground --task count \
        --task ground --task count --task ground --task count --task ground --task color --vision-probe 1.0
    # phase 11, a continuation of phase 10's model (as of 813d41d) at a lower peak rate (3e-4), counting-heavy
    # (50/40/10% counting/grounding/colour), fresh images (--seed 47), 700 steps (33 minutes)
    python scripts/train_bundled_model.py --out runs/m11 --init-from qwenvl/assets/bundled --device cpu --workers 0 \
        --batch-size 32 --lr 3e-4 --warmup 30 --minutes 0 --steps 700 --sitting-minutes 40 --measure-seconds 0 \
        --followups 3 --seed 47 --max-pixels 160000 --task count --task ground --task count --task ground \
        --task count --task ground --task count --task ground --task count --task color --vision-probe 1.0
    # reading (issue 41), on a lent GPU: the shipped model deepened to 8 + 8 blocks, half the images reading
    # with per-character token labels, 7 minutes, the model packed into $OUT/model.tar every minute; the
    # whole device run, evaluation included, is scripts/gpu_train_read.sh (docs/bundled-model.md says how)
    python scripts/train_bundled_model.py --out /tmp/qwenvl-gpu-read --init-from qwenvl/assets/bundled \
        --grow vision_depth=8 --grow num_hidden_layers=8 --device cuda --workers 14 --batch-size 128 --echo 2 \
        --lr 1e-3 --warmup 100 --minutes 7 --measure-seconds 0 --eval-batches 1 --followups 3 --seed 53 \
        --vision-probe 1.0 --task read --task read --task read --task read --task count --task count \
        --task ground --task color --snapshot-dir $OUT --snapshot-every 60
    # from nothing on a GPU, in two sittings of a command limited to 10 minutes (run it twice)
    python scripts/train_bundled_model.py --out runs/bundled --device cuda --workers 14 --batch-size 128 \
        --lr 1e-3 --warmup 300 --minutes 17.5 --sitting-minutes 8.2

One call does everything: it first prints what the DataLoader delivers alone (samples/s, bytes/sample) and
what the model's forward + backward allow alone, so the slower of the two is named before training; then
it trains for --minutes (the cosine schedule is fitted to the time) and exports runs/.../final.
Each training image carries up to --followups more questions about it (the vision tower, most of a CPU
step, runs once for all of them).
Resumable: run it again with the same --out and it continues from train_state.pt; with --sitting-minutes a
run longer than one sitting (say 18 minutes on a machine lent 10 minutes per command) keeps one schedule.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from qwenvl.models.registry import config_from_dir  # noqa: E402
from qwenvl.inputs import PreprocessorConfig  # noqa: E402
from qwenvl.tokenizer import Tokenizer  # noqa: E402
from qwenvl.training.checkpoint import SmallModelDims, write_new_checkpoint_dir  # noqa: E402
from qwenvl.synthetic import TASKS  # noqa: E402
from qwenvl.training.corpus import build_tokenizer  # noqa: E402
from qwenvl.training.grow import grow_depth  # noqa: E402
from qwenvl.training.packing import Encoder  # noqa: E402
from qwenvl.training.sft import TrainConfig, train  # noqa: E402
from qwenvl.training.throughput import loader_rate, model_rate  # noqa: E402


def measure(cfg: TrainConfig, seconds: float) -> None:
    """Print the data path's and the model's samples/s apart (each alone), before training."""
    d = cfg.model_dir
    encoder = Encoder(Tokenizer.from_dir(d), config_from_dir(d), PreprocessorConfig.from_dir(d))
    data = loader_rate(cfg, encoder, seconds)
    print(f"data: {data['samples_per_s']} samples/s from {cfg.workers} workers, "
          f"{data['bytes_per_sample'] / 1e6:.2f} MB/sample ({data})", flush=True)
    model = model_rate(cfg, encoder)
    print(f"model: {model['samples_per_s']} samples/s forward+backward alone ({model})", flush=True)
    slower = "data" if data["samples_per_s"] < model["samples_per_s"] else "model"
    print(f"expect about {min(data['samples_per_s'], model['samples_per_s'])} samples/s in training "
          f"({slower}-bound)", flush=True)


def start_copy(src: Path, dst: Path, max_pixels: int | None, mrope_section: list[int] | None) -> Path:
    """A copy of checkpoint folder `src` to train from, with its images resized to at most `max_pixels`
    (training and, once exported, inference: the vision tower's cost grows with the square of the patch
    count) and its M-RoPE split into `mrope_section` (t, h, w rotary pairs), where given."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file():
            shutil.copyfile(f, dst / f.name)
    if max_pixels:
        path = dst / "preprocessor_config.json"
        pre = json.loads(path.read_text(encoding="utf-8"))
        pre["max_pixels"] = max_pixels
        if isinstance(pre.get("size"), dict):
            pre["size"]["longest_edge"] = max_pixels
        path.write_text(json.dumps(pre, indent=2) + "\n", encoding="utf-8")
    if mrope_section:
        path = dst / "config.json"
        config = json.loads(path.read_text(encoding="utf-8"))
        config["rope_scaling"]["mrope_section"] = mrope_section
        path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        config_from_dir(dst)     # a section that does not fit the head exits here, before training
    return dst


def parse_section(text: str) -> list[int]:
    """"1,2,13" -> [1, 2, 13] (argparse type for --mrope-section)."""
    try:
        parts = [int(v) for v in text.split(",")]
    except ValueError:
        parts = []
    if len(parts) != 3 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected three positive integers T,H,W such as 1,2,13")
    return parts


def parse_growth(items: list[str]) -> dict[str, int]:
    """["vision_depth=8", "num_hidden_layers=6"] -> grow_depth's keyword arguments; a bad item exits."""
    names = {"vision_depth": "vision_depth", "num_hidden_layers": "text_layers"}
    growth = {}
    for item in items:
        name, _, value = item.partition("=")
        if name not in names or not value.isdigit() or int(value) < 1:
            sys.exit(f"--grow {item!r}: expected vision_depth=N or num_hidden_layers=N with N >= 1")
        growth[names[name]] = int(value)
    return growth


def with_dims(dims: SmallModelDims, overrides: list[str]) -> SmallModelDims:
    """`dims` with fields replaced from NAME=INT strings; an unknown name or a non-integer exits with a message."""
    fields = {f.name for f in dataclasses.fields(SmallModelDims)}
    changes = {}
    for item in overrides:
        name, _, value = item.partition("=")
        if name not in fields or not value.isdigit():
            sys.exit(f"--dim {item!r}: expected NAME=INT with NAME one of {sorted(fields)}")
        changes[name] = int(value)
    return dataclasses.replace(dims, **changes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--minutes", type=float, default=8.0,
                    help="the run's training time; the cosine schedule is fitted to it (the measurement comes before)")
    ap.add_argument("--sitting-minutes", type=float, default=0,
                    help="stop this invocation (saving state and final/) after this long; run the same command again "
                         "to continue the same schedule. 0 = train all --minutes now")
    ap.add_argument("--steps", type=int, default=100000)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--workers", type=int, default=14)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--task", action="append", default=[],
                    help="train on these synthetic tasks only (repeatable; a task named twice gets twice the images)")
    ap.add_argument("--eval-every", type=int, default=250, help="steps between held-out losses (and at the end)")
    ap.add_argument("--eval-batches", type=int, default=4, help="batches of held-out images in each held-out loss")
    ap.add_argument("--measure-seconds", type=float, default=15.0,
                    help="time the DataLoader alone this long before training; 0 skips the measurement")
    ap.add_argument("--followups", type=int, default=4,
                    help="each training image carries up to this many more questions (the vision cost paid once)")
    ap.add_argument("--vision-probe", type=float, default=0.0,
                    help="weight of the per-token colour/kind/box/count loss on the image tokens of shape scenes; "
                         "0 = off")
    ap.add_argument("--init-from", help="start from this checkpoint's weights instead of new ones")
    ap.add_argument("--max-pixels", type=int, help="resize training (and the saved model's) images to at most this")
    ap.add_argument("--mrope-section", type=parse_section, metavar="T,H,W",
                    help="re-split the start checkpoint's M-RoPE rotary pairs between time, height and width "
                         "(they must sum to head_dim/2), e.g. 1,2,13")
    ap.add_argument("--grow", action="append", default=[], metavar="NAME=INT",
                    help="deepen the start checkpoint without changing its answers (qwenvl/training/grow.py): "
                         "vision_depth=N and/or num_hidden_layers=N (repeatable)")
    ap.add_argument("--echo", type=int, default=1,
                    help="up to this many steps on one batch, repeats only while the next batch is not ready "
                         "(qwenvl/training/echo.py: for an accelerator that outruns its data workers)")
    ap.add_argument("--snapshot-dir",
                    help="also pack the model into DIR/model.tar every --snapshot-every seconds and at the end, "
                         "and log metrics.jsonl there (for a machine whose command is killed at a time limit)")
    ap.add_argument("--snapshot-every", type=float, default=60.0, help="seconds between snapshots (default 60)")
    ap.add_argument("--small", action="store_true", help="a very small model, for a smoke run")
    ap.add_argument("--dim", action="append", default=[], metavar="NAME=INT",
                    help="override one SmallModelDims field of a new model, e.g. --dim vision_depth=4 (repeatable)")
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit(f"--device {args.device}: CUDA is not available here; use --device cpu for a smoke run")
    unknown = [t for t in args.task if t not in TASKS]
    if unknown:
        sys.exit(f"--task {unknown[0]!r}: expected one of {', '.join(TASKS)}")
    growth = parse_growth(args.grow)

    out = Path(args.out)
    init = out / "init"
    if not args.init_from and not (init / "config.json").exists():
        t = time.time()
        build_tokenizer(out / "tokenizer")
        dims = SmallModelDims(hidden_size=64, num_hidden_layers=2, intermediate_size=128, vision_width=32,
                              vision_depth=2, vision_heads=2, max_pixels=224 * 224) if args.small else SmallModelDims()
        dims = with_dims(dims, args.dim)
        write_new_checkpoint_dir(init, out / "tokenizer", dims)
        print(f"tokenizer and config written in {time.time() - t:.1f} s", flush=True)
    start = args.init_from or str(init)
    if args.max_pixels or args.mrope_section:
        start = str(start_copy(Path(start), out / "start", args.max_pixels, args.mrope_section))
    if growth:
        if not args.init_from:
            sys.exit("--grow deepens trained weights: give --init-from (a new model takes its depth from --dim)")
        start = str(grow_depth(start, out / "grown", **growth))
    cfg = TrainConfig(model_dir=start, out_dir=str(out), from_scratch=not args.init_from, steps=args.steps,
                      batch_size=args.batch_size, lr=args.lr, warmup=args.warmup, eval_every=args.eval_every,
                      eval_batches=args.eval_batches, save_every=500, seed=args.seed, device=args.device,
                      workers=args.workers, max_minutes=args.minutes,
                      sitting_minutes=args.sitting_minutes, max_shard_mb=12,
                      followups=args.followups, tasks=args.task, vision_probe=args.vision_probe,
                      snapshot_dir=args.snapshot_dir or "", snapshot_every_s=args.snapshot_every, echo=args.echo)
    if args.measure_seconds > 0 and not (out / "train_state.pt").exists():
        measure(cfg, args.measure_seconds)
    summary = train(cfg)
    print(json.dumps({k: v for k, v in summary.items() if k != "history"}), flush=True)
    print("loss every 10%:", [h["loss"] for h in summary["history"][:: max(1, len(summary["history"]) // 10)]])


if __name__ == "__main__":
    main()
