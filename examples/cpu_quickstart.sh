#!/usr/bin/env bash
# CPU quick start: corpus -> tokenizer -> indexed dataset -> Tokenformer training on 2 CPU ranks (TP = 2).
#
#   bash examples/cpu_quickstart.sh
#
# Everything lands in $WORK (default ./quickstart); a second run reuses the corpus, tokenizer and
# dataset and trains again from scratch. Knobs (environment): WORK, PYTHON, ITERS (default 300),
# CORPUS_MB (default 4), VOCAB (default 4096). About 5-8 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."

WORK=${WORK:-quickstart}
PYTHON=${PYTHON:-python3}
ITERS=${ITERS:-300}
CORPUS_MB=${CORPUS_MB:-4}
VOCAB=${VOCAB:-4096}

echo "cpu_quickstart: builds a ${CORPUS_MB} MB text corpus from this machine's Python sources, trains a" \
     "${VOCAB}-token SentencePiece tokenizer, tokenizes the corpus, then trains a small Tokenformer on 2 CPU ranks" \
     "(tensor parallel 2) for ${ITERS} iterations and shows the loss falling; output in ${WORK}/ (re-runs reuse the data)."
mkdir -p "$WORK"

if [ ! -s "$WORK/corpus.jsonl" ]; then
  echo "== 1/4 corpus: $WORK/corpus.jsonl"
  "$PYTHON" tools/build_local_corpus.py --output "$WORK/corpus.jsonl.tmp" --format jsonl --max-mb "$CORPUS_MB"
  mv "$WORK/corpus.jsonl.tmp" "$WORK/corpus.jsonl"
else
  echo "== 1/4 corpus: reusing $WORK/corpus.jsonl"
fi

if [ ! -s "$WORK/tokenizer.model" ]; then
  echo "== 2/4 tokenizer: $WORK/tokenizer.model"
  "$PYTHON" tools/train_tokenizer.py --input "$WORK/corpus.jsonl" --output-prefix "$WORK/tokenizer" \
    --vocab-size "$VOCAB" --input-sentence-size 300000
else
  echo "== 2/4 tokenizer: reusing $WORK/tokenizer.model"
fi

if [ ! -s "$WORK/corpus_text_document.idx" ]; then
  echo "== 3/4 dataset: $WORK/corpus_text_document.{bin,idx}"
  "$PYTHON" tools/preprocess_data.py --input "$WORK/corpus.jsonl" --output-prefix "$WORK/corpus" \
    --tokenizer-model "$WORK/tokenizer.model" --append-eod --workers 2
else
  echo "== 3/4 dataset: reusing $WORK/corpus_text_document.{bin,idx}"
fi

echo "== 4/4 training: 2 ranks, TP = 2, log in $WORK/train.log, TensorBoard in $WORK/tensorboard"
rm -rf "$WORK/tensorboard"
"$PYTHON" -m torch.distributed.run --nproc_per_node 2 --master_addr 127.0.0.1 --master_port "${MASTER_PORT:-29533}" \
  pretrain_tokenformer.py \
  --num-layers 4 --hidden-size 128 --num-attention-heads 4 --seq-length 128 \
  --qkv-num-param-tokens 128 --proj-num-param-tokens 128 --ffn-num-param-tokens 512 \
  --tensor-model-parallel-size 2 \
  --micro-batch-size 8 --global-batch-size 16 --train-iters "$ITERS" \
  --lr 3e-3 --min-lr 3e-4 --lr-decay-style cosine --lr-warmup-iters 20 --weight-decay 0.01 --clip-grad 1.0 \
  --data-path "$WORK/corpus_text_document" --split 980,20,0 --tokenizer-model "$WORK/tokenizer.model" \
  --log-interval 10 --eval-interval 100 --eval-iters 5 \
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
echo "cpu_quickstart: view the curves with: tensorboard --logdir $WORK/tensorboard"
