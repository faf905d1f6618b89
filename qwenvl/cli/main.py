"""`qwenvl` command: chat, ground, ocr, serve, eval, train, bench."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from . import openmp, serving_defaults
from .media_args import check_media_args


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, metavar="DIR|ORG/NAME|FILE.gguf",
                   help="a Hugging Face checkpoint folder or Hub id (Qwen2-VL, Qwen2.5-VL, Qwen3-VL), a GGUF "
                        "language model (with --mmproj) or a folder of one model and one mmproj GGUF; "
                        "default: the bundled model")
    p.add_argument("--mmproj", default=None, metavar="FILE.gguf",
                   help="with a GGUF --model: its vision projector GGUF (llama.cpp's mmproj file)")
    p.add_argument("--revision", default=None, help="with a Hub id: branch, tag or commit (default: main)")
    p.add_argument("--dtype", default=None, choices=("bfloat16", "float32", "float16"),
                   help="default: bfloat16, or float32 on a CPU without fast bfloat16 products")
    p.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cpu or cuda[:N]")
    p.add_argument("--quantization", default=None, choices=("int8", "int4"),
                   help="weight-only quantisation of the language model at load (default: none, the checkpoint dtype)")
    p.add_argument("--quantize-vision", action="store_true",
                   help="with --quantization, the vision tower too (less memory, no speed-up)")


def _load(args):
    from ..llm import LLM
    return LLM(args.model, dtype=args.dtype, device=args.device, revision=args.revision,
               quantization=args.quantization, mmproj=args.mmproj,
               quantize_vision=args.quantize_vision)


def _draw_all(out, images: list, path: str) -> list[str]:
    """Draw each image's boxes; one image -> `path`, several -> path-1.png, path-2.png, ..."""
    from ..answers.drawing import draw_boxes
    from ..inputs import load_image
    written = []
    target = Path(path)
    for i, src in enumerate(images):
        boxes = [b for b in out.boxes if b.get("image_index", 0) == i]
        dest = target if len(images) == 1 else target.with_name(f"{target.stem}-{i + 1}{target.suffix or '.png'}")
        draw_boxes(load_image(src), boxes).save(dest)
        written.append(str(dest))
    return written


def _expand_pdfs(images: list[str], pages: str | None, max_pixels: int) -> list:
    """Each `.pdf` among the --image paths becomes its pages' images (in page order), rendered to fit."""
    from ..inputs.pdf import PdfLimits, render_pdf
    out: list = []
    pdfs = [src for src in images if src.lower().endswith(".pdf") and Path(src).is_file()]
    if pages and not pdfs:
        raise ValueError("--pages applies to a PDF given with --image; none was given")
    for src in images:
        if src in pdfs:
            out.extend(render_pdf(Path(src).read_bytes(), src, pages, PdfLimits(max_pixels=max_pixels)))
        else:
            out.append(src)
    return out


def _chat(args) -> int:
    check_media_args(args.image or (), args.video or ())
    llm = _load(args)
    params = llm.sampling_params(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens,
                                 seed=args.seed)
    images = _expand_pdfs(list(args.image or []), args.pages, llm.engine.preprocessor.max_pixels)
    # Video files: frames sampled (--fps, default 2 a second) and sized as qwen-vl-utils does.
    videos = [{"video": str(Path(p).resolve()) if Path(p).exists() else p,
               **({"fps": args.fps} if args.fps is not None else {})} for p in args.video or []]
    media = [{"image": str(Path(p).resolve()) if isinstance(p, str) and Path(p).exists() else p}
             for p in images] + videos
    if not args.question:      # an interactive session (qwenvl/chat_repl.py); the media go with the first turn
        from .chat_repl import run_session
        return run_session(llm, params, args.system, media)
    system = [{"role": "system", "content": args.system}] if args.system else []
    out = llm.chat(system + [{"role": "user", "content": media + [{"text": args.question}]}], params)
    print(out.text)
    if out.boxes and args.boxes:
        print(json.dumps(out.boxes, ensure_ascii=False))
    if args.draw:
        for path in _draw_all(out, images, args.draw):
            print(f"[boxes drawn: {path}]", file=sys.stderr)
    return 0


def _ground(args) -> int:
    check_media_args([args.image], image_flag="image")
    llm = _load(args)
    out = llm.ground(args.image, args.description)
    print(out.text)
    print(json.dumps(out.boxes, ensure_ascii=False))
    if args.draw:
        for path in _draw_all(out, [args.image], args.draw):
            print(f"[boxes drawn: {path}]", file=sys.stderr)
    return 0


def _ocr(args) -> int:
    from ..answers.ocr import TASKS
    if args.task not in TASKS:
        raise ValueError(f"--task: unknown OCR task {args.task!r}; use one of {', '.join(TASKS)}")
    schema = None
    if args.result_schema:
        try:
            schema = json.loads(args.result_schema)
        except json.JSONDecodeError as e:
            raise ValueError(f"--result-schema: not JSON ({e})") from None
    check_media_args([args.image], image_flag="image")
    result = _load(args).ocr(args.image, args.task, schema)
    if result.kv_result is not None:
        print(json.dumps(result.kv_result, ensure_ascii=False, indent=2))
    elif result.words_info:
        print(json.dumps(result.words_info, ensure_ascii=False))
    else:
        print(result.text)
    return 0


def _train(args) -> int:
    from ..checkpoints.hub import resolve_model
    from ..engine.llm_engine import resolve_device
    from ..training.sft import TrainConfig, train
    # the model found as `chat` and `serve` find it: a folder, or a Hub id from the cache or downloaded
    model_dir = resolve_model(args.model, args.revision)
    cfg = TrainConfig(model_dir=str(model_dir), out_dir=args.out, data=args.data, steps=args.steps,
                      batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr, warmup=args.warmup,
                      lora_rank=args.lora_rank, eval_every=args.eval_every, save_every=args.save_every,
                      seed=args.seed, device=str(resolve_device(args.device)), workers=args.workers,
                      max_minutes=args.max_minutes,
                      from_scratch=args.from_scratch, tasks=args.tasks or [])
    summary = train(cfg)
    print(json.dumps({k: v for k, v in summary.items() if k != "history"}))
    return 0


def _bench(args) -> int:
    from .bench_quick import run_quick_bench
    print(json.dumps(run_quick_bench(_load(args), args.requests, args.max_tokens), indent=1))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwenvl", description="Qwen-VL models: chat, ground, ocr, serve, eval, train.")
    parser.add_argument("--version", action="version", version=f"qwenvl {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("chat", help="ask about images and videos (one question, or an interactive session)")
    _model_args(p)
    p.add_argument("--image", action="append", metavar="IMG",
                   help="an image path or URL, or a .pdf whose pages are sent as images (repeatable)")
    p.add_argument("--pages", default=None, metavar="1-3,5", help="with a .pdf --image: the pages to send")
    p.add_argument("--video", action="append", metavar="CLIP",
                   help="a video file (mp4, mkv, webm, ...); frames are sampled as qwen-vl-utils does (repeatable)")
    p.add_argument("--fps", type=float, default=None, help="with --video: frames sampled per second (default 2)")
    p.add_argument("--system", default=None, help="a system prompt")
    p.add_argument("--temperature", type=float, default=None,
                   help="0 = greedy (default: the checkpoint's generation_config.json, else 1.0)")
    p.add_argument("--top-p", type=float, default=None,
                   help="nucleus sampling mass (default: the checkpoint's generation_config.json, else 1.0)")
    p.add_argument("--max-tokens", type=int, default=256, help="most tokens an answer may have")
    p.add_argument("--seed", type=int, default=None, help="sampling seed: the same seed, the same answer")
    p.add_argument("--draw", metavar="OUT.png", help="write the image with the answer's boxes drawn")
    p.add_argument("--boxes", action="store_true", help="also print the boxes as JSON")
    p.add_argument("question", nargs="?", help="omit for an interactive session: >>> prompt, streamed answers, "
                   "/clear, /bye, Ctrl-C stops an answer")
    p.set_defaults(func=_chat)

    p = sub.add_parser("ground", help="localise a description in an image; prints the boxes as JSON")
    _model_args(p)
    p.add_argument("image", help="an image path or URL")
    p.add_argument("description", help="what to find, e.g. 'the red triangle'")
    p.add_argument("--draw", metavar="OUT.png", help="write the image with the boxes drawn")
    p.set_defaults(func=_ground)

    p = sub.add_parser("ocr", help="an OCR task on an image: text, key fields, tables, documents, formulas, lines")
    _model_args(p)
    p.add_argument("image", help="an image path or URL")
    p.add_argument("--task", default="text_recognition",
                   help="text_recognition (default), key_information_extraction, table_parsing, document_parsing, "
                        "formula_recognition, multi_lan, advanced_recognition")
    p.add_argument("--result-schema", default=None, metavar="JSON",
                   help='key_information_extraction: the fields, e.g. \'{"total": "the amount due"}\'')
    p.set_defaults(func=_ocr)

    try:
        from ..server.cli import add_serve_subcommand
        add_serve_subcommand(sub)
    except ImportError as e:          # the serve extra is not installed
        missing = str(e)
        p = sub.add_parser("serve", help="HTTP server (needs: pip install 'qwenvl[serve]')")
        p.set_defaults(func=lambda _a: sys.exit(f"qwenvl serve needs the server packages: {missing}"))

    from ..evaluation.cli import add_eval_subcommand
    add_eval_subcommand(sub)

    p = sub.add_parser("train", help="supervised fine-tuning (full or LoRA) with the inference model classes")
    p.add_argument("--model", required=True, metavar="DIR|ORG/NAME",
                   help="the checkpoint to start from: a folder or a Hugging Face Hub id, as for `qwenvl chat`")
    p.add_argument("--revision", default=None, help="with a Hub id: branch, tag or commit (default: main)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="run folder (resumes when it holds train_state.pt; Ctrl-C saves it and stops)")
    p.add_argument("--data", default="synthetic", help="'synthetic' or a JSONL file of {\"messages\": [...]}, one per line; image paths are "
                   "relative to the file (README 'Training data', examples/train.jsonl)")
    p.add_argument("--from-scratch", action="store_true", help="new random weights with the folder's config")
    p.add_argument("--tasks", nargs="*", help="synthetic task subset (count color ground read chart table)")
    p.add_argument("--steps", type=int, default=1000, help="optimiser steps")
    p.add_argument("--batch-size", type=int, default=16, help="examples per step (over --grad-accum micro-batches)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches whose gradients add up to one step")
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate")
    p.add_argument("--warmup", type=int, default=100, help="steps of linear learning-rate warm-up")
    p.add_argument("--lora-rank", type=int, default=0, help="0 = full fine-tuning")
    p.add_argument("--eval-every", type=int, default=200, help="steps between held-out evaluations")
    p.add_argument("--save-every", type=int, default=500, help="steps between checkpoints")
    p.add_argument("--seed", type=int, default=0, help="seed for weights, data order and sampling")
    p.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cpu or cuda[:N]")
    p.add_argument("--workers", type=int, default=0, help="data worker processes")
    p.add_argument("--max-minutes", type=float, default=0, help="stop and save after this long (0 = no limit)")
    p.set_defaults(func=_train)

    p = sub.add_parser("bench", help="quick engine benchmark on the loaded model (see bench/ for the full ones)")
    _model_args(p)
    p.add_argument("--requests", type=int, default=8, help="concurrent requests in the batch")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens generated per request")
    p.set_defaults(func=_bench)
    _show_defaults(parser)
    return parser


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """'(default: X)' after each flag's help, except where there is nothing to show (None, a switch that is off)
    or the help already says what the default is."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default in (None, False) or "default" in text.lower():
            return text
        return super()._get_help_string(action)


def _show_defaults(parser: argparse.ArgumentParser) -> None:
    """The formatter for every parser of the tree (argparse's subparsers do not inherit it)."""
    parser.formatter_class = HelpFormatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _show_defaults(sub)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("qwenvl")
    except PackageNotFoundError:           # run from a source tree that was never installed
        return "(not installed)"


def _show_library_lines() -> None:
    """The library's INFO lines (the model's load line, the compute dtype chosen) on stderr, as plain text.
    Only when nothing else has set up logging; `serve` sets up its own, with times."""
    logger = logging.getLogger("qwenvl")
    if logger.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        openmp.quiet_spinning()           # before anything imports torch (libgomp reads these once, at load)
        model = getattr(args, "model_arg", None) or getattr(args, "model", None)
        openmp.one_thread_for_a_small_model(model)
        serving_defaults.fill_latency_options(args, model)
    else:
        _show_library_lines()
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError) as e:
        # InputError, ConfigError, LoadError, TokenizerError are ValueErrors with actionable messages.
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
