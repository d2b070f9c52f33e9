#!/usr/bin/env bash
# Why does the Tokenformer trained from scratch at GROWTH x the small model's tokens learn more slowly per
# iteration? Controlled runs of that model, one change at a time (issue 11, item 2):
#
#   examples/progressive_scaling/init_study.sh
#
#   baseline    as cpu_repro.sh trains it: value-token std = Wang's 2 / (L sqrt(d)), tau = sqrt(n)
#   value-std   --value-init-std = Wang's std x sqrt(1 / GROWTH): the output scale of a Pattention
#               (about sqrt(n) x std) equal to the small model's at init
#   small-tau   --qkv-tau/--proj-tau/--ffn-tau = sqrt of the SMALL model's counts (what a grown model keeps)
#   both        value-std and small-tau together
#   small       the small model (N_SMALL tokens), the reference curve
#
# each at every LR of LRS (learning rate is the third candidate cause), one seed. Then report.py writes
# $REPORT and $PLOT (the sweep table compares the variants at each LR).
#
# Settings (environment variables, defaults in brackets): the model, data and schedule settings of
# cpu_repro.sh with the same defaults (S + G iterations in all: S [800] G [400]; SEQ, GLOBAL_BATCH, LRS [1e-3],
# MIN_LR_RATIO, WARMUP, EVAL_INTERVAL, EVAL_ITERS, D, LAYERS, HEADS, N_SMALL, GROWTH [4], CORPUS_MB, VOCAB,
# DATA_DIR, PYTHON, THREADS); SEED [1234]; VARIANTS [baseline value-std small-tau both small];
# WORK [runs/init_study]; REPORT [docs/progressive_scaling_init.md]; PLOT [docs/progressive_scaling_init.png].
set -euo pipefail

[ $# -eq 0 ] || { [ "$1" = -h ] || [ "$1" = --help ]; } || { echo "init_study.sh: error: no arguments (settings are environment variables; see --help)" >&2; exit 2; }
if [ $# -gt 0 ]; then awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0; fi

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PYTHON=${PYTHON:-python3}
S=${S:-800}; G=${G:-400}; SEQ=${SEQ:-128}; GLOBAL_BATCH=${GLOBAL_BATCH:-16}
LR=${LR:-1e-3}; LRS=${LRS:-$LR}; MIN_LR_RATIO=${MIN_LR_RATIO:-0.1}; WARMUP=${WARMUP:-50}; SEED=${SEED:-1234}
EVAL_INTERVAL=${EVAL_INTERVAL:-100}; EVAL_ITERS=${EVAL_ITERS:-10}; CORPUS_MB=${CORPUS_MB:-20}; VOCAB=${VOCAB:-2048}
D=${D:-128}; LAYERS=${LAYERS:-4}; HEADS=${HEADS:-4}; N_SMALL=${N_SMALL:-64}; GROWTH=${GROWTH:-4}; THREADS=${THREADS:-2}
VARIANTS=${VARIANTS:-baseline value-std small-tau both small}; DATA_DIR=${DATA_DIR:-}
WORK=${WORK:-$REPO/runs/init_study}
REPORT=${REPORT:-$REPO/docs/progressive_scaling_init.md}; PLOT=${PLOT:-$REPO/docs/progressive_scaling_init.png}
TOTAL=$((S + G)); N_BIG=$((N_SMALL * GROWTH))
read -r -a LR_LIST <<< "$LRS"; read -r -a VARIANT_LIST <<< "$VARIANTS"
for v in "${VARIANT_LIST[@]}"; do
  case "$v" in baseline|value-std|small-tau|both|small) ;;
    *) echo "init_study.sh: error: VARIANTS: unknown variant '$v'" >&2; exit 2 ;; esac
done
case "$(realpath -m "$WORK")" in
  /|"$HOME"|"$REPO") echo "init_study.sh: error: WORK=$WORK would delete a folder it does not own" >&2; exit 2 ;;
esac
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
rm -rf "$WORK"; mkdir -p "$WORK/logs"
START=$(date +%s)
say() { echo "[init_study $(( $(date +%s) - START ))s] $*"; }
fail() { echo "init_study.sh: error: $*" >&2; exit 1; }
if [ -n "$DATA_DIR" ]; then
  TOK="$DATA_DIR/tok.model"; DATA="$DATA_DIR/data_text_document"
  [ -f "$TOK" ] && [ -f "$DATA.bin" ] || { echo "init_study.sh: error: DATA_DIR=$DATA_DIR: expected tok.model and data_text_document.bin/.idx" >&2; exit 2; }
else
  say "building the corpus, tokenizer and dataset"
  "$PYTHON" "$REPO/tools/build_local_corpus.py" --output "$WORK/corpus.jsonl" --max-mb "$CORPUS_MB" > "$WORK/logs/data.log" 2>&1
  "$PYTHON" "$REPO/tools/train_tokenizer.py" --input "$WORK/corpus.jsonl" --output-prefix "$WORK/tok" --vocab-size "$VOCAB" \
    --input-sentence-size 300000 >> "$WORK/logs/data.log" 2>&1 || fail "tokenizer training failed, see $WORK/logs/data.log"
  "$PYTHON" "$REPO/tools/preprocess_data.py" --input "$WORK/corpus.jsonl" --output-prefix "$WORK/data" \
    --tokenizer-model "$WORK/tok.model" --append-eod --workers 2 >> "$WORK/logs/data.log" 2>&1 || fail "preprocessing failed"
  TOK="$WORK/tok.model"; DATA="$WORK/data_text_document"
fi
WANG=$("$PYTHON" -c "import math, sys; print(2 / (int(sys.argv[1]) * math.sqrt(int(sys.argv[2]))))" "$LAYERS" "$D")
SCALED=$("$PYTHON" -c "import math, sys; print(float(sys.argv[1]) / math.sqrt(int(sys.argv[2])))" "$WANG" "$GROWTH")
SMALL_TAU=(--qkv-tau "$("$PYTHON" -c "import math; print(math.sqrt($N_SMALL))")"
           --proj-tau "$("$PYTHON" -c "import math; print(math.sqrt($N_SMALL))")"
           --ffn-tau "$("$PYTHON" -c "import math; print(math.sqrt(4 * $N_SMALL))")")
MANIFEST="$WORK/manifest.tsv"; : > "$MANIFEST"
for lr in "${LR_LIST[@]}"; do
  min_lr=$("$PYTHON" -c "import sys; print(float(sys.argv[1]) * float(sys.argv[2]))" "$lr" "$MIN_LR_RATIO")
  for v in "${VARIANT_LIST[@]}"; do
    n=$N_BIG; extra=()
    case "$v" in
      value-std) extra=(--value-init-std "$SCALED") ;;
      small-tau) extra=("${SMALL_TAU[@]}") ;;
      both) extra=(--value-init-std "$SCALED" "${SMALL_TAU[@]}") ;;
      small) n=$N_SMALL ;;
    esac
    name="${v}_lr$lr"
    say "training $name"
    OMP_NUM_THREADS=$THREADS "$PYTHON" "$REPO/pretrain_tokenformer.py" --num-layers "$LAYERS" --hidden-size "$D" \
      --num-attention-heads "$HEADS" --seq-length "$SEQ" --micro-batch-size "$GLOBAL_BATCH" \
      --global-batch-size "$GLOBAL_BATCH" --train-iters "$TOTAL" --lr "$lr" --min-lr "$min_lr" --lr-decay-style cosine \
      --lr-warmup-iters "$WARMUP" --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0 \
      --data-path "$DATA" --tokenizer-model "$TOK" --split 95,5,0 --seed "$SEED" --log-interval 50 \
      --eval-interval "$EVAL_INTERVAL" --eval-iters "$EVAL_ITERS" --qkv-num-param-tokens "$n" \
      --proj-num-param-tokens "$n" --ffn-num-param-tokens $((4 * n)) "${extra[@]}" > "$WORK/logs/$name.log" 2>&1 \
      || fail "training run $name failed, see $WORK/logs/$name.log"
    label="x$GROWTH from scratch, $v"; [ "$v" = small ] && label="small (x1) from scratch"
    printf '%s\t%s\t%s\t%s\n' "$label" "$lr" "$SEED" "$WORK/logs/$name.log" >> "$MANIFEST"
  done
done
say "writing $REPORT and $PLOT"
"$PYTHON" "$REPO/examples/progressive_scaling/report.py" --manifest "$MANIFEST" --output "$REPORT" --plot "$PLOT" \
  --command "$0" --settings "S=$S G=$G SEQ=$SEQ GLOBAL_BATCH=$GLOBAL_BATCH LRS=\"$LRS\" D=$D LAYERS=$LAYERS HEADS=$HEADS N_SMALL=$N_SMALL GROWTH=$GROWTH SEED=$SEED value-std=$SCALED (Wang $WANG)" \
  --seconds $(( $(date +%s) - START )) || fail "report.py failed"
say "done"
