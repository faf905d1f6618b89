"""`qwenvl eval score|run|synth`. The lead wires `add_eval_subcommand` into qwenvl/cli/main.py;
`python -m qwenvl.evaluation.cli ...` works on its own."""

import argparse
import json
import os
import sys
from pathlib import Path

from .datasets import NAMES, DatasetError
from .datasets import load as load_benchmark
from .records import RecordError


def _score(args) -> int:
    from .score import format_summary, score_file, write_rows

    judge = None
    if args.judge_endpoint:
        from .metrics.mathvista import make_openai_judge
        judge = make_openai_judge(args.judge_endpoint, args.judge_model, args.judge_api_key)
    rows, summary = score_file(args.file, judge)
    if args.per_record:
        write_rows(rows, args.per_record)
    print(format_summary(summary))
    return 0


def _predictor(args):
    from . import predictors

    if args.endpoint:
        key = args.api_key or os.environ.get("DASHSCOPE_API_KEY" if args.api == "dashscope" else "OPENAI_API_KEY")
        make = predictors.dashscope_predictor if args.api == "dashscope" else predictors.openai_predictor
        return make(args.endpoint, args.model_name, key, max_tokens=args.max_tokens)
    return predictors.local_predictor(args.model, max_tokens=args.max_tokens, quantization=args.quantization,
                                      device=args.device, revision=args.revision)


RUN_FILE = "run.json"        # which model a folder's predictions are from: one folder, one model


def _run_identity(args) -> dict:
    if args.endpoint:
        return {"endpoint": args.endpoint, "api": args.api, "model_name": args.model_name}
    return {"model": args.model or "bundled", "revision": args.revision, "quantization": args.quantization}


def _claim_folder(out_dir: Path, identity: dict) -> None:
    """Refuse to mix two models' predictions in one folder (its report would merge them into one row)."""
    path = out_dir / RUN_FILE
    if path.exists():
        try:
            recorded = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise DatasetError(f"{path} is not JSON; move it aside (it names the model of this folder's "
                               "predictions)") from None
        if recorded != identity:
            raise DatasetError(f"{out_dir} holds the predictions of {_describe(recorded)}, and this run is "
                               f"{_describe(identity)}; give each model its own --out folder (or remove "
                               f"{out_dir} to start over)")
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    earlier = [n for n in NAMES if (out_dir / f"{n}.jsonl").exists()]
    if earlier:
        print(f"note: {out_dir} holds predictions ({', '.join(earlier)}) that do not say which model made them; "
              f"they are taken as {_describe(identity)}'s", file=sys.stderr)
    path.write_text(json.dumps(identity, indent=1) + "\n", encoding="utf-8")


def _describe(identity: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in identity.items() if v is not None) or "an unknown model"


def _say_resume(samples: list, path: Path) -> None:
    from .runner import count_answered

    answered = count_answered(samples, path)
    if answered:
        left = len(samples) - answered
        print(f"resuming {path}: {answered} of {len(samples)} questions already answered, " +
              (f"{left} to go" if left else "none left to answer; scoring only"), file=sys.stderr)


def _run(args) -> int:
    from .report import to_markdown, write_report
    from .runner import run_samples
    from .score import score_file

    if args.endpoint and args.model:
        raise DatasetError("give either --model DIR (local) or --endpoint URL (remote), not both")
    out_dir = Path(args.out)
    samples = load_benchmark(args.benchmark, str(args.data))[:args.limit]     # a wrong data folder is named first
    if args.model and not args.endpoint and not Path(args.model).is_file():   # then a missing model (a Hub id
        # downloads now, as for chat; a GGUF file is opened by the engine)
        from ..checkpoints.hub import resolve_model
        resolve_model(args.model, args.revision)
    _claim_folder(out_dir, _run_identity(args))
    path = out_dir / f"{args.benchmark}.jsonl"
    _say_resume(samples, path)
    run_samples(samples, _predictor(args), path, concurrency=args.concurrency, progress=not args.no_progress)
    summary = {}
    for name in NAMES:  # the report covers every benchmark run into this folder
        f = out_dir / f"{name}.jsonl"
        if f.exists():
            summary.update(score_file(str(f))[1])
    label = args.label or args.model_name or (Path(args.model).name if args.model else args.endpoint or "qwenvl")
    paths = write_report(summary, out_dir, label)
    print(to_markdown(json.loads(paths["json"].read_text(encoding="utf-8"))))
    print(f"predictions: {path}\nreport: {paths['md']}, {paths['json']}, {paths['png']}")
    return 0


def _synth(args) -> int:
    from .synthetic import make

    names = NAMES if args.benchmark == "all" else [args.benchmark]
    for name in names:
        make(name, Path(args.out) / name)
        print(f"{name}: {Path(args.out) / name}")
    return 0


def _tasks(args) -> int:
    import time

    from qwenvl import LLM
    from qwenvl.synthetic import LANGS, TASKS
    from qwenvl.evaluation.task_eval import evaluate_model, scores_table

    if args.n < 1:
        raise DatasetError(f"--n must be at least 1, got {args.n}")
    for flag, given, known in (("--task", args.task, TASKS), ("--lang", args.lang, LANGS)):
        unknown = [v for v in given or () if v not in known]
        if unknown:
            raise DatasetError(f"{flag} {unknown[0]!r} is not one of {', '.join(known)}")
    llm = LLM(args.model, quantization=args.quantization, mmproj=getattr(args, "mmproj", None), device=args.device,
              revision=args.revision)
    started = time.time()
    scores = evaluate_model(llm, args.n, args.task or TASKS, args.lang or LANGS, progress=not args.no_progress)
    print(scores_table(scores))
    print(f"{args.n} held-out items per task and language, {time.time() - started:.0f} s")
    if args.out:
        record = {"model": args.model or "bundled", "n_per_task_lang": args.n,
                  "scores": {k: round(v, 4) for k, v in scores.items()}}
        Path(args.out).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    return 0


def _local_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--revision", default=None, help="with a Hub id: branch, tag or commit (default: main)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cpu or cuda[:N]")


def add_eval_subcommand(subparsers) -> None:
    """Registers `eval score`, `eval run`, `eval synth` and `eval tasks` on an argparse subparsers object."""
    ev = subparsers.add_parser("eval", help="score predictions / run benchmarks")
    sub = ev.add_subparsers(dest="eval_command", required=True)

    sc = sub.add_parser("score", help="score a JSONL file of prediction records")
    sc.add_argument("file", help="JSONL, one record per line (see docs of qwenvl.evaluation.records)")
    sc.add_argument("--per-record", metavar="OUT.jsonl", help="write {id, benchmark, score} per record")
    sc.add_argument("--judge-endpoint", metavar="URL", help="OpenAI-compatible endpoint for MathVista extraction")
    sc.add_argument("--judge-model", default="gpt-4o-mini", help="model name for the judge")
    sc.add_argument("--judge-api-key", default=os.environ.get("OPENAI_API_KEY"), help="default: $OPENAI_API_KEY")
    sc.set_defaults(eval_func=_score, func=run_eval)

    rn = sub.add_parser("run", help="run a benchmark from its official files and report")
    rn.add_argument("--benchmark", required=True, choices=NAMES, help="which benchmark")
    rn.add_argument("--data", required=True, metavar="DIR", help="folder with the official release files")
    rn.add_argument("--model", metavar="DIR|ORG/NAME", help="a checkpoint folder or Hugging Face Hub id, as for "
                    "`qwenvl chat` (default: the bundled model)")
    _local_model_args(rn)
    rn.add_argument("--quantization", choices=("int8", "int4"), help="weight-only quantisation of the language model at load (default: none, the checkpoint dtype)")
    rn.add_argument("--endpoint", metavar="URL", help="remote server base URL (dashscope: with or without /api/v1)")
    rn.add_argument("--api", choices=("openai", "dashscope"), default="openai", help="the endpoint's API")
    rn.add_argument("--model-name", help="model name sent to the endpoint")
    rn.add_argument("--api-key", help="API key (default: $OPENAI_API_KEY or $DASHSCOPE_API_KEY)")
    rn.add_argument("--out", default="eval_results", metavar="DIR", help="predictions and report (default: eval_results)")
    rn.add_argument("--limit", type=int, metavar="N", help="only the first N questions")
    rn.add_argument("--concurrency", type=int, default=1, metavar="K", help="questions in flight at once")
    rn.add_argument("--max-tokens", type=int, default=512, help="most tokens per answer")
    rn.add_argument("--label", help="the model's name in the report")
    rn.add_argument("--no-progress", action="store_true", help="no progress bar")
    rn.set_defaults(eval_func=_run, func=run_eval)

    sy = sub.add_parser("synth", help="write tiny synthetic datasets in the official formats")
    sy.add_argument("--benchmark", default="all", choices=("all",) + NAMES, help="which benchmark, or all")
    sy.add_argument("--out", required=True, metavar="DIR", help="a folder per benchmark is written here")
    sy.set_defaults(eval_func=_synth, func=run_eval)

    # --task/--lang are checked in _tasks: importing the synthetic generator here would slow every command.
    tk = sub.add_parser("tasks", help="accuracy on held-out synthetic items of the bundled model's tasks "
                                      "(words never seen in training)")
    tk.add_argument("--model", metavar="DIR|ORG/NAME", help="a checkpoint folder or Hugging Face Hub id, as for "
                    "`qwenvl chat` (default: the bundled model)")
    tk.add_argument("--mmproj", metavar="FILE.gguf", help="with a GGUF --model: its vision projector GGUF")
    _local_model_args(tk)
    tk.add_argument("--quantization", choices=("int8", "int4"), help="weight-only quantisation of the language model at load (default: none, the checkpoint dtype)")
    tk.add_argument("--n", type=int, default=200, help="items per task and language (default 200)")
    tk.add_argument("--task", action="append", help="only this task: count, color, ground, read, chart or table "
                                                    "(repeatable)")
    tk.add_argument("--lang", action="append", help="only this language: en or zh (repeatable)")
    tk.add_argument("--out", metavar="FILE.json", help="also write the scores here")
    tk.add_argument("--no-progress", action="store_true", help="no progress bar")
    tk.set_defaults(eval_func=_tasks, func=run_eval)


def run_eval(args) -> int:
    """Runs a parsed `eval` command; user errors print one line on stderr and return 2."""
    try:
        return args.eval_func(args)
    except (RecordError, DatasetError) as e:
        print(f"error: {e}", file=sys.stderr)
    except UnicodeDecodeError as e:
        print(f"error: the input is not UTF-8 text ({e.reason})", file=sys.stderr)
    except (OSError, ValueError) as e:      # a model that is not found or does not load says why, as for `chat`
        print(f"error: {os_error_message(e)}", file=sys.stderr)
    except RuntimeError as e:  # the DashScope predictor's answer errors
        print(f"error: {e}", file=sys.stderr)
    except Exception as e:  # connection / API errors of the openai SDK and httpx: no traceback
        if not type(e).__module__.split(".")[0] in ("openai", "httpx", "httpcore"):
            raise
        where = f" (endpoint {args.endpoint})" if getattr(args, "endpoint", None) else ""
        print(f"error: {type(e).__name__}: {e}{where}", file=sys.stderr)
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return 2


def os_error_message(e: Exception) -> str:
    """`strerror: filename` for an OSError that has both (open() failing), else its own message, never 'None'."""
    if isinstance(e, OSError) and e.strerror and e.filename:
        return f"{e.strerror}: {e.filename}"
    return str(e) or type(e).__name__


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="qwenvl")
    add_eval_subcommand(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return run_eval(args)


if __name__ == "__main__":
    sys.exit(main())
