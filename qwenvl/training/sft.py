"""Supervised fine-tuning with the inference model classes: full or LoRA, AdamW, cosine with warm-up,
bfloat16 autocast, gradient accumulation, assistant-only loss, held-out eval, checkpoint and resume.

Data workers send compact batches (uint8 patches, one frame per still image: see packing.py); the pixels
are unpacked to the model's float32 pixel_values on the training device. A step whose loss or gradient is
not finite is skipped, so one bad batch never reaches the weights.

A run lives in one folder: `train_state.pt` (weights, optimiser, step) for resuming, `metrics.jsonl` (a line
per step), and `final/` (or `step-N/`), ordinary checkpoint folders that `LLM(dir)` and transformers load.
With `snapshot_dir`, the model is also packed there as one `model.tar` every `snapshot_every_s` seconds
(snapshots.py), for a machine whose command is killed at a time limit.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from ..models.config import ModelConfig
from ..models.registry import config_from_dir
from ..engine.cpu_dtype import cpu_bfloat16_is_fast
from ..inputs import PreprocessorConfig
from ..models import build_model
from ..tokenizer import Tokenizer
from .checkpoint import TOKENIZER_FILES, init_weights, save_weights
from .lora import apply_lora, merge_lora
from .packing import Encoder, PackedBatch, PixelUnpacker, pack, packed_loss
from .echo import EchoingBatches
from .snapshots import METRICS_LOG, MetricsLog, Snapshots

CALIBRATION_STEPS = 60
HOLDOUT_EVERY = 20                # a JSONL file's every 20th row is held out for the evaluation loss ...
HOLDOUT_MIN_ROWS = 20             # ... when it has at least this many rows
MAX_CONSECUTIVE_SKIPS = 20        # more non-finite steps in a row than this: the run has diverged
CHECKPOINT_EXTRAS = ("config.json", "preprocessor_config.json", "generation_config.json") + TOKENIZER_FILES


@dataclass
class TrainConfig:
    model_dir: str                    # a checkpoint folder (weights optional when from_scratch)
    out_dir: str
    data: str = "synthetic"           # "synthetic" or a JSONL file of {"messages": [...]}
    from_scratch: bool = False        # initialise weights instead of loading model.safetensors
    steps: int = 1000
    batch_size: int = 16              # conversations per micro-batch
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.05
    clip: float = 1.0
    lora_rank: int = 0                # 0 = full fine-tuning
    eval_every: int = 200
    eval_batches: int = 4
    save_every: int = 500
    seed: int = 0
    device: str = "cpu"
    autocast_bf16: bool | None = None  # None: on where bfloat16 products are fast (GPUs, some CPUs)
    workers: int = 0
    max_minutes: float = 0            # the run's wall-time budget: the cosine schedule is fitted to it; 0 = none
    sitting_minutes: float = 0        # stop (and save) this invocation after this long; resume continues the
                                      # same fitted schedule. 0 = stop at max_minutes
    tasks: list[str] = field(default_factory=list)   # synthetic task subset; empty = the full mixture
    followups: int = 0                # synthetic training images carry 0..followups more questions (more turns)
    max_shard_mb: int = 0             # split saved weights into shards of at most this size; 0 = one file
    vision_probe: float = 0.0         # weight of the per-token colour/kind/box/count loss on shape scenes
                                      # (patch_labels.py); 0 = off
    snapshot_dir: str = ""            # also pack the current model into this folder's model.tar (snapshots.py)
    snapshot_every_s: float = 0       # ... this often (seconds of training) and at the end; 0 = at the end only
    metrics_log: str = ""             # a JSONL line per step; "" = metrics.jsonl in snapshot_dir, else out_dir
    echo: int = 1                     # up to this many steps on one batch, the repeats only while the next batch
                                      # is not ready ("data echoing", echo.py): a GPU that outruns its data
                                      # workers trains instead of waiting; 1 = every step a new batch


class SyntheticConversations(Dataset):
    """Index -> encoded synthetic conversation; deterministic in (seed, index, split).

    With `followups`, an image carries 0 to that many more questions as further turns (see
    synthetic_followups: the vision cost is paid once for all of them)."""

    def __init__(self, encoder: Encoder, seed: int, split: str, tasks: list[str], length: int = 10 ** 9,
                 followups: int = 0, vision_labels: bool = False):
        self.encoder, self.seed, self.split, self.tasks, self.length = encoder, seed, split, tasks, length
        self.followups, self.vision_labels = followups, vision_labels

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        from ..synthetic import make_sample
        from ..synthetic.followups import conversation, followups as draw_followups
        task = self.tasks[index % len(self.tasks)] if self.tasks else None
        sample = make_sample(self.seed, index, task=task, split=self.split)
        extra = []
        if self.followups:
            rng = random.Random(f"qwenvl-followups/{self.seed}/{index}/{self.split}")
            extra = draw_followups(sample, rng, rng.randint(0, self.followups))
        example = self.encoder(conversation(sample, extra))
        if self.vision_labels:
            from .patch_labels import sample_labels
            example.vision_labels = sample_labels(sample, example.grid_thw, self.encoder.pre_cfg)
        return example


class JsonlConversations(Dataset):
    """A JSONL file, one {"messages": [...]} per line (README "Training data"). Relative image and video paths
    ({"image": "a.png"}, {"type": "image_url", "image_url": {"url": "a.png"}}, {"video": "b.mp4"}) are read
    beside the file. Every local file is checked when the file is read, so a typo fails before the first
    step with the file's name and its JSONL line, not minutes into a run inside a data worker."""

    def __init__(self, encoder: Encoder, path: str, rows: list[tuple[int, dict]] | None = None):
        self.encoder, self.path, self.root = encoder, str(path), Path(path).resolve().parent
        self.rows = rows if rows is not None else self._read(Path(path))
        if not self.rows:
            raise ValueError(f"{path}: no conversations")

    def _read(self, path: Path) -> list[tuple[int, dict]]:
        rows = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {number}: not JSON ({e.msg}, column {e.colno})") from None
            if not isinstance(row, dict) or not isinstance(row.get("messages"), list):
                raise ValueError(f'{path}, line {number}: expected {{"messages": [...]}}')
            row = {"messages": [self._resolved(m, path, number) for m in row["messages"]]}
            rows.append((number, row))
        return rows

    def _resolved(self, message, path: Path, number: int):
        """The message with its relative media paths made absolute (beside the JSONL file), each checked."""
        if not isinstance(message, dict) or not isinstance(message.get("content"), list):
            return message
        parts = []
        for part in message["content"]:
            if isinstance(part, dict):
                part = dict(part)
                for key in ("image", "video"):
                    if isinstance(part.get(key), str):
                        part[key] = self._local(part[key], path, number)
                nested = part.get("image_url")
                if isinstance(nested, dict) and isinstance(nested.get("url"), str):
                    part["image_url"] = {**nested, "url": self._local(nested["url"], path, number)}
                elif isinstance(nested, str):
                    part["image_url"] = self._local(nested, path, number)
            parts.append(part)
        return {**message, "content": parts}

    def _local(self, src: str, path: Path, number: int) -> str:
        if "://" in src or src.startswith("data:"):
            return src                     # URLs and inline data are fetched / decoded by the encoder
        file = Path(src) if Path(src).is_absolute() else self.root / src
        if not file.is_file():
            raise FileNotFoundError(f"{path}, line {number}: no such file {src!r} (looked for {file})")
        return str(file)

    def split(self, every: int) -> tuple["JsonlConversations", "JsonlConversations"]:
        """(training rows, held-out rows): every `every`-th row is held out."""
        train = [r for i, r in enumerate(self.rows) if i % every != every - 1]
        held = [r for i, r in enumerate(self.rows) if i % every == every - 1]
        return JsonlConversations(self.encoder, self.path, train), JsonlConversations(self.encoder, self.path, held)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int):
        number, row = self.rows[index % len(self.rows)]
        try:
            return self.encoder(row["messages"])
        except OSError as e:                   # say which line it came from
            raise FileNotFoundError(f"{self.path}, line {number}: {e}") from e
        except ValueError as e:                # InputError included
            raise ValueError(f"{self.path}, line {number}: {e}") from e


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


class _Sampler(torch.utils.data.Sampler):
    """Indices start..∞ (wrapping over finite data) so a resumed run continues with unseen data."""

    def __init__(self, start: int, size: int):
        self.start, self.size = start, size

    def __iter__(self):
        i = self.start
        while True:
            yield i % self.size
            i += 1


def _one_thread(_worker_id: int) -> None:
    # Each data worker is one process on one core; torch's default thread pool per worker would
    # oversubscribe the machine many times over.
    torch.set_num_threads(1)
    # Ctrl-C reaches the whole process group: the main process finishes its step and saves (_StopOnInterrupt),
    # which needs the workers' batches; a worker that died on the signal would break that step instead.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class _Collate:
    """pack() with the CPU pixel table at hand, for the rare batch that mixes compact and float pixels."""

    def __init__(self, unpack: PixelUnpacker):
        self.unpack = unpack

    def __call__(self, examples) -> PackedBatch:
        return pack(examples, self.unpack)


def make_loader(dataset: Dataset, cfg: TrainConfig, start: int, unpack: PixelUnpacker) -> DataLoader:
    """The training DataLoader: batches packed in the workers, pinned in the main process on CUDA (so the
    copy to the GPU is asynchronous)."""
    return DataLoader(dataset, batch_size=cfg.batch_size, sampler=_Sampler(start, len(dataset)),
                      worker_init_fn=_one_thread,
                      collate_fn=_Collate(unpack), num_workers=cfg.workers, persistent_workers=cfg.workers > 0,
                      prefetch_factor=4 if cfg.workers else None, pin_memory=cfg.device.startswith("cuda"))


def make_datasets(cfg: TrainConfig, encoder: Encoder) -> tuple[Dataset, Dataset]:
    if cfg.data == "synthetic":
        return (SyntheticConversations(encoder, cfg.seed, "train", cfg.tasks, followups=cfg.followups,
                                       vision_labels=cfg.vision_probe > 0),
                SyntheticConversations(encoder, cfg.seed + 1, "heldout", cfg.tasks))
    data = JsonlConversations(encoder, cfg.data)
    if len(data) < HOLDOUT_MIN_ROWS:
        return data, data               # too few rows to spare any: the eval loss is a training loss (logged so)
    return data.split(HOLDOUT_EVERY)


def bf16_autocast(cfg: TrainConfig, device: torch.device):
    """bfloat16 autocast as `cfg.autocast_bf16` asks; when it leaves it open, on wherever bfloat16 products are
    fast (an AVX2-only CPU runs them 10-50x slower than float32, so training there stays in float32)."""
    on = cfg.autocast_bf16
    if on is None:
        on = device.type != "cpu" or cpu_bfloat16_is_fast()
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=on)


def train_step(model, opt, params, batches, cfg: TrainConfig, unpack: PixelUnpacker, autocast, probe=None) -> dict:
    """One optimiser step over cfg.grad_accum micro-batches; the update is skipped (and `skipped` set)
    when a loss or the gradient norm is not finite. -> {loss, tokens, samples, skipped, data_wait}."""
    loss_sum, tokens, samples, waited, finite = 0.0, 0, 0, 0.0, True
    device = next(model.parameters()).device
    for _ in range(cfg.grad_accum):
        t = time.time()
        batch = next(batches)
        waited += time.time() - t
        samples += int(batch.segment_ids[-1]) + 1 if batch.num_tokens else 0     # counted on the host
        batch = batch.to(device)
        with autocast():
            loss, _ = packed_loss(model, batch, unpack, probe=probe, probe_weight=cfg.vision_probe)
        value = float(loss.detach())
        tokens += batch.num_tokens
        if not math.isfinite(value):
            finite = False                # no backward: a NaN would spread to every gradient
            continue
        (loss / cfg.grad_accum).backward()
        loss_sum += value / cfg.grad_accum
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip) if finite else None
    if finite and torch.isfinite(grad_norm):
        opt.step()
    else:
        finite = False
    opt.zero_grad(set_to_none=True)
    return {"loss": loss_sum if finite else float("nan"), "tokens": tokens, "samples": samples,
            "skipped": not finite, "data_wait": waited}


def train(cfg: TrainConfig, log=print) -> dict:
    """Run (or resume) training; returns a summary with the loss history and the final folder."""
    threads = torch.get_num_threads()
    if cfg.device == "cpu" and cfg.workers:
        # Each data worker keeps a core busy; a compute pool as wide as the machine beside them makes
        # OpenMP's threads wait on each other at every barrier (measured on 2 cores with 1 worker: 27 s
        # per step against 4.2 s with no worker), so the pool gets the cores the workers leave.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) - cfg.workers))
    try:
        return _train(cfg, log)
    finally:
        torch.set_num_threads(threads)


@dataclass
class _Run:
    """What a run trains and what it must save to resume: weights, optimiser, step, history."""
    model: torch.nn.Module
    probe: torch.nn.Module | None          # training-only heads over the image tokens (never exported)
    opt: torch.optim.Optimizer
    params: list
    state_path: Path
    step: int = 0
    history: list = field(default_factory=list)
    schedule_fitted: bool = False

    def save(self, cfg: TrainConfig) -> None:
        tmp = self.state_path.with_suffix(".tmp")
        torch.save({"model": self.model.state_dict(), "optimizer": self.opt.state_dict(), "step": self.step,
                    "probe": self.probe.state_dict() if self.probe is not None else None,
                    "history": self.history, "config": asdict(cfg), "schedule_fitted": self.schedule_fitted}, tmp)
        tmp.replace(self.state_path)   # atomic: a killed run never leaves half a state file


def _start_run(cfg: TrainConfig, model_cfg: ModelConfig, device: torch.device, state_path: Path, log) -> _Run:
    """A fresh run, or the one saved in state_path."""
    resume = torch.load(state_path, map_location="cpu", weights_only=False) if state_path.exists() else None
    if resume is None and not cfg.from_scratch:
        from ..checkpoints.loader import load_model
        model, _ = load_model(cfg.model_dir, dtype=torch.float32, device=device, progress=True)
    else:
        model = build_model(model_cfg).to(device)
        init_weights(model)
    if cfg.lora_rank:
        apply_lora(model, cfg.lora_rank)
        model.to(device)
    if resume is not None:
        model.load_state_dict(resume["model"])
    model.train()
    probe = None
    if cfg.vision_probe:
        from .patch_labels import VisionProbe
        probe = VisionProbe(model_cfg.text.hidden_size).to(device)
        if resume is not None and resume.get("probe"):
            # a run saved before a head was added resumes with that head new; anything else must match
            missing, unexpected = probe.load_state_dict(resume["probe"], strict=False)
            if unexpected:
                raise ValueError(f"{state_path}: probe heads this version does not have: {unexpected}")
    params = [p for p in model.parameters() if p.requires_grad] + (list(probe.parameters()) if probe else [])
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95),
                            fused=device.type == "cuda")
    run = _Run(model, probe, opt, params, state_path)
    if resume is not None:
        opt.load_state_dict(resume["optimizer"])
        run.step, run.history = resume["step"], resume["history"]
        if cfg.max_minutes and resume.get("schedule_fitted"):
            # A run split over sittings keeps the schedule fitted in its first sitting.
            cfg.steps, run.schedule_fitted = resume["config"]["steps"], True
        log(f"resumed from {state_path} at step {run.step} of {cfg.steps}")
    return run


@dataclass
class _Progress:
    """Throughput and health of this sitting: what the log lines and the time-budget schedule read."""
    start_step: int
    started: float = field(default_factory=lambda: time.time())   # looked up at run time (tests fake the clock)
    tokens: int = 0
    samples: int = 0
    data_wait: float = 0.0               # seconds spent waiting on the data workers
    skipped: int = 0
    in_a_row: int = 0
    rate_logged: bool = False
    calibration_started: float = 0.0

    @property
    def elapsed(self) -> float:
        return time.time() - self.started

    def add(self, r: dict, step: int, cfg: TrainConfig, state_path: Path, log) -> None:
        self.tokens, self.samples, self.data_wait = self.tokens + r["tokens"], self.samples + r["samples"], \
            self.data_wait + r["data_wait"]
        if not r["skipped"]:
            self.in_a_row = 0
            return
        self.skipped, self.in_a_row = self.skipped + 1, self.in_a_row + 1    # one bad batch must not poison the weights
        log(f"step {step + 1}: non-finite loss or gradient, update skipped ({self.skipped} so far)")
        if self.in_a_row > MAX_CONSECUTIVE_SKIPS:
            raise RuntimeError(f"{self.in_a_row} steps in a row had a non-finite loss or gradient at lr "
                               f"{lr_at(step, cfg):.2e}: the run diverged; {state_path} holds the last "
                               "saved state. Lower --lr or lengthen --warmup and resume.")

    def log_rate_once(self, step: int, elapsed: float, log) -> None:
        if step == self.start_step + CALIBRATION_STEPS // 3:
            self.calibration_started = elapsed    # after the data workers' start-up
        if not self.rate_logged and (step == self.start_step + CALIBRATION_STEPS or elapsed > 60):
            self.rate_logged = True
            log(f"first {elapsed:.0f} s: {self.samples / elapsed:.0f} samples/s, {self.tokens / elapsed:.0f} "
                f"tokens/s, {self.data_wait / elapsed:.0%} of the time waiting on the data workers")

    def fit_schedule(self, run: _Run, cfg: TrainConfig, elapsed: float, bar, log) -> None:
        """Fit the schedule to the time budget, so the cosine decay ends when the time does."""
        if not cfg.max_minutes or run.schedule_fitted or run.step != self.start_step + CALIBRATION_STEPS:
            return
        per_step = (elapsed - self.calibration_started) / (CALIBRATION_STEPS - CALIBRATION_STEPS // 3)
        fitted = run.step + int((cfg.max_minutes * 60 - elapsed) / per_step)
        if fitted < cfg.steps:
            log(f"{per_step:.3f} s/step: {cfg.max_minutes} minutes fit {fitted} steps of {cfg.steps}")
            cfg.steps = fitted
            bar.total = fitted
        run.schedule_fitted = True


@dataclass
class _HeldOut:
    """What the held-out loss is taken on: `batches`, named `name` in the log; with a synthetic mix of several
    tasks also one batch per task (`by_task`), so each task's loss is seen apart: a mix's overall loss hides a
    task that stalls or one that is being forgotten."""
    batches: list
    name: str
    by_task: dict = field(default_factory=dict)


def _held_out(cfg: TrainConfig, encoder: Encoder, train_set: Dataset, eval_set: Dataset, unpack) -> _HeldOut:
    batches = [pack([eval_set[i * cfg.batch_size + j] for j in range(cfg.batch_size)], unpack)
               for i in range(cfg.eval_batches)]
    if eval_set is train_set:
        return _HeldOut(batches, "loss on training rows (too few to hold out)")
    tasks = sorted(set(cfg.tasks))
    by_task = {}
    if cfg.data == "synthetic" and len(tasks) > 1:
        n = max(8, cfg.batch_size // len(tasks))
        for t in tasks:
            data = SyntheticConversations(encoder, cfg.seed + 2, "heldout", [t])
            by_task[t] = pack([data[i] for i in range(n)], unpack)
    return _HeldOut(batches, "held-out loss", by_task)


def _evaluate(model, eval_data: list, unpack, autocast) -> float:
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad(), autocast():
        for b in eval_data:
            loss, n = packed_loss(model, b.to(next(model.parameters()).device), unpack)
            total, count = total + float(loss) * n, count + n
    model.train()
    return total / max(count, 1)


def _train(cfg: TrainConfig, log) -> dict:
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(cfg.device)
    model_cfg = config_from_dir(cfg.model_dir)
    pre_cfg = PreprocessorConfig.from_dir(cfg.model_dir)
    encoder = Encoder(Tokenizer.from_dir(cfg.model_dir), model_cfg, pre_cfg)
    unpack_cpu = PixelUnpacker(pre_cfg)
    unpack = unpack_cpu.to(device)
    run = _start_run(cfg, model_cfg, device, out / "train_state.pt", log)
    if run.step >= cfg.steps and (out / "final").is_dir():
        return _already_finished(run, cfg, out, log)

    train_set, eval_set = make_datasets(cfg, encoder)
    # (with echo a resumed run skips more indices than it drew: never an image twice, some never at all)
    batches = iter(make_loader(train_set, cfg, start=run.step * cfg.batch_size * cfg.grad_accum, unpack=unpack_cpu))
    if cfg.echo > 1:
        batches = EchoingBatches(batches, cfg.echo)
    held = _held_out(cfg, encoder, train_set, eval_set, unpack_cpu)

    def autocast():
        return bf16_autocast(cfg, device)

    from tqdm import tqdm
    bar = tqdm(total=cfg.steps, initial=run.step, desc="train", dynamic_ncols=True)
    progress = _Progress(start_step=run.step)
    metrics = MetricsLog(cfg.metrics_log or Path(cfg.snapshot_dir or out) / METRICS_LOG)
    snapshots = (Snapshots(cfg.snapshot_dir, cfg.snapshot_every_s, lambda folder: export(run.model, cfg, folder), log)
                 if cfg.snapshot_dir else None)
    try:
        with _StopOnInterrupt(log) as interrupt:
            _loop(run, cfg, batches, held, unpack, autocast, progress, bar, interrupt, log, metrics, snapshots)
        bar.close()
        summary = _finish(run, cfg, out, progress)
        if snapshots is not None:
            snapshots.take(run.step)
        metrics.write({"event": "finished", **{k: v for k, v in summary.items() if k != "history"}})
        return summary
    finally:
        metrics.close()


class _StopOnInterrupt:
    """Ctrl-C (SIGINT) during training: the first one lets the current step finish, saves train_state.pt and
    raises KeyboardInterrupt (the same command resumes); a second one stops at once, saving nothing. A step
    is never cut in half, so the saved weights, optimiser and step count always agree."""

    def __init__(self, log):
        self.log, self.requested, self.previous = log, False, None

    def __enter__(self) -> "_StopOnInterrupt":
        if threading.current_thread() is threading.main_thread():   # signal handlers live in the main thread
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.log("interrupted: finishing this step and saving (Ctrl-C again to stop without saving)")

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def _loop(run: _Run, cfg: TrainConfig, batches, held: _HeldOut, unpack, autocast, progress: _Progress,
          bar, interrupt: _StopOnInterrupt, log, metrics: MetricsLog, snapshots: Snapshots | None) -> None:
    while run.step < cfg.steps:
        if interrupt.requested:
            run.save(cfg)
            log(f"interrupted at step {run.step} of {cfg.steps}: saved {run.state_path}; "
                "run the same command again to resume")
            raise KeyboardInterrupt
        for g in run.opt.param_groups:
            g["lr"] = lr_at(run.step, cfg)
        r = train_step(run.model, run.opt, run.params, batches, cfg, unpack, autocast, run.probe)
        progress.add(r, run.step, cfg, run.state_path, log)
        run.step += 1
        elapsed = progress.elapsed                  # one clock reading per step
        record = {"step": run.step, "loss": round(r["loss"], 4), "lr": lr_at(run.step - 1, cfg)}
        bar.set_postfix(loss=f"{r['loss']:.3f}", tok_s=f"{progress.tokens / max(elapsed, 1e-6):.0f}")
        bar.update(1)
        progress.log_rate_once(run.step, elapsed, log)
        progress.fit_schedule(run, cfg, elapsed, bar, log)
        limit = cfg.sitting_minutes or cfg.max_minutes
        out_of_time = limit and elapsed > limit * 60
        if cfg.eval_every and (run.step % cfg.eval_every == 0 or run.step == cfg.steps or out_of_time):
            record["eval_loss"] = round(_evaluate(run.model, held.batches, unpack, autocast), 4)
            if held.by_task:
                record["eval_by_task"] = {t: round(_evaluate(run.model, [b], unpack, autocast), 4)
                                          for t, b in held.by_task.items()}
            if not all(bool(torch.isfinite(p).all()) for p in run.params):
                raise RuntimeError(f"step {run.step}: non-finite weights; {run.state_path} holds the last saved state")
            elapsed = max(elapsed, 1e-6)
            each = ", ".join(f"{t} {v:.3f}" for t, v in record.get("eval_by_task", {}).items())
            log(f"step {run.step}: train loss {r['loss']:.4f}, {held.name} {record['eval_loss']:.4f}"
                f"{f' ({each})' if each else ''}, {progress.tokens / elapsed:.0f} tokens/s, "
                f"{progress.data_wait / elapsed:.0%} waiting on data")
        run.history.append(record)
        line = {**record, "elapsed_s": round(elapsed, 2), "samples": progress.samples,
                "samples_per_s": round(progress.samples / max(elapsed, 1e-6), 1),
                "data_wait_s": round(progress.data_wait, 2)}
        if isinstance(batches, EchoingBatches):
            line["echoed_steps"] = batches.echoed         # steps that reused a batch (samples counts them too)
        metrics.write(line)
        due = snapshots is not None and snapshots.due() and not (run.step == cfg.steps or out_of_time)
        if (cfg.save_every and run.step % cfg.save_every == 0) or run.step == cfg.steps or out_of_time or due:
            run.save(cfg)
        if due:                           # the end's snapshot is taken after the final export
            snapshots.take(run.step)
            metrics.write({"event": "snapshot", "step": run.step, "elapsed_s": round(progress.elapsed, 2)})
        if out_of_time:
            log(f"stopping at step {run.step} of {cfg.steps}: {limit} minutes reached")
            break


def _already_finished(run: _Run, cfg: TrainConfig, out: Path, log) -> dict:
    """A rerun of a finished run: say so, keep its summary and final/ as they are (nothing is trained)."""
    log(f"{out} has finished: step {run.step} of {cfg.steps}, its model is in {out / 'final'}. Nothing to train; "
        "raise --steps to go on from here, or give another --out for a new run")
    try:
        summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):                # a run from before summary.json: what the state says
        summary = {"steps": run.step, "history": run.history, "final_dir": str(out / "final")}
    return {**summary, "already_finished": True}


def _finish(run: _Run, cfg: TrainConfig, out: Path, progress: _Progress) -> dict:
    final = export(run.model, cfg, out / "final")
    minutes = progress.elapsed / 60
    summary = {"steps": run.step, "history": run.history, "final_dir": str(final), "skipped_steps": progress.skipped,
               "minutes": round(minutes, 2), "tokens": progress.tokens, "samples": progress.samples,
               "samples_per_s": round(progress.samples / max(minutes * 60, 1e-6), 1)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    return summary


def export(model, cfg: TrainConfig, folder: Path) -> Path:
    """An ordinary checkpoint folder of the current weights (LoRA merged into a copy)."""
    import copy
    folder.mkdir(parents=True, exist_ok=True)
    if cfg.lora_rank:
        model = copy.deepcopy(model)
        merge_lora(model)
    save_weights(model, folder, max_shard_bytes=cfg.max_shard_mb << 20)
    for name in CHECKPOINT_EXTRAS:
        src = Path(cfg.model_dir) / name
        if src.exists():
            (folder / name).write_bytes(src.read_bytes())
    return folder
