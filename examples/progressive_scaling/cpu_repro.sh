#!/usr/bin/env bash
# Progressive scaling at laptop scale (2 CPU cores, about 25 minutes with the defaults):
#
#   examples/progressive_scaling/cpu_repro.sh                 # on a corpus built from this machine's
#                                                             # Python sources (tools/build_local_corpus.py)
#   examples/progressive_scaling/cpu_repro.sh --text FILE     # on your own text (plain text or JSON-lines)
#
# Arms (ARMS, all by default), all with the same data order per seed, the same learning-rate schedule
# shape (one cosine over S + G x stages iterations), the same validation batches:
#
#   tokenformer-grown   Tokenformer, LAYERS layers, d = D, N_SMALL tokens per attention Pattention (4x in
#                       the FFN), trained S iterations; then for each factor in GROWTHS (cumulative, e.g.
#                       "2 4": x2, then x4) grown in parameter tokens with tools/expand_checkpoint.py (the first
#                       growth also reshards TP 1 -> GROWN_TP) and trained G more iterations
#   tokenformer-scratch the Tokenformer of every size in GROWTHS trained from scratch for all iterations
#   transformer-net2net the baseline Transformer, d = D, MLP TRANSFORMER_FFN (about the small Tokenformer's
#                       size), trained S iterations; Net2Net-widened to d = WIDE_D, MLP WIDE_FFN (the largest
#                       Tokenformer's parameter count) with tools/expand_checkpoint.py --hidden-size; trained the
#                       remaining iterations
#   transformer-scratch the wide Transformer trained from scratch for all iterations
#
# Learning rates: every from-scratch run (the small stage-1 runs included) is trained at each LR in LRS
# with the first seed of SEEDS; report.py picks each arm's best (lowest final validation loss); the other
# seeds run at that LR only. The growth and Net2Net stages continue with the small model's best LR.
# MIN_LR is MIN_LR_RATIO x LR. Then examples/progressive_scaling/report.py writes $REPORT (sweep table,
# mean +- std over seeds, FLOPs to the target loss, loss at equal FLOPs) and $PLOT (error bars).
#
# Settings (environment variables, defaults in brackets): S [800] G [400] iterations (G per growth stage);
# SEQ [128]; GLOBAL_BATCH [16]; LRS [1e-3] (space-separated learning rates to sweep; LR [1e-3] is the
# default single one); MIN_LR_RATIO [0.1]; WARMUP [50]; SEEDS [1234] (space-separated);
# GROWTHS [4] (cumulative token factors of the growth stages, e.g. "2 4"; GROWTH [4] is the default single
# one); ARMS [tokenformer-grown tokenformer-scratch transformer-net2net transformer-scratch];
# GROWN_TP [2] (tensor-parallel size after the first growth); EVAL_INTERVAL [100] EVAL_ITERS [10];
# CORPUS_MB [20]; CORPUS_SHUFFLE_SEED [1] (the local corpus's files in this seed's order, so the 5%
# validation split samples the whole corpus; empty: sorted, which validates on the last packages only);
# VOCAB [2048]; D [128] LAYERS [4] HEADS [4]; N_SMALL [64] (attention tokens, FFN 4x);
# TRANSFORMER_FFN [192]; WIDE_D [256] WIDE_FFN [384]; NET2NET_NOISE [0.05]; TRANSFORMER_SCRATCH [1] (0 drops
# transformer-scratch from ARMS);
# CHECK_ONLY [0] (1: check the settings, exit 0 if they are valid, touch nothing);
# REUSE [0] (1: keep WORK and skip every run whose log says it stopped where planned and every growth whose
# log says it wrote its checkpoint: continue an interrupted experiment with the same settings);
# DATA_DIR [] (a folder with tok.model and data_text_document.bin/.idx from an earlier run: reused, no
# corpus or tokenizer is built);
# WORK [runs/progressive_scaling] (everything but the report goes here; deleted and rebuilt);
# REPORT [docs/progressive_scaling.md]; PLOT [docs/progressive_scaling.png]; PYTHON [python3]; THREADS [2].
#
# The default is one LR, one seed, one growth stage (about 25 minutes). A sweep in one stream:
#   LRS="1e-3 3e-3 1e-2" SEEDS="1234 1235 1236" GROWTHS="2 4" examples/progressive_scaling/cpu_repro.sh
# examples/progressive_scaling/parallel_sweep.sh runs the same as parallel streams (the page's run;
# docs/progressive_scaling.md states the sizes and the time of the run it shows).
set -euo pipefail

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
TEXT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --text) [ $# -ge 2 ] || { echo "cpu_repro.sh: error: --text needs a FILE" >&2; exit 2; }; TEXT="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "cpu_repro.sh: error: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
if [ -n "$TEXT" ] && [ ! -f "$TEXT" ]; then
  echo "cpu_repro.sh: error: --text $TEXT: no such file" >&2; exit 2
fi

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PYTHON=${PYTHON:-python3}
S=${S:-800}; G=${G:-400}; SEQ=${SEQ:-128}; GLOBAL_BATCH=${GLOBAL_BATCH:-16}
LR=${LR:-1e-3}; LRS=${LRS:-$LR}; MIN_LR_RATIO=${MIN_LR_RATIO:-0.1}; WARMUP=${WARMUP:-50}; SEEDS=${SEEDS:-1234}
EVAL_INTERVAL=${EVAL_INTERVAL:-100}; EVAL_ITERS=${EVAL_ITERS:-10}
CORPUS_MB=${CORPUS_MB:-20}; VOCAB=${VOCAB:-2048}; CORPUS_SHUFFLE_SEED=${CORPUS_SHUFFLE_SEED-1}
D=${D:-128}; LAYERS=${LAYERS:-4}; HEADS=${HEADS:-4}; N_SMALL=${N_SMALL:-64}; GROWTH=${GROWTH:-4}; GROWTHS=${GROWTHS:-$GROWTH}
TRANSFORMER_FFN=${TRANSFORMER_FFN:-192}; WIDE_D=${WIDE_D:-256}; WIDE_FFN=${WIDE_FFN:-384}
NET2NET_NOISE=${NET2NET_NOISE:-0.05}; THREADS=${THREADS:-2}; TRANSFORMER_SCRATCH=${TRANSFORMER_SCRATCH:-1}
ARMS=${ARMS:-tokenformer-grown tokenformer-scratch transformer-net2net transformer-scratch}; GROWN_TP=${GROWN_TP:-2}
DATA_DIR=${DATA_DIR:-}
WORK=${WORK:-$REPO/runs/progressive_scaling}
REPORT=${REPORT:-$REPO/docs/progressive_scaling.md}; PLOT=${PLOT:-$REPO/docs/progressive_scaling.png}
read -r -a LR_LIST <<< "$LRS"; read -r -a SEED_LIST <<< "$SEEDS"; read -r -a GROWTH_LIST <<< "$GROWTHS"
read -r -a ARM_LIST <<< "$ARMS"
[ "$TRANSFORMER_SCRATCH" = 1 ] || ARM_LIST=($(printf '%s\n' "${ARM_LIST[@]}" | grep -vx transformer-scratch || true))
TOTAL=$((S + G * ${#GROWTH_LIST[@]}))
LAST_GROWTH=${GROWTH_LIST[${#GROWTH_LIST[@]}-1]}
WIDE_HEADS=$((HEADS * WIDE_D / D))
COMMAND="$0${TEXT:+ --text $TEXT}"
SETTINGS="S=$S G=$G SEQ=$SEQ GLOBAL_BATCH=$GLOBAL_BATCH LRS=\"$LRS\" MIN_LR_RATIO=$MIN_LR_RATIO WARMUP=$WARMUP SEEDS=\"$SEEDS\" GROWTHS=\"$GROWTHS\" GROWN_TP=$GROWN_TP EVAL_INTERVAL=$EVAL_INTERVAL EVAL_ITERS=$EVAL_ITERS CORPUS_MB=$CORPUS_MB CORPUS_SHUFFLE_SEED=$CORPUS_SHUFFLE_SEED VOCAB=$VOCAB D=$D LAYERS=$LAYERS HEADS=$HEADS N_SMALL=$N_SMALL TRANSFORMER_FFN=$TRANSFORMER_FFN WIDE_D=$WIDE_D WIDE_FFN=$WIDE_FFN NET2NET_NOISE=$NET2NET_NOISE ARMS=\"${ARM_LIST[*]}\""

usage_error() { echo "cpu_repro.sh: error: $*" >&2; exit 2; }
[ ${#LR_LIST[@]} -ge 1 ] || usage_error "LRS is empty"
[ ${#SEED_LIST[@]} -ge 1 ] || usage_error "SEEDS is empty"
[ ${#GROWTH_LIST[@]} -ge 1 ] || usage_error "GROWTHS is empty"
for lr in "${LR_LIST[@]}"; do
  "$PYTHON" -c "import sys; v = float(sys.argv[1]); sys.exit(0 if v > 0 else 1)" "$lr" 2>/dev/null \
    || usage_error "LRS: '$lr' is not a positive number"
done
for seed in "${SEED_LIST[@]}"; do [[ "$seed" =~ ^[0-9]+$ ]] || usage_error "SEEDS: '$seed' is not a non-negative integer"; done
previous=1
for g in "${GROWTH_LIST[@]}"; do
  { [[ "$g" =~ ^[0-9]+$ ]] && [ "$g" -gt "$previous" ] && [ $((g % previous)) -eq 0 ]; } \
    || usage_error "GROWTHS: '$GROWTHS' must be increasing integers > 1, each a multiple of the one before"
  previous=$g
done
for arm in "${ARM_LIST[@]}"; do
  case "$arm" in tokenformer-grown|tokenformer-scratch|transformer-net2net|transformer-scratch) ;;
    *) usage_error "ARMS: unknown arm '$arm' (tokenformer-grown tokenformer-scratch transformer-net2net transformer-scratch)" ;;
  esac
done
case "$GROWN_TP" in 1|2) ;; *) usage_error "GROWN_TP must be 1 or 2, got '$GROWN_TP'" ;; esac
if [ -n "$DATA_DIR" ] && { [ ! -f "$DATA_DIR/tok.model" ] || [ ! -f "$DATA_DIR/data_text_document.bin" ]; }; then
  usage_error "DATA_DIR=$DATA_DIR: expected tok.model and data_text_document.bin/.idx there"
fi
has_arm() { printf '%s\n' "${ARM_LIST[@]}" | grep -qx "$1"; }

export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
case "$(realpath -m "$WORK")" in
  /|"$HOME"|"$REPO") echo "cpu_repro.sh: error: WORK=$WORK would delete a folder it does not own" >&2; exit 2 ;;
esac
if [ "$G" -lt 1 ] || [ "$S" -lt 1 ]; then echo "cpu_repro.sh: error: S and G must be >= 1" >&2; exit 2; fi
[ "${CHECK_ONLY:-0}" = 1 ] && exit 0  # the settings are valid; nothing was built or deleted
[ "${REUSE:-0}" = 1 ] || rm -rf "$WORK"
mkdir -p "$WORK/logs" "$(dirname "$REPORT")" "$(dirname "$PLOT")"
START=$(date +%s)
say() { echo "[cpu_repro $(( $(date +%s) - START ))s] $*"; }
fail() { echo "cpu_repro.sh: error: $*" >&2; exit 1; }

# ---- data: corpus -> tokenizer -> indexed dataset
if [ -n "$DATA_DIR" ]; then
  say "reusing the tokenizer and dataset in $DATA_DIR"
  TOK="$DATA_DIR/tok.model"; DATA="$DATA_DIR/data_text_document"
else
  if [ -z "$TEXT" ]; then
    say "building a ${CORPUS_MB} MB corpus from this machine's Python sources"
    "$PYTHON" "$REPO/tools/build_local_corpus.py" --output "$WORK/corpus.jsonl" --max-mb "$CORPUS_MB" \
      ${CORPUS_SHUFFLE_SEED:+--shuffle-seed "$CORPUS_SHUFFLE_SEED"} > "$WORK/logs/data.log"
    INPUT="$WORK/corpus.jsonl"
  else
    INPUT="$TEXT"
  fi
  say "training a ${VOCAB}-token SentencePiece tokenizer and tokenizing $INPUT"
  "$PYTHON" "$REPO/tools/train_tokenizer.py" --input "$INPUT" --output-prefix "$WORK/tok" --vocab-size "$VOCAB" \
    --input-sentence-size 300000 >> "$WORK/logs/data.log" 2>&1 || fail "tokenizer training failed, see $WORK/logs/data.log"
  "$PYTHON" "$REPO/tools/preprocess_data.py" --input "$INPUT" --output-prefix "$WORK/data" --overwrite \
    --tokenizer-model "$WORK/tok.model" --append-eod --workers 2 >> "$WORK/logs/data.log" 2>&1 \
    || fail "preprocessing failed, see $WORK/logs/data.log"
  TOK="$WORK/tok.model"; DATA="$WORK/data_text_document"
fi

# ---- the shared training flags: same data, schedule shape (over TOTAL), validation batches; LR and seed per run
# common LR SEED: the flags every run shares
common() {
  local min_lr
  min_lr=$("$PYTHON" -c "import sys; print(float(sys.argv[1]) * float(sys.argv[2]))" "$1" "$MIN_LR_RATIO")
  COMMON=(--num-layers "$LAYERS" --num-attention-heads "$HEADS" --seq-length "$SEQ"
          --micro-batch-size "$GLOBAL_BATCH" --global-batch-size "$GLOBAL_BATCH" --train-iters "$TOTAL"
          --lr "$1" --min-lr "$min_lr" --lr-decay-style cosine --lr-warmup-iters "$WARMUP"
          --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0
          --data-path "$DATA" --tokenizer-model "$TOK" --split 95,5,0 --seed "$2"
          --log-interval 50 --eval-interval "$EVAL_INTERVAL" --eval-iters "$EVAL_ITERS")
}
tokens() {  # tokens FACTOR: the Tokenformer token-count flags of N_SMALL x FACTOR
  local n=$((N_SMALL * $1))
  echo --hidden-size "$D" --qkv-num-param-tokens "$n" --proj-num-param-tokens "$n" --ffn-num-param-tokens $((4 * n))
}
# run NAME ARGS...: one single-process training run, log in $WORK/logs/NAME.log
# done_before NAME: REUSE=1 and the run's log ends at its planned stop (not a signal or a time limit)
done_before() { [ "${REUSE:-0}" = 1 ] && grep -Eq '^> done: .*\((train-iters|--exit-interval [0-9]+)\)' "$WORK/logs/$1.log" 2>/dev/null; }
run() {
  local name=$1; shift
  if done_before "$name"; then say "reusing $name"; return 0; fi
  say "training $name"
  OMP_NUM_THREADS=$THREADS "$PYTHON" "$REPO/pretrain_tokenformer.py" "$@" > "$WORK/logs/$name.log" 2>&1 \
    || fail "training run $name failed, see $WORK/logs/$name.log"
}
# run2 NAME ARGS...: the same on 2 ranks (torch.distributed.run, gloo)
run2() {
  local name=$1; shift
  local port
  if done_before "$name"; then say "reusing $name"; return 0; fi
  port=$("$PYTHON" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
  say "training $name on 2 ranks"
  OMP_NUM_THREADS=1 "$PYTHON" -m torch.distributed.run --nproc_per_node 2 --master_addr 127.0.0.1 \
    --master_port "$port" "$REPO/pretrain_tokenformer.py" "$@" > "$WORK/logs/$name.log" 2>&1 \
    || fail "training run $name failed, see $WORK/logs/$name.log"
}
expand() {
  local name=$1; shift
  if [ "${REUSE:-0}" = 1 ] && grep -q '^wrote' "$WORK/logs/$name.log" 2>/dev/null; then say "reusing $name"; return 0; fi
  say "tools/expand_checkpoint.py $*"
  "$PYTHON" "$REPO/tools/expand_checkpoint.py" "$@" > "$WORK/logs/$name.log" 2>&1 \
    || fail "tools/expand_checkpoint.py failed, see $WORK/logs/$name.log"
}

MANIFEST="$WORK/manifest.tsv"
: > "$MANIFEST"
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >> "$MANIFEST"; }  # record ARM LR SEED LOGS
L="$WORK/logs"
TF_SMALL="Tokenformer small"
T_SMALL="Transformer small"
grown_name="Tokenformer grown x${GROWTHS// / -> x} (TP 1->$GROWN_TP)"
T_GROWN="Transformer Net2Net-widened"
T_SCRATCH="Transformer wide from scratch"
tf_scratch_name() { echo "Tokenformer x$1 from scratch"; }

# scratch_runs LR SEED: every from-scratch run of the selected arms (small stage-1 runs included)
scratch_runs() {
  local lr=$1 seed=$2 tag="lr$1_s$2" g
  common "$lr" "$seed"
  if has_arm tokenformer-grown; then
    run "tokenformer_small_$tag" "${COMMON[@]}" $(tokens 1) --save "$WORK/ckpt/tokenformer_small_$tag" --exit-interval "$S"
    record "$TF_SMALL" "$lr" "$seed" "$L/tokenformer_small_$tag.log"
  fi
  if has_arm transformer-net2net; then
    run "transformer_small_$tag" "${COMMON[@]}" --model-type transformer --hidden-size "$D" \
      --ffn-hidden-size "$TRANSFORMER_FFN" --save "$WORK/ckpt/transformer_small_$tag" --exit-interval "$S"
    record "$T_SMALL" "$lr" "$seed" "$L/transformer_small_$tag.log"
  fi
  if has_arm tokenformer-scratch; then
    for g in "${GROWTH_LIST[@]}"; do
      run "tokenformer_x${g}_scratch_$tag" "${COMMON[@]}" $(tokens "$g")
      record "$(tf_scratch_name "$g")" "$lr" "$seed" "$L/tokenformer_x${g}_scratch_$tag.log"
    done
  fi
  if has_arm transformer-scratch; then
    run "transformer_scratch_$tag" "${COMMON[@]}" --model-type transformer --hidden-size "$WIDE_D" \
      --num-attention-heads "$WIDE_HEADS" --ffn-hidden-size "$WIDE_FFN"
    record "$T_SCRATCH" "$lr" "$seed" "$L/transformer_scratch_$tag.log"
  fi
}
best_lr() { "$PYTHON" "$REPO/examples/progressive_scaling/report.py" --manifest "$MANIFEST" --best-lr "$1"; }

# ---- 1. the sweep: every LR at the first seed
SEED0=${SEED_LIST[0]}
for lr in "${LR_LIST[@]}"; do scratch_runs "$lr" "$SEED0"; done
declare -A BEST
for name in "$TF_SMALL" "$T_SMALL" "$T_SCRATCH" $(for g in "${GROWTH_LIST[@]}"; do echo "x$g"; done); do
  case "$name" in x*) name="Tokenformer $name from scratch" ;; esac
  if grep -q "^$name	" "$MANIFEST"; then BEST[$name]=$(best_lr "$name") || fail "report.py --best-lr failed"; fi
done
for name in "${!BEST[@]}"; do say "best learning rate of $name: ${BEST[$name]}"; done

# growth_runs SEED: the growth stages (Tokenformer) and the Net2Net stage, from the small runs at their best LR
growth_runs() {
  local seed=$1 lr tag src logs prev end tp g runner
  if has_arm tokenformer-grown; then
    lr=${BEST[$TF_SMALL]}; tag="lr${lr}_s$seed"; common "$lr" "$seed"
    src="$WORK/ckpt/tokenformer_small_$tag"; logs="$L/tokenformer_small_$tag.log"; prev=1; end=$S; tp=1
    for g in "${GROWTH_LIST[@]}"; do
      end=$((end + G))
      expand "tokenformer_expand_x${g}_$tag" --load "$src" --save "$WORK/ckpt/tokenformer_x${g}_grown_$tag" \
        --param-token-growth-factor $((g / prev)) --target-tensor-model-parallel-size "$GROWN_TP"
      tp=$GROWN_TP
      runner=run; [ "$tp" = 2 ] && runner=run2
      $runner "tokenformer_x${g}_grown_$tag" "${COMMON[@]}" --hidden-size "$D" --tensor-model-parallel-size "$tp" \
        --load "$WORK/ckpt/tokenformer_x${g}_grown_$tag" --save "$WORK/ckpt/tokenformer_x${g}_grown_trained_$tag" \
        $([ "$end" -lt "$TOTAL" ] && echo --exit-interval "$end")
      logs="$logs,$L/tokenformer_x${g}_grown_$tag.log"
      src="$WORK/ckpt/tokenformer_x${g}_grown_trained_$tag"; prev=$g
    done
    record "$grown_name" "$lr" "$seed" "$logs"
  fi
  if has_arm transformer-net2net; then
    lr=${BEST[$T_SMALL]}; tag="lr${lr}_s$seed"; common "$lr" "$seed"
    expand "transformer_expand_$tag" --load "$WORK/ckpt/transformer_small_$tag" --save "$WORK/ckpt/transformer_wide_$tag" \
      --hidden-size "$WIDE_D" --ffn-hidden-size "$WIDE_FFN" --net2net-noise-std "$NET2NET_NOISE"
    run "transformer_wide_$tag" "${COMMON[@]}" --model-type transformer --num-attention-heads "$WIDE_HEADS" \
      --load "$WORK/ckpt/transformer_wide_$tag" --save "$WORK/ckpt/transformer_wide_trained_$tag"
    record "$T_GROWN" "$lr" "$seed" "$L/transformer_small_$tag.log,$L/transformer_wide_$tag.log"
  fi
}

# ---- 2. growth at the first seed, then the other seeds (each arm at its best LR, growth included): an
# interrupted experiment has complete seeds
growth_runs "$SEED0"
for seed in "${SEED_LIST[@]:1}"; do
  for arm in "${ARM_LIST[@]}"; do
    case "$arm" in
      tokenformer-grown) ARMS_SAVED=("${ARM_LIST[@]}"); ARM_LIST=(tokenformer-grown); scratch_runs "${BEST[$TF_SMALL]}" "$seed"; ARM_LIST=("${ARMS_SAVED[@]}") ;;
      transformer-net2net) ARMS_SAVED=("${ARM_LIST[@]}"); ARM_LIST=(transformer-net2net); scratch_runs "${BEST[$T_SMALL]}" "$seed"; ARM_LIST=("${ARMS_SAVED[@]}") ;;
      transformer-scratch) ARMS_SAVED=("${ARM_LIST[@]}"); ARM_LIST=(transformer-scratch); scratch_runs "${BEST[$T_SCRATCH]}" "$seed"; ARM_LIST=("${ARMS_SAVED[@]}") ;;
      tokenformer-scratch)
        for g in "${GROWTH_LIST[@]}"; do
          lr=${BEST[$(tf_scratch_name "$g")]}; tag="lr${lr}_s$seed"; common "$lr" "$seed"
          run "tokenformer_x${g}_scratch_$tag" "${COMMON[@]}" $(tokens "$g")
          record "$(tf_scratch_name "$g")" "$lr" "$seed" "$L/tokenformer_x${g}_scratch_$tag.log"
        done ;;
    esac
  done
  growth_runs "$seed"
done

# ---- report
COMPARE=()
if has_arm tokenformer-grown && has_arm tokenformer-scratch; then
  COMPARE+=(--compare "$grown_name=$(tf_scratch_name "$LAST_GROWTH")")
fi
if has_arm transformer-net2net && has_arm transformer-scratch; then COMPARE+=(--compare "$T_GROWN=$T_SCRATCH"); fi
has_arm tokenformer-grown && COMPARE+=(--sweep-only "$TF_SMALL")
has_arm transformer-net2net && COMPARE+=(--sweep-only "$T_SMALL")
say "writing $REPORT and $PLOT"
"$PYTHON" "$REPO/examples/progressive_scaling/report.py" --output "$REPORT" --plot "$PLOT" --manifest "$MANIFEST" \
  "${COMPARE[@]}" \
  --command "$COMMAND" --settings "$SETTINGS" --seconds $(( $(date +%s) - START )) \
  || fail "report.py failed"
say "done"
