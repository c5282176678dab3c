#!/bin/bash
# What a GPU session measures beyond ../shared/gpu/check.sh, run on the lent
# device from the project's root (after check.sh, on the same warm machine,
# or alone), most important first:
#   decode     benchmarks/decode_step.py at Qwen3-0.6B's shape, B = 64,
#              32 + 256 tokens, an EOS id: fp32 / bf16 x a check per step / 16
#              (the lean-decode target: bf16 <= 0.85 ms/step on an H200, and
#              clearly faster than fp32);
#   cudnn      the cuDNN kernel against the float64 reference on the GPU
#              (tests/test_attention.py, values and gradients; skipped on CPU);
#   update     ../shared/gpu's probe_speed.py train (copied to .device/ as its
#              README says): the update step as check.sh measures it (B = 16,
#              L = 1024, bf16 body, PPO + AdamW): time and compiled memory;
#   layers     benchmarks/attention_memory.py --time: the update step of 28
#              layers, cuDNN vs blockwise attention, unrolled vs scanned
#              layers, remat=block (compile time, temporaries, step time);
#   tests      the rest of tests/test_attention.py on the GPU but Pallas (TPU
#              interpret mode): blockwise against the references, the decode
#              under the GPU loop rule;
#   chunks     decode over a 2048-slot cache (4 chunks): every chunk in a loop
#              of known length (the GPU rule) vs only the filled ones;
#   inflight   benchmarks/inflight.py at Qwen3-0.6B's shape (all 28 layers),
#              256 prompts, N = 1024, 64 slots: static vs waves vs in-flight
#              useful tokens/s on log-normal (median N/8) and equal lengths,
#              with the in-flight loop's trips (one host sync each on
#              XLA:GPU) and the tests of tests/test_inflight.py on the GPU;
#   packing    benchmarks/packing.py at Qwen3-0.6B's shape (all 28 layers,
#              vocabulary 151936, bf16_fp32_head, scanned layers, remat=block,
#              auto attention: cuDNN), B = 16, L = 4096, log-normal lengths
#              (median L/8): padded vs packed useful tokens/s of one update
#              (the shape whose compiled temporaries docs/benchmarks.md gives).
# Each part is time-boxed; the whole stays under DEADLINE seconds (parts that
# no longer fit are skipped, so a short DEADLINE runs the first ones only).
# PARTS="inflight packing" (names, spaces or commas) runs only those parts.
# Logs and JSON go to $OUT (the device tool's output folder).
#
#   bash benchmarks/gpu.sh                        # on the device
#   PARTS=inflight,inflight_tests,packing bash benchmarks/gpu.sh
#                                                 # issue 27's parts only
#   QUICK=1 OUT=/tmp/gpu PYTHON=.venv/bin/python \
#     PROBE=../shared/gpu/probe_speed.py bash benchmarks/gpu.sh
#                                                 # CPU smoke run, tiny sizes
DEADLINE=${DEADLINE:-520}
PY=${PYTHON:-python3}
START=$SECONDS
export OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false TF_CPP_MIN_LOG_LEVEL=2
ALL_PARTS="decode cudnn update layers tests chunks inflight inflight_tests packing"
for name in ${PARTS//,/ }; do
  [[ " $ALL_PARTS " == *" $name "* ]] || {
    echo "PARTS: no part '$name'; the parts are: $ALL_PARTS" >&2; exit 2; }
done
selected() { [ -z "$PARTS" ] || [[ " ${PARTS//,/ } " == *" $1 "* ]]; }
part() {  # part NAME SECONDS CMD...
  local name=$1 limit=$2; shift 2
  selected "$name" || { echo "## $name: not in PARTS"; return; }
  local left=$(( DEADLINE - (SECONDS - START) ))
  (( left < 15 )) && { echo "## $name: skipped, ${left}s left"; return; }
  (( limit > left )) && limit=$left
  echo "## $name (limit ${limit}s, t=$((SECONDS-START))s)"
  local t=$SECONDS
  timeout -s INT -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  echo "## $name rc=$rc in $((SECONDS-t))s"
  tail -n "${TAILN:-14}" "$OUT/$name.log" | cut -c1-300
}
if [ -n "$QUICK" ]; then  # sizes that compile in seconds on a CPU
  DECODE="--layers 1 --batch 2 --new_tokens 8 --repeats 1"
  CHUNKS="--layers 1 --batch 2 --new_tokens 40 --chunk_size 16 --repeats 1"
  LAYERS="--tiny --layers 2 --batch 1 --lengths 64 --chunk_size 16 --time 1"
  TESTS="decode_matches"
  UPDATE="--layers 1 --batch 1 --seq 64 --repeats 1"
  INFLIGHT="--runs tiny:32 --batch 8 --slots 4 --repeats 1"
  PACKING="--cases tiny --batch 16 --length 64 --repeats 1"
else
  DECODE=""
  CHUNKS="--new_tokens 2016 --repeats 2"
  LAYERS="--layers 28 --batch 16 --lengths 1024 --time 3"
  TESTS="not cudnn and not pallas"
  UPDATE="--batch 16 --seq 1024"
  INFLIGHT="--runs qwen3-0.6b:1024 --batch 256 --slots 64 --repeats 2"
  PACKING="--cases qwen3_0.6b --batch 16 --length 4096 --attention auto --repeats 3"
fi
PROBE=${PROBE:-.device/probe_speed.py}
# The wheels check.sh installs (its README): entropo imports nothing of
# them for these parts, but a machine that has them keeps them on the path.
[ -d /tmp/site ] && export PYTHONPATH=/tmp/site:$PWD || export PYTHONPATH=$PWD
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" -c "import jax; print('jax', jax.__version__, jax.devices())" 2>&1 | tail -1
ATTENTION_TESTS=(env ENTROPO_TEST_ACCELERATOR=1 "$PY" -m pytest -q
  -p no:cacheprovider -o addopts="" -rs tests/test_attention.py)
# shellcheck disable=SC2086  # the size options split into words on purpose
part decode 150 "$PY" benchmarks/decode_step.py $DECODE --out "$OUT/decode.json"
part cudnn 60 "${ATTENTION_TESTS[@]}" -k cudnn
if [ -f "$PROBE" ]; then
  # shellcheck disable=SC2086
  part update 80 "$PY" "$PROBE" train $UPDATE --precision bf16_fp32_logits
elif selected update; then
  echo "## update: skipped, no $PROBE"
else
  echo "## update: not in PARTS"
fi
# shellcheck disable=SC2086
part layers 150 "$PY" benchmarks/attention_memory.py $LAYERS \
  --attention auto blockwise --remat block --loops unrolled scan \
  --precision bf16_fp32_logits --out "$OUT/layers.json"
part tests 120 "${ATTENTION_TESTS[@]}" -k "$TESTS"
# shellcheck disable=SC2086
part chunks 90 "$PY" benchmarks/decode_step.py $CHUNKS \
  --variants bf16:16:filled bf16:16:every --out "$OUT/chunks.json"
# shellcheck disable=SC2086
part inflight 150 env PYTHONPATH="$PYTHONPATH:$PWD/benchmarks" "$PY" \
  benchmarks/inflight.py $INFLIGHT --out "$OUT/inflight.json"
part inflight_tests 90 env ENTROPO_TEST_ACCELERATOR=1 "$PY" -m pytest -q \
  -p no:cacheprovider -o addopts="" tests/test_inflight.py
# shellcheck disable=SC2086
part packing 180 "$PY" benchmarks/packing.py $PACKING \
  --out "$OUT/packing.json"
echo "## total $((SECONDS-START))s"
