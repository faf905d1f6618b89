#!/usr/bin/env bash
# The bundled model learns to read (issue 41): the whole run on a lent GPU machine as one command.
#
#   here, once (no device time): bash scripts/gpu_train_read.sh --prepare
#       copies the fonts and the word list the synthetic scenes are drawn with into .synth_assets/
#       (ignored by git, 31 MB: DejaVu, Liberation, Noto Sans CJK Regular and wamerican's list; nothing says the
#       device has them, and the same files there draw the same scenes as here)
#   then, with the device tool:  run  command="bash scripts/gpu_train_read.sh"  timeout_s=595
#                                     carry=[".synth_assets"]
#
# On the device it trains the bundled model, deepened without changing its answers (qwenvl/training/grow.py),
# for $MINUTES on reading mixed with counting, grounding and colour (so those are kept), the data drawn by
# $WORKERS worker processes, bfloat16 autocast; every minute the model is packed into $OUT/model.tar and
# metrics.jsonl is appended to, so a run cut at the command limit still returns its last model. Then
# `qwenvl eval tasks --n $EVAL_N` scores every task, one task at a time (each appends to eval.txt, so a cut
# eval still reports the tasks it finished). $OUT gets: model.tar (`tar xf model.tar` -> model/), metrics.jsonl,
# train.log, eval.txt, eval.json: five files, under the tool's eight.
#
# Everything is an environment variable, so the same script is the CPU dry run of the test
# (tests/test_gpu_train_read.py: DEVICE=cpu MINUTES=0.35 WORKERS=1 BATCH=8 EVAL_N=1 EVAL_TASKS=count ...).
# It installs nothing: training and `eval tasks` import, beyond the standard library, only torch (and what it
# imports), numpy, pillow, safetensors, tokenizers, jinja2 and tqdm, all in the device's python3 (KINDS.md);
# tests/test_gpu_train_read.py runs this script with the packages the device lacks made unimportable.
set -euo pipefail
cd "$(dirname "$0")/.."
ASSETS=.synth_assets
PY=${PYTHON:-python3}
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then
    PY=.venv/bin/python               # here, scripts/setup.sh's environment (.venv is not carried to the device)
fi

if [ "${1:-}" = "--prepare" ]; then
    "$PY" -c "
import sys; sys.path.insert(0, '.')
from qwenvl.synthetic.fonts import export_assets
print('synthetic-data assets in', export_assets('$ASSETS'))"
    du -sh "$ASSETS"
    exit 0
fi

OUT=${OUT:?set OUT to the folder that gets the model, metrics and scores (the device tool sets it)}
DEVICE=${DEVICE:-cuda}
MINUTES=${MINUTES:-7}                 # training; start-up and the evaluation add about 1.5-2 minutes
WORKERS=${WORKERS:-14}                # 16 cores: 14 data workers, the training process and its pinning thread
BATCH=${BATCH:-128}
ECHO=${ECHO:-2}                       # a batch may be used for a second step while the next is not ready
LR=${LR:-1e-3}
WARMUP=${WARMUP:-100}
EVAL_N=${EVAL_N:-200}
EVAL_EVERY=${EVAL_EVERY:-250}
SNAPSHOT_EVERY=${SNAPSHOT_EVERY:-60}  # seconds between model.tar snapshots
MEASURE_SECONDS=${MEASURE_SECONDS:-0}  # the log's "first N s" line and metrics.jsonl already say if data-bound
SEED=${SEED:-53}                      # fresh images: the bundled model's runs used seeds up to 47
INIT=${INIT:-qwenvl/assets/bundled}
GROW=${GROW-vision_depth=8 num_hidden_layers=8}     # GROW= (empty) keeps INIT's depth
TASKS=${TASKS:-read read read read count count ground color}   # half the images reading
EVAL_TASKS=${EVAL_TASKS:-read count color ground chart table}
RUN=${RUN_DIR:-/tmp/qwenvl-gpu-read}

mkdir -p "$OUT"
if [ -d "$ASSETS" ]; then
    export QWENVL_SYNTH_ASSETS="$PWD/$ASSETS"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TQDM_DISABLE=1
log="$OUT/train.log"
{
    date -u
    "$PY" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__,
'cuda', torch.cuda.is_available() and torch.cuda.get_device_name(0))"
    echo "cores: $(nproc); synthetic assets: ${QWENVL_SYNTH_ASSETS:-the system fonts and word list}"
    df -h /dev/shm 2>/dev/null | tail -1 || true
} >>"$log" 2>&1
if ! "$PY" -c "from qwenvl.synthetic import fonts
print(len(fonts.text_fonts()), 'font faces; words from', fonts.wordlist_path())" >>"$log" 2>&1; then
    tail -2 "$log" >&2
    echo "no fonts or word list to draw scenes with: run 'bash scripts/gpu_train_read.sh --prepare' where you" \
         "call the device from, and carry .synth_assets" >&2
    exit 3
fi

task_args=()
for t in $TASKS; do task_args+=(--task "$t"); done
grow_args=()
for g in $GROW; do grow_args+=(--grow "$g"); done

rm -rf "$RUN"
set +e
"$PY" scripts/train_bundled_model.py --out "$RUN" --init-from "$INIT" "${grow_args[@]}" --device "$DEVICE" \
    --workers "$WORKERS" --batch-size "$BATCH" --echo "$ECHO" --lr "$LR" --warmup "$WARMUP" --minutes "$MINUTES" \
    --measure-seconds "$MEASURE_SECONDS" --eval-every "$EVAL_EVERY" --eval-batches 1 --followups 3 --seed "$SEED" \
    --vision-probe 1.0 "${task_args[@]}" --snapshot-dir "$OUT" --snapshot-every "$SNAPSHOT_EVERY" >>"$log" 2>&1
status=$?
set -e
tail -4 "$log"
if [ $status -ne 0 ]; then
    echo "training failed (exit $status): see $log" >&2
    exit $status
fi

# score the model that comes back: unpacked from $OUT/model.tar, not the run's own folder
model=$("$PY" -c "from qwenvl.training.snapshots import read_model_tar; print(read_model_tar('$OUT', '$RUN/shipped'))")
for t in $EVAL_TASKS; do
    "$PY" -m qwenvl eval tasks --model "$model" --n "$EVAL_N" --task "$t" --out "$RUN/eval-$t.json" \
        2>>"$log" | tee -a "$OUT/eval.txt"
done
"$PY" - "$RUN" "$OUT/eval.json" "$EVAL_N" $EVAL_TASKS <<'EOF'
import json, sys
from pathlib import Path
run, out, n, tasks = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
scores = {}
for t in tasks:
    scores.update({k: v for k, v in json.loads((run / f"eval-{t}.json").read_text())["scores"].items() if k != "all"})
out.write_text(json.dumps({"n_per_task_lang": n, "scores": scores}, indent=1) + "\n")
print(json.dumps(scores))
EOF
ls -la "$OUT"
