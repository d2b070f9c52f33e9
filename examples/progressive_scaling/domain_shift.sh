#!/usr/bin/env bash
# Parameter-efficient tuning after growth, on a change of text domain (laptop scale, 2 CPU cores):
#
#   examples/progressive_scaling/domain_shift.sh
#
# 1. Two corpora from this machine's Python installation (tools/build_local_corpus.py): domain A = code
#    (.py files), domain B = prose (.rst/.md/.txt files); one SentencePiece tokenizer trained on both.
# 2. A small Tokenformer trained S iterations on A.
# 3. Its parameter tokens grown xGROWTH (tools/expand_checkpoint.py: the function is kept).
# 4. The grown model continued G iterations on B twice: every parameter trained, and
#    --train-only-new-param-tokens (only the rows the growth added, plus the final LayerNorm).
# 5. Every model evaluated (tools/evaluate_checkpoint.py) on the validation windows of A and of B:
#    what each continuation learned (B) and what it forgot (A); a markdown table in $OUTPUT.
#
# Settings (environment, defaults in brackets): S [300] G [200] SEQ [64] GLOBAL_BATCH [16] LR [3e-3]
# (the continuations restart the same schedule shape over G iterations) MIN_LR_RATIO [0.1] WARMUP [20]
# D [64] LAYERS [2] HEADS [2] N_SMALL [32] (attention tokens; FFN 4x) GROWTH [2] CORPUS_MB [4] (each
# domain) VOCAB [1024] EVAL_SAMPLES [128] SEED [1234] THREADS [2] PYTHON [python3]
# WORK [runs/domain_shift] (deleted and rebuilt) OUTPUT [$WORK/results.md].
set -euo pipefail

case "${1:-}" in
  -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
  "") ;;
  *) echo "domain_shift.sh: error: unknown argument '$1' (see --help)" >&2; exit 2 ;;
esac

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PYTHON=${PYTHON:-python3}
S=${S:-300}; G=${G:-200}; SEQ=${SEQ:-64}; GLOBAL_BATCH=${GLOBAL_BATCH:-16}; LR=${LR:-3e-3}
MIN_LR_RATIO=${MIN_LR_RATIO:-0.1}; WARMUP=${WARMUP:-20}; D=${D:-64}; LAYERS=${LAYERS:-2}; HEADS=${HEADS:-2}
N_SMALL=${N_SMALL:-32}; GROWTH=${GROWTH:-2}; CORPUS_MB=${CORPUS_MB:-4}; VOCAB=${VOCAB:-1024}
EVAL_SAMPLES=${EVAL_SAMPLES:-128}; SEED=${SEED:-1234}; THREADS=${THREADS:-2}
WORK=${WORK:-$REPO/runs/domain_shift}; OUTPUT=${OUTPUT:-$WORK/results.md}
for name in S G SEQ GLOBAL_BATCH WARMUP D LAYERS HEADS N_SMALL GROWTH CORPUS_MB VOCAB EVAL_SAMPLES SEED THREADS; do
  [[ "${!name}" =~ ^[0-9]+$ ]] || { echo "domain_shift.sh: error: $name='${!name}' is not a non-negative integer" >&2; exit 2; }
done
[ "$GROWTH" -ge 2 ] || { echo "domain_shift.sh: error: GROWTH must be >= 2, got $GROWTH" >&2; exit 2; }
case "$(realpath -m "$WORK")" in
  /|"$HOME"|"$REPO") echo "domain_shift.sh: error: WORK=$WORK would delete a folder it does not own" >&2; exit 2 ;;
esac
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
rm -rf "$WORK"
mkdir -p "$WORK/logs" "$WORK/eval" "$(dirname "$OUTPUT")"
START=$(date +%s)
say() { echo "[domain_shift $(( $(date +%s) - START ))s] $*"; }
fail() { echo "domain_shift.sh: error: $*" >&2; exit 1; }
L="$WORK/logs"

# ---- 1. data
say "building the two ${CORPUS_MB} MB corpora (A: .py code, B: .rst/.md/.txt prose)"
"$PYTHON" "$REPO/tools/build_local_corpus.py" --output "$WORK/code.jsonl" --max-mb "$CORPUS_MB" --extensions .py \
  > "$L/data.log" 2>&1 || fail "corpus A failed, see $L/data.log"
"$PYTHON" "$REPO/tools/build_local_corpus.py" --output "$WORK/prose.jsonl" --max-mb "$CORPUS_MB" \
  --extensions .rst .md .txt >> "$L/data.log" 2>&1 || fail "corpus B failed, see $L/data.log"
cat "$WORK/code.jsonl" "$WORK/prose.jsonl" > "$WORK/both.jsonl"
say "training one ${VOCAB}-token SentencePiece tokenizer on both and tokenizing each"
"$PYTHON" "$REPO/tools/train_tokenizer.py" --input "$WORK/both.jsonl" --output-prefix "$WORK/tok" --vocab-size "$VOCAB" \
  --input-sentence-size 300000 >> "$L/data.log" 2>&1 || fail "tokenizer training failed, see $L/data.log"
for domain in code prose; do
  "$PYTHON" "$REPO/tools/preprocess_data.py" --input "$WORK/$domain.jsonl" --output-prefix "$WORK/$domain" \
    --tokenizer-model "$WORK/tok.model" --append-eod --workers 2 >> "$L/data.log" 2>&1 \
    || fail "preprocessing $domain failed, see $L/data.log"
done
A="$WORK/code_text_document"; B="$WORK/prose_text_document"

# ---- training: train NAME ITERS DATA ARGS...
train() {
  local name=$1 iters=$2 data=$3 min_lr; shift 3
  min_lr=$("$PYTHON" -c "import sys; print(float(sys.argv[1]) * float(sys.argv[2]))" "$LR" "$MIN_LR_RATIO")
  say "training $name ($iters iterations)"
  OMP_NUM_THREADS=$THREADS "$PYTHON" "$REPO/pretrain_tokenformer.py" --num-layers "$LAYERS" --hidden-size "$D" \
    --num-attention-heads "$HEADS" --seq-length "$SEQ" --micro-batch-size "$GLOBAL_BATCH" \
    --global-batch-size "$GLOBAL_BATCH" --train-iters "$iters" --lr "$LR" --min-lr "$min_lr" \
    --lr-decay-style cosine --lr-warmup-iters "$WARMUP" --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 \
    --clip-grad 1.0 --data-path "$data" --tokenizer-model "$WORK/tok.model" --split 95,5,0 --seed "$SEED" \
    --log-interval 50 --eval-interval "$iters" --eval-iters 4 "$@" > "$L/$name.log" 2>&1 \
    || fail "training run $name failed, see $L/$name.log"
}
n=$N_SMALL
train small "$S" "$A" --qkv-num-param-tokens "$n" --proj-num-param-tokens "$n" --ffn-num-param-tokens $((4 * n)) \
  --save "$WORK/ckpt/small"
say "growing the parameter tokens x$GROWTH"
"$PYTHON" "$REPO/tools/expand_checkpoint.py" --load "$WORK/ckpt/small" --save "$WORK/ckpt/grown" \
  --param-token-growth-factor "$GROWTH" > "$L/expand.log" 2>&1 || fail "growth failed, see $L/expand.log"
# the continuations restart the schedule over G iterations on B (a new run on the grown weights)
CONTINUE=(--load "$WORK/ckpt/grown" --finetune --override-opt-param-scheduler)
train all_tokens "$G" "$B" "${CONTINUE[@]}" --save "$WORK/ckpt/all_tokens"
train new_tokens "$G" "$B" "${CONTINUE[@]}" --train-only-new-param-tokens --save "$WORK/ckpt/new_tokens"

# ---- evaluation on both domains
for model in small grown all_tokens new_tokens; do
  for domain in code prose; do
    say "evaluating $model on $domain"
    "$PYTHON" "$REPO/tools/evaluate_checkpoint.py" --load "$WORK/ckpt/$model" --data-path "$WORK/${domain}_text_document" \
      --split 95,5,0 --eval-split valid --max-samples "$EVAL_SAMPLES" --micro-batch-size 16 \
      --json "$WORK/eval/${model}_$domain.json" > "$L/eval_${model}_$domain.log" 2>&1 \
      || fail "evaluation of $model on $domain failed, see $L/eval_${model}_$domain.log"
  done
done

"$PYTHON" - "$WORK" "$OUTPUT" "$(( $(date +%s) - START ))" <<'PY'
import json, re, sys
work, output, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3])
rows = [("small", "small model after stage 1 on A (code)"), ("grown", "grown, before continuing"),
        ("all_tokens", "grown, continued on B: all parameters trained"),
        ("new_tokens", "grown, continued on B: --train-only-new-param-tokens")]
def trained(model):
    if model not in ("all_tokens", "new_tokens"):
        return "-"
    log = open(f"{work}/logs/{model}.log").read()
    m = re.search(r"--train-only-new-param-tokens: ([\d,]+) of ([\d,]+) parameters", log)
    if m:
        return m.group(1)
    m = re.search(r"number of parameters: ([\d.,]+ ?[KMB]?)", log)
    return m.group(1).strip() if m else "?"
lines = ["| model | parameters trained on B | validation loss, A (code) | validation loss, B (prose) |",
         "| --- | ---: | ---: | ---: |"]
for model, label in rows:
    loss = {d: json.load(open(f"{work}/eval/{model}_{d}.json"))["loss"] for d in ("code", "prose")}
    lines.append(f"| {label} | {trained(model)} | {loss['code']:.3f} | {loss['prose']:.3f} |")
lines.append("")
lines.append(f"{seconds} s in all.")
open(output, "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PY
say "done: $OUTPUT"
