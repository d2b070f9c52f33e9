#!/usr/bin/env bash
# The whole progressive-scaling comparison as parallel cpu_repro.sh streams, then one report:
#
#   examples/progressive_scaling/parallel_sweep.sh                 # corpus from this machine's Python sources
#   examples/progressive_scaling/parallel_sweep.sh --text FILE     # on your own text
#   examples/progressive_scaling/parallel_sweep.sh --dry-run       # print the streams, run nothing
#
# cpu_repro.sh runs its arms one after another; the arms are independent until the report, so this
# script builds the corpus and tokenizer once, starts one cpu_repro.sh per arm and size at the same
# time (each on THREADS cores, its own folder under ROOT), waits for all of them, and runs report.py
# over their manifests. Every stream trains the same total number of iterations, S + G x (number of
# growth stages), with the same data, schedule shape and validation batches as cpu_repro.sh alone:
#
#   grown       Tokenformer small (swept over SMALL_LRS), grown through GROWTHS, G iterations per stage
#   x<g>        the Tokenformer of each size g in GROWTHS from scratch (LRS), S + G x stages iterations
#   net2net     Transformer small (SMALL_LRS), Net2Net-widened, trained the remaining iterations
#   tscratch    the wide Transformer from scratch (LRS)
#
# Settings (environment, defaults in brackets; the defaults are the run docs/progressive_scaling.md shows):
# LRS [3e-4 1e-3 3e-3 1e-2] for the models trained from scratch
# at full size; SMALL_LRS [$LRS] for the small models the growth arms start from (a growth stage keeps
# the small model's best LR, so its sweep decides the grown arms); SEEDS [1234 1235 1236]; GROWTHS [2 4];
# S [300] G [150]; EVAL_INTERVAL [50]; GROWN_TP [1] (cpu_repro.sh's default is 2: a 2-rank stage);
# CORPUS_SHUFFLE_SEED [1] (as cpu_repro.sh); THREADS [1] (cores per stream; all streams run at once); ROOT
# [runs/progressive_scaling_sweep] (deleted and rebuilt unless REUSE=1, which continues every stream);
# REPORT [docs/progressive_scaling.md]; PLOT [docs/progressive_scaling.png]; PYTHON [python3]; every
# other cpu_repro.sh setting (D, LAYERS, SEQ, GROWN_TP, ...) is passed through (cpu_repro.sh --help).
#
# Time on 2 quiet cores with the defaults (cpu_repro.sh's model sizes: 4 layers, d = 128; 600 iterations
# per arm, 4 learning rates, 3 seeds; 39 training runs and 9 growth conversions): 79.5 minutes.
set -euo pipefail

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
TEXT=""; DRY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --text) [ $# -ge 2 ] || { echo "parallel_sweep.sh: error: --text needs a FILE" >&2; exit 2; }; TEXT="$2"; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "parallel_sweep.sh: error: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
usage_error() { echo "parallel_sweep.sh: error: $*" >&2; exit 2; }
[ -z "$TEXT" ] || [ -f "$TEXT" ] || usage_error "--text $TEXT: no such file"

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
PYTHON=${PYTHON:-python3}
LRS=${LRS:-3e-4 1e-3 3e-3 1e-2}; SMALL_LRS=${SMALL_LRS:-$LRS}; SEEDS=${SEEDS:-1234 1235 1236}
GROWTHS=${GROWTHS:-2 4}; S=${S:-300}; G=${G:-150}; THREADS=${THREADS:-1}; GROWN_TP=${GROWN_TP:-1}
export EVAL_INTERVAL=${EVAL_INTERVAL:-50}
CORPUS_SHUFFLE_SEED=${CORPUS_SHUFFLE_SEED-1}  # as cpu_repro.sh: the local corpus in a seeded file order
ROOT=${ROOT:-$REPO/runs/progressive_scaling_sweep}
REPORT=${REPORT:-$REPO/docs/progressive_scaling.md}; PLOT=${PLOT:-$REPO/docs/progressive_scaling.png}
read -r -a GROWTH_LIST <<< "$GROWTHS"
[ ${#GROWTH_LIST[@]} -ge 1 ] || usage_error "GROWTHS is empty"
[[ "$S" =~ ^[0-9]+$ && "$G" =~ ^[0-9]+$ && "$S" -ge 1 && "$G" -ge 1 ]] || usage_error "S and G must be integers >= 1"
case "$(realpath -m "$ROOT")" in
  /|"$HOME"|"$REPO") usage_error "ROOT=$ROOT would delete a folder it does not own" ;;
esac
STAGES=${#GROWTH_LIST[@]}
LAST=${GROWTH_LIST[$STAGES-1]}
G_ALL=$((G * STAGES))   # a stream with one stage after S trains the same total: S + G x STAGES

# the streams: NAME then the settings that differ from the shared ones
STREAMS=("grown|ARMS=tokenformer-grown|GROWTHS=$GROWTHS|G=$G|LRS=$SMALL_LRS")
for g in "${GROWTH_LIST[@]}"; do STREAMS+=("x$g|ARMS=tokenformer-scratch|GROWTHS=$g|G=$G_ALL|LRS=$LRS"); done
STREAMS+=("net2net|ARMS=transformer-net2net|GROWTHS=$LAST|G=$G_ALL|LRS=$SMALL_LRS")
STREAMS+=("tscratch|ARMS=transformer-scratch|GROWTHS=$LAST|G=$G_ALL|LRS=$LRS")

# stream_env NAME|SETTING|...: the environment of one stream's cpu_repro.sh, in STREAM_ENV
stream_env() {
  local f
  IFS='|' read -r -a f <<< "$1"
  STREAM_ENV=("${f[@]:1}" S="$S" SEEDS="$SEEDS" GROWN_TP="$GROWN_TP" THREADS="$THREADS" PYTHON="$PYTHON"
              WORK="$ROOT/${f[0]}" REPORT="$ROOT/${f[0]}.md" PLOT="$ROOT/${f[0]}.png")
}
# every stream's settings are checked by cpu_repro.sh itself before anything is built or started
for s in "${STREAMS[@]}"; do
  stream_env "$s"
  err=$(env "${STREAM_ENV[@]}" CHECK_ONLY=1 bash "$HERE/cpu_repro.sh" ${TEXT:+--text "$TEXT"} 2>&1) \
    || usage_error "stream ${s%%|*}: ${err#cpu_repro.sh: error: }"
done
if [ "$DRY" = 1 ]; then
  for s in "${STREAMS[@]}"; do stream_env "$s"; echo "${s%%|*}: ${STREAM_ENV[*]}"; done
  exit 0
fi

[ "${REUSE:-0}" = 1 ] || rm -rf "$ROOT"
mkdir -p "$ROOT"
# the wall time in the report counts from the first start (REUSE=1 keeps it)
[ -f "$ROOT/started" ] || date +%s > "$ROOT/started"
START=$(date +%s); FIRST_START=$(cat "$ROOT/started")
say() { echo "[parallel_sweep $(( $(date +%s) - START ))s] $*"; }

# ---- data once, shared by every stream (the same tokenizer and token order for all arms)
if [ -n "${DATA_DIR:-}" ]; then
  say "reusing the tokenizer and dataset in $DATA_DIR"
elif [ "${REUSE:-0}" = 1 ] && [ -f "$ROOT/data/data_text_document.idx" ]; then
  DATA_DIR=$ROOT/data; say "reusing $DATA_DIR"
else
  DATA_DIR=$ROOT/data; mkdir -p "$DATA_DIR"
  INPUT=$TEXT
  if [ -z "$INPUT" ]; then
    say "building a ${CORPUS_MB:-20} MB corpus from this machine's Python sources"
    "$PYTHON" "$REPO/tools/build_local_corpus.py" --output "$DATA_DIR/corpus.jsonl" --max-mb "${CORPUS_MB:-20}" \
      ${CORPUS_SHUFFLE_SEED:+--shuffle-seed "$CORPUS_SHUFFLE_SEED"} > "$DATA_DIR/data.log"
    INPUT=$DATA_DIR/corpus.jsonl
  fi
  say "training a ${VOCAB:-2048}-token tokenizer and tokenizing $INPUT"
  { "$PYTHON" "$REPO/tools/train_tokenizer.py" --input "$INPUT" --output-prefix "$DATA_DIR/tok" \
      --vocab-size "${VOCAB:-2048}" --input-sentence-size 300000 \
    && "$PYTHON" "$REPO/tools/preprocess_data.py" --input "$INPUT" --output-prefix "$DATA_DIR/data" --overwrite \
      --tokenizer-model "$DATA_DIR/tok.model" --append-eod --workers 2; } >> "$DATA_DIR/data.log" 2>&1 \
    || { echo "parallel_sweep.sh: error: building the data failed, see $DATA_DIR/data.log" >&2; exit 1; }
fi

# ---- the streams, all at once; any failure stops the others (no stream is left running)
PIDS=()
stop_all() { for p in "${PIDS[@]}"; do kill -- "-$p" 2>/dev/null || true; done; }
trap 'stop_all; exit 130' INT TERM
for s in "${STREAMS[@]}"; do
  stream_env "$s"
  say "starting stream ${s%%|*} ($ROOT/${s%%|*}.out)"
  setsid env "${STREAM_ENV[@]}" DATA_DIR="$DATA_DIR" bash "$HERE/cpu_repro.sh" > "$ROOT/${s%%|*}.out" 2>&1 < /dev/null &
  PIDS+=($!)
done
FAILED=""
for i in "${!PIDS[@]}"; do
  IFS='|' read -r name _ <<< "${STREAMS[$i]}"
  if ! wait "${PIDS[$i]}"; then FAILED="$FAILED $name"; stop_all; fi
done
[ -z "$FAILED" ] || { echo "parallel_sweep.sh: error: stream(s)$FAILED failed, see $ROOT/<stream>.out" >&2; exit 1; }

# ---- one report over every stream's manifest
GROWN="Tokenformer grown x${GROWTHS// / -> x} (TP 1->$GROWN_TP)"
ARGS=()
for s in "${STREAMS[@]}"; do ARGS+=(--manifest "$ROOT/${s%%|*}/manifest.tsv"); done
for g in $(printf '%s\n' "${GROWTH_LIST[@]}" | sort -rn); do ARGS+=(--compare "$GROWN=Tokenformer x$g from scratch"); done
ARGS+=(--compare "Transformer Net2Net-widened=Transformer wide from scratch"
       --compare "$GROWN=Transformer Net2Net-widened"
       --sweep-only "Tokenformer small" --sweep-only "Transformer small")
SETTINGS="S=$S G=$G GROWTHS=\"$GROWTHS\" LRS=\"$LRS\" SMALL_LRS=\"$SMALL_LRS\" SEEDS=\"$SEEDS\" GROWN_TP=$GROWN_TP THREADS=$THREADS"
for k in SEQ GLOBAL_BATCH WARMUP MIN_LR_RATIO EVAL_INTERVAL EVAL_ITERS D LAYERS HEADS N_SMALL TRANSFORMER_FFN \
         WIDE_D WIDE_FFN NET2NET_NOISE CORPUS_MB CORPUS_SHUFFLE_SEED VOCAB; do
  [ -z "${!k:-}" ] || SETTINGS="$SETTINGS $k=${!k}"
done
say "writing $REPORT and $PLOT"
"$PYTHON" "$HERE/report.py" --output "$REPORT" --plot "$PLOT" "${ARGS[@]}" \
  --command "examples/progressive_scaling/parallel_sweep.sh${TEXT:+ --text $TEXT}" --settings "$SETTINGS" \
  --seconds $(( $(date +%s) - FIRST_START )) || { echo "parallel_sweep.sh: error: report.py failed" >&2; exit 1; }
say "done"
