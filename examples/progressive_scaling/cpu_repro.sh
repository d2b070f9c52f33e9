#!/usr/bin/env bash
# Progressive scaling at laptop scale (2 CPU cores, about 25 minutes with the defaults):
#
#   examples/progressive_scaling/cpu_repro.sh                 # on a corpus built from this machine's
#                                                             # Python sources (tools/build_local_corpus.py)
#   examples/progressive_scaling/cpu_repro.sh --text FILE     # on your own text (plain text or JSON-lines)
#
# Four arms, all with the same data order, the same learning-rate schedule (one cosine over S + G
# iterations), the same validation batches and the same seed:
#
#   tokenformer-grown   Tokenformer, 4 layers, d = 128, 64 tokens per attention Pattention (256 FFN),
#                       trained S iterations; grown x4 in parameter tokens with tools/expand_checkpoint.py
#                       and resharded TP 1 -> 2 on the way; trained G more iterations on 2 ranks (TP = 2)
#   tokenformer-scratch the x4 Tokenformer (256 / 1024 tokens) trained from scratch for S + G iterations
#   transformer-net2net the baseline Transformer, d = 128, MLP 192 (about the small Tokenformer's size),
#                       trained S iterations; Net2Net-widened to d = 256, 8 heads, MLP 384 (the x4
#                       Tokenformer's parameter count) with tools/expand_checkpoint.py --hidden-size;
#                       trained G more iterations
#   transformer-scratch the wide Transformer trained from scratch for S + G iterations (TRANSFORMER_SCRATCH=0
#                       skips it)
#
# Then examples/progressive_scaling/report.py parses the training logs and writes $REPORT (a table:
# parameters, iterations, training FLOPs, final validation loss and perplexity per arm) and $PLOT
# (validation loss against cumulative training FLOPs).
#
# Settings (environment variables, defaults in brackets): S [800] G [400] iterations; SEQ [128];
# GLOBAL_BATCH [16]; LR [1e-3] MIN_LR [1e-4] WARMUP [50]; EVAL_INTERVAL [100] EVAL_ITERS [10];
# CORPUS_MB [20]; VOCAB [2048]; D [128] LAYERS [4] HEADS [4]; N_SMALL [64] (attention tokens, FFN 4x);
# GROWTH [4] (token factor); TRANSFORMER_FFN [192]; WIDE_D [256] WIDE_FFN [384]; NET2NET_NOISE [0.05];
# TRANSFORMER_SCRATCH [1];
# WORK [runs/progressive_scaling] (everything but the report goes here; deleted and rebuilt);
# REPORT [docs/progressive_scaling.md]; PLOT [docs/progressive_scaling.png]; PYTHON [python3]; THREADS [2].
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
LR=${LR:-1e-3}; MIN_LR=${MIN_LR:-1e-4}; WARMUP=${WARMUP:-50}
EVAL_INTERVAL=${EVAL_INTERVAL:-100}; EVAL_ITERS=${EVAL_ITERS:-10}
CORPUS_MB=${CORPUS_MB:-20}; VOCAB=${VOCAB:-2048}
D=${D:-128}; LAYERS=${LAYERS:-4}; HEADS=${HEADS:-4}; N_SMALL=${N_SMALL:-64}; GROWTH=${GROWTH:-4}
TRANSFORMER_FFN=${TRANSFORMER_FFN:-192}; WIDE_D=${WIDE_D:-256}; WIDE_FFN=${WIDE_FFN:-384}
NET2NET_NOISE=${NET2NET_NOISE:-0.05}; THREADS=${THREADS:-2}; TRANSFORMER_SCRATCH=${TRANSFORMER_SCRATCH:-1}
WORK=${WORK:-$REPO/runs/progressive_scaling}
REPORT=${REPORT:-$REPO/docs/progressive_scaling.md}; PLOT=${PLOT:-$REPO/docs/progressive_scaling.png}
TOTAL=$((S + G))
N_BIG=$((N_SMALL * GROWTH))
WIDE_HEADS=$((HEADS * WIDE_D / D))
COMMAND="$0${TEXT:+ --text $TEXT}"
SETTINGS="S=$S G=$G SEQ=$SEQ GLOBAL_BATCH=$GLOBAL_BATCH LR=$LR MIN_LR=$MIN_LR WARMUP=$WARMUP EVAL_INTERVAL=$EVAL_INTERVAL EVAL_ITERS=$EVAL_ITERS CORPUS_MB=$CORPUS_MB VOCAB=$VOCAB D=$D LAYERS=$LAYERS HEADS=$HEADS N_SMALL=$N_SMALL GROWTH=$GROWTH TRANSFORMER_FFN=$TRANSFORMER_FFN WIDE_D=$WIDE_D WIDE_FFN=$WIDE_FFN NET2NET_NOISE=$NET2NET_NOISE TRANSFORMER_SCRATCH=$TRANSFORMER_SCRATCH"

export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
case "$(realpath -m "$WORK")" in
  /|"$HOME"|"$REPO") echo "cpu_repro.sh: error: WORK=$WORK would delete a folder it does not own" >&2; exit 2 ;;
esac
if [ "$G" -lt 1 ] || [ "$S" -lt 1 ]; then echo "cpu_repro.sh: error: S and G must be >= 1" >&2; exit 2; fi
rm -rf "$WORK"
mkdir -p "$WORK/logs" "$(dirname "$REPORT")" "$(dirname "$PLOT")"
START=$(date +%s)
say() { echo "[cpu_repro $(( $(date +%s) - START ))s] $*"; }
fail() { echo "cpu_repro.sh: error: $*" >&2; exit 1; }

# ---- data: corpus -> tokenizer -> indexed dataset
if [ -z "$TEXT" ]; then
  say "building a ${CORPUS_MB} MB corpus from this machine's Python sources"
  "$PYTHON" "$REPO/tools/build_local_corpus.py" --output "$WORK/corpus.jsonl" --max-mb "$CORPUS_MB" > "$WORK/logs/data.log"
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
DATA="$WORK/data_text_document"

# ---- the shared training flags: same data, schedule (over S + G), validation batches and seed for every run
COMMON=(--num-layers "$LAYERS" --num-attention-heads "$HEADS" --seq-length "$SEQ"
        --micro-batch-size "$GLOBAL_BATCH" --global-batch-size "$GLOBAL_BATCH" --train-iters "$TOTAL"
        --lr "$LR" --min-lr "$MIN_LR" --lr-decay-style cosine --lr-warmup-iters "$WARMUP"
        --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0
        --data-path "$DATA" --tokenizer-model "$WORK/tok.model" --split 95,5,0 --seed 1234
        --log-interval 50 --eval-interval "$EVAL_INTERVAL" --eval-iters "$EVAL_ITERS")
TOKENFORMER_SMALL=(--hidden-size "$D" --qkv-num-param-tokens "$N_SMALL" --proj-num-param-tokens "$N_SMALL"
                   --ffn-num-param-tokens $((4 * N_SMALL)))

# run NAME ARGS...: one single-process training run, log in $WORK/logs/NAME.log
run() {
  local name=$1; shift
  say "training $name"
  OMP_NUM_THREADS=$THREADS "$PYTHON" "$REPO/pretrain_tokenformer.py" "$@" > "$WORK/logs/$name.log" 2>&1 \
    || fail "training run $name failed, see $WORK/logs/$name.log"
}
# run2 NAME ARGS...: the same on 2 ranks (torch.distributed.run, gloo)
run2() {
  local name=$1; shift
  local port
  port=$("$PYTHON" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
  say "training $name on 2 ranks"
  OMP_NUM_THREADS=1 "$PYTHON" -m torch.distributed.run --nproc_per_node 2 --master_addr 127.0.0.1 \
    --master_port "$port" "$REPO/pretrain_tokenformer.py" "$@" > "$WORK/logs/$name.log" 2>&1 \
    || fail "training run $name failed, see $WORK/logs/$name.log"
}
expand() {
  local name=$1; shift
  say "tools/expand_checkpoint.py $*"
  "$PYTHON" "$REPO/tools/expand_checkpoint.py" "$@" > "$WORK/logs/$name.log" 2>&1 \
    || fail "tools/expand_checkpoint.py failed, see $WORK/logs/$name.log"
}

# ---- arm 1: Tokenformer small -> x4 tokens (TP 1 -> 2) -> G more iterations
run tokenformer_small "${COMMON[@]}" "${TOKENFORMER_SMALL[@]}" --save "$WORK/ckpt/tokenformer_small" --exit-interval "$S"
expand tokenformer_expand --load "$WORK/ckpt/tokenformer_small" --save "$WORK/ckpt/tokenformer_grown" \
  --param-token-growth-factor "$GROWTH" --target-tensor-model-parallel-size 2
run2 tokenformer_grown "${COMMON[@]}" --hidden-size "$D" --tensor-model-parallel-size 2 \
  --load "$WORK/ckpt/tokenformer_grown" --save "$WORK/ckpt/tokenformer_grown_trained"

# ---- arm 2: the x4 Tokenformer from scratch
run tokenformer_scratch "${COMMON[@]}" --hidden-size "$D" --qkv-num-param-tokens "$N_BIG" \
  --proj-num-param-tokens "$N_BIG" --ffn-num-param-tokens $((4 * N_BIG))

# ---- arm 3: Transformer small -> Net2Net-widened -> G more iterations
run transformer_small "${COMMON[@]}" --model-type transformer --hidden-size "$D" --ffn-hidden-size "$TRANSFORMER_FFN" \
  --save "$WORK/ckpt/transformer_small" --exit-interval "$S"
expand transformer_expand --load "$WORK/ckpt/transformer_small" --save "$WORK/ckpt/transformer_wide" \
  --hidden-size "$WIDE_D" --ffn-hidden-size "$WIDE_FFN" --net2net-noise-std "$NET2NET_NOISE"
run transformer_wide "${COMMON[@]}" --model-type transformer --num-attention-heads "$WIDE_HEADS" \
  --load "$WORK/ckpt/transformer_wide" --save "$WORK/ckpt/transformer_wide_trained"

ARMS=(--arm "Tokenformer grown x$GROWTH (TP 1->2)=$WORK/logs/tokenformer_small.log,$WORK/logs/tokenformer_grown.log"
      --arm "Tokenformer x$GROWTH from scratch=$WORK/logs/tokenformer_scratch.log"
      --arm "Transformer Net2Net-widened=$WORK/logs/transformer_small.log,$WORK/logs/transformer_wide.log")

# ---- arm 4: the wide Transformer from scratch
if [ "$TRANSFORMER_SCRATCH" = 1 ]; then
  run transformer_scratch "${COMMON[@]}" --model-type transformer --hidden-size "$WIDE_D" \
    --num-attention-heads "$WIDE_HEADS" --ffn-hidden-size "$WIDE_FFN"
  ARMS+=(--arm "Transformer wide from scratch=$WORK/logs/transformer_scratch.log")
fi

# ---- report
say "writing $REPORT and $PLOT"
"$PYTHON" "$REPO/examples/progressive_scaling/report.py" --output "$REPORT" --plot "$PLOT" \
  --command "$COMMAND" --settings "$SETTINGS" --seconds $(( $(date +%s) - START )) "${ARMS[@]}"
say "done"
