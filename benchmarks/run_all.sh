#!/usr/bin/env bash
# Runs every benchmark of BENCHMARKS.md in one go, sequentially, on a quiet machine.
set -u
cd "$(dirname "$0")/.."
mkdir -p bench_results
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}  # as kvserve serve sets it
R=bench_results
PY=.venv/bin/python
KV=.venv/bin/kvserve
log() { echo "=== $(date +%T) $*" | tee -a $R/progress.log; }

wait_up() { for i in $(seq 1 240); do curl -sf "http://127.0.0.1:$1/v1/models" >/dev/null && return 0; sleep 1; done; return 1; }

log attention; $PY -m benchmarks.attention --dtypes float32 > $R/attention.md 2>$R/attention.err
log attention-backward
$PY -m benchmarks.attention --dtypes float32 --backward --seq-lens 1024,2048,4096,8192 > $R/attention_backward.md 2>$R/attention_backward.err
log kvcache;   $PY -m benchmarks.kvcache > $R/kvcache.md 2>$R/kvcache.err
log engine;    $PY -m benchmarks.engine --serial-requests 4 > $R/engine.md 2>$R/engine.err

log serve-kvserve
$KV serve --port 8100 --log-level warning > $R/server.log 2>&1 & SP=$!
wait_up 8100
$KV bench serve --port 8100 --max-concurrency 1 --num-prompts 6 --random-input-len 128 --random-output-len 128 --ignore-eos --num-warmups 1 --disable-tqdm --result-json $R/serve_c1.json > $R/serve_c1.md 2>&1
$KV bench serve --port 8100 --max-concurrency 32 --num-prompts 96 --random-input-len 128 --random-output-len 128 --ignore-eos --num-warmups 1 --disable-tqdm --result-json $R/serve_c32.json > $R/serve_c32.md 2>&1
log shared-prefix-on
$KV bench serve --port 8100 --dataset shared-prefix --shared-prefix-len 1024 --shared-suffix-len 32 --output-len 16 --max-concurrency 4 --num-prompts 16 --num-warmups 1 --disable-tqdm --result-json $R/prefix_on.json > $R/prefix_on.md 2>&1
kill -TERM $SP; wait $SP
$KV serve --port 8100 --log-level warning --no-prefix-caching > $R/server_nocache.log 2>&1 & SP=$!
wait_up 8100
log shared-prefix-off
$KV bench serve --port 8100 --dataset shared-prefix --shared-prefix-len 1024 --shared-suffix-len 32 --output-len 16 --max-concurrency 4 --num-prompts 16 --num-warmups 1 --disable-tqdm --result-json $R/prefix_off.json > $R/prefix_off.md 2>&1
kill -TERM $SP; wait $SP

log naive
$PY -m benchmarks.naive_server --port 8101 > $R/naive_server.log 2>&1 & NP=$!
wait_up 8101
$KV bench serve --port 8101 --max-concurrency 1 --num-prompts 3 --random-input-len 128 --random-output-len 128 --ignore-eos --num-warmups 1 --disable-tqdm --result-json $R/naive_c1.json > $R/naive_c1.md 2>&1
$KV bench serve --port 8101 --max-concurrency 16 --num-prompts 16 --random-input-len 128 --random-output-len 128 --ignore-eos --num-warmups 0 --disable-tqdm --result-json $R/naive_c16.json > $R/naive_c16.md 2>&1
kill $NP; wait $NP

# A distilled MQA takes an hour: only with CONVERT_MINUTES set (e.g. 60), or when $R/smollm2-mqa exists.
CONVERTED=""
if [ "${CONVERT_MINUTES:-0}" != 0 ] && [ ! -d $R/smollm2-mqa ]; then
  log convert
  $KV convert --variant mqa --output $R/smollm2-mqa --max-minutes "$CONVERT_MINUTES" --no-progress > $R/convert.log 2>&1
fi
[ -d $R/smollm2-mqa ] && CONVERTED=",mqa-distilled=$R/smollm2-mqa"

log variants
$KV bench variants --variants "mha,gqa-3,mqa$CONVERTED" --concurrency 1,32 --rounds 1 --output-len 64 --out $R/variants > $R/variants.md 2> $R/variants.err
log done
