"""Where the training data path spends its time, and how many samples/s a DataLoader delivers.

    python -m qwenvl.training.throughput --model qwenvl/assets/bundled --workers 2 --seconds 20

prints per-sample milliseconds of each stage in this process (drawing the sample, encoding it the compact
way and the reference float32 way, packing, moving a batch into shared memory as a worker does) and the
samples/s of the training DataLoader read in the main process, for both encoders.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

import torch
from ..models.registry import config_from_dir
from ..inputs import PreprocessorConfig
from ..tokenizer import Tokenizer
from .packing import Encoder, PixelUnpacker, pack
from .sft import SyntheticConversations, TrainConfig, bf16_autocast, make_loader


def stage_times(encoder: Encoder, n: int = 32, batch_size: int = 8, seed: int = 0,
                tasks: list[str] | None = None) -> dict[str, float]:
    """Milliseconds per sample of each stage, and bytes per sample of the packed batch."""
    from ..synthetic import make_sample, messages
    tasks = tasks or []
    clock = {"make_sample_ms": 0.0, "encode_ms": 0.0, "pack_ms": 0.0, "share_memory_ms": 0.0}
    examples, nbytes = [], 0
    for i in range(n):
        t0 = time.perf_counter()
        sample = make_sample(seed, i, task=tasks[i % len(tasks)] if tasks else None)
        t1 = time.perf_counter()
        examples.append(encoder(messages(sample)))
        clock["make_sample_ms"] += t1 - t0
        clock["encode_ms"] += time.perf_counter() - t1
    for i in range(0, n, batch_size):
        t0 = time.perf_counter()
        batch = pack(examples[i:i + batch_size])
        t1 = time.perf_counter()
        for f in ("token_ids", "positions", "loss_mask", "segment_ids", "pixel_values", "grid_thw"):
            getattr(batch, f).share_memory_()   # what a worker does before handing a batch over
        clock["pack_ms"] += t1 - t0
        clock["share_memory_ms"] += time.perf_counter() - t1
        nbytes += batch.nbytes
    out = {k: round(v / n * 1000, 2) for k, v in clock.items()}
    out["bytes_per_sample"] = nbytes // n
    return out


def loader_rate(cfg: TrainConfig, encoder: Encoder, seconds: float = 20.0, warmup_batches: int = 2) -> dict:
    """Samples/s (and bytes/sample) the training DataLoader delivers to the main process, after the
    workers' start-up; on CUDA the batches are pinned, as in training."""
    loader = make_loader(SyntheticConversations(encoder, cfg.seed, "train", cfg.tasks), cfg, 0,
                         PixelUnpacker(encoder.pre_cfg))
    it = iter(loader)
    started = time.time()
    for _ in range(warmup_batches):
        next(it)
    startup = time.time() - started
    t0, samples, nbytes = time.time(), 0, 0
    while time.time() - t0 < seconds:
        batch = next(it)
        samples += int(batch.segment_ids[-1]) + 1
        nbytes += batch.nbytes
    elapsed = time.time() - t0
    del it, loader
    return {"workers": cfg.workers, "batch_size": cfg.batch_size, "samples_per_s": round(samples / elapsed, 1),
            "bytes_per_sample": nbytes // max(samples, 1), "startup_s": round(startup, 1)}


def model_rate(cfg: TrainConfig, encoder: Encoder, steps: int = 10, warmup: int = 3) -> dict:
    """Samples/s of forward + backward alone (no data wait, no optimiser) on one batch, with new weights
    of the configured model on cfg.device: the rate the accelerator allows whatever the data path does."""
    from ..models import build_model
    from .checkpoint import init_weights
    from .packing import packed_loss
    device = torch.device(cfg.device)
    model = build_model(encoder.model_cfg).to(device)
    init_weights(model)
    data = SyntheticConversations(encoder, cfg.seed, "train", cfg.tasks)
    batch = pack([data[i] for i in range(cfg.batch_size)], PixelUnpacker(encoder.pre_cfg)).to(device)
    unpack = PixelUnpacker(encoder.pre_cfg, device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for i in range(warmup + steps):
        if i == warmup:
            sync()
            t0 = time.time()
        with bf16_autocast(cfg, device):
            loss, _ = packed_loss(model, batch, unpack)
        loss.backward()
        model.zero_grad(set_to_none=True)
    sync()
    elapsed = time.time() - t0
    return {"batch_size": cfg.batch_size, "tokens_per_batch": batch.num_tokens,
            "patches_per_batch": int(batch.pixel_values.shape[0]), "step_s": round(elapsed / steps, 4),
            "samples_per_s": round(cfg.batch_size * steps / elapsed, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwenvl/assets/bundled")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--samples", type=int, default=32, help="samples for the per-stage timing")
    ap.add_argument("--task", action="append", default=[])
    args = ap.parse_args()
    torch.set_num_threads(1)
    model_cfg = config_from_dir(args.model)
    tokenizer = Tokenizer.from_dir(args.model)
    pre_cfg = PreprocessorConfig.from_dir(args.model)
    cfg = TrainConfig(model_dir=args.model, out_dir="", workers=args.workers, batch_size=args.batch_size,
                      tasks=args.task)
    report = {}
    for name, compact in (("reference", False), ("compact", True)):
        encoder = Encoder(tokenizer, model_cfg, pre_cfg, compact=compact)
        report[name] = {"stages": stage_times(encoder, args.samples, tasks=args.task),
                        "loader": loader_rate(replace(cfg), encoder, args.seconds)}
        print(name, json.dumps(report[name]), flush=True)
    ref, new = report["reference"]["loader"], report["compact"]["loader"]
    print(f"DataLoader with {args.workers} workers: {ref['samples_per_s']} -> {new['samples_per_s']} samples/s "
          f"({new['samples_per_s'] / max(ref['samples_per_s'], 1e-9):.2f}x); bytes/sample "
          f"{ref['bytes_per_sample']} -> {new['bytes_per_sample']}")


if __name__ == "__main__":
    main()
