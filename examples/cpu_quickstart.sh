#!/usr/bin/env bash
# CPU quick start: corpus -> tokenizer -> indexed dataset -> Tokenformer training on 2 CPU ranks (TP = 2)
# -> a saved checkpoint, and the commands that go on from it (generate, grow x2, export to Hugging Face).
#
#   bash examples/cpu_quickstart.sh
#
# Everything lands in $WORK (default ./quickstart, relative to the directory you run it from); a second
# run reuses the corpus, tokenizer and dataset and trains again from scratch. The checkpoint goes to
# $CKPT (default: the first of $WORK/checkpoints, $WORK/checkpoints-2, ... that does not exist yet, so a
# checkpoint is never overwritten; a CKPT that already exists is refused). Knobs (environment): WORK,
# CKPT, PYTHON, ITERS (default 300), CORPUS_MB (default 4), VOCAB (default 4096), LOG_INTERVAL,
# MASTER_PORT. About 5-8 minutes on 2 cores.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
WORK=${WORK:-quickstart}
PYTHON=${PYTHON:-python3}
ITERS=${ITERS:-300}
CORPUS_MB=${CORPUS_MB:-4}
VOCAB=${VOCAB:-4096}
# a shortened run (tests: a few ITERS) still logs every iteration and warms up within its length
if [ "$ITERS" -ge 20 ]; then LOG_INTERVAL=${LOG_INTERVAL:-10}; else LOG_INTERVAL=${LOG_INTERVAL:-1}; fi
WARMUP=$(( ITERS / 15 < 20 ? ITERS / 15 : 20 ))

# The repository's scripts as a path from this directory ("tools/x.py" when run from the repository root,
# absolute when the repository is not below it): the commands printed at the end work as printed from here.
REL=$("$PYTHON" -c 'import os, sys; print(os.path.relpath(sys.argv[1]))' "$REPO")
case "$REL" in
  .) AT="" ;;
  ..|../*) REL=$REPO; AT="$REPO/" ;;
  *) AT="$REL/" ;;
esac

if [ -n "${CKPT:-}" ]; then
  for d in "$CKPT" "$CKPT-x2" "$CKPT-hf"; do
    if [ -e "$d" ]; then
      echo "cpu_quickstart: CKPT: $d already exists; the quick start never overwrites a checkpoint:" \
           "choose another CKPT or leave it unset" >&2
      exit 2
    fi
  done
else
  CKPT="$WORK/checkpoints"
  n=1
  while [ -e "$CKPT" ] || [ -e "$CKPT-x2" ] || [ -e "$CKPT-hf" ]; do
    n=$((n + 1))
    CKPT="$WORK/checkpoints-$n"
  done
fi

echo "cpu_quickstart: builds a ${CORPUS_MB} MB text corpus from this machine's Python sources, trains a" \
     "${VOCAB}-token SentencePiece tokenizer, tokenizes the corpus, then trains a small Tokenformer on 2 CPU ranks" \
     "(tensor parallel 2) for ${ITERS} iterations and shows the loss falling; output in ${WORK}/ (re-runs reuse" \
     "the data), the checkpoint in ${CKPT}/."
mkdir -p "$WORK"

if [ ! -s "$WORK/corpus.jsonl" ]; then
  echo "== 1/4 corpus: $WORK/corpus.jsonl"
  "$PYTHON" "$REPO/tools/build_local_corpus.py" --output "$WORK/corpus.jsonl.tmp" --format jsonl --max-mb "$CORPUS_MB"
  mv "$WORK/corpus.jsonl.tmp" "$WORK/corpus.jsonl"
else
  echo "== 1/4 corpus: reusing $WORK/corpus.jsonl"
fi

if [ ! -s "$WORK/tokenizer.model" ]; then
  echo "== 2/4 tokenizer: $WORK/tokenizer.model"
  "$PYTHON" "$REPO/tools/train_tokenizer.py" --input "$WORK/corpus.jsonl" --output-prefix "$WORK/tokenizer" \
    --vocab-size "$VOCAB" --input-sentence-size 300000
else
  echo "== 2/4 tokenizer: reusing $WORK/tokenizer.model"
fi

if [ ! -s "$WORK/corpus_text_document.idx" ]; then
  echo "== 3/4 dataset: $WORK/corpus_text_document.{bin,idx}"
  "$PYTHON" "$REPO/tools/preprocess_data.py" --input "$WORK/corpus.jsonl" --output-prefix "$WORK/corpus" \
    --tokenizer-model "$WORK/tokenizer.model" --append-eod --workers 2
else
  echo "== 3/4 dataset: reusing $WORK/corpus_text_document.{bin,idx}"
fi

echo "== 4/4 training: 2 ranks, TP = 2, log in $WORK/train.log, TensorBoard in $WORK/tensorboard," \
     "checkpoint in $CKPT"
rm -rf "$WORK/tensorboard"
"$PYTHON" -m torch.distributed.run --nproc_per_node 2 --master_addr 127.0.0.1 --master_port "${MASTER_PORT:-29533}" \
  "$REPO/pretrain_tokenformer.py" \
  --num-layers 4 --hidden-size 128 --num-attention-heads 4 --seq-length 128 \
  --qkv-num-param-tokens 128 --proj-num-param-tokens 128 --ffn-num-param-tokens 512 \
  --tensor-model-parallel-size 2 \
  --micro-batch-size 8 --global-batch-size 16 --train-iters "$ITERS" \
  --lr 3e-3 --min-lr 3e-4 --lr-decay-style cosine --lr-warmup-iters "$WARMUP" --weight-decay 0.01 --clip-grad 1.0 \
  --data-path "$WORK/corpus_text_document" --split 980,20,0 --tokenizer-model "$WORK/tokenizer.model" \
  --log-interval "$LOG_INTERVAL" --eval-interval 100 --eval-iters 5 --save "$CKPT" \
  --tensorboard-dir "$WORK/tensorboard" 2>&1 | tee "$WORK/train.log" \
  | grep --line-buffered -E "^ iteration|validation|^> |number of parameters|error"

"$PYTHON" - "$WORK/train.log" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
losses = [float(x) for x in re.findall(r"\| lm loss: ([0-9.E+\-]+) \|", text)]
if len(losses) < 2:
    sys.exit("cpu_quickstart: training did not log losses; see " + sys.argv[1])
print(f"cpu_quickstart: lm loss {losses[0]:.3f} (first log line) -> {losses[-1]:.3f} (last); "
      f"{'falling' if losses[-1] < losses[0] else 'NOT falling'}")
PY
if [ ! -s "$CKPT/latest" ]; then
  echo "cpu_quickstart: training saved no checkpoint in $CKPT; see $WORK/train.log" >&2
  exit 1
fi

q() { printf '%q' "$1"; }
PY=$(q "$PYTHON")
echo "cpu_quickstart: the trained model is saved in $CKPT ($(cat "$CKPT/latest")). Next steps, from this directory:"
echo "  # a few words from it (sampled; the corpus is Python source code)"
echo "  $PY $(q "${AT}tools/generate.py") --load $(q "$CKPT") --prompt \"import os\" --max-new-tokens 24"
echo "  # grow it x2: twice the parameter tokens in every Pattention, the same function (docs/workflow.md)"
echo "  $PY $(q "${AT}tools/expand_checkpoint.py") --load $(q "$CKPT") --save $(q "$CKPT-x2")" \
     "--param-token-growth-factor 2"
echo "  # export it to Hugging Face: AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)" \
     "(docs/interop.md)"
if ! "$PYTHON" -c "import transformers, tokenizers, safetensors" 2>/dev/null; then
  echo "  pip install -e \"$REL[hf]\""
fi
echo "  $PY $(q "${AT}tools/export_hf.py") --load $(q "$CKPT") --save $(q "$CKPT-hf")"
echo "cpu_quickstart: view the curves with: tensorboard --logdir $(q "$WORK/tensorboard")"
